// GPU time per phase of a training step, for the training-step benchmark.
//
// Code marks a phase with `profile::Phase p("attention.forward");` (any
// thread, nesting allowed: phases are independent sums, not a tree). While
// timing is off, the default, a mark costs one relaxed atomic load. While on,
// it records a CUDA event pair on the current stream; collect() waits for
// them and returns the milliseconds per name since the last collect().
// Events time the stream, so a phase that waits for another stream or for
// the host includes that wait.
#pragma once

#include <map>
#include <string>

namespace sparseflash::profile {

void set_enabled(bool on);
bool enabled();

// Milliseconds per phase name over the marks since the last call; clears them.
// Synchronises with the events it reads.
std::map<std::string, double> collect();

class Phase {
 public:
  explicit Phase(const char* name);
  ~Phase();
  Phase(const Phase&) = delete;
  Phase& operator=(const Phase&) = delete;

 private:
  int slot_ = -1;
};

}  // namespace sparseflash::profile
