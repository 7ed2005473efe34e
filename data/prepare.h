// `sparseflash prepare`: text files, directories or .tar.xz archives in,
// train/validation token shards and meta.json out.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseflash::data {

struct PrepareOptions {
  // Files, directories (walked recursively, sorted) or .tar/.tar.xz/.tar.gz archives.
  std::vector<std::string> inputs;
  std::string out_dir;
  // Glob patterns (fnmatch, '*' also matches '/') on a document's path
  // (archive member path without a leading "./"; for a directory input,
  // "<dir name>/<relative path>"; a file input's path as given). Empty = every document.
  std::vector<std::string> include;
  std::vector<std::string> exclude;
  std::string tokenizer = "byte";
  // Fraction of documents sent to validation, chosen by a hash of the
  // document's path (stable across runs and input order).
  double val_fraction = 0.05;
  // Maximum tokens per shard file.
  uint64_t shard_tokens = 100'000'000;
  // Stop after this many input bytes (0 = no limit).
  uint64_t max_bytes = 0;
  // Documents that contain a NUL byte or invalid UTF-8 are skipped (binaries).
  // Called every so often with a one-line progress message.
  std::function<void(const std::string&)> progress;
};

// What meta.json records about a prepared directory.
struct Meta {
  std::string tokenizer;
  int vocab_size = 0;
  uint64_t train_tokens = 0, val_tokens = 0;
  uint64_t train_documents = 0, val_documents = 0;
  uint64_t train_bytes = 0, val_bytes = 0;  // text bytes before tokenization
  uint64_t skipped_documents = 0;
  std::vector<std::string> train_shards, val_shards;  // file names, in order
  // Cross-entropy of the validation tokens under the train unigram
  // distribution (add-one smoothed), in bits per byte: the baseline a model
  // must beat.
  double unigram_bits_per_byte = 0;
  double bytes_per_token() const;
};

// Runs the whole preparation. Output files are written under temporary names
// and renamed at the end: on error nothing in out_dir is replaced.
absl::StatusOr<Meta> prepare(const PrepareOptions& options);

absl::StatusOr<Meta> read_meta(const std::string& dir);

}  // namespace sparseflash::data
