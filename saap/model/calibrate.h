// SAAP on a loaded Llama: fitting an index from calibration text, and
// measuring how well an index (and the baselines) route queries on held-out
// text.
//
// Both run the model over windows of `context` tokens with an attention hook
// (model::AttentionHook) that sees, per layer, the queries and keys before
// and after RoPE. Fitting makes two passes over the calibration windows:
//   1. keys: every layer's keys (pre-RoPE for SAAP) are sampled, then one
//      batched k-means over all layers' KV heads at once gives C centroids
//      per KV head;
//   2. targets: each key goes to its nearest centroid, and for sampled
//      queries the exact attention (RoPE, causal) is summed per partition
//      over the routed keys (outside the local window and the sinks); the
//      un-rotated queries and these masses train one classifier per query
//      head (all layers' heads at once).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "model/causal_lm.h"
#include "saap/budgets.h"
#include "saap/classifier.h"
#include "saap/index.h"

namespace sparseflash::saap {

using Log = std::function<void(const std::string&)>;

// Consecutive, non-overlapping windows of `context` tokens (the tail shorter
// than a window is dropped, unless the text has no full window: then the
// whole text is the one window). max_windows > 0 keeps the first ones.
std::vector<std::vector<int64_t>> token_windows(const std::vector<int64_t>& ids, int64_t context,
                                                int64_t max_windows);

struct FitOptions {
  int64_t context = 8192;     // tokens per calibration window
  int64_t max_windows = 0;    // 0: every window of the text
  int64_t partitions = 256;   // C, per KV head
  int64_t hidden = 256;       // classifier hidden width
  int64_t local_window = 64;  // always-attended recent keys (targets exclude them)
  int64_t sink_tokens = 4;    // always-attended first keys
  int64_t kmeans_keys = 65536;       // keys per KV head given to k-means, sampled over windows
  int64_t kmeans_iterations = 25;
  int64_t kmeans_init = 1;           // independent k-means runs, best inertia kept
  int64_t queries_per_window = 1024; // sampled query positions per window (all heads)
  // false: the RoPE'd-keys baseline: keys clustered after RoPE and the
  // classifier fed RoPE'd queries (header pre_rope_keys = false).
  bool pre_rope_keys = true;
  // Train the classifiers with log(routable keys per partition) added to
  // their logits (header count_prior; see train_classifier).
  bool count_prior = true;
  // Recency bands of the count prior (saap/targets.h; needs count_prior):
  // empty for the plain count prior. The band weights are the attention per
  // key of each band, measured per query head in the keys pass over
  // queries_per_window sampled queries per window.
  std::vector<int64_t> recency_edges;
  // Fractions of routable keys at which each query head's lost routed
  // attention is measured on the held-out queries (saap/budgets.h; stored in
  // the index for per-head budgets). Empty: no curves.
  std::vector<double> budget_grid = default_budget_grid();
  // The output-error curves (budget.output_error) come from a last pass over
  // this many calibration windows (the first ones) with this many fresh
  // query positions each, through the trained classifiers.
  int64_t budget_windows = 4;
  int64_t budget_queries_per_window = 256;
  ClassifierTrainOptions train;
  uint64_t seed = 1234;
  std::string calibration_data;  // provenance, stored in the header
};

struct FitReport {
  int64_t windows = 0;
  int64_t tokens = 0;
  int64_t keys_per_head = 0;     // given to k-means
  int64_t queries_per_head = 0;  // classifier examples (train + held out)
  int64_t kmeans_iterations = 0;
  bool kmeans_converged = false;
  double kmeans_inertia_per_key = 0;  // mean over heads of inertia / keys
  // Smallest and largest partition (keys of the k-means sample), over heads.
  int64_t smallest_partition = 0, largest_partition = 0;
  // Recency bands: the log weights of every query head, layer-major
  // [layers * Hq, B + 1] (CPU; undefined without bands).
  Tensor recency_log_weights;
  ClassifierReport classifier;   // held-out recall over all heads of all layers
  std::vector<double> layer_recall;  // per layer, held-out recall@recall_at[0] (index 0)
  // Measuring the budget curves: the held-out part (inside train_seconds)
  // and the output-error pass (not part of any other phase).
  double budget_seconds = 0;
  double capture_seconds = 0, kmeans_seconds = 0, targets_seconds = 0, train_seconds = 0,
         total_seconds = 0;
};

// Fits a SAAP index for `model` (identity stored in the header) on `ids`.
// Runs on the model's device; `log` (optional) receives progress lines.
// The error (InvalidArgument) names the option at fault.
absl::StatusOr<SaapIndex> fit_saap_index(model::CausalLM model, const std::string& model_identity,
                                         const std::vector<int64_t>& ids, const FitOptions& options,
                                         FitReport* report, const Log& log = nullptr);

// ---------------------------------------------------------------------------
// routing evaluation

struct RoutingEvalOptions {
  int64_t context = 8192;
  int64_t max_windows = 0;
  int64_t queries_per_window = 512;
  std::vector<int64_t> top_l = {4, 8, 16, 32};
  // Also select by key budget: partitions in decreasing attention per key
  // until these fractions of the query's routable keys are selected.
  std::vector<double> key_budgets = {0.025, 0.05, 0.1, 0.2};
  uint64_t seed = 4321;  // query positions and the random baseline
};

// One method at one l, averaged over layers, heads and sampled queries.
struct RoutingRow {
  std::string method;  // saap, symmetric, symmetric_dot, rope_kmeans, rope_saap, random, oracle
  int64_t l = 0;            // top-l rows; 0 for a key-budget row
  double key_budget = 0;    // key-budget rows: the fraction of routable keys asked for
  // Mean over queries of (mass in the selected partitions) / (routed mass):
  // the classifier's task, the paper's recall.
  double recall = 0;
  // Sum over queries of selected mass / sum of routed mass (weights queries
  // by how much attention leaves the window and sinks).
  double recall_weighted = 0;
  // Mean over queries of the whole attention kept: window + sinks + selected.
  double attention_kept = 0;
  // Mean over queries of keys attended (window, sinks, selected partitions)
  // / causal keys (position + 1), and of selected routed keys / routable keys.
  double keys_visited = 0;
  double routed_keys_visited = 0;
};

struct RoutingEvalReport {
  int64_t windows = 0, queries_per_head = 0;
  int64_t local_window = 0, sink_tokens = 0, partitions = 0;
  double mean_routed_mass = 0;  // attention outside window and sinks, mean over queries
  std::vector<RoutingRow> rows;
  double seconds = 0;
};

// Routing quality on `ids` (held-out text): SAAP (the index's classifiers on
// un-rotated queries), symmetric k-means (each query to its nearest key
// centroids; symmetric_dot: largest q . centroid), random partitions with a
// random choice, and the oracle (true top-l partitions). With `rope_index`
// (fitted with pre_rope_keys = false), also rope_kmeans (RoPE'd queries to the
// nearest RoPE'd-key centroid) and rope_saap (its classifier). Keys sit in the
// partition of their nearest centroid, computed on this text. The error names
// the option or index at fault.
absl::StatusOr<RoutingEvalReport> evaluate_routing(model::CausalLM model, const SaapIndex& index,
                                                   const SaapIndex* rope_index,
                                                   const std::vector<int64_t>& ids,
                                                   const RoutingEvalOptions& options,
                                                   const Log& log = nullptr);

}  // namespace sparseflash::saap
