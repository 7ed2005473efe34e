// Tokenizers: the byte tokenizer and the by-name factory.
#include "data/tokenizer.h"

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace sparseflash::data {

// --- ByteTokenizer ----------------------------------------------------------

std::vector<int32_t> ByteTokenizer::encode(std::string_view text) const {
  std::vector<int32_t> ids(text.size());
  // Through unsigned char: bytes >= 0x80 must map to 128..255, not negatives.
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode(const int32_t* ids, size_t count) const {
  std::string out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    // Id 0 only marks a document end (text documents never contain NUL), and
    // ids outside the byte range are a caller error: both are dropped.
    if (ids[i] <= 0 || ids[i] > 255) continue;
    out.push_back(static_cast<char>(static_cast<unsigned char>(ids[i])));
  }
  return out;
}

// --- Factory ----------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Tokenizer>> make_tokenizer(std::string_view name) {
  if (name == "byte") return std::unique_ptr<Tokenizer>(new ByteTokenizer());
  return absl::InvalidArgumentError(
      absl::StrCat("unknown tokenizer \"", std::string(name), "\"; known tokenizers: byte"));
}

}  // namespace sparseflash::data
