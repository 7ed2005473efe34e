// io/atomic_file.h: a file appears whole or not at all, every failure names the
// path, and no temporary is left behind.
#include <dirent.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "io/atomic_file.h"
#include "io/errors.h"
#include "tests/test_util.h"

namespace sparseflash::io {
namespace {

class IoTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char pattern[] = "/tmp/sf_io_test.XXXXXX";
    ASSERT_NE(::mkdtemp(pattern), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { test_util::remove_tree(dir_); }

  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::vector<std::string> names() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir_.c_str())) {
      while (const dirent* e = ::readdir(d)) {
        const std::string n = e->d_name;
        if (n != "." && n != "..") out.push_back(n);
      }
      ::closedir(d);
    }
    std::sort(out.begin(), out.end());
    return out;
  }

  static std::string read(const std::string& p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream ss;
    ss << f.rdbuf();
    return ss.str();
  }

  std::string dir_;
};

TEST_F(IoTest, CommitPutsTheWholeFileInPlaceAndNoTemporary) {
  const std::string p = path("a.bin");
  {
    AtomicFile file(p);
    file.write("hello ", 6);
    file.write_zeros(3);
    file.write(std::string_view("world"));
    EXPECT_EQ(file.size(), 14u);
    // Nothing at PATH until commit.
    EXPECT_NE(::access(p.c_str(), F_OK), 0);
    file.commit();
  }
  EXPECT_EQ(read(p), std::string("hello \0\0\0world", 14));
  EXPECT_EQ(names(), std::vector<std::string>{"a.bin"});
}

TEST_F(IoTest, WithoutCommitThePreviousFileStaysAndTheTemporaryGoes) {
  const std::string p = path("keep.txt");
  ASSERT_TRUE(write_file_atomically(p, "old contents").ok());
  {
    AtomicFile file(p);
    file.write(std::string_view("new, never committed"));
  }
  EXPECT_EQ(read(p), "old contents");
  EXPECT_EQ(names(), std::vector<std::string>{"keep.txt"});
}

TEST_F(IoTest, WriteAtOverwritesWhatWasWrittenAndRefusesToGoPastIt) {
  const std::string p = path("header.bin");
  AtomicFile file(p);
  file.write(std::string_view("0000payload"));
  file.write_at(0, "HEAD", 4);
  try {
    file.write_at(8, "xyzw", 4);  // bytes 8..11 of 11
    FAIL() << "write_at past the end did not throw";
  } catch (const FileError& e) {
    EXPECT_EQ(e.error(), EINVAL);
    EXPECT_NE(std::string(e.what()).find(file.temporary()), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("offset 8"), std::string::npos) << e.what();
  }
  file.commit();
  EXPECT_EQ(read(p), "HEADpayload");
}

TEST_F(IoTest, ANamedTemporaryIsUsedAndRemoved) {
  const std::string p = path("events.out.tfevents.1");
  const std::string tmp = path(".cut.tmp");
  {
    AtomicFile file(p, tmp);
    EXPECT_EQ(file.temporary(), tmp);
    file.write(std::string_view("x"));
    EXPECT_EQ(::access(tmp.c_str(), F_OK), 0);
    file.commit();
  }
  EXPECT_EQ(names(), std::vector<std::string>{"events.out.tfevents.1"});
  ASSERT_TRUE(write_file_atomically(p, "y", tmp).ok());
  EXPECT_EQ(read(p), "y");
  EXPECT_EQ(names(), std::vector<std::string>{"events.out.tfevents.1"});
}

TEST_F(IoTest, AMissingDirectoryIsAStatusNamingThePathWithItsErrno) {
  const std::string p = path("no/such/dir/file.json");
  const absl::Status s = write_file_atomically(p, "{}");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find(p), std::string::npos) << s;
  try {
    AtomicFile file(p);
    FAIL() << "no throw";
  } catch (const FileError& e) {
    EXPECT_EQ(e.error(), ENOENT);
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

TEST_F(IoTest, AWriterThatThrowsLeavesThePreviousFile) {
  const std::string p = path("state.json");
  ASSERT_TRUE(write_file_atomically(p, "v1").ok());
  const absl::Status s = run_atomic_write(p, [](AtomicFile& file) {
    file.write(std::string_view("half of v2"));
    throw std::runtime_error("the serializer failed");
  });
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.code(), absl::StatusCode::kInternal) << s;
  EXPECT_NE(s.message().find(p), std::string::npos) << s;
  EXPECT_NE(s.message().find("the serializer failed"), std::string::npos) << s;
  EXPECT_EQ(read(p), "v1");
  EXPECT_EQ(names(), std::vector<std::string>{"state.json"});
}

