// `sparseflash prepare`: text files, directories or archives into token
// shards and meta.json (data/prepare.h).
#include <unistd.h>

#include <iostream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/command.h"
#include "data/prepare.h"

ABSL_FLAG(std::string, out, "data/linux-docs", "Output directory for shards and meta.json.");
ABSL_FLAG(std::vector<std::string>, include, {},
          "Comma-separated glob patterns a document path must match (fnmatch; '*' also "
          "matches '/'). Empty = every document.");
ABSL_FLAG(std::vector<std::string>, exclude, {},
          "Comma-separated glob patterns of document paths to leave out.");
ABSL_FLAG(double, val_fraction, 0.05, "Fraction of documents held out for validation.");
ABSL_FLAG(int64_t, document_separator, -1,
          "Token id written after each document; -1 = the tokenizer's end-of-sequence token "
          "(byte: 0). Needed for a tokenizer without one.");
ABSL_FLAG(bool, add_bos, false,
          "Start each document with the tokenizer's BOS (as its configuration puts it in front "
          "of a sequence); an error for tokenizers that add none, such as byte.");
ABSL_FLAG(bool, join_dir, false,
          "One document per directory: the files of a directory (after --include/--exclude) are "
          "concatenated in path order, named by the directory's path (which decides its split); "
          "subdirectories are documents of their own. Archive members are grouped by their "
          "parent directory; an archive's matched text is held in memory until it is read.");
ABSL_FLAG(uint64_t, shard_tokens, 100000000, "Maximum tokens per shard file.");
ABSL_FLAG(uint64_t, max_bytes, 0, "Stop reading input after this many bytes (0 = no limit).");
ABSL_FLAG(uint64_t, min_document_tokens, 0,
          "Drop documents of fewer tokens than this (counted in meta.json as short_documents); "
          "0 keeps all. For long-context work, the context length.");

ABSL_DECLARE_FLAG(std::string, tokenizer);

namespace sparseflash::cli {
namespace {

int run_prepare(const Args& positional, const Args&) {
  if (positional.empty()) return fail("prepare", "no input given (files, directories or .tar.xz)");
  data::PrepareOptions o;
  o.inputs = positional;
  o.out_dir = absl::GetFlag(FLAGS_out);
  o.include = absl::GetFlag(FLAGS_include);
  o.exclude = absl::GetFlag(FLAGS_exclude);
  o.val_fraction = absl::GetFlag(FLAGS_val_fraction);
  o.tokenizer = absl::GetFlag(FLAGS_tokenizer);
  o.document_separator = absl::GetFlag(FLAGS_document_separator);
  o.add_bos = absl::GetFlag(FLAGS_add_bos);
  o.join_dir = absl::GetFlag(FLAGS_join_dir);
  o.shard_tokens = absl::GetFlag(FLAGS_shard_tokens);
  o.max_bytes = absl::GetFlag(FLAGS_max_bytes);
  o.min_document_tokens = absl::GetFlag(FLAGS_min_document_tokens);
  if (!(o.val_fraction > 0 && o.val_fraction < 1))
    return fail("prepare", absl::StrCat("--val-fraction must be in (0, 1), got ", o.val_fraction));
  if (o.shard_tokens < 1) return fail("prepare", "--shard-tokens must be >= 1");
  if (o.document_separator < -1)
    return fail("prepare", absl::StrCat("--document-separator must be a token id or -1, got ",
                                        o.document_separator));
  const bool tty = isatty(STDERR_FILENO);
  o.progress = [tty](const std::string& line) {
    if (tty) std::cerr << "\r\033[K" << line << std::flush;
    else std::cerr << line << "\n";
  };
  auto meta = data::prepare(o);
  if (tty) std::cerr << "\n";
  if (!meta.ok()) return fail("prepare", std::string(meta.status().message()));
  std::cout << absl::StrFormat(
      "wrote %s: train %d documents, %d tokens in %d shard(s); val %d documents, %d tokens; "
      "%d skipped%s; unigram baseline %.4f bits/byte; tokenizer %s (vocabulary %d)\n",
      o.out_dir, meta->train_documents, meta->train_tokens, meta->train_shards.size(),
      meta->val_documents, meta->val_tokens, meta->skipped_documents,
      o.min_document_tokens > 0
          ? absl::StrFormat(", %d shorter than %d tokens", meta->short_documents,
                            o.min_document_tokens)
          : "",
      meta->unigram_bits_per_byte, meta->tokenizer, meta->vocab_size);
  return 0;
}

}  // namespace

Command prepare_command() {
  return {"prepare",
          "sparseflash prepare INPUT... [--out DIR] [--include GLOBS] [--exclude GLOBS]\n"
          "                           [--tokenizer byte|FILE] [--document-separator ID] [--add-bos]\n"
          "                           [--join-dir] [--min-document-tokens N]",
          "turn text files, directories or .tar.xz archives into token shards",
          "Reads documents (files; directories recursively; members of .tar, .tar.xz, .tar.gz),\n"
          "skips binary ones, splits them by document into train and validation, tokenizes\n"
          "and writes train_*.bin, val_*.bin and meta.json (see README, Data formats).\n"
          "--tokenizer byte (the default) writes one token per byte; a tokenizer file\n"
          "(tokenizer.json, .gguf, llama2.c tokenizer.bin) writes its ids (uint16 or uint32),\n"
          "with its end-of-sequence token after each document. --join-dir makes each\n"
          "directory's files one document (a source tree gives long documents).\n"
          "Example (the default corpus):\n"
          "  sparseflash prepare /usr/src/linux-source-6.1.tar.xz --out data/linux-docs \\\n"
          "      --include '*/Documentation/*.rst,*/Documentation/*.txt'",
          {"out", "include", "exclude", "val_fraction", "tokenizer", "document_separator",
           "add_bos", "join_dir", "shard_tokens", "max_bytes", "min_document_tokens"},
          run_prepare};
}

}  // namespace sparseflash::cli
