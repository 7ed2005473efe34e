// Llama decoder. Reading order: rotary embedding, RMSNorm, attention, layer,
// model, loading, perplexity.
#include "model/llama.h"

#include <chrono>
#include <filesystem>
#include <cmath>
#include <limits>
#include <set>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/linear.h>
#include <torch/utils.h>

#include "checkpoint/tensor.h"
#include "model/checkpointing.h"
#include "model/fused.h"

namespace sparseflash::model {

namespace F = torch::nn::functional;

// ---------------------------------------------------------------------------
// rotary embedding

// yarn's attention factor from its scale (transformers' get_mscale).
static double yarn_mscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

double rope_attention_factor(const checkpoint::RopeScaling& s) {
  if (s.type != "yarn") return 1.0;
  if (s.attention_factor != 0) return s.attention_factor;
  if (s.mscale != 0 && s.mscale_all_dim != 0)
    return yarn_mscale(s.factor, s.mscale) / yarn_mscale(s.factor, s.mscale_all_dim);
  return yarn_mscale(s.factor, 1.0);
}

Tensor rope_inverse_frequencies(const checkpoint::LlamaConfig& c, int64_t positions) {
  const int64_t dim = c.head_dim;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  // transformers: 1 / base ** (arange(0, dim, 2) / dim), in float32.
  Tensor exponent = at::arange(0, dim, 2, at::TensorOptions().dtype(at::kLong)).to(at::kFloat) /
                    static_cast<double>(dim);
  Tensor inv_freq = at::pow(c.rope_theta, exponent).reciprocal();
  const auto& s = c.rope_scaling;
  if (s.type.empty() || s.type == "default") return inv_freq;
  if (s.type == "linear") return inv_freq / s.factor;
  if (s.type == "dynamic") {
    // NTK-aware: a larger base for the call's length, in float32 tensor
    // arithmetic as transformers does it (its seq_len is a tensor).
    const int64_t L = s.original_max_position_embeddings;
    if (positions <= L) return inv_freq;
    Tensor len = at::scalar_tensor(positions, at::TensorOptions().dtype(at::kLong));
    Tensor base = ((len * s.factor) / static_cast<double>(L) - (s.factor - 1))
                      .pow(static_cast<double>(dim) / static_cast<double>(dim - 2)) *
                  c.rope_theta;
    return at::pow(base, exponent).reciprocal();
  }
  if (s.type == "yarn") {
    // Frequencies that turn fewer than beta_slow times over the original
    // context are interpolated (divided by factor), those turning more than
    // beta_fast times kept, with a linear ramp over the dimensions between.
    const double base = c.rope_theta, L = static_cast<double>(s.original_max_position_embeddings);
    auto correction_dim = [&](double rotations) {
      return (dim * std::log(L / (rotations * 2 * M_PI))) / (2 * std::log(base));
    };
    double low = correction_dim(s.beta_fast), high = correction_dim(s.beta_slow);
    if (s.truncate) low = std::floor(low), high = std::ceil(high);
    low = std::max(low, 0.0);
    high = std::min(high, static_cast<double>(dim - 1));
    if (low == high) high += 0.001;  // as transformers, against a zero width
    Tensor pos_freqs = at::pow(base, exponent);
    Tensor extrapolation = pos_freqs.reciprocal();
    Tensor interpolation = (pos_freqs * s.factor).reciprocal();
    Tensor ramp = ((at::arange(dim / 2, f32) - low) / (high - low)).clamp(0, 1);
    Tensor keep = 1 - ramp;  // the share of the extrapolated (unscaled) frequency
    return interpolation * (1 - keep) + extrapolation * keep;
  }
  if (s.type == "llama3") {
    // Long wavelengths are divided by `factor`, short ones kept, and the band
    // in between interpolated (Llama 3.1's "llama3" rope_type).
    const double old_context = static_cast<double>(s.original_max_position_embeddings);
    const double low_freq_wavelen = old_context / s.low_freq_factor;
    const double high_freq_wavelen = old_context / s.high_freq_factor;
    Tensor wavelen = inv_freq.reciprocal() * (2 * M_PI);
    Tensor scaled = at::where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq);
    Tensor smooth = (wavelen.reciprocal() * old_context - s.low_freq_factor) /
                    (s.high_freq_factor - s.low_freq_factor);
    Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
    Tensor medium = (wavelen >= high_freq_wavelen).logical_and(wavelen <= low_freq_wavelen);
    return at::where(medium, smoothed, scaled).to(f32.dtype());
  }
  throw std::runtime_error("Llama: unsupported rope_scaling type \"" + s.type +
                           "\" (supported: linear, dynamic, yarn, llama3)");
}

