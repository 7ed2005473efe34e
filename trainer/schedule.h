// Learning-rate schedule: linear warm-up from 0, then cosine decay to
// min_lr_ratio * lr at max_steps ("one cycle", as in the paper's runs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "configs/experiment.pb.h"

namespace sparseflash::trainer {

inline int64_t warmup_steps(const config::Experiment& exp) {
  if (exp.schedule().warmup_steps() > 0) return exp.schedule().warmup_steps();
  return static_cast<int64_t>(std::llround(exp.schedule().warmup_fraction() * exp.train().max_steps()));
}

// Learning rate of optimizer step `step` (0-based).
inline double learning_rate(const config::Experiment& exp, int64_t step) {
  const double peak = exp.optim().lr(), floor = peak * exp.schedule().min_lr_ratio();
  const int64_t warmup = warmup_steps(exp), total = exp.train().max_steps();
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup);
  if (total <= warmup) return peak;
  const double progress =
      std::min(1.0, static_cast<double>(step - warmup) / static_cast<double>(total - warmup));
  return floor + 0.5 * (peak - floor) * (1.0 + std::cos(M_PI * progress));
}

}  // namespace sparseflash::trainer
