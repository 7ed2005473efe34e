// The Llama loader and writers: GGUF, llama2.c, HF directories and our
// native format mapped to HF names, round trips and identities.
#include "tests/checkpoint_test_util.h"

namespace sparseflash::checkpoint {
namespace {

// --- Llama checkpoints ------------------------------------------------------------------

TEST(Llama, GgufTinyModelMapsToHfNames) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  for (bool untied : {false, true}) {
    SCOPED_TRACE(untied ? "untied" : "tied");
    std::string dir = make_temp_dir();
    uint32_t seed = std::random_device{}() % 100000;
    ASSERT_EQ(run_python("ckpt_gguf_reference.py llama " + dir + " --seed " + std::to_string(seed) +
                         (untied ? " --untied" : "")), 0);
    json expected = json::parse(read_file(dir + "/expected.json"));
    LlamaCheckpoint ckpt = must(load_llama_checkpoint(dir + "/llama.gguf"));
    const json& cfg = expected["config"];
    EXPECT_EQ(ckpt.format, SourceFormat::kGguf);
    EXPECT_EQ(ckpt.config.vocab_size, cfg["vocab_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.hidden_size, cfg["hidden_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.intermediate_size, cfg["intermediate_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_hidden_layers, cfg["num_hidden_layers"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_attention_heads, cfg["num_attention_heads"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_key_value_heads, cfg["num_key_value_heads"].get<int64_t>());
    EXPECT_EQ(ckpt.config.head_dim, 16);
    EXPECT_EQ(ckpt.config.max_position_embeddings, cfg["max_position_embeddings"].get<int64_t>());
    EXPECT_FLOAT_EQ(static_cast<float>(ckpt.config.rms_norm_eps), 1e-5f);
    EXPECT_EQ(ckpt.config.rope_theta, 50000.0);
    EXPECT_EQ(ckpt.config.tie_word_embeddings, !untied);
    EXPECT_EQ(ckpt.config.bos_token_id, 1);
    EXPECT_EQ(ckpt.config.eos_token_id, 2);
    EXPECT_TRUE(ckpt.qk_interleaved);
    const json& tensors = expected["tensors"];
    ASSERT_EQ(ckpt.tensors.size(), tensors.size());
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      auto t = ckpt.tensors.find(it.key());
      ASSERT_NE(t, ckpt.tensors.end()) << it.key();
      EXPECT_EQ(t->second.shape, it.value()["shape"].get<std::vector<int64_t>>()) << it.key();
      expect_values(t->second, it.value()["values"]);
    }
    EXPECT_EQ(ckpt.identity.rfind("fnv1a64:", 0), 0u);
    EXPECT_EQ(ckpt.identity.size(), 8u + 16u);
  }
}



void expect_tensors_equal(const LlamaCheckpoint& ckpt, const std::map<std::string, std::vector<float>>& want) {
  ASSERT_EQ(ckpt.tensors.size(), want.size());
  for (const auto& [name, values] : want) {
    auto it = ckpt.tensors.find(name);
    ASSERT_NE(it, ckpt.tensors.end()) << name;
    EXPECT_EQ(to_float32(it->second), values) << name;
  }
}

TEST(Llama, Llama2cLegacyAndVersion1RoundTrip) {
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  for (int version : {0, 1}) {
    for (bool tied : {true, false}) {
      SCOPED_TRACE("version " + std::to_string(version) + (tied ? " tied" : " untied"));
      LlamaConfig c = tiny_config(tied);
      auto weights = random_llama(c, seed + version * 2 + tied);
      std::string path = dir + "/model_" + std::to_string(version) + (tied ? "t" : "u") + ".bin";
      write_file(path, must(llama2c_bytes(c, version, weights)));
      LlamaCheckpoint ckpt = must(load_llama_checkpoint(path));
      EXPECT_EQ(ckpt.format, SourceFormat::kLlama2c);
      EXPECT_TRUE(ckpt.qk_interleaved);
      EXPECT_EQ(ckpt.config.vocab_size, 37);
      EXPECT_EQ(ckpt.config.hidden_size, 24);
      EXPECT_EQ(ckpt.config.intermediate_size, 40);
      EXPECT_EQ(ckpt.config.num_hidden_layers, 3);
      EXPECT_EQ(ckpt.config.num_attention_heads, 6);
      EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
      EXPECT_EQ(ckpt.config.head_dim, 4);
      EXPECT_EQ(ckpt.config.max_position_embeddings, 19);
      EXPECT_EQ(ckpt.config.rms_norm_eps, 1e-5);
      EXPECT_EQ(ckpt.config.rope_theta, 10000.0);
      EXPECT_EQ(ckpt.config.tie_word_embeddings, tied);
      expect_tensors_equal(ckpt, weights);
    }
  }
}

TEST(Llama, Llama2cV1HeaderLayout) {
  // The version-1 header as llama2.c's export.py writes it, field by field.
  LlamaConfig c = tiny_config(false);
  auto weights = random_llama(c, 7);
  std::string bytes = must(llama2c_bytes(c, 1, weights));
  ASSERT_GE(bytes.size(), 256u);
  EXPECT_EQ(bytes.substr(0, 4), "24ka");  // uint32 0x616b3432, little-endian
  int32_t ints[8];
  std::memcpy(ints, bytes.data() + 4, sizeof ints);
  EXPECT_EQ(ints[0], 1);
  EXPECT_EQ((std::vector<int32_t>(ints + 1, ints + 8)), (std::vector<int32_t>{24, 40, 3, 6, 2, 37, 19}));
  EXPECT_EQ(bytes[36], 0);  // shared_classifier
  // Weights start at 256 with the first layer's attention norm.
  const std::vector<float>& norm0 = weights.at(llama_layer_tensor(0, "input_layernorm.weight"));
  EXPECT_EQ(std::memcmp(bytes.data() + 256, norm0.data(), norm0.size() * 4), 0);
  // Legacy: embedding first, right after the 28-byte header; negative vocab = untied.
  std::string legacy = must(llama2c_bytes(c, 0, weights));
  std::memcpy(ints, legacy.data(), 28);
  EXPECT_EQ(ints[5], -37);
  const std::vector<float>& emb = weights.at("model.embed_tokens.weight");
  EXPECT_EQ(std::memcmp(legacy.data() + 28, emb.data(), emb.size() * 4), 0);
}

TEST(Llama, NativeRoundTripAndIdentity) {
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  LlamaConfig c = tiny_config(false);
  c.rope_theta = 123456.0;
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 16;
  c.bos_token_id = 3;
  c.eos_token_id = 4;
  auto weights = random_llama(c, seed);
  std::vector<TensorToWrite> to_write;
  for (const auto& [name, v] : weights) {
    int64_t n = static_cast<int64_t>(v.size());
    std::vector<int64_t> shape = {n};
    if (name.find("norm") == std::string::npos) {
      int64_t rows = name.find("down_proj") != std::string::npos || name.find("o_proj") != std::string::npos
                         ? c.hidden_size
                         : n / c.hidden_size;
      shape = {rows, n / rows};
    }
    to_write.push_back({name, DType::kF32, shape, v.data(), v.size() * 4});
  }
  must(write_native_llama(dir + "/native", c, to_write));
  LlamaCheckpoint ckpt = must(load_llama_checkpoint(dir + "/native"));
  EXPECT_EQ(ckpt.format, SourceFormat::kNative);
  EXPECT_FALSE(ckpt.qk_interleaved);
  EXPECT_EQ(ckpt.config.rope_theta, 123456.0);
  EXPECT_EQ(ckpt.config.rope_scaling.type, "llama3");
  EXPECT_EQ(ckpt.config.rope_scaling.factor, 8.0);
  EXPECT_EQ(ckpt.config.rope_scaling.original_max_position_embeddings, 16);
  EXPECT_EQ(ckpt.config.bos_token_id, 3);
  EXPECT_EQ(ckpt.config.eos_token_id, 4);
  EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
  expect_tensors_equal(ckpt, weights);
  // Identity: stable across loads and paths, sensitive to a weight.
  std::string id = ckpt.identity;
  EXPECT_EQ(must(load_llama_checkpoint(dir + "/native")).identity, id);
  ASSERT_EQ(std::rename((dir + "/native").c_str(), (dir + "/moved").c_str()), 0);
  EXPECT_EQ(must(load_llama_checkpoint(dir + "/moved")).identity, id);
  EXPECT_EQ(must(load_llama_checkpoint(dir + "/moved/model.safetensors")).identity, id);
  weights["model.norm.weight"][0] += 1.0f;
  must(write_native_llama(dir + "/changed", c, to_write));
  EXPECT_NE(must(load_llama_checkpoint(dir + "/changed")).identity, id);
}

TEST(Llama, HfConfigVariants) {
  std::string v4 = R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [7, 8], "bos_token_id": null})";
  LlamaConfig c = must(llama_config_from_json("v4.json", v4));
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_id, 7);
  EXPECT_EQ(c.bos_token_id, -1);
  std::string v5 = R"({"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": true,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})";
  c = must(llama_config_from_json("v5.json", v5));
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.rope_theta, 50000.0);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_TRUE(c.tie_word_embeddings);
  // The JSON we write reads back the same.
  LlamaConfig back = must(llama_config_from_json("back.json", llama_config_to_json(c)));
  EXPECT_EQ(back.rope_scaling.type, "llama3");
  EXPECT_EQ(back.head_dim, 32);
  EXPECT_EQ(back.num_key_value_heads, 1);
  EXPECT_EQ(back.rope_theta, 50000.0);

  expect_error([&] { return llama_config_from_json("a.json", "{\"vocab_size\": 1"); }, {"a.json", "invalid JSON"});
  expect_error([&] { return llama_config_from_json("a.json", R"({"hidden_size": 8})"); }, {"a.json", "vocab_size", "missing"});
  expect_error([&] { return llama_config_from_json("a.json", R"({"model_type": "gpt2"})"); }, {"model_type"});
  std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2)";
  expect_error([&] { return llama_config_from_json("a.json", "{" + base + R"(, "num_key_value_heads": 3})"); },
               {"num_key_value_heads", "does not divide"});
  expect_error([&] { return llama_config_from_json("a.json", "{" + base + R"(, "rope_scaling": {"rope_type": "longrope", "factor": 2}})"); },
               {"rope_scaling.rope_type", "longrope"});
  // yarn: the pretraining context from the block (or max_position_embeddings),
  // a missing factor as the ratio; dynamic: the reference is max_position_embeddings.
  LlamaConfig yarn = must(llama_config_from_json("a.json", "{" + base + R"(, "max_position_embeddings": 64,
      "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 16, "beta_fast": 0}})"));
  EXPECT_EQ(yarn.rope_scaling.type, "yarn");
  EXPECT_EQ(yarn.rope_scaling.factor, 4.0);
  EXPECT_EQ(yarn.rope_scaling.beta_fast, 32.0);  // transformers' "or 32"
  LlamaConfig dynamic = must(llama_config_from_json("a.json", "{" + base + R"(, "max_position_embeddings": 100,
      "rope_scaling": {"rope_type": "dynamic", "factor": 2}})"));
  EXPECT_EQ(dynamic.rope_scaling.original_max_position_embeddings, 100);
  EXPECT_EQ(dynamic.max_position_embeddings, 200);
  expect_error([&] { return llama_config_from_json("a.json", "{" + base + R"(, "attention_bias": true})"); }, {"attention_bias"});
  expect_error([&] { return llama_config_from_json("a.json", "{" + base + R"(, "hidden_size": "8"})"); },
               {"hidden_size", "expected an integer"});
  expect_error([&] { return llama_config_from_json("a.json", "{" + base + R"(, "num_hidden_layers": -1})"); },
               {"num_hidden_layers", "positive"});
}

