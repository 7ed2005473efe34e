#include "tokenizer/text.h"

#include <algorithm>
#include <unordered_map>

namespace sparseflash::tokenizer {

size_t utf8_char_length(std::string_view s, size_t pos, int32_t* codepoint) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  const uint8_t b0 = byte(pos);
  size_t n = 0;
  uint32_t cp = 0;
  if (b0 < 0x80) {
    if (codepoint) *codepoint = b0;
    return 1;
  } else if ((b0 & 0xE0) == 0xC0) {
    n = 2, cp = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    n = 3, cp = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    n = 4, cp = b0 & 0x07;
  } else {
    if (codepoint) *codepoint = -1;
    return 1;
  }
  if (pos + n > s.size()) {
    if (codepoint) *codepoint = -1;
    return 1;
  }
  for (size_t i = 1; i < n; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) {
      if (codepoint) *codepoint = -1;
      return 1;
    }
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  // Overlong forms, surrogates and values past U+10FFFF are invalid too.
  static constexpr uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMin[n] || (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF) {
    if (codepoint) *codepoint = -1;
    return 1;
  }
  if (codepoint) *codepoint = static_cast<int32_t>(cp);
  return n;
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

bool is_unicode_whitespace(int32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

const std::array<uint32_t, 256>& byte_to_char() {
  // Printable Latin-1 bytes stand for themselves; the others are moved to U+0100 and up
  // in byte order, so that no token contains whitespace or control characters.
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[b] = printable ? b : next++;
    }
    return t;
  }();
  return table;
}

namespace {
const std::unordered_map<uint32_t, uint8_t>& char_to_byte() {
  static const std::unordered_map<uint32_t, uint8_t> map = [] {
    std::unordered_map<uint32_t, uint8_t> m;
    for (int b = 0; b < 256; ++b) m[byte_to_char()[b]] = static_cast<uint8_t>(b);
    return m;
  }();
  return map;
}
}  // namespace

bool byte_level_to_bytes(std::string_view token, std::string* bytes) {
  bytes->clear();
  const auto& map = char_to_byte();
  for (size_t pos = 0; pos < token.size();) {
    int32_t cp = -1;
    const size_t n = utf8_char_length(token, pos, &cp);
    const auto it = cp >= 0 ? map.find(static_cast<uint32_t>(cp)) : map.end();
    if (it == map.end()) {
      bytes->assign(token);
      return false;
    }
    bytes->push_back(static_cast<char>(it->second));
    pos += n;
  }
  return true;
}

std::string bytes_to_byte_level(std::string_view bytes) {
  std::string out;
  for (const char c : bytes) append_utf8(out, byte_to_char()[static_cast<uint8_t>(c)]);
  return out;
}

// ---------------------------------------------------------------------------------
// Added tokens

AddedTokenSplitter::AddedTokenSplitter(std::vector<AddedToken> tokens) {
  for (auto& t : tokens)
    if (!t.content.empty()) tokens_.push_back(std::move(t));
  std::stable_sort(tokens_.begin(), tokens_.end(), [](const AddedToken& a, const AddedToken& b) {
    return a.content.size() > b.content.size();
  });
  for (size_t i = 0; i < tokens_.size(); ++i)
    by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(static_cast<int>(i));
}

namespace {
bool is_word_byte(std::string_view text, size_t pos) {
  const auto c = static_cast<uint8_t>(text[pos]);
  return c >= 0x80 || c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
         (c >= 'A' && c <= 'Z');
}

// Start of the whitespace run that ends at `end` (not before `floor`).
size_t whitespace_run_start(std::string_view text, size_t floor, size_t end) {
  size_t start = end;
  while (start > floor) {
    size_t prev = start - 1;
    while (prev > floor && (static_cast<uint8_t>(text[prev]) & 0xC0) == 0x80) --prev;
    int32_t cp = -1;
    if (utf8_char_length(text, prev, &cp) != start - prev || !is_unicode_whitespace(cp)) break;
    start = prev;
  }
  return start;
}
}  // namespace

std::vector<AddedTokenSplitter::Piece> AddedTokenSplitter::split(std::string_view text) const {
  std::vector<Piece> pieces;
  size_t text_start = 0;   // start of the raw text not yet emitted
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* found = nullptr;
    for (const int i : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const AddedToken& t = tokens_[i];
      if (text.compare(pos, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        const size_t end = pos + t.content.size();
        if ((pos > 0 && is_word_byte(text, pos - 1)) ||
            (end < text.size() && is_word_byte(text, end)))
          continue;
      }
      found = &t;
      break;
    }
    if (!found) {
      ++pos;
      continue;
    }
    size_t before_end = pos;
    size_t after = pos + found->content.size();
    if (found->lstrip) before_end = whitespace_run_start(text, text_start, pos);
    if (found->rstrip) {
      while (after < text.size()) {
        int32_t cp = -1;
        const size_t n = utf8_char_length(text, after, &cp);
        if (!is_unicode_whitespace(cp)) break;
        after += n;
      }
    }
    if (before_end > text_start) pieces.push_back({text.substr(text_start, before_end - text_start)});
    pieces.push_back({{}, found->id});
    text_start = pos = after;
  }
  if (text_start < text.size()) pieces.push_back({text.substr(text_start)});
  return pieces;
}

}  // namespace sparseflash::tokenizer
