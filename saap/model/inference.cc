// The SAAP attention hook. See inference.h.
#include "saap/model/inference.h"

#include <stdexcept>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "absl/strings/str_format.h"
#include "saap/baselines.h"
#include "saap/budgets.h"
#include "saap/targets.h"

namespace sparseflash::saap {

const char* routing_name(Routing routing) {
  switch (routing) {
    case Routing::kClassifier: return "classifier";
    case Routing::kSymmetric: return "symmetric";
    case Routing::kAll: return "all";
    case Routing::kOracle: return "oracle";
  }
  return "?";
}

SaapAttentionHook::SaapAttentionHook(const SaapIndex& index, const SaapInferenceOptions& options,
                                     at::Device device)
    : header_(index.header), options_(options) {
  const int64_t C = header_.partitions();
  if (!header_.pre_rope_keys())
    throw std::invalid_argument(
        "SAAP attention: the index was fitted on RoPE'd keys (a baseline); inference needs "
        "one fitted on pre-RoPE keys");
  if (!(options_.key_budget >= 0 && options_.key_budget <= 1))
    throw std::invalid_argument(absl::StrFormat(
        "SAAP attention: key budget must be in [0, 1], got %g", options_.key_budget));
  if (!(options_.mass_threshold >= 0 && options_.mass_threshold <= 1))
    throw std::invalid_argument(absl::StrFormat(
        "SAAP attention: mass threshold must be in [0, 1], got %g", options_.mass_threshold));
  if (options_.key_budget == 0 && options_.mass_threshold == 0 &&
      options_.routing != Routing::kAll &&
      (options_.top_l < 1 || options_.top_l > C))
    throw std::invalid_argument(absl::StrFormat(
        "SAAP attention: top-l must be in [1, partitions = %d], got %d", C, options_.top_l));
  attention_.local_window = header_.local_window();
  attention_.sink_tokens = header_.sink_tokens();
  attention_.top_l = options_.top_l;
  attention_.num_partitions = C;
  attention_.chunk_size = options_.chunk_size;
  for (const SaapLayer& layer : index.layers) {
    centroids_.push_back(layer.centroids.to(device, at::kFloat));
    classifiers_.push_back(load_classifier(layer, device));
    if (header_.recency_edges_size() > 0) recency_.push_back(layer.recency.to(device, at::kFloat));
  }
  recency_edges_.assign(header_.recency_edges().begin(), header_.recency_edges().end());
  caches_.resize(index.layers.size());
  if (options_.per_head_budgets) {
    if (options_.key_budget <= 0 || options_.routing == Routing::kAll)
      throw std::invalid_argument(
          "SAAP attention: per-head budgets split a key budget; give one (--key-budget)");
    if (header_.budget_grid_size() == 0)
      throw std::invalid_argument(
          "SAAP attention: the index has no budget curves (fitted by an older build or with "
          "an empty budget grid); refit it for per-head budgets");
    std::vector<Tensor> lost, keys;
    for (const SaapLayer& layer : index.layers) {
      lost.push_back(options_.budget_objective == BudgetObjective::kOutputError
                         ? layer.budget_output_error
                         : layer.budget_lost_mass);
      keys.push_back(layer.budget_keys);
    }
    Tensor all_keys = at::cat(keys);
    Tensor choice = allocate_head_budgets(at::cat(lost), all_keys, options_.key_budget);
    const int64_t hq = header_.num_query_heads();
    std::vector<float> grid(header_.budget_grid().begin(), header_.budget_grid().end());
    double planned = 0;
    for (int64_t i = 0; i < choice.size(0); ++i) {
      const int64_t c = choice[i].item<int64_t>();
      head_budgets_.push_back(grid[c]);
      planned += all_keys[i][c].item<double>();
    }
    planned_key_fraction_ = planned / static_cast<double>(choice.size(0));
    for (size_t layer = 0; layer < index.layers.size(); ++layer) {
      std::vector<float> b(head_budgets_.begin() + layer * hq,
                           head_budgets_.begin() + (layer + 1) * hq);
      layer_budgets_.push_back(at::tensor(b).view({1, hq, 1, 1}).to(device));
    }
  }
}

Tensor SaapAttentionHook::scores(int layer, const Tensor& q_pre) const {
  const int64_t B = q_pre.size(0), H = q_pre.size(1), N = q_pre.size(2), D = q_pre.size(3);
  const int64_t C = header_.partitions();
  Tensor q = q_pre.to(at::kFloat).permute({1, 0, 2, 3}).reshape({H, B * N, D});
  Tensor s;
  switch (options_.routing) {
    case Routing::kClassifier: s = classifiers_[layer]->forward(q); break;
    case Routing::kSymmetric:
      s = centroid_scores(q, centroids_[layer], CentroidScore::kNegativeDistance);
      break;
    case Routing::kAll: s = at::zeros({H, B * N, C}, q.options()); break;
    case Routing::kOracle:
      throw std::logic_error("SAAP attention: oracle scores come from the attention itself");
  }
  return s.view({H, B, N, C}).permute({1, 0, 2, 3});
}

Tensor SaapAttentionHook::attend(const model::AttentionCall& call) {
  const int layer = call.layer;
  TORCH_CHECK(layer >= 0 && layer < static_cast<int>(centroids_.size()),
              "SAAP attention: layer ", layer, " but the index has ", centroids_.size());
  const int64_t N = call.q.size(2), T = call.k.size(2), C = header_.partitions();
  const int64_t group = call.q.size(1) / call.k.size(1);
  const int64_t l = options_.routing == Routing::kAll ? C : options_.top_l;
  const bool count_prior =
      header_.count_prior() && options_.routing == Routing::kClassifier;
  // Partition scores, scaled by the keys each partition holds for the query
  // when the classifiers were trained that way.
  const bool budget = options_.key_budget > 0 && options_.routing != Routing::kAll;
  const bool nucleus = options_.mass_threshold > 0 && options_.routing == Routing::kClassifier;
  const bool need_counts = count_prior || budget;
  const bool oracle = options_.routing == Routing::kOracle;
  TORCH_CHECK(!oracle || !call.with_cache,
              "SAAP attention: oracle routing needs the whole attention; it runs without a KV "
              "cache only (eval, not generate)");
  Tensor oracle_part;  // set before select() in the oracle case
  // Routable keys per partition for the call's queries (the last N of T
  // positions): key_partition [B, Hkv, T] -> [B, Hkv, N, C].
  auto query_counts = [&](const Tensor& key_partition) {
    return routable_key_counts(key_partition, C,
                               at::arange(T - N, T, key_partition.options().dtype(at::kLong)),
                               attention_.local_window, attention_.sink_tokens);
  };
  // The query positions on the host: the recency counts check them there
  // (no device sync) and copy them over.
  const Tensor q_pos = at::arange(T - N, T, at::kLong);
  // counts [B, Hkv, N, C]: routable keys per partition (defined when needed);
  // part: the partitions of the keys from position `first` on (recency bands).
  auto select = [&](const Tensor& counts, const Tensor& part, int64_t first) {
    Tensor s;
    if (oracle) {
      // log of the routed mass per partition, per batch row.
      std::vector<Tensor> rows;
      MassOptions mo;
      mo.local_window = attention_.local_window;
      mo.sink_tokens = attention_.sink_tokens;
      Tensor pos = at::arange(T - N, T, call.q.options().dtype(at::kLong));
      for (int64_t b = 0; b < call.q.size(0); ++b)
        rows.push_back(partition_attention_mass(call.q[b].to(at::kFloat), call.k[b].to(at::kFloat),
                                                pos, oracle_part[b], C, mo));
      s = at::stack(rows).clamp_min(1e-30).log();
    } else {
      s = scores(layer, call.q_pre);
    }
    // Routable keys per query head [B, Hq, N, C], and the logits with the
    // count prior of count-aware classifiers (recency-weighted where the
    // index has bands).
    Tensor n = counts.defined() ? counts.repeat_interleave(group, 1) : Tensor();
    Tensor logits = s;
    if (count_prior) {
      logits = s + log_count_prior(
                       recency_edges_.empty()
                           ? n
                           : recency_weighted_counts(counts, part, first, q_pos,
                                                     attention_.local_window,
                                                     attention_.sink_tokens, recency_edges_,
                                                     recency_[layer]));
    }
    if (nucleus) {
      // The smallest set of partitions whose predicted share of the routed
      // attention reaches the threshold (the crossing partition included).
      auto [p, order] = at::softmax(logits, -1).sort(-1, /*descending=*/true);
      Tensor take = (p.cumsum(-1) - p).lt(options_.mass_threshold);
      return at::where(take, order, at::full({}, -1, order.options()));
    }
    if (!need_counts) return select_partitions(s, l);
    if (!budget) return select_partitions(count_prior ? logits : s + log_count_prior(n), l);
    // Attention per key: mass logits (count-aware ones with their prior)
    // less log n; the symmetric baseline's scores as they are.
    Tensor density =
        options_.routing == Routing::kSymmetric ? s : key_density(logits, n);
    Tensor order = std::get<1>(density.sort(-1, /*descending=*/true));
    Tensor keys = n.gather(-1, order);
    Tensor before = keys.cumsum(-1) - keys;
    Tensor total = n.sum(-1, /*keepdim=*/true);
    Tensor take = layer_budgets_.empty() ? before.lt(total * options_.key_budget)
                                         : before.lt(total * layer_budgets_[layer]);
    return at::where(take, order, at::full({}, -1, order.options()));
  };
  SaapVisitStats st;
  Tensor out;
  if (!call.with_cache) {
    Tensor part = assign_key_partitions(call.k_pre, centroids_[layer]);
    oracle_part = part;
    Tensor counts = (need_counts || nucleus) ? query_counts(part) : Tensor();
    out = saap_attention(call.q, call.k, call.v, part, select(counts, part, 0), attention_, &st);
  } else {
    auto& cache = caches_[layer];
    if (call.offset == 0) {
      cache = std::make_unique<PartitionedKVCache>(centroids_[layer], call.k.size(0), attention_,
                                                   call.k.scalar_type(), call.k.device());
    }
    TORCH_CHECK(cache && cache->length() == call.offset,
                "SAAP attention: layer ", layer, " cache holds ", cache ? cache->length() : 0,
                " tokens, the call starts at position ", call.offset,
                " (a generation must start at position 0 with this hook installed)");
    cache->append(call.k_pre, call.k.narrow(2, T - N, N), call.v.narrow(2, T - N, N));
    if (N == 1) {
      // The cache's partitions hold exactly the new query's routable keys.
      Tensor counts =
          (need_counts || nucleus) ? cache->partition_length().unsqueeze(2) : Tensor();
      // The recency bands need only the keys of the recent bands.
      const int64_t first =
          recency_edges_.empty()
              ? 0
              : std::max<int64_t>(0, T - attention_.local_window - recency_edges_.back());
      Tensor selected = select(counts, cache->key_partition().narrow(2, first, T - first), first);
      out = cache->decode(call.q.select(2, 0), selected.select(2, 0),
                          options_.collect_stats ? &st : nullptr)
                .unsqueeze(2);
    } else {
      Tensor part = cache->key_partition();
      Tensor counts = (need_counts || nucleus) ? query_counts(part) : Tensor();
      out = saap_attention(call.q, call.k, call.v, part, select(counts, part, 0), attention_, &st);
    }
  }
  stats_ += st;
  return out;
}

}  // namespace sparseflash::saap
