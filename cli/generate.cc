// `sparseflash generate`: continue a prompt with any model (a pretrained file
// or a run of ours) through the one sampler (model/generate.h), streaming the
// text. `sample --checkpoint` is its deprecated spelling.
#include <chrono>
#include <iostream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/command.h"
#include "cli/model_flags.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, prompt, "The kernel ", "Text to continue.");
ABSL_FLAG(int64_t, max_new_tokens, 64,
          "Tokens to generate at most (stops earlier at EOS, and at the model's context length).");
ABSL_FLAG(double, temperature, 0.8, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(int32_t, top_k, 0, "Sample among the k most likely tokens; 0 = all (sample: 40).");
ABSL_FLAG(double, top_p, 1.0, "Nucleus sampling mass in (0, 1]; 1 = all tokens.");
ABSL_FLAG(int32_t, tokens, 300, "sample (deprecated): tokens to sample (generate: --max-new-tokens).");

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, checkpoint);
ABSL_DECLARE_FLAG(uint64_t, seed);
ABSL_DECLARE_FLAG(bool, json);

namespace sparseflash::cli {
namespace {

using nlohmann::json;

struct GenerateOptions {
  std::string prompt;
  int64_t max_new_tokens = 64;
  model::SamplingOptions sampling;
  bool print_json = false;
};

int generate(const GenerateOptions& o) {
  const char* cmd = "generate";
  if (saap_index_without_saap()) return fail(cmd, "--saap-index is used with --attention saap only");
  if (o.max_new_tokens < 0) return fail(cmd, "--max-new-tokens must be >= 0");
  if (!(o.sampling.temperature >= 0)) return fail(cmd, "--temperature must be >= 0");
  if (o.sampling.top_k < 0) return fail(cmd, "--top-k must be >= 0");
  if (!(o.sampling.top_p > 0 && o.sampling.top_p <= 1))
    return fail(cmd, absl::StrCat("--top-p must be in (0, 1], got ", o.sampling.top_p));
  auto l = load_model_from_flags(/*need_tokenizer=*/true);
  if (!l.ok()) return fail(cmd, std::string(l.status().message()));
  const model::LoadedModel& m = l->loaded;
  const tokenizer::Tokenizer& tokenizer = *m.tokenizer;
  std::cerr << "model: " << l->description << "\n";
  auto encoded = tokenizer.encode(o.prompt, /*add_bos=*/true);
  if (encoded.empty())
    return fail(cmd, "the prompt gives no tokens and the tokenizer adds no BOS; give --prompt");
  const std::vector<int64_t> prompt_ids(encoded.begin(), encoded.end());
  model::SamplingOptions s = o.sampling;
  s.eos_id = tokenizer.eos_id() >= 0 ? tokenizer.eos_id() : m.eos_id;

  if (!o.print_json) std::cout << o.prompt << std::flush;
  const auto start = std::chrono::steady_clock::now();
  const model::Generation generation =
      model::generate(m.model, prompt_ids, o.max_new_tokens, s, [&](int64_t id) {
        if (!o.print_json && id != s.eos_id)
          std::cout << tokenizer.decode_token(static_cast<int32_t>(id)) << std::flush;
        return true;
      });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const std::vector<int64_t>& ids = generation.ids;
  if (generation.stop == model::StopReason::kContext)
    std::cerr << absl::StrFormat(
        "\n[generate: stopped at the model's context length (%d tokens: %d prompt + %d new); "
        "it does not slide its window]\n",
        m.model->context_length(), prompt_ids.size(), ids.size());
  const bool stopped_at_eos = !ids.empty() && ids.back() == s.eos_id;
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  if (stopped_at_eos) ids32.pop_back();
  json j = {{"model", m.path},
            {"prompt", o.prompt},
            {"prompt_ids", prompt_ids},
            {"ids", ids},
            {"text", tokenizer.decode(ids32)},
            {"stopped_at_eos", stopped_at_eos},
            {"stop", model::stop_reason_name(generation.stop)},
            {"temperature", s.temperature},
            {"top_k", s.top_k},
            {"top_p", s.top_p},
            {"seed", s.seed},
            {"seconds", seconds},
            {"tokens_per_second", seconds > 0 ? ids.size() / seconds : 0.0}};
  if (l->saap)
    j["saap"] = {{"top_l", l->saap->options().top_l},
                 {"routing", saap::routing_name(l->saap->options().routing)},
                 {"keys_visited", l->saap->stats().visited_fraction()}};
  // Generated text may cut a UTF-8 sequence (byte tokens): invalid bytes become U+FFFD.
  std::cout << (o.print_json ? j.dump(-1, ' ', false, json::error_handler_t::replace) : "") << "\n";
  std::cerr << absl::StrFormat("%d tokens in %.2f s (%.1f tokens/s)%s\n", ids.size(), seconds,
                               seconds > 0 ? ids.size() / seconds : 0.0,
                               stopped_at_eos ? ", stopped at EOS" : "");
  if (auto st = write_json_file(j); !st.ok()) return fail(cmd, std::string(st.message()));
  return 0;
}

GenerateOptions options_from_flags() {
  GenerateOptions o;
  o.prompt = absl::GetFlag(FLAGS_prompt);
  o.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  o.sampling.temperature = absl::GetFlag(FLAGS_temperature);
  o.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  o.sampling.top_p = absl::GetFlag(FLAGS_top_p);
  o.sampling.seed = absl::GetFlag(FLAGS_seed);
  o.print_json = absl::GetFlag(FLAGS_json);
  return o;
}

int guarded(const GenerateOptions& o) {
  try {
    return generate(o);
  } catch (const std::exception& e) {
    return fail("generate", error_text(e));
  }
}

int run_generate(const Args& positional, const Args&) {
  if (!positional.empty())
    return fail("generate", absl::StrCat("unexpected argument '", positional[0],
                                         "' (the prompt is given with --prompt)"));
  return guarded(options_from_flags());
}

// `sample --checkpoint RUN --tokens N` = `generate --model RUN --max-new-tokens N --top-k 40`.
int run_sample(const Args& positional, const Args&) {
  if (!positional.empty())
    return fail("sample", absl::StrCat("unexpected argument '", positional[0],
                                       "' (the prompt is given with --prompt)"));
  const std::string run = absl::GetFlag(FLAGS_checkpoint);
  deprecated(absl::StrCat("sparseflash generate --model ", run));
  if (absl::GetFlag(FLAGS_tokens) < 0) return fail("sample", "--tokens must be >= 0");
  absl::SetFlag(&FLAGS_model, run);
  GenerateOptions o = options_from_flags();
  o.max_new_tokens = absl::GetFlag(FLAGS_tokens);
  if (!flag_given("top_k")) o.sampling.top_k = 40;
  return guarded(o);
}

}  // namespace

Command generate_command() {
  std::vector<std::string> flags = model_flag_names();
  for (const char* f : {"prompt", "max_new_tokens", "temperature", "top_k", "top_p"})
    flags.push_back(f);
  return {"generate",
          "sparseflash generate --model PATH [--tokenizer PATH] --prompt TEXT\n"
          "                            [--max-new-tokens N] [--temperature T] [--top-k K]\n"
          "                            [--top-p P] [--seed S]",
          "continue a prompt with any model (KV cache)",
          "--model is a pretrained Llama-family model or a run of ours (GPT or Llama; its\n"
          "tokenizer is the one its data was prepared with, checked to be unchanged). Encodes\n"
          "--prompt (BOS added when the tokenizer's own configuration adds one) and generates up\n"
          "to --max-new-tokens tokens with the KV cache, streaming them to stdout; stops at the\n"
          "end-of-sequence token and at the model's context length. Temperature 0 is greedy\n"
          "(argmax); otherwise --top-k and --top-p narrow the draw and --seed fixes it. --json\n"
          "prints one JSON object instead.",
          flags,
          run_generate};
}

Command sample_command() {
  return {"sample",
          "sparseflash sample [--checkpoint PATH] [--prompt TEXT] [--tokens N]  (deprecated)",
          nullptr,
          "Deprecated: use `sparseflash generate --model PATH --max-new-tokens N`; this spelling\n"
          "goes in the next release. Continues --prompt with --tokens tokens sampled from the\n"
          "run (temperature, top-k 40 unless given), with the tokenizer of its prepared data.",
          {"checkpoint", "prompt", "tokens", "temperature", "top_k", "seed", "device"},
          run_sample};
}

}  // namespace sparseflash::cli
