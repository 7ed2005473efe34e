// Corrupt training checkpoints (trainer/checkpoint.h) are refused before LibTorch's
// unpickler sees them: a fuzzer-found file whose data.pkl made it allocate
// ~10 GB, and corruptions built here from a real tiny checkpoint by rewriting
// its data.pkl and zipping it again with LibTorch's own writer.
#include <sys/resource.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <gtest/gtest.h>

#include "configs/config.h"
#include "model/causal_lm.h"
#include "tests/test_util.h"
#include "tests/tiny_causal_lm.h"
#include "trainer/checkpoint.h"

namespace sparseflash {
namespace {

namespace fs = std::filesystem;

// Peak resident memory of this process so far, in MB.
long peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024;
}

class CheckpointArchive : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() /
            ("sf_ckpt_archive_" +
             std::string(::testing::UnitTest::GetInstance()->current_test_info()->name())))
               .string();
    test_util::remove_tree(dir_);
    fs::create_directories(dir_);
    auto exp = load_preset("tiny_test");
    ASSERT_TRUE(exp.ok()) << exp.status();
    fill_defaults(&*exp);
    exp_ = *exp;
    model_ = test_util::tiny_causal_lm();
    adamw_ = std::make_unique<trainer::AdamW>(model_, exp_.optim());
    real_ = dir_ + "/real.pt";
    ASSERT_TRUE(trainer::save_checkpoint(real_, exp_, "byte", model_, adamw_.get(), {12, 3456}).ok());
  }
  void TearDown() override { test_util::remove_tree(dir_); }

  // `real_` zipped again as `name`, its data.pkl replaced by edit(data.pkl).
  std::string rewrite(const std::string& name,
                      const std::function<std::string(std::string)>& edit) {
    const std::string out = dir_ + "/" + name;
    caffe2::serialize::PyTorchStreamReader reader(real_);
    caffe2::serialize::PyTorchStreamWriter writer(out);
    for (const std::string& record : reader.getAllRecords()) {
      auto [data, size] = reader.getRecord(record);
      std::string bytes(static_cast<const char*>(data.get()), size);
      if (record == "data.pkl") bytes = edit(bytes);
      writer.writeRecord(record, bytes.data(), bytes.size());
    }
    writer.writeEndOfFile();
    return out;
  }

  // data.pkl with `ops` inserted before its final STOP.
  std::string insert_before_stop(const std::string& name, const std::string& ops) {
    return rewrite(name, [&](std::string pkl) {
      EXPECT_EQ(pkl.back(), '.');
      return pkl.insert(pkl.size() - 1, ops);
    });
  }

  void expect_refused(const std::string& path, const std::string& why) {
    auto info = trainer::read_checkpoint_info(path);
    ASSERT_FALSE(info.ok());
    EXPECT_EQ(info.status().code(), absl::StatusCode::kDataLoss) << info.status();
    const std::string message(info.status().message());
    EXPECT_NE(message.find("corrupt checkpoint: " + path), std::string::npos) << message;
    EXPECT_NE(message.find(why), std::string::npos) << message;
    // load_checkpoint opens the archive the same way.
    auto loaded = trainer::load_checkpoint(path, model_, adamw_.get());
    ASSERT_FALSE(loaded.ok());
    EXPECT_NE(loaded.message().find(why), std::string::npos) << loaded;
  }

  std::string dir_, real_;
  config::Experiment exp_;
  model::CausalLM model_{nullptr};
  std::unique_ptr<trainer::AdamW> adamw_;
};

TEST_F(CheckpointArchive, RealCheckpointLoads) {
  auto info = trainer::read_checkpoint_info(real_);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state.step, 12);
  EXPECT_EQ(info->state.tokens, 3456);
  EXPECT_TRUE(trainer::load_checkpoint(real_, model_, adamw_.get()).ok());
}

TEST_F(CheckpointArchive, RezippedUnchangedCheckpointLoads) {
  // The control for the corruptions below: zipping again changes nothing.
  const std::string same = rewrite("same.pt", [](std::string pkl) { return pkl; });
  auto info = trainer::read_checkpoint_info(same);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state.step, 12);
  EXPECT_TRUE(trainer::load_checkpoint(same, model_, adamw_.get()).ok());
}

// fuzz_checkpoint_info's finding: a mutated 16 KB checkpoint whose data.pkl
// names a huge memo index; LibTorch allocated and zeroed ~10.7 GB for it.
TEST_F(CheckpointArchive, FuzzedMemoIndexIsRefusedWithoutAllocating) {
  const std::string path = std::string(SF_SOURCE_DIR) + "/tests/data/checkpoint_info_oom_memo.pt";
  ASSERT_TRUE(fs::exists(path));
  const auto start = std::chrono::steady_clock::now();
  expect_refused(path, "memo index");
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(10));
  EXPECT_LT(peak_rss_mb(), 2048);
}

TEST_F(CheckpointArchive, HugeLongBinputIsRefused) {
  // LONG_BINPUT 0x7fffffff: a 32 GB memo table for LibTorch.
  expect_refused(insert_before_stop("memo.pt", std::string("r\xff\xff\xff\x7f", 5)),
                 "memo index 2147483647");
}

TEST_F(CheckpointArchive, TruncatedPickleIsRefused) {
  expect_refused(rewrite("truncated.pt", [](std::string pkl) { return pkl.substr(0, pkl.size() - 1); }),
                 "ends without STOP");
  expect_refused(rewrite("cut.pt", [](std::string pkl) { return pkl.substr(0, pkl.size() / 2); }),
                 "data.pkl");
}

TEST_F(CheckpointArchive, StringLongerThanRecordIsRefused) {
  // BINUNICODE of 2^28 bytes with 3 left: LibTorch sizes the string first.
  expect_refused(insert_before_stop("string.pt", std::string("X\x00\x00\x00\x10" "abc", 8)),
                 "string of 268435456 bytes");
}

TEST_F(CheckpointArchive, OddDictAndUnknownOpcodeAreRefused) {
  // MARK NONE DICT: a key without a value (LibTorch would read past its stack).
  expect_refused(insert_before_stop("dict.pt", "(Nd"), "a key without a value");
  // POP is a pickle opcode LibTorch's unpickler does not read.
  expect_refused(insert_before_stop("pop.pt", "N0"), "not an opcode LibTorch reads");
}

}  // namespace
}  // namespace sparseflash
