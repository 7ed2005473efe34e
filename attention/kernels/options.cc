// The kernels' switches from the environment (options.h).
#include "attention/kernels/options.h"

#include <cstdlib>
#include <string>

namespace sparseflash::kernels {
namespace {

KernelOptions from_environment() {
  KernelOptions o;
  o.wgmma_forward = std::getenv("SPARSEFLASH_NO_WGMMA") == nullptr;
  o.wgmma_backward = std::getenv("SPARSEFLASH_NO_WGMMA_BWD") == nullptr;
  const char* order = std::getenv("SPARSEFLASH_GRID_ORDER");
  o.grid_heads_fastest = !(order != nullptr && std::string(order) == "blocks");
  return o;
}

KernelOptions& current() {
  static KernelOptions options = from_environment();
  return options;
}

}  // namespace

const KernelOptions& kernel_options() { return current(); }

void set_kernel_options(const KernelOptions& options) { current() = options; }

bool local_kernels_from_environment() {
  const char* v = std::getenv("SPARSEFLASH_LOCAL_KERNELS");
  return v == nullptr || std::string(v) != "0";
}

bool fused_llama_kernels_from_environment() {
  const char* v = std::getenv("SPARSEFLASH_FUSED_LLAMA");
  return v != nullptr && std::string(v) == "1";
}

}  // namespace sparseflash::kernels
