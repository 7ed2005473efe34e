// GPT-2 family model. Reading order: LayerNorm, SelfAttention, Block, GPT.
#include "model/gpt.h"

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

attention::Options layer_attention_options(const config::Experiment& exp, int layer) {
  for (const auto& entry : exp.layer_attention())
    for (int l : entry.layers())
      if (l == layer) return attention::Options::from_config(entry.attention());
  return attention::Options::from_config(exp.attention());
}

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
    : attention(options, layer), n_head_(m.n_head()), head_dim_(m.d_model() / m.n_head()) {
  const int64_t d = m.d_model();
  const int64_t projections = options.shared_qk ? 2 : 3;
  c_attn = register_module(
      "c_attn", torch::nn::Linear(torch::nn::LinearOptions(d, projections * d).bias(m.bias())));
  c_proj = register_module("c_proj",
                           torch::nn::Linear(torch::nn::LinearOptions(d, d).bias(m.bias())));
}

Tensor SelfAttentionImpl::forward(const Tensor& x, at::Generator& generator) {
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
  Tensor y = attention.forward(q, k, v, generator);
  return c_proj->forward(y.transpose(1, 2).reshape({B, N, d}));
}

// ---------------------------------------------------------------------------

BlockImpl::BlockImpl(const config::Model& m, attention::Options options, int layer) {
  const int64_t d = m.d_model();
  ln_1 = register_module("ln_1", LayerNorm(d, m.bias()));
  attn = register_module("attn", SelfAttention(m, options, layer));
  ln_2 = register_module("ln_2", LayerNorm(d, m.bias()));
  c_fc = register_module("c_fc",
                         torch::nn::Linear(torch::nn::LinearOptions(d, 4 * d).bias(m.bias())));
  mlp_proj = register_module(
      "mlp_proj", torch::nn::Linear(torch::nn::LinearOptions(4 * d, d).bias(m.bias())));
}

std::pair<Tensor, Tensor> BlockImpl::forward_residual(const Tensor& x, const Tensor& pending,
                                                      at::Generator& generator) {
  // Each residual add travels with the LayerNorm that reads its sum.
  auto [r, a_in] = add_layer_norm(x, pending, ln_1->weight, ln_1->bias, 1e-5);
  auto [h, m_in] = add_layer_norm(r, attn->forward(a_in, generator), ln_2->weight, ln_2->bias, 1e-5);
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
      block_size_(exp.model().block_size()) {
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

Tensor GPTImpl::hidden(const Tensor& idx) {
  TORCH_CHECK(idx.dim() == 2, "GPT: idx must be [B, N], got ", idx.sizes());
  const int64_t N = idx.size(1);
  TORCH_CHECK(N <= block_size_, "GPT: sequence length ", N, " exceeds model.block_size ",
              block_size_);
  Tensor pos = at::arange(N, idx.options().dtype(at::kLong));
  Tensor x = wte->forward(idx) + wpe->forward(pos).unsqueeze(0);
  Tensor pending;  // the last block's MLP output, added by the next LayerNorm
  for (auto& block : *blocks)
    std::tie(x, pending) = block->as<Block>()->forward_residual(x, pending, attention_generator_);
  return add_layer_norm(x, pending, ln_f->weight, ln_f->bias, 1e-5).second;
}

Tensor GPTImpl::forward(const Tensor& idx) {
  return F::linear(hidden(idx), wte->weight);  // tied output head
}

Tensor GPTImpl::loss(const Tensor& idx, const Tensor& targets) {
  // The tied head and the cross-entropy in one chunked op: the [B N, vocab]
  // logits are never held whole nor in float32 (model/fused.h).
  return linear_cross_entropy(hidden(idx), wte->weight, targets);
}

std::vector<int64_t> GPTImpl::generate(const std::vector<int64_t>& prompt, int max_new,
                                       double temperature, int top_k, at::Generator& sampler) {
  torch::NoGradGuard no_grad;
  std::vector<int64_t> ids = prompt;
  auto device = wte->weight.device();
  // todo: no KV cache yet; each new token reruns the visible window.
  for (int t = 0; t < max_new; ++t) {
    const int64_t begin = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - block_size_);
    std::vector<int64_t> window(ids.begin() + begin, ids.end());
    Tensor idx = torch::from_blob(window.data(), {1, static_cast<int64_t>(window.size())},
                                  at::kLong)
                     .to(device);
    Tensor logits = forward(idx).select(1, -1).squeeze(0).to(at::kFloat).cpu();
    int64_t next;
    if (temperature <= 0) {
      next = logits.argmax().item<int64_t>();
    } else {
      logits = logits / temperature;
      if (top_k > 0 && top_k < logits.size(0)) {
        Tensor kth = std::get<0>(logits.topk(top_k)).select(0, top_k - 1);
        logits = logits.masked_fill(logits.lt(kth), -std::numeric_limits<double>::infinity());
      }
      Tensor probs = at::softmax(logits, -1);
      next = at::multinomial(probs, 1, false, sampler).item<int64_t>();
    }
    ids.push_back(next);
  }
  return ids;
}

int64_t GPTImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

}  // namespace sparseflash::model
