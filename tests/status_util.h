// Test helpers for the project's error convention (io/errors.h): library
// functions return absl::Status / absl::StatusOr; the parsers behind them throw.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <gtest/gtest.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseflash::test_util {

// A call the test needs to succeed: its value, or an exception carrying the
// status (gtest fails the test with it) instead of reading an error's value.
inline void must(const absl::Status& status) {
  if (!status.ok()) throw std::runtime_error("expected OK, got " + status.ToString());
}
template <typename T>
T must(absl::StatusOr<T> value) {
  must(value.status());
  return *std::move(value);
}

namespace detail {
inline absl::Status status_of_result(const absl::Status& s) { return s; }
template <typename T>
absl::Status status_of_result(const absl::StatusOr<T>& v) {
  return v.status();
}
}  // namespace detail

// Expects fn to fail with a message holding every needle: fn returns an
// absl::Status or StatusOr (a library boundary) that is not OK, or returns
// nothing and throws std::runtime_error or std::invalid_argument (a parser
// inside a library). Any other exception is a bug and fails the test.
template <typename F>
void expect_error(F&& fn, const std::vector<std::string>& needles) {
  std::string message;
  if constexpr (std::is_void_v<std::invoke_result_t<F>>) {
    try {
      fn();
      ADD_FAILURE() << "no error; expected one mentioning " << needles.front();
      return;
    } catch (const std::runtime_error& e) {
      message = e.what();
    } catch (const std::invalid_argument& e) {
      message = e.what();
    }
  } else {
    const absl::Status status = detail::status_of_result(fn());
    if (status.ok()) {
      ADD_FAILURE() << "OK; expected an error mentioning " << needles.front();
      return;
    }
    message = std::string(status.message());
  }
  for (const std::string& needle : needles)
    EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message << "\nlacks: " << needle;
}

}  // namespace sparseflash::test_util
