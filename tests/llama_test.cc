// The Llama model against transformers on tiny random checkpoints: logits,
// decoding, fused projections, sparse kinds, RoPE scaling, sampling, the GPU
// kernels; loader errors; conversions and `eval`.
#include "tests/llama_test_util.h"

namespace sparseflash {
namespace {

// ---------------------------------------------------------------------------
// tiny random checkpoints vs transformers

class TinyLlamaParity : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyLlamaParity, LogitsGreedyAndWindowedNllMatchTransformers) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers/safetensors";
  const std::string dir = (tiny_models() / GetParam()).string();
  ASSERT_TRUE(fs::exists(dir + "/config.json")) << dir;
  auto m = load(dir);
  std::random_device rd;
  const unsigned seed = rd();
  SCOPED_TRACE("ids seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  // 29 tokens + 12 generated: past original_max_position_embeddings (16) of
  // the llama3 variant, so the scaled band is exercised.
  auto ids = random_ids(29, m->config().vocab_size, rng);
  Reference ref = reference("--model " + quote(dir), ids, "--greedy 12 --context 9 --stride 4",
                            GetParam());
  ASSERT_TRUE(ref.logits.defined());
  Tensor ours = our_logits(m, ids);
  ASSERT_EQ(ours.sizes(), ref.logits.sizes());
  EXPECT_LE(max_abs_diff(ours, ref.logits), 1e-4);
  EXPECT_GT(ref.logits.abs().max().item<double>(), 1.0);  // the comparison is not vacuous

  model::SamplingOptions greedy;  // temperature 0, no EOS stop
  EXPECT_EQ(model::generate(m, ids, 12, greedy).ids, ref.greedy);

  auto nll = model::sliding_window_nll(m, ids, 9, 4);
  EXPECT_EQ(nll.tokens, ref.nll_tokens);
  EXPECT_EQ(nll.tokens, static_cast<int64_t>(ids.size()) - 1);
  EXPECT_NEAR(nll.nll_sum, ref.nll_sum, 1e-4 * std::max(1.0, std::abs(ref.nll_sum)));
}

INSTANTIATE_TEST_SUITE_P(Variants, TinyLlamaParity,
                         ::testing::Values("gqa_llama3_sharded", "tied_linear", "odd_sizes",
                                           "head_dim_64", "dynamic_ntk", "yarn", "yarn_mscale"),
                         [](const auto& info) { return info.param; });

// The KV cache gives the logits of a full forward pass.
TEST(Llama, CachedDecodingMatchesFullForward) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  auto m = load((tiny_models() / "gqa_llama3_sharded").string());
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(21, m->config().vocab_size, rng);
  Tensor full = our_logits(m, ids);
  torch::NoGradGuard no_grad;
  model::KVCache cache;
  Tensor all = at::tensor(ids, at::kLong).view({1, -1});
  Tensor a = m->forward(all.slice(1, 0, 13), &cache)[0];
  std::vector<Tensor> parts = {a};
  for (int64_t t = 13; t < 21; ++t) parts.push_back(m->forward(all.slice(1, t, t + 1), &cache)[0]);
  EXPECT_EQ(cache.length, 21);
  EXPECT_LE(max_abs_diff(at::cat(parts, 0), full), 1e-5);
}

// Inference runs fused [q; k; v] and [gate; up] GEMMs; with autograd on the
// separate modules run. Both give the same logits, and the weights are views.
TEST(Llama, FusedProjectionsMatchTheModules) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  auto m = load((tiny_models() / "gqa_llama3_sharded").string());
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(19, m->config().vocab_size, rng);
  Tensor fused = our_logits(m, ids);
  Tensor separate = m->forward(at::tensor(ids, at::kLong).view({1, -1}))[0];
  EXPECT_TRUE(separate.requires_grad());
  EXPECT_LE(max_abs_diff(fused, separate.detach()), 1e-5);
  auto layer = m->layers[1]->as<model::LlamaLayer>();
  EXPECT_TRUE(layer->self_attn->k_proj->weight.is_alias_of(layer->self_attn->q_proj->weight));
  EXPECT_TRUE(layer->up_proj->weight.is_alias_of(layer->gate_proj->weight));
}

