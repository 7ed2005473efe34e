// Llama checkpoint loading: config parsing, the four source formats mapped to
// HF tensor names, shape validation and the identity hash.
#include "checkpoint/llama.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>
#include <stdexcept>

#include "checkpoint/gguf.h"
#include "checkpoint/json_brief.h"
#include "io/errors.h"
#include "nlohmann/json.hpp"

namespace sparseflash::checkpoint {

namespace {

using nlohmann::json;

// --- config.json fields ---

int64_t json_int(const std::string& path, const json& j, const std::string& key, bool required,
                 int64_t fallback) {
  if (!j.contains(key) || j[key].is_null()) {
    if (required) fail(path, key, "missing");
    return fallback;
  }
  const json& v = j[key];
  if (v.is_number_unsigned()) {
    if (v.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) fail(path, key, "too large");
    return static_cast<int64_t>(v.get<uint64_t>());
  }
  if (v.is_number_integer()) return v.get<int64_t>();
  fail(path, key, std::string("expected an integer, found ") + v.type_name() + " " + json_brief(v));
}

double json_number(const std::string& path, const json& j, const std::string& key, double fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_number()) fail(path, key, std::string("expected a number, found ") + j[key].type_name());
  return j[key].get<double>();
}

bool json_bool(const std::string& path, const json& j, const std::string& key, bool fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  if (!j[key].is_boolean()) fail(path, key, std::string("expected a bool, found ") + j[key].type_name());
  return j[key].get<bool>();
}

// bos/eos ids may be an integer, a list (the first is used) or null.
int64_t json_token_id(const std::string& path, const json& j, const std::string& key) {
  if (!j.contains(key) || j[key].is_null()) return -1;
  const json& v = j[key];
  if (v.is_array()) {
    if (v.empty()) return -1;
    json first = {{key, v[0]}};
    return json_int(path, first, key, true, -1);
  }
  return json_int(path, j, key, true, -1);
}

void check_positive(const std::string& path, const std::string& field, int64_t value) {
  if (value <= 0) fail(path, field, "must be positive, found " + std::to_string(value));
}

}  // namespace

static void check_config_or_throw(const std::string& path, const LlamaConfig& c) {
  check_positive(path, "vocab_size", c.vocab_size);
  check_positive(path, "hidden_size", c.hidden_size);
  check_positive(path, "intermediate_size", c.intermediate_size);
  check_positive(path, "num_hidden_layers", c.num_hidden_layers);
  check_positive(path, "num_attention_heads", c.num_attention_heads);
  check_positive(path, "num_key_value_heads", c.num_key_value_heads);
  check_positive(path, "head_dim", c.head_dim);
  check_positive(path, "max_position_embeddings", c.max_position_embeddings);
  // Generous limits that keep every product below 2^62.
  const int64_t kMax = int64_t{1} << 24;
  for (auto [name, v] : {std::pair<const char*, int64_t>{"vocab_size", c.vocab_size},
                         {"hidden_size", c.hidden_size}, {"intermediate_size", c.intermediate_size},
                         {"num_hidden_layers", c.num_hidden_layers},
                         {"num_attention_heads", c.num_attention_heads},
                         {"head_dim", c.head_dim}}) {
    if (v > kMax) fail(path, name, std::to_string(v) + " exceeds the limit " + std::to_string(kMax));
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    fail(path, "num_key_value_heads", std::to_string(c.num_key_value_heads) + " does not divide num_attention_heads " +
                                          std::to_string(c.num_attention_heads));
  }
  if (c.head_dim % 2 != 0) fail(path, "head_dim", "must be even for RoPE, found " + std::to_string(c.head_dim));
  if (!(c.rms_norm_eps > 0) || !std::isfinite(c.rms_norm_eps)) fail(path, "rms_norm_eps", "must be positive");
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) fail(path, "rope_theta", "must be positive");
  const RopeScaling& r = c.rope_scaling;
  if (!r.type.empty()) {
    if (!(r.factor > 0) || !std::isfinite(r.factor)) fail(path, "rope_scaling.factor", "must be positive");
    if (r.type == "yarn" || r.type == "dynamic")
      check_positive(path, "rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings);
    if (r.type == "llama3") {
      if (!(r.high_freq_factor > r.low_freq_factor) || !(r.low_freq_factor > 0)) {
        fail(path, "rope_scaling", "llama3 needs high_freq_factor > low_freq_factor > 0");
      }
      check_positive(path, "rope_scaling.original_max_position_embeddings", r.original_max_position_embeddings);
    }
  }
}


// --- HF config.json -------------------------------------------------------------

