// Fine-tuning a pretrained Llama with `sparseflash train` (model.init_from):
// config, loss, resume, exports, activation checkpointing, LoRA, data checks.
#include "tests/llama_test_util.h"

namespace sparseflash {
namespace {

// ---------------------------------------------------------------------------
// fine-tuning a pretrained Llama through the trainer (model.init_from)

class FineTune : public ::testing::Test {
 protected:
  // A tiny random Llama (GQA, untied head, llama3 RoPE scaling) written as an
  // HF directory, and a byte-tokenized corpus with structure to learn.
  static void SetUpTestSuite() {
    root_ = new fs::path(scratch() / "finetune");
    fs::create_directories(*root_ / "text");
    std::mt19937 rng(11);
    const char* words[] = {"the ", "kernel ", "maps ", "memory ", "and ", "calls ", "a ",
                           "function ", "returns ", "zero.\n"};
    for (int doc = 0; doc < 24; ++doc) {
      std::ofstream out(*root_ / "text" / ("doc" + std::to_string(doc) + ".txt"));
      for (int sentence = 0; sentence < 50; ++sentence)
        for (int w = 0; w < 5; ++w) out << words[(sentence + w * (rng() % 2)) % 10];
    }
    data::PrepareOptions o;
    o.inputs = {(*root_ / "text").string()};
    o.out_dir = (*root_ / "data").string();
    o.val_fraction = 0.2;
    auto meta = data::prepare(o);
    ASSERT_TRUE(meta.ok()) << meta.status();

    auto exp = resolve_config(
        "preset:tiny_test",
        {"model.arch=LLAMA", "model.n_kv_head=1", "model.vocab_size=256", "model.d_ff=80",
         "model.tie_embeddings=false", "model.rope_theta=50000", "model.rope_scaling.type=llama3",
         "model.rope_scaling.factor=4", "model.rope_scaling.original_max_position_embeddings=16",
         "model.init_std=0.1", "attention.kind=DENSE"},
        "tiny_test");
    ASSERT_TRUE(exp.ok()) << exp.status();
    torch::manual_seed(5);
    auto built = model::build_model(*exp);
    ASSERT_TRUE(built.ok()) << built.status();
    pretrained_ = new model::CausalLM(*built);
    must(model::write_hf_llama(*dynamic_cast<model::LlamaImpl*>(pretrained_->get()),
                          (*root_ / "pretrained").string(), at::kFloat));
  }
  static void TearDownTestSuite() {
    delete pretrained_;
    delete root_;
  }

  static std::string dir(const std::string& name) { return (*root_ / name).string(); }

  // The tiny_test preset fine-tuning the pretrained directory: its
  // architecture fields agree with the file's (n_layer 2, n_head 2, d_model 32).
  static absl::StatusOr<config::Experiment> config(const std::string& run,
                                                   std::vector<std::string> extra = {}) {
    std::vector<std::string> o = {"model.arch=LLAMA", "model.init_from=" + dir("pretrained"),
                                  "data.dir=" + dir("data"), "checkpoint.out_dir=" + dir(run),
                                  "train.device=cpu", "eval.sample_tokens=0", "eval.batches=2",
                                  "train.cpu_threads=1", "attention.kind=DENSE",
                                  "optim.lr=3e-3", "train.max_steps=12"};
    o.insert(o.end(), extra.begin(), extra.end());
    return resolve_config("preset:tiny_test", o, "tiny_test", model::complete_from_pretrained);
  }

