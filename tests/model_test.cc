// GPT structure, initialisation, causality; AdamW and the LR schedule.
#include <cmath>
#include <map>
#include <sstream>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/optim/adamw.h>
#include <torch/serialize/archive.h>

#include "configs/config.h"
#include "model/factory.h"
#include "model/generate.h"
#include "model/gpt.h"
#include "model/llama.h"
#include "model/load.h"
#include "trainer/schedule.h"
#include "trainer/optimizer.h"

namespace sparseflash {
namespace {

config::Experiment tiny(const std::vector<std::string>& overrides = {}) {
  auto exp = resolve_config("preset:tiny_test", overrides, "tiny_test");
  EXPECT_TRUE(exp.ok()) << exp.status();
  return *exp;
}

TEST(Gpt, LogitsShapeAndParameterCount) {
  auto exp = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  model::GPT gpt(exp, 0);
  at::Tensor idx = at::randint(0, 256, {3, 17}, at::kLong);
  EXPECT_EQ(gpt->forward(idx).sizes(), (std::vector<int64_t>{3, 17, 256}));
  const int64_t d = exp.model().d_model(), L = exp.model().n_layer(), V = 256,
                T = exp.model().block_size();
  // Tied head: embeddings once; per layer 2 LayerNorm gains + 12 d^2; final LN.
  EXPECT_EQ(gpt->num_parameters(), V * d + T * d + L * (2 * d + 12 * d * d) + d);
}

TEST(Gpt, BiasesAndSharedQkChangeParameters) {
  auto base = tiny({"model.vocab_size=256"});
  auto with_bias = tiny({"model.vocab_size=256", "model.bias=true"});
  auto shared = tiny({"model.vocab_size=256", "attention.shared_qk=true"});
  const int64_t d = base.model().d_model(), L = base.model().n_layer();
  model::GPT a(base, 0), b(with_bias, 0), s(shared, 0);
  EXPECT_EQ(b->num_parameters() - a->num_parameters(), L * (2 * d + 3 * d + d + 4 * d + d) + d);
  EXPECT_EQ(a->num_parameters() - s->num_parameters(), L * d * d);
}

TEST(Gpt, Gpt2InitialisationScalesResidualProjections) {
  auto exp = tiny({"model.vocab_size=256", "model.d_model=256", "model.n_head=4",
                   "model.n_layer=8"});
  torch::manual_seed(0);
  model::GPT gpt(exp, 0);
  for (const auto& p : gpt->named_parameters()) {
    const std::string& name = p.key();
    const double std = p.value().std().item<double>();
    if (name.find("ln_") != std::string::npos) {
      EXPECT_EQ(p.value().mean().item<double>(), 1.0) << name;
    } else if (name.find("c_proj.weight") != std::string::npos ||
               name.find("mlp_proj.weight") != std::string::npos) {
      EXPECT_NEAR(std, 0.02 / std::sqrt(16.0), 0.0005) << name;
    } else {
      EXPECT_NEAR(std, 0.02, 0.002) << name;
    }
  }
}

TEST(Gpt, LayerAttentionOverridesPerLayer) {
  auto exp = tiny({"model.vocab_size=256", "attention.kind=HASH",
                   "layer_attention=[{layers: [1] attention {kind: DROP drop_prob: 0.3}}]"});
  EXPECT_EQ(model::layer_attention_options(exp, 0).kind, attention::Kind::kHash);
  auto o1 = model::layer_attention_options(exp, 1);
  EXPECT_EQ(o1.kind, attention::Kind::kDrop);
  EXPECT_NEAR(o1.drop_prob, 0.3, 1e-6);
}

// Logits at positions before t do not depend on the token at t, for every
// kind (the attention generator is reseeded so both passes draw alike).
TEST(Gpt, IsCausalForEveryKind) {
  for (const char* kind : {"DENSE", "HASH", "DROP"}) {
    auto exp = tiny({"model.vocab_size=256", std::string("attention.kind=") + kind,
                     "attention.drop_prob=0.3"});
    model::GPT gpt(exp, 0);
    gpt->eval();
    at::Tensor idx = at::randint(0, 256, {2, 24}, at::kLong);
    at::Tensor changed = idx.clone();
    changed.select(1, 15).fill_(7);
    changed.select(1, 15).add_(idx.select(1, 15).eq(7).to(at::kLong));  // surely different
    gpt->attention_generator().set_current_seed(11);
    at::Tensor a = gpt->forward(idx);
    gpt->attention_generator().set_current_seed(11);
    at::Tensor b = gpt->forward(changed);
    EXPECT_TRUE(at::allclose(a.slice(1, 0, 15), b.slice(1, 0, 15), 1e-6, 1e-6)) << kind;
    EXPECT_FALSE(at::allclose(a.slice(1, 15), b.slice(1, 15), 1e-6, 1e-6)) << kind;
  }
}

TEST(Gpt, GenerateAppendsTokensAndGreedyIsDeterministic) {
  // Dense: hash attention redraws its rotations at every forward.
  auto exp = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  model::GPT gpt(exp, 0);
  model::SamplingOptions s1, s2;
  s1.seed = 1;
  s2.seed = 2;
  auto a = model::generate(gpt, {1, 2, 3}, 10, s1).ids;
  auto b = model::generate(gpt, {1, 2, 3}, 10, s2).ids;
  EXPECT_EQ(a.size(), 10u);
  EXPECT_EQ(a, b);
}

TEST(Gpt, KvCacheGivesTheFullForwardsLogits) {
  auto exp = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  model::GPT gpt(exp, 0);
  gpt->eval();
  torch::NoGradGuard no_grad;
  const int64_t N = 21;
  at::Tensor ids = at::randint(0, 256, {2, N}, at::kLong);
  at::Tensor full = gpt->forward(ids);
  // In three uneven pieces through one cache.
  model::KVCache cache;
  std::vector<at::Tensor> parts;
  for (auto [begin, end] : {std::pair<int64_t, int64_t>{0, 8}, {8, 9}, {9, N}})
    parts.push_back(gpt->forward(ids.slice(1, begin, end), &cache));
  EXPECT_EQ(cache.length, N);
  EXPECT_LE((at::cat(parts, 1) - full).abs().max().item<double>(), 1e-5);
}

TEST(Generate, StopsAtTheContextLengthAndSaysSo) {
  auto exp = tiny({"model.vocab_size=256", "attention.kind=DENSE", "model.block_size=16",
                   "data.seq_len=16"});
  model::GPT gpt(exp, 0);
  model::SamplingOptions s;
  s.temperature = 1.0;
  // 5 prompt tokens + at most 11 new ones fill the 16-token context.
  model::Generation g = model::generate(gpt, {1, 2, 3, 4, 5}, 99999999999, s);
  EXPECT_EQ(g.ids.size(), 11u);
  EXPECT_EQ(g.stop, model::StopReason::kContext);
  EXPECT_STREQ(model::stop_reason_name(g.stop), "context_full");
  g = model::generate(gpt, {1, 2, 3, 4, 5}, 4, s);
  EXPECT_EQ(g.ids.size(), 4u);
  EXPECT_EQ(g.stop, model::StopReason::kMaxTokens);
  // A prompt that fills the context leaves no room.
  EXPECT_THROW(model::generate(gpt, std::vector<int64_t>(16, 1), 1, s), c10::Error);
  EXPECT_THROW(model::generate(gpt, {}, 1, s), c10::Error);
  EXPECT_THROW(model::generate(gpt, {300}, 1, s), c10::Error);
  // Stops after the end-of-sequence id: greedy, with eos = the greedy token.
  model::SamplingOptions greedy;
  const int64_t first = model::generate(gpt, {1, 2, 3}, 1, greedy).ids[0];
  greedy.eos_id = first;
  g = model::generate(gpt, {1, 2, 3}, 10, greedy);
  EXPECT_EQ(g.ids, std::vector<int64_t>{first});
  EXPECT_EQ(g.stop, model::StopReason::kEndOfSequence);
}

TEST(Generate, TopKOneIsGreedyAndSeedsDiffer) {
  auto exp = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  model::GPT gpt(exp, 0);
  model::SamplingOptions greedy, top1, hot_a, hot_b;
  top1.temperature = hot_a.temperature = hot_b.temperature = 2.0;
  top1.top_k = 1;
  top1.seed = 7;
  hot_a.seed = 1;
  hot_b.seed = 2;
  EXPECT_EQ(model::generate(gpt, {1, 2}, 20, top1).ids, model::generate(gpt, {1, 2}, 20, greedy).ids);
  EXPECT_NE(model::generate(gpt, {1, 2}, 20, hot_a).ids, model::generate(gpt, {1, 2}, 20, hot_b).ids);
  EXPECT_EQ(model::generate(gpt, {1, 2}, 20, hot_a).ids, model::generate(gpt, {1, 2}, 20, hot_a).ids);
}

// ---------------------------------------------------------------------------
// the interface and the factory

TEST(Factory, BuildsEitherFamilyFromTheConfig) {
  auto gpt = model::build_model(tiny({"model.vocab_size=256"}));
  ASSERT_TRUE(gpt.ok()) << gpt.status();
  EXPECT_EQ((*gpt)->arch(), config::Model::GPT);
  EXPECT_NE(dynamic_cast<model::GPTImpl*>(gpt->get()), nullptr);

  auto exp = tiny({"model.arch=LLAMA", "model.n_kv_head=1", "model.d_ff=96",
                   "attention.kind=DROP", "model.tie_embeddings=false"});
  auto llama = model::build_model(exp, /*data_vocab_size=*/300);
  ASSERT_TRUE(llama.ok()) << llama.status();
  model::CausalLM m = *llama;
  EXPECT_EQ(m->arch(), config::Model::LLAMA);
  EXPECT_EQ(m->vocab_size(), 300);
  EXPECT_EQ(m->context_length(), exp.model().block_size());
  const model::AttentionShape shape = m->attention_shape();
  EXPECT_EQ(shape.layers, exp.model().n_layer());
  EXPECT_EQ(shape.heads, exp.model().n_head());
  EXPECT_EQ(shape.kv_heads, 1);
  ASSERT_EQ(m->layer_attention().size(), static_cast<size_t>(exp.model().n_layer()));
  EXPECT_EQ(m->layer_attention()[0].kind, attention::Kind::kDrop);
  // The loss is the mean cross-entropy of the logits, for both families.
  for (model::CausalLM lm : {*gpt, m}) {
    lm->eval();  // no drop: the same pattern in both calls
    at::Tensor ids = at::randint(0, 256, {2, 12}, at::kLong);
    at::Tensor targets = at::randint(0, 256, {2, 12}, at::kLong);
    targets.index_put_({0, 3}, -1);  // ignored
    lm->attention_generator().set_current_seed(9);
    at::Tensor loss = lm->loss(ids, targets);
    lm->attention_generator().set_current_seed(9);
    at::Tensor logits = lm->forward(ids);
    at::Tensor expected = at::cross_entropy_loss(logits.view({-1, logits.size(-1)}),
                                                 targets.view({-1}), {}, at::Reduction::Mean, -1);
    EXPECT_NEAR(loss.item<double>(), expected.item<double>(), 1e-5) << model::arch_name(lm->arch());
  }
  // Config errors name the field.
  auto bad = resolve_config("preset:tiny_test", {"model.arch=LLAMA", "model.n_kv_head=3"},
                            "tiny_test");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("model.n_kv_head"), std::string::npos) << bad.status();
  bad = resolve_config("preset:tiny_test", {"model.arch=LLAMA", "attention.shared_qk=true"},
                       "tiny_test");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("attention.shared_qk"), std::string::npos) << bad.status();
}