static LlamaConfig config_from_json_or_throw(const std::string& path, const std::string& json_text) {
  json j;
  try {
    j = json::parse(json_text);
  } catch (const json::exception& e) {
    fail(path, "", std::string("invalid JSON: ") + e.what());
  }
  if (!j.is_object()) fail(path, "", "expected a JSON object");
  if (j.contains("model_type") && j["model_type"] != "llama") {
    fail(path, "model_type", "expected \"llama\", found " + json_brief(j["model_type"]));
  }
  if (json_bool(path, j, "attention_bias", false)) fail(path, "attention_bias", "biases are not supported");
  if (json_bool(path, j, "mlp_bias", false)) fail(path, "mlp_bias", "biases are not supported");
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    fail(path, "hidden_act", "only silu is supported, found " + json_brief(j["hidden_act"]));
  }
  LlamaConfig c;
  c.vocab_size = json_int(path, j, "vocab_size", true, 0);
  c.hidden_size = json_int(path, j, "hidden_size", true, 0);
  c.intermediate_size = json_int(path, j, "intermediate_size", true, 0);
  c.num_hidden_layers = json_int(path, j, "num_hidden_layers", true, 0);
  c.num_attention_heads = json_int(path, j, "num_attention_heads", true, 0);
  c.num_key_value_heads = json_int(path, j, "num_key_value_heads", false, c.num_attention_heads);
  c.head_dim = json_int(path, j, "head_dim", false,
                        c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0);
  c.max_position_embeddings = json_int(path, j, "max_position_embeddings", false, 2048);
  c.rms_norm_eps = json_number(path, j, "rms_norm_eps", 1e-6);
  c.tie_word_embeddings = json_bool(path, j, "tie_word_embeddings", false);
  c.bos_token_id = json_token_id(path, j, "bos_token_id");
  c.eos_token_id = json_token_id(path, j, "eos_token_id");

  // transformers 5 keeps theta and scaling in rope_parameters; 4 in
  // rope_theta and rope_scaling.
  std::string rope_key = "rope_parameters";
  if (!j.contains(rope_key) || j[rope_key].is_null()) rope_key = "rope_scaling";
  c.rope_theta = json_number(path, j, "rope_theta", 10000.0);
  if (j.contains(rope_key) && !j[rope_key].is_null()) {
    const json& r = j[rope_key];
    if (!r.is_object()) fail(path, rope_key, std::string("expected an object, found ") + r.type_name());
    c.rope_theta = json_number(path, r, "rope_theta", c.rope_theta);
    std::string type = "default";
    for (const char* key : {"rope_type", "type"}) {
      if (r.contains(key) && r[key].is_string()) {
        type = r[key].get<std::string>();
        break;
      }
    }
    if (type == "linear" || type == "llama3" || type == "dynamic" || type == "yarn") {
      c.rope_scaling.type = type;
      if (type == "yarn") {
        // transformers: the pretraining context from rope_parameters, else a
        // top-level field (Phi-3), else max_position_embeddings; a missing
        // factor is the ratio of the two.
        const int64_t top = json_int(path, j, "original_max_position_embeddings", false,
                                     c.max_position_embeddings);
        c.rope_scaling.original_max_position_embeddings =
            json_int(path, r, "original_max_position_embeddings", false, top);
        c.rope_scaling.factor =
            json_number(path, r, "factor",
                        static_cast<double>(c.max_position_embeddings) /
                            static_cast<double>(c.rope_scaling.original_max_position_embeddings));
        // transformers reads beta_fast / beta_slow with "or": 0 means the default.
        const double fast = json_number(path, r, "beta_fast", 0), slow = json_number(path, r, "beta_slow", 0);
        c.rope_scaling.beta_fast = fast != 0 ? fast : 32;
        c.rope_scaling.beta_slow = slow != 0 ? slow : 1;
        c.rope_scaling.attention_factor = json_number(path, r, "attention_factor", 0);
        c.rope_scaling.mscale = json_number(path, r, "mscale", 0);
        c.rope_scaling.mscale_all_dim = json_number(path, r, "mscale_all_dim", 0);
        c.rope_scaling.truncate = json_bool(path, r, "truncate", true);
      } else {
        if (!r.contains("factor")) fail(path, rope_key + ".factor", "missing");
        c.rope_scaling.factor = json_number(path, r, "factor", 1.0);
      }
      // transformers' dynamic NTK scales from max_position_embeddings.
      if (type == "dynamic") {
        c.rope_scaling.original_max_position_embeddings = c.max_position_embeddings;
        // Our exports keep the context the model was trained to beside it;
        // otherwise the model runs to factor times the reference.
        c.max_position_embeddings = json_int(
            path, j, "sparseflash_max_position_embeddings", false,
            static_cast<int64_t>(std::llround(c.rope_scaling.factor *
                                              static_cast<double>(c.max_position_embeddings))));
      }
      if (type == "llama3") {
        for (const char* key : {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}) {
          if (!r.contains(key)) fail(path, rope_key + "." + key, "missing");
        }
        c.rope_scaling.low_freq_factor = json_number(path, r, "low_freq_factor", 1.0);
        c.rope_scaling.high_freq_factor = json_number(path, r, "high_freq_factor", 4.0);
        c.rope_scaling.original_max_position_embeddings =
            json_int(path, r, "original_max_position_embeddings", true, 8192);
      }
    } else if (type != "default") {
      fail(path, rope_key + ".rope_type",
           "unsupported rope type \"" + type + "\" (default, linear, dynamic, yarn, llama3)");
    }
  }
  check_config_or_throw(path, c);
  return c;
}