// A checkpoint whose Q/K rows are stored interleaved (as GGUF and llama2.c
// store them) loads to the same model once qk_interleaved is set.
TEST(Llama, InterleavedQkRowsArePermutedAtLoad) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string dir = (tiny_models() / "odd_sizes").string();
  auto ckpt = must(checkpoint::load_llama_checkpoint(dir));
  auto reference_model = model::load_llama(ckpt, {});
  const auto& c = ckpt.config;
  std::vector<std::vector<float>> storage;
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    for (auto [proj, heads] : {std::pair<const char*, int64_t>{"q_proj", c.num_attention_heads},
                              {"k_proj", c.num_key_value_heads}}) {
      auto& info = ckpt.tensors.at(checkpoint::llama_layer_tensor(l, std::string("self_attn.") + proj + ".weight"));
      Tensor w = at::tensor(checkpoint::to_float32(info), at::kFloat).view(info.shape);
      // Inverse of interleaved_to_rotate_half: rotate-half row r*D/2 + i -> 2i + r.
      const int64_t D = w.size(0) / heads;
      Tensor inter = w.view({heads, 2, D / 2, w.size(1)}).transpose(1, 2).reshape(w.sizes()).contiguous();
      ASSERT_TRUE(at::equal(model::interleaved_to_rotate_half(inter, heads), w));
      storage.emplace_back(inter.data_ptr<float>(), inter.data_ptr<float>() + inter.numel());
      info.dtype = checkpoint::DType::kF32;
      info.data = reinterpret_cast<const uint8_t*>(storage.back().data());
      info.nbytes = storage.back().size() * sizeof(float);
    }
  }
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(17, c.vocab_size, rng);
  Tensor expected = our_logits(reference_model, ids);
  auto scrambled = model::load_llama(ckpt, {});
  EXPECT_GT(max_abs_diff(our_logits(scrambled, ids), expected), 1e-3);  // the permutation matters
  ckpt.qk_interleaved = true;
  auto permuted = model::load_llama(ckpt, {});
  EXPECT_LE(max_abs_diff(our_logits(permuted, ids), expected), 1e-6);
}

TEST(Llama, SparseAttentionKindsRun) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string dir = (tiny_models() / "gqa_llama3_sharded").string();
  std::mt19937 rng(std::random_device{}());
  auto dense = load(dir);
  auto ids = random_ids(40, dense->config().vocab_size, rng);
  Tensor expected = our_logits(dense, ids);

  model::LlamaLoadOptions o;
  o.attention[0].kind = attention::Kind::kDrop;
  o.attention[0].drop_prob = 0;  // drops nothing: dense
  auto keep_all = load(dir, o);
  EXPECT_LE(max_abs_diff(our_logits(keep_all, ids), expected), 1e-5);
  o.attention[0].drop_prob = 0.5;
  auto drop_half = load(dir, o);
  Tensor dropped = our_logits(drop_half, ids);
  EXPECT_TRUE(dropped.isfinite().all().item<bool>());
  EXPECT_GT(max_abs_diff(dropped, expected), 1e-3);

  o.attention[0].kind = attention::Kind::kHash;
  o.attention[0].num_buckets = 4;
  auto hashed_model = load(dir, o);
  Tensor hashed = our_logits(hashed_model, ids);
  EXPECT_TRUE(hashed.isfinite().all().item<bool>());
  EXPECT_GT(max_abs_diff(hashed, expected), 1e-3);
  EXPECT_TRUE(hashed_model->layers[0]->as<model::LlamaLayer>()
                  ->self_attn->attention.last_pattern().q_bucket.defined());

  // S2-Attn with one group as long as the sequence is dense attention.
  o.attention[0].kind = attention::Kind::kShift;
  o.attention[0].group_size = 80;  // shifted heads: groups [0, 40), [40, 120)
  EXPECT_LE(max_abs_diff(our_logits(load(dir, o), ids), expected), 1e-5);
  o.attention[0].group_size = 8;
  Tensor shifted = our_logits(load(dir, o), ids);
  EXPECT_TRUE(shifted.isfinite().all().item<bool>());
  EXPECT_GT(max_abs_diff(shifted, expected), 1e-3);
}

