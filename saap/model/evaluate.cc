// SAAP evaluation. Reading order: options and hooks, perplexity rows, the
// pass-key check, the whole evaluation.
#include "saap/model/evaluate.h"

#include <chrono>
#include <random>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "io/errors.h"
#include "model/torch_status.h"
#include "model/passkey.h"
#include "model/perplexity.h"

namespace sparseflash::saap {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

// ---------------------------------------------------------------------------
// options and hooks

absl::StatusOr<BudgetObjective> parse_budget_objective(const std::string& text) {
  if (text == "output") return BudgetObjective::kOutputError;
  if (text == "attention") return BudgetObjective::kLostAttention;
  return absl::InvalidArgumentError(
      absl::StrCat("--budget-objective: expected output or attention, got \"", text, "\""));
}

absl::StatusOr<Routing> parse_routing(const std::string& text) {
  if (text == "classifier") return Routing::kClassifier;
  if (text == "symmetric") return Routing::kSymmetric;
  if (text == "all") return Routing::kAll;
  if (text == "oracle") return Routing::kOracle;
  return absl::InvalidArgumentError(absl::StrCat(
      "--saap-routing: expected classifier, symmetric, all or oracle, got \"", text, "\""));
}

absl::StatusOr<std::shared_ptr<SaapAttentionHook>> open_saap_hook(
    const std::string& path, const std::string& model_identity, const SaapInferenceOptions& o,
    at::Device device) {
  if (path.empty()) return absl::InvalidArgumentError("--attention saap needs --saap-index FILE");
  auto index = load_saap_index(path, model_identity);
  if (!index.ok()) return index.status();
  if (o.per_head_budgets && o.key_budget <= 0)
    return absl::InvalidArgumentError("--per-head-budgets splits a key budget: give --key-budget");
  if (!(o.mass_threshold >= 0 && o.mass_threshold <= 1))
    return absl::InvalidArgumentError(
        absl::StrCat("--mass-threshold must be in [0, 1], got ", o.mass_threshold));
  if (!(o.key_budget >= 0 && o.key_budget <= 1))
    return absl::InvalidArgumentError(
        absl::StrCat("--key-budget must be in [0, 1], got ", o.key_budget));
  if (o.key_budget == 0 && o.mass_threshold == 0 && o.routing != Routing::kAll &&
      o.top_l > index->header.partitions())
    return absl::InvalidArgumentError(absl::StrCat("--top-l ", o.top_l, " exceeds the index's ",
                                                   index->header.partitions(), " partitions"));
  try {
    return std::make_shared<SaapAttentionHook>(*index, o, device);
  } catch (const std::exception& e) {
    return io::with_context(io::status_from_exception(e), path);
  }
}

std::string describe(const SaapAttentionHook& hook) {
  const SaapInferenceOptions& o = hook.options();
  const std::string selection =
      o.key_budget > 0
          ? absl::StrFormat("key budget %g%s", o.key_budget,
                            o.per_head_budgets
                                ? absl::StrCat(" split per head by ", objective_name(o.budget_objective))
                                : "")
          : absl::StrCat("top-l ", o.top_l);
  return absl::StrFormat("saap (%s, %s of %d partitions, window %d, sinks %d)",
                         routing_name(o.routing), selection, hook.header().partitions(),
                         hook.header().local_window(), hook.header().sink_tokens());
}

std::vector<int64_t> auto_recency_edges(int64_t context, int64_t local_window,
                                        int64_t sink_tokens) {
  std::vector<int64_t> edges;
  for (int64_t e = 32; e + local_window + sink_tokens + 1 <= context; e = 2 * e + 32)
    edges.push_back(e);
  return edges;
}

// ---------------------------------------------------------------------------
// perplexity rows

namespace {

PerplexityRow perplexity_row(model::CausalLM& model, const std::vector<int64_t>& ids,
                             const SaapEvalOptions& o, const std::string& routing, int64_t l,
                             std::shared_ptr<SaapAttentionHook> hook, const Log& log) {
  model->set_attention_hook(hook);
  const auto t = std::chrono::steady_clock::now();
  auto r = model::sliding_window_nll(model, ids, o.context, o.stride);
  model->set_attention_hook(nullptr);
  PerplexityRow row;
  row.routing = routing;
  row.l = l;
  row.tokens = r.tokens;
  row.perplexity = r.perplexity();
  row.mean_nll = r.mean_nll();
  row.seconds = seconds_since(t);
  if (hook) {
    row.sparse = true;
    row.keys_visited = hook->stats().visited_fraction();
    row.routed_keys_visited = hook->stats().routed_fraction();
  }
  if (log)
    log(absl::StrFormat("[perplexity] %s%s: %.4f over %d tokens%s", routing,
                        l ? absl::StrCat(" l=", l) : "", row.perplexity, row.tokens,
                        hook ? absl::StrFormat(", %.2f%% of keys visited", 100 * row.keys_visited)
                             : ""));
  return row;
}

// Dense, then SAAP by key budget, the oracle by key budget, per-head budgets,
// mass thresholds, and SAAP and symmetric routing at each l.
std::vector<PerplexityRow> perplexity_rows(model::CausalLM& model, const SaapIndex& index,
                                           const std::vector<int64_t>& ids,
                                           const SaapEvalOptions& o, const Log& log) {
  const at::Device device = model->device();
  auto hook = [&](const SaapInferenceOptions& so) {
    return std::make_shared<SaapAttentionHook>(index, so, device);
  };
  std::vector<PerplexityRow> rows;
  rows.push_back(perplexity_row(model, ids, o, "dense", 0, nullptr, log));
  for (double b : o.key_budgets) {
    SaapInferenceOptions so;
    so.key_budget = b;
    rows.push_back(perplexity_row(model, ids, o, absl::StrFormat("saap@%g", b), 0, hook(so), log));
  }
  for (double b : o.key_budgets) {
    SaapInferenceOptions so;
    so.key_budget = b;
    so.routing = Routing::kOracle;
    rows.push_back(perplexity_row(model, ids, o, absl::StrFormat("oracle@%g", b), 0, hook(so), log));
  }
  if (o.per_head_budgets) {
    for (const BudgetObjective objective : o.objectives) {
      for (Routing routing : {Routing::kClassifier, Routing::kOracle}) {
        for (double b : o.key_budgets) {
          SaapInferenceOptions so;
          so.key_budget = b;
          so.per_head_budgets = true;
          so.budget_objective = objective;
          so.routing = routing;
          auto h = hook(so);
          int dense = 0, none = 0;
          for (double v : h->head_budgets()) {
            dense += v >= 1;
            none += v <= 0;
          }
          if (log)
            log(absl::StrFormat(
                "[perplexity] per-head budgets (%s) at %g: %d of %d heads dense, %d with no "
                "routed keys, %.2f%% of routable keys planned",
                objective_name(objective), b, dense, h->head_budgets().size(), none,
                100 * h->planned_key_fraction()));
          const std::string name = absl::StrFormat(
              "%s-ph-%s@%g", routing == Routing::kOracle ? "oracle" : "saap",
              objective == BudgetObjective::kOutputError ? "out" : "attn", b);
          rows.push_back(perplexity_row(model, ids, o, name, 0, h, log));
          rows.back().head_budgets = h->head_budgets();
        }
      }
    }
  }
  for (double t : o.mass_thresholds) {
    SaapInferenceOptions so;
    so.mass_threshold = t;
    rows.push_back(perplexity_row(model, ids, o, absl::StrFormat("saap-p%g", t), 0, hook(so), log));
  }
  for (Routing routing : {Routing::kClassifier, Routing::kSymmetric}) {
    for (int64_t v : o.top_l) {
      SaapInferenceOptions so;
      so.top_l = v;
      so.routing = routing;
      rows.push_back(perplexity_row(model, ids, o,
                                    routing == Routing::kClassifier ? "saap" : "symmetric", v,
                                    hook(so), log));
    }
  }
  return rows;
}

// ---------------------------------------------------------------------------
// the pass-key check

// A pass key placed at `depth` of `filler_tokens` tokens of filler, asked for
// at the end; the greedy answer of up to 8 tokens must contain it.
NeedleTrial needle_trial(model::CausalLM& model, const tokenizer::Tokenizer& tokenizer,
                         const std::vector<int64_t>& filler, int64_t filler_tokens, double depth,
                         const std::string& key) {
  const model::PasskeyTrial p =
      model::passkey_trial(model, tokenizer, filler, filler_tokens, depth, key);
  NeedleTrial t;
  t.depth = p.depth;
  t.key = p.key;
  t.answer = p.answer;
  t.found = p.found;
  return t;
}

// Dense, SAAP at each l, and (with per-head budgets) SAAP with the first
// objective at each key budget.
std::vector<NeedleRow> needle_rows(model::CausalLM& model, const tokenizer::Tokenizer& tokenizer,
                                   const SaapIndex& index, const std::vector<int64_t>& filler,
                                   int64_t filler_tokens, const SaapEvalOptions& o, const Log& log) {
  std::mt19937_64 rng(o.seed);
  std::vector<std::string> keys;
  for (int64_t t = 0; t < o.needle_trials; ++t) keys.push_back(std::to_string(10000 + rng() % 90000));
  std::vector<NeedleRow> rows;
  auto run = [&](const std::string& name, int64_t l, std::shared_ptr<SaapAttentionHook> hook) {
    model->set_attention_hook(hook);
    NeedleRow row;
    row.routing = name;
    row.l = l;
    for (double d : o.needle_depths) {
      for (const auto& key : keys) {
        row.details.push_back(needle_trial(model, tokenizer, filler, filler_tokens, d, key));
        row.found += row.details.back().found;
        ++row.trials;
      }
    }
    model->set_attention_hook(nullptr);
    if (log)
      log(absl::StrFormat("[needle] %s%s: %d/%d found", name, l ? absl::StrCat(" l=", l) : "",
                          row.found, row.trials));
    rows.push_back(std::move(row));
  };
  run("dense", 0, nullptr);
  for (int64_t v : o.top_l) {
    SaapInferenceOptions so;
    so.top_l = v;
    run("saap", v, std::make_shared<SaapAttentionHook>(index, so, model->device()));
  }
  if (o.per_head_budgets) {
    for (double b : o.key_budgets) {
      SaapInferenceOptions so;
      so.key_budget = b;
      so.per_head_budgets = true;
      so.budget_objective = o.objectives.front();
      run(absl::StrFormat("saap-ph-%s@%g",
                          so.budget_objective == BudgetObjective::kOutputError ? "out" : "attn", b),
          0, std::make_shared<SaapAttentionHook>(index, so, model->device()));
    }
  }
  return rows;
}

}  // namespace

// ---------------------------------------------------------------------------
// the whole evaluation

namespace {

absl::StatusOr<SaapEvalReport> evaluate_unguarded(model::CausalLM model,
                                                  const tokenizer::Tokenizer* tokenizer,
                                                  const SaapIndex& index, const SaapIndex* rope_index,
                                                  const std::vector<int64_t>& ids,
                                                  const SaapEvalOptions& o, const Log& log) {
  for (int64_t v : o.top_l)
    if (v > index.header.partitions())
      return absl::InvalidArgumentError(absl::StrCat("--top-l ", v, " exceeds the index's ",
                                                     index.header.partitions(), " partitions"));
  if (o.perplexity && o.per_head_budgets && index.header.budget_grid_size() == 0)
    return absl::FailedPreconditionError(
        "--per-head-budgets: the index has no budget curves; refit it");
  if (o.per_head_budgets && o.objectives.empty())
    return absl::InvalidArgumentError("--budget-objective: give output or attention");
  const int64_t filler_tokens = o.context - 64;
  if (o.needle) {
    if (!tokenizer) return absl::InvalidArgumentError("--needle needs --text (filler text), or give --noneedle");
    if (static_cast<int64_t>(ids.size()) - 1 < filler_tokens)
      return absl::InvalidArgumentError(absl::StrFormat(
          "--needle: the text gives %d tokens, the check needs %d of filler",
          static_cast<int64_t>(ids.size()) - 1,
          filler_tokens));
  }
  SaapEvalReport report;
  RoutingEvalOptions ro;
  ro.context = o.context;
  ro.max_windows = o.max_windows;
  ro.queries_per_window = o.queries_per_window;
  ro.top_l = o.top_l;
  ro.key_budgets = o.key_budgets;
  ro.seed = o.seed;
  auto routing = evaluate_routing(model, index, rope_index, ids, ro, log);
  if (!routing.ok()) return routing.status();
  report.routing = *std::move(routing);
  if (o.perplexity) {
    std::vector<int64_t> scored = ids;
    if (o.perplexity_tokens > 0 && static_cast<int64_t>(scored.size()) > o.perplexity_tokens)
      scored.resize(o.perplexity_tokens);
    report.perplexity = perplexity_rows(model, index, scored, o, log);
  }
  if (o.needle) {
    const std::vector<int64_t> filler(ids.begin() + 1, ids.end());  // no BOS
    report.needle = needle_rows(model, *tokenizer, index, filler, filler_tokens, o, log);
  }
  return report;
}

}  // namespace

absl::StatusOr<SaapEvalReport> evaluate_saap(model::CausalLM model,
                                             const tokenizer::Tokenizer* tokenizer,
                                             const SaapIndex& index, const SaapIndex* rope_index,
                                             const std::vector<int64_t>& ids,
                                             const SaapEvalOptions& options, const Log& log) {
  return model::torch_status_of([&] {  // LibTorch's checks (c10::Error) on the way
    return evaluate_unguarded(std::move(model), tokenizer, index, rope_index, ids, options, log);
  });
}

}  // namespace sparseflash::saap
