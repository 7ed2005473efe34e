// Llama checkpoint writers: our native directory (HF config.json +
// safetensors) and GGUF files llama.cpp runs.
#include <sys/stat.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "io/atomic_file.h"
#include "io/errors.h"
#include "checkpoint/gguf.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/llama.h"
#include "checkpoint/safetensors.h"

namespace sparseflash::checkpoint {

// --- Native writer -----------------------------------------------------------------

absl::Status write_native_llama(const std::string& dir, const LlamaConfig& config,
                                const std::vector<TensorToWrite>& tensors) {
  if (absl::Status s = check_llama_config(dir + "/config.json", config); !s.ok()) return s;
  if (mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) {
    int err = errno;
    return absl::Status(absl::ErrnoToStatusCode(err),
                        dir + ": cannot create directory: " + std::strerror(err));
  }
  if (absl::Status s = write_safetensors(dir + "/model.safetensors", tensors,
                                         {{kNativeFormatKey, kNativeFormatValue}});
      !s.ok()) {
    return s;
  }
  if (absl::Status s = io::write_file_atomically(dir + "/config.json", llama_config_to_json(config));
      !s.ok()) {
    return s;
  }
  // Read back: a native checkpoint that does not load is worse than none.
  return load_llama_checkpoint(dir).status();
}

// --- GGUF writer ---------------------------------------------------------------------

uint32_t gguf_file_type(DType type) {
  switch (type) {
    case DType::kF32: return 0;
    case DType::kF16: return 1;
    case DType::kQ8_0: return 7;
    case DType::kBF16: return 32;
    default: break;
  }
  throw std::invalid_argument(std::string("GGUF export: no llama.cpp file type for ") + dtype_name(type) +
                              " (F32, F16, BF16 or Q8_0)");
}

namespace {

// The llama.rope.scaling.* keys (and checks) for the config's RoPE scaling.
void add_gguf_rope_scaling(const std::string& path, const LlamaConfig& c, const GgufLlamaOptions& o,
                           GgufBuilder& meta) {
  const RopeScaling& r = c.rope_scaling;
  if (r.type.empty() || r.type == "default") return;
  if (r.type == "llama3") {
    if (o.rope_freq_factors.empty())
      fail(path, "rope_scaling", "llama3 scaling is stored as rope_freqs.weight; its factors are missing");
    return;
  }
  if (r.type == "dynamic")
    fail(path, "rope_scaling", "llama.cpp has no dynamic NTK RoPE scaling (GGUF can hold linear, yarn, llama3)");
  if (r.type != "linear" && r.type != "yarn")
    fail(path, "rope_scaling", "unsupported type \"" + r.type + "\"");
  meta.add_string("llama.rope.scaling.type", r.type);
  meta.add_f32("llama.rope.scaling.factor", static_cast<float>(r.factor));
  meta.add_u32("llama.rope.scaling.original_context_length",
               static_cast<uint32_t>(r.original_max_position_embeddings));
  if (r.type != "yarn") return;
  if (!r.truncate)
    fail(path, "rope_scaling.truncate", "false has no llama.cpp form (its yarn truncates the correction range)");
  meta.add_f32("llama.rope.scaling.yarn_beta_fast", static_cast<float>(r.beta_fast));
  meta.add_f32("llama.rope.scaling.yarn_beta_slow", static_cast<float>(r.beta_slow));
  // transformers' attention factor: given, or from mscale / mscale_all_dim
  // (get_mscale ratio); otherwise both sides derive 0.1 ln(factor) + 1.
  double attention = r.attention_factor;
  if (attention == 0 && r.mscale != 0 && r.mscale_all_dim != 0 && r.factor > 1)
    attention = (0.1 * r.mscale * std::log(r.factor) + 1) / (0.1 * r.mscale_all_dim * std::log(r.factor) + 1);
  if (attention != 0) meta.add_f32("llama.rope.scaling.yarn_attn_factor", static_cast<float>(attention));
}

// Copies the rotate-half rows of `heads` heads ([heads * head_dim, in]) into
// the order llama.cpp's convert writes: row r * head_dim / 2 + i of a head
// becomes row 2 i + r (the inverse of model::interleaved_to_rotate_half).
void interleave_rows(const float* src, int64_t heads, int64_t head_dim, int64_t in, float* dst) {
  const int64_t half = head_dim / 2;
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t r = 0; r < 2; ++r)
      for (int64_t i = 0; i < half; ++i)
        std::memcpy(dst + (h * head_dim + 2 * i + r) * in, src + (h * head_dim + r * half + i) * in,
                    static_cast<size_t>(in) * sizeof(float));
}

}  // namespace