// A model with RoPE scaling written by us reads back, in our loader and in
// transformers, as the same model.
TEST(Llama, RopeScalingKindsSurviveExport) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  std::mt19937 rng(std::random_device{}());
  for (const std::string name : {"dynamic_ntk", "yarn", "yarn_mscale"}) {
    auto m = load((tiny_models() / name).string());
    const std::string out = (scratch() / (name + "_export")).string();
    must(model::write_hf_llama(*m, out, at::kFloat));
    auto back = load(out);
    EXPECT_EQ(back->config().rope_scaling.type, m->config().rope_scaling.type) << name;
    EXPECT_EQ(back->config().max_position_embeddings, m->config().max_position_embeddings) << name;
    EXPECT_EQ(back->config().rope_scaling.original_max_position_embeddings,
              m->config().rope_scaling.original_max_position_embeddings)
        << name;
    auto ids = random_ids(40, m->config().vocab_size, rng);
    Tensor ours = our_logits(m, ids);
    EXPECT_EQ(max_abs_diff(our_logits(back, ids), ours), 0) << name;
    Reference ref = reference("--model " + quote(out), ids, "", name + "_export");
    ASSERT_TRUE(ref.logits.defined()) << name;
    EXPECT_LE(max_abs_diff(ours, ref.logits), 1e-4) << name;
  }
}

TEST(Llama, BFloat16IsCloseToFloat32) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string dir = (tiny_models() / "tied_linear").string();
  std::mt19937 rng(std::random_device{}());
  auto f32 = load(dir);
  model::LlamaLoadOptions o;
  o.dtype = at::kBFloat16;
  auto bf16 = load(dir, o);
  EXPECT_EQ(bf16->dtype(), at::kBFloat16);
  auto ids = random_ids(20, f32->config().vocab_size, rng);
  Tensor a = our_logits(f32, ids), b = our_logits(bf16, ids);
  EXPECT_EQ(b.scalar_type(), at::kFloat);
  EXPECT_LE(max_abs_diff(a, b), 0.05 * a.abs().max().item<double>());
}

TEST(Llama, SamplingIsSeededAndTopPNarrowsToGreedy) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  auto m = load((tiny_models() / "odd_sizes").string());
  std::mt19937 rng(std::random_device{}());
  auto prompt = random_ids(5, m->config().vocab_size, rng);
  model::SamplingOptions s;
  s.temperature = 1.0;
  s.seed = rng();
  auto a = model::generate(m, prompt, 20, s).ids, b = model::generate(m, prompt, 20, s).ids;
  EXPECT_EQ(a, b);
  s.seed += 1;
  EXPECT_NE(model::generate(m, prompt, 20, s).ids, a);
  s.top_p = 1e-6;  // only the most likely token survives
  EXPECT_EQ(model::generate(m, prompt, 20, s).ids, model::generate(m, prompt, 20, model::SamplingOptions{}).ids);
  // EOS stops generation after emitting it.
  model::SamplingOptions greedy;
  auto g = model::generate(m, prompt, 20, greedy).ids;
  greedy.eos_id = g[3];
  auto stopped = model::generate(m, prompt, 20, greedy).ids;
  EXPECT_EQ(stopped.back(), g[3]);
  EXPECT_LE(stopped.size(), 4u);
}

// On a GPU: float32 (reference attention on CUDA) equals the CPU model, and
// bf16 through the CUDA kernels (head dim 64) stays close to it.
TEST(LlamaGpu, CudaFloat32AndBf16KernelsMatchTheCpuModel) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device";
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string dir = (tiny_models() / "head_dim_64").string();
  auto cpu = load(dir);
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(300, cpu->config().vocab_size, rng);
  Tensor expected = our_logits(cpu, ids);
  model::LlamaLoadOptions o;
  o.device = at::Device(at::kCUDA);
  auto f32 = load(dir, o);
  EXPECT_LE(max_abs_diff(our_logits(f32, ids).cpu(), expected), 1e-4);

  o.dtype = at::kBFloat16;
  auto bf16 = load(dir, o);
  auto opts = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  Tensor q = at::randn({1, 4, 8, 64}, opts), kv = at::randn({1, 2, 8, 64}, opts);
  EXPECT_TRUE(attention::flash_supported(q, kv, kv)) << "bf16 would not use the kernels";
  Tensor got = our_logits(bf16, ids).cpu();
  EXPECT_LE(max_abs_diff(got, expected), 0.05 * expected.abs().max().item<double>());
  model::SamplingOptions greedy;
  EXPECT_EQ(model::generate(bf16, ids, 8, greedy).ids.size(), 8u);

  o.attention[0].kind = attention::Kind::kHash;
  o.attention[0].num_buckets = 4;
  auto hashed = load(dir, o);
  EXPECT_TRUE(our_logits(hashed, ids).isfinite().all().item<bool>());
}

// ---------------------------------------------------------------------------
// load errors

