// GPT (GPT-2 family): learned positions, pre-LayerNorm blocks, GELU MLP, tied
// input/output embeddings, optional biases, GPT-2 initialisation. Each layer's
// attention kind comes from the config (attention/ does the attending).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <ATen/core/Generator.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "attention/attention.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"
#include "model/lora.h"

namespace sparseflash::model {

using at::Tensor;

// LayerNorm with an optional bias (torch::nn::LayerNorm always has one).
class LayerNormImpl : public torch::nn::Module {
 public:
  LayerNormImpl(int64_t dim, bool bias);
  Tensor forward(const Tensor& x);
  Tensor weight, bias;
};
TORCH_MODULE(LayerNorm);

class SelfAttentionImpl : public torch::nn::Module {
 public:
  SelfAttentionImpl(const config::Model& m, attention::Options options, int layer);
  // x [B, N, d]. With a cache, x's keys and values are appended to
  // cache->k/v[layer] and attended with the earlier ones.
  Tensor forward(const Tensor& x, at::Generator& generator, KVCache* cache = nullptr);
  // With shared_qk the projection yields q and v only; k = q / |q|.
  LoraLinear c_attn{nullptr}, c_proj{nullptr};
  attention::Attention attention;
  AttentionHook* hook = nullptr;  // not owned; see GPTImpl::set_attention_hook

 private:
  int64_t n_head_, head_dim_;
  int layer_;
};
TORCH_MODULE(SelfAttention);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const config::Model& m, attention::Options options, int layer);
  Tensor forward(const Tensor& x, at::Generator& generator);
  // The block on the residual stream x + pending (pending: the previous
  // block's MLP output, or undefined), adds fused into the LayerNorms
  // (model/fused.h): returns {x + pending + attention, MLP output}.
  std::pair<Tensor, Tensor> forward_residual(const Tensor& x, const Tensor& pending,
                                             at::Generator& generator,
                                             KVCache* cache = nullptr);
  LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SelfAttention attn{nullptr};
  LoraLinear c_fc{nullptr}, mlp_proj{nullptr};
};
TORCH_MODULE(Block);

class GPTImpl : public CausalLMImpl {
 public:
  // vocab_size overrides model.vocab_size when the latter is 0 (from data).
  GPTImpl(const config::Experiment& exp, int64_t vocab_size);

  Tensor hidden_states(const Tensor& ids, KVCache* cache = nullptr) override;
  const Tensor& output_weight() const override { return wte->weight; }  // tied head
  config::Model::Arch arch() const override { return config::Model::GPT; }
  int64_t vocab_size() const override { return vocab_size_; }
  int64_t context_length() const override { return block_size_; }
  AttentionShape attention_shape() const override;
  std::vector<attention::Options> layer_attention() const override;
  std::vector<attention::Pattern> last_patterns() const override;
  void set_attention_hook(std::shared_ptr<AttentionHook> hook) override;

  // The former names, for callers that know they hold a GPT.
  Tensor hidden(const Tensor& idx) { return hidden_states(idx); }
  int64_t block_size() const { return block_size_; }

  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  LayerNorm ln_f{nullptr};

 private:
  void init_weights(const config::Model& m);
  int64_t vocab_size_, block_size_, d_model_, n_head_;
};
TORCH_MODULE(GPT);

}  // namespace sparseflash::model
