// Optimizer and checkpoints: AdamW (fused kernels) and the atomic, complete
// snapshot of a run (model, optimizer, data position, RNG states, config).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace sparseflash::trainer {

using at::Tensor;

// ---------------------------------------------------------------------------
// optimizers

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

// ---------------------------------------------------------------------------
// checkpoints

struct TrainState {
  int64_t step = 0;    // optimizer steps done; the data position (windows are keyed on it)
  int64_t tokens = 0;  // training tokens seen
  // Seconds spent training up to `step`, over every process of the run
  // (resumes included), without evaluation and checkpoint writes.
  double train_seconds = 0;
};

inline constexpr int64_t kCheckpointFormat = 1;

// Writes everything a resume needs to `path` atomically (checkpoint/atomic_file.h:
// a temporary beside it, fsync, rename). A failed write (full disk, file-size
// limit) leaves the previous file as it was; the error names the path.
absl::Status save_checkpoint(const std::string& path, const config::Experiment& exp,
                             const std::string& tokenizer, model::CausalLM model,
                             const Optimizer* optimizer, const TrainState& state);

struct CheckpointInfo {
  config::Experiment config;
  std::string tokenizer;
  TrainState state;
};

// Reads the config and counters only (cheap; for compatibility checks).
absl::StatusOr<CheckpointInfo> read_checkpoint_info(const std::string& path);

// Loads weights (and optimizer state and RNG states when `optimizer` is not
// null) into an already-built model. Errors name the file and the entry.
absl::Status load_checkpoint(const std::string& path, model::CausalLM model,
                             Optimizer* optimizer);

// "runs/x" -> "runs/x/ckpt.pt"; a file path is returned as is.
std::string checkpoint_path(const std::string& file_or_dir);

}  // namespace sparseflash::trainer
