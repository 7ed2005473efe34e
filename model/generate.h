// Sampling from any causal LM (model/causal_lm.h) with a KV cache: the one
// sampler behind `generate`, the end-of-training sample and SAAP's checks.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "model/causal_lm.h"

namespace sparseflash::model {

struct SamplingOptions {
  double temperature = 0;  // 0 = greedy (argmax); top_k and top_p then do not matter
  int64_t top_k = 0;       // sample among the k most likely tokens; 0 = all
  double top_p = 1;        // nucleus: among the smallest set with mass >= top_p
  uint64_t seed = 1;       // of the sampler's own generator (the run's are not touched)
  int64_t eos_id = -1;     // stop after emitting this id (-1: never)
};

enum class StopReason {
  kMaxTokens,      // max_new tokens were generated
  kEndOfSequence,  // eos_id was generated (it is the last id returned)
  kContext,        // prompt + generated tokens fill the model's context length (no
                   // sliding window: the model cannot see past it)
  kCaller,         // on_token returned false
};
// "max_tokens", "end_of_sequence", "context_full", "stopped".
const char* stop_reason_name(StopReason reason);

struct Generation {
  std::vector<int64_t> ids;  // the new ids only
  StopReason stop = StopReason::kMaxTokens;
};

// Continues `prompt` (non-empty, shorter than model->context_length()) with
// up to max_new tokens, one forward per token over the KV cache. Stops early
// after eos_id, when the context is full (the model cannot see further; no
// sliding window), or when on_token (optional; sees each new id) returns
// false. Runs without gradients and in eval mode, restoring the mode after.
// Throws c10::Error on a bad prompt or bad options, naming the value.
Generation generate(CausalLM model, const std::vector<int64_t>& prompt, int64_t max_new,
                    const SamplingOptions& sampling,
                    const std::function<bool(int64_t)>& on_token = nullptr);

}  // namespace sparseflash::model
