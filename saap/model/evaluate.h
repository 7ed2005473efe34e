// Measuring a SAAP index on a loaded model (`sparseflash saap eval`): routing
// recall and keys visited against the baselines (saap/model/calibrate.h), sliding-
// window perplexity dense vs SAAP at each l, key budget and mass threshold,
// and a pass-key retrieval check. Also the pieces `eval`/`generate --attention
// saap` use: option parsing and opening an index as an attention hook.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/causal_lm.h"
#include "saap/model/calibrate.h"
#include "saap/index.h"
#include "saap/model/inference.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::saap {

// "output" or "attention"; "classifier", "symmetric", "all" or "oracle".
// Errors name the flags (--budget-objective, --saap-routing).
absl::StatusOr<BudgetObjective> parse_budget_objective(const std::string& text);
absl::StatusOr<Routing> parse_routing(const std::string& text);

// The index at `path` (refused when fitted on another model than
// model_identity) as an attention hook with `options`, checked: key budget and
// mass threshold in [0, 1], per-head budgets only with a key budget, top-l
// within the index's partitions. Errors name the option as a flag.
absl::StatusOr<std::shared_ptr<SaapAttentionHook>> open_saap_hook(
    const std::string& path, const std::string& model_identity,
    const SaapInferenceOptions& options, at::Device device);

// "saap (ROUTING, top-l L of C partitions, window W, sinks S)", or with the
// key budget (and its per-head split) in place of top-l.
std::string describe(const SaapAttentionHook& hook);

// `saap fit --recency-bands auto`: 32, 96, 224, 480, ... tokens beyond the
// local window (each band twice the previous one) while a window of `context`
// tokens can measure the oldest band.
std::vector<int64_t> auto_recency_edges(int64_t context, int64_t local_window, int64_t sink_tokens);

// ---------------------------------------------------------------------------
// saap eval

struct SaapEvalOptions {
  int64_t context = 2048, stride = 1024;  // perplexity windows (stride in [1, context])
  int64_t max_windows = 0;                // routing: windows of context tokens (0 = all)
  int64_t queries_per_window = 1024;
  std::vector<int64_t> top_l = {16};
  std::vector<double> key_budgets, mass_thresholds;
  bool per_head_budgets = false;          // perplexity (and needle) with per-head budgets too
  std::vector<BudgetObjective> objectives = {BudgetObjective::kOutputError};
  bool perplexity = true;
  int64_t perplexity_tokens = 65536;      // 0 = all
  bool needle = true;                     // needs the tokenizer
  std::vector<double> needle_depths = {0.1, 0.3, 0.5, 0.7, 0.9};
  int64_t needle_trials = 3;
  uint64_t seed = 1;
};

struct PerplexityRow {
  std::string routing;  // "dense", "saap", "symmetric", "saap@0.05", "oracle-ph-out@0.1", ...
  int64_t l = 0;        // top-l, 0 when not selected by l
  int64_t tokens = 0;
  double perplexity = 0, mean_nll = 0, seconds = 0;
  bool sparse = false;  // a SAAP hook ran: the fields below are set
  double keys_visited = 0, routed_keys_visited = 0;
  std::vector<double> head_budgets;  // per-head budget rows only
};

struct NeedleTrial {
  double depth = 0;
  std::string key, answer;
  bool found = false;
};

struct NeedleRow {
  std::string routing;
  int64_t l = 0;
  int found = 0, trials = 0;
  std::vector<NeedleTrial> details;
};

struct SaapEvalReport {
  RoutingEvalReport routing;
  std::vector<PerplexityRow> perplexity;
  std::vector<NeedleRow> needle;
};

// `ids` are the evaluation tokens (BOS first for text; the needle's filler is
// the rest). `rope_index` (may be null) adds the RoPE'd k-means baseline. The
// model must have no attention hook; it has none again on return. Errors
// (checked before the long runs): top-l beyond the index's partitions,
// per-head budgets without curves in the index, too little filler text.
absl::StatusOr<SaapEvalReport> evaluate_saap(model::CausalLM model,
                                             const tokenizer::Tokenizer* tokenizer,
                                             const SaapIndex& index, const SaapIndex* rope_index,
                                             const std::vector<int64_t>& ids,
                                             const SaapEvalOptions& options, const Log& log);

}  // namespace sparseflash::saap
