// File helpers of data/: see files.h.
#include "data/files.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>

#include "absl/strings/str_cat.h"
#include "data/shard.h"

namespace sparseflash::data::files {

absl::Status errno_error(int err, const std::string& path, const std::string& what) {
  return absl::ErrnoToStatus(err, absl::StrCat(what, " ", path));
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

std::string strip_dot_slash(std::string path) {
  while (path.size() > 2 && path[0] == '.' && path[1] == '/') {
    size_t i = 2;
    while (i < path.size() && path[i] == '/') ++i;
    path.erase(0, i);
  }
  return path;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_archive_name(const std::string& path) {
  std::string lower = path;
  std::transform(lower.begin(), lower.end(), lower.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (const char* ext : {".tar", ".tar.xz", ".txz", ".tar.gz", ".tgz"}) {
    if (ends_with(lower, ext)) return true;
  }
  return false;
}

absl::StatusOr<std::string> read_file(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(errno, path, "cannot open");
  std::string data;
  struct stat st;
  if (::fstat(fd, &st) == 0 && st.st_size > 0) data.reserve(static_cast<size_t>(st.st_size));
  char buffer[1 << 16];
  while (true) {
    ssize_t n = ::read(fd, buffer, sizeof(buffer));
    if (n < 0) {
      if (errno == EINTR) continue;
      absl::Status status = errno_error(errno, path, "cannot read");
      ::close(fd);
      return status;
    }
    if (n == 0) break;
    data.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return data;
}


absl::Status make_dirs(const std::string& dir, const std::string& target,
                       std::vector<std::string>* created) {
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) return absl::OkStatus();
    return absl::FailedPreconditionError(absl::StrCat("cannot create output directory ", target,
                                                      ": ", dir, " is not a directory"));
  }
  const size_t slash = dir.find_last_of('/');
  if (slash != std::string::npos && slash > 0) {
    absl::Status parent = make_dirs(dir.substr(0, slash), target, created);
    if (!parent.ok()) return parent;
  }
  if (::mkdir(dir.c_str(), 0755) != 0) {
    if (errno == EEXIST) return absl::OkStatus();
    return errno_error(errno, dir == target ? target : absl::StrCat(target, " (at ", dir, ")"),
                       "cannot create output directory");
  }
  created->push_back(dir);
  return absl::OkStatus();
}

}  // namespace sparseflash::data::files