Tensor interleaved_to_rotate_half(const Tensor& weight, int64_t heads) {
  const int64_t rows = weight.size(0), in = weight.size(1), head_dim = rows / heads;
  TORCH_CHECK(rows % heads == 0 && head_dim % 2 == 0, "interleaved_to_rotate_half: ", rows,
              " rows do not split into ", heads, " heads of even size");
  // Row 2i + r of a head holds rotate-half row r * head_dim/2 + i.
  return weight.view({heads, head_dim / 2, 2, in}).transpose(1, 2).reshape({rows, in});
}

// ---------------------------------------------------------------------------
// RMSNorm

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

Tensor RMSNormImpl::forward(const Tensor& x) { return add_rms_norm(x, Tensor(), weight, eps_).second; }

// ---------------------------------------------------------------------------
// fused projections

// Concatenates the weights along rows and makes each a view of the result.
static Tensor fuse_rows(const std::vector<Tensor*>& weights) {
  torch::NoGradGuard no_grad;
  std::vector<Tensor> parts;
  for (Tensor* w : weights) parts.push_back(*w);
  Tensor fused = at::cat(parts, 0);
  int64_t row = 0;
  for (Tensor* w : weights) {
    const int64_t n = w->size(0);
    w->set_data(fused.narrow(0, row, n));
    row += n;
  }
  return fused;
}

// True when `fused` may stand for `weights`: inference (autograd off), and the
// weights are still its rows (to() or a load may have replaced them).
static bool can_use_fused(const Tensor& fused, const std::vector<Tensor>& weights) {
  if (!fused.defined() || at::GradMode::is_enabled()) return false;
  int64_t row = 0;
  for (const Tensor& w : weights) {
    if (!w.is_alias_of(fused) || w.data_ptr() != fused.narrow(0, row, w.size(0)).data_ptr())
      return false;
    row += w.size(0);
  }
  return true;
}

// ---------------------------------------------------------------------------
// attention

LlamaAttentionImpl::LlamaAttentionImpl(const checkpoint::LlamaConfig& c,
                                       attention::Options options, int layer)
    : attention(options, layer),
      heads_(c.num_attention_heads),
      kv_heads_(c.num_key_value_heads),
      head_dim_(c.head_dim),
      layer_(layer) {
  const int64_t d = c.hidden_size;
  auto linear = [](int64_t in, int64_t out) {
    return LoraLinear(torch::nn::LinearOptions(in, out).bias(false));
  };
  q_proj = register_module("q_proj", linear(d, heads_ * head_dim_));
  k_proj = register_module("k_proj", linear(d, kv_heads_ * head_dim_));
  v_proj = register_module("v_proj", linear(d, kv_heads_ * head_dim_));
  o_proj = register_module("o_proj", linear(heads_ * head_dim_, d));
}

Tensor LlamaAttentionImpl::forward(const Tensor& x, const Tensor& cos, const Tensor& sin,
                                   KVCache* cache, at::Generator& generator) {
  const int64_t B = x.size(0), N = x.size(1);
  auto heads = [&](const Tensor& t, int64_t h) {  // [B, N, h * D] -> [B, h, N, D]
    return t.view({B, N, h, head_dim_}).transpose(1, 2);
  };
  Tensor q, k, v;
  if (can_use_fused(qkv_weight_, {q_proj->weight, k_proj->weight, v_proj->weight})) {
    auto parts = F::linear(x, qkv_weight_)
                     .split_with_sizes({heads_ * head_dim_, kv_heads_ * head_dim_,
                                        kv_heads_ * head_dim_}, -1);
    q = parts[0], k = parts[1], v = parts[2];
  } else {
    q = q_proj->forward(x), k = k_proj->forward(x), v = v_proj->forward(x);
  }
  Tensor q_pre = heads(q, heads_), k_pre = heads(k, kv_heads_);
  q = rotary(q_pre, cos, sin);
  k = rotary(k_pre, cos, sin);
  v = heads(v, kv_heads_);
  Tensor y = attend_layer(attention, hook, layer_, cache, q_pre, k_pre, q, k, v, generator);
  return o_proj->forward(y.transpose(1, 2).reshape({B, N, heads_ * head_dim_}));
}