TEST(LlamaLoad, MissingMisshapenAndUnknownTensorsAreNamed) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  auto good = must(checkpoint::load_llama_checkpoint((tiny_models() / "odd_sizes").string()));
  auto expect_error = [](const checkpoint::LlamaCheckpoint& ckpt, const std::string& needle) {
    try {
      model::load_llama(ckpt, {});
      ADD_FAILURE() << "no error, expected one naming " << needle;
    } catch (const std::exception& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto missing = good;
  missing.tensors.erase("model.layers.1.mlp.up_proj.weight");
  expect_error(missing, "model.layers.1.mlp.up_proj.weight is missing");

  auto misshapen = good;
  auto& info = misshapen.tensors.at("model.norm.weight");
  info.shape = {info.shape[0] - 2};
  expect_error(misshapen, "model.norm.weight has shape");

  auto extra = good;
  auto bias = good.tensors.at("model.norm.weight");
  bias.name = "model.layers.0.self_attn.q_proj.bias";
  extra.tensors[bias.name] = bias;
  expect_error(extra, "model.layers.0.self_attn.q_proj.bias");

  auto bad_config = good;
  bad_config.config.num_key_value_heads = 2;  // 3 heads are not a multiple of 2
  expect_error(bad_config, "num_key_value_heads");
}

// ---------------------------------------------------------------------------
// conversions (through the sparseflash binary)

TEST(Convert, NativeRoundTripKeepsLogitsAndTransformersLoadsIt) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string src = (tiny_models() / "gqa_llama3_sharded").string();
  const std::string out = (scratch() / "native").string();
  const std::string log = (scratch() / "convert_native.log").string();
  ASSERT_EQ(run(quote(kBinary) + " convert --input " + quote(src) + " --output " + quote(out), log), 0)
      << read_file(log);
  EXPECT_NE(read_file(log).find("wrote"), std::string::npos) << read_file(log);
  auto native = must(checkpoint::load_llama_checkpoint(out));
  EXPECT_EQ(native.format, checkpoint::SourceFormat::kNative);
  auto a = load(src);
  auto b = model::load_llama(native, {});
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(24, a->config().vocab_size, rng);
  Tensor ours = our_logits(a, ids);
  EXPECT_TRUE(at::equal(our_logits(b, ids), ours));
  Reference ref = reference("--model " + quote(out), ids, "", "native_ref");
  ASSERT_TRUE(ref.logits.defined());
  EXPECT_LE(max_abs_diff(ours, ref.logits), 1e-4);
}

TEST(Convert, BadArgumentsFailWithMessages) {
  const std::string log = (scratch() / "convert_bad.log").string();
  EXPECT_EQ(run(quote(kBinary) + " convert --output /tmp/x", log), 1 << 8);
  EXPECT_NE(read_file(log).find("--input is required"), std::string::npos) << read_file(log);
  EXPECT_EQ(run(quote(kBinary) + " convert --input /nonexistent/m --output /tmp/x", log), 1 << 8);
  EXPECT_NE(read_file(log).find("/nonexistent/m"), std::string::npos) << read_file(log);
  EXPECT_EQ(run(quote(kBinary) + " convert --input " + quote(SF_SOURCE_DIR) +
                    " --output /tmp/x --to onnx",
                log),
            1 << 8);
  EXPECT_NE(read_file(log).find("--to"), std::string::npos) << read_file(log);
}

// `sparseflash eval --model --data` on token shards gives the library's windowed NLL.
TEST(EvalCommand, ShardsGiveTheLibraryPerplexity) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  const std::string dir = (tiny_models() / "odd_sizes").string();
  auto m = load(dir);
  std::mt19937 rng(std::random_device{}());
  auto a = random_ids(70, m->config().vocab_size, rng), b = random_ids(45, m->config().vocab_size, rng);
  const std::string shard_a = (scratch() / "a.bin").string(), shard_b = (scratch() / "b.bin").string();
  ASSERT_TRUE(data::write_shard(shard_a, std::vector<int32_t>(a.begin(), a.end()),
                                static_cast<int>(m->config().vocab_size), 1).ok());
  ASSERT_TRUE(data::write_shard(shard_b, std::vector<int32_t>(b.begin(), b.end()),
                                static_cast<int>(m->config().vocab_size), 1).ok());
  const std::string json_path = (scratch() / "eval.json").string();
  const std::string log = (scratch() / "eval.log").string();
  ASSERT_EQ(run(quote(kBinary) + " eval --model " + quote(dir) + " --data " +
                    quote(shard_a + "," + shard_b) + " --context 16 --stride 6 --device cpu" +
                    " --json-file " + quote(json_path),
                log),
            0)
      << read_file(log);
  json j = json::parse(read_file(json_path));
  std::vector<int64_t> all = a;
  all.insert(all.end(), b.begin(), b.end());
  auto expected = model::sliding_window_nll(m, all, 16, 6);
  EXPECT_EQ(j["tokens"].get<int64_t>(), 114);
  EXPECT_EQ(j["windows"].get<int64_t>(), expected.windows);
  EXPECT_NEAR(j["mean_nll"].get<double>(), expected.mean_nll(), 1e-9);
  EXPECT_NE(read_file(log).find("perplexity:"), std::string::npos) << read_file(log);

  // Shards of a larger vocabulary than the model's are refused by name.
  const std::string wide = (scratch() / "wide.bin").string();
  ASSERT_TRUE(data::write_shard(wide, {1, 2, 3}, 256, 1).ok());
  EXPECT_EQ(run(quote(kBinary) + " eval --model " + quote(dir) + " --data " + quote(wide), log),
            1 << 8);
  EXPECT_NE(read_file(log).find("wide.bin holds ids of a vocabulary of 256"), std::string::npos)
      << read_file(log);
}

