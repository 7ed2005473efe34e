// Perplexity of any causal LM (model/causal_lm.h) over a token sequence with
// a sliding window: the measurement behind `sparseflash eval --model` and
// SAAP's dense-vs-sparse comparison.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "model/causal_lm.h"

namespace sparseflash::model {

struct PerplexityResult {
  int64_t tokens = 0;    // tokens scored (all but the first of the text)
  int64_t windows = 0;
  double nll_sum = 0;    // nats
  double seconds = 0;    // forward passes only
  double mean_nll() const { return tokens ? nll_sum / tokens : 0; }
  double perplexity() const;
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
};

// Sliding-window perplexity (transformers' recipe): window w covers ids
// [w * stride, w * stride + context) and scores only the tokens no earlier
// window scored, each predicted from up to `context` - 1 tokens before it.
// Every token but the first is scored exactly once. 1 <= stride <= context.
// progress (optional) runs after each window with the totals so far.
PerplexityResult sliding_window_nll(CausalLM model, const std::vector<int64_t>& ids,
                                    int64_t context, int64_t stride,
                                    const std::function<void(const PerplexityResult&)>& progress =
                                        nullptr);

// The windows sliding_window_nll runs over `tokens` tokens.
int64_t window_count(int64_t tokens, int64_t context, int64_t stride);

struct PerplexityOptions {
  int64_t context = 2048;  // tokens per window (>= 2)
  int64_t stride = 0;      // window step in [1, context]; 0 = context / 2
  // After each window: the totals so far and the number of windows in all.
  std::function<void(const PerplexityResult&, int64_t windows)> progress;
};

struct PerplexityReport {
  PerplexityResult result;
  int64_t context = 0, stride = 0;  // as used (stride resolved)
};

// Checks the options (context >= 2, stride in [1, context]) and returns the
// stride they resolve to; errors name the flag-style option (--context, --stride).
absl::StatusOr<int64_t> resolve_stride(const PerplexityOptions& options);

// sliding_window_nll with checked options: at least 2 tokens, a bad context
// or stride are errors (naming the token count or the value).
absl::StatusOr<PerplexityReport> evaluate_perplexity(CausalLM model,
                                                     const std::vector<int64_t>& ids,
                                                     const PerplexityOptions& options);

}  // namespace sparseflash::model
