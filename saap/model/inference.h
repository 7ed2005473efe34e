// SAAP at inference inside a causal LM (model/causal_lm.h): an attention hook (model::AttentionHook)
// that routes every query of every layer to its top-l key partitions and
// attends exactly over those partitions, the local window and the sinks.
//
// Without a KV cache (evaluation, prefill of a whole text window) each call
// assigns the window's keys to their nearest centroid (pre-RoPE) and runs
// saap_attention. With a KV cache (generation) each layer keeps a
// PartitionedKVCache next to the model's own cache: a multi-token call
// (the prompt) appends to it and attends with saap_attention, a one-token
// call appends and runs its decode (the CUDA kernel on GPUs).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "model/causal_lm.h"
#include "saap/partition_attention.h"
#include "saap/budgets.h"
#include "saap/classifier.h"
#include "saap/index.h"

namespace sparseflash::saap {

// How a query chooses its partitions.
enum class Routing {
  kClassifier,  // SAAP: the index's classifier on the un-rotated query
  kSymmetric,   // baseline: the key centroids nearest to the un-rotated query
  kAll,         // every partition (equals dense attention; for checks)
  // The true routed attention mass of each partition, from the full
  // attention (evaluation only, no KV cache): the upper bound of any router
  // over these partitions. Top-l by mass; key budgets by mass per key.
  kOracle,
};

struct SaapInferenceOptions {
  int64_t top_l = 16;  // partitions per query, in [1, C]
  // > 0: select by key budget instead of top-l: partitions in decreasing
  // attention per key (count-aware classifier logits) until this fraction of
  // the query's routable keys is selected (the crossing partition included).
  double key_budget = 0;
  // With key_budget > 0: split the budget over the query heads of all layers
  // by the index's budget curves (saap/budgets.h) so that their mean is
  // key_budget: heads that lose little attention get few keys (or none),
  // heads whose attention spreads get many. Needs an index with curves.
  bool per_head_budgets = false;
  // Which of the index's curves the split minimises (summed over heads).
  BudgetObjective budget_objective = BudgetObjective::kOutputError;
  // > 0 (classifier routing): select, per query, the fewest partitions whose
  // predicted share of the routed attention (softmax of the count-aware
  // scores) reaches this threshold; overrides top-l and the key budget.
  double mass_threshold = 0;
  Routing routing = Routing::kClassifier;
  int64_t chunk_size = 512;  // saap_attention's queries per chunk
  // Count keys visited in one-token decode steps too (a device sync per
  // layer and step; prefill calls always count).
  bool collect_stats = false;
};

class SaapAttentionHook : public model::AttentionHook {
 public:
  // The index must have been fitted on pre-RoPE keys and match the model's
  // shapes (the caller checks the model identity with load_saap_index).
  SaapAttentionHook(const SaapIndex& index, const SaapInferenceOptions& options,
                    at::Device device);
  Tensor attend(const model::AttentionCall& call) override;

  // Partition scores [B, Hq, N, C] of un-rotated queries q_pre [B, Hq, N, D].
  Tensor scores(int layer, const Tensor& q_pre) const;

  // Keys visited over every call since the last reset, all layers.
  const SaapVisitStats& stats() const { return stats_; }
  void reset_stats() { stats_ = SaapVisitStats{}; }
  const SaapInferenceOptions& options() const { return options_; }
  const SaapHeader& header() const { return header_; }
  // Per-head budgets: the fraction of routable keys of every query head,
  // layer-major [layers * Hq] (empty without per_head_budgets), and the mean
  // selected fraction the curves predict for them.
  const std::vector<double>& head_budgets() const { return head_budgets_; }
  double planned_key_fraction() const { return planned_key_fraction_; }

 private:
  SaapHeader header_;
  SaapInferenceOptions options_;
  SaapAttentionOptions attention_;
  std::vector<Tensor> centroids_;  // per layer, float32 [Hkv, C, D] on the device
  mutable std::vector<QueryClassifier> classifiers_;  // forward() is not const
  std::vector<std::unique_ptr<PartitionedKVCache>> caches_;  // per layer, generation only
  std::vector<Tensor> recency_;        // per layer, float32 [Hq, B + 1] on the device (bands only)
  std::vector<int64_t> recency_edges_;  // the header's recency_edges
  std::vector<Tensor> layer_budgets_;  // per layer, float32 [1, Hq, 1, 1] on the device
  std::vector<double> head_budgets_;
  double planned_key_fraction_ = 0;
  SaapVisitStats stats_;
};

const char* routing_name(Routing routing);

}  // namespace sparseflash::saap
