// `sparseflash eval`: the validation loss of a run of ours on prepared data,
// or the sliding-window perplexity of any model (a pretrained file or a run)
// on a text file or token shards.
#include <unistd.h>

#include <iostream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli/command.h"
#include "cli/model_flags.h"
#include "model/factory.h"
#include "model/passkey.h"
#include "model/perplexity.h"
#include "nlohmann/json.hpp"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, checkpoint, "runs/cpu_default",
          "Deprecated (use --model): a run's checkpoint file, or a run directory holding ckpt.pt.");
ABSL_FLAG(int32_t, batches, 20, "Validation loss: batches to evaluate.");
ABSL_FLAG(int32_t, batch_size, 0, "Validation loss: sequences per batch; 0 = the run's data.batch_size.");

ABSL_FLAG(bool, passkey, false,
          "Pass-key retrieval instead of perplexity: a 5-digit key hidden in filler from --text at "
          "--passkey-depths depths, asked for at the end, at each of --passkey-contexts.");
ABSL_FLAG(std::string, passkey_contexts, "8192", "--passkey: context lengths, comma-separated.");
ABSL_FLAG(int32_t, passkey_depths, 10, "--passkey: depths, evenly spaced from start to end.");
ABSL_FLAG(int32_t, passkey_keys, 1, "--passkey: random keys per depth.");

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(std::string, rope_scaling);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, data);
ABSL_DECLARE_FLAG(std::string, text);
ABSL_DECLARE_FLAG(int64_t, context);
ABSL_DECLARE_FLAG(int64_t, stride);
ABSL_DECLARE_FLAG(std::string, saap_index);
ABSL_DECLARE_FLAG(bool, json);

