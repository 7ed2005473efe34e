// io/errors.h: the project's one way to fail on user input.
//
// Every library function that can fail on what a user gives it (a config, a data
// directory, a checkpoint or model file, a tokenizer, a SAAP index) returns
// absl::Status or absl::StatusOr<T>, as the style guide asks, with a message that
// says where (the file, the field, the tensor), what was expected and what was
// found. The CLI prints the message and exits non-zero (cli/main.cc); nothing
// between the library boundary and the CLI rewrites a message except to add
// where it came from.
//
// Why Status and not exceptions: the configs, data, trainer and launch layers
// returned Status from the start, a Status is visible in a signature (a caller
// cannot forget that opening a checkpoint can fail), and it crosses the C++/CUDA
// and thread boundaries of the trainer without special handling.
//
// Inside one library, code deep in a parser (a bounds-checked byte reader, a
// recursive JSON walk) may throw instead of threading a Status through every
// helper; the library's public functions catch at their boundary with status_of().
// Code inside such a parser that calls a Status-returning function goes back to
// throwing with value_or_throw() / ok_or_throw(), which keep the status code.
// Exceptions that escape to a caller are programming errors (a violated
// precondition), never bad input.
//
// Where the line runs: tensor-level functions (attention ops, the fused ops,
// model::load_llama and generate, saap's k-means, targets and budgets) check
// their arguments by throwing, as LibTorch's own ops do (c10::Error,
// std::invalid_argument); the layers that take user input call them behind a
// Status boundary: configs/, data/, io/, checkpoint/, tokenizer/tokenizer.h,
// model/load.h, model/factory.h, model/export.h, trainer/, launch/,
// saap/index.h and saap/model/ (fit, evaluate, the inference hook).
#pragma once

#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace sparseflash::io {

// An absl::Status carried by an exception inside a library's implementation.
class StatusError : public std::runtime_error {
 public:
  explicit StatusError(absl::Status status)
      : std::runtime_error(std::string(status.message())), status_(std::move(status)) {}
  const absl::Status& status() const { return status_; }

 private:
  absl::Status status_;
};

// Throws StatusError(status) unless it is OK.
inline void ok_or_throw(const absl::Status& status) {
  if (!status.ok()) throw StatusError(status);
}

// Throws std::invalid_argument with the status's message unless it is OK: for
// functions that check their preconditions by throwing, as LibTorch's ops do,
// with a validator they share with a user-facing boundary.
inline void check_argument(const absl::Status& status) {
  if (!status.ok()) throw std::invalid_argument(std::string(status.message()));
}

// The value, or a StatusError carrying the status.
template <typename T>
T value_or_throw(absl::StatusOr<T> value) {
  if (!value.ok()) throw StatusError(value.status());
  return *std::move(value);
}

// The status an exception stands for: a StatusError's own; an io::FileError's
// errno as a status code (ENOENT: NotFound, ENOSPC: ResourceExhausted, ...);
// std::bad_alloc ResourceExhausted; anything else `code` (by default
// InvalidArgument: at a boundary that reads user input, a failure the
// implementation did not classify is the input's). The message is what(),
// without the C++ backtrace LibTorch appends ("\nException raised from ...").
// Never OK (an OK status or errno 0 inside an exception: Unknown).
absl::Status status_from_exception(const std::exception& e,
                                   absl::StatusCode code = absl::StatusCode::kInvalidArgument);

// `status` with "context: " in front of its message, same code (OK stays OK).
absl::Status with_context(const absl::Status& status, absl::string_view context);

// Runs f() and returns its result as a Status (f returns void or absl::Status)
// or absl::StatusOr<R> (f returns R or absl::StatusOr<R>), converting what an
// implementation throws on bad input (std::runtime_error and its kin,
// std::invalid_argument, std::bad_alloc) with status_from_exception. The other
// std::logic_errors (std::out_of_range from an index, std::length_error, a
// violated precondition) are bugs, not input errors: they propagate, so that
// tests and fuzzers see them. The boundary of a library whose implementation
// throws; model/torch_status.h adds LibTorch's c10::Error for boundaries over
// LibTorch code.
template <typename F>
auto status_of(F&& f, absl::StatusCode code = absl::StatusCode::kInvalidArgument) {
  using R = std::invoke_result_t<F>;
  using Result = std::conditional_t<
      std::is_void_v<R> || std::is_same_v<R, absl::Status>, absl::Status,
      std::conditional_t<std::is_convertible_v<absl::Status, R>, R, absl::StatusOr<R>>>;
  try {
    if constexpr (std::is_void_v<R>) {
      std::forward<F>(f)();
      return Result(absl::OkStatus());
    } else {
      return Result(std::forward<F>(f)());
    }
  } catch (const std::runtime_error& e) {
    return Result(status_from_exception(e, code));
  } catch (const std::invalid_argument& e) {
    return Result(status_from_exception(e, code));
  } catch (const std::bad_alloc& e) {
    return Result(status_from_exception(e, code));
  }
}

}  // namespace sparseflash::io
