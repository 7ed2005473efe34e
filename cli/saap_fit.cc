// `sparseflash saap fit`: fit a SAAP index (key partitions + query
// classifiers) on calibration text with saap::fit_saap_index, write it and
// report; also the `saap` command that dispatches to fit or eval.
#include <algorithm>
#include <chrono>
#include <iostream>
#include <stdexcept>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/command.h"
#include "cli/model_flags.h"
#include "cli/saap.h"
#include "saap/model/calibrate.h"
#include "saap/targets.h"

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

ABSL_DECLARE_FLAG(std::string, saap_index);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int64_t, context);
ABSL_DECLARE_FLAG(uint64_t, seed);

namespace sparseflash::cli {
namespace {

using nlohmann::json;

void log_line(const std::string& line) { std::cerr << line << "\n" << std::flush; }

// --budget-grid: ascending fractions in [0, 1], or "none".
absl::StatusOr<std::vector<double>> budget_grid_from_flags() {
  const std::string text = absl::GetFlag(FLAGS_budget_grid);
  std::vector<double> grid;
  if (text == "none") return grid;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || !(v >= 0 && v <= 1))
      return absl::InvalidArgumentError(
          absl::StrCat("--budget-grid: expected fractions in [0, 1], got \"", text, "\""));
    grid.push_back(v);
  }
  try {
    saap::check_budget_grid(grid, "--budget-grid");
  } catch (const std::invalid_argument& e) {
    return absl::InvalidArgumentError(e.what());
  }
  return grid;
}

// --recency-bands: "auto", "none" or ascending whole numbers of tokens.
absl::Status recency_bands_from_flags(saap::FitOptions* o) {
  const std::string bands = absl::GetFlag(FLAGS_recency_bands);
  if (bands == "none") return absl::OkStatus();
  if (bands == "auto") {
    if (o->count_prior)
      o->recency_edges = saap::auto_recency_edges(o->context, o->local_window, o->sink_tokens);
    return absl::OkStatus();
  }
  for (absl::string_view part : absl::StrSplit(bands, ',', absl::SkipWhitespace())) {
    int64_t e = 0;
    if (!absl::SimpleAtoi(part, &e))
      return absl::InvalidArgumentError(
          absl::StrCat("--recency-bands: \"", part, "\" is not a whole number of tokens"));
    o->recency_edges.push_back(e);
  }
  if (o->recency_edges.empty())
    return absl::InvalidArgumentError(
        "--recency-bands: give band edges (for example 128,384,896) or none");
  try {
    saap::check_recency_edges(o->recency_edges, "--recency-bands");
  } catch (const std::invalid_argument& e) {
    return absl::InvalidArgumentError(e.what());
  }
  if (!o->count_prior) return absl::InvalidArgumentError("--recency-bands needs --count_prior");
  return absl::OkStatus();
}

absl::StatusOr<saap::FitOptions> fit_options_from_flags() {
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
  o.pre_rope_keys = absl::GetFlag(FLAGS_key_space) == "pre-rope";
  o.train.steps = absl::GetFlag(FLAGS_classifier_steps);
  o.train.weight_by_mass = absl::GetFlag(FLAGS_weight_by_mass);
  o.count_prior = absl::GetFlag(FLAGS_count_prior);
  o.seed = absl::GetFlag(FLAGS_seed);
  o.train.seed = o.seed;
  if (o.context < 2) return absl::InvalidArgumentError("--context must be >= 2");
  for (int64_t l : {4, 8, 16, 32})
    if (l <= o.partitions) o.train.recall_at.push_back(l);
  if (o.train.recall_at.empty()) o.train.recall_at = {1};
  if (o.train.steps < 1) return absl::InvalidArgumentError("--classifier-steps must be >= 1");
  auto grid = budget_grid_from_flags();
  if (!grid.ok()) return grid.status();
  o.budget_grid = *grid;
  o.budget_windows = absl::GetFlag(FLAGS_budget_windows);
  o.budget_queries_per_window = absl::GetFlag(FLAGS_budget_queries_per_window);
  if (o.budget_windows < 1 || o.budget_queries_per_window < 1)
    return absl::InvalidArgumentError(
        "--budget-windows and --budget-queries-per-window must be >= 1");
  if (auto s = recency_bands_from_flags(&o); !s.ok()) return s;
  return o;
}

}  // namespace