TEST(Llama, HfDirectoryFromTransformersAndNativeBack) {
  std::string reason;
  if (!python_has("transformers, torch, safetensors", &reason)) GTEST_SKIP() << reason;
  for (bool sharded : {false, true}) {
    SCOPED_TRACE(sharded ? "sharded, untied" : "single file, tied");
    std::string dir = make_temp_dir();
    uint32_t seed = std::random_device{}() % 100000;
    ASSERT_EQ(run_python("ckpt_hf_llama.py " + dir + " --seed " + std::to_string(seed) +
                         (sharded ? " --sharded" : " --tied")), 0);
    json expected = json::parse(read_file(dir + "/expected.json"));
    LlamaCheckpoint ckpt = must(load_llama_checkpoint(dir + "/model"));
    EXPECT_EQ(ckpt.format, SourceFormat::kHfSafetensors);
    EXPECT_FALSE(ckpt.qk_interleaved);
    const json& cfg = expected["config"];
    EXPECT_EQ(ckpt.config.vocab_size, 53);
    EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
    EXPECT_EQ(ckpt.config.head_dim, 8);
    EXPECT_EQ(ckpt.config.rope_theta, 31337.0);
    EXPECT_EQ(ckpt.config.rope_scaling.type, "llama3");
    EXPECT_EQ(ckpt.config.rope_scaling.factor, 4.0);
    EXPECT_EQ(ckpt.config.rope_scaling.original_max_position_embeddings, 32);
    EXPECT_EQ(ckpt.config.rms_norm_eps, 1e-5);
    EXPECT_EQ(ckpt.config.tie_word_embeddings, cfg["tied"].get<bool>());
    const json& tensors = expected["tensors"];
    ASSERT_EQ(ckpt.tensors.size(), tensors.size());
    std::vector<TensorToWrite> to_write;
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      auto t = ckpt.tensors.find(it.key());
      ASSERT_NE(t, ckpt.tensors.end()) << it.key();
      EXPECT_EQ(t->second.shape, it.value()["shape"].get<std::vector<int64_t>>());
      expect_values(t->second, it.value()["values"]);
      to_write.push_back({t->first, t->second.dtype, t->second.shape, t->second.data, t->second.nbytes});
    }
    // Our native format, loaded back by transformers.
    must(write_native_llama(dir + "/native", ckpt.config, to_write));
    EXPECT_EQ(run_python("ckpt_hf_llama.py " + dir + " --check " + dir + "/native"), 0);
  }
}

}  // namespace
}  // namespace sparseflash::checkpoint
