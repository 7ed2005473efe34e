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
#include "data/meta.h"
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

// Runs the whole preparation. Output files are written under temporary names
// and renamed at the end: on error nothing in out_dir is replaced.
absl::StatusOr<Meta> prepare(const PrepareOptions& options);

}  // namespace sparseflash::data
