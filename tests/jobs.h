// Running the sparseflash binary from tests: `train` and `launch` jobs on a
// tiny generated corpus (CPU, Gloo), their processes, logs and losses. Used by
// distributed_test.cc and failure_test.cc, which define SF_BINARY.
#pragma once

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <torch/serialize.h>

#include "data/prepare.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"
#include "trainer/trainer.h"

extern char** environ;

namespace sparseflash::test_util {

using Clock = std::chrono::steady_clock;

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// ---------------------------------------------------------------------------
// processes

// Starts `sparseflash args...` with the environment plus `extra` (and without
// any job variables of the test's own environment), output to `log`. A
// `file_size_limit` (bytes, 0 = none) becomes the child's RLIMIT_FSIZE, with
// SIGXFSZ ignored so that a write past it fails with EFBIG, as on a full disk.
inline pid_t spawn(const std::vector<std::string>& args, const std::string& log,
                   const std::map<std::string, std::string>& extra = {},
                   rlim_t file_size_limit = 0) {
  std::vector<std::string> env;
  for (char** e = environ; *e; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (name == "RANK" || name == "WORLD_SIZE" || name.rfind("SLURM_", 0) == 0 ||
        name.rfind("OMPI_", 0) == 0 || extra.count(name))
      continue;
    env.push_back(entry);
  }
  for (const auto& [k, v] : extra) env.push_back(k + "=" + v);
  std::vector<std::string> argv_strings = {SF_BINARY};
  argv_strings.insert(argv_strings.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& a : argv_strings) argv.push_back(a.data());
  argv.push_back(nullptr);
  for (auto& e : env) envp.push_back(e.data());
  envp.push_back(nullptr);
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    if (file_size_limit > 0) {
      signal(SIGXFSZ, SIG_IGN);  // (kept across exec)
      const rlimit limit = {file_size_limit, file_size_limit};
      setrlimit(RLIMIT_FSIZE, &limit);
    }
    execve(argv[0], argv.data(), envp.data());
    _exit(127);
  }
  return pid;
}

// Exit status (128 + signal for a signal), or -1 after `timeout_s`.
inline int wait_for(pid_t pid, double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  while (Clock::now() < deadline) {
    int status = 0;
    if (waitpid(pid, &status, WNOHANG) == pid)
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return -1;
}

// Direct children of `pid`, from /proc/*/stat.
inline std::vector<pid_t> children_of(pid_t pid) {
  namespace fs = std::filesystem;
  std::vector<pid_t> found;
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = read_file(entry.path().string() + "/stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(stat.substr(close + 2));
    char state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == pid) found.push_back(std::stoi(name));
  }
  return found;
}

// Children, grandchildren, ... of `pid`.
inline std::vector<pid_t> descendants_of(pid_t pid) {
  std::vector<pid_t> all = children_of(pid);
  for (size_t i = 0; i < all.size(); ++i)
    for (pid_t c : children_of(all[i])) all.push_back(c);
  return all;
}

inline bool process_exists(pid_t pid) {
  // A zombie still has a /proc entry; it is gone once reaped.
  return std::filesystem::exists("/proc/" + std::to_string(pid));
}

// Kills what a test started (children of the test process), with everything
// below it, when the test ends, also when an assertion ended it early, so that
// no job outlives its test. A child already reaped is left alone: its pid may
// belong to another process by now.
class ProcessGuard {
 public:
  ProcessGuard() = default;
  ProcessGuard(const ProcessGuard&) = delete;
  ProcessGuard& operator=(const ProcessGuard&) = delete;
  ~ProcessGuard() {
    for (pid_t pid : pids_) {
      if (waitpid(pid, nullptr, WNOHANG) != 0) continue;  // ended (now reaped) or reaped before
      for (pid_t d : descendants_of(pid)) kill(d, SIGKILL);
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
    }
  }
  pid_t track(pid_t pid) {
    pids_.push_back(pid);
    return pid;
  }

 private:
  std::vector<pid_t> pids_;
};

// Losses by step from a run's metrics.jsonl.
inline std::map<int64_t, double> losses(const std::string& run_dir) {
  std::map<int64_t, double> out;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_object() && j.contains("loss")) out[j["step"].get<int64_t>()] = j["loss"].get<double>();
  }
  return out;
}

// ---------------------------------------------------------------------------
// fixture

// A corpus in ROOT/data (ROOT = /tmp/PREFIX + the test's name), arguments for
// tiny CPU runs in ROOT/RUN, and a TCP port of the test's own.
class JobTest : public ::testing::Test {
 protected:
  explicit JobTest(std::string prefix) : prefix_(std::move(prefix)) {}

