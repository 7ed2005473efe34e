// What the checkpoint tests share: temporary directories and files, byte
// builders, error checks, random data, a GGUF tensor's values against the gguf
// package's, and in-memory files. Included by checkpoint_test.cc,
// llama_checkpoint_test.cc and checkpoint_corrupt_test.cc.
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/llama.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/tensor.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace sparseflash::checkpoint {
namespace {

using nlohmann::json;

// --- Helpers -------------------------------------------------------------------

std::string make_temp_dir() {
  std::string pattern = ::testing::TempDir() + "ckpt_XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return buf.data();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

template <typename T>
void append(std::string* s, T value) {
  s->append(reinterpret_cast<const char*>(&value), sizeof(T));
}

using sparseflash::test_util::python_has;
using sparseflash::test_util::run_python;

using sparseflash::test_util::expect_error;
using sparseflash::test_util::must;

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// Compares dequantised values with the reference (gguf.quants.dequantize).
void expect_values(const TensorInfo& t, const json& want_values) {
  std::vector<float> values = to_float32(t);
  std::vector<double> want = want_values.get<std::vector<double>>();
  ASSERT_EQ(values.size(), want.size()) << t.name;
  size_t mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::fabs(values[i] - want[i]) > 1e-6 * std::fabs(want[i])) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0u) << t.name;
}

std::shared_ptr<const MappedFile> mem(const std::string& name, const std::string& bytes) {
  return MappedFile::from_bytes(name, bytes.data(), bytes.size());
}

LlamaConfig tiny_config(bool tied) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 19;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = tied;
  return c;
}

// A random Llama in HF names (F32), for the llama2.c and native round trips.
std::map<std::string, std::vector<float>> random_llama(const LlamaConfig& c, uint32_t seed) {
  std::map<std::string, std::vector<float>> t;
  uint32_t k = seed;
  auto put = [&](const std::string& name, int64_t n) { t[name] = random_floats(static_cast<size_t>(n), k++, 0.3f); };
  int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  put("model.embed_tokens.weight", c.vocab_size * h);
  put("model.norm.weight", h);
  if (!c.tie_word_embeddings) put("lm_head.weight", c.vocab_size * h);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    put(llama_layer_tensor(i, "self_attn.q_proj.weight"), q * h);
    put(llama_layer_tensor(i, "self_attn.k_proj.weight"), kv * h);
    put(llama_layer_tensor(i, "self_attn.v_proj.weight"), kv * h);
    put(llama_layer_tensor(i, "self_attn.o_proj.weight"), h * q);
    put(llama_layer_tensor(i, "mlp.gate_proj.weight"), c.intermediate_size * h);
    put(llama_layer_tensor(i, "mlp.up_proj.weight"), c.intermediate_size * h);
    put(llama_layer_tensor(i, "mlp.down_proj.weight"), h * c.intermediate_size);
    put(llama_layer_tensor(i, "input_layernorm.weight"), h);
    put(llama_layer_tensor(i, "post_attention_layernorm.weight"), h);
  }
  return t;
}

}  // namespace
}  // namespace sparseflash::checkpoint
