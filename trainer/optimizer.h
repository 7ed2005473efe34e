// The optimizer interface of the training loop and checkpoints, and AdamW
// (PyTorch's fused multi-tensor kernels).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace sparseflash::trainer {

using at::Tensor;

// What the loop and checkpoints need of an optimizer. Checkpoints hold the
// whole state under optim/<parameter name>/{exp_avg,exp_avg_sq,step}, however
// it is kept in memory (see ShardedAdamW in trainer/distributed.cc).
class Optimizer {
 public:
  virtual ~Optimizer() = default;
  virtual void step(double lr) = 0;
  virtual void zero_grad() = 0;
  // A collective for sharded optimizers: every rank calls it before rank 0
  // saves, so that save() can write the whole state. No-op otherwise.
  virtual void gather_state() {}
  virtual void save(torch::serialize::OutputArchive& archive) const = 0;
  // Errors name the missing or mis-shaped state entry.
  virtual absl::Status load(torch::serialize::InputArchive& archive) = 0;
};

// Reads `key` into `into` (same shape). Errors name the entry.
absl::Status read_into(torch::serialize::InputArchive& archive, const std::string& key,
                       Tensor& into);

// AdamW with decoupled weight decay on matrices and embeddings (dim >= 2) and
// none on biases and LayerNorm gains, stepped by PyTorch's fused multi-tensor
// kernel (CPU and CUDA).
class AdamW : public Optimizer {
 public:
  AdamW(const model::CausalLM model, const config::Optimizer& options);
  void step(double lr) override;
  void zero_grad() override;
  void save(torch::serialize::OutputArchive& archive) const override;
  absl::Status load(torch::serialize::InputArchive& archive) override;

 private:
  struct Group {
    double weight_decay = 0;
    std::vector<std::string> names;
    std::vector<Tensor> params, exp_avg, exp_avg_sq, steps;
  };
  config::Optimizer options_;
  Group decay_, no_decay_;
};

}  // namespace sparseflash::trainer
