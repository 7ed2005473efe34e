// What cli/main.cc knows of a command: its name, help and flags, and the
// function that runs it. Each command lives in its own file (cli/<name>.cc),
// reads its flags into an options struct, calls the libraries and prints.
#pragma once

#include <exception>
#include <string>
#include <vector>

namespace sparseflash::cli {

using Args = std::vector<std::string>;

struct Command {
  const char* name;
  const char* usage;
  const char* summary;      // one line for `sparseflash --help`; null: not listed
  const char* description;
  std::vector<std::string> flags;  // Abseil names (underscores)
  // positional: the arguments left after the flags; overrides: train's --set values.
  int (*run)(const Args& positional, const Args& overrides);
};

Command train_command();
Command eval_command();
Command generate_command();
Command sample_command();  // deprecated spelling of generate
Command convert_command();
Command prepare_command();
Command launch_command();
Command saap_command();

// Prints "sparseflash <command>: error: <message>" and returns 1.
int fail(const std::string& command, const std::string& message);
// Prints "deprecated: use <replacement>, this spelling goes in the next release".
void deprecated(const std::string& replacement);
// An exception's message without LibTorch's C++ backtrace.
std::string error_text(const std::exception& e);
// True when the flag (Abseil name) was given on the command line.
bool flag_given(const char* name);

}  // namespace sparseflash::cli
