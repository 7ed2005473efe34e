// `sparseflash saap fit` and `sparseflash saap eval`: fitting a SAAP index on a
// loaded Llama and measuring it (routing recall and keys visited against the
// baselines, perplexity against dense, a pass-key retrieval check).
// Reading order: flags, fit, eval (routing, perplexity, needle), entry point.
#include "launch/saap_commands.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/cuda.h>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "launch/llama_commands.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"
#include "saap/calibrate.h"
#include "saap/index.h"
#include "saap/inference.h"
#include "saap/targets.h"

ABSL_DECLARE_FLAG(std::string, saap_index);
ABSL_DECLARE_FLAG(int64_t, context);
ABSL_DECLARE_FLAG(int64_t, stride);
ABSL_DECLARE_FLAG(std::string, json_file);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(std::string, data);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(bool, per_head_budgets);
ABSL_DECLARE_FLAG(std::string, budget_objective);

ABSL_FLAG(int64_t, partitions, 256, "saap fit: key partitions (k-means centroids) per KV head.");
ABSL_FLAG(int64_t, classifier_hidden, 256, "saap fit: hidden width of each query head's MLP.");
ABSL_FLAG(int64_t, local_window, 64,
          "saap fit: always-attended most recent keys (>= 1); the targets exclude them.");
ABSL_FLAG(int64_t, sink_tokens, 4, "saap fit: always-attended first keys of the context.");
ABSL_FLAG(int64_t, kmeans_keys, 65536, "saap fit: keys per KV head given to k-means.");
ABSL_FLAG(int64_t, kmeans_iterations, 25, "saap fit: Lloyd iterations at most.");
ABSL_FLAG(int64_t, queries_per_window, 1024,
          "saap fit / eval: query positions sampled per window (every head and layer).");
ABSL_FLAG(int64_t, classifier_steps, 2000, "saap fit: AdamW steps of the classifiers.");
ABSL_FLAG(bool, weight_by_mass, true,
          "saap fit: weight each query's loss by the attention mass it sends beyond the local "
          "window and sinks.");
ABSL_FLAG(bool, count_prior, true,
          "saap fit: classifiers score attention per key; the log of each partition's key "
          "count is added to their logits (in training and at inference).");
ABSL_FLAG(std::string, recency_bands, "auto",
          "saap fit: ages (tokens beyond the local window, ascending) that cut the routable keys "
          "into recency bands; the count prior then weights each band's keys by the attention "
          "per key measured for it, per head (docs/saap.md). \"auto\": 32, 96, 224, 480, ... "
          "(each band twice the previous one) while the calibration context can measure the "
          "oldest band; \"none\": the plain count prior.");
ABSL_FLAG(std::string, budget_grid, "0,0.005,0.01,0.02,0.035,0.05,0.075,0.1,0.15,0.2,0.3,0.45,0.7,1",
          "saap fit: fractions of the routable keys (ascending) at which each query head's lost "
          "attention is measured on held-out queries and stored, for --per-head-budgets at "
          "inference; \"none\" stores no curves.");
ABSL_FLAG(int64_t, budget_windows, 4,
          "saap fit: calibration windows of the last pass that measures each head's "
          "attention-output error at every --budget-grid value (through the trained classifiers).");
ABSL_FLAG(int64_t, budget_queries_per_window, 256,
          "saap fit: query positions sampled per window in that pass.");
ABSL_FLAG(int64_t, windows, 0,
          "saap fit / eval: windows of --context tokens used at most (0 = all the text gives).");
ABSL_FLAG(std::string, key_space, "pre-rope",
          "saap fit: pre-rope (SAAP) or rope (the RoPE'd-keys baseline, for saap eval "
          "--rope-index).");
ABSL_FLAG(std::string, rope_index, "",
          "saap eval: an index fitted with --key-space rope, for the RoPE'd k-means baseline.");
