// sparseflash: the command-line entry point. One binary, one command per job;
// each command (cli/<name>.cc) owns a set of Abseil flags and explains them
// with `sparseflash <command> --help`. This file dispatches and prints help.
//
// Flags are written with hyphens (--val-fraction); Abseil names them with
// underscores, so hyphens are translated before parsing. --set is collected
// separately because it repeats and its values contain commas.
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "cli/command.h"
#include "configs/config.h"
#include "launch/launcher.h"

namespace sparseflash::cli {

int fail(const std::string& command, const std::string& message) {
  std::cerr << "sparseflash " << command << ": error: " << message << "\n";
  return 1;
}

void deprecated(const std::string& replacement) {
  std::cerr << "deprecated: use " << replacement << ", this spelling goes in the next release\n";
}

std::string error_text(const std::exception& e) {
  std::string what = e.what();
  return what.substr(0, what.find("\nException raised from"));
}

namespace {

std::set<std::string>& given_flags() {  // Abseil names, filled by dispatch()
  static std::set<std::string> given;
  return given;
}

}  // namespace

bool flag_given(const char* name) { return given_flags().count(name) > 0; }

namespace {

const std::vector<Command>& commands() {
  static const std::vector<Command> all = {
      train_command(),   eval_command(),   prepare_command(), launch_command(),
      generate_command(), convert_command(), saap_command(),   sample_command()};
  return all;
}

void print_general_help() {
  std::cout << "sparseflash: GPT and Llama training with sparse flash attention\n\n"
               "usage: sparseflash <command> [flags]\n\ncommands:\n";
  for (const auto& c : commands())
    if (c.summary) std::cout << absl::StrFormat("  %-9s %s\n", c.name, c.summary);
  std::cout << "\n"
               "`sparseflash <command> --help` explains a command and its flags.\n";
}

std::string dashed(const std::string& name) { return absl::StrReplaceAll(name, {{"_", "-"}}); }

void print_command_help(const Command& c) {
  std::cout << "usage: " << c.usage << "\n\n" << c.description << "\n\nflags:\n";
  for (const auto& name : c.flags) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (!flag) continue;
    std::cout << absl::StrFormat("  --%s (default: %s)\n      %s\n", dashed(name),
                                 flag->DefaultValue().empty() ? "\"\"" : flag->DefaultValue(),
                                 flag->Help());
  }
  if (std::string(c.name) == "train") {
    std::cout << "  --set path=value (repeatable)\n      Override one config field.\n"
                 "\npresets: "
              << absl::StrJoin(preset_names(), ", ") << "\n";
  }
  std::cout << "  --help\n      This text.\n";
}

int dispatch(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    print_general_help();
    return argc < 2 ? 2 : 0;
  }
  std::string name = argv[1];
  bool help = false;
  if (name == "help") {
    if (argc < 3) {
      print_general_help();
      return 0;
    }
    name = argv[2];
    help = true;
  }
  auto it = std::find_if(commands().begin(), commands().end(),
                         [&](const Command& c) { return name == c.name; });
  if (it == commands().end()) {
    std::cerr << "sparseflash: unknown command '" << name << "'\n\n";
    print_general_help();
    return 2;
  }
  const Command& command = *it;
  if (help) {
    print_command_help(command);
    return 0;
  }

  // Collect --set, translate hyphens, refuse flags of other commands.
  const bool takes_set = name == "train" || name == "saap";  // saap fit: its saap_fit section
  Args overrides;
  std::vector<std::string> kept = {argv[0]};
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      kept.push_back(arg);  // flags end here (launch's worker command follows)
      for (++i; i < argc; ++i) kept.push_back(argv[i]);
      break;
    }
    if (arg == "--help" || arg == "-h") {
      print_command_help(command);
      return 0;
    }
    if (arg == "--set" || arg.rfind("--set=", 0) == 0) {
      if (!takes_set) {
        std::cerr << "sparseflash " << name << ": --set is an option of train and saap fit only\n";
        return 2;
      }
      if (arg == "--set") {
        if (i + 1 >= argc) {
          std::cerr << "sparseflash " << name << ": --set needs a value: --set path=value\n";
          return 2;
        }
        overrides.push_back(argv[++i]);
      } else {
        overrides.push_back(arg.substr(6));
      }
      continue;
    }
    if (arg.size() > 2 && arg[0] == '-' && arg != "-") {
      const size_t start = arg[1] == '-' ? 2 : 1;
      const size_t eq = arg.find('=');
      std::string flag = absl::StrReplaceAll(arg.substr(start, eq - start), {{"-", "_"}});
      std::string base = flag.rfind("no", 0) == 0 ? flag.substr(2) : flag;
      auto& allowed = command.flags;
      if (std::find(allowed.begin(), allowed.end(), flag) == allowed.end() &&
          std::find(allowed.begin(), allowed.end(), base) == allowed.end()) {
        std::cerr << "sparseflash " << name << ": unknown flag '" << arg.substr(0, eq)
                  << "' (see sparseflash " << name << " --help)\n";
        return 2;
      }
      given_flags().insert(std::find(allowed.begin(), allowed.end(), flag) != allowed.end() ? flag
                                                                                         : base);
      arg = "--" + flag + (eq == std::string::npos ? "" : arg.substr(eq));
    }
    kept.push_back(arg);
  }
  std::vector<char*> cargv;
  for (auto& s : kept) cargv.push_back(s.data());
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(cargv.size()), cargv.data());
  Args positional(rest.begin() + 1, rest.end());
  return command.run(positional, overrides);
}

}  // namespace
}  // namespace sparseflash::cli

// LibTorch's CPU thread pool is OpenMP's, which reads its wait policy when the
// library loads, before main. Its default lets idle threads spin for a while,
// and on a machine whose cores are busy with other work the spinning threads
// take the time the working ones need: `generate` of SmolLM2-135M ran at 3.7
// tokens/s on a loaded 2-core machine, 7.6 with passive waits (docs/performance.md,
// "CPU threads"). So unless the user chose a policy, the binary runs itself
// once more with OMP_WAIT_POLICY=PASSIVE (same pid, arguments and everything
// else). SPARSEFLASH_KEEP_OMP=1 keeps OpenMP's own default.
static void exec_with_passive_openmp_waits(char** argv) {
  const std::map<std::string, std::string> env = sparseflash::launch::process_environment();
  if (env.count("OMP_WAIT_POLICY") > 0 || env.count("SPARSEFLASH_KEEP_OMP") > 0) return;
  if (setenv("OMP_WAIT_POLICY", "PASSIVE", 1) != 0) return;
  execv("/proc/self/exe", argv);
  // Only reached when exec failed (no /proc): go on with the default policy.
  unsetenv("OMP_WAIT_POLICY");
}

int main(int argc, char** argv) {
  exec_with_passive_openmp_waits(argv);
  absl::SetProgramUsageMessage(
      "GPT and Llama training with sparse flash attention; see sparseflash --help");
  try {
    return sparseflash::cli::dispatch(argc, argv);
  } catch (const std::exception& e) {
    // LibTorch reports bad shapes, devices and out-of-memory as exceptions.
    std::cerr << "sparseflash: error: " << sparseflash::cli::error_text(e) << "\n";
    return 1;
  }
}