void LlamaAttentionImpl::fuse_projections() {
  // Adapters are not in the fused matrix (merge_lora folds them in first).
  if (q_proj->has_adapter() || k_proj->has_adapter() || v_proj->has_adapter()) return;
  qkv_weight_ = fuse_rows({&q_proj->weight, &k_proj->weight, &v_proj->weight});
}

// ---------------------------------------------------------------------------
// layer

LlamaLayerImpl::LlamaLayerImpl(const checkpoint::LlamaConfig& c, attention::Options options,
                               int layer) {
  const int64_t d = c.hidden_size, f = c.intermediate_size;
  auto linear = [](int64_t in, int64_t out) {
    return LoraLinear(torch::nn::LinearOptions(in, out).bias(false));
  };
  input_layernorm = register_module("input_layernorm", RMSNorm(d, c.rms_norm_eps));
  self_attn = register_module("self_attn", LlamaAttention(c, options, layer));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(d, c.rms_norm_eps));
  gate_proj = register_module("gate_proj", linear(d, f));
  up_proj = register_module("up_proj", linear(d, f));
  down_proj = register_module("down_proj", linear(f, d));
}

std::pair<Tensor, Tensor> LlamaLayerImpl::forward_residual(const Tensor& x, const Tensor& pending,
                                                           const Tensor& cos, const Tensor& sin,
                                                           KVCache* cache,
                                                           at::Generator& generator) {
  // Each residual add travels with the RMSNorm that reads its sum.
  auto [r, a_in] = add_rms_norm(x, pending, input_layernorm->weight, input_layernorm->eps());
  auto [h, m] = add_rms_norm(r, self_attn->forward(a_in, cos, sin, cache, generator),
                             post_attention_layernorm->weight, post_attention_layernorm->eps());
  Tensor gate, up;
  if (can_use_fused(gate_up_weight_, {gate_proj->weight, up_proj->weight})) {
    auto parts = F::linear(m, gate_up_weight_).chunk(2, -1);
    gate = parts[0], up = parts[1];
  } else {
    gate = gate_proj->forward(m), up = up_proj->forward(m);
  }
  return {h, down_proj->forward(swiglu(gate, up))};
}

Tensor LlamaLayerImpl::forward(const Tensor& x, const Tensor& cos, const Tensor& sin,
                               KVCache* cache, at::Generator& generator) {
  auto [h, m] = forward_residual(x, Tensor(), cos, sin, cache, generator);
  return h + m;
}

void LlamaLayerImpl::fuse_projections() {
  self_attn->fuse_projections();
  if (gate_proj->has_adapter() || up_proj->has_adapter()) return;
  gate_up_weight_ = fuse_rows({&gate_proj->weight, &up_proj->weight});
}

// ---------------------------------------------------------------------------
// model

