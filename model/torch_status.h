// model/torch_status.h: io::status_of (io/errors.h) for a boundary over LibTorch
// code. LibTorch checks shapes, devices and options by throwing c10::Error; at a
// boundary that takes user input (a fit's options, a file's tensors) that is the
// input's fault: InvalidArgument, with LibTorch's backtrace trimmed. Running out
// of GPU memory (c10::OutOfMemoryError) is ResourceExhausted. Everything else
// is as io::status_of has it (std::logic_error and kin propagate: bugs).
#pragma once

#include <utility>

#include <c10/util/Exception.h>

#include "io/errors.h"

namespace sparseflash::model {

template <typename F>
auto torch_status_of(F&& f) {
  return io::status_of([&]() -> decltype(auto) {
    try {
      return std::forward<F>(f)();
    } catch (const c10::OutOfMemoryError& e) {
      throw io::StatusError(
          io::status_from_exception(e, absl::StatusCode::kResourceExhausted));
    } catch (const c10::Error& e) {
      throw io::StatusError(io::status_from_exception(e, absl::StatusCode::kInvalidArgument));
    }
  });
}

}  // namespace sparseflash::model