static LlamaConfig parse_config_or_throw(const std::string& config_json_path) {
  return config_from_json_or_throw(config_json_path, read_text_file(config_json_path));
}

std::string llama_config_to_json(const LlamaConfig& c) {
  json rope = {{"rope_type", c.rope_scaling.type.empty() ? "default" : c.rope_scaling.type},
               {"rope_theta", c.rope_theta}};
  json scaling = nullptr;
  if (!c.rope_scaling.type.empty()) {
    rope["factor"] = c.rope_scaling.factor;
    scaling = {{"rope_type", c.rope_scaling.type}, {"factor", c.rope_scaling.factor}};
    if (c.rope_scaling.type == "llama3") {
      for (json* r : {&rope, &scaling}) {
        (*r)["low_freq_factor"] = c.rope_scaling.low_freq_factor;
        (*r)["high_freq_factor"] = c.rope_scaling.high_freq_factor;
        (*r)["original_max_position_embeddings"] = c.rope_scaling.original_max_position_embeddings;
      }
    }
    if (c.rope_scaling.type == "yarn") {
      const RopeScaling& y = c.rope_scaling;
      for (json* r : {&rope, &scaling}) {
        (*r)["original_max_position_embeddings"] = y.original_max_position_embeddings;
        (*r)["beta_fast"] = y.beta_fast;
        (*r)["beta_slow"] = y.beta_slow;
        (*r)["truncate"] = y.truncate;
        if (y.attention_factor != 0) (*r)["attention_factor"] = y.attention_factor;
        if (y.mscale != 0) (*r)["mscale"] = y.mscale;
        if (y.mscale_all_dim != 0) (*r)["mscale_all_dim"] = y.mscale_all_dim;
      }
    }
  }
  // transformers' dynamic NTK scales from max_position_embeddings, so that
  // is where our reference length goes (the model still runs longer).
  const int64_t max_positions = c.rope_scaling.type == "dynamic"
                                    ? c.rope_scaling.original_max_position_embeddings
                                    : c.max_position_embeddings;
  json j = {{"architectures", {"LlamaForCausalLM"}},
            {"model_type", "llama"},
            {"vocab_size", c.vocab_size},
            {"hidden_size", c.hidden_size},
            {"intermediate_size", c.intermediate_size},
            {"num_hidden_layers", c.num_hidden_layers},
            {"num_attention_heads", c.num_attention_heads},
            {"num_key_value_heads", c.num_key_value_heads},
            {"head_dim", c.head_dim},
            {"max_position_embeddings", max_positions},
            {"rms_norm_eps", c.rms_norm_eps},
            {"rope_theta", c.rope_theta},
            {"rope_scaling", scaling},
            {"rope_parameters", rope},
            {"tie_word_embeddings", c.tie_word_embeddings},
            {"hidden_act", "silu"},
            {"attention_bias", false},
            {"mlp_bias", false},
            {"torch_dtype", "float32"}};
  if (c.rope_scaling.type == "dynamic")
    j["sparseflash_max_position_embeddings"] = c.max_position_embeddings;
  j["bos_token_id"] = c.bos_token_id >= 0 ? json(c.bos_token_id) : json(nullptr);
  j["eos_token_id"] = c.eos_token_id >= 0 ? json(c.eos_token_id) : json(nullptr);
  return j.dump(2) + "\n";
}

const char* source_format_name(SourceFormat format) {
  switch (format) {
    case SourceFormat::kHfSafetensors: return "hf-safetensors";
    case SourceFormat::kGguf: return "gguf";
    case SourceFormat::kLlama2c: return "llama2c";
    case SourceFormat::kNative: return "native";
  }
  return "?";
}

// --- Validation and identity -----------------------------------------------------

std::string llama_layer_tensor(int64_t layer, const std::string& suffix) {
  return "model.layers." + std::to_string(layer) + "." + suffix;
}

