// The launcher and the worker's view of its job. Reading order: host lists,
// the environment of a worker, the launcher's process handling, the command.
#include "launch/launcher.h"

#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

extern char** environ;

namespace sparseflash::launch {

using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// host lists

absl::StatusOr<std::vector<std::string>> expand_hostlist(std::string_view list) {
  std::vector<std::string> hosts;
  auto bad = [&](const std::string& why) {
    return absl::InvalidArgumentError(absl::StrCat("host list \"", std::string(list), "\": ", why));
  };
  size_t i = 0;
  while (i < list.size()) {
    // One entry: prefix[ranges]suffix, up to a comma outside brackets.
    size_t end = i;
    int depth = 0;
    while (end < list.size() && !(list[end] == ',' && depth == 0)) {
      if (list[end] == '[') ++depth;
      if (list[end] == ']' && --depth < 0) return bad("unbalanced ']'");
      ++end;
    }
    if (depth != 0) return bad("unbalanced '['");
    const std::string_view entry = list.substr(i, end - i);
    i = end + 1;
    if (entry.empty()) continue;
    const size_t open = entry.find('[');
    if (open == std::string_view::npos) {
      hosts.emplace_back(entry);
      continue;
    }
    const size_t close = entry.find(']', open);
    if (entry.find('[', open + 1) != std::string_view::npos)
      return bad("more than one [...] in one name is not supported");
    const std::string prefix(entry.substr(0, open)), suffix(entry.substr(close + 1));
    const std::string_view ranges = entry.substr(open + 1, close - open - 1);
    size_t j = 0;
    while (j <= ranges.size()) {
      size_t comma = ranges.find(',', j);
      if (comma == std::string_view::npos) comma = ranges.size();
      const std::string_view range = ranges.substr(j, comma - j);
      j = comma + 1;
      const size_t dash = range.find('-');
      const std::string_view lo_text = range.substr(0, dash);
      const std::string_view hi_text = dash == std::string_view::npos ? lo_text : range.substr(dash + 1);
      uint64_t lo = 0, hi = 0;
      if (lo_text.empty() || !absl::SimpleAtoi(std::string(lo_text), &lo) ||
          !absl::SimpleAtoi(std::string(hi_text), &hi) ||
          hi < lo)
        return bad(absl::StrCat("bad range \"", std::string(range), "\""));
      if (hi - lo > 100000) return bad(absl::StrCat("range \"", std::string(range), "\" is too long"));
      for (uint64_t n = lo; n <= hi; ++n) {
        std::string number = absl::StrCat(n);
        // node[01-10] keeps the width of the lower bound.
        if (number.size() < lo_text.size())
          number.insert(0, lo_text.size() - number.size(), '0');
        hosts.push_back(prefix + number + suffix);
      }
    }
  }
  if (hosts.empty()) return bad("no host names");
  return hosts;
}

// ---------------------------------------------------------------------------
// the worker's environment

std::map<std::string, std::string> process_environment() {
  std::map<std::string, std::string> env;
  for (char** e = environ; e && *e; ++e) {
    const std::string entry = *e;
    const size_t eq = entry.find('=');
    if (eq != std::string::npos) env[entry.substr(0, eq)] = entry.substr(eq + 1);
  }
  return env;
}

std::map<std::string, std::string> worker_environment(const LaunchOptions& o, int local_rank,
                                                      int restart) {
  std::map<std::string, std::string> env = process_environment();
  env["RANK"] = absl::StrCat(o.node_rank * o.nproc_per_node + local_rank);
  env["LOCAL_RANK"] = absl::StrCat(local_rank);
  env["WORLD_SIZE"] = absl::StrCat(o.nnodes * o.nproc_per_node);
  env["LOCAL_WORLD_SIZE"] = absl::StrCat(o.nproc_per_node);
  env["GROUP_RANK"] = absl::StrCat(o.node_rank);
  env["MASTER_ADDR"] = o.master_addr;
  env["MASTER_PORT"] = absl::StrCat(o.master_port);
  env["SPARSEFLASH_LAUNCHED"] = "1";
  env["SPARSEFLASH_RESTART"] = absl::StrCat(restart);
  // NVLink multicast (NVLS) off unless asked for: it fails on hosts whose
  // fabric manager does not provide it (docs/distributed.md).
  env.emplace("NCCL_NVLS_ENABLE", "0");
  env.emplace("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1");
  env.emplace("NVSHMEM_DISABLE_NVLS", "1");
  return env;
}

absl::StatusOr<trainer::World> world_from_environment(
    const std::map<std::string, std::string>* given) {
  const std::map<std::string, std::string> env = given ? *given : process_environment();
  auto has = [&](const char* name) { return env.count(name) > 0 && !env.at(name).empty(); };
  auto integer = [&](const char* name, int fallback, int* out) -> absl::Status {
    if (!has(name)) {
      *out = fallback;
      return absl::OkStatus();
    }
    // SLURM_TASKS_PER_NODE looks like "2(x3),1": the first count is ours on
    // a homogeneous allocation.
    std::string text = env.at(name);
    text = text.substr(0, text.find_first_of("(,"));
    if (!absl::SimpleAtoi(text, out))
      return absl::InvalidArgumentError(absl::StrCat("environment variable ", name, "=\"",
                                                     env.at(name), "\" is not an integer"));
    return absl::OkStatus();
  };

  trainer::World w;
  if (has("SPARSEFLASH_TEST_HANG")) w.test_hang = env.at("SPARSEFLASH_TEST_HANG");
  absl::Status s;
  if (has("RANK") || has("WORLD_SIZE")) {
    if (!has("RANK") || !has("WORLD_SIZE"))
      return absl::InvalidArgumentError("RANK and WORLD_SIZE must be set together");
    w.launched_by = has("SPARSEFLASH_LAUNCHED") ? "sparseflash launch" : "RANK/WORLD_SIZE";
    if (!(s = integer("RANK", 0, &w.rank)).ok() ||
        !(s = integer("WORLD_SIZE", 1, &w.world_size)).ok() ||
        !(s = integer("LOCAL_RANK", w.rank, &w.local_rank)).ok() ||
        !(s = integer("LOCAL_WORLD_SIZE", w.world_size, &w.local_world_size)).ok())
      return s;
  } else if (has("SLURM_PROCID") && has("SLURM_NTASKS")) {
    w.launched_by = "SLURM";
    if (!(s = integer("SLURM_PROCID", 0, &w.rank)).ok() ||
        !(s = integer("SLURM_NTASKS", 1, &w.world_size)).ok() ||
        !(s = integer("SLURM_LOCALID", 0, &w.local_rank)).ok() ||
        !(s = integer(has("SLURM_NTASKS_PER_NODE") ? "SLURM_NTASKS_PER_NODE"
                                                     : "SLURM_TASKS_PER_NODE",
                      1, &w.local_world_size))
             .ok())
      return s;
    if (!has("MASTER_ADDR")) {
      const char* list_var = has("SLURM_STEP_NODELIST") ? "SLURM_STEP_NODELIST"
                             : has("SLURM_JOB_NODELIST") ? "SLURM_JOB_NODELIST"
                                                         : "SLURM_NODELIST";
      if (!has(list_var))
        return absl::InvalidArgumentError(
            "SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST is: cannot tell "
            "where rank 0 runs");
      auto hosts = expand_hostlist(env.at(list_var));
      if (!hosts.ok())
        return absl::InvalidArgumentError(absl::StrCat(list_var, ": ", hosts.status().message()));
      w.master_addr = hosts->front();
    }
  } else if (has("OMPI_COMM_WORLD_RANK") && has("OMPI_COMM_WORLD_SIZE")) {
    w.launched_by = "mpirun";
    if (!(s = integer("OMPI_COMM_WORLD_RANK", 0, &w.rank)).ok() ||
        !(s = integer("OMPI_COMM_WORLD_SIZE", 1, &w.world_size)).ok() ||
        !(s = integer("OMPI_COMM_WORLD_LOCAL_RANK", 0, &w.local_rank)).ok() ||
        !(s = integer("OMPI_COMM_WORLD_LOCAL_SIZE", w.world_size, &w.local_world_size)).ok())
      return s;
    if (w.local_world_size < w.world_size && !has("MASTER_ADDR"))
      return absl::InvalidArgumentError(
          "mpirun over several nodes: set MASTER_ADDR to rank 0's host (mpirun -x MASTER_ADDR=...)");
  } else {
    return w;  // a single process
  }
  if (has("MASTER_ADDR")) w.master_addr = env.at("MASTER_ADDR");
  if (!(s = integer("MASTER_PORT", 29500, &w.master_port)).ok()) return s;
  if (w.world_size < 1 || w.rank < 0 || w.rank >= w.world_size)
    return absl::InvalidArgumentError(absl::StrFormat(
        "rank %d is outside [0, world size %d) (from %s)", w.rank, w.world_size, w.launched_by));
  if (w.local_rank < 0 || w.local_world_size < 1 || w.local_rank >= w.local_world_size)
    return absl::InvalidArgumentError(
        absl::StrFormat("local rank %d is outside [0, local world size %d) (from %s)",
                        w.local_rank, w.local_world_size, w.launched_by));
  if (w.master_port < 1 || w.master_port > 65535)
    return absl::InvalidArgumentError(
        absl::StrCat("MASTER_PORT ", w.master_port, " is not a TCP port"));
  return w;
}

// ---------------------------------------------------------------------------
// the launcher

namespace {

std::atomic<int> g_signal{0};
std::atomic<int> g_signal_count{0};

void on_signal(int signo) {
  g_signal.store(signo);
  g_signal_count.fetch_add(1);
}

struct Worker {
  int local_rank = 0;
  int rank = 0;
  pid_t pid = -1;
  bool running = false;
  int status = 0;  // waitpid status once it has ended
};

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return absl::StrCat("exited with status ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    const char* name = sigabbrev_np(sig);
    return absl::StrCat("was killed by signal ", sig, " (SIG", name ? name : "?", ", ",
                        strsignal(sig), ")");
  }
  return absl::StrCat("ended with wait status ", status);
}

// Seconds a failed group's other workers get to exit after SIGTERM before
// SIGKILL: well inside the 10 s in which the job has to be gone.
constexpr double kTerminateGraceSeconds = 4;

enum class Outcome { kSuccess, kFailure, kSignal };

Outcome run_group(const LaunchOptions& o, const std::string& binary, int restart,
                  std::string* failure) {
  std::vector<Worker> workers(o.nproc_per_node);
  const pid_t launcher = getpid();
  for (int i = 0; i < o.nproc_per_node; ++i) {
    Worker& w = workers[i];
    w.local_rank = i;
    w.rank = o.node_rank * o.nproc_per_node + i;
    // Everything exec needs is built before fork (the child only calls
    // async-signal-safe functions).
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : worker_environment(o, i, restart)) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp, argv;
    for (auto& e : env_strings) envp.push_back(e.data());
    envp.push_back(nullptr);
    std::vector<std::string> args = {binary};
    args.insert(args.end(), o.command.begin(), o.command.end());
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);

