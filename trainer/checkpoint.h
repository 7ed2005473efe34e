// Training checkpoints: the atomic, complete snapshot of a run (model,
// optimizer state, data position, RNG states, config). The optimizers are in
// trainer/optimizer.h.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"
#include "trainer/optimizer.h"

namespace sparseflash::trainer {

struct TrainState {
  int64_t step = 0;    // optimizer steps done; the data position (windows are keyed on it)
  int64_t tokens = 0;  // training tokens seen
  // Seconds spent training up to `step`, over every process of the run
  // (resumes included), without evaluation and checkpoint writes.
  double train_seconds = 0;
};

inline constexpr int64_t kCheckpointFormat = 1;

// Writes everything a resume needs to `path` atomically (io/atomic_file.h:
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
