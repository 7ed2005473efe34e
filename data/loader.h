// Memory-mapped token windows for training and evaluation.
//
// A batch row is a window of N + 1 consecutive tokens from one shard: inputs
// are the first N, targets the last N. Training windows are drawn by a
// counter-based generator keyed on (seed, step, micro_step, global_row), so
// they do not depend on how the global batch is split across ranks: rank r of
// W with per-rank batch B reads global rows [r*B, (r+1)*B).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "data/prepare.h"
#include "data/shard.h"

namespace sparseflash::data {

enum class Split { kTrain, kVal };

class TokenLoader {
 public:
  // Opens every shard of `split` listed in dir/meta.json. Fails if no shard
  // holds at least seq_len + 1 tokens.
  static absl::StatusOr<TokenLoader> open(const std::string& dir, Split split, int seq_len);

  // Fills x and y (each count * seq_len int64, row-major) with training windows
  // for global rows [first_row, first_row + count).
  void sample(uint64_t seed, int64_t step, int micro_step, int64_t first_row, int count,
              int64_t* x, int64_t* y) const;

  // Evaluation windows: a fixed sequence (independent of training state);
  // row i of batch b is window b * count + i of that sequence.
  void eval_batch(int64_t batch_index, int count, int64_t* x, int64_t* y) const;

  int seq_len() const { return seq_len_; }
  uint64_t total_tokens() const;
  const Meta& meta() const { return meta_; }

 private:
  TokenLoader() = default;
  // Window start (shard, offset) for a uniform draw r in [0, total windows).
  void window(uint64_t r, int64_t* x, int64_t* y) const;
  Meta meta_;
  std::vector<Shard> shards_;
  std::vector<uint64_t> window_prefix_;  // cumulative window counts per shard
  int seq_len_ = 0;
};

}  // namespace sparseflash::data
