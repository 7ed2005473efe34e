// The training loop on a tiny generated corpus: loss goes down, resume is
// bit-identical on CPU, bad input fails clearly and leaves good files alone.
#include <ftw.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

#include "tests/test_util.h"
#include "configs/config.h"
#include "data/prepare.h"
#include "tokenizer/tokenizer.h"
#include "trainer/state.h"
#include "trainer/trainer.h"

namespace sparseflash {
namespace {

namespace fs = std::filesystem;

using test_util::remove_tree;

// A corpus with structure a small model learns in a few dozen steps.
std::string make_corpus(const std::string& root) {
  const std::string text_dir = root + "/text", data_dir = root + "/data";
  remove_tree(root);
  fs::create_directories(text_dir);
  std::mt19937 rng(7);
  const char* words[] = {"the ", "kernel ", "driver ", "maps ", "memory ", "and ", "calls ",
                         "a ", "function ", "returns ", "zero.\n"};
  for (int doc = 0; doc < 40; ++doc) {
    std::ofstream out(text_dir + "/doc" + std::to_string(doc) + ".txt");
    for (int sentence = 0; sentence < 60; ++sentence)
      for (int w = 0; w < 6; ++w) out << words[(sentence + w * (rng() % 2)) % 11];
  }
  data::PrepareOptions o;
  o.inputs = {text_dir};
  o.out_dir = data_dir;
  o.val_fraction = 0.2;
  auto meta = data::prepare(o);
  EXPECT_TRUE(meta.ok()) << meta.status();
  return data_dir;
}

class TrainerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = (fs::temp_directory_path() /
             ("sf_trainer_" + std::string(::testing::UnitTest::GetInstance()
                                              ->current_test_info()->name())))
                .string();
    data_dir_ = make_corpus(root_);
  }
  void TearDown() override { remove_tree(root_); }

  config::Experiment config(const std::string& run, std::vector<std::string> extra = {}) {
    std::vector<std::string> o = {"data.dir=" + data_dir_, "checkpoint.out_dir=" + root_ + "/" + run,
                                  "train.device=cpu", "eval.sample_tokens=0", "eval.batches=2",
                                  "train.cpu_threads=1"};
    o.insert(o.end(), extra.begin(), extra.end());
    auto exp = resolve_config("preset:tiny_test", o, "tiny_test");
    EXPECT_TRUE(exp.ok()) << exp.status();
    return *exp;
  }

  std::string root_, data_dir_;
};

TEST_F(TrainerTest, LossGoesDown) {
  std::vector<double> losses;
  trainer::TrainHooks hooks;
  hooks.on_step = [&](int64_t, double loss) { losses.push_back(loss); };
  auto r = trainer::train(config("run", {"train.max_steps=60", "optim.lr=3e-3"}), hooks);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(losses.size(), 60u);
  EXPECT_NEAR(losses.front(), std::log(256.0), 0.3);
  EXPECT_LT(losses.back(), 0.6 * losses.front());
  EXPECT_LT(r->val_bits_per_byte, r->unigram_bits_per_byte);
  EXPECT_TRUE(fs::exists(root_ + "/run/ckpt.pt"));
  EXPECT_TRUE(fs::exists(root_ + "/run/config.txtpb"));
  EXPECT_TRUE(fs::exists(root_ + "/run/metrics.jsonl"));
}

TEST_F(TrainerTest, ResumeGivesBitIdenticalLosses) {
  for (const char* kind : {"HASH", "DROP"}) {
    SCOPED_TRACE(kind);
    const std::vector<std::string> common = {"train.max_steps=12", std::string("attention.kind=") + kind,
                                             "train.grad_accum=2"};
    std::vector<double> straight, resumed;
    trainer::TrainHooks a;
    a.on_step = [&](int64_t, double loss) { straight.push_back(loss); };
    ASSERT_TRUE(trainer::train(config(std::string("a") + kind, common), a).ok());

    // Stop after step 5 the way SIGINT does, then rerun the same config.
    trainer::TrainHooks b;
    b.on_step = [&](int64_t step, double loss) {
      resumed.push_back(loss);
      if (step == 5) trainer::request_stop(SIGINT);
    };
    auto first = trainer::train(config(std::string("b") + kind, common), b);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->interrupted_by, SIGINT);
    EXPECT_EQ(first->steps, 5);
    auto second = trainer::train(config(std::string("b") + kind, common), b);
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_EQ(second->interrupted_by, 0);
    ASSERT_EQ(straight.size(), 12u);
    ASSERT_EQ(resumed.size(), 12u);
    for (size_t i = 0; i < 12; ++i) EXPECT_EQ(straight[i], resumed[i]) << "step " << i + 1;
  }
}

TEST_F(TrainerTest, RefusesCheckpointOfAnotherArchitecture) {
  ASSERT_TRUE(trainer::train(config("run", {"train.max_steps=2"})).ok());
  auto r = trainer::train(config("run", {"train.max_steps=4", "model.n_layer=3"}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("model.n_layer"), std::string::npos) << r.status();
}

TEST_F(TrainerTest, NonFiniteLossStopsWithoutReplacingCheckpoint) {
  ASSERT_TRUE(trainer::train(config("run", {"train.max_steps=2"})).ok());
  const auto before = fs::last_write_time(root_ + "/run/ckpt.pt");
  auto r = trainer::train(config("run", {"train.max_steps=50", "optim.lr=1e30",
                                         "schedule.warmup_steps=1", "optim.grad_clip=0"}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("training loss is"), std::string::npos) << r.status();
  EXPECT_EQ(fs::last_write_time(root_ + "/run/ckpt.pt"), before);
  EXPECT_FALSE(fs::exists(root_ + "/run/ckpt.pt.tmp"));
}

TEST_F(TrainerTest, UnwritableOutDirIsReported) {
  std::ofstream(root_ + "/file") << "x";
  auto exp = config("run", {"train.max_steps=2"});
  exp.mutable_checkpoint()->set_out_dir(root_ + "/file/sub");
  auto r = trainer::train(exp);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("out_dir"), std::string::npos) << r.status();
}

TEST_F(TrainerTest, CorruptCheckpointIsReported) {
  fs::create_directories(root_ + "/run");
  std::ofstream(root_ + "/run/ckpt.pt") << "not a checkpoint";
  auto r = trainer::train(config("run", {"train.max_steps=2"}));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("ckpt.pt"), std::string::npos) << r.status();
}

TEST_F(TrainerTest, EvalAndSampleFromCheckpoint) {
  ASSERT_TRUE(trainer::train(config("run", {"train.max_steps=3"})).ok());
  auto loaded = trainer::load_model(root_ + "/run", "cpu");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 3);
  auto val = data::TokenLoader::open(data_dir_, data::Split::kVal, 32);
  ASSERT_TRUE(val.ok());
  auto e = trainer::evaluate(loaded->model, *val, 2, 4, loaded->device, false);
  EXPECT_GT(e.loss, 0);
  EXPECT_LT(e.loss, 10);
  const auto tok = tokenizer::open_tokenizer("byte");
  std::string text = trainer::sample_text(loaded->model, *tok, "the ", 20, 0.8, 10, 1);
  EXPECT_EQ(text.rfind("the ", 0), 0u);
  EXPECT_GE(text.size(), 4u);
}

}  // namespace
}  // namespace sparseflash