  void SetUp() override {
    namespace fs = std::filesystem;
    // Parameterised test names hold a '/'.
    std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    std::replace(name.begin(), name.end(), '/', '_');
    root_ = (fs::temp_directory_path() / (prefix_ + name)).string();
    remove_tree(root_);
    fs::create_directories(root_ + "/text");
    std::mt19937 rng(std::random_device{}());
    const char* words[] = {"the ", "kernel ", "driver ", "maps ", "memory ", "and ", "calls ",
                           "a ", "function ", "returns ", "zero.\n"};
    for (int doc = 0; doc < 30; ++doc) {
      std::ofstream out(root_ + "/text/doc" + std::to_string(doc) + ".txt");
      for (int w = 0; w < 400; ++w) out << words[rng() % 11];
    }
    data::PrepareOptions o;
    o.inputs = {root_ + "/text"};
    o.out_dir = root_ + "/data";
    o.val_fraction = 0.2;
    ASSERT_TRUE(data::prepare(o).ok());
    // A port per test and process, so that runs in parallel do not meet.
    port_ = 20000 + (getpid() * 7 + ::testing::UnitTest::GetInstance()->random_seed()) % 20000;
  }
  // A failed test keeps its runs (logs, metrics.jsonl, checkpoints) for a look.
  void TearDown() override {
    if (::testing::Test::HasFailure()) {
      std::cerr << "kept the runs of this failed test in " << root_ << "\n";
      return;
    }
    remove_tree(root_);
  }

  std::vector<std::string> train_args(const std::string& run, int batch_size, int steps,
                                      std::vector<std::string> extra = {}) {
    std::vector<std::string> a = {"train", "--config", "preset:tiny_test"};
    for (const std::string& s :
         {"data.dir=" + root_ + "/data", "checkpoint.out_dir=" + root_ + "/" + run,
          "data.batch_size=" + std::to_string(batch_size), "train.max_steps=" + std::to_string(steps),
          std::string("train.cpu_threads=1"), std::string("logging.interval=1"),
          std::string("eval.sample_tokens=0"), std::string("eval.interval=4"),
          std::string("checkpoint.interval=0"), std::string("distributed.timeout_s=30")}) {
      a.push_back("--set");
      a.push_back(s);
    }
    for (auto& s : extra) {
      a.push_back("--set");
      a.push_back(s);
    }
    return a;
  }

  std::vector<std::string> launch_args(int nproc, const std::vector<std::string>& worker,
                                       int port_offset = 0) {
    std::vector<std::string> a = {"launch", "--nproc-per-node", std::to_string(nproc),
                                  "--master-port", std::to_string(port_ + port_offset), "--"};
    a.insert(a.end(), worker.begin(), worker.end());
    return a;
  }

  int run(const std::vector<std::string>& args, const std::string& log, double timeout_s = 120) {
    ProcessGuard guard;
    const int rc = wait_for(guard.track(spawn(args, root_ + "/" + log)), timeout_s);
    if (rc != 0) ADD_FAILURE() << log << ":\n" << read_file(root_ + "/" + log);
    return rc;
  }

  // Waits until the run has logged `step` (or the process ended).
  bool wait_for_step(const std::string& run, int64_t step, double timeout_s) {
    const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
    while (Clock::now() < deadline) {
      auto l = losses(root_ + "/" + run);
      if (!l.empty() && l.rbegin()->first >= step) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }

  std::string prefix_, root_;
  int port_ = 29500;
};

// Calls check(key, x, y) for every weight and AdamW moment ("model/NAME",
// "optim/NAME/exp_avg", "optim/NAME/exp_avg_sq") of the checkpoints of the run
// directories one and two, after checking that both hold it; returns how many.
inline int for_each_checkpoint_tensor(
    const std::string& one, const std::string& two,
    const std::function<void(const std::string&, const at::Tensor&, const at::Tensor&)>& check) {
  torch::serialize::InputArchive ca, cb;
  ca.load_from(one + "/ckpt.pt");
  cb.load_from(two + "/ckpt.pt");
  auto m = trainer::restore_run(one, "cpu");
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return 0;
  int compared = 0;
  for (const auto& item : m->model->named_parameters()) {
    for (const std::string key : {"model/" + item.key(), "optim/" + item.key() + "/exp_avg",
                                  "optim/" + item.key() + "/exp_avg_sq"}) {
      at::Tensor x, y;
      const bool optim = key[0] == 'o';
      if (!ca.try_read(key, x, optim) || !cb.try_read(key, y, optim)) {
        ADD_FAILURE() << key << " is missing from " << one << " or " << two;
        continue;
      }
      check(key, x, y);
      ++compared;
    }
  }
  return compared;
}

}  // namespace sparseflash::test_util
