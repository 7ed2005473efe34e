// File helpers of data/ (prepare and meta.json): POSIX calls with errors as
// absl::Status that name the path. Internal to the data library.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseflash::data::files {

// absl::ErrnoToStatus with the message "WHAT PATH".
absl::Status errno_error(int err, const std::string& path, const std::string& what);

std::string join_path(const std::string& dir, const std::string& name);

// "./a/b" -> "a/b": tar members are often written with a leading "./", and a
// document's path must not depend on how it was packed (it keys the split).
std::string strip_dot_slash(std::string path);

bool ends_with(const std::string& s, const std::string& suffix);

// .tar, .tar.xz, .txz, .tar.gz, .tgz (any case).
bool is_archive_name(const std::string& path);

// The whole file.
absl::StatusOr<std::string> read_file(const std::string& path);

// mkdir -p. Directories it creates are appended to `created` (outermost
// first) so that a failed run can remove them again. Errors name `target`,
// the directory the user asked for, and the component that failed.
absl::Status make_dirs(const std::string& dir, const std::string& target,
                       std::vector<std::string>* created);

}  // namespace sparseflash::data::files