static void validate_tensors_or_throw(const LlamaCheckpoint& ckpt) {
  const LlamaConfig& c = ckpt.config;
  const int64_t q_dim = c.num_attention_heads * c.head_dim;
  const int64_t kv_dim = c.num_key_value_heads * c.head_dim;
  // Checked one by one (no list of expected names first): a hostile config
  // with millions of layers fails at the first missing tensor, and `seen`
  // only holds tensors that exist.
  std::set<std::string> seen;
  auto check = [&](const std::string& name, const std::vector<int64_t>& shape) {
    auto it = ckpt.tensors.find(name);
    if (it == ckpt.tensors.end()) fail(ckpt.path, "tensor '" + name + "'", "missing");
    seen.insert(name);
    const TensorInfo& t = it->second;
    if (t.shape != shape) {
      fail(ckpt.path, "tensor '" + name + "'",
           "shape " + shape_string(t.shape) + " does not match the config's " + shape_string(shape));
    }
    int64_t nbytes = dtype_nbytes(t.dtype, t.numel());
    if (nbytes < 0 || static_cast<uint64_t>(nbytes) != t.nbytes) {
      fail(ckpt.path, "tensor '" + name + "'", std::string(dtype_name(t.dtype)) + " size mismatch");
    }
  };
  check("model.embed_tokens.weight", {c.vocab_size, c.hidden_size});
  check("model.norm.weight", {c.hidden_size});
  if (!c.tie_word_embeddings) check("lm_head.weight", {c.vocab_size, c.hidden_size});
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    check(llama_layer_tensor(i, "self_attn.q_proj.weight"), {q_dim, c.hidden_size});
    check(llama_layer_tensor(i, "self_attn.k_proj.weight"), {kv_dim, c.hidden_size});
    check(llama_layer_tensor(i, "self_attn.v_proj.weight"), {kv_dim, c.hidden_size});
    check(llama_layer_tensor(i, "self_attn.o_proj.weight"), {c.hidden_size, q_dim});
    check(llama_layer_tensor(i, "mlp.gate_proj.weight"), {c.intermediate_size, c.hidden_size});
    check(llama_layer_tensor(i, "mlp.up_proj.weight"), {c.intermediate_size, c.hidden_size});
    check(llama_layer_tensor(i, "mlp.down_proj.weight"), {c.hidden_size, c.intermediate_size});
    check(llama_layer_tensor(i, "input_layernorm.weight"), {c.hidden_size});
    check(llama_layer_tensor(i, "post_attention_layernorm.weight"), {c.hidden_size});
  }
  if (seen.size() != ckpt.tensors.size()) {
    for (const auto& [name, t] : ckpt.tensors) {
      if (seen.count(name) == 0) fail(ckpt.path, "tensor '" + name + "'", "not part of a Llama with this config");
    }
  }
}

namespace {

struct Fnv1a64 {
  uint64_t h = 0xcbf29ce484222325ull;
  void bytes(const void* data, size_t n) {
    const uint8_t* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < n; ++i) {
      h ^= p[i];
      h *= 0x100000001b3ull;
    }
  }
  void str(const std::string& s) { bytes(s.data(), s.size() + 1); }  // with the NUL as separator
  void i64(int64_t v) { bytes(&v, 8); }
};

}  // namespace

std::string llama_identity(const LlamaCheckpoint& ckpt) {
  Fnv1a64 f;
  const LlamaConfig& c = ckpt.config;
  f.str("sparseflash-llama-identity-v1");
  for (int64_t v : {c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
                    c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.max_position_embeddings,
                    static_cast<int64_t>(c.tie_word_embeddings), c.rope_scaling.original_max_position_embeddings}) {
    f.i64(v);
  }
  for (double v : {c.rms_norm_eps, c.rope_theta, c.rope_scaling.factor, c.rope_scaling.low_freq_factor,
                   c.rope_scaling.high_freq_factor}) {
    f.bytes(&v, 8);
  }
  f.str(c.rope_scaling.type);
  if (c.rope_scaling.type == "yarn") {
    const RopeScaling& y = c.rope_scaling;
    for (double v : {y.beta_fast, y.beta_slow, y.attention_factor, y.mscale, y.mscale_all_dim,
                     y.truncate ? 1.0 : 0.0})
      f.bytes(&v, 8);
  }
  f.i64(ckpt.qk_interleaved ? 1 : 0);
  for (float v : ckpt.rope_freq_factors) f.bytes(&v, 4);
  for (const auto& [name, t] : ckpt.tensors) {
    f.str(name);
    f.str(dtype_name(t.dtype));
    for (int64_t d : t.shape) f.i64(d);
    f.i64(static_cast<int64_t>(t.nbytes));
    constexpr size_t kSample = 64;
    if (t.nbytes <= 3 * kSample) {
      f.bytes(t.data, t.nbytes);
    } else {
      f.bytes(t.data, kSample);
      f.bytes(t.data + (t.nbytes - kSample) / 2, kSample);
      f.bytes(t.data + t.nbytes - kSample, kSample);
    }
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016" PRIx64, f.h);
  return std::string("fnv1a64:") + hex;
}

// --- HF safetensors and native directories ------------------------------------------

namespace {

LlamaCheckpoint load_hf_directory(const std::string& dir) {
  LlamaCheckpoint ckpt;
  ckpt.path = dir;
  ckpt.config = parse_config_or_throw(dir + "/config.json");
  auto model = io::value_or_throw(SafetensorsModel::open(dir));
  ckpt.keepalive = model;
  ckpt.format = SourceFormat::kHfSafetensors;
  auto native = model->metadata().find(kNativeFormatKey);
  if (native != model->metadata().end()) {
    if (native->second != kNativeFormatValue) {
      fail(model->files().front()->path(), std::string("__metadata__.") + kNativeFormatKey,
           "unsupported native format \"" + native->second + "\" (expected " + kNativeFormatValue + ")");
    }
    ckpt.format = SourceFormat::kNative;
  }
  for (const auto& [name, t] : model->tensors()) {
    // Buffers some exporters keep (rotary inv_freq) are not weights.
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (ckpt.config.tie_word_embeddings && name == "lm_head.weight") continue;
    if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16) {
      fail(dir, "tensor '" + name + "'", std::string("dtype ") + dtype_name(t.dtype) + " is not F32/F16/BF16");
    }
    ckpt.tensors[name] = t;
  }
  validate_tensors_or_throw(ckpt);
  return ckpt;
}

}  // namespace