TEST_F(IoTest, StaleTemporariesOfDeadWritersAreRemovedLiveOnesKept) {
  const std::string p = path("ckpt.pt");
  // A pid that does not exist: fork a child that exits at once and reap it.
  pid_t dead = ::fork();
  ASSERT_GE(dead, 0);
  if (dead == 0) ::_exit(0);
  int status = 0;
  ASSERT_EQ(::waitpid(dead, &status, 0), dead);
  const std::string stale = p + ".tmp." + std::to_string(dead);
  const std::string mine = p + ".tmp." + std::to_string(::getpid());
  const std::string other = p + ".tmp.notapid";
  for (const std::string& f : {stale, mine, other}) std::ofstream(f) << "x";
  EXPECT_EQ(AtomicFile::remove_stale_temporaries(p), 1);
  EXPECT_NE(::access(stale.c_str(), F_OK), 0);
  EXPECT_EQ(::access(mine.c_str(), F_OK), 0);
  EXPECT_EQ(::access(other.c_str(), F_OK), 0);
}

// --- io/errors.h: the exception <-> Status bridge of the library boundaries ----------

TEST(StatusOf, ConvertsInputErrorsAndKeepsCodes) {
  absl::StatusOr<int> ok = status_of([] { return 7; });
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(*ok, 7);
  EXPECT_TRUE(status_of([] {}).ok());
  const absl::Status bad_file = status_of([] { throw std::runtime_error("m.gguf: magic: bad"); });
  EXPECT_EQ(bad_file.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad_file.message(), "m.gguf: magic: bad");
  // A status travelling as StatusError comes back with its own code.
  absl::StatusOr<std::string> missing = status_of([]() -> std::string {
    throw StatusError(absl::NotFoundError("x.json: no such file"));
  });
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  // A FileError's errno becomes the code; its message is kept as it is.
  const absl::Status full = status_of([] { throw FileError("out.bin: write: No space left", ENOSPC); });
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(full.message(), "out.bin: write: No space left");
  EXPECT_EQ(status_of([] { throw std::bad_alloc(); }).code(), absl::StatusCode::kResourceExhausted);
  // A function returning a Status itself passes it through.
  EXPECT_EQ(status_of([] { return absl::DataLossError("d"); }).code(), absl::StatusCode::kDataLoss);
}

TEST(StatusOf, LetsLogicErrorsThrough) {
  // An index out of range is a bug, not bad input: tests and fuzzers must see it.
  EXPECT_THROW(status_of([] { return std::vector<int>{}.at(3); }), std::out_of_range);
  EXPECT_THROW(status_of([] { throw std::logic_error("precondition"); }), std::logic_error);
}

TEST(StatusFromException, TrimsLibTorchsBacktraceAndIsNeverOk) {
  const absl::Status s = status_from_exception(
      std::runtime_error("shape mismatch: [2] vs [3]\nException raised from foo at bar.cpp:1"));
  EXPECT_EQ(s.message(), "shape mismatch: [2] vs [3]");
  EXPECT_EQ(status_from_exception(StatusError(absl::OkStatus())).code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(status_from_exception(FileError("f: what", 0)).code(), absl::StatusCode::kUnknown);
  EXPECT_EQ(with_context(absl::NotFoundError("gone"), "model.init_from").message(),
            "model.init_from: gone");
  EXPECT_TRUE(with_context(absl::OkStatus(), "x").ok());
  EXPECT_THROW(ok_or_throw(absl::InternalError("i")), StatusError);
  EXPECT_EQ(value_or_throw(absl::StatusOr<int>(3)), 3);
  EXPECT_THROW(check_argument(absl::InvalidArgumentError("grid")), std::invalid_argument);
}

}  // namespace
}  // namespace sparseflash::io