namespace sparseflash::cli {
namespace {

using nlohmann::json;

// ---------------------------------------------------------------------------
// validation loss of a run

int validation_loss(const std::string& run) {
  trainer::ValidationOptions o;
  o.checkpoint = run;
  o.device = absl::GetFlag(FLAGS_device);
  o.data_dir = absl::GetFlag(FLAGS_data);
  o.batches = absl::GetFlag(FLAGS_batches);
  o.batch_size = absl::GetFlag(FLAGS_batch_size);
  auto r = trainer::evaluate_run(o);
  if (!r.ok()) return fail("eval", std::string(r.status().message()));
  if (absl::GetFlag(FLAGS_json)) {
    json j = {{"checkpoint", run},         {"step", r->step},
              {"data", r->data_dir},       {"tokens", r->result.tokens},
              {"loss", r->result.loss},    {"bits_per_byte", r->result.bits_per_byte},
              {"unigram_bits_per_byte", r->unigram_bits_per_byte}};
    std::cout << j.dump() << "\n";
  } else {
    std::cout << absl::StrFormat(
        "step %d: val loss %.4f nats/token, %.4f bits/byte over %d tokens (unigram baseline "
        "%.4f bits/byte)\n",
        r->step, r->result.loss, r->result.bits_per_byte, r->result.tokens,
        r->unigram_bits_per_byte);
  }
  return 0;
}

// ---------------------------------------------------------------------------
// perplexity

int perplexity() {
  if (saap_index_without_saap()) return fail("eval", "--saap-index is used with --attention saap only");
  const bool from_text = !absl::GetFlag(FLAGS_text).empty();
  if (from_text == !absl::GetFlag(FLAGS_data).empty())
    return fail("eval", "give exactly one of --text FILE or --data SHARDS");
  model::PerplexityOptions o;
  o.context = absl::GetFlag(FLAGS_context);
  o.stride = absl::GetFlag(FLAGS_stride);
  auto stride = model::resolve_stride(o);  // before the (slow) load
  if (!stride.ok()) return fail("eval", std::string(stride.status().message()));
  auto l = load_model_from_flags(/*need_tokenizer=*/from_text);
  if (!l.ok()) return fail("eval", std::string(l.status().message()));
  const model::LoadedModel& m = l->loaded;
  std::cerr << "model: " << l->description << "\n";
  if (o.context > m.model->context_length())
    std::cerr << "warning: --context " << o.context << " exceeds the model's context length "
              << m.model->context_length() << "\n";
  auto tokens = read_tokens_from_flags(m);
  if (!tokens.ok()) return fail("eval", std::string(tokens.status().message()));
  if (tokens->ids.size() < 2)
    return fail("eval", absl::StrCat(tokens->source, " gives ", tokens->ids.size(),
                                     " token(s); need at least 2"));
  const bool tty = isatty(STDERR_FILENO);
  const int64_t total = static_cast<int64_t>(tokens->ids.size()) - 1;
  o.progress = [&](const model::PerplexityResult& r, int64_t windows) {
    const std::string line = absl::StrFormat(
        "window %d/%d: %d/%d tokens, mean NLL %.4f, perplexity %.3f, %.0f tokens/s", r.windows,
        windows, r.tokens, total, r.mean_nll(), r.perplexity(), r.tokens_per_second());
    if (tty) std::cerr << "\r\033[K" << line << std::flush;
    else if (r.windows == 1 || r.windows % 10 == 0 || r.windows == windows) std::cerr << line << "\n";
  };
  auto report = model::evaluate_perplexity(m.model, tokens->ids, o);
  if (tty) std::cerr << "\n";
  if (!report.ok()) return fail("eval", std::string(report.status().message()));
  const model::PerplexityResult& r = report->result;

  json j = {{"model", m.path},          {"format", m.format},
            {"source", tokens->source}, {"tokens", r.tokens},
            {"windows", r.windows},     {"context", report->context},
            {"stride", report->stride}, {"mean_nll", r.mean_nll()},
            {"perplexity", r.perplexity()}, {"seconds", r.seconds},
            {"tokens_per_second", r.tokens_per_second()},
            {"dtype", model::dtype_name(m.dtype)}, {"device", m.device.str()},
            {"attention", m.attention}};
  if (l->saap) {
    const auto& h = *l->saap;
    j["saap"] = {{"index", absl::GetFlag(FLAGS_saap_index)},
                 {"routing", saap::routing_name(h.options().routing)},
                 {"top_l", h.options().top_l},
                 {"key_budget", h.options().key_budget},
                 {"mass_threshold", h.options().mass_threshold},
                 {"per_head_budgets", h.head_budgets()},
                 {"budget_objective", saap::objective_name(h.options().budget_objective)},
                 {"partitions", h.header().partitions()},
                 {"local_window", h.header().local_window()},
                 {"sink_tokens", h.header().sink_tokens()},
                 {"keys_visited", h.stats().visited_fraction()},
                 {"routed_keys_visited", h.stats().routed_fraction()}};
    std::cerr << absl::StrFormat(
        "saap: %.2f%% of causal (query, key) pairs visited, %.2f%% of the routable ones\n",
        100 * h.stats().visited_fraction(), 100 * h.stats().routed_fraction());
  }
  if (auto s = write_json_file(j); !s.ok()) return fail("eval", std::string(s.message()));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << absl::StrFormat(
        "tokens: %d scored in %d windows (context %d, stride %d)\nmean NLL: %.5f nats/token\n"
        "perplexity: %.4f\ntokens/s: %.0f (%.2f s)\n",
        r.tokens, r.windows, report->context, report->stride, r.mean_nll(), r.perplexity(),
        r.tokens_per_second(), r.seconds);
  }
  return 0;
}

// ---------------------------------------------------------------------------
// pass-key retrieval

int passkey() {
  if (absl::GetFlag(FLAGS_text).empty())
    return fail("eval", "--passkey needs --text FILE (the filler the key is hidden in)");
  model::PasskeyOptions o;
  o.contexts.clear();
  for (absl::string_view part : absl::StrSplit(absl::GetFlag(FLAGS_passkey_contexts), ',')) {
    int64_t c = 0;
    if (!absl::SimpleAtoi(part, &c) || c <= 0)
      return fail("eval", absl::StrCat("--passkey-contexts: expected positive integers, got \"",
                                       absl::GetFlag(FLAGS_passkey_contexts), "\""));
    o.contexts.push_back(c);
  }
  o.depths = absl::GetFlag(FLAGS_passkey_depths);
  o.keys = absl::GetFlag(FLAGS_passkey_keys);
  o.seed = absl::GetFlag(FLAGS_seed);
  if (o.depths < 1 || o.keys < 1)
    return fail("eval", "--passkey-depths and --passkey-keys must be >= 1");
  auto l = load_model_from_flags(/*need_tokenizer=*/true);
  if (!l.ok()) return fail("eval", std::string(l.status().message()));
  const model::LoadedModel& m = l->loaded;
  std::cerr << "model: " << l->description << "\n";
  auto tokens = read_tokens_from_flags(m);
  if (!tokens.ok()) return fail("eval", std::string(tokens.status().message()));
  // The filler is the text without its BOS.
  std::vector<int64_t> filler(tokens->ids.begin(), tokens->ids.end());
  auto bos = m.tokenizer->encode("", /*add_bos=*/true);
  if (!bos.empty() && !filler.empty() && filler.front() == bos.front()) filler.erase(filler.begin());
  o.progress = [&](const model::PasskeyTrial& t) {
    std::cerr << absl::StrFormat("context %d, depth %.2f: key %s, answer \"%s\" %s\n", t.context,
                                 t.depth, t.key, absl::CEscape(t.answer),
                                 t.found ? "found" : "missed");
  };
  auto report = model::passkey_retrieval(m.model, *m.tokenizer, filler, o);
  if (!report.ok()) return fail("eval", std::string(report.status().message()));
  json rows = json::array(), trials = json::array();
  for (const auto& r : report->rows)
    rows.push_back({{"context", r.context}, {"found", r.found}, {"trials", r.trials},
                    {"accuracy", static_cast<double>(r.found) / r.trials}});
  for (const auto& t : report->trials)
    trials.push_back({{"context", t.context}, {"depth", t.depth}, {"key", t.key},
                      {"answer", t.answer}, {"found", t.found}});
  json j = {{"model", m.path}, {"format", m.format}, {"filler", tokens->source},
            {"attention", m.attention}, {"rope_scaling", absl::GetFlag(FLAGS_rope_scaling)},
            {"depths", o.depths}, {"keys", o.keys}, {"seed", o.seed},
            {"rows", rows}, {"trials", trials}};
  if (auto s = write_json_file(j); !s.ok()) return fail("eval", std::string(s.message()));
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << j.dump() << "\n";
  } else {
    std::cout << "context  found/trials\n";
    for (const auto& r : report->rows)
      std::cout << absl::StrFormat("%7d  %d/%d (%.0f%%)\n", r.context, r.found, r.trials,
                                   100.0 * r.found / r.trials);
  }
  return 0;
}

