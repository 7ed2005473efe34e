// Fitting a SAAP index on a loaded Llama, and measuring routing quality.
// Reading order: helpers (windows, the recording hook, checks), fitting
// (keys -> k-means -> targets -> classifiers -> index), routing evaluation.
#include "saap/model/calibrate.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <stdexcept>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/util/Exception.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include "absl/strings/str_format.h"
#include "io/errors.h"
#include "model/torch_status.h"
#include "saap/baselines.h"
#include "saap/kmeans.h"
#include "saap/targets.h"

namespace sparseflash::saap {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

void say(const Log& log, const std::string& line) {
  if (log) log(line);
}

// Calls `record` with every layer's attention inputs and lets the layer
// attend as usual. Installed for one forward pass by RecordingScope.
class RecordingHook : public model::AttentionHook {
 public:
  explicit RecordingHook(std::function<void(const model::AttentionCall&)> record)
      : record_(std::move(record)) {}
  Tensor attend(const model::AttentionCall& call) override {
    record_(call);
    return {};
  }

 private:
  std::function<void(const model::AttentionCall&)> record_;
};

// Runs the model over one window with `record` installed, then puts the
// model's previous hook back (also when `record` throws).
void run_recording(model::CausalLM& model, const std::vector<int64_t>& window,
                   std::function<void(const model::AttentionCall&)> record) {
  struct Restore {
    model::CausalLM& model;
    std::shared_ptr<model::AttentionHook> previous;
    ~Restore() { model->set_attention_hook(previous); }
  } restore{model, model->attention_hook()};
  model->set_attention_hook(std::make_shared<RecordingHook>(std::move(record)));
  torch::NoGradGuard no_grad;
  Tensor ids = at::tensor(window, at::TensorOptions().dtype(at::kLong)).view({1, -1});
  model->hidden_states(ids.to(model->device()));
}

// `count` distinct positions drawn uniformly from [lo, hi), sorted, as int64 on `device`.
Tensor sample_positions(int64_t lo, int64_t hi, int64_t count, at::Generator& gen,
                        const at::Device& device) {
  Tensor p = at::randperm(hi - lo, gen, at::kLong).narrow(0, 0, std::min(count, hi - lo));
  return std::get<0>((p + lo).sort()).to(device);
}

void check_model_matches(const model::AttentionShape& c, const SaapHeader& h,
                         const char* which) {
  if (h.num_layers() != c.layers || h.num_query_heads() != c.heads ||
      h.num_kv_heads() != c.kv_heads || h.head_dim() != c.head_dim)
    throw std::invalid_argument(absl::StrFormat(
        "%s: the index has %d layers, %d/%d heads, head dim %d; the model %d layers, %d/%d "
        "heads, head dim %d",
        which, h.num_layers(), h.num_query_heads(), h.num_kv_heads(), h.head_dim(),
        c.layers, c.heads, c.kv_heads, c.head_dim));
}

// Windows must leave routable queries: positions >= sinks + window.
void check_windows(const std::vector<std::vector<int64_t>>& windows, int64_t local_window,
                   int64_t sink_tokens, const char* what) {
  if (windows.empty()) throw std::invalid_argument(absl::StrFormat("%s: the text has no tokens", what));
  for (const auto& w : windows) {
    if (static_cast<int64_t>(w.size()) <= local_window + sink_tokens)
      throw std::invalid_argument(absl::StrFormat(
          "%s: a window of %d tokens has no query beyond the local window (%d) and the sinks "
          "(%d); give more text or a longer --context",
          what, w.size(), local_window, sink_tokens));
  }
}

}  // namespace

std::vector<std::vector<int64_t>> token_windows(const std::vector<int64_t>& ids, int64_t context,
                                                int64_t max_windows) {
  if (context < 2) throw std::invalid_argument(absl::StrFormat("context must be >= 2, got %d", context));
  std::vector<std::vector<int64_t>> windows;
  const int64_t n = static_cast<int64_t>(ids.size());
  for (int64_t at = 0; at + context <= n; at += context) {
    if (max_windows > 0 && static_cast<int64_t>(windows.size()) >= max_windows) break;
    windows.emplace_back(ids.begin() + at, ids.begin() + at + context);
  }
  if (windows.empty() && n > 0) windows.push_back(ids);
  return windows;
}

// ---------------------------------------------------------------------------
// fitting

