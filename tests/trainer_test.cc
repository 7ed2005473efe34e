// The training loop on a tiny generated corpus: loss goes down, resume is
// bit-identical on CPU, bad input fails clearly and leaves good files alone;
// TensorBoard event files hold what metrics.jsonl holds (read back with the
// tensorboard package: tests/python/tb_events.py).
#include <ftw.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>

#include <gtest/gtest.h>

#include "nlohmann/json.hpp"
#include "tests/test_util.h"
#include "configs/config.h"
#include "data/prepare.h"
#include "tokenizer/tokenizer.h"
#include "trainer/checkpoint.h"
#include "trainer/tensorboard.h"
#include "trainer/trainer.h"

namespace sparseflash {
namespace {

namespace fs = std::filesystem;

using test_util::remove_tree;
using test_util::must;

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
  // Hash with capped buckets too (attention.lsh_capacity).
  for (const std::string kind : {"HASH", "DROP", "HASH_CAPPED"}) {
    SCOPED_TRACE(kind);
    std::vector<std::string> common = {"train.max_steps=12", "train.grad_accum=2"};
    if (kind == "HASH_CAPPED") {
      common.insert(common.end(), {"attention.kind=HASH", "attention.lsh_capacity=1"});
    } else {
      common.push_back("attention.kind=" + kind);
    }
    std::vector<double> straight, resumed;
    trainer::TrainHooks a;
    a.on_step = [&](int64_t, double loss) { straight.push_back(loss); };
    ASSERT_TRUE(trainer::train(config("a" + kind, common), a).ok());

    // Stop after step 5 the way SIGINT does, then rerun the same config.
    trainer::TrainHooks b;
    b.on_step = [&](int64_t step, double loss) {
      resumed.push_back(loss);
      if (step == 5) trainer::request_stop(SIGINT);
    };
    auto first = trainer::train(config("b" + kind, common), b);
    ASSERT_TRUE(first.ok()) << first.status();
    EXPECT_EQ(first->interrupted_by, SIGINT);
    EXPECT_EQ(first->steps, 5);
    auto second = trainer::train(config("b" + kind, common), b);
    ASSERT_TRUE(second.ok()) << second.status();
    EXPECT_EQ(second->interrupted_by, 0);
    ASSERT_EQ(straight.size(), 12u);
    ASSERT_EQ(resumed.size(), 12u);
    for (size_t i = 0; i < 12; ++i) EXPECT_EQ(straight[i], resumed[i]) << "step " << i + 1;
  }
}

// metrics' train_s: the training clock, without evaluations and checkpoint
// writes, carried over a resume by the checkpoint.
TEST_F(TrainerTest, TrainingClockSkipsEvaluationAndCarriesOverResume) {
  const std::vector<std::string> common = {"train.max_steps=8", "logging.interval=1",
                                           "eval.interval=2", "eval.batches=6"};
  trainer::TrainHooks hooks;
  hooks.on_step = [](int64_t step, double) {
    if (step == 5) trainer::request_stop(SIGINT);
  };
  ASSERT_TRUE(trainer::train(config("run", common), hooks).ok());
  ASSERT_TRUE(trainer::train(config("run", common), hooks).ok());
  struct Row { int64_t step; double elapsed, train; };
  std::vector<Row> rows;
  std::ifstream in(root_ + "/run/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("train_s"))
      rows.push_back({j["step"].get<int64_t>(), j["elapsed_s"].get<double>(),
                      j["train_s"].get<double>()});
  }
  ASSERT_EQ(rows.size(), 8u);
  for (size_t i = 0; i < rows.size(); ++i) ASSERT_EQ(rows[i].step, static_cast<int64_t>(i) + 1);
  // Before the first evaluation the two clocks are one.
  EXPECT_EQ(rows[0].train, rows[0].elapsed);
  EXPECT_EQ(rows[1].train, rows[1].elapsed);
  // From the evaluation after step 2 on, the training clock lags the wall clock.
  EXPECT_GT(rows[2].elapsed - rows[2].train, 0);
  EXPECT_GT(rows[4].elapsed - rows[4].train, rows[2].elapsed - rows[2].train);
  // The resumed process (steps 6-8) starts its wall clock again; the training
  // clock goes on from what the checkpoint after step 5 counted.
  EXPECT_LT(rows[5].elapsed, rows[4].elapsed);
  for (size_t i = 1; i < rows.size(); ++i)
    EXPECT_GT(rows[i].train, rows[i - 1].train) << "step " << rows[i].step;
  auto info = trainer::read_checkpoint_info(root_ + "/run/ckpt.pt");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state.step, 8);
  EXPECT_GE(info->state.train_seconds, rows[7].train);
}

