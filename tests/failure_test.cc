// Failures that lose nothing (CPU, the sparseflash binary): the disk filling up
// while a checkpoint is written (a file-size limit), a rank hanging in a
// collective, the launcher killed with SIGKILL. Each ends the run with a
// message saying what happened (the path, the rank and operation), leaves no
// process behind and the previous checkpoint intact, and a rerun of the same
// command continues exactly: every loss and the final weights and AdamW state
// equal those of an uninterrupted run, bit for bit.
#include <dirent.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <torch/serialize/archive.h>

#include "tests/jobs.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"

namespace sparseflash {
namespace {

using test_util::Clock;
using test_util::descendants_of;
using test_util::losses;
using test_util::process_exists;
using test_util::ProcessGuard;
using test_util::read_file;
using test_util::spawn;
using test_util::wait_for;

// Settings of every run here. A learning rate that does not decay towards
// train.max_steps (min_lr_ratio 1 after the preset's 2 warm-up steps), so
// that runs to different max_steps take the same steps; a checkpoint every 2.
const std::vector<std::string> kCommon = {"schedule.min_lr_ratio=1", "checkpoint.interval=2"};

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// Files in `dir` whose names start with `prefix`.
std::vector<std::string> files_starting(const std::string& dir, const std::string& prefix) {
  std::vector<std::string> found;
  if (DIR* d = opendir(dir.c_str())) {
    while (const dirent* e = readdir(d))
      if (std::string(e->d_name).rfind(prefix, 0) == 0) found.push_back(e->d_name);
    closedir(d);
  }
  return found;
}

// The resumed run equals the uninterrupted one: the same loss at every step
// (==, not near) and the same weights and AdamW state in the last checkpoint.
void expect_identical_runs(const std::string& straight, const std::string& resumed, int steps) {
  const auto a = losses(straight), b = losses(resumed);
  ASSERT_EQ(a.size(), static_cast<size_t>(steps)) << straight;
  ASSERT_EQ(b.size(), static_cast<size_t>(steps)) << resumed;
  for (const auto& [step, loss] : a) EXPECT_EQ(b.at(step), loss) << "step " << step;
  torch::serialize::InputArchive ca, cb;
  ca.load_from(straight + "/ckpt.pt");
  cb.load_from(resumed + "/ckpt.pt");
  c10::IValue step_a, step_b;
  ASSERT_TRUE(ca.try_read("state/step", step_a) && cb.try_read("state/step", step_b));
  EXPECT_EQ(step_a.toInt(), steps);
  EXPECT_EQ(step_b.toInt(), steps);
  const int compared = test_util::for_each_checkpoint_tensor(
      straight, resumed, [](const std::string& key, const at::Tensor& x, const at::Tensor& y) {
        EXPECT_TRUE(x.equal(y)) << key;
      });
  EXPECT_GT(compared, 10);
}

class FailureTest : public test_util::JobTest {
 protected:
  FailureTest() : JobTest("sf_failure_") {}
  void need_gloo() {
#ifndef SF_HAVE_GLOO
    GTEST_SKIP() << "built without Gloo headers (Debian: libgloo-dev; scripts/setup.sh installs "
                    "it): no CPU process group";
#endif
  }
};

// ---------------------------------------------------------------------------
// the disk fills up while a checkpoint is written

TEST_F(FailureTest, FullDiskKeepsThePreviousCheckpoint) {
  const int steps = 8;
  ASSERT_EQ(run(train_args("straight", 4, steps, kCommon), "straight.log"), 0);
  ASSERT_EQ(run(train_args("run", 4, 4, kCommon), "first.log"), 0);
  const std::string ckpt = root_ + "/run/ckpt.pt";
  const std::string before = read_file(ckpt);
  ASSERT_GT(before.size(), 100000u);

  // Files may grow to half a checkpoint: metrics and logs still fit, the
  // checkpoint of step 6 does not.
  ProcessGuard guard;
  const int rc = wait_for(guard.track(spawn(train_args("run", 4, steps, kCommon),
                                            root_ + "/full.log", {}, before.size() / 2)),
                          120);
  const std::string log = read_file(root_ + "/full.log");
  EXPECT_EQ(rc, 1) << log;
  EXPECT_NE(log.find("cannot write checkpoint " + ckpt + ": "), std::string::npos) << log;
  EXPECT_NE(log.find("File too large"), std::string::npos) << log;
  EXPECT_NE(log.find(ckpt + " still holds the previous checkpoint"), std::string::npos) << log;
  const auto logged = losses(root_ + "/run");
  ASSERT_FALSE(logged.empty());
  EXPECT_EQ(logged.rbegin()->first, 6) << "it failed at another step";
  // The previous checkpoint, byte for byte, and no temporary beside it.
  EXPECT_TRUE(read_file(ckpt) == before) << "ckpt.pt changed";
  auto info = trainer::read_checkpoint_info(ckpt);
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state.step, 4);
  EXPECT_EQ(files_starting(root_ + "/run", "ckpt.pt."), std::vector<std::string>{});

