// `sparseflash saap eval`: measure a SAAP index with saap::evaluate_saap
// (routing, perplexity, pass-key check) and print a table; --json-file
// writes everything.
#include <iostream>
#include <optional>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/command.h"
#include "cli/model_flags.h"
#include "cli/saap.h"
#include "model/perplexity.h"
#include "saap/model/evaluate.h"

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

ABSL_DECLARE_FLAG(std::string, saap_index);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int64_t, context);
ABSL_DECLARE_FLAG(int64_t, stride);
ABSL_DECLARE_FLAG(int64_t, windows);
ABSL_DECLARE_FLAG(int64_t, queries_per_window);
ABSL_DECLARE_FLAG(bool, per_head_budgets);
ABSL_DECLARE_FLAG(std::string, budget_objective);
ABSL_DECLARE_FLAG(uint64_t, seed);

namespace sparseflash::cli {
namespace {

using nlohmann::json;

void log_line(const std::string& line) { std::cerr << line << "\n" << std::flush; }

// A comma-separated list of fractions in [0, 1] ((0, 1] unless zero_allowed).
absl::StatusOr<std::vector<double>> fractions(const std::string& text, const char* flag,
                                              bool zero_allowed) {
  std::vector<double> out;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    double v = 0;
    if (!absl::SimpleAtod(part, &v) || !(zero_allowed ? v >= 0 : v > 0) || !(v <= 1))
      return absl::InvalidArgumentError(absl::StrCat(flag, ": expected fractions in ",
                                                     zero_allowed ? "[0, 1]" : "(0, 1]", ", got \"",
                                                     text, "\""));
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<saap::SaapEvalOptions> eval_options_from_flags() {
  saap::SaapEvalOptions o;
  auto top_l = top_l_from_flags();
  if (!top_l.ok()) return top_l.status();
  o.top_l = *top_l;
  auto depths = fractions(absl::GetFlag(FLAGS_needle_depths), "--needle-depths", true);
  auto budgets = fractions(absl::GetFlag(FLAGS_key_budgets), "--key-budgets", false);
  auto thresholds = fractions(absl::GetFlag(FLAGS_mass_thresholds), "--mass-thresholds", false);
  for (const auto* list : {&depths, &budgets, &thresholds})
    if (!list->ok()) return list->status();
  o.needle_depths = *depths;
  o.key_budgets = *budgets;
  o.mass_thresholds = *thresholds;
  o.objectives.clear();
  for (absl::string_view part :
       absl::StrSplit(absl::GetFlag(FLAGS_budget_objective), ',', absl::SkipWhitespace())) {
    auto objective = saap::parse_budget_objective(std::string(part));
    if (!objective.ok()) return objective.status();
    o.objectives.push_back(*objective);
  }
  if (o.objectives.empty())
    return absl::InvalidArgumentError("--budget-objective: give output or attention");
  model::PerplexityOptions p;
  p.context = o.context = absl::GetFlag(FLAGS_context);
  p.stride = absl::GetFlag(FLAGS_stride);
  auto stride = model::resolve_stride(p);
  if (!stride.ok()) return stride.status();
  o.stride = *stride;
  o.max_windows = absl::GetFlag(FLAGS_windows);
  o.queries_per_window = absl::GetFlag(FLAGS_queries_per_window);
  o.per_head_budgets = absl::GetFlag(FLAGS_per_head_budgets);
  o.perplexity = absl::GetFlag(FLAGS_perplexity);
  o.perplexity_tokens = absl::GetFlag(FLAGS_perplexity_tokens);
  o.needle = absl::GetFlag(FLAGS_needle);
  o.needle_trials = absl::GetFlag(FLAGS_needle_trials);
  o.seed = absl::GetFlag(FLAGS_seed);
  if (o.needle && absl::GetFlag(FLAGS_text).empty())
    return absl::InvalidArgumentError("--needle needs --text (filler text), or give --noneedle");
  return o;
}

json report_json(const saap::SaapEvalReport& report) {
  const saap::RoutingEvalReport& routing = report.routing;
  json rows = json::array();
  for (const auto& r : routing.rows)
    rows.push_back({{"method", r.method}, {"l", r.l}, {"key_budget", r.key_budget},
                    {"recall", r.recall}, {"recall_weighted", r.recall_weighted},
                    {"attention_kept", r.attention_kept}, {"keys_visited", r.keys_visited},
                    {"routed_keys_visited", r.routed_keys_visited}});
  json ppl = json::array();
  for (const auto& r : report.perplexity) {
    json row = {{"routing", r.routing}, {"l", r.l}, {"tokens", r.tokens},
                {"perplexity", r.perplexity}, {"mean_nll", r.mean_nll}, {"seconds", r.seconds}};
    if (r.sparse) {
      row["keys_visited"] = r.keys_visited;
      row["routed_keys_visited"] = r.routed_keys_visited;
    }
    if (!r.head_budgets.empty()) row["head_budgets"] = r.head_budgets;
    ppl.push_back(row);
  }
  json needle = json::array();
  for (const auto& r : report.needle) {
    json trials = json::array();
    for (const auto& t : r.details)
      trials.push_back({{"depth", t.depth}, {"key", t.key}, {"answer", t.answer}, {"found", t.found}});
    needle.push_back({{"routing", r.routing}, {"l", r.l}, {"found", r.found},
                      {"trials", r.trials}, {"details", trials}});
  }
  return {{"partitions", routing.partitions},
          {"local_window", routing.local_window},
          {"sink_tokens", routing.sink_tokens},
          {"routing",
           {{"windows", routing.windows},
            {"queries_per_head", routing.queries_per_head},
            {"mean_routed_mass", routing.mean_routed_mass},
            {"seconds", routing.seconds},
            {"rows", rows}}},
          {"perplexity", ppl},
          {"needle", needle}};
}

void print_table(const saap::SaapEvalReport& report, const std::string& source, int64_t context) {
  const saap::RoutingEvalReport& routing = report.routing;
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
  for (const auto& r : report.perplexity)
    std::cout << absl::StrFormat(
        "perplexity %-9s l=%-3d %.4f%s\n", r.routing, r.l, r.perplexity,
        r.sparse ? absl::StrFormat("  (%.2f%% keys visited)", 100 * r.keys_visited) : "");
  for (const auto& r : report.needle)
    std::cout << absl::StrFormat("needle %-9s l=%-3d %d/%d\n", r.routing, r.l, r.found, r.trials);
}

}  // namespace

const std::vector<std::string>& saap_eval_flag_names() {
  static const std::vector<std::string> f = {
      "rope_index", "perplexity", "perplexity_tokens", "key_budgets", "mass_thresholds",
      "needle", "needle_depths", "needle_trials"};
  return f;
}

int run_saap_eval() {
  const char* cmd = "saap eval";
  const std::string index_path = absl::GetFlag(FLAGS_saap_index);
  if (index_path.empty()) return fail(cmd, "--saap-index FILE is required");
  auto o = eval_options_from_flags();
  if (!o.ok()) return fail(cmd, std::string(o.status().message()));
  auto l = load_model_from_flags(/*need_tokenizer=*/!absl::GetFlag(FLAGS_text).empty() || o->needle);
  if (!l.ok()) return fail(cmd, std::string(l.status().message()));
  if (l->saap) return fail(cmd, "give the index with --saap-index; drop --attention saap");
  const model::LoadedModel& m = l->loaded;
  std::cerr << "model: " << l->description << "\n";
  auto index = saap::load_saap_index(index_path, m.identity);
  if (!index.ok()) return fail(cmd, std::string(index.status().message()));
  std::optional<saap::SaapIndex> rope_index;
  const std::string rope_path = absl::GetFlag(FLAGS_rope_index);
  if (!rope_path.empty()) {
    auto r = saap::load_saap_index(rope_path, m.identity);
    if (!r.ok()) return fail(cmd, std::string(r.status().message()));
    rope_index = std::move(*r);
  }
  auto tokens = read_tokens_from_flags(m);
  if (!tokens.ok()) return fail(cmd, std::string(tokens.status().message()));
  auto report = saap::evaluate_saap(m.model, m.tokenizer.get(), *index,
                                    rope_index ? &*rope_index : nullptr, tokens->ids, *o, log_line);
  if (!report.ok()) return fail(cmd, std::string(report.status().message()));

  json j = {{"model", m.path},        {"model_identity", m.identity}, {"index", index_path},
            {"rope_index", rope_path}, {"source", tokens->source},    {"device", m.device.str()},
            {"context", o->context}};
  j.update(report_json(*report));
  if (auto s = write_json_file(j); !s.ok()) return fail(cmd, std::string(s.message()));
  print_table(*report, tokens->source, o->context);
  return 0;
}

}  // namespace sparseflash::cli