// Recomputing each block in the backward (float64) gives the gradients of
// keeping its activations, for every attention kind (drop and hash draw their
// patterns again from the restored generator), and the same random stream after.
TEST(Gpt, ActivationCheckpointingGivesTheSameGradients) {
  for (const char* kind : {"DENSE", "HASH", "DROP"}) {
    SCOPED_TRACE(kind);
    auto exp = tiny({"model.vocab_size=256", std::string("attention.kind=") + kind,
                     "attention.num_buckets=4", "attention.shared_qk=true"});
    auto a = model::build_model(exp), b = model::build_model(exp);
    ASSERT_TRUE(a.ok() && b.ok());
    {
      torch::NoGradGuard no_grad;
      auto from = (*a)->named_parameters();
      for (auto& item : (*b)->named_parameters()) item.value().copy_(from[item.key()]);
    }
    std::vector<std::map<std::string, at::Tensor>> grads;
    std::vector<at::Tensor> rng_after;
    at::Tensor x = at::randint(0, 256, {2, 19}, at::kLong), y = at::randint(0, 256, {2, 19}, at::kLong);
    for (model::CausalLM m : {*a, *b}) {
      m->to(at::kDouble);
      m->train();
      m->set_activation_checkpointing(m.get() == b->get());
      m->attention_generator().set_current_seed(4);
      m->loss(x, y).backward();
      std::map<std::string, at::Tensor> g;
      for (const auto& item : m->named_parameters()) g[item.key()] = item.value().grad();
      grads.push_back(g);
      rng_after.push_back(m->attention_generator().get_state());
    }
    for (const auto& [name, g] : grads[0]) {
      ASSERT_TRUE(g.defined() && grads[1][name].defined()) << name;
      const double scale = g.abs().max().item<double>();
      EXPECT_GT(scale, 0) << name;
      EXPECT_LE((grads[1][name] - g).abs().max().item<double>(), 1e-12 * scale) << name;
    }
    EXPECT_TRUE(at::equal(rng_after[0], rng_after[1]));
  }
}