  // A temporary of a killed writer (a pid that has ended) and one of a live
  // process (this one): the next checkpoint write removes the first only.
  const pid_t ended = fork();
  if (ended == 0) _exit(0);
  ASSERT_EQ(wait_for(ended, 10), 0);
  const std::string stale = "ckpt.pt.tmp." + std::to_string(ended);
  const std::string live = "ckpt.pt.tmp." + std::to_string(getpid());
  for (const std::string& name : {stale, live}) std::ofstream(root_ + "/run/" + name) << "partial";

  // Space again: the same command resumes at step 4 and goes on exactly.
  ASSERT_EQ(run(train_args("run", 4, steps, kCommon), "resume.log"), 0);
  EXPECT_NE(read_file(root_ + "/resume.log").find("resumed from " + ckpt + " at step 4"),
            std::string::npos);
  EXPECT_EQ(files_starting(root_ + "/run", "ckpt.pt."), std::vector<std::string>{live});
  expect_identical_runs(root_ + "/straight", root_ + "/run", steps);
}

// ---------------------------------------------------------------------------
// a rank hangs in a collective

TEST_F(FailureTest, HungRankIsNamedAndTheJobEnds) {
  need_gloo();
  if (IsSkipped()) return;
  const int steps = 8, timeout_s = 5;
  const auto common = with(kCommon, {"distributed.timeout_s=" + std::to_string(timeout_s)});
  // Rank 1 stops where it would start step 5's gradient all-reduce; the last
  // checkpoint is step 4's.
  ProcessGuard guard;
  const pid_t launcher = guard.track(spawn(launch_args(2, train_args("run", 4, steps, common)),
                                           root_ + "/hang.log", {{"SPARSEFLASH_TEST_HANG", "1:5"}}));
  const auto deadline = Clock::now() + std::chrono::seconds(90);
  while (read_file(root_ + "/hang.log").find("SPARSEFLASH_TEST_HANG: hanging") ==
             std::string::npos &&
         Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto hung_at = Clock::now();
  ASSERT_LT(hung_at, deadline) << read_file(root_ + "/hang.log");
  const std::vector<pid_t> workers = descendants_of(launcher);
  ASSERT_EQ(workers.size(), 2u);
  // The timeout, then 4 s for SIGTERM before the launcher kills the hung rank.
  const int rc = wait_for(launcher, timeout_s + 20);
  const double seconds = std::chrono::duration<double>(Clock::now() - hung_at).count();
  const std::string log = read_file(root_ + "/hang.log");
  ASSERT_EQ(rc, 1) << log;
  // About timeout + 4.5 s; the margin is for a loaded machine.
  EXPECT_LT(seconds, timeout_s + 12) << log;
  EXPECT_NE(log.find("rank 0 of 2: gradient all-reduce (collective #"), std::string::npos) << log;
  EXPECT_NE(log.find("timed out after distributed.timeout_s = 5 s: rank 1 has not started it "
                     "(its last collective: #"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("worker rank 0 (local rank 0, pid"), std::string::npos) << log;
  EXPECT_NE(log.find("worker rank 1 (pid "), std::string::npos) << log;
  EXPECT_NE(log.find("did not exit within 4 s of SIGTERM; killing it"), std::string::npos) << log;
  for (pid_t w : workers) EXPECT_FALSE(process_exists(w)) << "worker " << w << " is left";
  auto info = trainer::read_checkpoint_info(root_ + "/run/ckpt.pt");
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->state.step, 4);

  // The same job without the hook resumes there and goes on exactly.
  ASSERT_EQ(run(launch_args(2, train_args("run", 4, steps, common), 1), "resume.log"), 0);
  EXPECT_NE(read_file(root_ + "/resume.log").find("at step 4"), std::string::npos);
  ASSERT_EQ(run(launch_args(2, train_args("straight", 4, steps, common), 2), "straight.log"), 0);
  expect_identical_runs(root_ + "/straight", root_ + "/run", steps);
}

// ---------------------------------------------------------------------------
// the launcher is killed

TEST_F(FailureTest, KilledLauncherLeavesNoWorker) {
  need_gloo();
  if (IsSkipped()) return;
  // Workers orphaned by the launcher's death come to this process, which can
  // then see them end (without it they would go to init).
  ASSERT_EQ(prctl(PR_SET_CHILD_SUBREAPER, 1), 0);
  struct Unset {
    ~Unset() { prctl(PR_SET_CHILD_SUBREAPER, 0); }
  } unset;
  ProcessGuard guard;
  const pid_t launcher =
      guard.track(spawn(launch_args(2, train_args("run", 4, 1000, kCommon)), root_ + "/launch.log"));
  ASSERT_TRUE(wait_for_step("run", 5, 90)) << read_file(root_ + "/launch.log");
  const std::vector<pid_t> workers = descendants_of(launcher);
  ASSERT_EQ(workers.size(), 2u) << "the launcher's processes: workers only";
  ASSERT_EQ(kill(launcher, SIGKILL), 0);
  EXPECT_EQ(wait_for(launcher, 10), 128 + SIGKILL);
  // Each worker dies of its parent-death signal (SIGKILL) within a moment.
  const auto deadline = Clock::now() + std::chrono::seconds(5);
  for (pid_t w : workers) {
    guard.track(w);  // now a child of this process
    int status = 0;
    pid_t r = 0;
    while ((r = waitpid(w, &status, WNOHANG)) == 0 && Clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ASSERT_EQ(r, w) << "worker " << w << " still runs 5 s after the launcher was killed";
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "status " << status;
  }

  // The same job resumes from the last checkpoint (a later one may have been
  // cut short: its temporary is removed by the next write) and goes on exactly.
  auto info = trainer::read_checkpoint_info(root_ + "/run/ckpt.pt");
  ASSERT_TRUE(info.ok()) << info.status();
  const int64_t stopped = info->state.step;
  EXPECT_GE(stopped, 4);
  const int steps = static_cast<int>(stopped) + 2;
  ASSERT_EQ(run(launch_args(2, train_args("run", 4, steps, kCommon), 1), "resume.log"), 0);
  EXPECT_NE(read_file(root_ + "/resume.log").find("at step " + std::to_string(stopped)),
            std::string::npos);
  EXPECT_EQ(files_starting(root_ + "/run", "ckpt.pt."), std::vector<std::string>{});
  ASSERT_EQ(run(launch_args(2, train_args("straight", 4, steps, kCommon), 2), "straight.log"), 0);
  expect_identical_runs(root_ + "/straight", root_ + "/run", steps);
}

}  // namespace
}  // namespace sparseflash
