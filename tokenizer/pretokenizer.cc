#include "tokenizer/pretokenizer.h"

#include <stdexcept>

#include "re2/re2.h"
#include "tokenizer/text.h"

namespace sparseflash::tokenizer {

const char* const kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";
const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

namespace {

// Unicode White_Space, inside a character class.
constexpr const char* kWhitespaceSet = R"(\t-\r\x{85}\p{Z})";

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::string translate_pattern(const std::string& hf_pattern, bool* whitespace_tail) {
  std::string body = hf_pattern;
  *whitespace_tail = false;
  for (const std::string tail : {R"(|\s+(?!\S)|\s+)", R"(|\s+(?!\S))"}) {
    if (ends_with(body, tail)) {
      body.resize(body.size() - tail.size());
      *whitespace_tail = true;
      break;
    }
  }
  if (body == R"(\s+(?!\S)|\s+)" || body == R"(\s+(?!\S))") {
    body.clear();
    *whitespace_tail = true;
  }
  std::string out;
  int class_depth = 0;
  for (size_t i = 0; i < body.size(); ++i) {
    const char c = body[i];
    if (c == '\\' && i + 1 < body.size()) {
      const char e = body[++i];
      if (e == 's') {
        out += class_depth > 0 ? std::string(kWhitespaceSet) : "[" + std::string(kWhitespaceSet) + "]";
      } else if (e == 'S') {
        if (class_depth > 0)
          throw std::invalid_argument("pre-tokenizer regex: \\S inside a character class is not supported: " + hf_pattern);
        out += "[^" + std::string(kWhitespaceSet) + "]";
      } else {
        out += c;
        out += e;
      }
      continue;
    }
    if (c == '[') {
      ++class_depth;
    } else if (c == ']' && class_depth > 0) {
      --class_depth;
    } else if (c == '(' && class_depth == 0) {
      if (body.compare(i, 3, "(?=") == 0 || body.compare(i, 3, "(?!") == 0 ||
          body.compare(i, 3, "(?<") == 0)
        throw std::invalid_argument(
            "pre-tokenizer regex: lookaround is not supported (only the `\\s+(?!\\S)|\\s+` tail "
            "of the GPT-2 family of patterns is): " + hf_pattern);
      // Turn plain groups into non-capturing ones so that group 1 stays ours.
      if (body.compare(i, 2, "(?") != 0) {
        out += "(?:";
        continue;
      }
    }
    out += c;
  }
  if (*whitespace_tail)
    out = out.empty() ? "([" + std::string(kWhitespaceSet) + "]+)"
                      : out + "|([" + std::string(kWhitespaceSet) + "]+)";
  return out;
}

Splitter::Splitter(const std::string& hf_pattern) {
  re2_pattern_ = translate_pattern(hf_pattern, &has_whitespace_tail_);
  RE2::Options options;
  options.set_log_errors(false);
  re_ = std::make_unique<re2::RE2>(re2_pattern_, options);
  if (!re_->ok())
    throw std::invalid_argument("pre-tokenizer regex does not compile in RE2 (" + re_->error() +
                                "): " + hf_pattern);
}

Splitter::~Splitter() = default;
Splitter::Splitter(Splitter&&) noexcept = default;

namespace {
// Whether text[start, end) is all whitespace, holds two characters or more, and is
// followed by a non-space: the only case where `\s+(?!\S)` gives a character back.
// Returns the start of the last character then, else 0.
size_t give_back_position(std::string_view text, size_t start, size_t end) {
  if (end >= text.size()) return 0;
  size_t last = 0;
  for (size_t pos = start; pos < end;) {
    int32_t cp = -1;
    const size_t n = utf8_char_length(text, pos, &cp);
    if (!is_unicode_whitespace(cp)) return 0;
    last = pos;
    pos += n;
  }
  return last > start ? last : 0;
}
}  // namespace

void Splitter::split(std::string_view text, std::vector<std::string_view>* out) const {
  const re2::StringPiece input(text.data(), text.size());
  re2::StringPiece groups[2];
  size_t pos = 0;       // where the next search starts
  size_t emitted = 0;   // end of the last piece
  // One submatch (the whole match) lets RE2 use its DFAs only; group 1 is asked for
  // only when a give-back is possible.
  while (pos < text.size() && re_->Match(input, pos, text.size(), RE2::UNANCHORED, groups, 1)) {
    const size_t start = groups[0].data() - text.data();
    size_t end = start + groups[0].size();
    if (end == start) {   // an empty match: step over one character
      pos = start + utf8_char_length(text, start);
      continue;
    }
    if (has_whitespace_tail_) {
      const size_t last = give_back_position(text, start, end);
      if (last > 0 && re_->Match(input, start, end, RE2::ANCHOR_BOTH, groups, 2) &&
          groups[1].data() != nullptr)
        end = last;
    }
    if (start > emitted) out->push_back(text.substr(emitted, start - emitted));
    out->push_back(text.substr(start, end - start));
    emitted = pos = end;
  }
  if (emitted < text.size()) out->push_back(text.substr(emitted));
}

std::vector<std::string_view> PreTokenizer::split(std::string_view text) const {
  std::vector<std::string_view> pieces{text};
  for (const Splitter& step : steps_) {
    std::vector<std::string_view> next;
    for (const std::string_view piece : pieces) step.split(piece, &next);
    pieces = std::move(next);
  }
  return pieces;
}

}  // namespace sparseflash::tokenizer