// Adapters on GPT's four projections: zero-initialised B changes nothing, the
// rest is frozen unless asked, merging folds them in and removes them.
TEST(Gpt, LoraAdaptersFreezeTheRestAndMerge) {
  // Dense: hash attention would draw new rotations at every call.
  auto base = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  auto with = tiny({"model.vocab_size=256", "attention.kind=DENSE", "model.lora.rank=3",
                    "model.lora.alpha=6", "model.lora.train_embeddings=true"});
  torch::manual_seed(1);
  auto a = model::build_model(base);
  torch::manual_seed(1);
  auto b = model::build_model(with);
  ASSERT_TRUE(a.ok() && b.ok());
  const int64_t d = base.model().d_model(), L = base.model().n_layer();
  // A [3, in] and B [out, 3] on c_attn (d -> 3d), c_proj, c_fc (d -> 4d), mlp_proj.
  EXPECT_EQ((*b)->num_parameters() - (*a)->num_parameters(),
            L * 3 * ((d + 3 * d) + (d + d) + (d + 4 * d) + (4 * d + d)));
  for (const auto& item : (*b)->named_parameters()) {
    const std::string& n = item.key();
    const bool trains = n.find(".lora_") != std::string::npos || n == "wte.weight" ||
                        n == "wpe.weight";
    EXPECT_EQ(item.value().requires_grad(), trains) << n;
  }
  (*a)->eval();
  (*b)->eval();
  at::Tensor ids = at::randint(0, 256, {2, 11}, at::kLong);
  torch::NoGradGuard no_grad;
  at::Tensor expected = (*a)->forward(ids);
  EXPECT_TRUE(at::allclose((*b)->forward(ids), expected, 0, 1e-6));
  for (auto& item : (*b)->named_parameters())
    if (item.key().find("lora_b") != std::string::npos) item.value().normal_(0, 0.05);
  at::Tensor adapted = (*b)->forward(ids);
  EXPECT_GT((adapted - expected).abs().max().item<double>(), 1e-3);
  EXPECT_EQ(model::merge_lora(**b), 4 * L);
  EXPECT_EQ((*b)->num_parameters(), (*a)->num_parameters());
  EXPECT_LE(((*b)->forward(ids) - adapted).abs().max().item<double>(), 1e-5);
  // A projection the family lacks is named.
  auto wrong = tiny({"model.vocab_size=256", "model.lora.rank=2", "model.lora.targets=q_proj"});
  auto refused = model::build_model(wrong);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("q_proj"), std::string::npos) << refused.status();
}