  static fs::path* root_;
  static model::CausalLM* pretrained_;
};
fs::path* FineTune::root_ = nullptr;
model::CausalLM* FineTune::pretrained_ = nullptr;

// Trains `exp`, appending each step's loss to `losses`.
absl::StatusOr<trainer::RunResult> train_recording(const config::Experiment& exp,
                                                   std::vector<double>& losses) {
  trainer::TrainHooks hooks;
  hooks.on_step = [&](int64_t, double loss) { losses.push_back(loss); };
  return trainer::train(exp, hooks);
}

// The training batch of step 0 of `exp` (inputs, targets).
std::pair<Tensor, Tensor> first_batch(const config::Experiment& exp) {
  const auto& d = exp.data();
  auto loader = data::TokenLoader::open(d.dir(), data::Split::kTrain, d.seq_len());
  EXPECT_TRUE(loader.ok()) << loader.status();
  Tensor x = at::empty({d.batch_size(), d.seq_len()}, at::kLong), y = at::empty_like(x);
  if (loader.ok())
    loader->sample(d.seed(), 0, 0, 0, d.batch_size(), x.data_ptr<int64_t>(), y.data_ptr<int64_t>());
  return {x, y};
}

TEST_F(FineTune, ConfigTakesTheArchitectureFromTheFileAndChecksGivenFields) {
  auto exp = config("arch");
  ASSERT_TRUE(exp.ok()) << exp.status();
  const config::Model& m = exp->model();
  EXPECT_EQ(m.n_kv_head(), 1);
  EXPECT_EQ(m.d_ff(), 80);
  EXPECT_EQ(m.vocab_size(), 256);
  EXPECT_FALSE(m.tie_embeddings());
  EXPECT_EQ(m.rope_scaling().type(), "llama3");
  EXPECT_EQ(m.rope_theta(), 50000);
  // A given field that disagrees is named with both values; block_size may change.
  auto bad = config("arch", {"model.d_ff=81", "model.n_kv_head=2"});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("model.d_ff = 81 but the file has 80"), std::string::npos)
      << bad.status();
  EXPECT_NE(bad.status().message().find("model.n_kv_head"), std::string::npos) << bad.status();
  auto longer = config("arch", {"model.block_size=128"});
  ASSERT_TRUE(longer.ok()) << longer.status();
  EXPECT_EQ(longer->model().block_size(), 128);
  auto gpt = config("arch", {"model.arch=GPT"});
  ASSERT_FALSE(gpt.ok());
  EXPECT_NE(gpt.status().message().find("model.arch = LLAMA"), std::string::npos) << gpt.status();
  // A preset's model shape gives way to the file's; only overrides are checked.
  auto from_preset = resolve_config("preset:cpu_default",
                                    {"model.init_from=" + dir("pretrained"), "data.seq_len=32"},
                                    "cpu_default", model::complete_from_pretrained);
  ASSERT_TRUE(from_preset.ok()) << from_preset.status();
  EXPECT_EQ(from_preset->model().arch(), config::Model::LLAMA);
  EXPECT_EQ(from_preset->model().d_model(), 32);     // cpu_default says 128
  EXPECT_EQ(from_preset->model().block_size(), 64);  // the file's context (cpu_default: 256)
  auto overridden = resolve_config(
      "preset:cpu_default",
      {"model.init_from=" + dir("pretrained"), "data.seq_len=32", "model.n_layer=3"},
      "cpu_default", model::complete_from_pretrained);
  ASSERT_FALSE(overridden.ok());
  EXPECT_NE(overridden.status().message().find("model.n_layer = 3 but the file has 2"),
            std::string::npos)
      << overridden.status();
  auto missing = config("arch", {"model.init_from=" + dir("no_such_model")});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("does not exist"), std::string::npos);
}

TEST_F(FineTune, StepZeroIsThePretrainedLossThenLossGoesDown) {
  auto exp = config("down", {"train.max_steps=20"});
  ASSERT_TRUE(exp.ok()) << exp.status();
  std::vector<double> losses;
  auto r = train_recording(*exp, losses);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(losses.size(), 20u);

  // Step 1's loss is the pretrained model's on step 0's batch: the weights came through.
  auto [x, y] = first_batch(*exp);
  model::CausalLM reloaded = load(dir("pretrained"));
  torch::NoGradGuard no_grad;
  const double expected = reloaded->loss(x, y).item<double>();
  const double untrained = (*pretrained_)->loss(x, y).item<double>();
  EXPECT_NEAR(losses.front(), expected, 1e-5);
  EXPECT_NEAR(expected, untrained, 1e-6);
  EXPECT_LT(losses.back(), 0.75 * losses.front());
  EXPECT_LT(r->val_loss, losses.front());
}

