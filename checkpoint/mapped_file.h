// Read-only views of checkpoint files: a memory mapping of a file on disk, or
// an owned copy of bytes (fuzzers, tests). Parsers see only data()/size() and
// the name they put in error messages.
//
// Also the readers' internal toolkit: ByteReader and fail() throw (a parser fails
// deep inside a loop); every public reader of checkpoint/ converts at its
// boundary with io::status_of (io/errors.h) and returns absl::Status(Or).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace sparseflash::checkpoint {

class MappedFile {
 public:
  // Maps `path` read-only. The error names the path; its code is the errno's
  // (a missing file: NotFound).
  static absl::StatusOr<std::shared_ptr<const MappedFile>> open(const std::string& path);
  // Copies [data, data + size); `name` stands in for the path in error messages.
  static std::shared_ptr<const MappedFile> from_bytes(const std::string& name, const void* data,
                                                      size_t size);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  void* mapping_ = nullptr;  // munmap'd in the destructor when non-null
  std::unique_ptr<uint8_t[]> owned_;
};

// Little-endian cursor over a byte range: every read is bounds-checked and a
// short read throws "<file>: <field>: truncated (...)".
class ByteReader {
 public:
  ByteReader(const std::string& file, const uint8_t* data, size_t size, size_t pos = 0)
      : file_(file), data_(data), size_(size), pos_(pos) {}

  template <typename T>
  T read(const std::string& field) {
    T value;
    need(sizeof(T), field);
    __builtin_memcpy(&value, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return value;
  }
  // Returns a pointer to the next n bytes and advances past them.
  const uint8_t* take(uint64_t n, const std::string& field) {
    need(n, field);
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  void need(uint64_t n, const std::string& field) const;
  size_t pos() const { return pos_; }
  size_t remaining() const { return size_ - pos_; }
  size_t size() const { return size_; }

 private:
  std::string file_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_;
};

// Small path helpers shared by the readers.
bool is_directory(const std::string& path);
bool is_regular_file(const std::string& path);
bool ends_with(const std::string& s, const std::string& suffix);
std::string dirname_of(const std::string& path);  // "." when there is no slash
// The whole file as a string; throws naming the path when it cannot be read
// (an io::StatusError with the errno's code when it cannot be opened).
std::string read_text_file(const std::string& path);

// Throws std::runtime_error("<file>: <field>: <what>").
[[noreturn]] void fail(const std::string& file, const std::string& field, const std::string& what);

}  // namespace sparseflash::checkpoint