// --- GGUF -------------------------------------------------------------------------

namespace {

int64_t gguf_int_or(const GgufFile& g, const std::string& key, int64_t fallback) {
  return g.has(key) ? g.get_int(key) : fallback;
}

double gguf_float_or(const GgufFile& g, const std::string& key, double fallback) {
  return g.has(key) ? g.get_float(key) : fallback;
}

LlamaCheckpoint gguf_llama_from(std::shared_ptr<const GgufFile> g) {
  const std::string& path = g->path();
  LlamaCheckpoint ckpt;
  ckpt.format = SourceFormat::kGguf;
  ckpt.path = path;
  ckpt.keepalive = g;
  ckpt.qk_interleaved = true;
  std::string arch = g->get_string("general.architecture");
  if (arch != "llama") fail(path, "metadata 'general.architecture'", "expected \"llama\", found \"" + arch + "\"");
  LlamaConfig& c = ckpt.config;
  c.hidden_size = g->get_int("llama.embedding_length");
  c.intermediate_size = g->get_int("llama.feed_forward_length");
  c.num_hidden_layers = g->get_int("llama.block_count");
  c.num_attention_heads = g->get_int("llama.attention.head_count");
  c.num_key_value_heads = gguf_int_or(*g, "llama.attention.head_count_kv", c.num_attention_heads);
  c.head_dim = gguf_int_or(*g, "llama.attention.key_length",
                           c.num_attention_heads > 0 ? c.hidden_size / c.num_attention_heads : 0);
  c.max_position_embeddings = g->get_int("llama.context_length");
  c.rms_norm_eps = g->get_float("llama.attention.layer_norm_rms_epsilon");
  c.rope_theta = g->has("llama.rope.freq_base") ? g->get_float("llama.rope.freq_base") : 10000.0;
  const TensorInfo* embed = g->find("token_embd.weight");
  if (embed == nullptr) fail(path, "tensor 'token_embd.weight'", "missing");
  if (g->has("llama.vocab_size")) {
    c.vocab_size = g->get_int("llama.vocab_size");
  } else {
    c.vocab_size = embed->shape.empty() ? 0 : embed->shape[0];
  }
  if (g->has("llama.rope.scaling.type")) {
    std::string type = g->get_string("llama.rope.scaling.type");
    RopeScaling& r = c.rope_scaling;
    if (type == "linear" || type == "yarn") {
      r.type = type;
      r.factor = g->get_float("llama.rope.scaling.factor");
      r.original_max_position_embeddings =
          gguf_int_or(*g, "llama.rope.scaling.original_context_length", r.original_max_position_embeddings);
    } else if (type != "none") {
      fail(path, "metadata 'llama.rope.scaling.type'",
           "unsupported rope scaling \"" + type + "\" (none, linear, yarn)");
    }
    if (type == "yarn") {
      if (!g->has("llama.rope.scaling.original_context_length"))
        fail(path, "metadata 'llama.rope.scaling.original_context_length'", "missing (needed by yarn)");
      r.beta_fast = gguf_float_or(*g, "llama.rope.scaling.yarn_beta_fast", r.beta_fast);
      r.beta_slow = gguf_float_or(*g, "llama.rope.scaling.yarn_beta_slow", r.beta_slow);
      r.attention_factor = gguf_float_or(*g, "llama.rope.scaling.yarn_attn_factor", 0);
    }
  } else if (g->has("llama.rope.scale_linear")) {
    double factor = g->get_float("llama.rope.scale_linear");
    if (factor != 1.0) {
      c.rope_scaling.type = "linear";
      c.rope_scaling.factor = factor;
    }
  }
  if (g->has("tokenizer.ggml.bos_token_id")) c.bos_token_id = g->get_int("tokenizer.ggml.bos_token_id");
  if (g->has("tokenizer.ggml.eos_token_id")) c.eos_token_id = g->get_int("tokenizer.ggml.eos_token_id");
  c.tie_word_embeddings = g->find("output.weight") == nullptr;
  check_config_or_throw(path, c);

  auto take = [&](const std::string& gguf_name, const std::string& hf_name) {
    const TensorInfo* t = g->find(gguf_name);
    if (t == nullptr) fail(path, "tensor '" + gguf_name + "'", "missing");
    TensorInfo copy = *t;
    copy.name = hf_name;
    ckpt.tensors[hf_name] = copy;
  };
  take("token_embd.weight", "model.embed_tokens.weight");
  take("output_norm.weight", "model.norm.weight");
  if (!c.tie_word_embeddings) take("output.weight", "lm_head.weight");
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    for (const auto& [gguf_suffix, hf_suffix] : kGgufLayerNames) {
      take("blk." + std::to_string(i) + "." + gguf_suffix, llama_layer_tensor(i, hf_suffix));
    }
  }
  if (const TensorInfo* freqs = g->find("rope_freqs.weight")) {
    if (freqs->shape != std::vector<int64_t>{c.head_dim / 2}) {
      fail(path, "tensor 'rope_freqs.weight'", "shape " + shape_string(freqs->shape) + ", expected [" +
                                                   std::to_string(c.head_dim / 2) + "]");
    }
    ckpt.rope_freq_factors = to_float32(*freqs);
  }
  validate_tensors_or_throw(ckpt);
  return ckpt;
}

}  // namespace