static void check_config(const checkpoint::LlamaConfig& c) {
  auto positive = [](int64_t v, const char* field) {
    if (v <= 0)
      throw std::runtime_error(std::string("Llama config: ") + field + " must be > 0, got " +
                               std::to_string(v));
  };
  positive(c.vocab_size, "vocab_size");
  positive(c.hidden_size, "hidden_size");
  positive(c.intermediate_size, "intermediate_size");
  positive(c.num_hidden_layers, "num_hidden_layers");
  positive(c.num_attention_heads, "num_attention_heads");
  positive(c.num_key_value_heads, "num_key_value_heads");
  positive(c.head_dim, "head_dim");
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    throw std::runtime_error("Llama config: num_attention_heads " +
                             std::to_string(c.num_attention_heads) +
                             " is not a multiple of num_key_value_heads " +
                             std::to_string(c.num_key_value_heads));
  if (c.head_dim % 2 != 0)
    throw std::runtime_error("Llama config: head_dim " + std::to_string(c.head_dim) +
                             " must be even for rotary embeddings");
  if (!(c.rope_theta > 0))
    throw std::runtime_error("Llama config: rope_theta must be > 0");
  if (!(c.rms_norm_eps >= 0))
    throw std::runtime_error("Llama config: rms_norm_eps must be >= 0");
}

LlamaImpl::LlamaImpl(const checkpoint::LlamaConfig& config,
                     const std::vector<attention::Options>& layer_attention)
    : config_(config) {
  check_config(config_);
  const int64_t layers_n = config_.num_hidden_layers;
  TORCH_CHECK(layer_attention.size() == 1 || static_cast<int64_t>(layer_attention.size()) == layers_n,
              "Llama: attention options for ", layer_attention.size(), " layers, the model has ",
              layers_n, " (give one entry per layer, or one for all)");
  const int64_t d = config_.hidden_size;
  embed_tokens = register_parameter("embed_tokens", torch::zeros({config_.vocab_size, d}));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int l = 0; l < layers_n; ++l)
    layers->push_back(LlamaLayer(config_, layer_attention[layer_attention.size() == 1 ? 0 : l], l));
  norm = register_module("norm", RMSNorm(d, config_.rms_norm_eps));
  // A tied head is embed_tokens itself, not a second parameter (so to()
  // cannot split them).
  if (!config_.tie_word_embeddings)
    lm_head = register_parameter("lm_head", torch::zeros({config_.vocab_size, d}));
  inv_freq_ = rope_inverse_frequencies(config_);
  attention_factor_ = rope_attention_factor(config_.rope_scaling);
  attention_generator_ = at::detail::createCPUGenerator(1234);
}

Tensor LlamaImpl::hidden_states(const Tensor& ids, KVCache* cache) {
  TORCH_CHECK(ids.dim() == 2, "Llama: ids must be [B, N], got ", ids.sizes());
  // (Training data was checked against the vocabulary when it was opened;
  // the check costs a device synchronisation.)
  if (ids.numel() > 0 && !is_training()) {
    const int64_t lo = ids.min().item<int64_t>(), hi = ids.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < config_.vocab_size, "Llama: token id ", lo < 0 ? lo : hi,
                " outside the vocabulary [0, ", config_.vocab_size, ")");
  }
  const at::Device dev = device();
  if (inv_freq_.device() != dev) inv_freq_ = inv_freq_.to(dev);
  const int64_t N = ids.size(1);
  const int64_t offset = cache ? cache->length : 0;
  if (cache && cache->k.empty()) {
    cache->k.resize(layers->size());
    cache->v.resize(layers->size());
  }
  // transformers: positions (float32) times inverse frequencies, duplicated
  // for the two halves, cos/sin in float32, then cast to the weights' dtype.
  Tensor positions = at::arange(offset, offset + N, at::TensorOptions().dtype(at::kLong).device(dev))
                         .to(at::kFloat);
  // Dynamic NTK: the frequencies of this call's length (beyond the original
  // context; GGUF frequency factors and dynamic scaling do not meet).
  Tensor inv_freq = inv_freq_;
  if (config_.rope_scaling.type == "dynamic" &&
      offset + N > config_.rope_scaling.original_max_position_embeddings)
    inv_freq = rope_inverse_frequencies(config_, offset + N).to(dev);
  Tensor freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
  Tensor angles = at::cat({freqs, freqs}, -1);
  // Under autocast the projections are in the autocast dtype; so are cos and
  // sin, so that q and k reach the attention kernels in it.
  const at::ScalarType rope_dtype =
      dev.is_cuda() && at::autocast::is_autocast_enabled(at::kCUDA)
          ? at::autocast::get_autocast_dtype(at::kCUDA)
          : dtype();
  Tensor cos = angles.cos(), sin = angles.sin();
  if (attention_factor_ != 1.0) cos = cos * attention_factor_, sin = sin * attention_factor_;
  cos = cos.to(rope_dtype), sin = sin.to(rope_dtype);
  Tensor x = at::embedding(embed_tokens, ids.to(dev));
  Tensor pending;  // the last layer's MLP output, added by the next RMSNorm
  const bool recompute = checkpoint_blocks(cache);
  for (auto& layer : *layers) {
    LlamaLayerImpl* l = layer->as<LlamaLayer>();
    if (recompute) {
      auto out = checkpointed(
          [this, l](const std::vector<Tensor>& in) -> std::vector<Tensor> {
            auto [h, m] = l->forward_residual(in[0], in[1], in[2], in[3], nullptr,
                                              attention_generator_);
            return {h, m};
          },
          {x, pending, cos, sin}, attention_generator_);
      x = out[0], pending = out[1];
    } else {
      std::tie(x, pending) = l->forward_residual(x, pending, cos, sin, cache, attention_generator_);
    }
  }
  if (cache) cache->length += N;
  return add_rms_norm(x, pending, norm->weight, norm->eps()).second;
}