TEST(Llama, KvCacheGivesTheFullForwardsLogits) {
  auto exp = tiny({"model.arch=LLAMA", "model.n_kv_head=2", "model.vocab_size=256",
                   "attention.kind=DENSE", "model.rope_scaling.type=llama3",
                   "model.rope_scaling.factor=4",
                   "model.rope_scaling.original_max_position_embeddings=8"});
  auto built = model::build_model(exp);
  ASSERT_TRUE(built.ok()) << built.status();
  model::CausalLM m = *built;
  m->eval();
  torch::NoGradGuard no_grad;
  at::Tensor ids = at::randint(0, 256, {1, 19}, at::kLong);
  at::Tensor full = m->forward(ids);
  model::KVCache cache;
  at::Tensor a = m->forward(ids.slice(1, 0, 11), &cache);
  at::Tensor b = m->forward(ids.slice(1, 11, 19), &cache);
  EXPECT_LE((at::cat({a, b}, 1) - full).abs().max().item<double>(), 1e-5);
}

// --attention and the flags that shape it: values carried over, each bad one
// refused with the flag named.
TEST(ParseAttention, CarriesTheFlagsAndNamesTheBadOne) {
  auto hash = model::parse_attention("hash", 8, 0.5, 0, 4, 64, 1.0);
  ASSERT_TRUE(hash.ok()) << hash.status();
  EXPECT_EQ(hash->kind, attention::Kind::kHash);
  EXPECT_EQ(hash->num_buckets, 8);
  EXPECT_EQ(hash->sink_tokens, 4);
  EXPECT_EQ(hash->local_window, 64);
  EXPECT_EQ(hash->lsh_capacity, 1.0);
  auto expect_refused = [](const absl::StatusOr<model::AttentionOverride>& got,
                           const std::string& flag) {
    ASSERT_FALSE(got.ok()) << flag;
    EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(got.status().message().find(flag), std::string::npos) << got.status();
  };
  expect_refused(model::parse_attention("sparse", 16, 0.5), "--attention");
  expect_refused(model::parse_attention("hash", 7, 0.5), "--num-buckets");
  expect_refused(model::parse_attention("drop", 16, 1.0), "--drop-prob");
  expect_refused(model::parse_attention("hash", 16, 0.5, 0, -1, 0), "--sparse-sinks");
  expect_refused(model::parse_attention("dense", 16, 0.5, 0, 0, 64), "--sparse-window");
  expect_refused(model::parse_attention("hash", 16, 0.5, 0, 0, 0, 0.5), "--lsh-capacity");
  expect_refused(model::parse_attention("drop", 16, 0.5, 0, 0, 0, 2.0), "--lsh-capacity");
  expect_refused(model::parse_attention("hash", 128, 0.5, 0, 0, 0, 1.0), "--num-buckets <= 64");
}