// metrics' pattern_density: per layer, the share of the dense causal pairs
// the last step's pattern allowed; 1 for a dense layer; absent when all are dense.
TEST_F(TrainerTest, MetricsLogPatternDensityPerLayer) {
  auto densities = [&](const std::string& name) {
    std::vector<std::vector<double>> out;
    std::ifstream in(root_ + "/" + name + "/metrics.jsonl");
    for (std::string line; std::getline(in, line);) {
      const auto j = nlohmann::json::parse(line);
      if (j.contains("loss")) {
        out.emplace_back();
        if (j.contains("pattern_density"))
          out.back() = j["pattern_density"].get<std::vector<double>>();
      }
    }
    return out;
  };
  // tiny_test: 2 layers of hash attention; layer 0 dense here.
  ASSERT_TRUE(trainer::train(config("hybrid", {"train.max_steps=10",
                                               "layer_attention=[{layers: [0] attention {kind: DENSE}}]"}))
                  .ok());
  const auto hybrid = densities("hybrid");
  ASSERT_EQ(hybrid.size(), 2u);  // logged every 5 steps
  for (const auto& d : hybrid) {
    ASSERT_EQ(d.size(), 2u);
    EXPECT_EQ(d[0], 1.0);
    EXPECT_GT(d[1], 0.0);
    EXPECT_LT(d[1], 1.0);
  }
  ASSERT_TRUE(trainer::train(config("dense", {"train.max_steps=5", "attention.kind=DENSE"})).ok());
  const auto dense = densities("dense");
  ASSERT_EQ(dense.size(), 1u);
  EXPECT_TRUE(dense[0].empty());
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
  auto loaded = trainer::restore_run(root_ + "/run", "cpu");
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  EXPECT_EQ(loaded->step, 3);
  auto val = data::TokenLoader::open(data_dir_, data::Split::kVal, 32);
  ASSERT_TRUE(val.ok());
  auto e = trainer::evaluate(loaded->model, *val, 2, 4, loaded->device, false);
  EXPECT_GT(e.loss, 0);
  EXPECT_LT(e.loss, 10);
  const auto tok = must(tokenizer::open_tokenizer("byte"));
  std::string text = trainer::sample_text(loaded->model, *tok, "the ", 20, 0.8, 10, 1);
  EXPECT_EQ(text.rfind("the ", 0), 0u);
  EXPECT_GE(text.size(), 4u);
}

// ---------------------------------------------------------------------------
// TensorBoard event files

// CRC-32C's catalogue check value (CRC of "123456789") is 0xe3069283; records
// carry it masked: rotated right by 15 bits, plus 0xa282ead8.
TEST(EventFiles, CrcIsMaskedCrc32c) {
  const uint32_t crc = 0xe3069283u;
  EXPECT_EQ(trainer::masked_crc32c("123456789"), ((crc >> 15) | (crc << 17)) + 0xa282ead8u);
}

TEST(EventFiles, RecordFramingIsLengthCrcDataCrc) {
  const std::string data = "an event";
  const std::string record = trainer::frame_record(data);
  ASSERT_EQ(record.size(), 8 + 4 + data.size() + 4);
  uint64_t length = 0;
  uint32_t length_crc = 0, data_crc = 0;
  std::memcpy(&length, record.data(), 8);  // little-endian, as on every host we run
  std::memcpy(&length_crc, record.data() + 8, 4);
  std::memcpy(&data_crc, record.data() + 12 + data.size(), 4);
  EXPECT_EQ(length, data.size());
  EXPECT_EQ(length_crc, trainer::masked_crc32c(record.substr(0, 8)));
  EXPECT_EQ(record.substr(12, data.size()), data);
  EXPECT_EQ(data_crc, trainer::masked_crc32c(data));
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<std::string> event_files(const std::string& dir) {
  std::vector<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir))
    if (entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0)
      files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