void LlamaImpl::set_rope_frequency_factors(const std::vector<float>& factors) {
  TORCH_CHECK(static_cast<int64_t>(factors.size()) == config_.head_dim / 2,
              "Llama: ", factors.size(), " rope frequency factors, head_dim / 2 = ",
              config_.head_dim / 2);
  checkpoint::LlamaConfig unscaled = config_;
  unscaled.rope_scaling = checkpoint::RopeScaling{};
  Tensor f = at::tensor(factors, at::TensorOptions().dtype(at::kFloat));
  inv_freq_ = (rope_inverse_frequencies(unscaled) / f).to(inv_freq_.device());
  rope_freq_factors_ = factors;
}

void LlamaImpl::set_attention_hook(std::shared_ptr<AttentionHook> hook) {
  hook_ = std::move(hook);
  for (auto& layer : *layers) layer->as<LlamaLayer>()->self_attn->hook = hook_.get();
}

void LlamaImpl::fuse_projections() {
  for (auto& layer : *layers) layer->as<LlamaLayer>()->fuse_projections();
}

AttentionShape LlamaImpl::attention_shape() const {
  return {static_cast<int>(config_.num_hidden_layers), config_.num_attention_heads,
          config_.num_key_value_heads, config_.head_dim};
}

std::vector<attention::Pattern> LlamaImpl::last_patterns() const {
  std::vector<attention::Pattern> out;
  for (const auto& layer : *layers)
    out.push_back(layer->as<LlamaLayer>()->self_attn->attention.last_pattern());
  return out;
}

std::vector<attention::Options> LlamaImpl::layer_attention() const {
  std::vector<attention::Options> out;
  for (const auto& layer : *layers)
    out.push_back(layer->as<LlamaLayer>()->self_attn->attention.options());
  return out;
}

// ---------------------------------------------------------------------------
// loading

namespace {

class TensorSource {
 public:
  explicit TensorSource(const checkpoint::LlamaCheckpoint& ckpt) : ckpt_(ckpt) {}

  // The tensor `name` as float32 on the CPU, checked against `shape`.
  Tensor take(const std::string& name, const std::vector<int64_t>& shape) {
    auto it = ckpt_.tensors.find(name);
    if (it == ckpt_.tensors.end())
      throw std::runtime_error(ckpt_.path + ": tensor " + name + " is missing");
    const checkpoint::TensorInfo& info = it->second;
    if (info.shape != shape)
      throw std::runtime_error(ckpt_.path + ": tensor " + name + " has shape " +
                               shape_string(info.shape) + ", the config implies " +
                               shape_string(shape));
    Tensor t = at::empty(shape, at::TensorOptions().dtype(at::kFloat));
    checkpoint::to_float32(info, t.data_ptr<float>());
    used_.insert(name);
    return t;
  }