    const pid_t pid = fork();
    if (pid < 0) {
      *failure = absl::StrCat("cannot start worker rank ", w.rank, ": fork: ", strerror(errno));
      for (auto& other : workers)
        if (other.running) kill(other.pid, SIGKILL);
      for (auto& other : workers)
        if (other.running) waitpid(other.pid, nullptr, 0);
      return Outcome::kFailure;
    }
    if (pid == 0) {
      // Own process group: a Ctrl-C in the terminal reaches the launcher
      // only, which forwards it once. Die with the launcher, however it ends
      // (SIGKILL included): the kernel sends PR_SET_PDEATHSIG's signal when
      // the forking thread exits, and this is the launcher's main thread. It
      // survives the exec (and the worker's re-exec of itself, cli/main.cc);
      // workers start no processes of their own. The getppid() check covers
      // a launcher that died before the prctl.
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != launcher) _exit(127);
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      execve(binary.c_str(), argv.data(), envp.data());
      const char msg[] = "sparseflash launch: exec of the worker failed\n";
      ssize_t ignored = write(STDERR_FILENO, msg, sizeof(msg) - 1);
      (void)ignored;
      _exit(127);
    }
    w.pid = pid;
    w.running = true;
  }

  int forwarded = 0;
  bool failed = false;
  Clock::time_point kill_at{};
  int running = o.nproc_per_node;
  while (running > 0) {
    // Signals to the launcher: the first is forwarded (workers checkpoint and
    // exit), a second one kills the workers.
    if (const int signo = g_signal.load(); signo != 0 && !failed) {
      if (forwarded == 0) {
        forwarded = signo;
        std::cerr << absl::StrFormat(
            "sparseflash launch: %s: forwarding to the workers (they write a checkpoint and "
            "exit; send it again to kill them)\n",
            strsignal(signo));
        for (auto& w : workers)
          if (w.running) kill(w.pid, signo);
      } else if (g_signal_count.load() > 1) {
        for (auto& w : workers)
          if (w.running) kill(w.pid, SIGKILL);
      }
    }
    // Workers that ended since the last look. When several failed at once,
    // one killed by a signal is the likelier cause (the others then lose
    // their peer and exit with an error).
    std::vector<Worker*> failed_now;
    for (auto& w : workers) {
      if (!w.running) continue;
      int status = 0;
      const pid_t r = waitpid(w.pid, &status, WNOHANG);
      if (r == 0) continue;
      w.running = false;
      w.status = r == w.pid ? status : 0;
      --running;
      const bool ok = WIFEXITED(w.status) && WEXITSTATUS(w.status) == 0;
      // After a forwarded signal, exiting with 128 + signal is the expected end.
      const bool expected_stop = forwarded && WIFEXITED(w.status) &&
                                 WEXITSTATUS(w.status) == 128 + forwarded;
      if (!ok && !expected_stop) failed_now.push_back(&w);
    }
    if (!failed_now.empty() && !failed) {
      std::stable_partition(failed_now.begin(), failed_now.end(),
                            [](const Worker* w) { return WIFSIGNALED(w->status); });
      const Worker& w = *failed_now.front();
      failed = true;
      *failure = absl::StrFormat("worker rank %d (local rank %d, pid %d) %s", w.rank,
                                 w.local_rank, w.pid, describe_exit(w.status));
      std::cerr << "sparseflash launch: " << *failure << "; stopping the other workers\n";
      for (auto& other : workers)
        if (other.running) kill(other.pid, SIGTERM);
      kill_at = Clock::now() +
                std::chrono::milliseconds(static_cast<int>(kTerminateGraceSeconds * 1000));
    }
    if (failed && running > 0 && Clock::now() >= kill_at) {
      // A worker hung in a collective, or stopped, does not act on SIGTERM.
      for (auto& w : workers)
        if (w.running) {
          std::cerr << absl::StrFormat(
              "sparseflash launch: worker rank %d (pid %d) did not exit within %.0f s of "
              "SIGTERM; killing it\n",
              w.rank, w.pid, kTerminateGraceSeconds);
          kill(w.pid, SIGKILL);
        }
      kill_at = Clock::now() + std::chrono::hours(1);  // once
    }
    if (running > 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  if (failed) return Outcome::kFailure;
  return forwarded ? Outcome::kSignal : Outcome::kSuccess;
}

}  // namespace

