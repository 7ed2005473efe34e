// GPT-2 family model. Reading order: LayerNorm, SelfAttention, Block, GPT.
#include "model/gpt.h"

#include "model/checkpointing.h"
#include "model/fused.h"

#include <cmath>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/nn/init.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/functional/normalization.h>
#include <torch/utils.h>

namespace sparseflash::model {

namespace F = torch::nn::functional;

// ---------------------------------------------------------------------------

LayerNormImpl::LayerNormImpl(int64_t dim, bool with_bias) {
  weight = register_parameter("weight", torch::ones({dim}));
  if (with_bias) bias = register_parameter("bias", torch::zeros({dim}));
}

Tensor LayerNormImpl::forward(const Tensor& x) {
  return at::layer_norm(x, {weight.size(0)}, weight, bias, 1e-5);
}

// ---------------------------------------------------------------------------

SelfAttentionImpl::SelfAttentionImpl(const config::Model& m, attention::Options options,
                                     int layer)
    : attention(options, layer),
      n_head_(m.n_head()),
      head_dim_(m.d_model() / m.n_head()),
      layer_(layer) {
  const int64_t d = m.d_model();
  const int64_t projections = options.shared_qk ? 2 : 3;
  c_attn = register_module(
      "c_attn", LoraLinear(torch::nn::LinearOptions(d, projections * d).bias(m.bias())));
  c_proj = register_module("c_proj",
                           LoraLinear(torch::nn::LinearOptions(d, d).bias(m.bias())));
}

Tensor SelfAttentionImpl::forward(const Tensor& x, at::Generator& generator, KVCache* cache) {
  const int64_t B = x.size(0), N = x.size(1), d = x.size(2);
  auto heads = [&](const Tensor& t) {  // [B, N, d] -> [B, H, N, hd]
    return t.view({B, N, n_head_, head_dim_}).transpose(1, 2);
  };
  // q, k and v stay views of the projection ([B, N, H, D] in memory): the
  // attention reads any strides and returns its output in the same order, so
  // neither the views here nor the reshape below copy.
  auto parts = c_attn->forward(x).split(d, -1);
  Tensor q = heads(parts[0]), k, v;
  if (attention.options().shared_qk) {
    // The paper's LM setting: keys are unit-norm queries, so a token's query
    // and key fall in the same hash bucket. One fused kernel each way on GPU.
    k = unit_norm_rows(q, 1e-6);
    v = heads(parts[1]);
  } else {
    k = heads(parts[1]);
    v = heads(parts[2]);
  }
  Tensor y = attend_layer(attention, hook, layer_, cache, q, k, q, k, v, generator);
  return c_proj->forward(y.transpose(1, 2).reshape({B, N, d}));
}

// ---------------------------------------------------------------------------

BlockImpl::BlockImpl(const config::Model& m, attention::Options options, int layer) {
  const int64_t d = m.d_model();
  ln_1 = register_module("ln_1", LayerNorm(d, m.bias()));
  attn = register_module("attn", SelfAttention(m, options, layer));
  ln_2 = register_module("ln_2", LayerNorm(d, m.bias()));
  c_fc = register_module("c_fc",
                         LoraLinear(torch::nn::LinearOptions(d, 4 * d).bias(m.bias())));
  mlp_proj = register_module(
      "mlp_proj", LoraLinear(torch::nn::LinearOptions(4 * d, d).bias(m.bias())));
}

std::pair<Tensor, Tensor> BlockImpl::forward_residual(const Tensor& x, const Tensor& pending,
                                                      at::Generator& generator, KVCache* cache) {
  // Each residual add travels with the LayerNorm that reads its sum.
  auto [r, a_in] = add_layer_norm(x, pending, ln_1->weight, ln_1->bias, 1e-5);
  auto [h, m_in] =
      add_layer_norm(r, attn->forward(a_in, generator, cache), ln_2->weight, ln_2->bias, 1e-5);
  Tensor f = at::gelu(c_fc->forward(m_in), "tanh");
  return {h, mlp_proj->forward(f)};
}

Tensor BlockImpl::forward(const Tensor& x, at::Generator& generator) {
  auto [h, m] = forward_residual(x, Tensor(), generator);
  return h + m;
}

// ---------------------------------------------------------------------------

GPTImpl::GPTImpl(const config::Experiment& exp, int64_t vocab_size)
    : vocab_size_(exp.model().vocab_size() > 0 ? exp.model().vocab_size() : vocab_size),
      block_size_(exp.model().block_size()),
      d_model_(exp.model().d_model()),
      n_head_(exp.model().n_head()) {
  const auto& m = exp.model();
  TORCH_CHECK(vocab_size_ > 0, "GPT: vocab size unknown (model.vocab_size = 0 and no data)");
  TORCH_CHECK(m.d_model() % m.n_head() == 0, "GPT: model.d_model ", m.d_model(),
              " is not divisible by model.n_head ", m.n_head());
  wte = register_module("wte", torch::nn::Embedding(vocab_size_, m.d_model()));
  wpe = register_module("wpe", torch::nn::Embedding(block_size_, m.d_model()));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int l = 0; l < m.n_layer(); ++l)
    blocks->push_back(Block(m, layer_attention_options(exp, l), l));
  ln_f = register_module("ln_f", LayerNorm(m.d_model(), m.bias()));
  init_weights(m);
  attention_generator_ = at::detail::createCPUGenerator(exp.train().seed() ^ 0x5eedull);
}