  // Names the checkpoint holds that no weight consumed.
  std::vector<std::string> leftover() const {
    std::vector<std::string> names;
    for (const auto& [name, info] : ckpt_.tensors) {
      const bool rope_buffer = name.size() >= 20 &&
                               name.compare(name.size() - 20, 20, "rotary_emb.inv_freq") == 0;
      if (!used_.count(name) && !rope_buffer && name != "rope_freqs.weight") names.push_back(name);
    }
    return names;
  }

  static std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }

 private:
  const checkpoint::LlamaCheckpoint& ckpt_;
  std::set<std::string> used_;
};

}  // namespace

void copy_llama_weights(const checkpoint::LlamaCheckpoint& ckpt, LlamaImpl& model) {
  const auto& c = model.config();
  TensorSource source(ckpt);
  torch::NoGradGuard no_grad;
  const int64_t d = c.hidden_size, f = c.intermediate_size, hd = c.head_dim;
  const int64_t H = c.num_attention_heads, Hkv = c.num_key_value_heads;
  model.embed_tokens.copy_(source.take("model.embed_tokens.weight", {c.vocab_size, d}));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    auto layer = model.layers[l]->as<LlamaLayer>();
    const std::string p = "model.layers." + std::to_string(l) + ".";
    Tensor q = source.take(p + "self_attn.q_proj.weight", {H * hd, d});
    Tensor k = source.take(p + "self_attn.k_proj.weight", {Hkv * hd, d});
    if (ckpt.qk_interleaved) {
      q = interleaved_to_rotate_half(q, H);
      k = interleaved_to_rotate_half(k, Hkv);
    }
    layer->self_attn->q_proj->weight.copy_(q);
    layer->self_attn->k_proj->weight.copy_(k);
    layer->self_attn->v_proj->weight.copy_(source.take(p + "self_attn.v_proj.weight", {Hkv * hd, d}));
    layer->self_attn->o_proj->weight.copy_(source.take(p + "self_attn.o_proj.weight", {d, H * hd}));
    layer->gate_proj->weight.copy_(source.take(p + "mlp.gate_proj.weight", {f, d}));
    layer->up_proj->weight.copy_(source.take(p + "mlp.up_proj.weight", {f, d}));
    layer->down_proj->weight.copy_(source.take(p + "mlp.down_proj.weight", {d, f}));
    layer->input_layernorm->weight.copy_(source.take(p + "input_layernorm.weight", {d}));
    layer->post_attention_layernorm->weight.copy_(
        source.take(p + "post_attention_layernorm.weight", {d}));
  }
  model.norm->weight.copy_(source.take("model.norm.weight", {d}));
  if (!c.tie_word_embeddings) model.lm_head.copy_(source.take("lm_head.weight", {c.vocab_size, d}));
  if (!ckpt.rope_freq_factors.empty()) model.set_rope_frequency_factors(ckpt.rope_freq_factors);
  auto leftover = source.leftover();
  if (!leftover.empty()) {
    std::string names;
    for (size_t i = 0; i < leftover.size() && i < 5; ++i) names += (i ? ", " : "") + leftover[i];
    throw std::runtime_error(ckpt.path + ": " + std::to_string(leftover.size()) +
                             " tensor(s) this Llama model does not use (" + names +
                             (leftover.size() > 5 ? ", ..." : "") +
                             "); the checkpoint has features it lacks (e.g. attention biases)");
  }
}

Llama load_llama(const checkpoint::LlamaCheckpoint& ckpt, const LlamaLoadOptions& options) {
  Llama model(ckpt.config, options.attention);
  model->attention_generator() = at::detail::createCPUGenerator(options.attention_seed);
  copy_llama_weights(ckpt, *model);
  model->to(options.device, options.dtype);
  model->fuse_projections();
  model->eval();
  return model;
}

// ---------------------------------------------------------------------------
// export

