// Token sequences to evaluate a model on (`eval --model`, `saap fit|eval`):
// a text file encoded with the model's tokenizer, or token shards.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::data {

struct TokenSource {
  std::string text;    // a UTF-8 text file, encoded with BOS first
  std::string shards;  // comma-separated .bin shards, or a prepared directory (its val_*.bin)
  int64_t max_tokens = 0;  // keep only the first N tokens (0 = all)
};

struct Tokens {
  std::vector<int64_t> ids;
  std::string source;          // the file or shards they came from
  int64_t text_bytes = 0;      // text only: bytes read
  double encode_seconds = 0;   // text only
};

// Exactly one of source.text and source.shards must be given. `tokenizer`
// encodes text (it may be null for shards); shard ids must fit vocab_size.
// Errors name the flag (--text, --data) and the file.
absl::StatusOr<Tokens> read_tokens(const TokenSource& source, const tokenizer::Tokenizer* tokenizer,
                                   int64_t vocab_size);

}  // namespace sparseflash::data
