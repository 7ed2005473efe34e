// LoRA (Hu et al. 2021): low-rank adapters on a model's projections, the
// base weights frozen. A projection y = x W^T becomes
//   y = x W^T + (alpha / rank) (x A^T) B^T,   A [rank, in], B [out, rank],
// with A drawn as PEFT does (Kaiming-uniform, bound 1 / sqrt(in)) and B zero,
// so a new adapter changes nothing until it trains. LongLoRA found that plain
// LoRA fails at context extension unless the embeddings and the norms train
// too (model.lora.train_embeddings, train_norms).
//
// Adapters are parameters named <projection>.lora_a and .lora_b, so training
// checkpoints hold them; exports and inference fold them into the weights
// (merge_lora), and a run started from a LoRA run (model.init_from) starts
// from its merged weights.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include "configs/experiment.pb.h"

namespace sparseflash::model {

using at::Tensor;

// A bias-optional Linear that may carry an adapter. The model's projections
// are these; without an adapter it is torch::nn::Linear exactly.
class LoraLinearImpl : public torch::nn::LinearImpl {
 public:
  using torch::nn::LinearImpl::LinearImpl;
  Tensor forward(const Tensor& x);
  // Registers lora_a (drawn from `generator`) and lora_b (zeros) on this
  // module's device and dtype; throws if it has one already or rank < 1.
  void add_adapter(int64_t rank, double alpha, at::Generator& generator);
  bool has_adapter() const { return lora_a_.defined(); }
  double scale() const { return scale_; }
  // W + scale B A (the weight alone without an adapter), without autograd.
  Tensor merged_weight() const;
  // Folds the adapter into the weight and removes lora_a / lora_b.
  void merge();

 private:
  Tensor lora_a_, lora_b_;
  double scale_ = 0;
};
TORCH_MODULE(LoraLinear);

struct LoraOptions {
  int64_t rank = 0;   // 0: no adapters
  double alpha = 16;
  // Projection names (the last part of a parameter's module path, e.g.
  // q_proj, c_fc); empty: every projection of the model.
  std::vector<std::string> targets;
  bool train_embeddings = false;
  bool train_norms = false;
  static LoraOptions from_config(const config::Model::Lora& c);
};

// The projection names of a family: Llama q_proj k_proj v_proj o_proj
// gate_proj up_proj down_proj; GPT c_attn c_proj c_fc mlp_proj.
std::vector<std::string> lora_target_names(config::Model::Arch arch);

// Adds adapters to the targeted projections of `model` and freezes every
// parameter but them (and the embeddings / norms when asked). Adapters are
// drawn from a generator seeded with `seed`. Throws std::invalid_argument on
// a target the model lacks or a rank < 1.
void add_lora(torch::nn::Module& model, config::Model::Arch arch, const LoraOptions& options,
              uint64_t seed);

// Folds every adapter of `model` into its weight and removes it. Returns the
// number of projections merged.
int merge_lora(torch::nn::Module& model);

}  // namespace sparseflash::model
