// Pass-key retrieval (Mohtashami and Jaggi 2023; the check Position
// Interpolation and LongLoRA report): a five-digit key is hidden at some depth
// of filler text, the model is asked for it at the end, and its greedy answer
// must contain it. It tests whether a model uses its whole context window.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/causal_lm.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::model {

struct PasskeyTrial {
  int64_t context = 0;        // tokens of the prompt plus the answer's budget
  double depth = 0;           // where the key sits in the filler, 0 (start) to 1 (end)
  std::string key, answer;
  bool found = false;
  int64_t prompt_tokens = 0;
};

// The tokens around the filler: the key sentence (with a margin of 4 for
// keys that tokenize longer), the question, the BOS (if the tokenizer adds
// one) and the answer's budget (8 tokens).
int64_t passkey_overhead(const tokenizer::Tokenizer& tokenizer);

// One trial: filler[0, filler_tokens) with "The pass key is KEY. Remember it.
// KEY is the pass key." inserted at depth * filler_tokens, then "What is the
// pass key? The pass key is"; up to 8 greedy tokens must contain KEY.
PasskeyTrial passkey_trial(CausalLM& model, const tokenizer::Tokenizer& tokenizer,
                           const std::vector<int64_t>& filler, int64_t filler_tokens, double depth,
                           const std::string& key);

struct PasskeyOptions {
  std::vector<int64_t> contexts = {8192};
  int depths = 10;  // evenly spaced in [0, 1] (0.5 for one)
  int keys = 1;     // random keys per depth
  uint64_t seed = 1;
  std::function<void(const PasskeyTrial&)> progress;  // after each trial
};

struct PasskeyRow {
  int64_t context = 0;
  int found = 0, trials = 0;
};

struct PasskeyReport {
  std::vector<PasskeyRow> rows;       // one per context
  std::vector<PasskeyTrial> trials;   // every trial
};

// For each context C: filler of C - passkey_overhead() tokens (its first
// ones), the key at each depth. Errors (before any trial): no context, a
// context too short for the sentences, a context beyond the model's
// context_length(), filler shorter than the longest context needs, depths or
// keys < 1.
absl::StatusOr<PasskeyReport> passkey_retrieval(CausalLM model,
                                                const tokenizer::Tokenizer& tokenizer,
                                                const std::vector<int64_t>& filler,
                                                const PasskeyOptions& options);

}  // namespace sparseflash::model
