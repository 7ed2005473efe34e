// Helpers shared by the test programs.
#pragma once

#include <ftw.h>
#include <sys/stat.h>

#include <cstdio>
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

}  // namespace sparseflash::test_util
