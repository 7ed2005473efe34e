// io/: writing files so that readers never see part of one. The one place
// the project writes a file atomically (checkpoints, safetensors and GGUF
// exports, data shards and meta.json, metrics.jsonl rewrites, TensorBoard
// event cuts, config snapshots, JSON reports): the bytes go to a temporary
// beside the file ("PATH.tmp.PID" unless the caller names another), are
// fsync'd, and the temporary is renamed over PATH (and the directory fsync'd)
// only when everything was written. A failed write (a full disk: ENOSPC, a
// file-size limit: EFBIG) leaves PATH as it was and removes the temporary.
//
// Two faces of one implementation: AtomicFile throws io::FileError (a
// std::runtime_error carrying errno) for the streaming writers of checkpoint/
// and trainer/; write_file_atomically and run_atomic_write return an
// absl::Status for the Status-returning layers (data/, trainer/, cli/).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace sparseflash::io {

// A failed file operation: what() is "PATH: what happened: strerror", and
// error() the errno behind it (EIO where none was set).
class FileError : public std::runtime_error {
 public:
  FileError(const std::string& message, int error) : std::runtime_error(message), error_(error) {}
  int error() const { return error_; }

 private:
  int error_;
};

class AtomicFile {
 public:
  // Creates the temporary: `temporary` when given (it must be on PATH's file
  // system, e.g. in the same directory; for files whose readers pick up any
  // name that looks like PATH's), else "PATH.tmp.PID". Throws FileError
  // naming PATH when the directory is missing or not writable.
  explicit AtomicFile(std::string path, std::string temporary = "");
  // Without commit() (an exception on the way), the temporary is removed and
  // PATH is left as it was.
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);  // throws FileError naming the temporary
  void write(std::string_view bytes) { write(bytes.data(), bytes.size()); }
  void write_zeros(size_t n);  // padding
  // Overwrites n bytes at `offset` (< size()) of what was written, e.g. a
  // header whose checksum is known only after the payload.
  void write_at(uint64_t offset, const void* data, size_t n);
  uint64_t size() const { return size_; }  // bytes written so far
  // fsync, close, rename over PATH. Throws FileError naming PATH.
  void commit();

  const std::string& path() const { return path_; }
  const std::string& temporary() const { return tmp_; }

  // Removes temporaries of PATH that a killed writer left behind
  // ("PATH.tmp.PID" of a process that no longer exists), so that they do not
  // fill the disk. Returns how many were removed.
  static int remove_stale_temporaries(const std::string& path);

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

// Runs `write`, which streams into `file` (an AtomicFile of `path`), then
// commits. A FileError becomes the status of its errno with its message; any
// other exception an internal error naming PATH. PATH is left as it was on
// every failure.
absl::Status run_atomic_write(const std::string& path,
                              const std::function<void(AtomicFile& file)>& write,
                              const std::string& temporary = "");

// The whole of `contents` as PATH, atomically.
absl::Status write_file_atomically(const std::string& path, std::string_view contents,
                                   const std::string& temporary = "");

}  // namespace sparseflash::io
