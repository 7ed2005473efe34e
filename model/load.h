// A model to run (evaluate, generate from, fit SAAP on): a pretrained file or
// a run of ours, on a device, in a dtype, with the attention asked for, and
// its tokenizer. `eval --model`, `generate` and `saap` load through here;
// trainer::load_for_inference picks the entry point for a path.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include "absl/status/statusor.h"
#include "attention/attention.h"
#include "checkpoint/llama.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::model {

// The attention every layer uses instead of the model's own.
struct AttentionOverride {
  attention::Kind kind = attention::Kind::kDense;
  int num_buckets = 16;   // kHash: even, >= 2
  double drop_prob = 0.5; // kDrop: in [0, 1)
  int64_t group_size = 0; // kShift: >= 0 (0 = a quarter of the keys)
  int64_t sink_tokens = 0;   // sparse kinds: first keys every query sees (>= 0)
  int64_t local_window = 0;  // sparse kinds: and its nearest keys (>= 0)
  double lsh_capacity = 0;   // kHash: bucket capacity factor (0 = none, else >= 1)
};

// "dense", "hash", "drop" or "shift" with the given parameters; errors name
// the flag (--attention, --num-buckets, --drop-prob, --group-size,
// --sparse-sinks, --sparse-window, --lsh-capacity).
absl::StatusOr<AttentionOverride> parse_attention(const std::string& kind, int num_buckets,
                                                  double drop_prob, int64_t group_size = 0,
                                                  int64_t sink_tokens = 0,
                                                  int64_t local_window = 0,
                                                  double lsh_capacity = 0);

// "auto" (bfloat16 on CUDA, float32 on CPU), "float32"/"fp32", "bfloat16"/"bf16",
// "float16"/"fp16"; errors name --dtype.
absl::StatusOr<at::ScalarType> parse_dtype(const std::string& name, const at::Device& device);
const char* dtype_name(at::ScalarType dtype);  // "float32", "bfloat16", "float16"

struct LoadOptions {
  at::Device device = at::kCPU;
  std::string dtype = "auto";
  // None: a run keeps the attention it was trained with; a pretrained file is dense.
  std::optional<AttentionOverride> attention;
  uint64_t attention_seed = 1;  // draws of hash/drop attention
  bool need_tokenizer = false;
  // A tokenizer file (tokenizer.json, a directory holding one, .gguf, llama2.c
  // tokenizer.bin); empty = the model's own: the file's, or the one the run's
  // data was prepared with.
  std::string tokenizer;
  // Pretrained files only: "TYPE:FACTOR" (linear, dynamic, yarn) replaces the
  // file's RoPE scaling, extending its context zero-shot from the file's
  // pretraining context L to FACTOR * L (see parse_rope_scaling).
  std::string rope_scaling;
};

// "linear:4", "dynamic:2", "yarn:4" applied to `config`: the type and factor,
// original_max_position_embeddings = the file's pretraining context (its
// scaled models' original one, else max_position_embeddings) and
// max_position_embeddings = FACTOR times that. Errors name --rope-scaling.
absl::Status apply_rope_scaling(const std::string& spec, checkpoint::LlamaConfig* config);

struct LoadedModel {
  CausalLM model{nullptr};
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;  // null unless need_tokenizer
  std::string path;
  std::string format;    // "HF safetensors", "GGUF", "llama2.c", "native", or "run"
  std::string identity;  // what a SAAP index is fitted on (checkpoint::LlamaCheckpoint::identity,
                         // or "run:<ckpt.pt>@<step>")
  std::string attention; // "dense", "hash", "drop", or "as trained"
  at::Device device{at::kCPU};
  at::ScalarType dtype = at::kFloat;
  int64_t eos_id = -1;   // the file's end-of-sequence id, when the tokenizer has none (-1: none)
};

// A Llama-family file (HF directory, .gguf, llama2.c .bin, `sparseflash convert`
// output). Errors name the file (unreadable, missing tensors, a tokenizer with
// more tokens than the model's vocabulary).
absl::StatusOr<LoadedModel> load_pretrained_model(const std::string& path,
                                                  const LoadOptions& options);

// A run of ours already restored (trainer::restore_run: `trained` on the CPU,
// float32, with its `config`): rebuilt with options.attention when given,
// moved to the device and dtype. `tokenizer` is the run's (see
// trainer::load_for_inference); options.tokenizer replaces it.
absl::StatusOr<LoadedModel> prepare_run_model(CausalLM trained, const config::Experiment& config,
                                              const std::string& path, const std::string& identity,
                                              std::unique_ptr<tokenizer::Tokenizer> tokenizer,
                                              const LoadOptions& options);

// "PATH (FORMAT): N layers, d D, H/Hkv heads, vocab V, P M parameters; DTYPE on DEVICE,
// ATTENTION attention" (attention_label replaces `attention` when not empty).
std::string describe(const LoadedModel& loaded, const std::string& attention_label = "");

}  // namespace sparseflash::model
