// The conversion of exceptions to absl::Status at a library boundary (errors.h).
#include "io/errors.h"

#include <new>

#include "absl/strings/str_cat.h"
#include "io/atomic_file.h"

namespace sparseflash::io {

absl::Status status_from_exception(const std::exception& e, absl::StatusCode code) {
  // An exception is a failure: never OK, even from an OK status or errno 0.
  const auto failure = [&](absl::Status s) {
    return s.ok() ? absl::UnknownError(e.what()) : s;
  };
  if (const auto* s = dynamic_cast<const StatusError*>(&e)) return failure(s->status());
  // FileError's message already names the path and the system's words for errno.
  if (const auto* f = dynamic_cast<const FileError*>(&e)) {
    return failure(absl::Status(absl::ErrnoToStatusCode(f->error()), f->what()));
  }
  if (dynamic_cast<const std::bad_alloc*>(&e)) {
    return absl::ResourceExhaustedError(std::string("out of memory: ") + e.what());
  }
  std::string what = e.what();
  return failure(absl::Status(code, what.substr(0, what.find("\nException raised from"))));
}

absl::Status with_context(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace sparseflash::io
