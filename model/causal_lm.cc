#include "model/causal_lm.h"

#include <ATen/ATen.h>
#include <torch/nn/functional/linear.h>

#include "model/fused.h"

namespace sparseflash::model {

Tensor CausalLMImpl::logits(const Tensor& hidden) {
  return torch::nn::functional::linear(hidden, output_weight()).to(at::kFloat);
}

Tensor CausalLMImpl::loss(const Tensor& ids, const Tensor& targets) {
  return linear_cross_entropy(hidden_states(ids), output_weight(), targets);
}

int64_t CausalLMImpl::num_parameters() const {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

bool CausalLMImpl::checkpoint_blocks(const KVCache* cache) const {
  return activation_checkpointing_ && is_training() && !cache && at::GradMode::is_enabled();
}

Tensor attend_layer(attention::Attention& attention, AttentionHook* hook, int layer,
                    KVCache* cache, const Tensor& q_pre, const Tensor& k_pre, const Tensor& q,
                    Tensor k, Tensor v, at::Generator& generator) {
  const int64_t offset = cache ? cache->length : 0;
  if (cache) {
    Tensor& ck = cache->k[layer];
    Tensor& cv = cache->v[layer];
    if (ck.defined()) {
      k = at::cat({ck, k}, 2);
      v = at::cat({cv, v}, 2);
    }
    ck = k;
    cv = v;
  }
  // Queries sit at the last N key positions (bottom-right aligned), which
  // is what the cache needs.
  if (hook) {
    AttentionCall call;
    call.layer = layer;
    call.offset = offset;
    call.with_cache = cache != nullptr;
    call.q_pre = q_pre;
    call.k_pre = k_pre;
    call.q = q;
    call.k = k;
    call.v = v;
    Tensor y = hook->attend(call);
    if (y.defined()) {
      TORCH_CHECK(y.sizes() == q.sizes(), "the attention hook returned ", y.sizes(),
                  " for queries ", q.sizes());
      return y;
    }
  }
  return attention.forward(q, k, v, generator);
}

attention::Options layer_attention_options(const config::Experiment& exp, int layer) {
  for (const auto& entry : exp.layer_attention())
    for (int l : entry.layers())
      if (l == layer) return attention::Options::from_config(entry.attention());
  return attention::Options::from_config(exp.attention());
}

std::string arch_name(config::Model::Arch arch) { return config::Model::Arch_Name(arch); }

}  // namespace sparseflash::model