ABSL_FLAG(bool, perplexity, true,
          "saap eval: also sliding-window perplexity, dense and with SAAP at each --top-l.");
ABSL_FLAG(std::string, key_budgets, "0.025,0.05,0.1,0.2",
          "saap eval: also select by these key budgets (fractions of the routable keys, "
          "partitions in decreasing attention per key), in the routing table and perplexity.");
ABSL_FLAG(std::string, mass_thresholds, "0.5,0.7,0.9",
          "saap eval: also perplexity with SAAP selecting, per query, the fewest partitions whose "
          "predicted share of the routed attention reaches each of these values.");
ABSL_FLAG(int64_t, perplexity_tokens, 65536, "saap eval: tokens scored for perplexity (0 = all).");
ABSL_FLAG(bool, needle, true,
          "saap eval: also the pass-key retrieval check, dense and with SAAP at each --top-l "
          "(and each --key-budgets value with --per-head-budgets).");
ABSL_FLAG(std::string, needle_depths, "0.1,0.3,0.5,0.7,0.9",
          "saap eval: where the pass key sits in the filler, as fractions of it.");
ABSL_FLAG(int64_t, needle_trials, 3, "saap eval: pass keys tried at each depth.");

namespace sparseflash::saap_commands {
namespace {

using nlohmann::json;
using llama_commands::command_error;

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

void log_line(const std::string& line) { std::cerr << line << "\n" << std::flush; }

// A comma-separated list of fractions in [lo, 1] (lo excluded when open).
absl::StatusOr<std::vector<double>> parse_fractions(const std::string& text, const char* flag,
                                                    bool zero_allowed) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || !(zero_allowed ? v >= 0 : v > 0) || !(v <= 1))
      return absl::InvalidArgumentError(absl::StrCat(
          flag, ": expected fractions in ", zero_allowed ? "[0, 1]" : "(0, 1]", ", got \"", text,
          "\""));
    out.push_back(v);
  }
  return out;
}

absl::Status write_json(const json& j) {
  const std::string path = absl::GetFlag(FLAGS_json_file);
  if (path.empty()) return absl::OkStatus();
  return llama_commands::write_file(path, j.dump(2) + "\n");
}

// ---------------------------------------------------------------------------
// fit

