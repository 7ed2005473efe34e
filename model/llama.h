// Llama family decoder (Llama 2/3, SmolLM, TinyLlama...): RMSNorm, rotary
// positions (HF rotate-half layout; linear and llama3 frequency scaling),
// grouped-query attention through the attention interface (so any attention
// kind of attention/ can run, and later be fine-tuned), SwiGLU MLP, tied or
// untied output head, and a KV cache for generation.
//
// Weights come from a checkpoint::LlamaCheckpoint (HF safetensors, GGUF,
// llama2.c or our native format); what differs between those formats is
// settled by the reader, except the Q/K row order of interleaved-RoPE sources,
// which load_llama permutes here.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "attention/attention.h"
#include "checkpoint/llama.h"

namespace sparseflash::model {

using at::Tensor;

// Inverse frequencies of the rotary embedding ([head_dim / 2] float32), with
// the checkpoint's rope_scaling applied ("", "linear", "llama3"), computed as
// transformers computes them so positions match bit for bit in float32.
Tensor rope_inverse_frequencies(const checkpoint::LlamaConfig& config);

// Rows of an interleaved-RoPE projection ([heads * head_dim, in], pairs
// (2i, 2i+1) rotate together) reordered to rotate-half (i, i + head_dim/2).
Tensor interleaved_to_rotate_half(const Tensor& weight, int64_t heads);

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
  Tensor q_pre, k_pre;     // [B, H, N, D], [B, Hkv, N, D]: the new tokens before RoPE
  Tensor q;                // [B, H, N, D] RoPE'd
  Tensor k, v;             // [B, Hkv, T, D] RoPE'd keys and values of every position 0 .. T-1
};

// Installed with LlamaImpl::set_attention_hook. attend() returns the
// attention output [B, H, N, D] (q's dtype) to use in place of the layer's
// own attention, or an undefined tensor to let the layer attend as usual.
class AttentionHook {
 public:
  virtual ~AttentionHook() = default;
  virtual Tensor attend(const AttentionCall& call) = 0;
};

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  // Normalises in float32 and returns x's dtype, as transformers does.
  Tensor forward(const Tensor& x);
  Tensor weight;

 private:
  double eps_;
};
TORCH_MODULE(RMSNorm);

class LlamaAttentionImpl : public torch::nn::Module {
 public:
  LlamaAttentionImpl(const checkpoint::LlamaConfig& c, attention::Options options, int layer);
  // x [B, N, d]; cos, sin [N, head_dim] for the positions of x. With a cache,
  // x's keys and values are appended to cache->k/v[layer] and attended with
  // the earlier ones.
  Tensor forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache,
                 at::Generator& generator);
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  attention::Attention attention;
  AttentionHook* hook = nullptr;  // not owned; see LlamaImpl::set_attention_hook
  // One [q; k; v] matrix whose rows the three weights become views of: one GEMM
  // instead of three in inference (autograd off); training uses the modules.
  void fuse_projections();

 private:
  Tensor qkv_weight_;
  int64_t heads_, kv_heads_, head_dim_;
  int layer_;
};
TORCH_MODULE(LlamaAttention);

class LlamaLayerImpl : public torch::nn::Module {
 public:
  LlamaLayerImpl(const checkpoint::LlamaConfig& c, attention::Options options, int layer);
  Tensor forward(const Tensor& x, const Tensor& cos, const Tensor& sin, KVCache* cache,
                 at::Generator& generator);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  // As LlamaAttention::fuse_projections, for [gate; up].
  void fuse_projections();

 private:
  Tensor gate_up_weight_;
};
TORCH_MODULE(LlamaLayer);

struct SamplingOptions {
  double temperature = 0;  // 0 = greedy (argmax)
  double top_p = 1;        // nucleus: sample among the smallest set with mass >= top_p
  uint64_t seed = 1;
  int64_t eos_id = -1;     // stop after emitting this id (-1: never)
};

class LlamaImpl : public torch::nn::Module {
 public:
  // layer_attention: one entry per layer, or one for all layers.
  LlamaImpl(const checkpoint::LlamaConfig& config,
            const std::vector<attention::Options>& layer_attention);