int run_saap_fit() {
  const char* cmd = "saap fit";
  const std::string out = absl::GetFlag(FLAGS_saap_index);
  if (out.empty()) return fail(cmd, "--saap-index FILE (the index to write) is required");
  const std::string key_space = absl::GetFlag(FLAGS_key_space);
  if (key_space != "pre-rope" && key_space != "rope")
    return fail(cmd, absl::StrCat("--key-space: expected pre-rope or rope, got \"", key_space, "\""));
  auto o = fit_options_from_flags();
  if (!o.ok()) return fail(cmd, std::string(o.status().message()));

  const auto start = std::chrono::steady_clock::now();
  auto l = load_model_from_flags(/*need_tokenizer=*/!absl::GetFlag(FLAGS_text).empty());
  if (!l.ok()) return fail(cmd, std::string(l.status().message()));
  if (l->saap) return fail(cmd, "fit runs the model densely; drop --attention saap");
  const model::LoadedModel& m = l->loaded;
  std::cerr << "model: " << l->description << "\n";
  auto tokens = read_tokens_from_flags(m);
  if (!tokens.ok()) return fail(cmd, std::string(tokens.status().message()));
  o->calibration_data = absl::StrFormat("%s (%d tokens)", tokens->source, tokens->ids.size());
  const double load_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  saap::FitReport r;
  saap::SaapIndex index = saap::fit_saap_index(m.model, m.identity, tokens->ids, *o, &r, log_line);
  if (auto s = saap::write_saap_index(out, index); !s.ok()) return fail(cmd, std::string(s.message()));

  json recency_mean = nullptr;  // mean over heads of each band's log weight (newest band first)
  if (r.recency_log_weights.defined()) {
    at::Tensor mean = r.recency_log_weights.mean(0).contiguous();
    recency_mean = std::vector<float>(mean.data_ptr<float>(), mean.data_ptr<float>() + mean.numel());
  }
  json recall = json::array();
  for (size_t i = 0; i < r.classifier.recall_at.size(); ++i)
    recall.push_back({{"l", r.classifier.recall_at[i]},
                      {"recall", r.classifier.recall[i]},
                      {"oracle", r.classifier.oracle_recall[i]}});
  json j = {{"index", out}, {"model", m.path}, {"model_identity", m.identity},
            {"source", tokens->source}, {"key_space", key_space}, {"device", m.device.str()},
            {"context", o->context}, {"windows", r.windows}, {"tokens", r.tokens},
            {"partitions", o->partitions}, {"classifier_hidden", o->hidden},
            {"local_window", o->local_window}, {"sink_tokens", o->sink_tokens},
            {"kmeans_keys_per_head", r.keys_per_head}, {"kmeans_iterations", r.kmeans_iterations},
            {"kmeans_converged", r.kmeans_converged},
            {"partition_sizes", {r.smallest_partition, r.largest_partition}},
            {"queries_per_head", r.queries_per_head}, {"classifier_steps", o->train.steps},
            {"weight_by_mass", o->train.weight_by_mass}, {"count_prior", o->count_prior},
            {"train_kl", r.classifier.train_kl}, {"holdout_kl", r.classifier.holdout_kl},
            {"holdout_recall", recall}, {"recency_bands", o->recency_edges},
            {"recency_log_weights_mean", recency_mean}, {"budget_grid", o->budget_grid},
            {"budget_windows", o->budget_windows},
            {"budget_queries_per_window", o->budget_queries_per_window},
            {"seconds",
             {{"load", load_seconds}, {"capture_keys", r.capture_seconds},
              {"kmeans", r.kmeans_seconds}, {"targets", r.targets_seconds},
              {"classifiers", r.train_seconds}, {"budget_curves", r.budget_seconds},
              {"fit_total", r.total_seconds}}}};
  if (auto s = write_json_file(j); !s.ok()) return fail(cmd, std::string(s.message()));
  std::cout << absl::StrFormat(
      "wrote %s: %d layers x %d KV heads x %d partitions (%s keys), classifiers for %d query "
      "heads\n",
      out, index.header.num_layers(), index.header.num_kv_heads(), o->partitions, key_space,
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
// the saap command

namespace {

int run_saap(const Args& positional, const Args&) {
  if (positional.size() != 1 || (positional[0] != "fit" && positional[0] != "eval"))
    return fail("saap", "expected `saap fit` or `saap eval` (see sparseflash saap --help)");
  const bool is_fit = positional[0] == "fit";
  try {
    return is_fit ? run_saap_fit() : run_saap_eval();
  } catch (const std::exception& e) {
    return fail(is_fit ? "saap fit" : "saap eval", error_text(e));
  }
}

}  // namespace

Command saap_command() {
  std::vector<std::string> flags = {
      "model", "tokenizer", "text", "data", "max_tokens", "context", "stride", "saap_index",
      "partitions", "classifier_hidden", "local_window", "sink_tokens", "kmeans_keys",
      "kmeans_iterations", "queries_per_window", "classifier_steps", "weight_by_mass",
      "count_prior", "recency_bands", "windows", "key_space", "top_l", "per_head_budgets",
      "budget_objective", "budget_grid", "budget_windows", "budget_queries_per_window", "dtype",
      "device", "seed", "json_file"};
  for (const auto& f : saap_eval_flag_names()) flags.push_back(f);
  return {
      "saap",
      "sparseflash saap fit --model PATH (--text FILE | --data SHARDS) --saap-index OUT\n"
      "                         [--context L] [--partitions C] [--key-space pre-rope|rope] ...\n"
      "       sparseflash saap eval --model PATH --text FILE --saap-index FILE [--rope-index FILE]\n"
      "                         [--context L] [--top-l 4,8,16,32] [--noperplexity] [--noneedle]",
      "fit SAAP key partitions and query classifiers; measure them",
      "fit: runs the model over windows of --context tokens of calibration text, clusters\n"
      "every KV head's pre-RoPE keys (batched k-means on the device) into --partitions\n"
      "partitions, computes for sampled queries the exact attention mass per partition\n"
      "outside the local window and sinks, trains one MLP classifier per query head on it\n"
      "(KL loss) and writes the index (protobuf header + safetensors, with the model's\n"
      "identity). It also stores per-head budget curves: the routed attention lost and the\n"
      "attention-output error of every query head at each --budget-grid key budget.\n"
      "--recency-bands (default auto) weights each partition's keys in the count prior by their\n"
      "age (the attention per key each head gives each age band, measured in the fit).\n"
      "Progress and time per phase go to stderr. --key-space rope fits the RoPE'd-keys\n"
      "baseline instead.\n"
      "eval: on held-out text, recall@l of the attention mass and keys visited for SAAP and\n"
      "the baselines (symmetric k-means, RoPE'd k-means with --rope-index, random, oracle);\n"
      "perplexity dense vs SAAP at each l; a pass-key retrieval check. Prints a table;\n"
      "--per-head-budgets adds perplexity with each key budget split over the heads.\n"
      "--json-file writes everything. To run SAAP in eval/generate: --attention saap\n"
      "--saap-index FILE --top-l L (or --key-budget F [--per-head-budgets]). See docs/saap.md.",
      flags,
      run_saap};
}

}  // namespace sparseflash::cli
