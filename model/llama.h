// Llama family decoder (Llama 2/3, SmolLM, TinyLlama...): RMSNorm, rotary
// positions (HF rotate-half layout; linear, dynamic NTK, YaRN and llama3
// frequency scaling),
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
#include <utility>
#include <vector>

#include <ATen/core/Generator.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "attention/attention.h"
#include "checkpoint/llama.h"
#include "model/causal_lm.h"
#include "model/lora.h"
#include "model/perplexity.h"  // sliding_window_nll, formerly declared here

namespace sparseflash::model {

using at::Tensor;

// Inverse frequencies of the rotary embedding ([head_dim / 2] float32), with
// the checkpoint's rope_scaling applied ("", "linear", "dynamic", "yarn",
// "llama3"), computed as transformers computes them so positions match bit
// for bit in float32. positions: how many positions the call covers (the
// last position + 1); only "dynamic" depends on it, and only beyond
// rope_scaling.original_max_position_embeddings.
Tensor rope_inverse_frequencies(const checkpoint::LlamaConfig& config, int64_t positions = 0);

// What cos and sin are multiplied by: yarn's attention factor, else 1.
double rope_attention_factor(const checkpoint::RopeScaling& scaling);

// Rows of an interleaved-RoPE projection ([heads * head_dim, in], pairs
// (2i, 2i+1) rotate together) reordered to rotate-half (i, i + head_dim/2).
Tensor interleaved_to_rotate_half(const Tensor& weight, int64_t heads);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps);
  // Normalises in float32 and returns weight * the normalised x in x's dtype,
  // as transformers does (model::add_rms_norm; under CUDA autocast, in the
  // autocast dtype).
  Tensor forward(const Tensor& x);
  double eps() const { return eps_; }
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
  LoraLinear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
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
  // The layer with its residual adds deferred: takes the residual stream as
  // x + pending (pending undefined: x alone) and returns {h, m} whose sum is
  // the layer's output, so that the add of m runs inside the next RMSNorm
  // (model::add_rms_norm). forward(x) = h + m of forward_residual(x, {}).
  std::pair<Tensor, Tensor> forward_residual(const Tensor& x, const Tensor& pending,
                                             const Tensor& cos, const Tensor& sin,
                                             KVCache* cache, at::Generator& generator);
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LoraLinear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
  // As LlamaAttention::fuse_projections, for [gate; up].
  void fuse_projections();

 private:
  Tensor gate_up_weight_;
};
TORCH_MODULE(LlamaLayer);

class LlamaImpl : public CausalLMImpl {
 public:
  // layer_attention: one entry per layer, or one for all layers.
  LlamaImpl(const checkpoint::LlamaConfig& config,
            const std::vector<attention::Options>& layer_attention);

  // ids [B, N] int64 -> final-normed hidden states [B, N, d] in the weights'
  // dtype (the autocast dtype under CUDA autocast). Positions start at
  // cache->length (0 without a cache). Outside training, ids are checked
  // against the vocabulary.
  Tensor hidden_states(const Tensor& ids, KVCache* cache = nullptr) override;
  // [vocab, d]: lm_head, or embed_tokens when tied.
  const Tensor& output_weight() const override {
    return config_.tie_word_embeddings ? embed_tokens : lm_head;
  }
  config::Model::Arch arch() const override { return config::Model::LLAMA; }
  int64_t vocab_size() const override { return config_.vocab_size; }
  int64_t context_length() const override { return config_.max_position_embeddings; }
  AttentionShape attention_shape() const override;
  std::vector<attention::Options> layer_attention() const override;
  std::vector<attention::Pattern> last_patterns() const override;
  void set_attention_hook(std::shared_ptr<AttentionHook> hook) override;

  const checkpoint::LlamaConfig& config() const { return config_; }
  // GGUF's rope_freqs.weight (llama.cpp's form of llama3 scaling): inverse
  // frequencies become the unscaled ones divided by these [head_dim / 2] factors.
  void set_rope_frequency_factors(const std::vector<float>& factors);
  const std::vector<float>& rope_frequency_factors() const { return rope_freq_factors_; }
  // Fuses each layer's q/k/v and gate/up weights (see LlamaAttention); call
  // after the last to(): moving the module afterwards unfuses nothing but
  // copies the views apart, and inference then falls back to the modules.
  void fuse_projections();

  Tensor embed_tokens;  // [vocab, d]
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  Tensor lm_head;       // [vocab, d]; undefined when tied (embed_tokens is the head)

 private:
  checkpoint::LlamaConfig config_;
  Tensor inv_freq_;  // float32 on the model's device
  double attention_factor_ = 1.0;  // cos and sin scale (yarn)
  std::vector<float> rope_freq_factors_;
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

// Fills every weight of an already-built model (float32 on the CPU) from
// `checkpoint`, whose tensor shapes must match the model's config (the
// context length and RoPE scaling may differ). Throws as load_llama does.
void copy_llama_weights(const checkpoint::LlamaCheckpoint& checkpoint, LlamaImpl& model);

// Writes `model` as an HF Llama directory, which transformers' LlamaForCausalLM
// and our loaders read: dir/config.json (with rope_scaling) and
// dir/model.safetensors in HF names, rotate-half Q/K, weights cast to dtype
// (float32, bfloat16 or float16); both files atomic (checkpoint::write_native_llama).
// A model with GGUF rope frequency factors and no rope_scaling type has no HF
// equivalent: InvalidArgument. The directory is created when missing.
absl::Status write_hf_llama(LlamaImpl& model, const std::string& dir, at::ScalarType dtype);

// Writes `model` as a GGUF file that llama.cpp runs (checkpoint::write_gguf_llama:
// llama.cpp's names and Q/K row order, options.type for the matrices). The
// weights are read as float32 on the CPU: a float32 CPU model is written
// without a copy of itself. llama3 RoPE scaling goes into rope_freqs.weight as
// unscaled / scaled frequencies of this model (the model's own GGUF factors
// when it has them; options.rope_freq_factors is set here). Returns the
// writer's notes; the error names the path.
absl::StatusOr<std::vector<std::string>> write_gguf_llama(LlamaImpl& model, const std::string& path,
                                                          checkpoint::GgufLlamaOptions options);

}  // namespace sparseflash::model
