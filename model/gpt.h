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

namespace sparseflash::model {

using at::Tensor;

// The attention a layer uses: Experiment.attention unless a layer_attention
// entry lists the layer.
attention::Options layer_attention_options(const config::Experiment& exp, int layer);

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
  Tensor forward(const Tensor& x, at::Generator& generator);
  // With shared_qk the projection yields q and v only; k = q / |q|.
  torch::nn::Linear c_attn{nullptr}, c_proj{nullptr};
  attention::Attention attention;

 private:
  int64_t n_head_, head_dim_;
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
                                             at::Generator& generator);
  LayerNorm ln_1{nullptr}, ln_2{nullptr};
  SelfAttention attn{nullptr};
  torch::nn::Linear c_fc{nullptr}, mlp_proj{nullptr};
};
TORCH_MODULE(Block);

class GPTImpl : public torch::nn::Module {
 public:
  // vocab_size overrides model.vocab_size when the latter is 0 (from data).
  GPTImpl(const config::Experiment& exp, int64_t vocab_size);

  // idx [B, N] int64 -> logits [B, N, vocab] (float32 on CPU, autocast dtype on GPU).
  Tensor forward(const Tensor& idx);
  // idx [B, N] -> the final LayerNorm's output [B, N, d_model] (what the head
  // reads; in the autocast dtype under CUDA autocast).
  Tensor hidden(const Tensor& idx);
  // Mean cross-entropy in nats (float32), through the fused chunked head +
  // cross-entropy (model/fused.h); targets < 0 are ignored.
  Tensor loss(const Tensor& idx, const Tensor& targets);

  // Autoregressive sampling: appends max_new tokens to `prompt` ([N] int64).
  // temperature 0 is greedy; top_k 0 keeps every token.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int max_new,
                                double temperature, int top_k, at::Generator& sampler);

  int64_t vocab_size() const { return vocab_size_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_parameters() const;
  // Draws of the sparse attention (rotations, drop masks); part of checkpoints.
  at::Generator& attention_generator() { return attention_generator_; }

  torch::nn::Embedding wte{nullptr}, wpe{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  LayerNorm ln_f{nullptr};

 private:
  void init_weights(const config::Model& m);
  int64_t vocab_size_, block_size_;
  at::Generator attention_generator_;
};
TORCH_MODULE(GPT);

}  // namespace sparseflash::model