int fit() {
  const char* cmd = "saap fit";
  const std::string out = absl::GetFlag(FLAGS_saap_index);
  if (out.empty()) return command_error(cmd, "--saap-index FILE (the index to write) is required");
  const std::string key_space = absl::GetFlag(FLAGS_key_space);
  if (key_space != "pre-rope" && key_space != "rope")
    return command_error(cmd, absl::StrCat("--key-space: expected pre-rope or rope, got \"",
                                           key_space, "\""));
  saap::FitOptions o;
  o.context = absl::GetFlag(FLAGS_context);
  o.max_windows = absl::GetFlag(FLAGS_windows);
  o.partitions = absl::GetFlag(FLAGS_partitions);
  o.hidden = absl::GetFlag(FLAGS_classifier_hidden);
  o.local_window = absl::GetFlag(FLAGS_local_window);
  o.sink_tokens = absl::GetFlag(FLAGS_sink_tokens);
  o.kmeans_keys = absl::GetFlag(FLAGS_kmeans_keys);
  o.kmeans_iterations = absl::GetFlag(FLAGS_kmeans_iterations);
  o.queries_per_window = absl::GetFlag(FLAGS_queries_per_window);
  o.pre_rope_keys = key_space == "pre-rope";
  o.train.steps = absl::GetFlag(FLAGS_classifier_steps);
  o.train.weight_by_mass = absl::GetFlag(FLAGS_weight_by_mass);
  o.count_prior = absl::GetFlag(FLAGS_count_prior);
  o.train.recall_at = {4, 8, 16, 32};
  o.seed = absl::GetFlag(FLAGS_seed);
  o.train.seed = o.seed;
  if (o.context < 2) return command_error(cmd, "--context must be >= 2");
  o.train.recall_at.erase(std::remove_if(o.train.recall_at.begin(), o.train.recall_at.end(),
                                         [&](int64_t l) { return l > o.partitions; }),
                          o.train.recall_at.end());
  if (o.train.recall_at.empty()) o.train.recall_at = {1};
  if (o.train.steps < 1) return command_error(cmd, "--classifier-steps must be >= 1");
  if (absl::GetFlag(FLAGS_budget_grid) == "none") {
    o.budget_grid.clear();
  } else {
    auto grid = parse_fractions(absl::GetFlag(FLAGS_budget_grid), "--budget-grid", true);
    if (!grid.ok()) return command_error(cmd, std::string(grid.status().message()));
    try {
      saap::check_budget_grid(*grid, "--budget-grid");
    } catch (const std::invalid_argument& e) {
      return command_error(cmd, e.what());
    }
    o.budget_grid = *grid;
  }
  o.budget_windows = absl::GetFlag(FLAGS_budget_windows);
  o.budget_queries_per_window = absl::GetFlag(FLAGS_budget_queries_per_window);
  if (o.budget_windows < 1 || o.budget_queries_per_window < 1)
    return command_error(cmd, "--budget-windows and --budget-queries-per-window must be >= 1");
  const std::string bands = absl::GetFlag(FLAGS_recency_bands);
  if (bands == "auto") {
    if (o.count_prior) {
      for (int64_t e = 32; e + o.local_window + o.sink_tokens + 1 <= o.context; e = 2 * e + 32)
        o.recency_edges.push_back(e);
    }
  } else if (bands != "none") {
    for (absl::string_view part :
         absl::StrSplit(absl::GetFlag(FLAGS_recency_bands), ',', absl::SkipWhitespace())) {
      int64_t e = 0;
      if (!absl::SimpleAtoi(part, &e))
        return command_error(cmd, absl::StrCat("--recency-bands: \"", part,
                                               "\" is not a whole number of tokens"));
      o.recency_edges.push_back(e);
    }
    if (o.recency_edges.empty())
      return command_error(cmd, "--recency-bands: give band edges (for example 128,384,896) or none");
    try {
      saap::check_recency_edges(o.recency_edges, "--recency-bands");
    } catch (const std::invalid_argument& e) {
      return command_error(cmd, e.what());
    }
    if (!o.count_prior) return command_error(cmd, "--recency-bands needs --count_prior");
  }

  const auto start = std::chrono::steady_clock::now();
  auto loaded = llama_commands::load_model(!absl::GetFlag(FLAGS_text).empty());
  if (!loaded.ok()) return command_error(cmd, std::string(loaded.status().message()));
  if (loaded->saap) return command_error(cmd, "fit runs the model densely; drop --attention saap");
  std::cerr << "model: " << llama_commands::describe_model(*loaded) << "\n";
  std::string source;
  auto ids = llama_commands::read_input_tokens(*loaded, &source);
  if (!ids.ok()) return command_error(cmd, std::string(ids.status().message()));
  o.calibration_data = absl::StrFormat("%s (%d tokens)", source, ids->size());
  const double load_seconds = seconds_since(start);

  saap::FitReport r;
  saap::SaapIndex index = saap::fit_saap_index(loaded->model, loaded->checkpoint.identity, *ids,
                                               o, &r, log_line);
  auto st = saap::write_saap_index(out, index);
  if (!st.ok()) return command_error(cmd, std::string(st.message()));

  // Mean over heads of each band's log weight (newest band first).
  json recency_mean = nullptr;
  if (r.recency_log_weights.defined()) {
    at::Tensor mean = r.recency_log_weights.mean(0).contiguous();
    recency_mean = std::vector<float>(mean.data_ptr<float>(), mean.data_ptr<float>() + mean.numel());
  }
  json recall = json::array();
  for (size_t i = 0; i < r.classifier.recall_at.size(); ++i)
    recall.push_back({{"l", r.classifier.recall_at[i]},
                      {"recall", r.classifier.recall[i]},
                      {"oracle", r.classifier.oracle_recall[i]}});
  json j = {{"index", out},
            {"model", loaded->checkpoint.path},
            {"model_identity", loaded->checkpoint.identity},
            {"source", source},
            {"key_space", key_space},
            {"device", loaded->device.str()},
            {"context", o.context},
            {"windows", r.windows},
            {"tokens", r.tokens},
            {"partitions", o.partitions},
            {"classifier_hidden", o.hidden},
            {"local_window", o.local_window},
            {"sink_tokens", o.sink_tokens},
            {"kmeans_keys_per_head", r.keys_per_head},
            {"kmeans_iterations", r.kmeans_iterations},
            {"kmeans_converged", r.kmeans_converged},
            {"partition_sizes", {r.smallest_partition, r.largest_partition}},
            {"queries_per_head", r.queries_per_head},
            {"classifier_steps", o.train.steps},
            {"weight_by_mass", o.train.weight_by_mass},
            {"count_prior", o.count_prior},
            {"train_kl", r.classifier.train_kl},
            {"holdout_kl", r.classifier.holdout_kl},
            {"holdout_recall", recall},
            {"recency_bands", o.recency_edges},
            {"recency_log_weights_mean", recency_mean},
            {"budget_grid", o.budget_grid},
            {"budget_windows", o.budget_windows},
            {"budget_queries_per_window", o.budget_queries_per_window},
            {"seconds",
             {{"load", load_seconds},
              {"capture_keys", r.capture_seconds},
              {"kmeans", r.kmeans_seconds},
              {"targets", r.targets_seconds},
              {"classifiers", r.train_seconds},
              {"budget_curves", r.budget_seconds},
              {"fit_total", r.total_seconds}}}};
  st = write_json(j);
  if (!st.ok()) return command_error(cmd, std::string(st.message()));
  std::cout << absl::StrFormat(
      "wrote %s: %d layers x %d KV heads x %d partitions (%s keys), classifiers for %d query "
      "heads\n",
      out, index.header.num_layers(), index.header.num_kv_heads(), o.partitions, key_space,
      index.header.num_query_heads());
  std::cout << absl::StrFormat(
      "time: load %.1f s, keys %.1f s, k-means %.1f s, targets %.1f s, classifiers %.1f s; fit "
      "%.1f s\n",
      load_seconds, r.capture_seconds, r.kmeans_seconds, r.targets_seconds, r.train_seconds,
      r.total_seconds);
  for (size_t i = 0; i < r.classifier.recall_at.size(); ++i)
    std::cout << absl::StrFormat("held-out recall@%d: %.4f (oracle %.4f)\n",
                                 r.classifier.recall_at[i], r.classifier.recall[i],
                                 r.classifier.oracle_recall[i]);
  return 0;
}