// --- llama2.c --------------------------------------------------------------------

namespace {

constexpr uint32_t kLlama2cMagic = 0x616b3432;  // "ak42"
constexpr size_t kLlama2cV1Header = 256;

// a * b for non-negative sizes, failing on overflow past 2^62.
int64_t mul(const std::string& path, int64_t a, int64_t b) {
  if (a != 0 && b > (int64_t{1} << 62) / a) fail(path, "header", "weight sizes overflow");
  return a * b;
}

// The float blocks of a llama2.c file in order: each a tensor per layer
// (per_layer, name = HF suffix) or one tensor (full HF name; "#..." for the
// legacy freq_cis tables, which are skipped).
struct Llama2cBlock {
  std::string name;
  bool per_layer;
  std::vector<int64_t> shape;  // per layer
};

std::vector<Llama2cBlock> llama2c_layout(const LlamaConfig& c, bool v1) {
  using Block = Llama2cBlock;
  const int64_t dim = c.hidden_size, hidden = c.intermediate_size, layers = c.num_hidden_layers,
                vocab = c.vocab_size, kv_dim = c.num_key_value_heads * c.head_dim;
  const Block emb{"model.embed_tokens.weight", false, {vocab, dim}};
  const Block att_norm{"input_layernorm.weight", true, {dim}};
  const Block ffn_norm{"post_attention_layernorm.weight", true, {dim}};
  const Block final_norm{"model.norm.weight", false, {dim}};
  const Block wq{"self_attn.q_proj.weight", true, {dim, dim}};
  const Block wk{"self_attn.k_proj.weight", true, {kv_dim, dim}};
  const Block wv{"self_attn.v_proj.weight", true, {kv_dim, dim}};
  const Block wo{"self_attn.o_proj.weight", true, {dim, dim}};
  const Block w1{"mlp.gate_proj.weight", true, {hidden, dim}};
  const Block w2{"mlp.down_proj.weight", true, {dim, hidden}};
  const Block w3{"mlp.up_proj.weight", true, {hidden, dim}};
  const Block freq_real{"#freq_cis_real", false, {c.max_position_embeddings, c.head_dim / 2}};
  const Block freq_imag{"#freq_cis_imag", false, {c.max_position_embeddings, c.head_dim / 2}};
  const Block cls{"lm_head.weight", false, {vocab, dim}};
  std::vector<Block> order;
  if (v1) {
    order = {att_norm, ffn_norm, final_norm, emb, wq, wk, wv, wo, w1, w2, w3};
  } else {
    order = {emb, att_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final_norm, freq_real, freq_imag};
  }
  if (!c.tie_word_embeddings) order.push_back(cls);
  return order;
}

}  // namespace