namespace {

SaapIndex fit_or_throw(model::CausalLM model, const std::string& model_identity,
                       const std::vector<int64_t>& ids, const FitOptions& o, FitReport* report,
                       const Log& log) {
  const auto start = Clock::now();
  const model::AttentionShape cfg = model->attention_shape();
  const int64_t layers = cfg.layers, hq = cfg.heads, hkv = cfg.kv_heads, d = cfg.head_dim,
                C = o.partitions;
  if (C < 2) throw std::invalid_argument(absl::StrFormat("partitions must be >= 2, got %d", C));
  if (o.hidden < 1) throw std::invalid_argument("hidden must be >= 1");
  if (o.local_window < 1 || o.sink_tokens < 0)
    throw std::invalid_argument(absl::StrFormat(
        "local window must be >= 1 (a query always sees itself) and sinks >= 0, got %d and %d",
        o.local_window, o.sink_tokens));
  if (o.kmeans_keys < C)
    throw std::invalid_argument(absl::StrFormat(
        "kmeans keys per head (%d) must be at least the partitions (%d)", o.kmeans_keys, C));
  if (o.queries_per_window < 1) throw std::invalid_argument("queries per window must be >= 1");
  const bool recency = !o.recency_edges.empty();
  if (recency) {
    io::ok_or_throw(check_recency_edges(o.recency_edges, "saap fit"));
    if (!o.count_prior)
      throw std::invalid_argument("saap fit: recency bands weight the count prior; they need it");
    if (o.context < o.local_window + o.sink_tokens + o.recency_edges.back() + 1)
      throw std::invalid_argument(absl::StrFormat(
          "saap fit: the oldest recency band starts %d keys behind the local window, so the "
          "context (%d) must be at least local window + sinks + %d + 1 = %d to measure it",
          o.recency_edges.back(), o.context, o.recency_edges.back(),
          o.local_window + o.sink_tokens + o.recency_edges.back() + 1));
  }
  if (!o.budget_grid.empty()) io::ok_or_throw(check_budget_grid(o.budget_grid, "saap fit"));
  if (!o.budget_grid.empty() && (o.budget_windows < 1 || o.budget_queries_per_window < 1))
    throw std::invalid_argument(absl::StrFormat(
        "budget windows and queries per window must be >= 1, got %d and %d", o.budget_windows,
        o.budget_queries_per_window));
  const auto windows = token_windows(ids, o.context, o.max_windows);
  check_windows(windows, o.local_window, o.sink_tokens, "saap fit");
  const int64_t W = static_cast<int64_t>(windows.size());
  const at::Device device = model->device();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  FitReport r;
  r.windows = W;
  for (const auto& w : windows) r.tokens += static_cast<int64_t>(w.size());
  const char* key_space = o.pre_rope_keys ? "pre-RoPE" : "RoPE'd";

  // 1. keys: a uniform sample per window (the sinks are always attended and
  // never routed, so they are left out), all layers' KV heads side by side.
  auto phase = Clock::now();
  const int64_t per_window = (o.kmeans_keys + W - 1) / W;
  std::vector<std::vector<Tensor>> keys(layers);
  // Recency bands: routed attention and routable keys per band, summed over
  // sampled queries, for the band weights.
  const int64_t bands = static_cast<int64_t>(o.recency_edges.size()) + 1;
  MassOptions mo;
  mo.local_window = o.local_window;
  mo.sink_tokens = o.sink_tokens;
  Tensor band_mass, band_keys;
  if (recency) {
    band_mass = at::zeros({layers * hq, bands}, at::TensorOptions().dtype(at::kDouble).device(device));
    band_keys = at::zeros({bands}, band_mass.options());
  }
  for (int64_t w = 0; w < W; ++w) {
    const int64_t len = static_cast<int64_t>(windows[w].size());
    Tensor pos = sample_positions(o.sink_tokens, len, per_window, gen, device);
    Tensor qpos = recency ? sample_positions(o.local_window + o.sink_tokens, len,
                                             o.queries_per_window, gen, device)
                          : Tensor();
    run_recording(model, windows[w], [&](const model::AttentionCall& c) {
      const Tensor& k = o.pre_rope_keys ? c.k_pre : c.k;
      keys[c.layer].push_back(k[0].index_select(1, pos).to(at::kFloat));
      if (recency) {
        Tensor q = c.q[0].index_select(1, qpos).to(at::kFloat);
        band_mass.narrow(0, c.layer * hq, hq)
            .add_(distance_band_mass(q, c.k[0].to(at::kFloat), qpos, o.recency_edges, mo)
                      .sum(1)
                      .to(at::kDouble));
      }
    });
    if (recency)
      band_keys.add_(distance_band_counts(qpos, o.local_window, o.sink_tokens, o.recency_edges)
                         .sum(0)
                         .to(at::kDouble));
    say(log, absl::StrFormat("[keys] window %d/%d: %d %s keys per head (%.1f s)", w + 1, W,
                             pos.size(0), key_space, seconds_since(phase)));
  }
  std::vector<Tensor> per_layer;
  for (auto& k : keys) per_layer.push_back(at::cat(k, 1));
  keys.clear();
  Tensor x = at::cat(per_layer, 0);  // [layers * hkv, n, d]
  per_layer.clear();
  r.keys_per_head = x.size(1);
  if (r.keys_per_head < C)
    throw std::invalid_argument(absl::StrFormat(
        "saap fit: %d keys per head for %d partitions; give more text", r.keys_per_head, C));
  Tensor beta;  // [layers * hq, bands], the recency log weights
  if (recency) {
    beta = recency_log_weights(band_mass, band_keys);
    r.recency_log_weights = beta.to(at::kCPU);
    Tensor mean = r.recency_log_weights.mean(0);
    std::string text;
    for (int64_t b = 0; b < bands; ++b)
      text += absl::StrFormat("%s%.2f", b ? " " : "", mean[b].item<float>());
    say(log, absl::StrFormat("[recency] mean log weight per band (newest first): %s", text));
  }
  r.capture_seconds = seconds_since(phase);

  phase = Clock::now();
  KMeansOptions ko;
  ko.num_clusters = C;
  ko.metric = KMeansMetric::kEuclidean;
  ko.init = KMeansInit::kPlusPlus;
  ko.max_iterations = o.kmeans_iterations;
  ko.num_init = o.kmeans_init;
  ko.seed = o.seed;
  say(log, absl::StrFormat("[kmeans] %d heads x %d keys x %d dims into %d partitions on %s",
                           x.size(0), x.size(1), d, C, device.str()));
  KMeansResult km = batched_kmeans(x, ko);
  Tensor sizes = at::zeros({x.size(0), C}, x.options().dtype(at::kLong))
                     .scatter_add_(1, km.assignments, at::ones_like(km.assignments));
  r.smallest_partition = sizes.min().item<int64_t>();
  r.largest_partition = sizes.max().item<int64_t>();
  r.kmeans_iterations = km.iterations;
  r.kmeans_converged = km.converged;
  r.kmeans_inertia_per_key = (km.inertia / static_cast<double>(x.size(1))).mean().item<double>();
  Tensor centroids = km.centroids.view({layers, hkv, C, d});
  x = Tensor();
  km = KMeansResult();
  if (device.is_cuda()) torch::cuda::synchronize();
  r.kmeans_seconds = seconds_since(phase);
  say(log, absl::StrFormat(
               "[kmeans] %d iterations%s, inertia per key %.4g, partition sizes %d..%d (%.1f s)",
               r.kmeans_iterations, r.kmeans_converged ? " (converged)" : "",
               r.kmeans_inertia_per_key, r.smallest_partition, r.largest_partition,
               r.kmeans_seconds));

  // 2. targets: sampled queries, their attention mass per partition.
  phase = Clock::now();
  std::vector<int64_t> counts;
  for (const auto& w : windows)
    counts.push_back(std::min<int64_t>(o.queries_per_window,
                                       static_cast<int64_t>(w.size()) - o.local_window - o.sink_tokens));
  int64_t n_queries = 0;
  for (int64_t c : counts) n_queries += c;
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  Tensor queries = at::empty({layers * hq, n_queries, d}, f32);
  Tensor targets = at::empty({layers * hq, n_queries, C}, f32);
  // The count prior's logit offsets (log of the, possibly recency-weighted,
  // routable keys per partition), and the exact key counts of the budget
  // curves (int16 while they fit).
  const bool budget_curves = !o.budget_grid.empty();
  Tensor offsets = o.count_prior ? at::empty({layers * hq, n_queries, C}, f32) : Tensor();
  Tensor key_counts =
      budget_curves ? at::empty({layers * hq, n_queries, C},
                                f32.dtype(o.context < 32768 ? at::kShort : at::kInt))
                    : Tensor();
  const int64_t group = hq / hkv;
  int64_t filled = 0;
  for (int64_t w = 0; w < W; ++w) {
    const int64_t len = static_cast<int64_t>(windows[w].size());
    Tensor pos = sample_positions(o.local_window + o.sink_tokens, len, counts[w], gen, device);
    run_recording(model, windows[w], [&](const model::AttentionCall& c) {
      Tensor k = c.k[0].to(at::kFloat);
      Tensor key_repr = o.pre_rope_keys ? c.k_pre[0].to(at::kFloat) : k;
      Tensor part = assign_to_centroids(key_repr, centroids[c.layer], KMeansMetric::kEuclidean);
      Tensor q = c.q[0].index_select(1, pos).to(at::kFloat);
      Tensor mass = partition_attention_mass(q, k, pos, part, C, mo);
      Tensor q_in = o.pre_rope_keys ? c.q_pre[0].index_select(1, pos).to(at::kFloat) : q;
      queries.narrow(0, c.layer * hq, hq).narrow(1, filled, pos.size(0)).copy_(q_in);
      targets.narrow(0, c.layer * hq, hq).narrow(1, filled, pos.size(0)).copy_(mass);
      if (offsets.defined() || key_counts.defined()) {
        Tensor counts = routable_key_counts(part, C, pos, o.local_window, o.sink_tokens);
        if (key_counts.defined())
          key_counts.narrow(0, c.layer * hq, hq)
              .narrow(1, filled, pos.size(0))
              .copy_(counts.repeat_interleave(group, 0));
        if (offsets.defined()) {
          Tensor prior = recency ? recency_weighted_counts(counts, part, 0, pos, o.local_window,
                                                           o.sink_tokens, o.recency_edges,
                                                           beta.narrow(0, c.layer * hq, hq))
                                 : counts.repeat_interleave(group, 0);
          offsets.narrow(0, c.layer * hq, hq)
              .narrow(1, filled, pos.size(0))
              .copy_(log_count_prior(prior));
        }
      }
    });
    filled += pos.size(0);
    say(log, absl::StrFormat("[targets] window %d/%d: %d queries per head (%.1f s)", w + 1, W,
                             pos.size(0), seconds_since(phase)));
  }
  // A query whose routed mass underflowed to 0 in float32 (a head that looks
  // only at its sinks and window) gets a uniform target; 1e-9 / C per
  // partition changes no other row measurably.
  targets.add_(1e-9 / static_cast<double>(C));
  r.queries_per_head = n_queries;
  if (device.is_cuda()) torch::cuda::synchronize();
  r.targets_seconds = seconds_since(phase);

  // 3. classifiers: every query head of every layer, trained together.
  phase = Clock::now();
  say(log, absl::StrFormat("[classifier] %d heads, %d queries each, hidden %d, %d steps",
                           layers * hq, n_queries, o.hidden, o.train.steps));
  QueryClassifier clf(layers * hq, d, o.hidden, C, o.seed, device);
  r.classifier =
      train_classifier(clf, queries, targets, o.train, o.count_prior ? offsets : Tensor());
  BudgetCurves curves;
  if (budget_curves) {
    // On the held-out queries: the classifier's order (attention per key)
    // against the true masses.
    const auto budget_start = Clock::now();
    torch::NoGradGuard no_grad;
    const Tensor& held = r.classifier.holdout_index;
    std::vector<Tensor> scores;
    for (int64_t at = 0; at < held.size(0); at += 1024) {
      const int64_t len = std::min<int64_t>(1024, held.size(0) - at);
      scores.push_back(clf->forward(queries.index_select(1, held.narrow(0, at, len))));
    }
    Tensor logits = at::cat(scores, 1);
    scores.clear();
    if (o.count_prior) logits += offsets.index_select(1, held);
    Tensor counts = key_counts.index_select(1, held).to(at::kFloat);
    Tensor density = key_density(logits, counts);
    logits = Tensor();
    curves = measure_budget_curves(density, targets.index_select(1, held), counts, o.budget_grid);
    r.budget_seconds = seconds_since(budget_start);
    say(log, absl::StrFormat("[budgets] curves of %d heads at %d budgets on %d held-out queries "
                             "(%.1f s)",
                             layers * hq, o.budget_grid.size(), held.size(0), r.budget_seconds));
  }
  queries = Tensor();
  targets = Tensor();
  offsets = Tensor();
  key_counts = Tensor();
  r.train_seconds = seconds_since(phase);
  std::string recall;
  for (size_t i = 0; i < r.classifier.recall_at.size(); ++i)
    recall += absl::StrFormat("%s@%d %.3f (oracle %.3f)", i ? ", " : "", r.classifier.recall_at[i],
                              r.classifier.recall[i], r.classifier.oracle_recall[i]);
  say(log, absl::StrFormat("[classifier] held-out KL %.4f, recall %s (%.1f s)",
                           r.classifier.holdout_kl, recall, r.train_seconds));

  // 4. the index.
  SaapIndex index;
  SaapHeader& h = index.header;
  h.set_format_version(kSaapFormatVersion);
  h.set_model_identity(model_identity);
  h.set_num_layers(static_cast<int32_t>(layers));
  h.set_num_query_heads(static_cast<int32_t>(hq));
  h.set_num_kv_heads(static_cast<int32_t>(hkv));
  h.set_head_dim(static_cast<int32_t>(d));
  h.set_partitions(static_cast<int32_t>(C));
  h.set_classifier_hidden(static_cast<int32_t>(o.hidden));
  h.set_local_window(static_cast<int32_t>(o.local_window));
  h.set_sink_tokens(static_cast<int32_t>(o.sink_tokens));
  h.set_key_metric(SaapHeader::EUCLIDEAN);
  h.set_pre_rope_keys(o.pre_rope_keys);
  h.set_count_prior(o.count_prior);
  for (int64_t e : o.recency_edges) h.add_recency_edges(static_cast<int32_t>(e));
  h.set_calibration_context(static_cast<int32_t>(o.context));
  h.set_calibration_data(o.calibration_data);
  for (double g : o.budget_grid) h.add_budget_grid(static_cast<float>(g));
  auto cpu = [](const Tensor& t) { return t.detach().to(at::kCPU, at::kFloat).contiguous().clone(); };
  for (int64_t l = 0; l < layers; ++l) {
    SaapLayer layer;
    layer.centroids = cpu(centroids[l]);
    layer.in_mean = cpu(clf->in_mean.narrow(0, l * hq, hq));
    layer.in_std = cpu(clf->in_std.narrow(0, l * hq, hq));
    layer.w1 = cpu(clf->w1.narrow(0, l * hq, hq));
    layer.b1 = cpu(clf->b1.narrow(0, l * hq, hq));
    layer.w2 = cpu(clf->w2.narrow(0, l * hq, hq));
    layer.b2 = cpu(clf->b2.narrow(0, l * hq, hq));
    if (budget_curves) {
      layer.budget_lost_mass = cpu(curves.lost_mass.narrow(0, l * hq, hq));
      layer.budget_keys = cpu(curves.keys.narrow(0, l * hq, hq));
    }
    if (recency) layer.recency = cpu(beta.narrow(0, l * hq, hq));
    index.layers.push_back(std::move(layer));
  }

  // 5. output-error curves: a last pass through the trained classifiers.
  if (budget_curves) {
    phase = Clock::now();
    torch::NoGradGuard no_grad;
    std::vector<QueryClassifier> layer_clf;
    for (const SaapLayer& layer : index.layers) layer_clf.push_back(load_classifier(layer, device));
    const int64_t G = static_cast<int64_t>(o.budget_grid.size());
    Tensor errors = at::zeros({layers, hq, G}, f32);
    int64_t queries_seen = 0;
    const int64_t passes = std::min(W, o.budget_windows);
    for (int64_t w = 0; w < passes; ++w) {
      const int64_t len = static_cast<int64_t>(windows[w].size());
      Tensor pos = sample_positions(o.local_window + o.sink_tokens, len,
                                    o.budget_queries_per_window, gen, device);
      run_recording(model, windows[w], [&](const model::AttentionCall& c) {
        Tensor key_repr = (o.pre_rope_keys ? c.k_pre[0] : c.k[0]).to(at::kFloat);
        Tensor part = assign_to_centroids(key_repr, centroids[c.layer], KMeansMetric::kEuclidean);
        Tensor q = c.q[0].index_select(1, pos).to(at::kFloat);
        Tensor q_in = o.pre_rope_keys ? c.q_pre[0].index_select(1, pos).to(at::kFloat) : q;
        Tensor counts = routable_key_counts(part, C, pos, o.local_window, o.sink_tokens);
        Tensor logits = layer_clf[c.layer]->forward(q_in);
        if (o.count_prior)
          logits += log_count_prior(
              recency ? recency_weighted_counts(counts, part, 0, pos, o.local_window,
                                                o.sink_tokens, o.recency_edges,
                                                beta.narrow(0, c.layer * hq, hq))
                      : counts.repeat_interleave(group, 0));
        Tensor density = key_density(logits, counts.repeat_interleave(group, 0));
        errors[c.layer].add_(budget_output_errors(q, c.k[0], c.v[0], part, pos, density,
                                                  o.budget_grid, mo));
      });
      queries_seen += pos.size(0);
    }
    errors.div_(static_cast<double>(queries_seen));
    Tensor e = errors.to(at::kCPU);
    for (int64_t l = 0; l < layers; ++l) index.layers[l].budget_output_error = e[l].clone();
    r.budget_seconds += seconds_since(phase);
    say(log, absl::StrFormat("[budgets] output-error curves over %d windows x %d queries (%.1f s)",
                             passes, queries_seen / passes, seconds_since(phase)));
  }
  r.total_seconds = seconds_since(start);
  if (report) *report = r;
  return index;
}

}  // namespace