void GPTImpl::init_weights(const config::Model& m) {
  // GPT-2: N(0, 0.02) for matrices and embeddings, zero biases, and residual
  // projections scaled down by sqrt(2 * n_layer) so the residual stream's
  // variance does not grow with depth.
  torch::NoGradGuard no_grad;
  const double std = m.init_std();
  const double residual_std = std / std::sqrt(2.0 * m.n_layer());
  for (auto& item : named_parameters()) {
    const std::string& name = item.key();
    Tensor& p = item.value();
    const bool is_residual = name.find("c_proj.weight") != std::string::npos ||
                             name.find("mlp_proj.weight") != std::string::npos;
    if (name.find("ln_") != std::string::npos) continue;  // ones / zeros already
    if (name.size() >= 4 && name.compare(name.size() - 4, 4, "bias") == 0) {
      p.zero_();
    } else {
      p.normal_(0.0, is_residual ? residual_std : std);
    }
  }
}

Tensor GPTImpl::hidden_states(const Tensor& idx, KVCache* cache) {
  TORCH_CHECK(idx.dim() == 2, "GPT: ids must be [B, N], got ", idx.sizes());
  const int64_t N = idx.size(1);
  const int64_t offset = cache ? cache->length : 0;
  TORCH_CHECK(offset + N <= block_size_, "GPT: positions up to ", offset + N,
              " exceed the context length (model.block_size) ", block_size_);
  if (cache && cache->k.empty()) {
    cache->k.resize(blocks->size());
    cache->v.resize(blocks->size());
  }
  Tensor pos = at::arange(offset, offset + N, idx.options().dtype(at::kLong));
  Tensor x = wte->forward(idx) + wpe->forward(pos).unsqueeze(0);
  Tensor pending;  // the last block's MLP output, added by the next LayerNorm
  const bool recompute = checkpoint_blocks(cache);
  for (auto& block : *blocks) {
    BlockImpl* b = block->as<Block>();
    if (recompute) {
      auto out = checkpointed(
          [this, b](const std::vector<Tensor>& in) -> std::vector<Tensor> {
            auto [h, m] = b->forward_residual(in[0], in[1], attention_generator_, nullptr);
            return {h, m};
          },
          {x, pending}, attention_generator_);
      x = out[0], pending = out[1];
    } else {
      std::tie(x, pending) = b->forward_residual(x, pending, attention_generator_, cache);
    }
  }
  if (cache) cache->length += N;
  return add_layer_norm(x, pending, ln_f->weight, ln_f->bias, 1e-5).second;
}

AttentionShape GPTImpl::attention_shape() const {
  return {static_cast<int>(blocks->size()), n_head_, n_head_, d_model_ / n_head_};
}

std::vector<attention::Options> GPTImpl::layer_attention() const {
  std::vector<attention::Options> out;
  for (const auto& block : *blocks) out.push_back(block->as<Block>()->attn->attention.options());
  return out;
}

std::vector<attention::Pattern> GPTImpl::last_patterns() const {
  std::vector<attention::Pattern> out;
  for (const auto& block : *blocks)
    out.push_back(block->as<Block>()->attn->attention.last_pattern());
  return out;
}

void GPTImpl::set_attention_hook(std::shared_ptr<AttentionHook> hook) {
  hook_ = std::move(hook);
  for (auto& block : *blocks) block->as<Block>()->attn->hook = hook_.get();
}

}  // namespace sparseflash::model
