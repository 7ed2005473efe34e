// Helpers of the tokenizer tests (tokenizer_test, tokenizer_reference_test,
// tokenizer_files_test): fresh directories and seeds, the Python reference
// runner, random text, small llama2.c and GGUF vocabularies, error checks.
#pragma once

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
#include "tests/test_util.h"
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

using sparseflash::test_util::llama2c_bin;

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

// A small tokenizer.json: byte-level BPE over "a", "b", "ab" and "\xC4\xA0" (a
// space), one merge, and the special token <|end|> (id 4).
json small_tokenizer_json() {
  return {{"normalizer", nullptr},
          {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
          {"decoder", {{"type", "ByteLevel"}}},
          {"post_processor", nullptr},
          {"added_tokens", json::array({{{"id", 4}, {"content", "<|end|>"}, {"special", true}}})},
          {"model", {{"type", "BPE"}, {"vocab", {{"a", 0}, {"b", 1}, {"ab", 2}, {"\xC4\xA0", 3}}},
                     {"merges", json::array({"a b"})}}}};
}

using sparseflash::test_util::expect_error;
using sparseflash::test_util::must;

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

}  // namespace
}  // namespace sparseflash::tokenizer
