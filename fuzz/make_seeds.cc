// Writes the torch-free fuzzers' seed corpora: small valid files of each format
// (and a few near misses) into OUT/safetensors, OUT/gguf, OUT/llama2c,
// OUT/tokenizer_json and OUT/saap_index. (make_checkpoint_seeds writes the
// training checkpoints, which need LibTorch.)
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/escaping.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/llama.h"
#include "checkpoint/safetensors.h"
#include "nlohmann/json.hpp"
#include "saap/index_file.h"
#include "tokenizer/bpe.h"
#include "tokenizer/hf_json.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/text.h"

using namespace sparseflash::checkpoint;
using nlohmann::json;
namespace saap = sparseflash::saap;
namespace tok = sparseflash::tokenizer;

namespace {

// A seed that cannot be written or read back ends the run with the error.
void must(const absl::Status& status) {
  if (status.ok()) return;
  std::fprintf(stderr, "make_seeds: %s\n", std::string(status.message()).c_str());
  std::exit(1);
}
template <typename T>
T must(absl::StatusOr<T> value) {
  must(value.status());
  return *std::move(value);
}

std::mt19937 rng(1234);

std::vector<float> floats(size_t n) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

std::string as_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

void save(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
}

LlamaConfig tiny(bool tied, int64_t kv_heads) {
  LlamaConfig c;
  c.vocab_size = 11;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = kv_heads;
  c.head_dim = 2;
  c.max_position_embeddings = 6;
  c.tie_word_embeddings = tied;
  return c;
}

std::map<std::string, std::vector<float>> weights(const LlamaConfig& c) {
  std::map<std::string, std::vector<float>> w;
  int64_t h = c.hidden_size, kv = c.num_key_value_heads * c.head_dim, i = c.intermediate_size;
  w["model.embed_tokens.weight"] = floats(c.vocab_size * h);
  w["model.norm.weight"] = floats(h);
  if (!c.tie_word_embeddings) w["lm_head.weight"] = floats(c.vocab_size * h);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    w[llama_layer_tensor(l, "self_attn.q_proj.weight")] = floats(h * h);
    w[llama_layer_tensor(l, "self_attn.k_proj.weight")] = floats(kv * h);
    w[llama_layer_tensor(l, "self_attn.v_proj.weight")] = floats(kv * h);
    w[llama_layer_tensor(l, "self_attn.o_proj.weight")] = floats(h * h);
    w[llama_layer_tensor(l, "mlp.gate_proj.weight")] = floats(i * h);
    w[llama_layer_tensor(l, "mlp.up_proj.weight")] = floats(i * h);
    w[llama_layer_tensor(l, "mlp.down_proj.weight")] = floats(h * i);
    w[llama_layer_tensor(l, "input_layernorm.weight")] = floats(h);
    w[llama_layer_tensor(l, "post_attention_layernorm.weight")] = floats(h);
  }
  return w;
}

void safetensors_seeds(const std::string& dir) {
  std::vector<float> a = floats(12);
  std::vector<uint16_t> h(6);
  for (size_t k = 0; k < h.size(); ++k) h[k] = float_to_half(static_cast<float>(k) - 2.5f);
  std::vector<int64_t> ids = {1, -2, 3};
  std::string path = dir + "/a.safetensors";
  must(write_safetensors(path,
                         {{"a", DType::kF32, {3, 4}, a.data(), 48},
                          {"h", DType::kF16, {2, 3}, h.data(), 12},
                          {"bf", DType::kBF16, {3}, h.data(), 6},
                          {"ids", DType::kI64, {3}, ids.data(), 24},
                          {"empty", DType::kU8, {0}, nullptr, 0}},
                         {{"format", "pt"}, {"sparseflash_format", "llama-v1"}}));
  must(write_safetensors(dir + "/b.safetensors", {{"x", DType::kF32, {}, a.data(), 4}}, {}));
  save(dir + "/config.json", llama_config_to_json(tiny(false, 2)));
}

