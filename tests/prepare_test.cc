// Tests for data/prepare: byte-token corpora (splits, archives, failures,
// --max-bytes, the unigram baseline) and --join-dir.
#include "tests/data_test_util.h"

namespace sparseflash::data {
namespace {

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

}  // namespace
}  // namespace sparseflash::data