// ---------------------------------------------------------------------------
// eval

struct NeedleTrial {
  double depth = 0;
  std::string key;
  std::string answer;
  bool found = false;
};

// A pass key placed at `depth` of `filler_tokens` tokens of filler, asked for
// at the end; greedy answer of up to 8 tokens must contain it.
NeedleTrial needle_trial(llama_commands::LoadedModel& l, const std::vector<int64_t>& filler,
                         int64_t filler_tokens, double depth, const std::string& key) {
  auto encode = [&](const std::string& s) {
    auto v = l.tokenizer->encode(s, /*add_bos=*/false);
    return std::vector<int64_t>(v.begin(), v.end());
  };
  auto bos = l.tokenizer->encode("", /*add_bos=*/true);  // [BOS] or nothing
  std::vector<int64_t> prompt(bos.begin(), bos.end());
  const auto needle = encode(absl::StrCat("\nThe pass key is ", key, ". Remember it. ", key,
                                          " is the pass key.\n"));
  const auto question = encode("\nWhat is the pass key? The pass key is");
  const int64_t at = static_cast<int64_t>(depth * filler_tokens);
  prompt.insert(prompt.end(), filler.begin(), filler.begin() + at);
  prompt.insert(prompt.end(), needle.begin(), needle.end());
  prompt.insert(prompt.end(), filler.begin() + at, filler.begin() + filler_tokens);
  prompt.insert(prompt.end(), question.begin(), question.end());
  model::SamplingOptions s;  // greedy
  model::CausalLM lm = model::as_causal_lm(l.model);
  auto out = model::generate(lm, prompt, 8, s).ids;
  std::vector<int32_t> ids32(out.begin(), out.end());
  NeedleTrial t;
  t.depth = depth;
  t.key = key;
  t.answer = l.tokenizer->decode(ids32);
  t.found = t.answer.find(key) != std::string::npos;
  return t;
}

