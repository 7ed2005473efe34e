// Why an entry point of the kernels refused its arguments (last_refusal()).
#include <string>

#include "attention/kernels/refusal.h"
#include "attention/kernels/sparse_flash.h"

namespace sparseflash::kernels {
namespace {

std::string& message() {
  thread_local std::string m;
  return m;
}

}  // namespace

const char* last_refusal() { return message().c_str(); }

namespace detail {

void clear_refusal() { message().clear(); }

cudaError_t refuse(std::string why) {
  message() = std::move(why);
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace sparseflash::kernels
