// What the data/ tests share: a temporary directory, file helpers, random
// text and tokens, the byte tokenizer, and a generated corpus for prepare.
// Included by data_test.cc, prepare_test.cc and prepare_tokenizer_test.cc.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "tests/test_util.h"
#include "checkpoint/gguf_writer.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenizer/byte.h"
#include "tokenizer/spm.h"
#include "tokenizer/text.h"
#include "tokenizer/tokenizer.h"

#ifndef SF_PYTHON
#define SF_PYTHON "python3"
#endif

namespace sparseflash::data {
namespace {

// --- Helpers ------------------------------------------------------------------

// A fresh directory under /tmp, removed (recursively) at the end of the test.
class TempDir {
 public:
  TempDir() {
    char templ[] = "/tmp/sf_data_test.XXXXXX";
    const char* p = ::mkdtemp(templ);
    if (p == nullptr) std::abort();
    path_ = p;
  }
  ~TempDir() {
    ::nftw(
        path_.c_str(),
        [](const char* p, const struct stat*, int, struct FTW*) {
          ::chmod(p, 0700);  // undo chmod 0500 from the unwritable-dir test
          return 0;
        },
        16, FTW_PHYS);
    test_util::remove_tree(path_);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

void make_dirs(const std::string& dir) {
  for (size_t i = 1; i <= dir.size(); ++i) {
    if (i == dir.size() || dir[i] == '/') ::mkdir(dir.substr(0, i).c_str(), 0755);
  }
}

void write_file(const std::string& path, const std::string& contents) {
  make_dirs(path.substr(0, path.find_last_of('/')));
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f << contents;
  ASSERT_TRUE(f.good()) << path;
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

std::vector<std::string> list_dir(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (struct dirent* e = ::readdir(d)) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names.push_back(n);
    }
    ::closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Whether a temporary of `path` ("PATH.tmp" or "PATH.tmp.PID") is left beside it.
bool has_temporary(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = path.substr(0, slash), prefix = path.substr(slash + 1) + ".tmp";
  for (const std::string& name : list_dir(dir)) {
    if (name.compare(0, prefix.size(), prefix) == 0) return true;
  }
  return false;
}

// Random text of `words` words, with some multi-byte UTF-8 mixed in.
std::string random_text(std::mt19937_64& rng, int words) {
  static const char* kWords[] = {"attention", "sparse", "flash", "token", "gradient", "the",
                                 "of", "and", "café", "naïve", "漢字", "über", "x", "loss"};
  std::string out;
  for (int i = 0; i < words; ++i) {
    out += kWords[rng() % (sizeof(kWords) / sizeof(kWords[0]))];
    out += (rng() % 9 == 0) ? "\n" : " ";
  }
  return out;
}

// Overwrites `size` bytes at `offset` of a file.
void patch(const std::string& path, size_t offset, const void* bytes, size_t size) {
  int fd = ::open(path.c_str(), O_WRONLY);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(::pwrite(fd, bytes, size, static_cast<off_t>(offset)), static_cast<ssize_t>(size));
  ::close(fd);
}

std::vector<int32_t> random_tokens(uint64_t seed, size_t n, int vocab) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& v : t) v = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  t[n / 2] = vocab - 1;  // the largest id must round-trip too
  t[0] = 1;              // never all zeros
  return t;
}

// All tokens of one split, concatenated across its shards.
std::vector<int32_t> split_tokens(const std::string& dir, const std::vector<std::string>& shards) {
  std::vector<int32_t> out;
  for (const auto& name : shards) {
    auto shard = Shard::open(dir + "/" + name);
    EXPECT_TRUE(shard.ok()) << shard.status();
    if (!shard.ok()) continue;
    for (uint64_t i = 0; i < shard->size(); ++i) out.push_back(static_cast<int32_t>(shard->token(i)));
  }
  return out;
}

const tokenizer::Tokenizer& byte_tokenizer() {
  static const tokenizer::ByteTokenizer tok;
  return tok;
}

// Decodes a split back into its documents, each ended by `separator` (byte: 0).
std::vector<std::string> split_documents(const std::string& dir,
                                         const std::vector<std::string>& shards,
                                         const tokenizer::Tokenizer& tok = byte_tokenizer(),
                                         int32_t separator = 0) {
  std::vector<std::string> docs;
  std::vector<int32_t> tokens = split_tokens(dir, shards);
  size_t begin = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] == separator) {
      docs.push_back(tok.decode(std::vector<int32_t>(tokens.begin() + begin, tokens.begin() + i)));
      begin = i + 1;
    }
  }
  EXPECT_EQ(begin, tokens.size()) << "split does not end with an end-of-document token";
  return docs;
}

std::vector<std::string> sorted(std::vector<std::string> v) {
  std::sort(v.begin(), v.end());
  return v;
}

bool contains(const absl::Status& s, const std::string& text) {
  return std::string(s.message()).find(text) != std::string::npos;
}

// Where prepare puts a document path in [0, 10^6): below val_fraction * 10^6 is val.
uint64_t split_key_for_test(const std::string& path) { return fnv1a64(path.data(), path.size()) % 1000000; }

// --- Shard ------------------------------------------------------------------------

namespace fs = std::filesystem;
using nlohmann::json;
using test_util::must;

// A generated corpus under <root>/corpus with text files in nested
// directories plus files that prepare must skip or filter.
struct Corpus {
  std::map<std::string, std::string> documents;  // eligible: doc path -> text
  std::vector<std::string> file_paths;            // absolute paths of the eligible files
  uint64_t bytes = 0;
};

Corpus make_corpus(const std::string& root, int count = 40) {
  Corpus c;
  std::mt19937_64 rng(1234);
  const char* dirs[] = {"", "src/", "src/deep/", "docs/", "docs/a/b/"};
  for (int i = 0; i < count; ++i) {
    const std::string rel = std::string(dirs[i % 5]) + "doc" + std::to_string(i) +
                            (i % 3 == 0 ? ".md" : ".txt");
    const std::string text = random_text(rng, 20 + static_cast<int>(rng() % 300));
    write_file(root + "/corpus/" + rel, text);
    c.documents["corpus/" + rel] = text;
    c.file_paths.push_back(root + "/corpus/" + rel);
    c.bytes += text.size();
  }
  // Skipped (counted): a binary with NUL bytes and invalid UTF-8.
  write_file(root + "/corpus/bin/blob.txt", std::string("ELF\0\0\1\2binary", 14));
  write_file(root + "/corpus/bad_utf8.txt", "caf\xe9 latin-1 \xff");
  // Not documents: empty, excluded by a glob across '/', not included.
  write_file(root + "/corpus/empty.txt", "");
  write_file(root + "/corpus/src/skipme/x.txt", "excluded by */skipme/*");
  write_file(root + "/corpus/notes.log", "excluded by *.log");
  write_file(root + "/corpus/data.csv", "not included,1,2");
  return c;
}

PrepareOptions corpus_options(const std::string& root, const std::string& out) {
  PrepareOptions o;
  o.inputs = {root + "/corpus"};
  o.out_dir = out;
  o.include = {"*.txt", "*.md", "*.log"};
  o.exclude = {"*.log", "corpus/*/skipme/*"};
  o.val_fraction = 0.3;
  o.shard_tokens = 1000;  // several shards, documents straddling them
  return o;
}

}  // namespace
}  // namespace sparseflash::data