int eval() {
  const char* cmd = "saap eval";
  const std::string index_path = absl::GetFlag(FLAGS_saap_index);
  if (index_path.empty()) return command_error(cmd, "--saap-index FILE is required");
  auto top_l = llama_commands::parse_top_l_flag();
  if (!top_l.ok()) return command_error(cmd, std::string(top_l.status().message()));
  auto depths = parse_fractions(absl::GetFlag(FLAGS_needle_depths), "--needle-depths", true);
  auto budgets = parse_fractions(absl::GetFlag(FLAGS_key_budgets), "--key-budgets", false);
  auto thresholds =
      parse_fractions(absl::GetFlag(FLAGS_mass_thresholds), "--mass-thresholds", false);
  for (const auto* list : {&depths, &budgets, &thresholds})
    if (!list->ok()) return command_error(cmd, std::string(list->status().message()));
  std::vector<saap::BudgetObjective> objectives;
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_budget_objective), ',', absl::SkipWhitespace())) {
    auto objective = llama_commands::parse_budget_objective(std::string(part));
    if (!objective.ok()) return command_error(cmd, std::string(objective.status().message()));
    objectives.push_back(*objective);
  }
  if (objectives.empty()) return command_error(cmd, "--budget-objective: give output or attention");
  const int64_t context = absl::GetFlag(FLAGS_context);
  int64_t stride = absl::GetFlag(FLAGS_stride);
  if (stride == 0) stride = std::max<int64_t>(1, context / 2);
  if (stride < 1 || stride > context)
    return command_error(cmd, absl::StrCat("--stride must be in [1, --context]"));
  const bool need_tokenizer = !absl::GetFlag(FLAGS_text).empty() || absl::GetFlag(FLAGS_needle);
  if (absl::GetFlag(FLAGS_needle) && absl::GetFlag(FLAGS_text).empty())
    return command_error(cmd, "--needle needs --text (filler text), or give --noneedle");

  auto loaded = llama_commands::load_model(need_tokenizer);
  if (!loaded.ok()) return command_error(cmd, std::string(loaded.status().message()));
  llama_commands::LoadedModel& l = *loaded;
  if (l.saap) return command_error(cmd, "give the index with --saap-index; drop --attention saap");
  std::cerr << "model: " << llama_commands::describe_model(l) << "\n";
  auto index = saap::load_saap_index(index_path, l.checkpoint.identity);
  if (!index.ok()) return command_error(cmd, std::string(index.status().message()));
  std::optional<saap::SaapIndex> rope_index;
  if (!absl::GetFlag(FLAGS_rope_index).empty()) {
    auto r = saap::load_saap_index(absl::GetFlag(FLAGS_rope_index), l.checkpoint.identity);
    if (!r.ok()) return command_error(cmd, std::string(r.status().message()));
    rope_index = std::move(*r);
  }
  for (int64_t v : *top_l)
    if (v > index->header.partitions())
      return command_error(cmd, absl::StrCat("--top-l ", v, " exceeds the index's ",
                                             index->header.partitions(), " partitions"));
  std::string source;
  auto ids = llama_commands::read_input_tokens(l, &source);
  if (!ids.ok()) return command_error(cmd, std::string(ids.status().message()));

  // routing
  saap::RoutingEvalOptions ro;
  ro.context = context;
  ro.max_windows = absl::GetFlag(FLAGS_windows);
  ro.queries_per_window = absl::GetFlag(FLAGS_queries_per_window);
  ro.top_l = *top_l;
  ro.key_budgets = *budgets;
  ro.seed = absl::GetFlag(FLAGS_seed);
  auto routing = saap::evaluate_routing(l.model, *index, rope_index ? &*rope_index : nullptr,
                                        *ids, ro, log_line);
  json rows = json::array();
  for (const auto& r : routing.rows)
    rows.push_back({{"method", r.method},
                    {"l", r.l},
                    {"key_budget", r.key_budget},
                    {"recall", r.recall},
                    {"recall_weighted", r.recall_weighted},
                    {"attention_kept", r.attention_kept},
                    {"keys_visited", r.keys_visited},
                    {"routed_keys_visited", r.routed_keys_visited}});
  json j = {{"model", l.checkpoint.path},
            {"model_identity", l.checkpoint.identity},
            {"index", index_path},
            {"rope_index", absl::GetFlag(FLAGS_rope_index)},
            {"source", source},
            {"device", l.device.str()},
            {"context", context},
            {"partitions", routing.partitions},
            {"local_window", routing.local_window},
            {"sink_tokens", routing.sink_tokens},
            {"routing",
             {{"windows", routing.windows},
              {"queries_per_head", routing.queries_per_head},
              {"mean_routed_mass", routing.mean_routed_mass},
              {"seconds", routing.seconds},
              {"rows", rows}}}};

  // perplexity: dense, then SAAP and symmetric routing at each l
  json ppl = json::array();
  if (absl::GetFlag(FLAGS_perplexity)) {
    std::vector<int64_t> scored = *ids;
    const int64_t cap = absl::GetFlag(FLAGS_perplexity_tokens);
    if (cap > 0 && static_cast<int64_t>(scored.size()) > cap) scored.resize(cap);
    auto run = [&](const std::string& routing_name, int64_t l_value,
                   std::shared_ptr<saap::SaapAttentionHook> hook) {
      l.model->set_attention_hook(hook);
      const auto t = std::chrono::steady_clock::now();
      model::CausalLM lm = model::as_causal_lm(l.model);
      auto r = model::sliding_window_nll(lm, scored, context, stride);
      l.model->set_attention_hook(nullptr);
      json row = {{"routing", routing_name}, {"l", l_value},       {"tokens", r.tokens},
                  {"perplexity", r.perplexity()}, {"mean_nll", r.mean_nll()},
                  {"seconds", seconds_since(t)}};
      if (hook) {
        row["keys_visited"] = hook->stats().visited_fraction();
        row["routed_keys_visited"] = hook->stats().routed_fraction();
      }
      log_line(absl::StrFormat("[perplexity] %s%s: %.4f over %d tokens%s", routing_name.c_str(),
                               l_value ? absl::StrCat(" l=", l_value) : "", r.perplexity(),
                               r.tokens,
                               hook ? absl::StrFormat(", %.2f%% of keys visited",
                                                      100 * hook->stats().visited_fraction())
                                    : ""));
      ppl.push_back(row);
    };
    run("dense", 0, nullptr);
    for (double b : *budgets) {
      saap::SaapInferenceOptions so;
      so.key_budget = b;
      run(absl::StrFormat("saap@%g", b).c_str(), 0,
          std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
    }
    for (double b : *budgets) {
      saap::SaapInferenceOptions so;
      so.key_budget = b;
      so.routing = saap::Routing::kOracle;
      run(absl::StrFormat("oracle@%g", b), 0,
          std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
    }
    if (absl::GetFlag(FLAGS_per_head_budgets)) {
      if (index->header.budget_grid_size() == 0)
        return command_error(cmd, "--per-head-budgets: the index has no budget curves; refit it");
      for (const saap::BudgetObjective objective : objectives) {
        for (saap::Routing routing_kind : {saap::Routing::kClassifier, saap::Routing::kOracle}) {
          for (double b : *budgets) {
            saap::SaapInferenceOptions so;
            so.key_budget = b;
            so.per_head_budgets = true;
            so.budget_objective = objective;
            so.routing = routing_kind;
            auto hook = std::make_shared<saap::SaapAttentionHook>(*index, so, l.device);
            int dense = 0, none = 0;
            for (double v : hook->head_budgets()) {
              dense += v >= 1;
              none += v <= 0;
            }
            log_line(absl::StrFormat(
                "[perplexity] per-head budgets (%s) at %g: %d of %d heads dense, %d with no routed "
                "keys, %.2f%% of routable keys planned",
                saap::objective_name(objective), b, dense, hook->head_budgets().size(), none,
                100 * hook->planned_key_fraction()));
            run(absl::StrFormat("%s-ph-%s@%g",
                                routing_kind == saap::Routing::kOracle ? "oracle" : "saap",
                                objective == saap::BudgetObjective::kOutputError ? "out" : "attn",
                                b),
                0, hook);
            ppl.back()["head_budgets"] = hook->head_budgets();
          }
        }
      }
    }
    for (double t : *thresholds) {
      saap::SaapInferenceOptions so;
      so.mass_threshold = t;
      run(absl::StrFormat("saap-p%g", t), 0,
          std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
    }
    for (saap::Routing routing_kind : {saap::Routing::kClassifier, saap::Routing::kSymmetric}) {
      for (int64_t v : *top_l) {
        saap::SaapInferenceOptions so;
        so.top_l = v;
        so.routing = routing_kind;
        run(routing_kind == saap::Routing::kClassifier ? "saap" : "symmetric", v,
            std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
      }
    }
  }
  j["perplexity"] = ppl;

  // needle: pass keys in filler of the eval text, asked for at the end
  json needle = json::array();
  if (absl::GetFlag(FLAGS_needle)) {
    const int64_t filler_tokens = context - 64;
    std::vector<int64_t> filler(ids->begin() + 1, ids->end());  // no BOS
    if (static_cast<int64_t>(filler.size()) < filler_tokens)
      return command_error(cmd, absl::StrFormat("--needle: the text gives %d tokens, the check "
                                                "needs %d of filler", filler.size(), filler_tokens));
    std::mt19937_64 rng(absl::GetFlag(FLAGS_seed));
    std::vector<std::string> keys;
    for (int64_t t = 0; t < absl::GetFlag(FLAGS_needle_trials); ++t)
      keys.push_back(std::to_string(10000 + rng() % 90000));
    auto run = [&](const char* name, int64_t l_value, std::shared_ptr<saap::SaapAttentionHook> hook) {
      l.model->set_attention_hook(hook);
      int found = 0, total = 0;
      json trials = json::array();
      for (double d : *depths) {
        for (const auto& key : keys) {
          auto t = needle_trial(l, filler, filler_tokens, d, key);
          found += t.found;
          ++total;
          trials.push_back({{"depth", d}, {"key", key}, {"answer", t.answer}, {"found", t.found}});
        }
      }
      l.model->set_attention_hook(nullptr);
      log_line(absl::StrFormat("[needle] %s%s: %d/%d found", name,
                               l_value ? absl::StrCat(" l=", l_value) : "", found, total));
      needle.push_back({{"routing", name}, {"l", l_value}, {"found", found}, {"trials", total},
                        {"details", trials}});
    };
    run("dense", 0, nullptr);
    for (int64_t v : *top_l) {
      saap::SaapInferenceOptions so;
      so.top_l = v;
      run("saap", v, std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
    }
    if (absl::GetFlag(FLAGS_per_head_budgets)) {
      // Per-head budgets with the first objective, at each key budget.
      for (double b : *budgets) {
        saap::SaapInferenceOptions so;
        so.key_budget = b;
        so.per_head_budgets = true;
        so.budget_objective = objectives.front();
        const std::string name = absl::StrFormat(
            "saap-ph-%s@%g",
            objectives.front() == saap::BudgetObjective::kOutputError ? "out" : "attn", b);
        run(name.c_str(), 0, std::make_shared<saap::SaapAttentionHook>(*index, so, l.device));
      }
    }
  }
  j["needle"] = needle;
  auto st = write_json(j);
  if (!st.ok()) return command_error(cmd, std::string(st.message()));

  // The table.
  std::cout << absl::StrFormat(
      "routing on %s: %d windows of %d tokens, %d queries per head; C = %d, window %d, sinks "
      "%d; mean routed mass %.3f\n",
      source, routing.windows, context, routing.queries_per_head, routing.partitions,
      routing.local_window, routing.sink_tokens, routing.mean_routed_mass);
  std::cout << absl::StrFormat("%-14s %6s %8s %9s %8s %9s %9s\n", "method", "l|kb", "recall",
                               "recall_w", "kept", "visited", "routed_v");
  for (const auto& r : routing.rows)
    std::cout << absl::StrFormat("%-14s %6s %8.4f %9.4f %8.4f %8.2f%% %8.2f%%\n", r.method,
                                 r.l > 0 ? absl::StrCat(r.l)
                                         : absl::StrFormat("%.1f%%", 100 * r.key_budget),
                                 r.recall, r.recall_weighted, r.attention_kept,
                                 100 * r.keys_visited, 100 * r.routed_keys_visited);
  for (const auto& row : ppl)
    std::cout << absl::StrFormat(
        "perplexity %-9s l=%-3d %.4f%s\n", row["routing"].get<std::string>(),
        row["l"].get<int64_t>(), row["perplexity"].get<double>(),
        row.contains("keys_visited")
            ? absl::StrFormat("  (%.2f%% keys visited)", 100 * row["keys_visited"].get<double>())
            : "");
  for (const auto& row : needle)
    std::cout << absl::StrFormat("needle %-9s l=%-3d %d/%d\n", row["routing"].get<std::string>(),
                                 row["l"].get<int64_t>(), row["found"].get<int>(),
                                 row["trials"].get<int>());
  return 0;
}

}  // namespace

const std::vector<std::string>& saap_flags() {
  static const std::vector<std::string> f = {
      "model", "tokenizer", "text", "data", "max_tokens", "context", "stride", "saap_index",
      "rope_index", "partitions", "classifier_hidden", "local_window", "sink_tokens",
      "kmeans_keys", "kmeans_iterations", "queries_per_window", "classifier_steps",
      "weight_by_mass", "count_prior", "recency_bands", "windows", "key_space", "top_l", "perplexity",
      "perplexity_tokens", "key_budgets", "per_head_budgets", "budget_objective", "budget_grid",
      "budget_windows", "budget_queries_per_window", "mass_thresholds", "needle", "needle_depths",
      "needle_trials", "dtype", "device", "seed", "json_file"};
  return f;
}

int run_saap(const std::vector<std::string>& positional) {
  if (positional.size() != 1 || (positional[0] != "fit" && positional[0] != "eval"))
    return command_error("saap", "expected `saap fit` or `saap eval` (see sparseflash saap --help)");
  const bool is_fit = positional[0] == "fit";
  try {
    return is_fit ? fit() : eval();
  } catch (const std::exception& e) {
    return command_error(is_fit ? "saap fit" : "saap eval", llama_commands::error_message(e));
  }
}

}  // namespace sparseflash::saap_commands