// Our GPT, saved as a training checkpoint and exported, against GPT2LMHeadModel.
TEST(Convert, GptExportMatchesGpt2LMHeadModel) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  for (bool bias : {true, false}) {
    SCOPED_TRACE(bias ? "with biases" : "without biases");
    auto exp = resolve_config("preset:tiny_test",
                              {"model.vocab_size=256", "attention.kind=DENSE",
                               std::string("model.bias=") + (bias ? "true" : "false")},
                              "tiny_test");
    ASSERT_TRUE(exp.ok()) << exp.status();
    model::GPT gpt(*exp, 256);
    {
      // Random everything (biases and LayerNorms too), wide enough that logits differ.
      torch::NoGradGuard no_grad;
      for (auto& p : gpt->parameters()) p.normal_(0, 0.3);
    }
    gpt->eval();
    const std::string run_dir = (scratch() / (bias ? "gpt_bias" : "gpt_nobias")).string();
    fs::create_directories(run_dir);
    ASSERT_TRUE(trainer::save_checkpoint(run_dir + "/ckpt.pt", *exp, "byte", gpt, nullptr, {}).ok());
    const std::string out = run_dir + "_hf";
    const std::string log = run_dir + "_convert.log";
    ASSERT_EQ(run(quote(kBinary) + " convert --to hf-gpt2 --input " + quote(run_dir) +
                      " --output " + quote(out),
                  log),
              0)
        << read_file(log);
    EXPECT_EQ(read_file(log).find("sparse attention"), std::string::npos) << read_file(log);

    std::mt19937 rng(std::random_device{}());
    auto ids = random_ids(30, 256, rng);
    Reference ref = reference("--gpt2 --model " + quote(out), ids, "--greedy 10",
                              bias ? "gpt2_bias" : "gpt2_nobias");
    ASSERT_TRUE(ref.logits.defined());
    torch::NoGradGuard no_grad;
    Tensor ours = gpt->forward(at::tensor(ids, at::kLong).view({1, -1}))[0].to(at::kFloat);
    EXPECT_LE(max_abs_diff(ours, ref.logits), 1e-4);
    EXPECT_GT(ref.logits.abs().max().item<double>(), 1.0);
    EXPECT_EQ(model::generate(gpt, ids, 10, model::SamplingOptions{}).ids, ref.greedy);
  }
}

TEST(Convert, SparseGptExportSaysSo) {
  auto exp = resolve_config("preset:tiny_test", {"model.vocab_size=256"}, "tiny_test");
  ASSERT_TRUE(exp.ok()) << exp.status();
  ASSERT_EQ(exp->attention().kind(), config::Attention::HASH);
  model::GPT gpt(*exp, 256);
  const std::string run_dir = (scratch() / "gpt_hash").string();
  fs::create_directories(run_dir);
  ASSERT_TRUE(trainer::save_checkpoint(run_dir + "/ckpt.pt", *exp, "byte", gpt, nullptr, {}).ok());
  const std::string log = run_dir + "_convert.log";
  ASSERT_EQ(run(quote(kBinary) + " convert --to hf-gpt2 --input " + quote(run_dir) +
                    " --output " + quote(run_dir + "_hf"),
                log),
            0)
      << read_file(log);
  EXPECT_NE(read_file(log).find("trained with sparse attention"), std::string::npos)
      << read_file(log);
}

}  // namespace
}  // namespace sparseflash