void gguf_seeds(const std::string& dir) {
  GgufBuilder b;
  b.add_string("general.architecture", "test");
  b.add_u32("u", 7);
  b.add_bool("flag", true);
  b.add_f32("f", 0.5f);
  b.add_string_array("tokenizer.ggml.tokens", {"<s>", "a", "b", "ab"});
  b.add_f32_array("tokenizer.ggml.scores", {0.0f, -1.0f, -2.0f, -3.0f});
  b.add_i32_array("tokenizer.ggml.token_type", {3, 1, 1, 1});
  b.add_raw_kv("nested", 9, GgufBuilder::encode<uint32_t>(9) + GgufBuilder::encode<uint64_t>(1) +
                                GgufBuilder::encode<uint32_t>(0) + GgufBuilder::encode<uint64_t>(2) + "xy");
  b.set_alignment(64);
  b.add_tensor("f32", DType::kF32, {2, 3}, as_bytes(floats(6)));
  std::string q(34, '\x03');
  b.add_tensor("q8", DType::kQ8_0, {32}, q);
  b.add_tensor("q41", DType::kQ4_1, {32}, std::string(20, '\x11'));
  b.add_tensor("q40", DType::kQ4_0, {32}, std::string(18, '\x21'));
  b.add_tensor("q50", DType::kQ5_0, {32}, std::string(22, '\x31'));
  b.add_tensor("q51", DType::kQ5_1, {32}, std::string(24, '\x41'));
  save(dir + "/test.gguf", b.bytes());

  // A tiny Llama in llama.cpp's naming.
  LlamaConfig c = tiny(false, 2);
  auto w = weights(c);
  GgufBuilder l(2);
  l.add_string("general.architecture", "llama");
  l.add_u32("llama.context_length", 6);
  l.add_u32("llama.embedding_length", 8);
  l.add_u32("llama.block_count", 2);
  l.add_u32("llama.feed_forward_length", 12);
  l.add_u32("llama.attention.head_count", 4);
  l.add_u32("llama.attention.head_count_kv", 2);
  l.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  l.add_f32("llama.rope.freq_base", 10000.0f);
  l.add_string("llama.rope.scaling.type", "linear");
  l.add_f32("llama.rope.scaling.factor", 2.0f);
  const std::pair<const char*, const char*> names[] = {
      {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"}, {"attn_norm", "input_layernorm"}, {"ffn_norm", "post_attention_layernorm"}};
  auto shape_of = [&](const std::string& hf, size_t n) -> std::vector<int64_t> {
    if (hf.find("norm") != std::string::npos) return {static_cast<int64_t>(n)};
    int64_t rows = hf.find("down_proj") != std::string::npos || hf.find("o_proj") != std::string::npos
                       ? 8 : static_cast<int64_t>(n) / 8;
    return {rows, static_cast<int64_t>(n) / rows};
  };
  l.add_tensor("token_embd.weight", DType::kF32, {11, 8}, as_bytes(w["model.embed_tokens.weight"]));
  l.add_tensor("output_norm.weight", DType::kF32, {8}, as_bytes(w["model.norm.weight"]));
  l.add_tensor("output.weight", DType::kF32, {11, 8}, as_bytes(w["lm_head.weight"]));
  for (int layer = 0; layer < 2; ++layer) {
    for (const auto& [g, hf] : names) {
      std::string hf_name = llama_layer_tensor(layer, std::string(hf) + ".weight");
      const std::vector<float>& v = w[hf_name];
      l.add_tensor("blk." + std::to_string(layer) + "." + g + ".weight", DType::kF32, shape_of(hf_name, v.size()),
                   as_bytes(v));
    }
  }
  save(dir + "/llama.gguf", l.bytes());
}

void llama2c_seeds(const std::string& dir) {
  for (int version : {0, 1}) {
    for (bool tied : {true, false}) {
      LlamaConfig c = tiny(tied, tied ? 4 : 2);
      std::string name = dir + "/v" + std::to_string(version) + (tied ? "_tied" : "_untied") + ".bin";
      save(name, must(llama2c_bytes(c, version, weights(c))));
    }
  }
}

// Byte-level BPE tokenizer.json files: every byte a token, a few merges, the
// pre-tokenizer, post-processor and added-token shapes the reader knows. A seed
// is tokenizer.json [NUL tokenizer_config.json NUL config.json] (fuzz_tokenizer_json.cc).
void tokenizer_json_seeds(const std::string& dir) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tok::bytes_to_byte_level(std::string(1, static_cast<char>(b)))] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {"l", "l"}, {"he", "ll"}, {"hell", "o"}, {"\xc4\xa0", "w"}, {"1", "2"}};
  int next = 256;
  json merge_strings = json::array(), merge_pairs = json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = next++;
    merge_strings.push_back(a + " " + b);
    merge_pairs.push_back({a, b});
  }
  const json byte_level = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};
  json gpt2 = {{"version", "1.0"}, {"normalizer", nullptr}, {"pre_tokenizer", byte_level},
               {"decoder", byte_level}, {"post_processor", byte_level},
               {"added_tokens", {{{"id", next}, {"content", "<|endoftext|>"}, {"special", true}}}},
               {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merge_strings}}}};
  gpt2["model"]["vocab"]["<|endoftext|>"] = next;
  save(dir + "/gpt2.json", gpt2.dump(1));

  // Llama-3 style: a Split regex, then ByteLevel without its own; merges as pairs;
  // a BOS template; BOS/EOS named by the files beside it.
  json llama3 = gpt2;
  llama3["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"}, {"pattern", {{"Regex", tok::kLlama3Pattern}}}, {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  llama3["decoder"] = {{"type", "Sequence"}, {"decoders", {byte_level}}};
  llama3["model"]["merges"] = merge_pairs;
  llama3["model"]["ignore_merges"] = true;
  llama3["added_tokens"].push_back({{"id", next + 1}, {"content", "<|begin_of_text|>"}, {"lstrip", true}});
  llama3["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single", {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                  {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {next + 1}}}}}}};
  const json tokenizer_config = {{"bos_token", "<|begin_of_text|>"},
                                 {"eos_token", {{"content", "<|endoftext|>"}}}};
  const json model_config = {{"bos_token_id", next + 1}, {"eos_token_id", {next, 0}}};
  save(dir + "/llama3.json", llama3.dump(1) + std::string(1, '\0') + tokenizer_config.dump() +
                                 std::string(1, '\0') + model_config.dump());

  // Digits split, byte fallback and an unknown token; a Roberta post-processor.
  json digits = gpt2;
  digits["pre_tokenizer"] = {{"type", "Sequence"},
                             {"pretokenizers",
                              {{{"type", "Digits"}, {"individual_digits", true}},
                               {{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "Isolated"}},
                               byte_level}}};
  digits["model"]["byte_fallback"] = true;
  digits["model"]["unk_token"] = "<|endoftext|>";
  digits["model"]["vocab"]["<0x41>"] = next + 2;
  digits["post_processor"] = {{"type", "RobertaProcessing"}, {"cls", {"<|endoftext|>", next}}};
  save(dir + "/digits.json", digits.dump());

  for (const char* name : {"gpt2.json", "llama3.json", "digits.json"}) {
    std::ifstream in(dir + "/" + name, std::ios::binary);
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    const size_t nul = text.find('\0');
    std::string_view configs = nul == std::string::npos ? std::string_view() : std::string_view(text).substr(nul + 1);
    const size_t nul2 = configs.find('\0');
    tok::BpeTokenizer t(tok::parse_hf_tokenizer_json(name, std::string_view(text).substr(0, nul),
                                                     configs.substr(0, nul2),
                                                     nul2 == std::string_view::npos ? "" : configs.substr(nul2 + 1)),
                        name);
    if (t.decode(t.encode("hello world 12", true)).find("hello world 12") == std::string::npos) {
      std::fprintf(stderr, "make_seeds: %s does not round-trip\n", name);
      std::exit(1);
    }
  }
}

