// Pass-key retrieval: one trial, and the sweep over contexts and depths.
#include "model/passkey.h"

#include <random>

#include "absl/strings/str_cat.h"
#include "model/generate.h"

namespace sparseflash::model {

namespace {

constexpr int64_t kAnswerTokens = 8;

std::vector<int64_t> encode(const tokenizer::Tokenizer& tokenizer, const std::string& text) {
  auto v = tokenizer.encode(text, /*add_bos=*/false);
  return std::vector<int64_t>(v.begin(), v.end());
}

std::string key_sentence(const std::string& key) {
  return absl::StrCat("\nThe pass key is ", key, ". Remember it. ", key, " is the pass key.\n");
}

const char* kQuestion = "\nWhat is the pass key? The pass key is";

}  // namespace

int64_t passkey_overhead(const tokenizer::Tokenizer& tokenizer) {
  const int64_t bos = static_cast<int64_t>(tokenizer.encode("", /*add_bos=*/true).size());
  // A margin of 4 for keys that tokenize longer than this one.
  return bos + static_cast<int64_t>(encode(tokenizer, key_sentence("12345")).size()) + 4 +
         static_cast<int64_t>(encode(tokenizer, kQuestion).size()) + kAnswerTokens;
}

PasskeyTrial passkey_trial(CausalLM& model, const tokenizer::Tokenizer& tokenizer,
                           const std::vector<int64_t>& filler, int64_t filler_tokens, double depth,
                           const std::string& key) {
  auto bos = tokenizer.encode("", /*add_bos=*/true);  // [BOS] or nothing
  std::vector<int64_t> prompt(bos.begin(), bos.end());
  const auto needle = encode(tokenizer, key_sentence(key));
  const auto question = encode(tokenizer, kQuestion);
  const int64_t at = static_cast<int64_t>(depth * static_cast<double>(filler_tokens));
  prompt.insert(prompt.end(), filler.begin(), filler.begin() + at);
  prompt.insert(prompt.end(), needle.begin(), needle.end());
  prompt.insert(prompt.end(), filler.begin() + at, filler.begin() + filler_tokens);
  prompt.insert(prompt.end(), question.begin(), question.end());
  SamplingOptions greedy;
  auto out = generate(model, prompt, kAnswerTokens, greedy).ids;
  PasskeyTrial t;
  t.depth = depth;
  t.key = key;
  t.prompt_tokens = static_cast<int64_t>(prompt.size());
  t.context = t.prompt_tokens + kAnswerTokens;
  t.answer = tokenizer.decode(std::vector<int32_t>(out.begin(), out.end()));
  t.found = t.answer.find(key) != std::string::npos;
  return t;
}

absl::StatusOr<PasskeyReport> passkey_retrieval(CausalLM model,
                                                const tokenizer::Tokenizer& tokenizer,
                                                const std::vector<int64_t>& filler,
                                                const PasskeyOptions& o) {
  if (o.contexts.empty()) return absl::InvalidArgumentError("pass key: no context length given");
  if (o.depths < 1 || o.keys < 1)
    return absl::InvalidArgumentError(
        absl::StrCat("pass key: depths and keys must be >= 1, got ", o.depths, " and ", o.keys));
  const int64_t overhead = passkey_overhead(tokenizer);
  for (int64_t c : o.contexts) {
    if (c <= overhead)
      return absl::InvalidArgumentError(absl::StrCat(
          "pass key: context ", c, " leaves no filler (the key, the question and the answer take ",
          overhead, " tokens)"));
    if (c > model->context_length())
      return absl::InvalidArgumentError(absl::StrCat(
          "pass key: context ", c, " exceeds the model's context length ", model->context_length(),
          " (extend it with RoPE scaling: --rope-scaling)"));
    if (c - overhead > static_cast<int64_t>(filler.size()))
      return absl::InvalidArgumentError(absl::StrCat(
          "pass key: context ", c, " needs ", c - overhead, " tokens of filler, the text gives ",
          filler.size()));
  }
  std::mt19937_64 rng(o.seed);
  PasskeyReport report;
  for (int64_t c : o.contexts) {
    PasskeyRow row;
    row.context = c;
    for (int d = 0; d < o.depths; ++d) {
      const double depth = o.depths == 1 ? 0.5 : static_cast<double>(d) / (o.depths - 1);
      for (int k = 0; k < o.keys; ++k) {
        const std::string key = std::to_string(10000 + rng() % 90000);
        PasskeyTrial t = passkey_trial(model, tokenizer, filler, c - overhead, depth, key);
        row.found += t.found;
        ++row.trials;
        if (o.progress) o.progress(t);
        report.trials.push_back(std::move(t));
      }
    }
    report.rows.push_back(row);
  }
  return report;
}

}  // namespace sparseflash::model
