// Writing a file so that readers never see part of it: the bytes go to a
// temporary beside it ("PATH.tmp.PID"), are fsync'd, and the temporary is
// renamed over PATH (and the directory fsync'd) only when everything was
// written. A failed write (a full disk: ENOSPC, a file-size limit: EFBIG)
// leaves PATH as it was. Training checkpoints, the safetensors and GGUF
// writers stream through this.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace sparseflash::checkpoint {

class AtomicFile {
 public:
  // Creates the temporary. Throws std::runtime_error naming it when the
  // directory is missing or not writable.
  explicit AtomicFile(std::string path);
  // Without commit() (an exception on the way), the temporary is removed and
  // PATH is left as it was.
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);      // throws naming the temporary
  void write_zeros(size_t n);                  // padding
  uint64_t size() const { return size_; }      // bytes written so far
  // fsync, close, rename over PATH. Throws naming PATH.
  void commit();

  const std::string& path() const { return path_; }

  // Removes temporaries of PATH that a killed writer left behind
  // ("PATH.tmp.PID" of a process that no longer exists), so that they do not
  // fill the disk. Returns how many were removed.
  static int remove_stale_temporaries(const std::string& path);

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  uint64_t size_ = 0;
};

}  // namespace sparseflash::checkpoint
