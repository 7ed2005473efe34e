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
#include "model/gpt.h"

namespace torch::serialize {
class InputArchive;
class OutputArchive;
}  // namespace torch::serialize

namespace sparseflash::trainer {

using at::Tensor;

// ---------------------------------------------------------------------------
// AdamW

// AdamW with decoupled weight decay on matrices and embeddings (dim >= 2) and
// none on biases and LayerNorm gains, stepped by PyTorch's fused multi-tensor
// kernel (CPU and CUDA).
class AdamW {
 public:
  AdamW(const model::GPT& model, const config::Optimizer& options);
  void step(double lr);
  void zero_grad();
  void save(torch::serialize::OutputArchive& archive) const;
  // Errors name the missing or mis-shaped state entry.
  absl::Status load(torch::serialize::InputArchive& archive);

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
};

inline constexpr int64_t kCheckpointFormat = 1;

// Writes everything a resume needs to `path` atomically (path.tmp + rename).
// Errors name the path.
absl::Status save_checkpoint(const std::string& path, const config::Experiment& exp,
                             const std::string& tokenizer, model::GPT& model,
                             const AdamW* optimizer, const TrainState& state);

struct CheckpointInfo {
  config::Experiment config;
  std::string tokenizer;
  TrainState state;
};

// Reads the config and counters only (cheap; for compatibility checks).
absl::StatusOr<CheckpointInfo> read_checkpoint_info(const std::string& path);

// Loads weights (and optimizer state and RNG states when `optimizer` is not
// null) into an already-built model. Errors name the file and the entry.
absl::Status load_checkpoint(const std::string& path, model::GPT& model, AdamW* optimizer);

// "runs/x" -> "runs/x/ckpt.pt"; a file path is returned as is.
std::string checkpoint_path(const std::string& file_or_dir);

}  // namespace sparseflash::trainer