int run_launcher(const LaunchOptions& o) {
  auto usage_error = [](const std::string& message) {
    std::cerr << "sparseflash launch: " << message << " (see sparseflash launch --help)\n";
    return 2;
  };
  if (o.nproc_per_node < 1) return usage_error("--nproc-per-node must be >= 1");
  if (o.nnodes < 1) return usage_error("--nnodes must be >= 1");
  if (o.node_rank < 0 || o.node_rank >= o.nnodes)
    return usage_error(absl::StrCat("--node-rank ", o.node_rank, " must be in [0, --nnodes = ",
                                    o.nnodes, ")"));
  if (o.master_port < 1 || o.master_port > 65535)
    return usage_error(absl::StrCat("--master-port ", o.master_port, " is not a TCP port"));
  if (o.master_addr.empty()) return usage_error("--master-addr must not be empty");
  if (o.max_restarts < 0) return usage_error("--max-restarts must be >= 0");
  if (o.command.empty())
    return usage_error("no worker command: give it after --, e.g. -- train --config preset:NAME");
  if (o.command[0] == "launch") return usage_error("the worker command cannot be launch itself");

  char exe[4096];
  const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
  if (n <= 0) {
    std::cerr << "sparseflash launch: error: cannot find this binary (/proc/self/exe)\n";
    return 1;
  }
  const std::string binary(exe, n);

  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);

  std::cerr << absl::StrFormat(
      "sparseflash launch: %d worker(s) on node %d of %d (ranks %d..%d of %d), rendezvous at "
      "%s:%d: %s\n",
      o.nproc_per_node, o.node_rank, o.nnodes, o.node_rank * o.nproc_per_node,
      (o.node_rank + 1) * o.nproc_per_node - 1, o.nnodes * o.nproc_per_node, o.master_addr,
      o.master_port, absl::StrJoin(o.command, " "));
  for (int restart = 0;; ++restart) {
    std::string failure;
    const Outcome outcome = run_group(o, binary, restart, &failure);
    if (outcome == Outcome::kSuccess) return 0;
    if (outcome == Outcome::kSignal) return 128 + g_signal.load();
    if (g_signal.load() != 0 || restart >= o.max_restarts) {
      std::cerr << "sparseflash launch: error: " << failure
                << (o.max_restarts > 0 ? absl::StrCat(" (after ", restart, " restart(s))") : "")
                << "\n";
      return 1;
    }
    std::cerr << absl::StrFormat(
        "sparseflash launch: restarting the workers (%d of %d) from the last checkpoint\n",
        restart + 1, o.max_restarts);
  }
}

}  // namespace sparseflash::launch
