// The causal language model interface: what the trainer, the optimizer,
// checkpoints, evaluation, generation and SAAP see of a model. GPT
// (model/gpt.h) and Llama (model/llama.h) implement it; model/factory.h
// builds either from a config or a pretrained file.
//
// A model maps token ids to final hidden states (optionally extending a KV
// cache), and hidden states to logits through its output matrix. The loss
// is the fused chunked head + cross-entropy (model/fused.h) on those two, so
// every model trains without float32 logits.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include "attention/attention.h"
#include "configs/experiment.pb.h"

namespace sparseflash::model {

using at::Tensor;

// Keys and values of the positions seen so far, per layer: [B, Hkv, T, D].
struct KVCache {
  std::vector<Tensor> k, v;
  int64_t length = 0;  // T: the position of the next token
};

// What one layer's attention sees in one forward call, for hooks that record
// it (SAAP calibration) or attend differently (SAAP inference).
struct AttentionCall {
  int layer = 0;
  int64_t offset = 0;      // position of the first new token (cache length before the call)
  bool with_cache = false; // the call extends a KVCache (generation); k, v include it
  Tensor q_pre, k_pre;     // [B, H, N, D], [B, Hkv, N, D]: the new tokens before positions
                           // are applied (RoPE); the same as q and k's new rows for GPT
  Tensor q;                // [B, H, N, D] as attended
  Tensor k, v;             // [B, Hkv, T, D] keys and values of every position 0 .. T-1
};

// Installed with CausalLMImpl::set_attention_hook. attend() returns the
// attention output [B, H, N, D] (q's dtype) to use in place of the layer's
// own attention, or an undefined tensor to let the layer attend as usual.
class AttentionHook {
 public:
  virtual ~AttentionHook() = default;
  virtual Tensor attend(const AttentionCall& call) = 0;
};

// One layer's attention step shared by the families: appends the new keys
// and values to cache->k/v[layer] (when cache is not null) and attends over
// every cached position, through `hook` when it answers, else `attention`.
// q [B, H, N, D] and k, v [B, Hkv, N, D] as attended (after RoPE); q_pre,
// k_pre before positions were applied. Returns [B, H, N, D].
Tensor attend_layer(attention::Attention& attention, AttentionHook* hook, int layer,
                    KVCache* cache, const Tensor& q_pre, const Tensor& k_pre, const Tensor& q,
                    Tensor k, Tensor v, at::Generator& generator);

// The attention geometry of a model (the same for every layer).
struct AttentionShape {
  int layers = 0;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
};

class CausalLMImpl : public torch::nn::Module {
 public:
  ~CausalLMImpl() override = default;

  // ids [B, N] int64 -> final hidden states [B, N, d] (the output matrix's
  // input; in the autocast dtype under CUDA autocast). Positions start at
  // cache->length (0 without a cache); the cache is extended by N.
  // N + cache->length must not exceed context_length().
  virtual Tensor hidden_states(const Tensor& ids, KVCache* cache = nullptr) = 0;
  // [vocab, d]: logits = hidden @ output_weight()^T.
  virtual const Tensor& output_weight() const = 0;

  // hidden [..., d] -> logits [..., vocab] in float32.
  Tensor logits(const Tensor& hidden);
  Tensor forward(const Tensor& ids, KVCache* cache = nullptr) {
    return logits(hidden_states(ids, cache));
  }
  // Mean cross-entropy in nats (float32 scalar) of predicting targets [B, N]
  // from ids [B, N]; targets < 0 are ignored. Chunked and fused: the
  // [B N, vocab] logits never exist whole (model/fused.h).
  Tensor loss(const Tensor& ids, const Tensor& targets);

  virtual config::Model::Arch arch() const = 0;
  virtual int64_t vocab_size() const = 0;
  // The longest sequence (cache included) the model can attend over.
  virtual int64_t context_length() const = 0;
  virtual AttentionShape attention_shape() const = 0;
  // The attention options of each layer (dense, hash, drop; attention/).
  virtual std::vector<attention::Options> layer_attention() const = 0;
  // Each layer's sparsity pattern of the last forward call (for tools).
  virtual std::vector<attention::Pattern> last_patterns() const = 0;
  // Every layer's attention goes through `hook` (null: none) until it is
  // replaced; the model keeps it alive.
  virtual void set_attention_hook(std::shared_ptr<AttentionHook> hook) = 0;
  const std::shared_ptr<AttentionHook>& attention_hook() const { return hook_; }

  int64_t num_parameters() const;
  at::Device device() const { return output_weight().device(); }
  at::ScalarType dtype() const { return output_weight().scalar_type(); }
  // Draws of the sparse attention kinds (rotations, drop masks); part of
  // training checkpoints.
  at::Generator& attention_generator() { return attention_generator_; }
  // Recompute each block in the backward pass instead of keeping its
  // activations (model/checkpointing.h); applies to training forwards
  // without a cache, with autograd on.
  void set_activation_checkpointing(bool on) { activation_checkpointing_ = on; }
  bool activation_checkpointing() const { return activation_checkpointing_; }

 protected:
  // True when this forward's blocks are to be checkpointed.
  bool checkpoint_blocks(const KVCache* cache) const;

  std::shared_ptr<AttentionHook> hook_;
  at::Generator attention_generator_;
  bool activation_checkpointing_ = false;
};

// The holder of any model (a shared pointer, as every LibTorch module
// holder): a GPT or Llama holder converts to it implicitly, sharing the module.
class CausalLM : public torch::nn::ModuleHolder<CausalLMImpl> {
 public:
  using Base = torch::nn::ModuleHolder<CausalLMImpl>;
  using Base::Base;
  using Base::get;
  CausalLM(std::nullptr_t) : Base(nullptr) {}
  CausalLM(std::shared_ptr<CausalLMImpl> module) : Base(std::move(module)) {}
  template <typename Impl, typename = std::enable_if_t<std::is_base_of_v<CausalLMImpl, Impl>>>
  CausalLM(const torch::nn::ModuleHolder<Impl>& model)
      : Base(std::shared_ptr<CausalLMImpl>(model.ptr())) {}
  template <typename Impl, typename = std::enable_if_t<std::is_base_of_v<CausalLMImpl, Impl>>>
  CausalLM(torch::nn::ModuleHolder<Impl>& model)
      : Base(std::shared_ptr<CausalLMImpl>(model.ptr())) {}
  template <typename Impl, typename = std::enable_if_t<std::is_base_of_v<CausalLMImpl, Impl>>>
  CausalLM(torch::nn::ModuleHolder<Impl>&& model)
      : Base(std::shared_ptr<CausalLMImpl>(model.ptr())) {}
};

// The same, spelled out.
template <typename Impl>
CausalLM as_causal_lm(const torch::nn::ModuleHolder<Impl>& model) {
  return CausalLM(model);
}

// The attention a layer uses: Experiment.attention unless a layer_attention
// entry lists the layer.
attention::Options layer_attention_options(const config::Experiment& exp, int layer);

// Short name of an architecture: "GPT", "LLAMA".
std::string arch_name(config::Model::Arch arch);

}  // namespace sparseflash::model
