// `sparseflash prepare`: text files, directories or .tar.xz archives in,
// train/validation token shards and meta.json out.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenizer/tokenizer.h"

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
  // "byte" (vocabulary 256), or a file tokenizer::open_tokenizer takes: a
  // tokenizer.json, a directory holding one, a .gguf file, a llama2.c tokenizer.bin.
  std::string tokenizer = "byte";
  // The token written after each document; -1 = the tokenizer's end-of-sequence id
  // (byte: 0). A tokenizer without one needs it given.
  int64_t document_separator = -1;
  // Start each document with what the tokenizer's configuration puts in front of a
  // sequence (its BOS); an error for a tokenizer that puts nothing there.
  bool add_bos = false;
  // The files of one directory (directory inputs and archive members grouped by their
  // parent directory), after include/exclude, are concatenated in path order into one
  // document whose path is the directory's (so the split keeps a directory together).
  // Subdirectories are documents of their own. An archive's members of one directory
  // may lie anywhere in it: its matched text is held in memory until the archive ends.
  bool join_dir = false;
  // Fraction of documents sent to validation, chosen by a hash of the
  // document's path (stable across runs and input order).
  double val_fraction = 0.05;
  // Maximum tokens per shard file.
  uint64_t shard_tokens = 100'000'000;
  // Stop after this many input bytes (0 = no limit).
  uint64_t max_bytes = 0;
  // Drop documents of fewer tokens than this (separator included) after
  // tokenization; 0 keeps all. Long-context training and evaluation want
  // documents at least as long as the context.
  uint64_t min_document_tokens = 0;
  // Documents that contain a NUL byte or invalid UTF-8 are skipped (binaries).
  // Called every so often with a one-line progress message.
  std::function<void(const std::string&)> progress;
};

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

// Runs the whole preparation. Output files are written under temporary names
// and renamed at the end: on error nothing in out_dir is replaced.
absl::StatusOr<Meta> prepare(const PrepareOptions& options);

absl::StatusOr<Meta> read_meta(const std::string& dir);

// The tokenizer of prepared data, for sampling text or checking a prompt: opened from
// meta.tokenizer_source, and refused (naming the file and both identities) when its
// identity is no longer meta.tokenizer, i.e. the file changed since `prepare`.
absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> open_data_tokenizer(const Meta& meta);

}  // namespace sparseflash::data
