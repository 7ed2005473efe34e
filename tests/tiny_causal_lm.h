// The least CausalLM that trainer::save_checkpoint can write: two tiny
// parameters and an attention generator; it never runs. For tests and the
// checkpoint fuzzer's seed tool (fuzz/make_checkpoint_seeds.cc).
#pragma once

#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include "model/causal_lm.h"

namespace sparseflash::test_util {

class TinyCausalLM final : public model::CausalLMImpl {
 public:
  TinyCausalLM() {
    attention_generator_ = at::make_generator<at::CPUGeneratorImpl>(7);
    weight_ = register_parameter("wte", at::randn({4, 3}));
    register_parameter("norm", at::ones({3}));
  }
  model::Tensor hidden_states(const model::Tensor&, model::KVCache*) override { return {}; }
  const model::Tensor& output_weight() const override { return weight_; }
  config::Model::Arch arch() const override { return config::Model::GPT; }
  int64_t vocab_size() const override { return 4; }
  int64_t context_length() const override { return 8; }
  model::AttentionShape attention_shape() const override { return {1, 1, 1, 3}; }
  std::vector<attention::Options> layer_attention() const override { return {}; }
  std::vector<attention::Pattern> last_patterns() const override { return {}; }
  void set_attention_hook(std::shared_ptr<model::AttentionHook> hook) override {
    hook_ = std::move(hook);
  }

 private:
  model::Tensor weight_;
};

inline model::CausalLM tiny_causal_lm() {
  return model::CausalLM(std::shared_ptr<model::CausalLMImpl>(std::make_shared<TinyCausalLM>()));
}

}  // namespace sparseflash::test_util
