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

attention::Options layer_attention_options(const config::Experiment& exp, int layer) {
  for (const auto& entry : exp.layer_attention())
    for (int l : entry.layers())
      if (l == layer) return attention::Options::from_config(entry.attention());
  return attention::Options::from_config(exp.attention());
}

std::string arch_name(config::Model::Arch arch) { return config::Model::Arch_Name(arch); }

}  // namespace sparseflash::model