absl::StatusOr<SaapIndex> fit_saap_index(model::CausalLM model, const std::string& model_identity,
                                         const std::vector<int64_t>& ids, const FitOptions& options,
                                         FitReport* report, const Log& log) {
  // The options' checks throw std::invalid_argument, LibTorch's c10::Error.
  return model::torch_status_of(
      [&] { return fit_or_throw(std::move(model), model_identity, ids, options, report, log); });
}

// ---------------------------------------------------------------------------
// routing evaluation

namespace {

// Sums over queries of one method at each l, kept on the device until the end.
struct Sums {
  Tensor recall, valid, selected_mass, routed_mass, kept, visited, routed_visited, queries;
};

class RoutingAccumulator {
 public:
  RoutingAccumulator(std::vector<int64_t> top_l, std::vector<double> budgets,
                     const at::Device& device)
      : top_l_(std::move(top_l)), budgets_(std::move(budgets)), device_(device) {}

  // mass [Hq, nq, C] routed attention per partition; counts [Hq, nq, C]
  // routable keys per partition; scores [Hq, nq, C]; pos int64 [nq].
  void add(const std::string& method, const Tensor& mass, const Tensor& counts,
           const Tensor& scores, const Tensor& density, const Tensor& pos, int64_t always,
           int64_t local_window, int64_t sink_tokens) {
    const int64_t lmax = *std::max_element(top_l_.begin(), top_l_.end());
    Tensor top = std::get<1>(scores.topk(lmax, -1));
    Tensor routed = mass.sum(-1);
    Tensor causal = (pos + 1).to(at::kFloat).view({1, -1});
    Tensor routable = (pos - local_window + 1 - sink_tokens).to(at::kFloat).view({1, -1});
    auto accumulate = [&](int64_t key, const Tensor& sel_mass, const Tensor& sel_keys) {
      Tensor valid = routed > 0;
      Sums& s = sums_[{method, key}];
      auto acc = [&](Tensor& into, const Tensor& value) {
        Tensor v = value.to(at::kDouble).sum();
        into = into.defined() ? into + v : v;
      };
      acc(s.recall, at::where(valid, sel_mass / routed.clamp_min(1e-30), at::zeros_like(routed)));
      acc(s.valid, valid);
      acc(s.selected_mass, sel_mass);
      acc(s.routed_mass, routed);
      acc(s.kept, 1 - routed + sel_mass);
      acc(s.visited, (sel_keys + static_cast<double>(always)) / causal);
      acc(s.routed_visited, sel_keys / routable);
      acc(s.queries, at::ones_like(routed));
    };
    for (int64_t l : top_l_) {
      Tensor sel = top.narrow(-1, 0, l);
      accumulate(l, mass.gather(-1, sel).sum(-1), counts.gather(-1, sel).sum(-1));
    }
    // Key budgets: partitions in decreasing `density` until the selected
    // routable keys reach budget x the query's routable keys (the partition
    // that crosses it is taken).
    Tensor order = std::get<1>(density.sort(-1, /*descending=*/true));
    Tensor sorted_keys = counts.gather(-1, order);
    Tensor sorted_mass = mass.gather(-1, order);
    Tensor before = sorted_keys.cumsum(-1) - sorted_keys;
    for (size_t b = 0; b < budgets_.size(); ++b) {
      Tensor take = before.lt(routable.unsqueeze(-1) * budgets_[b]).to(at::kFloat);
      accumulate(-static_cast<int64_t>(b) - 1, (sorted_mass * take).sum(-1),
                 (sorted_keys * take).sum(-1));
    }
    if (!order_.count(method)) order_[method] = static_cast<int>(order_.size());
  }

