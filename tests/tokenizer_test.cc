// Tokenizers without Python: pre-tokenisation, round trips on vocabularies
// built here, llama2.c's encoder on fixed strings, the byte tokenizer,
// identities and open_tokenizer. Parity with the reference libraries:
// tokenizer_reference_test; corrupt and unsupported files: tokenizer_files_test.
#include "tests/tokenizer_test_util.h"

namespace sparseflash::tokenizer {
namespace {

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
// Round trips on vocabularies built here (no Python)

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

TEST(Identity, StableAcrossLoadsAndPathsDifferentBetweenTokenizers) {
  const fs::path dir = fresh_dir("identity");
  fs::create_directories(dir / "one");
  fs::create_directories(dir / "two");
  write_file(dir / "one/tokenizer.json", small_tokenizer_json().dump());
  write_file(dir / "two/tokenizer.json", small_tokenizer_json().dump(2));   // other spacing, same tokenizer
  write_file(dir / "m.gguf", gguf_with_vocab(add_good_vocab));
  write_file(dir / "tokenizer.bin", llama2c_bin(llama2c_vocab()));

  const std::string json_id = must(open_tokenizer((dir / "one/tokenizer.json").string()))->identity();
  EXPECT_TRUE(std::regex_match(json_id, std::regex("bpe:5:fnv1a64:[0-9a-f]{16}"))) << json_id;
  EXPECT_EQ(must(open_tokenizer((dir / "one").string()))->identity(), json_id);
  EXPECT_EQ(must(open_tokenizer((dir / "two/tokenizer.json").string()))->identity(), json_id);
  const std::string gguf_id = must(open_tokenizer((dir / "m.gguf").string()))->identity();
  EXPECT_EQ(must(open_tokenizer((dir / "m.gguf").string()))->identity(), gguf_id);
  EXPECT_EQ(gguf_id.rfind("bpe:258:fnv1a64:", 0), 0u) << gguf_id;
  const std::string llama2c_id = must(open_tokenizer((dir / "tokenizer.bin").string()))->identity();
  EXPECT_EQ(must(open_tokenizer((dir / "tokenizer.bin").string()))->identity(), llama2c_id);
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
    return must(open_tokenizer((dir / "two").string()))->identity();
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
  ids.insert(must(open_tokenizer((dir / "two").string()))->identity());   // the EOS id
  write_file(dir / "m2.gguf", gguf_with_vocab([](checkpoint::GgufBuilder& b) { add_vocab(b, false); }));
  const std::string no_bos_id = must(open_tokenizer((dir / "m2.gguf").string()))->identity();
  ids.insert(no_bos_id);
  LoadOptions like_transformers;
  like_transformers.gguf_pre_as_transformers = true;   // the pre-tokenizer choice
  ids.insert(must(open_tokenizer((dir / "m.gguf").string(), like_transformers))->identity());
  auto scores = llama2c_vocab();
  scores.back().second += 0.25f;
  write_file(dir / "tokenizer.bin", llama2c_bin(scores));
  ids.insert(must(open_tokenizer((dir / "tokenizer.bin").string()))->identity());
  SpmVocab spm = small_spm_vocab();
  spm.add_space_prefix = false;
  ids.insert(SpmTokenizer(spm, "c").identity());
  EXPECT_EQ(ids.size(), 5u + 9u) << "two different tokenizers share an identity";
  fs::remove_all(dir);
}

TEST(OpenTokenizer, ByteOrATokenizerFileAndErrorsNameTheFile) {
  const fs::path dir = fresh_dir("open");
  EXPECT_EQ(must(open_tokenizer("byte"))->kind(), "byte");
  write_file(dir / "tokenizer.json", small_tokenizer_json().dump());
  EXPECT_EQ(must(open_tokenizer(dir.string()))->kind(), "bpe");
  write_file(dir / "tokenizer.bin", llama2c_bin(llama2c_vocab()));
  EXPECT_EQ(must(open_tokenizer((dir / "tokenizer.bin").string()))->kind(), "llama2c");
  expect_error([&] { return open_tokenizer((dir / "nope.json").string()); }, {(dir / "nope.json").string(), "no such"});
  expect_error([&] { return open_tokenizer(""); }, {"byte", "tokenizer.json"});
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sparseflash::tokenizer
