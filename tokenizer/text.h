// Small text helpers shared by the tokenizers: UTF-8 stepping, Unicode whitespace,
// GPT-2's byte <-> printable-character table, and the splitter that finds special
// (added) tokens in raw text before any pre-tokenisation.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace sparseflash::tokenizer {

// Length of the UTF-8 sequence starting at s[pos] (1..4), or 1 for an invalid byte,
// so that invalid input advances one byte at a time. *codepoint is -1 when invalid.
size_t utf8_char_length(std::string_view s, size_t pos, int32_t* codepoint = nullptr);
void append_utf8(std::string& out, uint32_t codepoint);

// Unicode White_Space (what \s means in the regexes of HF tokenizers and llama.cpp).
bool is_unicode_whitespace(int32_t codepoint);

// GPT-2's reversible byte <-> character map: byte b is written as the character
// byte_to_char()[b] in vocabularies and merges.
const std::array<uint32_t, 256>& byte_to_char();
// The bytes a byte-level token stands for; false when it has a character outside the
// map (then *bytes holds the token's own UTF-8, so it still decodes to something).
bool byte_level_to_bytes(std::string_view token, std::string* bytes);
std::string bytes_to_byte_level(std::string_view bytes);

// Tokens matched literally in the text before pre-tokenisation (HF added_tokens,
// GGUF control and user-defined tokens). Leftmost, then longest match wins.
struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool lstrip = false;       // also swallow the whitespace before it
  bool rstrip = false;       // also swallow the whitespace after it
  bool single_word = false;  // only where it is not inside a word
};

class AddedTokenSplitter {
 public:
  AddedTokenSplitter() = default;
  explicit AddedTokenSplitter(std::vector<AddedToken> tokens);
  struct Piece {
    std::string_view text;   // raw text between matches (empty when token >= 0)
    int32_t token = -1;      // an added token's id
  };
  std::vector<Piece> split(std::string_view text) const;
  bool empty() const { return tokens_.empty(); }

 private:
  std::vector<AddedToken> tokens_;                 // longest first
  std::array<std::vector<int>, 256> by_first_byte_;  // indices into tokens_
};

}  // namespace sparseflash::tokenizer
