// ContentHash: FNV-1a 64 over what a tokenizer encodes and decodes by, for
// Tokenizer::identity(). Every value goes in with a fixed width or a length in front,
// so that different contents cannot run together into the same byte stream.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <string_view>

namespace sparseflash::tokenizer {

class ContentHash {
 public:
  void add_int(int64_t value) {
    const auto v = static_cast<uint64_t>(value);
    for (int i = 0; i < 8; ++i) add_byte(static_cast<uint8_t>(v >> (8 * i)));   // little-endian
  }
  void add_float(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    add_int(bits);
  }
  void add_bytes(std::string_view s) {
    add_int(static_cast<int64_t>(s.size()));
    for (const char c : s) add_byte(static_cast<uint8_t>(c));
  }

  // "<kind>:<vocab_size>:fnv1a64:<16 hex digits>".
  std::string identity(const std::string& kind, int64_t vocab_size) const {
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(state_));
    return kind + ":" + std::to_string(vocab_size) + ":fnv1a64:" + hex;
  }

 private:
  void add_byte(uint8_t b) {
    state_ ^= b;
    state_ *= 1099511628211ull;
  }
  uint64_t state_ = 14695981039346656037ull;
};

}  // namespace sparseflash::tokenizer
