// Refusals of the kernels' entry points (host code, refusal.cc): an entry point
// clears the reason on entry, and refuse() records why it does not take an
// argument (last_refusal(), sparse_flash.h) and returns cudaErrorInvalidValue.
#pragma once

#include <cuda_runtime.h>

#include <string>

namespace sparseflash::kernels::detail {

void clear_refusal();
cudaError_t refuse(std::string why);

// "name = value", for refusal messages: arg("D", 96) is "D = 96".
template <typename V>
std::string arg(const char* name, V value) {
  return std::string(name) + " = " + std::to_string(value);
}

}  // namespace sparseflash::kernels::detail