TEST_F(FineTune, ResumeIsBitIdentical) {
  std::vector<double> straight, resumed;
  trainer::TrainHooks a, b;
  a.on_step = [&](int64_t, double loss) { straight.push_back(loss); };
  b.on_step = [&](int64_t step, double loss) {
    resumed.push_back(loss);
    if (step == 5) trainer::request_stop(SIGINT);
  };
  auto exp_a = config("straight", {"attention.kind=HASH", "attention.num_buckets=4"});
  auto exp_b = config("resumed", {"attention.kind=HASH", "attention.num_buckets=4"});
  ASSERT_TRUE(exp_a.ok() && exp_b.ok());
  ASSERT_TRUE(trainer::train(*exp_a, a).ok());
  auto first = trainer::train(*exp_b, b);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(first->steps, 5);
  auto second = trainer::train(*exp_b, b);
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_EQ(straight.size(), 12u);
  ASSERT_EQ(resumed.size(), 12u);
  for (size_t i = 0; i < 12; ++i) EXPECT_EQ(straight[i], resumed[i]) << "step " << i + 1;
}

TEST_F(FineTune, ExportBeforeAndAfterTrainingLoadsInTransformers) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  std::mt19937 rng(std::random_device{}());
  auto ids = random_ids(40, 256, rng);
  // Before: the pretrained directory as written.
  {
    Tensor ours = our_logits(*pretrained_, ids);
    Reference ref = reference("--model " + quote(dir("pretrained")), ids, "", "ft_before");
    ASSERT_TRUE(ref.logits.defined());
    EXPECT_LE(max_abs_diff(ours, ref.logits), 1e-4);
    EXPECT_GT(ref.logits.abs().max().item<double>(), 1.0);
  }
  // After: a fine-tuned run exported with `convert --to native`.
  auto exp = config("export", {"train.max_steps=6"});
  ASSERT_TRUE(exp.ok()) << exp.status();
  ASSERT_TRUE(trainer::train(*exp).ok());
  const std::string out = dir("export_hf"), log = dir("export.log");
  ASSERT_EQ(run(quote(kBinary) + " convert --to native --input " + quote(dir("export")) +
                    " --output " + quote(out),
                log),
            0)
      << read_file(log);
  EXPECT_NE(read_file(log).find("rope_scaling llama3"), std::string::npos) << read_file(log);
  auto loaded = trainer::restore_run(dir("export"), "cpu");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  Tensor trained = our_logits(loaded->model, ids);
  EXPECT_GT(max_abs_diff(trained, our_logits(*pretrained_, ids)), 1e-3);  // it did train
  Reference ref = reference("--model " + quote(out), ids, "", "ft_after");
  ASSERT_TRUE(ref.logits.defined());
  EXPECT_LE(max_abs_diff(trained, ref.logits), 1e-4);
  // Our loader reads the export back to the same logits.
  EXPECT_LE(max_abs_diff(our_logits(load(out), ids), trained), 1e-6);
}

// A run of ours exports to GGUF: llama3 scaling becomes rope_freqs.weight,
// the byte-tokenized run has no vocabulary to carry (the command says so),
// and Q8_0 keeps matrices whose rows are not whole blocks as F16.
TEST_F(FineTune, RunExportsToGguf) {
  auto exp = config("gguf_run", {"train.max_steps=3"});
  ASSERT_TRUE(exp.ok()) << exp.status();
  ASSERT_TRUE(trainer::train(*exp).ok());
  auto loaded = trainer::restore_run(dir("gguf_run"), "cpu");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  std::mt19937 rng(3);
  const auto ids = random_ids(40, 256, rng);
  const Tensor trained = our_logits(loaded->model, ids);
  const std::string out = dir("run.gguf"), log = dir("run_gguf.log");
  ASSERT_EQ(run(quote(kBinary) + " convert --input " + quote(dir("gguf_run")) + " --output " + quote(out),
                log),
            0)
      << read_file(log);
  EXPECT_NE(read_file(log).find("no_vocab"), std::string::npos) << read_file(log);
  auto ckpt = must(checkpoint::load_llama_checkpoint(out));
  EXPECT_EQ(ckpt.rope_freq_factors.size(), 8u);  // head_dim 16
  EXPECT_EQ(ckpt.config.rope_scaling.type, "");  // llama.cpp's form of llama3
  // F16 weights (the default type): close, not equal.
  EXPECT_LE(max_abs_diff(our_logits(model::load_llama(ckpt, {}), ids), trained), 2e-2);

  const std::string q8 = dir("run_q8.gguf");
  ASSERT_EQ(run(quote(kBinary) + " convert --to gguf --gguf-type q8_0 --input " + quote(dir("gguf_run")) +
                    " --output " + quote(q8),
                log),
            0)
      << read_file(log);
  EXPECT_NE(read_file(log).find("stored as F16"), std::string::npos) << read_file(log);
  auto q8_ckpt = must(checkpoint::load_llama_checkpoint(q8));
  EXPECT_EQ(q8_ckpt.tensors.at("model.layers.0.mlp.down_proj.weight").dtype, checkpoint::DType::kF16);
  EXPECT_EQ(q8_ckpt.tensors.at("model.layers.0.mlp.up_proj.weight").dtype, checkpoint::DType::kQ8_0);
  EXPECT_EQ(q8_ckpt.tensors.at("model.norm.weight").dtype, checkpoint::DType::kF32);

  // F32 through the library: the llama3 factors reproduce the frequencies to
  // float rounding.
  const std::string f32 = dir("run_f32.gguf");
  checkpoint::GgufLlamaOptions o;
  o.type = checkpoint::DType::kF32;
  must(model::write_gguf_llama(*dynamic_cast<model::LlamaImpl*>(loaded->model.get()), f32, o));
  auto back = load(f32);
  EXPECT_LE(max_abs_diff(our_logits(back, ids), trained), 1e-4);
  // read(write(m)) == m: the Q/K interleaving is undone exactly at load.
  auto written = loaded->model->named_parameters(), read = back->named_parameters();
  EXPECT_EQ(written.size(), read.size());
  for (const auto& item : written) {
    ASSERT_TRUE(read.contains(item.key())) << item.key();
    EXPECT_TRUE(at::equal(item.value(), read[item.key()])) << item.key();
  }
}