  std::vector<RoutingRow> rows() const {
    std::vector<std::pair<int, RoutingRow>> out;
    for (const auto& [key, s] : sums_) {
      RoutingRow r;
      r.method = key.first;
      if (key.second > 0) r.l = key.second;
      else r.key_budget = budgets_[-key.second - 1];
      const double n = s.queries.item<double>();
      r.recall = s.recall.item<double>() / std::max(1.0, s.valid.item<double>());
      r.recall_weighted = s.selected_mass.item<double>() / std::max(1e-30, s.routed_mass.item<double>());
      r.attention_kept = s.kept.item<double>() / n;
      r.keys_visited = s.visited.item<double>() / n;
      r.routed_keys_visited = s.routed_visited.item<double>() / n;
      out.push_back({order_.at(r.method), r});
    }
    std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) {
      if (a.first != b.first) return a.first < b.first;
      if ((a.second.l > 0) != (b.second.l > 0)) return a.second.l > 0;
      return a.second.l != b.second.l ? a.second.l < b.second.l
                                      : a.second.key_budget < b.second.key_budget;
    });
    std::vector<RoutingRow> rows;
    for (auto& [_, r] : out) rows.push_back(r);
    return rows;
  }

 private:
  std::vector<int64_t> top_l_;
  std::vector<double> budgets_;
  at::Device device_;
  std::map<std::pair<std::string, int64_t>, Sums> sums_;
  std::map<std::string, int> order_;
};

