// Memory mapping and bounds-checked reading of checkpoint files.
#include "checkpoint/mapped_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "io/errors.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "checkpoint readers assume a little-endian host");

namespace sparseflash::checkpoint {

void fail(const std::string& file, const std::string& field, const std::string& what) {
  std::string message = file;
  if (!field.empty()) message += ": " + field;
  throw std::runtime_error(message + ": " + what);
}

void ByteReader::need(uint64_t n, const std::string& field) const {
  if (n > size_ - pos_) {
    fail(file_, field,
         "truncated (needs " + std::to_string(n) + " bytes at offset " + std::to_string(pos_) +
             ", the file has " + std::to_string(size_ - pos_) + " left)");
  }
}

bool is_directory(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string dirname_of(const std::string& path) {
  size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    const int err = errno;
    throw io::StatusError(absl::Status(absl::ErrnoToStatusCode(err),
                                       path + ": cannot open: " + std::strerror(err)));
  }
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) fail(path, "", "read failed");
  return ss.str();
}

absl::StatusOr<std::shared_ptr<const MappedFile>> MappedFile::open(const std::string& path) {
  const auto error = [&](const char* what, int err) {
    return absl::Status(absl::ErrnoToStatusCode(err),
                        path + ": " + what + ": " + std::strerror(err));
  };
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return error("cannot open", errno);
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return error("cannot stat", err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(path + ": not a regular file");
  }
  std::shared_ptr<MappedFile> file(new MappedFile());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ > 0) {
    void* p = mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      return error("cannot mmap", err);
    }
    file->mapping_ = p;
    file->data_ = static_cast<const uint8_t*>(p);
  } else {
    static const uint8_t kEmpty = 0;
    file->data_ = &kEmpty;
  }
  ::close(fd);
  return std::shared_ptr<const MappedFile>(std::move(file));
}

std::shared_ptr<const MappedFile> MappedFile::from_bytes(const std::string& name, const void* data,
                                                         size_t size) {
  std::shared_ptr<MappedFile> file(new MappedFile());
  file->path_ = name;
  file->size_ = size;
  // At least one byte so data() is never null, even for an empty input.
  file->owned_.reset(new uint8_t[size > 0 ? size : 1]);
  if (size > 0) std::memcpy(file->owned_.get(), data, size);
  file->data_ = file->owned_.get();
  return file;
}

MappedFile::~MappedFile() {
  if (mapping_ != nullptr) munmap(mapping_, size_);
}

}  // namespace sparseflash::checkpoint
