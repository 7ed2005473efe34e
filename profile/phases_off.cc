// Phase marks in builds without CUDA: timing cannot be turned on.
#include "profile/phases.h"

#include <stdexcept>

namespace sparseflash::profile {

void set_enabled(bool on) {
  if (on) throw std::runtime_error("profile::set_enabled: this build has no CUDA");
}
bool enabled() { return false; }
std::map<std::string, double> collect() { return {}; }
Phase::Phase(const char*) {}
Phase::~Phase() {}

}  // namespace sparseflash::profile
