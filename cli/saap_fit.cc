// `sparseflash saap fit`: fit a SAAP index (key partitions + query
// classifiers) on calibration text with saap::fit_saap_index, write it and
// report; also the `saap` command that dispatches to fit or eval.
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <stdexcept>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "cli/command.h"
#include "cli/model_flags.h"
#include "cli/saap.h"
#include "configs/config.h"
#include "saap/model/calibrate.h"
#include "saap/targets.h"

// The fit's settings are the saap_fit section of the config (configs/experiment.proto,
// SaapFit, with the same defaults); each flag below is a shorthand of one field.
ABSL_FLAG(int64_t, partitions, 256,
          "saap fit: key partitions (k-means centroids) per KV head (saap_fit.partitions).");
ABSL_FLAG(int64_t, classifier_hidden, 256,
          "saap fit: hidden width of each query head's MLP (saap_fit.classifier_hidden).");
ABSL_FLAG(int64_t, local_window, 64,
          "saap fit: always-attended most recent keys (>= 1); the targets exclude them "
          "(saap_fit.local_window).");
ABSL_FLAG(int64_t, sink_tokens, 4,
          "saap fit: always-attended first keys of the context (saap_fit.sink_tokens).");
ABSL_FLAG(int64_t, kmeans_keys, 65536,
          "saap fit: keys per KV head given to k-means (saap_fit.kmeans_keys).");
ABSL_FLAG(int64_t, kmeans_iterations, 25,
          "saap fit: Lloyd iterations at most (saap_fit.kmeans_iterations).");
ABSL_FLAG(int64_t, queries_per_window, 1024,
          "saap fit / eval: query positions sampled per window (every head and layer; "
          "saap_fit.queries_per_window).");
ABSL_FLAG(int64_t, classifier_steps, 2000,
          "saap fit: AdamW steps of the classifiers (saap_fit.classifier_steps).");
ABSL_FLAG(bool, weight_by_mass, true,
          "saap fit: weight each query's loss by the attention mass it sends beyond the local "
          "window and sinks (saap_fit.weight_by_mass).");
ABSL_FLAG(bool, count_prior, true,
          "saap fit: classifiers score attention per key; the log of each partition's key "
          "count is added to their logits (in training and at inference; saap_fit.count_prior).");
ABSL_FLAG(std::string, recency_bands, "auto",
          "saap fit: ages (tokens beyond the local window, ascending) that cut the routable keys "
          "into recency bands; the count prior then weights each band's keys by the attention "
          "per key measured for it, per head (docs/saap.md). \"auto\": 32, 96, 224, 480, ... "
          "(each band twice the previous one) while the calibration context can measure the "
          "oldest band; \"none\": the plain count prior (saap_fit.recency_bands).");
ABSL_FLAG(std::string, budget_grid,
          "0,0.005,0.01,0.02,0.035,0.05,0.075,0.1,0.15,0.2,0.3,0.45,0.7,1",
          "saap fit: fractions of the routable keys (ascending) at which each query head's lost "
          "attention is measured on held-out queries and stored, for --per-head-budgets at "
          "inference; \"none\" stores no curves (saap_fit.budget_grid).");
ABSL_FLAG(int64_t, budget_windows, 4,
          "saap fit: calibration windows of the last pass that measures each head's "
          "attention-output error at every --budget-grid value (through the trained classifiers; "
          "saap_fit.budget_windows).");
ABSL_FLAG(int64_t, budget_queries_per_window, 256,
          "saap fit: query positions sampled per window in that pass "
          "(saap_fit.budget_queries_per_window).");
ABSL_FLAG(int64_t, windows, 0,
          "saap fit / eval: windows of --context tokens used at most (0 = all the text gives; "
          "saap_fit.windows).");
ABSL_FLAG(std::string, key_space, "pre-rope",
          "saap fit: pre-rope (SAAP) or rope (the RoPE'd-keys baseline, for saap eval "
          "--rope-index; saap_fit.key_space).");

ABSL_DECLARE_FLAG(std::string, saap_index);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int64_t, context);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, config);
ABSL_DECLARE_FLAG(bool, print_config);