// Gradients of the training loss, parameter by parameter.
std::map<std::string, Tensor> loss_gradients(model::CausalLM m, const Tensor& x, const Tensor& y) {
  for (auto& p : m->parameters()) p.mutable_grad() = Tensor();
  m->loss(x, y).backward();
  std::map<std::string, Tensor> g;
  for (const auto& item : m->named_parameters())
    if (item.value().grad().defined()) g[item.key()] = item.value().grad().clone();
  return g;
}

// Recomputing each block in the backward gives the gradients of keeping it,
// for dense and for hash attention (whose rotations must be drawn again
// alike), and leaves the attention's random stream where it was.
TEST_F(FineTune, ActivationCheckpointingGivesTheSameGradients) {
  for (const char* kind : {"DENSE", "HASH", "SHIFT"}) {
    SCOPED_TRACE(kind);
    auto exp = config("ckpt", {std::string("attention.kind=") + kind, "attention.num_buckets=4",
                               "attention.group_size=5"});
    ASSERT_TRUE(exp.ok()) << exp.status();
    auto a = model::build_model(*exp), b = model::build_model(*exp);
    ASSERT_TRUE(a.ok() && b.ok());
    ASSERT_TRUE(model::load_pretrained(*exp, *a).ok());
    ASSERT_TRUE(model::load_pretrained(*exp, *b).ok());
    (*a)->to(at::kDouble);
    (*b)->to(at::kDouble);
    (*a)->train();
    (*b)->train();
    (*b)->set_activation_checkpointing(true);
    Tensor x = at::randint(0, 256, {2, 24}, at::kLong), y = at::randint(0, 256, {2, 24}, at::kLong);
    auto ga = loss_gradients(*a, x, y), gb = loss_gradients(*b, x, y);
    ASSERT_EQ(ga.size(), gb.size());
    ASSERT_EQ(ga.size(), (*a)->parameters().size());
    for (const auto& [name, g] : ga) {
      const double scale = g.abs().max().item<double>();
      EXPECT_GT(scale, 0) << name;
      EXPECT_LE(max_abs_diff(gb[name], g), 1e-12 * scale) << name;
    }
    EXPECT_TRUE(at::equal((*a)->attention_generator().get_state(),
                          (*b)->attention_generator().get_state()));
  }
  // The config switch reaches the model.
  auto on = config("ckpt", {"train.activation_checkpointing=true"});
  ASSERT_TRUE(on.ok());
  EXPECT_TRUE((*model::build_model(*on))->activation_checkpointing());
}

