// `sparseflash saap fit|eval`: the two halves (cli/saap_fit.cc, cli/saap_eval.cc)
// behind the one `saap` command.
#pragma once

#include <string>
#include <vector>

namespace sparseflash::cli {

// Each returns the exit code and prints its own errors.
int run_saap_fit();
int run_saap_eval();
// The Abseil names of the flags saap eval adds to fit's.
const std::vector<std::string>& saap_eval_flag_names();

}  // namespace sparseflash::cli