namespace sparseflash::cli {
namespace {

using nlohmann::json;

void log_line(const std::string& line) { std::cerr << line << "\n" << std::flush; }

// The name a value is reported under: the flag when it was given, else the
// config field it came from.
std::string origin(const char* flag, const char* field) {
  return flag_given(flag) ? absl::StrCat("--", absl::StrReplaceAll(flag, {{"_", "-"}}))
                          : absl::StrCat("saap_fit.", field);
}

// budget_grid: ascending fractions in [0, 1], or "none".
absl::StatusOr<std::vector<double>> parse_budget_grid(const std::string& text) {
  const std::string name = origin("budget_grid", "budget_grid");
  std::vector<double> grid;
  if (text == "none") return grid;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || !(v >= 0 && v <= 1))
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": expected fractions in [0, 1], got \"", text, "\""));
    grid.push_back(v);
  }
  if (absl::Status s = saap::check_budget_grid(grid, name); !s.ok()) return s;
  return grid;
}

// recency_bands: "auto", "none" or ascending whole numbers of tokens.
absl::Status parse_recency_bands(const std::string& bands, saap::FitOptions* o) {
  const std::string name = origin("recency_bands", "recency_bands");
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
          absl::StrCat(name, ": \"", part, "\" is not a whole number of tokens"));
    o->recency_edges.push_back(e);
  }
  if (o->recency_edges.empty())
    return absl::InvalidArgumentError(
        absl::StrCat(name, ": give band edges (for example 128,384,896) or none"));
  if (absl::Status s = saap::check_recency_edges(o->recency_edges, name.c_str()); !s.ok()) return s;
  if (!o->count_prior)
    return absl::InvalidArgumentError(
        absl::StrCat(name, " needs ", origin("count_prior", "count_prior")));
  return absl::OkStatus();
}

// The fit's settings: the saap_fit section of --config (a file or
// preset:NAME; none: the defaults), then `--set saap_fit.FIELD=VALUE`, then
// the shorthand flags given on the command line; validated like any config.
absl::StatusOr<config::SaapFit> resolve_fit_config(const Args& overrides) {
  std::vector<std::string> all;
  for (const std::string& o : overrides) {
    if (!absl::StartsWith(o, "saap_fit."))
      return absl::InvalidArgumentError(absl::StrCat(
          "--set ", o, ": saap fit reads the saap_fit section only (--set saap_fit.FIELD=VALUE)"));
    all.push_back(o);
  }
  // An error about a value a flag gave names the flag, not the --set it became.
  std::vector<std::pair<std::string, std::string>> renames;
  auto flag = [&](const char* name, const std::string& value) {
    if (!flag_given(name)) return;
    all.push_back(absl::StrCat("saap_fit.", name, "=", value));
    renames.push_back({absl::StrCat("(from --set ", all.back(), ")"),
                       absl::StrCat("(from ", origin(name, name), " ", value, ")")});
  };
  flag("partitions", absl::StrCat(absl::GetFlag(FLAGS_partitions)));
  flag("classifier_hidden", absl::StrCat(absl::GetFlag(FLAGS_classifier_hidden)));
  flag("local_window", absl::StrCat(absl::GetFlag(FLAGS_local_window)));
  flag("sink_tokens", absl::StrCat(absl::GetFlag(FLAGS_sink_tokens)));
  flag("kmeans_keys", absl::StrCat(absl::GetFlag(FLAGS_kmeans_keys)));
  flag("kmeans_iterations", absl::StrCat(absl::GetFlag(FLAGS_kmeans_iterations)));
  flag("queries_per_window", absl::StrCat(absl::GetFlag(FLAGS_queries_per_window)));
  flag("classifier_steps", absl::StrCat(absl::GetFlag(FLAGS_classifier_steps)));
  flag("weight_by_mass", absl::GetFlag(FLAGS_weight_by_mass) ? "true" : "false");
  flag("count_prior", absl::GetFlag(FLAGS_count_prior) ? "true" : "false");
  flag("recency_bands", absl::GetFlag(FLAGS_recency_bands));
  flag("budget_grid", absl::GetFlag(FLAGS_budget_grid));
  flag("budget_windows", absl::StrCat(absl::GetFlag(FLAGS_budget_windows)));
  flag("budget_queries_per_window", absl::StrCat(absl::GetFlag(FLAGS_budget_queries_per_window)));
  flag("windows", absl::StrCat(absl::GetFlag(FLAGS_windows)));
  flag("key_space", absl::GetFlag(FLAGS_key_space));
  // The base: the given config, or a preset whose other sections are valid (the
  // fit reads saap_fit only; a file holding just a saap_fit section is fine).
  const std::string config_path = absl::GetFlag(FLAGS_config);
  auto exp = resolve_config(config_path, all, "cpu_default");
  if (!exp.ok()) {
    std::string message(exp.status().message());
    if (config_path.empty()) message = absl::StrReplaceAll(message, {{"preset:cpu_default: ", ""}});
    return absl::Status(exp.status().code(), absl::StrReplaceAll(message, renames));
  }
  return exp->saap_fit();
}