// LoRA: a new adapter changes nothing, only adapters (and what is asked)
// train, and the merged export is the adapter model.
TEST_F(FineTune, LoraTrainsOnlyAdaptersAndMergesOnExport) {
  auto exp = config("lora", {"model.lora.rank=4", "model.lora.alpha=8",
                             "model.lora.train_norms=true", "optim.lr=1e-2"});
  ASSERT_TRUE(exp.ok()) << exp.status();
  std::vector<double> losses;
  auto r = train_recording(*exp, losses);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(losses.size(), 12u);
  // Step 1 is the base model's loss on step 0's batch (B = 0 adapters).
  auto [x, y] = first_batch(*exp);
  {
    torch::NoGradGuard no_grad;
    EXPECT_NEAR(losses.front(), (*pretrained_)->loss(x, y).item<double>(), 1e-5);
  }
  EXPECT_LT(losses.back(), losses.front());

  auto lora_run = trainer::restore_run(dir("lora"), "cpu");
  ASSERT_TRUE(lora_run.ok()) << lora_run.status();
  auto before = (*pretrained_)->named_parameters();
  int adapters = 0, norms = 0;
  for (const auto& item : lora_run->model->named_parameters()) {
    const std::string& name = item.key();
    const bool adapter = name.find(".lora_") != std::string::npos;
    const bool norm = name.find("norm") != std::string::npos;
    if (adapter) {
      ++adapters;
      if (name.find("lora_b") != std::string::npos)
        EXPECT_GT(item.value().abs().max().item<double>(), 0) << name << " did not train";
      continue;
    }
    const double moved = max_abs_diff(item.value(), before[name]);
    if (norm) {
      ++norms;
      EXPECT_GT(moved, 0) << name << " should train (train_norms)";
    } else {
      EXPECT_EQ(moved, 0) << name << " is frozen";
    }
  }
  EXPECT_EQ(adapters, 2 * 7 * 2);  // A and B, 7 projections, 2 layers
  EXPECT_EQ(norms, 2 * 2 + 1);

  // The export folds the adapters in: the same logits as the adapter model.
  std::mt19937 rng(3);
  auto ids = random_ids(40, 256, rng);
  Tensor with_adapters = our_logits(lora_run->model, ids);
  EXPECT_GT(max_abs_diff(with_adapters, our_logits(*pretrained_, ids)), 1e-3);
  const std::string out = dir("lora_hf"), log = dir("lora_export.log");
  ASSERT_EQ(run(quote(kBinary) + " convert --to native --input " + quote(dir("lora")) +
                    " --output " + quote(out),
                log),
            0)
      << read_file(log);
  EXPECT_LE(max_abs_diff(our_logits(load(out), ids), with_adapters), 1e-5);

  // A run started from the LoRA run starts from its merged weights.
  auto next = config("lora_next", {"model.init_from=" + dir("lora")});
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->model().lora().rank(), 0);
  auto built = model::build_model(*next);
  ASSERT_TRUE(built.ok());
  ASSERT_TRUE(model::load_pretrained(*next, *built).ok());
  EXPECT_LE(max_abs_diff(our_logits(*built, ids), with_adapters), 1e-5);

  // Bad settings are refused with the field named.
  auto bad = config("lora_bad", {"model.lora.rank=2", "model.lora.targets=qkv"});
  ASSERT_TRUE(bad.ok());
  auto refused = trainer::train(*bad);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("model.lora.targets"), std::string::npos)
      << refused.status();
  EXPECT_FALSE(config("lora_bad", {"model.lora.rank=-1"}).ok());
}

TEST_F(FineTune, DataOfAnotherTokenizerIsRefused) {
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " is absent";
  // SmolLM2 reads BPE ids; the corpus is byte-tokenized.
  auto exp = resolve_config("preset:llama_finetune",
                            {"model.init_from=" + kSmolGguf, "data.dir=" + dir("data"),
                             "data.seq_len=64", "checkpoint.out_dir=" + dir("mismatch"),
                             "train.device=cpu"},
                            "llama_finetune", model::complete_from_pretrained);
  ASSERT_TRUE(exp.ok()) << exp.status();
  EXPECT_EQ(exp->model().n_layer(), 30);
  EXPECT_EQ(exp->model().n_kv_head(), 3);
  auto r = trainer::train(*exp);
  ASSERT_FALSE(r.ok());
  const std::string message(r.status().message());
  EXPECT_NE(message.find("prepared with tokenizer byte"), std::string::npos) << message;
  EXPECT_NE(message.find("prepare --tokenizer"), std::string::npos) << message;
  EXPECT_FALSE(fs::exists(dir("mismatch") + "/ckpt.pt"));
}

}  // namespace
}  // namespace sparseflash