static LlamaCheckpoint parse_llama2c_or_throw(const std::shared_ptr<const MappedFile>& file) {
  const std::string& path = file->path();
  ByteReader r(path, file->data(), file->size());
  bool v1 = file->size() >= 4 && r.read<uint32_t>("magic") == kLlama2cMagic;
  if (!v1) r = ByteReader(path, file->data(), file->size());
  if (v1) {
    int32_t version = r.read<int32_t>("version");
    if (version != 1) {
      fail(path, "version", "unsupported llama2.c version " + std::to_string(version) +
                                (version == 2 ? " (int8-quantised; export as version 1)" : " (expected 1)"));
    }
  }
  const char* kFields[] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
  int32_t p[7];
  for (int i = 0; i < 7; ++i) p[i] = r.read<int32_t>(kFields[i]);
  bool shared = true;
  size_t header = r.pos();
  if (v1) {
    uint8_t flag = r.read<uint8_t>("shared_classifier");
    if (flag > 1) fail(path, "shared_classifier", "expected 0 or 1, found " + std::to_string(flag));
    shared = flag == 1;
    header = kLlama2cV1Header;
    r.need(header - r.pos(), "header padding");
  } else {
    shared = p[5] > 0;
  }
  for (int i = 0; i < 7; ++i) {
    if (i == 5 && !v1) continue;
    if (p[i] <= 0) fail(path, kFields[i], "must be positive, found " + std::to_string(p[i]));
  }
  if (p[5] == 0 || p[5] == std::numeric_limits<int32_t>::min()) fail(path, "vocab_size", "invalid value " + std::to_string(p[5]));

  LlamaCheckpoint ckpt;
  ckpt.format = SourceFormat::kLlama2c;
  ckpt.path = path;
  ckpt.keepalive = file;
  ckpt.qk_interleaved = true;
  LlamaConfig& c = ckpt.config;
  c.hidden_size = p[0];
  c.intermediate_size = p[1];
  c.num_hidden_layers = p[2];
  c.num_attention_heads = p[3];
  c.num_key_value_heads = p[4];
  c.vocab_size = p[5] < 0 ? -static_cast<int64_t>(p[5]) : p[5];
  c.max_position_embeddings = p[6];
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = shared;
  if (c.hidden_size % c.num_attention_heads != 0) {
    fail(path, "n_heads", std::to_string(c.num_attention_heads) + " does not divide dim " + std::to_string(c.hidden_size));
  }
  if (c.num_key_value_heads > c.num_attention_heads) {
    fail(path, "n_kv_heads", std::to_string(c.num_key_value_heads) + " exceeds n_heads");
  }
  c.head_dim = c.hidden_size / c.num_attention_heads;
  check_config_or_throw(path, c);

  const int64_t layers = c.num_hidden_layers;
  std::vector<Llama2cBlock> order = llama2c_layout(c, v1);

  int64_t expected = static_cast<int64_t>(header);
  for (const Llama2cBlock& b : order) {
    int64_t n = 4;
    for (int64_t d : b.shape) n = mul(path, n, d);
    if (b.per_layer) n = mul(path, n, layers);
    expected += n;
    if (expected > (int64_t{1} << 62)) fail(path, "header", "weight sizes overflow");
  }
  if (static_cast<uint64_t>(expected) != file->size()) {
    fail(path, "file size",
         std::to_string(file->size()) + " bytes, but the header (dim " + std::to_string(c.hidden_size) +
             ", hidden_dim " + std::to_string(c.intermediate_size) + ", n_layers " + std::to_string(layers) + ", n_heads " +
             std::to_string(c.num_attention_heads) + ", n_kv_heads " + std::to_string(c.num_key_value_heads) +
             ", vocab_size " + std::to_string(p[5]) + ", seq_len " + std::to_string(p[6]) + ") implies " +
             std::to_string(expected) + (v1 ? " (version 1)" : " (legacy format)"));
  }
  int64_t offset = static_cast<int64_t>(header);
  for (const Llama2cBlock& b : order) {
    int64_t count = b.per_layer ? layers : 1;
    int64_t nbytes = 4;
    for (int64_t d : b.shape) nbytes *= d;
    for (int64_t i = 0; i < count; ++i) {
      if (b.name[0] != '#') {
        TensorInfo t;
        t.name = b.per_layer ? llama_layer_tensor(i, b.name) : b.name;
        t.dtype = DType::kF32;
        t.shape = b.shape;
        t.data = file->data() + offset;
        t.nbytes = static_cast<size_t>(nbytes);
        ckpt.tensors[t.name] = t;
      }
      offset += nbytes;
    }
  }
  validate_tensors_or_throw(ckpt);
  return ckpt;
}

