// Llama checkpoints from HF safetensors directories, GGUF files, llama2.c
// .bin files and our native directories, as one set of HF-named tensors; and
// the writers of our native format and of GGUF for llama.cpp. Every reader and
// writer returns absl::Status(Or) whose message names the file and the field or
// tensor at fault (io/errors.h).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/tensor.h"

namespace sparseflash::checkpoint {

struct RopeScaling {
  std::string type;  // "" (none), "linear", "dynamic", "yarn", "llama3"
  double factor = 1.0, low_freq_factor = 1.0, high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
  // yarn (0: absent, derived as transformers derives it)
  double beta_fast = 32, beta_slow = 1, attention_factor = 0, mscale = 0, mscale_all_dim = 0;
  bool truncate = true;
};

struct LlamaConfig {
  int64_t vocab_size = 0, hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0,
          num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0,
          max_position_embeddings = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1, eos_token_id = -1;
};

// HF config.json of a LlamaForCausalLM (transformers 4 "rope_theta" +
// "rope_scaling" or transformers 5 "rope_parameters"). Defaults as in
// transformers' LlamaConfig; biases, activations other than silu and rope
// types other than default/linear/llama3 are refused.
absl::StatusOr<LlamaConfig> parse_hf_llama_config(const std::string& config_json_path);
// The same from a config.json's text; `path` is for error messages.
absl::StatusOr<LlamaConfig> llama_config_from_json(const std::string& path,
                                                   const std::string& json_text);
// HF config.json text for `config` (what our native format stores).
std::string llama_config_to_json(const LlamaConfig& config);

enum class SourceFormat { kHfSafetensors, kGguf, kLlama2c, kNative };
const char* source_format_name(SourceFormat format);

// The key our native checkpoints carry in the safetensors "__metadata__".
constexpr const char* kNativeFormatKey = "sparseflash_format";
constexpr const char* kNativeFormatValue = "llama-v1";

struct LlamaCheckpoint {
  SourceFormat format = SourceFormat::kHfSafetensors;
  std::string path;
  LlamaConfig config;
  // HF names: model.embed_tokens.weight, model.layers.{i}.self_attn.{q,k,v,o}_proj.weight,
  // model.layers.{i}.mlp.{gate,up,down}_proj.weight, model.layers.{i}.input_layernorm.weight,
  // model.layers.{i}.post_attention_layernorm.weight, model.norm.weight, lm_head.weight
  // (absent when tied). Shapes as in HF (out_features, in_features); checked
  // against the config at load.
  std::map<std::string, TensorInfo> tensors;
  // GGUF / llama2.c store q_proj/k_proj rows for interleaved RoPE; the model
  // permutes them to HF rotate-half at load.
  bool qk_interleaved = false;
  // GGUF only: rope_freqs.weight (head_dim / 2 frequency divisors; how
  // llama.cpp stores llama3 rope scaling). Empty when absent.
  std::vector<float> rope_freq_factors;
  // Stable fingerprint: "fnv1a64:" + 16 hex digits of FNV-1a 64 over the
  // config fields, then for every tensor in name order its name, dtype, shape
  // and up to 3 x 64 sampled bytes (first, middle, last). Independent of the
  // path; changes when the format (dtype) or any sampled weight changes.
  std::string identity;
  std::shared_ptr<const void> keepalive;  // keeps the mappings alive
};

// path: HF dir (config.json + safetensors), a .gguf file, a llama2.c .bin,
// or our native dir (a .safetensors, index or config.json file in such a
// directory stands for the directory). GGUF is recognised by its magic,
// anything else that is not a directory is read as llama2.c. The error names
// the file and the field (NotFound for a missing file).
absl::StatusOr<LlamaCheckpoint> load_llama_checkpoint(const std::string& path);

// The parsers behind load_llama_checkpoint, on bytes already in memory.
absl::StatusOr<LlamaCheckpoint> parse_llama2c(std::shared_ptr<const MappedFile> file);
absl::StatusOr<LlamaCheckpoint> load_gguf_llama(const std::string& path);
class GgufFile;
absl::StatusOr<LlamaCheckpoint> gguf_llama(std::shared_ptr<const GgufFile> file);

// A llama2.c checkpoint file's bytes: version 0 = the legacy 7-int header
// (negative vocab_size when untied, freq_cis tables after the final norm),
// 1 = the "ak42" 256-byte header. `tensors` maps HF names to F32 values (Q/K
// rows in the interleaved order llama2.c uses); lm_head.weight only if untied.
absl::StatusOr<std::string> llama2c_bytes(const LlamaConfig& config, int version,
                                          const std::map<std::string, std::vector<float>>& tensors);

// Checks the config's sizes (positive, within limits, heads divisible by KV
// heads, even head_dim, RoPE scaling fields); the error names `path` and the field.
absl::Status check_llama_config(const std::string& path, const LlamaConfig& config);

// llama.cpp's tensor names for a layer's tensors (blk.N.*) and ours (HF's,
// model.layers.N.*), in the order llama.cpp's convert writes them.
inline constexpr std::pair<const char*, const char*> kGgufLayerNames[] = {
    {"attn_norm.weight", "input_layernorm.weight"},   {"attn_q.weight", "self_attn.q_proj.weight"},
    {"attn_k.weight", "self_attn.k_proj.weight"},     {"attn_v.weight", "self_attn.v_proj.weight"},
    {"attn_output.weight", "self_attn.o_proj.weight"}, {"ffn_norm.weight", "post_attention_layernorm.weight"},
    {"ffn_gate.weight", "mlp.gate_proj.weight"},      {"ffn_down.weight", "mlp.down_proj.weight"},
    {"ffn_up.weight", "mlp.up_proj.weight"}};

// Name of layer i's tensor `suffix` ("self_attn.q_proj.weight").
std::string llama_layer_tensor(int64_t layer, const std::string& suffix);
// Checks that every expected tensor exists with the shape the config implies.
absl::Status validate_llama_tensors(const LlamaCheckpoint& ckpt);
std::string llama_identity(const LlamaCheckpoint& ckpt);

// Writes our native checkpoint: dir/config.json (llama_config_to_json) and
// dir/model.safetensors with kNativeFormatKey in its metadata; both atomic.
// `tensors` use the HF names and layout (F32/F16/BF16), Q/K in rotate-half order.
// The written directory is read back before this returns OK.
absl::Status write_native_llama(const std::string& dir, const LlamaConfig& config,
                                const std::vector<TensorToWrite>& tensors);

struct GgufLlamaOptions {
  DType type = DType::kF16;  // the matrices: F32, F16, BF16 or Q8_0 (norms stay F32)
  std::string name;          // general.name
  // rope_freqs.weight: head_dim / 2 divisors of the unscaled RoPE frequencies
  // (how llama.cpp stores llama3 scaling). Needed when the config's scaling
  // is llama3, written whenever not empty.
  std::vector<float> rope_freq_factors;
  // Further keys written as given: the tokenizer's (tokenizer.*) and a
  // source's descriptive general.* keys (license, basename...). Not the keys
  // written from the model (llama.*, general.architecture, name, file_type,
  // quantization_version, alignment). Where they hold no
  // tokenizer.ggml.bos/eos_token_id, the config's ids are added.
  std::vector<GgufEntry> metadata;
};

// llama.cpp's general.file_type for `type` (LLAMA_FTYPE_ALL_F32 = 0,
// MOSTLY_F16 = 1, MOSTLY_Q8_0 = 7, MOSTLY_BF16 = 32).
uint32_t gguf_file_type(DType type);

// Writes a GGUF v3 file that llama.cpp runs as architecture "llama" and that
// load_llama_checkpoint reads back as the same model: the llama.* hyper-
// parameters of `config`, its RoPE scaling (linear and yarn as
// llama.rope.scaling.*, llama3 as rope_freqs.weight; dynamic NTK and yarn
// without truncation have no llama.cpp form and are refused), llama.cpp's
// tensor names (token_embd.weight, blk.N.attn_q.weight, ..., output_norm.weight,
// output.weight unless tied) and the Q/K row order llama.cpp's convert gives
// HF weights (each head's rotate-half rows interleaved, the inverse of what
// load_llama undoes for qk_interleaved files). `tensors`: HF names and layout
// as write_native_llama takes them, F32 only; 2-D ones are stored as
// options.type (Q8_0 falls back to F16 for rows that are not whole blocks of
// 32, as llama.cpp's convert does), 1-D ones as F32. Streams through
// GgufWriter (atomic). Returns notes for the user (those fallbacks); the error
// names `path` and the tensor or setting at fault.
absl::StatusOr<std::vector<std::string>> write_gguf_llama(const std::string& path,
                                                          const LlamaConfig& config,
                                                          const std::vector<TensorToWrite>& tensors,
                                                          const GgufLlamaOptions& options);

}  // namespace sparseflash::checkpoint
