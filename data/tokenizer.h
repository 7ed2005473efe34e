// Tokenizers turn text into token ids and back. The byte tokenizer (vocab 256)
// is the only one for now; the interface is what a BPE tokenizer will implement.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace sparseflash::data {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  // Stable identifier recorded in shard metadata and checkpoints ("byte").
  virtual std::string name() const = 0;
  virtual int vocab_size() const = 0;
  // Token placed between documents when they are concatenated.
  virtual int32_t end_of_document() const = 0;
  virtual std::vector<int32_t> encode(std::string_view text) const = 0;
  // Ids outside [0, vocab_size) are an error of the caller; decode skips them.
  virtual std::string decode(const int32_t* ids, size_t count) const = 0;
};

// Bytes are tokens; byte 0 (never found in text documents) ends a document.
class ByteTokenizer final : public Tokenizer {
 public:
  std::string name() const override { return "byte"; }
  int vocab_size() const override { return 256; }
  int32_t end_of_document() const override { return 0; }
  std::vector<int32_t> encode(std::string_view text) const override;
  std::string decode(const int32_t* ids, size_t count) const override;
};

// Creates a tokenizer by name; unknown names are an error listing the known ones.
absl::StatusOr<std::unique_ptr<Tokenizer>> make_tokenizer(std::string_view name);

}  // namespace sparseflash::data