int run_eval(const Args& positional, const Args&) {
  if (!positional.empty())
    return fail("eval", absl::StrCat("unexpected argument '", positional[0], "'"));
  if (flag_given("checkpoint")) {
    const std::string run = absl::GetFlag(FLAGS_checkpoint);
    deprecated(absl::StrCat("sparseflash eval --model ", run));
    return validation_loss(run);
  }
  if (absl::GetFlag(FLAGS_passkey)) {
    try {
      return passkey();
    } catch (const std::exception& e) {
      return fail("eval", error_text(e));
    }
  }
  // A run of ours without --text, --context or --stride: its validation loss.
  const std::string path = absl::GetFlag(FLAGS_model);
  if (model::is_training_checkpoint(path) && absl::GetFlag(FLAGS_text).empty() &&
      !flag_given("context") && !flag_given("stride"))
    return validation_loss(path);
  try {
    return perplexity();
  } catch (const std::exception& e) {
    return fail("eval", error_text(e));
  }
}

}  // namespace

Command eval_command() {
  std::vector<std::string> flags = model_flag_names();
  for (const char* f : {"text", "data", "context", "stride", "max_tokens", "batches", "batch_size",
                        "checkpoint", "passkey", "passkey_contexts", "passkey_depths",
                        "passkey_keys"})
    flags.push_back(f);
  return {
      "eval",
      "sparseflash eval --model RUN [--data DIR] [--batches N] [--json]\n"
      "       sparseflash eval --model PATH [--tokenizer PATH] (--text FILE | --data SHARDS)\n"
      "                        --context L --stride S [--attention dense|hash|drop|saap]\n"
      "                        [--dtype T] [--rope-scaling TYPE:FACTOR] [--json] [--json-file FILE]\n"
      "       sparseflash eval --model PATH --passkey --text FILLER [--passkey-contexts 8192,16384]\n"
      "                        [--passkey-depths 10] [--passkey-keys 1] [--rope-scaling TYPE:FACTOR]",
      "validation loss of a run, or perplexity of any model",
      "--model is a pretrained Llama-family model (HF directory, .gguf, llama2.c .bin, or\n"
      "`sparseflash convert` output) or a run of ours (GPT or Llama: ckpt.pt or its directory).\n"
      "A run without --text, --context or --stride: its validation loss on prepared data (by\n"
      "default the data it was trained on), in nats/token and bits/byte, as training reports it.\n"
      "Otherwise: sliding-window perplexity on a text file or token shards. Windows of --context\n"
      "tokens start every --stride tokens; each scores only the tokens no earlier window scored\n"
      "(transformers' recipe), so every token but the first is scored once. Prints tokens, mean\n"
      "NLL, perplexity and tokens/s; progress goes to stderr.\n"
      "--passkey: pass-key retrieval. A 5-digit key (\"The pass key is KEY. Remember it. KEY is\n"
      "the pass key.\") is hidden at evenly spaced depths of filler from --text, the model is\n"
      "asked \"What is the pass key? The pass key is\" and its greedy answer (8 tokens) must\n"
      "contain the key; prints found/trials per context. --rope-scaling extends a pretrained\n"
      "file's context zero-shot (e.g. linear:4 takes an 8k model to 32k).\n"
      "`eval --checkpoint RUN` is the deprecated spelling of `eval --model RUN`.",
      flags,
      run_eval};
}

}  // namespace sparseflash::cli