namespace {

std::vector<std::string> write_gguf_or_throw(const std::string& path, const LlamaConfig& c,
                                             const std::vector<TensorToWrite>& tensors,
                                             const GgufLlamaOptions& o) {
  io::ok_or_throw(check_llama_config(path, c));
  if (o.type != DType::kF32 && o.type != DType::kF16 && o.type != DType::kBF16 && o.type != DType::kQ8_0)
    fail(path, "type", std::string("cannot write ") + dtype_name(o.type) + " matrices (F32, F16, BF16 or Q8_0)");
  const uint32_t file_type = gguf_file_type(o.type);
  std::map<std::string, const TensorToWrite*> by_name;
  for (const TensorToWrite& t : tensors) {
    if (t.dtype != DType::kF32)
      fail(path, "tensor '" + t.name + "'", std::string("expected F32 values, found ") + dtype_name(t.dtype));
    if (static_cast<int64_t>(t.nbytes) != shape_numel(t.shape) * 4 || t.data == nullptr)
      fail(path, "tensor '" + t.name + "'", "shape " + shape_string(t.shape) + " does not match its data");
    by_name[t.name] = &t;
  }
  // The shapes the config implies, checked as the readers check them.
  LlamaCheckpoint expected;
  expected.path = path;
  expected.config = c;
  for (const TensorToWrite& t : tensors) {
    TensorInfo info;
    info.name = t.name;
    info.shape = t.shape;
    info.nbytes = t.nbytes;
    expected.tensors[t.name] = info;
  }
  io::ok_or_throw(validate_llama_tensors(expected));
  if (!o.rope_freq_factors.empty() && static_cast<int64_t>(o.rope_freq_factors.size()) != c.head_dim / 2)
    fail(path, "rope_freqs.weight", std::to_string(o.rope_freq_factors.size()) + " factors, head_dim / 2 is " +
                                        std::to_string(c.head_dim / 2));

  GgufWriter w(path);
  GgufBuilder& meta = w.metadata();
  meta.add_string("general.architecture", "llama");
  meta.add_string("general.name", o.name);
  meta.add_u32("general.file_type", file_type);
  meta.add_u32("general.quantization_version", 2);  // GGML_QNT_VERSION
  meta.add_u32("llama.vocab_size", static_cast<uint32_t>(c.vocab_size));
  meta.add_u32("llama.context_length", static_cast<uint32_t>(c.max_position_embeddings));
  meta.add_u32("llama.embedding_length", static_cast<uint32_t>(c.hidden_size));
  meta.add_u32("llama.block_count", static_cast<uint32_t>(c.num_hidden_layers));
  meta.add_u32("llama.feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  meta.add_u32("llama.attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  meta.add_u32("llama.attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  meta.add_u32("llama.attention.key_length", static_cast<uint32_t>(c.head_dim));
  meta.add_u32("llama.attention.value_length", static_cast<uint32_t>(c.head_dim));
  meta.add_u32("llama.rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  // float32 in the file, as llama.cpp reads them; our model computes with
  // both in float32 too, so nothing changes.
  meta.add_f32("llama.rope.freq_base", static_cast<float>(c.rope_theta));
  meta.add_f32("llama.attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  add_gguf_rope_scaling(path, c, o, meta);
  std::set<std::string> keys;
  for (const GgufEntry& e : o.metadata) {
    const bool ours = e.key.rfind("llama.", 0) == 0 || e.key == "general.architecture" ||
                      e.key == "general.name" || e.key == "general.file_type" ||
                      e.key == "general.quantization_version" || e.key == "general.alignment";
    if (ours || !keys.insert(e.key).second)
      fail(path, "metadata '" + e.key + "'", ours ? "written from the model, not copied" : "given twice");
    meta.add(e);
  }
  if (c.bos_token_id >= 0 && !keys.count("tokenizer.ggml.bos_token_id"))
    meta.add_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(c.bos_token_id));
  if (c.eos_token_id >= 0 && !keys.count("tokenizer.ggml.eos_token_id"))
    meta.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(c.eos_token_id));

  // 1-D tensors stay F32; Q8_0 rows must be whole blocks, else F16.
  std::vector<std::string> kept_f16;
  auto stored_type = [&](const std::string& gguf_name, const TensorToWrite& t) {
    if (t.shape.size() == 1) return DType::kF32;
    if (o.type == DType::kQ8_0 && t.shape.back() % dtype_block_size(o.type) != 0) {
      kept_f16.push_back(gguf_name);
      return DType::kF16;
    }
    return o.type;
  };
  auto add = [&](const std::string& gguf_name, const std::string& hf_name) {
    const TensorToWrite& t = *by_name.at(hf_name);
    w.add_tensor(gguf_name, stored_type(gguf_name, t), t.shape, static_cast<const float*>(t.data));
  };
  // Q and K: rows interleaved while the file is written (one tensor's copy at a time).
  auto add_interleaved = [&](const std::string& gguf_name, const std::string& hf_name, int64_t heads) {
    const TensorToWrite& t = *by_name.at(hf_name);
    const float* src = static_cast<const float*>(t.data);
    const int64_t in = t.shape[1], head_dim = c.head_dim;
    w.add_tensor(gguf_name, stored_type(gguf_name, t), t.shape,
                 [=](float* out) { interleave_rows(src, heads, head_dim, in, out); });
  };

  if (!o.rope_freq_factors.empty())
    w.add_tensor("rope_freqs.weight", DType::kF32, {c.head_dim / 2}, o.rope_freq_factors.data());
  add("token_embd.weight", "model.embed_tokens.weight");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string blk = "blk." + std::to_string(i) + ".";
    for (const auto& [gguf_suffix, hf_suffix] : kGgufLayerNames) {
      const std::string hf = llama_layer_tensor(i, hf_suffix);
      if (std::strcmp(gguf_suffix, "attn_q.weight") == 0) {
        add_interleaved(blk + gguf_suffix, hf, c.num_attention_heads);
      } else if (std::strcmp(gguf_suffix, "attn_k.weight") == 0) {
        add_interleaved(blk + gguf_suffix, hf, c.num_key_value_heads);
      } else {
        add(blk + gguf_suffix, hf);
      }
    }
  }
  add("output_norm.weight", "model.norm.weight");
  if (!c.tie_word_embeddings) add("output.weight", "lm_head.weight");
  w.write();
  std::vector<std::string> notes;
  if (!kept_f16.empty())
    notes.push_back(std::to_string(kept_f16.size()) + " matri" + (kept_f16.size() == 1 ? "x" : "ces") +
                    " (first: " + kept_f16.front() + ") stored as F16: rows of Q8_0 must be whole blocks of 32");
  return notes;
}

}  // namespace

absl::StatusOr<std::vector<std::string>> write_gguf_llama(const std::string& path,
                                                          const LlamaConfig& config,
                                                          const std::vector<TensorToWrite>& tensors,
                                                          const GgufLlamaOptions& options) {
  return io::status_of([&] { return write_gguf_or_throw(path, config, tensors, options); });
}

}  // namespace sparseflash::checkpoint