// ---------------------------------------------------------------------------

TEST(AdamW, MatchesLibTorchAdamW) {
  auto exp = tiny({"model.vocab_size=256", "optim.weight_decay=0.1"});
  torch::manual_seed(3);
  model::GPT ours(exp, 0);
  torch::manual_seed(3);
  model::GPT theirs(exp, 0);
  trainer::AdamW opt_ours(ours, exp.optim());
  std::vector<at::Tensor> decay, no_decay;
  for (auto& p : theirs->parameters()) (p.dim() >= 2 ? decay : no_decay).push_back(p);
  auto options = torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8);
  std::vector<torch::optim::OptimizerParamGroup> groups = {
      {decay, std::make_unique<torch::optim::AdamWOptions>(options.weight_decay(0.1))},
      {no_decay, std::make_unique<torch::optim::AdamWOptions>(
                     torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(0))}};
  torch::optim::AdamW opt_theirs(groups, options);
  at::Tensor idx = at::randint(0, 256, {2, 16}, at::kLong), tgt = at::randint(0, 256, {2, 16});
  ours->attention_generator().set_current_seed(5);
  theirs->attention_generator().set_current_seed(5);
  for (int step = 0; step < 3; ++step) {
    ours->loss(idx, tgt).backward();
    theirs->loss(idx, tgt).backward();
    opt_ours.step(1e-2);
    opt_ours.zero_grad();
    opt_theirs.step();
    opt_theirs.zero_grad();
  }
  auto a = ours->parameters(), b = theirs->parameters();
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(at::allclose(a[i], b[i], 1e-5, 1e-6))
        << "parameter " << i << " max diff " << (a[i] - b[i]).abs().max().item<double>()
        << " nan in ours " << at::isnan(a[i]).any().item<bool>() << " theirs "
        << at::isnan(b[i]).any().item<bool>();
  EXPECT_FALSE(at::allclose(a[0], torch::zeros_like(a[0])));
}

