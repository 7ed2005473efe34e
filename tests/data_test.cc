// Tests for data/: the shard format, meta.json and the window loader
// (preparation: prepare_test.cc, prepare_tokenizer_test.cc).
#include "tests/data_test_util.h"

namespace sparseflash::data {
namespace {

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
    EXPECT_FALSE(has_temporary(path));
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
  EXPECT_FALSE(has_temporary(path));
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
