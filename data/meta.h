// meta.json of a prepared directory: what `sparseflash prepare` wrote (the
// tokenizer's identity and source, token and document counts, shard names).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::data {

// What meta.json records about a prepared directory.
struct Meta {
  // The identity of the tokenizer that made the ids (tokenizer::Tokenizer::identity():
  // "byte", or "<kind>:<vocab>:fnv1a64:<hash>"); checkpoints record it too.
  std::string tokenizer;
  // Where it was loaded from: "byte", or the absolute path given to prepare. Older
  // meta.json files lack it ("byte" is assumed for the byte tokenizer, else "").
  std::string tokenizer_source;
  std::string tokenizer_kind;   // "byte", "bpe", "spm" or "llama2c" ("" when unknown)
  int vocab_size = 0;
  int64_t document_separator = -1;   // the id after each document (byte: 0; -1 unknown)
  bool add_bos = false;              // each document starts with the tokenizer's BOS
  uint64_t train_tokens = 0, val_tokens = 0;
  uint64_t train_documents = 0, val_documents = 0;
  uint64_t train_bytes = 0, val_bytes = 0;  // text bytes before tokenization
  uint64_t skipped_documents = 0;
  // Documents dropped as shorter than min_document_tokens (both 0 when unset;
  // older meta.json files lack them).
  uint64_t min_document_tokens = 0;
  uint64_t short_documents = 0;
  std::vector<std::string> train_shards, val_shards;  // file names, in order
  // Cross-entropy of the validation tokens under the train unigram
  // distribution (add-one smoothed), in bits per byte: the baseline a model
  // must beat.
  double unigram_bits_per_byte = 0;
  double bytes_per_token() const;
};

// meta.json's text (JSON, 2-space indented, newline-terminated).
std::string meta_json(const Meta& meta);

// Reads DIR/meta.json; errors name the file and the key.
absl::StatusOr<Meta> read_meta(const std::string& dir);

// The tokenizer of prepared data, for sampling text or checking a prompt: opened from
// meta.tokenizer_source, and refused (naming the file and both identities) when its
// identity is no longer meta.tokenizer, i.e. the file changed since `prepare`.
absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> open_data_tokenizer(const Meta& meta);

}  // namespace sparseflash::data