  // ids [B, N] int64 -> final-normed hidden states [B, N, d] in the weights'
  // dtype. Positions start at cache->length (0 without a cache).
  Tensor hidden_states(const Tensor& ids, KVCache* cache = nullptr);
  // hidden [..., d] -> logits [..., vocab] in float32 (the head runs in the
  // weights' dtype, as transformers does).
  Tensor logits(const Tensor& hidden);
  Tensor forward(const Tensor& ids, KVCache* cache = nullptr) {
    return logits(hidden_states(ids, cache));
  }

  // Continues `prompt` with up to max_new tokens using the KV cache; stops
  // after eos_id. on_token (optional) sees each new id and may return false
  // to stop. Returns the new ids only.
  std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int64_t max_new,
                                const SamplingOptions& sampling,
                                const std::function<bool(int64_t)>& on_token = nullptr);

  const checkpoint::LlamaConfig& config() const { return config_; }
  int64_t num_parameters() const;
  at::Device device() const { return embed_tokens.device(); }
  at::ScalarType dtype() const { return embed_tokens.scalar_type(); }
  // Draws of the sparse attention kinds (rotations, drop masks).
  at::Generator& attention_generator() { return attention_generator_; }
  // GGUF's rope_freqs.weight (llama.cpp's form of llama3 scaling): inverse
  // frequencies become the unscaled ones divided by these [head_dim / 2] factors.
  void set_rope_frequency_factors(const std::vector<float>& factors);
  // Every layer's attention goes through `hook` (null: none) until it is
  // replaced; the model keeps it alive.
  void set_attention_hook(std::shared_ptr<AttentionHook> hook);
  const std::shared_ptr<AttentionHook>& attention_hook() const { return hook_; }
  // Fuses each layer's q/k/v and gate/up weights (see LlamaAttention); call
  // after the last to(): moving the module afterwards unfuses nothing but
  // copies the views apart, and inference then falls back to the modules.
  void fuse_projections();

  Tensor embed_tokens;  // [vocab, d]
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  Tensor lm_head;       // [vocab, d]; the same tensor as embed_tokens when tied

 private:
  checkpoint::LlamaConfig config_;
  Tensor inv_freq_;  // float32 on the model's device
  at::Generator attention_generator_;
  std::shared_ptr<AttentionHook> hook_;
};
TORCH_MODULE(Llama);

struct LlamaLoadOptions {
  std::vector<attention::Options> attention = {attention::Options{}};  // per layer, or one
  at::ScalarType dtype = at::kFloat;  // kFloat or kBFloat16 (kHalf also works)
  at::Device device = at::kCPU;
  uint64_t attention_seed = 1234;
};

// Builds the model of `checkpoint` and fills every weight (dequantised
// through checkpoint::to_float32, Q/K rows permuted when qk_interleaved).
// Throws std::runtime_error naming the checkpoint and the tensor when one is
// missing, has the wrong shape, or is left over (an architecture feature this
// model lacks, such as attention biases).
Llama load_llama(const checkpoint::LlamaCheckpoint& checkpoint, const LlamaLoadOptions& options);

// ---------------------------------------------------------------------------
// perplexity

struct PerplexityResult {
  int64_t tokens = 0;    // tokens scored (all but the first of the text)
  int64_t windows = 0;
  double nll_sum = 0;    // nats
  double seconds = 0;    // forward passes only
  double mean_nll() const { return tokens ? nll_sum / tokens : 0; }
  double perplexity() const;
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
};

// Sliding-window perplexity (transformers' recipe): window w covers ids
// [w * stride, w * stride + context) and scores only the tokens no earlier
// window scored, each predicted from up to `context` - 1 tokens before it.
// Every token but the first is scored exactly once. 1 <= stride <= context.
// progress (optional) runs after each window with the totals so far.
PerplexityResult sliding_window_nll(Llama& model, const std::vector<int64_t>& ids,
                                    int64_t context, int64_t stride,
                                    const std::function<void(const PerplexityResult&)>& progress =
                                        nullptr);

}  // namespace sparseflash::model
