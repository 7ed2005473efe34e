// Temporary file + fsync + rename.
#include "checkpoint/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include "checkpoint/mapped_file.h"

namespace sparseflash::checkpoint {

AtomicFile::AtomicFile(std::string path) : path_(std::move(path)) {
  tmp_ = path_ + ".tmp." + std::to_string(getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path_, "", "cannot create its temporary " + tmp_ + ": " + std::strerror(errno));
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
    if (w <= 0) fail(tmp_, "", std::string("write failed: ") + std::strerror(w < 0 ? errno : ENOSPC));
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

void AtomicFile::commit() {
  const int sync_rc = ::fsync(fd_);
  const int sync_err = errno;
  const int close_rc = ::close(fd_);
  const int close_err = errno;
  fd_ = -1;
  if (sync_rc != 0 || close_rc != 0) {
    ::unlink(tmp_.c_str());
    fail(tmp_, "", std::string("cannot flush: ") + std::strerror(sync_rc != 0 ? sync_err : close_err));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_.c_str());
    fail(path_, "", std::string("cannot rename the temporary file into place: ") + std::strerror(err));
  }
}

}  // namespace sparseflash::checkpoint