// Moments stored in bfloat16: the update is the float32 one up to the
// moments' rounding, and the stored state is bfloat16.
TEST(AdamW, Bfloat16MomentsTrackFloat32Moments) {
  auto exp32 = tiny({"model.vocab_size=256", "attention.kind=DENSE"});
  auto exp16 = tiny({"model.vocab_size=256", "attention.kind=DENSE", "optim.state_dtype=BFLOAT16"});
  torch::manual_seed(4);
  model::GPT a(exp32, 0);
  torch::manual_seed(4);
  model::GPT b(exp16, 0);
  trainer::AdamW opt_a(a, exp32.optim()), opt_b(b, exp16.optim());
  at::Tensor idx = at::randint(0, 256, {2, 16}, at::kLong), tgt = at::randint(0, 256, {2, 16});
  for (int step = 0; step < 5; ++step) {
    a->loss(idx, tgt).backward();
    b->loss(idx, tgt).backward();
    opt_a.step(1e-3);
    opt_b.step(1e-3);
    opt_a.zero_grad();
    opt_b.zero_grad();
  }
  auto pa = a->parameters(), pb = b->parameters();
  double differ = 0;
  for (size_t i = 0; i < pa.size(); ++i)
    differ = std::max(differ, (pa[i] - pb[i]).abs().max().item<double>());
  // 5 steps of lr 1e-3 move weights by up to 5e-3; bf16 moments (8-bit
  // mantissa) change a step by well under 1%.
  EXPECT_LT(differ, 5e-5);
  EXPECT_GT(differ, 0) << "the moments were not rounded";
  torch::serialize::OutputArchive archive;
  opt_b.save(archive);
  at::Tensor m;
  std::ostringstream buffer;
  archive.save_to(buffer);
  torch::serialize::InputArchive in;
  std::istringstream read(buffer.str());
  in.load_from(read);
  ASSERT_TRUE(in.try_read("optim/wte.weight/exp_avg", m, true));
  EXPECT_EQ(m.scalar_type(), at::kBFloat16);
  // Resuming into float32 moments converts them.
  EXPECT_TRUE(opt_a.load(in).ok());
  // ZeRO-1 keeps float32 shards: the combination is refused.
  auto bad = resolve_config("preset:tiny_test", {"optim.state_dtype=BFLOAT16", "distributed.zero1=true"},
                            "tiny_test");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("optim.state_dtype"), std::string::npos) << bad.status();
}

TEST(Schedule, WarmupThenCosineToFloor) {
  auto exp = tiny({"train.max_steps=100", "schedule.warmup_steps=10", "optim.lr=1e-3",
                   "schedule.min_lr_ratio=0.1"});
  EXPECT_NEAR(trainer::learning_rate(exp, 0), 1e-4, 1e-12);
  EXPECT_NEAR(trainer::learning_rate(exp, 9), 1e-3, 1e-12);
  EXPECT_NEAR(trainer::learning_rate(exp, 10), 1e-3, 1e-12);
  EXPECT_NEAR(trainer::learning_rate(exp, 55), 0.55e-3, 1e-9);
  EXPECT_NEAR(trainer::learning_rate(exp, 100), 1e-4, 1e-12);
  auto frac = tiny({"train.max_steps=1000", "schedule.warmup_steps=0",
                    "schedule.warmup_fraction=0.02"});
  EXPECT_EQ(trainer::warmup_steps(frac), 20);
}

}  // namespace
}  // namespace sparseflash