static std::string llama2c_bytes_or_throw(const LlamaConfig& c, int version,
                          const std::map<std::string, std::vector<float>>& tensors) {
  if (version != 0 && version != 1) throw std::runtime_error("llama2c_bytes: version must be 0 or 1");
  if (c.head_dim * c.num_attention_heads != c.hidden_size) {
    throw std::runtime_error("llama2c_bytes: llama2.c needs head_dim * num_attention_heads == hidden_size");
  }
  std::string out;
  auto put_i32 = [&](int64_t v) {
    int32_t x = static_cast<int32_t>(v);
    out.append(reinterpret_cast<const char*>(&x), 4);
  };
  if (version == 1) {
    uint32_t magic = kLlama2cMagic;
    out.append(reinterpret_cast<const char*>(&magic), 4);
    put_i32(1);
  }
  int64_t vocab = c.vocab_size;
  if (version == 0 && !c.tie_word_embeddings) vocab = -vocab;
  for (int64_t v : {c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
                    c.num_key_value_heads, vocab, c.max_position_embeddings}) {
    put_i32(v);
  }
  if (version == 1) {
    out.push_back(c.tie_word_embeddings ? 1 : 0);
    out.resize(kLlama2cV1Header, '\0');
  }
  for (const Llama2cBlock& b : llama2c_layout(c, version == 1)) {
    int64_t count = b.per_layer ? c.num_hidden_layers : 1;
    int64_t n = shape_numel(b.shape);
    for (int64_t i = 0; i < count; ++i) {
      if (b.name[0] == '#') {  // legacy freq_cis tables: cos / sin of pos * theta^(-2k/d)
        bool real = b.name == "#freq_cis_real";
        for (int64_t pos = 0; pos < b.shape[0]; ++pos) {
          for (int64_t k = 0; k < b.shape[1]; ++k) {
            double angle = static_cast<double>(pos) /
                           std::pow(10000.0, 2.0 * static_cast<double>(k) / static_cast<double>(c.head_dim));
            float v = static_cast<float>(real ? std::cos(angle) : std::sin(angle));
            out.append(reinterpret_cast<const char*>(&v), 4);
          }
        }
        continue;
      }
      std::string name = b.per_layer ? llama_layer_tensor(i, b.name) : b.name;
      auto it = tensors.find(name);
      if (it == tensors.end() || static_cast<int64_t>(it->second.size()) != n) {
        throw std::runtime_error("llama2c_bytes: tensor " + name + " missing or of the wrong size");
      }
      out.append(reinterpret_cast<const char*>(it->second.data()), static_cast<size_t>(n) * 4);
    }
  }
  return out;
}

// --- Entry point -------------------------------------------------------------------

static LlamaCheckpoint load_or_throw(const std::string& path) {
  LlamaCheckpoint ckpt;
  if (is_directory(path)) {
    ckpt = load_hf_directory(path);
  } else if (ends_with(path, ".safetensors") || ends_with(path, ".safetensors.index.json") ||
             ends_with(path, "/config.json")) {
    // A file of an HF or native directory: load the directory.
    ckpt = load_hf_directory(dirname_of(path));
  } else {
    auto file = io::value_or_throw(MappedFile::open(path));
    bool gguf = file->size() >= 4 && std::memcmp(file->data(), "GGUF", 4) == 0;
    if (gguf || ends_with(path, ".gguf")) {
      ckpt = gguf_llama_from(io::value_or_throw(GgufFile::parse(file)));
    } else {
      ckpt = parse_llama2c_or_throw(file);
    }
  }
  ckpt.identity = llama_identity(ckpt);
  return ckpt;
}

// --- The boundary: every public reader returns a Status (io/errors.h) ------------

absl::Status check_llama_config(const std::string& path, const LlamaConfig& config) {
  return io::status_of([&] { check_config_or_throw(path, config); });
}

absl::StatusOr<LlamaConfig> llama_config_from_json(const std::string& path,
                                                   const std::string& json_text) {
  return io::status_of([&] { return config_from_json_or_throw(path, json_text); });
}

absl::StatusOr<LlamaConfig> parse_hf_llama_config(const std::string& config_json_path) {
  return io::status_of([&] { return parse_config_or_throw(config_json_path); });
}

absl::Status validate_llama_tensors(const LlamaCheckpoint& ckpt) {
  return io::status_of([&] { validate_tensors_or_throw(ckpt); });
}

absl::StatusOr<LlamaCheckpoint> load_gguf_llama(const std::string& path) {
  return io::status_of([&] { return gguf_llama_from(io::value_or_throw(GgufFile::open(path))); });
}

absl::StatusOr<LlamaCheckpoint> gguf_llama(std::shared_ptr<const GgufFile> file) {
  return io::status_of([&] { return gguf_llama_from(std::move(file)); });
}

absl::StatusOr<LlamaCheckpoint> parse_llama2c(std::shared_ptr<const MappedFile> file) {
  return io::status_of([&] { return parse_llama2c_or_throw(file); });
}

absl::StatusOr<std::string> llama2c_bytes(const LlamaConfig& config, int version,
                                          const std::map<std::string, std::vector<float>>& tensors) {
  return io::status_of([&] { return llama2c_bytes_or_throw(config, version, tensors); });
}

absl::StatusOr<LlamaCheckpoint> load_llama_checkpoint(const std::string& path) {
  return io::status_of([&] { return load_or_throw(path); });
}

}  // namespace sparseflash::checkpoint