absl::StatusOr<saap::FitOptions> fit_options(const config::SaapFit& f) {
  saap::FitOptions o;
  o.context = absl::GetFlag(FLAGS_context);
  o.max_windows = f.windows();
  o.partitions = f.partitions();
  o.hidden = f.classifier_hidden();
  o.local_window = f.local_window();
  o.sink_tokens = f.sink_tokens();
  o.kmeans_keys = f.kmeans_keys();
  o.kmeans_iterations = f.kmeans_iterations();
  o.queries_per_window = f.queries_per_window();
  o.pre_rope_keys = f.key_space() == "pre-rope";
  o.train.steps = f.classifier_steps();
  o.train.weight_by_mass = f.weight_by_mass();
  o.count_prior = f.count_prior();
  o.seed = absl::GetFlag(FLAGS_seed);
  o.train.seed = o.seed;
  if (o.context < 2) return absl::InvalidArgumentError("--context must be >= 2");
  for (int64_t l : {4, 8, 16, 32})
    if (l <= o.partitions) o.train.recall_at.push_back(l);
  if (o.train.recall_at.empty()) o.train.recall_at = {1};
  auto grid = parse_budget_grid(f.budget_grid());
  if (!grid.ok()) return grid.status();
  o.budget_grid = *grid;
  o.budget_windows = f.budget_windows();
  o.budget_queries_per_window = f.budget_queries_per_window();
  if (auto s = parse_recency_bands(f.recency_bands(), &o); !s.ok()) return s;
  return o;
}

}  // namespace

