// Helpers shared by the test programs.
#pragma once

#include <ftw.h>
#include <sys/stat.h>

#include <cstdio>
#include <cstdlib>
#include <string>

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
