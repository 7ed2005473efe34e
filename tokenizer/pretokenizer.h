// Regex pre-tokenisation with RE2. The patterns of GPT-2, Llama-3, Qwen2 and SmolLM end
// in `\s+(?!\S)|\s+`, a lookahead RE2 cannot run; split_pattern() rewrites that tail
// into a captured `\s+` and Splitter gives the last whitespace character back when the
// run is followed by a non-space, which is exactly what the backtracking engines of
// HF tokenizers (Oniguruma) and llama.cpp produce. `\s`/`\S` become Unicode White_Space
// classes, as they are there (RE2's own \s is ASCII only).
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace re2 {
class RE2;
}

namespace sparseflash::tokenizer {

// The patterns of the known pre-tokenizers, as HF tokenizer.json and llama.cpp write them.
extern const char* const kGpt2Pattern;
extern const char* const kLlama3Pattern;
extern const char* const kQwen2Pattern;

// One Split step (HF behaviour "Isolated": matches and the text between them both
// become pieces).
class Splitter {
 public:
  // Throws std::invalid_argument when the pattern uses lookaround other than the
  // whitespace tail above, or does not compile in RE2.
  explicit Splitter(const std::string& hf_pattern);
  ~Splitter();
  Splitter(Splitter&&) noexcept;
  // Appends the pieces of `text` to *out, in order; together they cover `text`.
  void split(std::string_view text, std::vector<std::string_view>* out) const;
  const std::string& re2_pattern() const { return re2_pattern_; }

 private:
  std::string re2_pattern_;
  std::unique_ptr<re2::RE2> re_;
  bool has_whitespace_tail_ = false;   // capture group 1 is the rewritten `\s+`
};

// HF patterns into RE2 syntax; *whitespace_tail tells whether group 1 needs give-back.
std::string translate_pattern(const std::string& hf_pattern, bool* whitespace_tail);

// A sequence of Split steps, each applied to every piece of the previous one.
class PreTokenizer {
 public:
  PreTokenizer() = default;
  void add_split(const std::string& hf_pattern) { steps_.emplace_back(hf_pattern); }
  bool empty() const { return steps_.empty(); }
  std::vector<std::string_view> split(std::string_view text) const;

 private:
  std::vector<Splitter> steps_;
};

}  // namespace sparseflash::tokenizer