int run_saap_fit(const Args& overrides) {
  const char* cmd = "saap fit";
  if (flag_given("key_space")) {
    const std::string key_space = absl::GetFlag(FLAGS_key_space);
    if (key_space != "pre-rope" && key_space != "rope")
      return fail(cmd,
                  absl::StrCat("--key-space: expected pre-rope or rope, got \"", key_space, "\""));
  }
  auto fit = resolve_fit_config(overrides);
  if (!fit.ok()) return fail(cmd, std::string(fit.status().message()));
  const std::string key_space = fit->key_space();
  auto o = fit_options(*fit);  // parses recency_bands and budget_grid
  if (!o.ok()) return fail(cmd, std::string(o.status().message()));
  if (absl::GetFlag(FLAGS_print_config)) {
    // The section alone (resolved: every field with its value), as a config file holds it.
    std::string text;
    google::protobuf::TextFormat::Printer printer;
    printer.SetInitialIndentLevel(1);
    printer.PrintToString(*fit, &text);
    std::cout << "saap_fit {\n" << text << "}\n";
    return 0;
  }
  const std::string out = absl::GetFlag(FLAGS_saap_index);
  if (out.empty()) return fail(cmd, "--saap-index FILE (the index to write) is required");

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
  absl::StatusOr<saap::SaapIndex> index =
      saap::fit_saap_index(m.model, m.identity, tokens->ids, *o, &r, log_line);
  if (!index.ok()) return fail(cmd, std::string(index.status().message()));
  if (auto s = saap::write_saap_index(out, *index); !s.ok())
    return fail(cmd, std::string(s.message()));

  json recency_mean = nullptr;  // mean over heads of each band's log weight (newest band first)
  if (r.recency_log_weights.defined()) {
    at::Tensor mean = r.recency_log_weights.mean(0).contiguous();
    recency_mean =
        std::vector<float>(mean.data_ptr<float>(), mean.data_ptr<float>() + mean.numel());
  }
  json recall = json::array();
  for (size_t i = 0; i < r.classifier.recall_at.size(); ++i)
    recall.push_back({{"l", r.classifier.recall_at[i]},
                      {"recall", r.classifier.recall[i]},
                      {"oracle", r.classifier.oracle_recall[i]}});
  json j = {{"index", out},
            {"model", m.path},
            {"model_identity", m.identity},
            {"source", tokens->source},
            {"key_space", key_space},
            {"device", m.device.str()},
            {"context", o->context},
            {"windows", r.windows},
            {"tokens", r.tokens},
            {"partitions", o->partitions},
            {"classifier_hidden", o->hidden},
            {"local_window", o->local_window},
            {"sink_tokens", o->sink_tokens},
            {"kmeans_keys_per_head", r.keys_per_head},
            {"kmeans_iterations", r.kmeans_iterations},
            {"kmeans_converged", r.kmeans_converged},
            {"partition_sizes", {r.smallest_partition, r.largest_partition}},
            {"queries_per_head", r.queries_per_head},
            {"classifier_steps", o->train.steps},
            {"weight_by_mass", o->train.weight_by_mass},
            {"count_prior", o->count_prior},
            {"train_kl", r.classifier.train_kl},
            {"holdout_kl", r.classifier.holdout_kl},
            {"holdout_recall", recall},
            {"recency_bands", o->recency_edges},
            {"recency_log_weights_mean", recency_mean},
            {"budget_grid", o->budget_grid},
            {"budget_windows", o->budget_windows},
            {"budget_queries_per_window", o->budget_queries_per_window},
            {"seconds",
             {{"load", load_seconds},
              {"capture_keys", r.capture_seconds},
              {"kmeans", r.kmeans_seconds},
              {"targets", r.targets_seconds},
              {"classifiers", r.train_seconds},
              {"budget_curves", r.budget_seconds},
              {"fit_total", r.total_seconds}}}};
  if (auto s = write_json_file(j); !s.ok()) return fail(cmd, std::string(s.message()));
  std::cout << absl::StrFormat(
      "wrote %s: %d layers x %d KV heads x %d partitions (%s keys), classifiers for %d query "
      "heads\n",
      out, index->header.num_layers(), index->header.num_kv_heads(), o->partitions, key_space,
      index->header.num_query_heads());
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

int run_saap(const Args& positional, const Args& overrides) {
  if (positional.size() != 1 || (positional[0] != "fit" && positional[0] != "eval"))
    return fail("saap", "expected `saap fit` or `saap eval` (see sparseflash saap --help)");
  const bool is_fit = positional[0] == "fit";
  try {
    if (!is_fit && (!overrides.empty() || flag_given("config") || flag_given("print_config")))
      return fail("saap eval",
                  "--set, --config and --print-config are options of saap fit (its saap_fit "
                  "section) and train");
    return is_fit ? run_saap_fit(overrides) : run_saap_eval();
  } catch (const std::exception& e) {
    return fail(is_fit ? "saap fit" : "saap eval", error_text(e));
  }
}

}  // namespace

Command saap_command() {
  std::vector<std::string> flags = {"model",
                                    "tokenizer",
                                    "text",
                                    "data",
                                    "max_tokens",
                                    "context",
                                    "stride",
                                    "saap_index",
                                    "partitions",
                                    "classifier_hidden",
                                    "local_window",
                                    "sink_tokens",
                                    "kmeans_keys",
                                    "kmeans_iterations",
                                    "queries_per_window",
                                    "classifier_steps",
                                    "weight_by_mass",
                                    "count_prior",
                                    "recency_bands",
                                    "windows",
                                    "key_space",
                                    "top_l",
                                    "per_head_budgets",
                                    "budget_objective",
                                    "budget_grid",
                                    "budget_windows",
                                    "budget_queries_per_window",
                                    "dtype",
                                    "device",
                                    "seed",
                                    "json_file",
                                    "config",
                                    "print_config"};
  for (const auto& f : saap_eval_flag_names()) flags.push_back(f);
  return {
      "saap",
      "sparseflash saap fit --model PATH (--text FILE | --data SHARDS) --saap-index OUT\n"
      "                         [--context L] [--config FILE] [--set saap_fit.FIELD=VALUE ...]\n"
      "                         [--partitions C] [--key-space pre-rope|rope] ... [--print-config]\n"
      "       sparseflash saap eval --model PATH --text FILE --saap-index FILE [--rope-index "
      "FILE]\n"
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
      "baseline instead. The fit's settings are the saap_fit section of a config\n"
      "(configs/experiment.proto: --config FILE, then --set saap_fit.FIELD=VALUE); each fit\n"
      "flag (--partitions, --classifier-steps, ...) is a shorthand of one field and wins over\n"
      "both. --print-config prints the resolved section and exits.\n"
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