RoutingEvalReport evaluate_routing_or_throw(model::CausalLM model, const SaapIndex& index,
                                            const SaapIndex* rope_index,
                                            const std::vector<int64_t>& ids,
                                            const RoutingEvalOptions& o, const Log& log) {
  const auto start = Clock::now();
  const model::AttentionShape cfg = model->attention_shape();
  const SaapHeader& h = index.header;
  check_model_matches(cfg, h, "saap eval --index");
  if (!h.pre_rope_keys())
    throw std::invalid_argument("saap eval: --index was fitted on RoPE'd keys; give it as --rope-index");
  if (rope_index) {
    check_model_matches(cfg, rope_index->header, "saap eval --rope-index");
    if (rope_index->header.pre_rope_keys())
      throw std::invalid_argument("saap eval: --rope-index was fitted on pre-RoPE keys (fit it with --key-space rope)");
    if (rope_index->header.local_window() != h.local_window() ||
        rope_index->header.sink_tokens() != h.sink_tokens())
      throw std::invalid_argument("saap eval: --index and --rope-index differ in local window or sinks");
  }
  if (o.top_l.empty()) throw std::invalid_argument("saap eval: give at least one l");
  const int64_t C = h.partitions();
  for (int64_t l : o.top_l) {
    if (l < 1 || l > C || (rope_index && l > rope_index->header.partitions()))
      throw std::invalid_argument(absl::StrFormat("saap eval: l = %d outside [1, partitions = %d]", l, C));
  }
  const int64_t hq = cfg.heads, hkv = cfg.kv_heads,
                group = hq / hkv, window = h.local_window(), sinks = h.sink_tokens();
  const auto windows = token_windows(ids, o.context, o.max_windows);
  check_windows(windows, window, sinks, "saap eval");
  const at::Device device = model->device();
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);

  struct LayerRouting {
    Tensor centroids;
    QueryClassifier classifier{nullptr};
  };
  auto load_layers = [&](const SaapIndex& idx) {
    std::vector<LayerRouting> out;
    for (const SaapLayer& layer : idx.layers)
      out.push_back({layer.centroids.to(device), load_classifier(layer, device)});
    return out;
  };
  std::vector<LayerRouting> pre = load_layers(index);
  std::vector<LayerRouting> rope = rope_index ? load_layers(*rope_index) : std::vector<LayerRouting>{};

  RoutingAccumulator acc(o.top_l, o.key_budgets, device);
  MassOptions mo;
  mo.local_window = window;
  mo.sink_tokens = sinks;
  const int64_t always = window + sinks;
  RoutingEvalReport report;
  report.local_window = window;
  report.sink_tokens = sinks;
  report.partitions = C;
  Tensor routed_sum;
  int64_t routed_n = 0;
  for (size_t w = 0; w < windows.size(); ++w) {
    const int64_t len = static_cast<int64_t>(windows[w].size());
    Tensor pos = sample_positions(always, len, o.queries_per_window, gen, device);
    const int64_t nq = pos.size(0);
    run_recording(model, windows[w], [&](const model::AttentionCall& c) {
      torch::NoGradGuard no_grad;
      const int l = c.layer;
      Tensor k = c.k[0].to(at::kFloat);
      Tensor q = c.q[0].index_select(1, pos).to(at::kFloat);
      Tensor q_pre = c.q_pre[0].index_select(1, pos).to(at::kFloat);
      // counts: routable keys per partition, per query head; prior: the
      // count prior of count-aware classifiers (recency-weighted where the
      // index has bands).
      auto routing = [&](const Tensor& centroids, const Tensor& key_repr, const SaapIndex& idx,
                         int64_t idx_layer, Tensor* mass, Tensor* counts, Tensor* prior) {
        const int64_t parts = idx.header.partitions();
        Tensor part = assign_to_centroids(key_repr, centroids, KMeansMetric::kEuclidean);
        *mass = partition_attention_mass(q, k, pos, part, parts, mo);
        Tensor kv_counts = routable_key_counts(part, parts, pos, window, sinks);
        *counts = kv_counts.repeat_interleave(group, 0);
        const auto& e = idx.header.recency_edges();
        *prior = log_count_prior(
            e.empty() ? *counts
                      : recency_weighted_counts(kv_counts, part, 0, pos, window, sinks,
                                                std::vector<int64_t>(e.begin(), e.end()),
                                                idx.layers[idx_layer].recency));
      };
      Tensor mass, counts, prior;
      routing(pre[l].centroids, c.k_pre[0].to(at::kFloat), index, l, &mass, &counts, &prior);
      Tensor routed = mass.sum(-1);
      routed_sum = routed_sum.defined() ? routed_sum + routed.to(at::kDouble).sum()
                                        : routed.to(at::kDouble).sum();
      routed_n += routed.numel();
      // density: the order of the key-budget rows, attention per key where
      // the method knows it (count-aware classifiers score it directly).
      auto add = [&](const char* method, const Tensor& m, const Tensor& n, const Tensor& scores,
                     const Tensor& density) {
        acc.add(method, m, n, scores, density, pos, always, window, sinks);
      };
      auto classifier_scores = [&](LayerRouting& r, const SaapIndex& idx, const Tensor& x,
                                   const Tensor& n, const Tensor& log_prior, Tensor* density) {
        Tensor s = r.classifier->forward(x);
        if (idx.header.count_prior()) s += log_prior;
        *density = key_density(s, n);
        return s;
      };
      Tensor density;
      Tensor saap = classifier_scores(pre[l], index, q_pre, counts, prior, &density);
      add("saap", mass, counts, saap, density);
      Tensor sym = centroid_scores(q_pre, pre[l].centroids, CentroidScore::kNegativeDistance);
      add("symmetric", mass, counts, sym, sym);
      Tensor dot = centroid_scores(q_pre, pre[l].centroids, CentroidScore::kDotProduct);
      add("symmetric_dot", mass, counts, dot, dot);
      if (rope_index) {
        Tensor rmass, rcounts, rprior;
        routing(rope[l].centroids, k, *rope_index, l, &rmass, &rcounts, &rprior);
        Tensor rk = centroid_scores(q, rope[l].centroids, CentroidScore::kNegativeDistance);
        add("rope_kmeans", rmass, rcounts, rk, rk);
        Tensor rs = classifier_scores(rope[l], *rope_index, q, rcounts, rprior, &density);
        add("rope_saap", rmass, rcounts, rs, density);
      }
      {
        Tensor part = random_partitions(hkv, len, C, o.seed + 7919 * (w + 1) + l).to(device);
        Tensor rmass = partition_attention_mass(q, k, pos, part, C, mo);
        Tensor rcounts = routable_key_counts(part, C, pos, window, sinks).repeat_interleave(group, 0);
        Tensor r = at::rand({hq, nq, C}, gen).to(device);
        add("random", rmass, rcounts, r, r);
      }
      // The oracle: true top-l masses; for budgets, the most mass per key first.
      add("oracle", mass, counts, mass, key_density(mass.clamp_min(1e-30).log(), counts));
    });
    say(log, absl::StrFormat("[eval] window %d/%d: %d queries per head (%.1f s)", w + 1,
                             windows.size(), nq, seconds_since(start)));
    report.queries_per_head += nq;
  }
  report.windows = static_cast<int64_t>(windows.size());
  report.mean_routed_mass = routed_sum.item<double>() / std::max<int64_t>(1, routed_n);
  report.rows = acc.rows();
  report.seconds = seconds_since(start);
  return report;
}

}  // namespace

absl::StatusOr<RoutingEvalReport> evaluate_routing(model::CausalLM model, const SaapIndex& index,
                                                   const SaapIndex* rope_index,
                                                   const std::vector<int64_t>& ids,
                                                   const RoutingEvalOptions& options,
                                                   const Log& log) {
  return model::torch_status_of([&] {
    return evaluate_routing_or_throw(std::move(model), index, rope_index, ids, options, log);
  });
}

}  // namespace sparseflash::saap