// The model's weights under their HF names, in HF order (lm_head only when untied).
static std::vector<std::pair<std::string, Tensor>> hf_weights(LlamaImpl& model) {
  const checkpoint::LlamaConfig& c = model.config();
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back("model.embed_tokens.weight", model.embed_tokens);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    auto layer = model.layers[i]->as<LlamaLayer>();
    const std::string p = "model.layers." + std::to_string(i) + ".";
    out.emplace_back(p + "self_attn.q_proj.weight", layer->self_attn->q_proj->weight);
    out.emplace_back(p + "self_attn.k_proj.weight", layer->self_attn->k_proj->weight);
    out.emplace_back(p + "self_attn.v_proj.weight", layer->self_attn->v_proj->weight);
    out.emplace_back(p + "self_attn.o_proj.weight", layer->self_attn->o_proj->weight);
    out.emplace_back(p + "mlp.gate_proj.weight", layer->gate_proj->weight);
    out.emplace_back(p + "mlp.up_proj.weight", layer->up_proj->weight);
    out.emplace_back(p + "mlp.down_proj.weight", layer->down_proj->weight);
    out.emplace_back(p + "input_layernorm.weight", layer->input_layernorm->weight);
    out.emplace_back(p + "post_attention_layernorm.weight", layer->post_attention_layernorm->weight);
  }
  out.emplace_back("model.norm.weight", model.norm->weight);
  if (!c.tie_word_embeddings) out.emplace_back("lm_head.weight", model.lm_head);
  return out;
}

absl::Status write_hf_llama(LlamaImpl& model, const std::string& dir, at::ScalarType dtype) {
  const checkpoint::LlamaConfig& c = model.config();
  if (!model.rope_frequency_factors().empty() && c.rope_scaling.type.empty())
    return absl::InvalidArgumentError(
        dir + ": the model has per-frequency RoPE divisors (GGUF rope_freqs.weight) and no "
        "rope_scaling type: an HF config.json cannot express that");
  const checkpoint::DType stored = dtype == at::kBFloat16 ? checkpoint::DType::kBF16
                                   : dtype == at::kHalf   ? checkpoint::DType::kF16
                                                          : checkpoint::DType::kF32;
  std::vector<Tensor> keep;  // alive until written
  std::vector<checkpoint::TensorToWrite> entries;
  auto add = [&](const std::string& name, const Tensor& t) {
    Tensor c = t.detach().to(at::kCPU, dtype).contiguous();
    keep.push_back(c);
    entries.push_back({name, stored, std::vector<int64_t>(c.sizes().begin(), c.sizes().end()),
                       c.data_ptr(), static_cast<size_t>(c.nbytes())});
  };
  for (const auto& [name, t] : hf_weights(model)) add(name, t);
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error)
    return absl::Status(absl::ErrnoToStatusCode(error.value()),
                        dir + ": cannot create the directory: " + error.message());
  return checkpoint::write_native_llama(dir, c, entries);
}

absl::StatusOr<std::vector<std::string>> write_gguf_llama(LlamaImpl& model, const std::string& path,
                                                          checkpoint::GgufLlamaOptions options) {
  const checkpoint::LlamaConfig& c = model.config();
  options.rope_freq_factors = model.rope_frequency_factors();
  if (options.rope_freq_factors.empty() && c.rope_scaling.type == "llama3") {
    checkpoint::LlamaConfig unscaled = c;
    unscaled.rope_scaling = checkpoint::RopeScaling{};
    Tensor factors = (rope_inverse_frequencies(unscaled) / rope_inverse_frequencies(c)).contiguous();
    options.rope_freq_factors.assign(factors.data_ptr<float>(), factors.data_ptr<float>() + factors.numel());
  }
  std::vector<Tensor> keep;  // alive until written
  std::vector<checkpoint::TensorToWrite> entries;
  auto add = [&](const std::string& name, const Tensor& t) {
    Tensor f = t.detach().to(at::kCPU, at::kFloat).contiguous();
    keep.push_back(f);
    entries.push_back({name, checkpoint::DType::kF32, std::vector<int64_t>(f.sizes().begin(), f.sizes().end()),
                       f.data_ptr(), static_cast<size_t>(f.nbytes())});
  };
  for (const auto& [name, t] : hf_weights(model)) add(name, t);
  return checkpoint::write_gguf_llama(path, c, entries, options);
}

}  // namespace sparseflash::model
