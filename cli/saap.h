// `sparseflash saap fit|eval`: the two halves (cli/saap_fit.cc, cli/saap_eval.cc)
// behind the one `saap` command.
#pragma once

#include "cli/command.h"

#include <string>
#include <vector>

namespace sparseflash::cli {

// Each returns the exit code and prints its own errors.
// overrides: --set saap_fit.FIELD=VALUE values.
int run_saap_fit(const Args& overrides);
int run_saap_eval();
// The Abseil names of the flags saap eval adds to fit's.
const std::vector<std::string>& saap_eval_flag_names();

}  // namespace sparseflash::cli