TEST(EventFiles, ReaderFindsCorruptionAndTornTail) {
  const std::string dir = (fs::temp_directory_path() / "sf_event_files").string();
  remove_tree(dir);
  fs::create_directories(dir);
  std::string path;
  {
    auto writer = trainer::EventWriter::create(dir);
    ASSERT_TRUE(writer.ok()) << writer.status();
    path = (*writer)->path();
    EXPECT_EQ(fs::path(path).filename().string().rfind("events.out.tfevents.", 0), 0u);
    ASSERT_TRUE((*writer)->add_scalars(5, {{"loss", 2.5}, {"lr", 1e-3}}).ok());
    ASSERT_TRUE((*writer)->add_text(5, "config", "```\nx: 1\n```\n").ok());
  }
  bool torn = true;
  auto records = trainer::read_records(path, &torn);
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), 3u);  // file_version, scalars, text
  EXPECT_FALSE(torn);

  // A second writer in the same second gets a later name.
  auto second = trainer::EventWriter::create(dir);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_GT((*second)->path(), path);

  const std::string bytes = read_file(path);
  // A record cut short (a killed writer) ends the file.
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes.substr(0, bytes.size() - 3);
  records = trainer::read_records(path, &torn);
  ASSERT_TRUE(records.ok()) << records.status();
  EXPECT_EQ(records->size(), 2u);
  EXPECT_TRUE(torn);
  // A flipped byte is a CRC error naming the file.
  std::string flipped = bytes;
  flipped[bytes.size() / 2] ^= 0x20;
  std::ofstream(path, std::ios::binary | std::ios::trunc) << flipped;
  records = trainer::read_records(path);
  ASSERT_FALSE(records.ok());
  EXPECT_EQ(records.status().code(), absl::StatusCode::kDataLoss);
  EXPECT_NE(records.status().message().find(path), std::string::npos) << records.status();
  EXPECT_NE(records.status().message().find("CRC"), std::string::npos) << records.status();
  // ... and stops a resume, naming the file.
  auto opened = trainer::open_run_events(dir, 3);
  ASSERT_FALSE(opened.ok());
  EXPECT_NE(opened.status().message().find(path), std::string::npos) << opened.status();
  remove_tree(dir);
}

TEST(EventFiles, UncreatableFileIsReported) {
  auto writer = trainer::EventWriter::create("/nonexistent/sf_run");
  ASSERT_FALSE(writer.ok());
  EXPECT_NE(writer.status().message().find("/nonexistent/sf_run/events.out.tfevents."),
            std::string::npos)
      << writer.status();
}

using test_util::python_has;
using test_util::run_python;

constexpr char kTensorBoardReader[] = "tensorboard.backend.event_processing.event_accumulator";

// What the acceptance asks: every scalar of the event files equal to metrics.jsonl.
TEST_F(TrainerTest, TensorBoardScalarsEqualMetrics) {
  // tiny_test: logs every 5 steps, evaluates every 10.
  ASSERT_TRUE(trainer::train(config("run", {"train.max_steps=20"})).ok());
  const std::string run = root_ + "/run";
  ASSERT_EQ(event_files(run).size(), 1u);
  std::string reason;
  if (!python_has(kTensorBoardReader, &reason)) GTEST_SKIP() << reason;
  EXPECT_EQ(run_python("tb_events.py check " + run + " --files 1"), 0);
  EXPECT_EQ(run_python("tb_events.py corrupt " + run + " " + root_ + "/corrupt"), 0);
}

// A run killed after logging step 15 whose checkpoint is at step 10 logs
// steps 11..15 again (other timings): the event files keep the new ones only.
TEST_F(TrainerTest, TensorBoardResumeDoesNotDuplicateSteps) {
  const std::string run = root_ + "/run";
  const std::vector<std::string> common = {"train.max_steps=20", "checkpoint.interval=0"};
  int stop_at = 10;
  trainer::TrainHooks hooks;
  hooks.on_step = [&](int64_t step, double) {
    if (step == stop_at) trainer::request_stop(SIGINT);
  };
  ASSERT_TRUE(trainer::train(config("run", common), hooks).ok());  // checkpoint at 10
  const std::string at_10 = read_file(run + "/ckpt.pt");
  stop_at = 15;
  ASSERT_TRUE(trainer::train(config("run", common), hooks).ok());  // logged up to 15
  std::ofstream(run + "/ckpt.pt", std::ios::binary | std::ios::trunc) << at_10;
  stop_at = -1;
  auto r = trainer::train(config("run", common), hooks);  // from 10 to 20
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->steps, 20);
  ASSERT_EQ(event_files(run).size(), 3u);
  // Rerunning the finished run adds a file with its config, and no step.
  ASSERT_TRUE(trainer::train(config("run", common), hooks).ok());
  ASSERT_EQ(event_files(run).size(), 4u);

  std::string reason;
  if (!python_has(kTensorBoardReader, &reason)) GTEST_SKIP() << reason;
  EXPECT_EQ(run_python("tb_events.py check " + run + " --files 4"), 0);

  // Starting over (checkpoint.resume=false) drops the old files as it drops metrics.jsonl.
  ASSERT_TRUE(trainer::train(config("run", {"train.max_steps=5", "checkpoint.resume=false"})).ok());
  EXPECT_EQ(event_files(run).size(), 1u);
  EXPECT_EQ(run_python("tb_events.py check " + run + " --files 1"), 0);
}

}  // namespace
}  // namespace sparseflash
