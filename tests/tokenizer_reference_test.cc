// Tokenizers against the reference libraries (tokenizers, transformers,
// sentencepiece, and a plain port of llama2.c's encoder), run through SF_PYTHON
// by tests/python/tok_reference.py with a fresh seed per run.
#include "tests/tokenizer_test_util.h"

namespace sparseflash::tokenizer {
namespace {

// ---------------------------------------------------------------------------------
// Reference parity (Python)

class Reference : public testing::Test {
 protected:
  void run(const std::string& kind) {
    seed_ = fresh_seed();
    dir_ = fresh_dir(kind);
    std::string why;
    ok_ = run_reference(kind, dir_, seed_, &result_, &why);
    if (!ok_ && !HasFailure()) GTEST_SKIP() << "the Python at " << SF_PYTHON << " cannot run: " << why;
  }
  void TearDown() override {
    if (!HasFailure()) fs::remove_all(dir_);
  }
  uint64_t seed_ = 0;
  fs::path dir_;
  json result_;
  bool ok_ = false;
};

void expect_pieces(const BpeTokenizer& tok, const json& cases) {
  int failures = 0;
  for (const json& c : cases) {
    std::vector<std::string> ours;
    for (const std::string& p : tok.pre_tokenize(c.at("text").get<std::string>()))
      ours.push_back(bytes_to_byte_level(p));
    const auto theirs = c.at("pieces").get<std::vector<std::string>>();
    // The reference does not cut out added tokens here; compare texts without them.
    if (c.at("text").get<std::string>().find("<|") != std::string::npos) continue;
    if (ours != theirs) {
      ADD_FAILURE() << "pre-tokenisation of " << escaped(c.at("text").get<std::string>())
                    << "\n  ours:      " << json(ours).dump() << "\n  reference: " << json(theirs).dump();
      if (++failures > 5) return;
    }
  }
}

// A tokenizer.json trained by the tokenizers library: ids, add_bos, round trip and the
// pre-tokenizer's pieces; loaded from its directory (gpt2) or as a file (llama3).
void check_trained_tokenizer_json(const fs::path& dir, const json& result, bool by_dir) {
  const std::string file = (dir / "tokenizer.json").string();
  const auto tok = by_dir ? must(load_tokenizer(dir.string(), "")) : must(load_tokenizer("", file));
  ASSERT_EQ(tok->kind(), "bpe");
  expect_cases(*tok, result.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
  const BpeTokenizer bpe(read_hf_tokenizer_json(file), file);
  expect_pieces(bpe, result.at("cases"));
  // The same vocabulary as a GGUF "gpt2" tokenizer (tokenizer.ggml.pre gpt2, llama-bpe
  // or qwen2): the same ids.
  const auto from_gguf = must(load_tokenizer((dir / "vocab.gguf").string(), ""));
  expect_cases(*from_gguf, result.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
}

TEST_F(Reference, Gpt2StyleTokenizerJsonMatchesTokenizersLibrary) {
  run("gpt2");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_trained_tokenizer_json(dir_, result_, /*by_dir=*/true);
}

TEST_F(Reference, Llama3StyleTokenizerJsonMatchesTokenizersLibrary) {
  run("llama3");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_trained_tokenizer_json(dir_, result_, /*by_dir=*/false);
  const auto tok = must(load_tokenizer("", (dir_ / "tokenizer.json").string()));
  EXPECT_TRUE(tok->adds_bos());
  EXPECT_EQ(tok->bos_id(), 0);
}

TEST_F(Reference, Qwen2StyleTokenizerJsonMatchesTokenizersLibrary) {
  run("qwen2");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  check_trained_tokenizer_json(dir_, result_, /*by_dir=*/true);
}

TEST_F(Reference, SmolLM2GgufVocabularyMatchesTransformersWithSmolLM2PreTokenizer) {
  run("smollm");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto tok = must(load_tokenizer(result_.at("gguf").get<std::string>(), ""));
  EXPECT_EQ(tok->vocab_size(), 49152);
  // Reference: SmolLM2's own pre-tokenizer (digits one by one, then GPT-2's regex).
  expect_cases(*tok, result_.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
  // transformers' GGUF loader skips the digit split; without number characters in the
  // text the two must agree.
  int differ = 0, with_numbers = 0;
  for (const json& c : result_.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    const bool has_number = c.at("has_number").get<bool>();
    with_numbers += has_number;
    if (tok->encode(text, false) == ids_of(c.at("ids_transformers_gguf"))) continue;
    ++differ;
    EXPECT_TRUE(has_number) << "differs from transformers' GGUF tokenizer without a digit: " << escaped(text);
  }
  // With LoadOptions::gguf_pre_as_transformers, every string gives transformers' ids.
  LoadOptions like_transformers;
  like_transformers.gguf_pre_as_transformers = true;
  const auto compat = must(load_tokenizer(result_.at("gguf").get<std::string>(), "", like_transformers));
  int compat_failures = 0;
  for (const json& c : result_.at("cases")) {
    const std::string text = c.at("text").get<std::string>();
    if (compat->encode(text, false) != ids_of(c.at("ids_transformers_gguf")) && ++compat_failures <= 5)
      ADD_FAILURE() << "gguf_pre_as_transformers: differs from transformers on " << escaped(text);
  }
  std::printf("SmolLM2: %d of %zu strings (%d with number characters) tokenize differently in "
              "transformers' GGUF loader, which ignores tokenizer.ggml.pre\n",
              differ, result_.at("cases").size(), with_numbers);
}

GgufVocab vocab_from_json(const fs::path& path) {
  std::ifstream in(path);
  const json j = json::parse(in);
  GgufVocab v;
  v.model = j.at("model").get<std::string>();
  v.tokens = j.at("tokens").get<std::vector<std::string>>();
  v.scores = j.at("scores").get<std::vector<float>>();
  v.types = j.at("types").get<std::vector<int32_t>>();
  v.bos_id = j.at("bos_id").get<int32_t>();
  v.eos_id = j.at("eos_id").get<int32_t>();
  v.unk_id = j.at("unk_id").get<int32_t>();
  return v;
}

TEST_F(Reference, SentencePieceLlamaVocabularyMatchesSentencePiece) {
  run("spm");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto tok = make_gguf_tokenizer(vocab_from_json(dir_ / "vocab.json"), "vocab.json");
  ASSERT_EQ(tok->kind(), "spm");
  expect_cases(*tok, result_.at("cases"), /*round_trip=*/true, /*check_bos=*/false);
  const std::string text = result_.at("cases").back().at("text").get<std::string>();
  std::vector<int32_t> with_bos = tok->encode(text, true);
  ASSERT_FALSE(with_bos.empty());
  EXPECT_EQ(with_bos.front(), tok->bos_id());
  EXPECT_EQ(tok->decode(with_bos), text);
  // The same vocabulary written into a GGUF file by the gguf package.
  const auto from_gguf = must(load_tokenizer((dir_ / "vocab.gguf").string(), ""));
  expect_cases(*from_gguf, result_.at("cases"), true, false);
}

TEST_F(Reference, Llama2cTokenizerBinMatchesRunC) {
  run("llama2c");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto tok = must(load_tokenizer("", (dir_ / "tokenizer.bin").string()));
  ASSERT_EQ(tok->kind(), "llama2c");
  expect_cases(*tok, result_.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
  for (const json& c : result_.at("cases"))
    EXPECT_EQ(tok->decode(ids_of(c.at("ids_with_bos"))), c.at("text").get<std::string>());
  // The model path is enough when tokenizer.bin lies beside the checkpoint.
  write_file(dir_ / "model.bin", std::string(28, '\1'));
  EXPECT_EQ(must(load_tokenizer((dir_ / "model.bin").string(), ""))->vocab_size(), tok->vocab_size());
}

}  // namespace
}  // namespace sparseflash::tokenizer