// SAAP index files (saap/index.h), with and without budget curves and recency bands.
void saap_index_seeds(const std::string& dir) {
  for (const bool extras : {false, true}) {
    saap::SaapHeader h;
    h.set_format_version(saap::kSaapFormatVersion);
    h.set_model_identity("llama:fnv1a64:0123456789abcdef");
    h.set_num_layers(extras ? 1 : 2);
    h.set_num_query_heads(2);
    h.set_num_kv_heads(1);
    h.set_head_dim(2);
    h.set_partitions(3);
    h.set_classifier_hidden(4);
    h.set_local_window(16);
    h.set_sink_tokens(1);
    if (extras) {
      for (const float g : {0.0f, 0.25f, 1.0f}) h.add_budget_grid(g);
      for (const int e : {4, 32}) h.add_recency_edges(e);
      h.set_count_prior(true);
    }
    std::vector<std::vector<float>> values;
    std::vector<TensorToWrite> tensors;
    values.reserve(64);
    for (int layer = 0; layer < h.num_layers(); ++layer) {
      for (const std::string& suffix : saap::saap_tensor_suffixes(h)) {
        const std::vector<int64_t> shape = saap::saap_tensor_shape(h, suffix);
        values.push_back(floats(static_cast<size_t>(shape_numel(shape))));
        for (float& v : values.back()) v = std::abs(v) + 0.125f;   // in_std > 0, budgets >= 0
        tensors.push_back({saap::saap_tensor_name(layer, suffix), DType::kF32, shape, values.back().data(),
                           values.back().size() * 4});
      }
    }
    const std::string path = dir + (extras ? "/extras.saap" : "/plain.saap");
    must(write_safetensors(path, tensors,
                           {{saap::kSaapFormatKey, saap::kSaapFormatValue},
                            {saap::kSaapHeaderKey, absl::Base64Escape(h.SerializeAsString())}}));
    std::vector<float> buffer;
    const absl::StatusOr<saap::SaapHeader> back = saap::read_saap_file(
        *must(SafetensorsFile::open(path)), path, [&](size_t, const std::string&, const std::vector<int64_t>& shape) {
          buffer.assign(static_cast<size_t>(shape_numel(shape)), 0.0f);
          return buffer.data();
        });
    if (!back.ok()) {
      std::fprintf(stderr, "make_seeds: %s\n", std::string(back.status().message()).c_str());
      std::exit(1);
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr, "usage: make_seeds OUT\nWrites seed corpora to OUT/{safetensors,gguf,llama2c,tokenizer_json,saap_index}.\n");
    return argc == 2 ? 0 : 2;
  }
  std::string out = argv[1];
  for (const char* sub : {"", "/safetensors", "/gguf", "/llama2c", "/tokenizer_json", "/saap_index"})
    mkdir((out + sub).c_str(), 0755);
  safetensors_seeds(out + "/safetensors");
  gguf_seeds(out + "/gguf");
  llama2c_seeds(out + "/llama2c");
  tokenizer_json_seeds(out + "/tokenizer_json");
  saap_index_seeds(out + "/saap_index");
  // Every seed must parse: a corpus of broken files would fuzz only the first check.
  must(load_llama_checkpoint(out + "/gguf/llama.gguf"));
  must(load_llama_checkpoint(out + "/llama2c/v1_untied.bin"));
  must(load_llama_checkpoint(out + "/llama2c/v0_tied.bin"));
  must(SafetensorsFile::open(out + "/safetensors/a.safetensors"));
  must(GgufFile::open(out + "/gguf/test.gguf"));
  return 0;
}
