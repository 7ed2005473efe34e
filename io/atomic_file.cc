// Temporary file + fsync + rename.
#include "io/atomic_file.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "io/errors.h"

namespace sparseflash::io {
namespace {

[[noreturn]] void fail(const std::string& file, const std::string& what, int error) {
  if (error == 0) error = EIO;
  throw FileError(absl::StrCat(file, ": ", what, ": ", std::strerror(error)), error);
}

std::string directory_of(const std::string& path) {
  const size_t slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

AtomicFile::AtomicFile(std::string path, std::string temporary)
    : path_(std::move(path)), tmp_(std::move(temporary)) {
  if (tmp_.empty()) tmp_ = path_ + ".tmp." + std::to_string(getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path_, "cannot create its temporary " + tmp_, errno);
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd_, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail(tmp_, "write failed", w < 0 ? errno : ENOSPC);
    p += w;
    n -= static_cast<size_t>(w);
    size_ += static_cast<uint64_t>(w);
  }
}

void AtomicFile::write_zeros(size_t n) {
  static const char kZeros[256] = {};
  while (n > 0) {
    const size_t k = n < sizeof kZeros ? n : sizeof kZeros;
    write(kZeros, k);
    n -= k;
  }
}

void AtomicFile::write_at(uint64_t offset, const void* data, size_t n) {
  if (offset > size_ || n > size_ - offset) {
    fail(tmp_,
         absl::StrCat("write of ", n, " bytes at offset ", offset, " past the ", size_,
                      " bytes written"),
         EINVAL);
  }
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    ssize_t w = ::pwrite(fd_, p, n, static_cast<off_t>(offset));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail(tmp_, "write failed", w < 0 ? errno : EIO);
    p += w;
    n -= static_cast<size_t>(w);
    offset += static_cast<uint64_t>(w);
  }
}

void AtomicFile::commit() {
  const int sync_rc = ::fsync(fd_);
  const int sync_err = errno;
  const int close_rc = ::close(fd_);
  const int close_err = errno;
  fd_ = -1;
  if (sync_rc != 0 || close_rc != 0) {
    ::unlink(tmp_.c_str());
    fail(tmp_, "cannot flush", sync_rc != 0 ? sync_err : close_err);
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_.c_str());
    fail(path_, "cannot rename the temporary file into place", err);
  }
  // The rename is durable once the directory is on disk. Best effort: some
  // file systems refuse fsync on a directory, and PATH is complete either way.
  const int dir_fd = ::open(directory_of(path_).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

int AtomicFile::remove_stale_temporaries(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir = directory_of(path);
  const std::string prefix = (slash == std::string::npos ? path : path.substr(slash + 1)) + ".tmp.";
  // (POSIX directory calls: std::filesystem is unsafe in programs that load
  // libtorch.so, which exports its own copy.)
  DIR* d = ::opendir(dir.c_str());
  if (!d) return 0;
  int removed = 0;
  while (const dirent* entry = ::readdir(d)) {
    const std::string name = entry->d_name;
    if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 9) continue;
    const pid_t pid = static_cast<pid_t>(std::atol(digits.c_str()));
    // A live writer (this process, or another one writing PATH now) keeps its file.
    if (pid == ::getpid() || ::kill(pid, 0) == 0 || errno != ESRCH) continue;
    if (::unlink((dir + "/" + name).c_str()) == 0) ++removed;
  }
  ::closedir(d);
  return removed;
}

absl::Status run_atomic_write(const std::string& path,
                              const std::function<void(AtomicFile& file)>& write,
                              const std::string& temporary) {
  try {
    AtomicFile file(path, temporary);
    write(file);
    file.commit();
  } catch (const FileError& e) {
    return status_from_exception(e);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(path, ": ", e.what()));
  }
  return absl::OkStatus();
}

absl::Status write_file_atomically(const std::string& path, std::string_view contents,
                                   const std::string& temporary) {
  return run_atomic_write(
      path, [&](AtomicFile& file) { file.write(contents); }, temporary);
}

}  // namespace sparseflash::io
