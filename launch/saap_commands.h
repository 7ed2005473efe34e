// `sparseflash saap fit|eval`: fitting a SAAP index on a pretrained Llama and
// measuring it (docs/saap.md). main.cc dispatches here; the flags are defined
// in saap_commands.cc (and llama_commands.cc for the shared ones).
#pragma once

#include <string>
#include <vector>

namespace sparseflash::saap_commands {

// Abseil names of the flags `saap fit` and `saap eval` read.
const std::vector<std::string>& saap_flags();

// positional: {"fit"} or {"eval"}. Returns the exit code; prints its own errors.
int run_saap(const std::vector<std::string>& positional);

}  // namespace sparseflash::saap_commands
