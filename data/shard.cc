// Token shard files: atomic writer and validated, memory-mapped reader.
#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cassert>
#include <cerrno>
#include <cstdio>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "io/atomic_file.h"

// The format is little-endian and tokens are copied with memcpy: a big-endian
// host would need byte swaps everywhere, and none is supported.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "shards assume a little-endian host");

namespace sparseflash::data {

// --- Helpers ----------------------------------------------------------------

namespace {

// Header field offsets (see shard.h).
constexpr size_t kOffVersion = 8, kOffDtype = 12, kOffCount = 16, kOffChecksum = 24,
                 kOffVocab = 32, kOffDocs = 36;

absl::Status errno_error(int err, const std::string& path, const char* what) {
  return absl::ErrnoToStatus(err, absl::StrCat(path, ": ", what));
}

template <typename T>
void put(uint8_t* header, size_t offset, T value) {
  std::memcpy(header + offset, &value, sizeof(T));
}

template <typename T>
T get(const uint8_t* header, size_t offset) {
  T value;
  std::memcpy(&value, header + offset, sizeof(T));
  return value;
}


// Printable rendering of the magic bytes for error messages.
std::string show_bytes(const uint8_t* p, size_t n) {
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    if (p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\') {
      out.push_back(static_cast<char>(p[i]));
    } else {
      out += absl::StrFormat("\\x%02x", p[i]);
    }
  }
  return out;
}

}  // namespace

uint32_t token_bytes_for_vocab(int vocab_size) {
  if (vocab_size <= (1 << 8)) return 1;
  if (vocab_size <= (1 << 16)) return 2;
  return 4;
}

uint64_t fnv1a64(const void* data, size_t size, uint64_t state) {
  const auto* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < size; ++i) {
    state ^= p[i];
    state *= 1099511628211ull;
  }
  return state;
}

// --- Writer -----------------------------------------------------------------

absl::Status write_shard(const std::string& path, const std::vector<int32_t>& tokens,
                         int vocab_size, uint32_t document_count) {
  if (vocab_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": vocab size must be positive, got ", vocab_size));
  }
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": token ", i, " has id ", tokens[i],
                                                     " outside vocab [0, ", vocab_size, ")"));
    }
  }
  const uint32_t dtype = token_bytes_for_vocab(vocab_size);

  // The header (with the checksum) is only known after the tokens: write a
  // placeholder, stream the tokens in chunks, then overwrite the header. A
  // failure anywhere leaves neither `path` nor a temporary behind.
  return io::run_atomic_write(path, [&](io::AtomicFile& file) {
    uint8_t header[kShardHeaderBytes] = {};
    file.write(header, sizeof(header));
    uint64_t checksum = 14695981039346656037ull;
    constexpr size_t kChunk = 1 << 20;
    std::vector<uint8_t> buffer;
    buffer.reserve(kChunk * dtype);
    for (size_t begin = 0; begin < tokens.size(); begin += kChunk) {
      const size_t n = std::min(kChunk, tokens.size() - begin);
      buffer.resize(n * dtype);
      for (size_t i = 0; i < n; ++i) {
        const uint32_t v = static_cast<uint32_t>(tokens[begin + i]);
        std::memcpy(buffer.data() + i * dtype, &v, dtype);  // low bytes: little-endian
      }
      checksum = fnv1a64(buffer.data(), buffer.size(), checksum);
      file.write(buffer.data(), buffer.size());
    }
    std::memcpy(header, kShardMagic, sizeof(kShardMagic));
    put<uint32_t>(header, kOffVersion, kShardVersion);
    put<uint32_t>(header, kOffDtype, dtype);
    put<uint64_t>(header, kOffCount, tokens.size());
    put<uint64_t>(header, kOffChecksum, checksum);
    put<uint32_t>(header, kOffVocab, static_cast<uint32_t>(vocab_size));
    put<uint32_t>(header, kOffDocs, document_count);
    file.write_at(0, header, sizeof(header));
  });
}

// --- Reader -----------------------------------------------------------------

absl::StatusOr<Shard> Shard::open(const std::string& path, bool verify_checksum) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return errno_error(errno, path, "cannot open shard");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    absl::Status status = errno_error(errno, path, "cannot stat shard");
    ::close(fd);
    return status;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_bytes = static_cast<uint64_t>(st.st_size);
  if (file_bytes < kShardHeaderBytes) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": truncated header: file has ", file_bytes,
                                            " bytes, the header alone is ",
                                            kShardHeaderBytes));
  }
  void* map = ::mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  const int map_errno = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) return errno_error(map_errno, path, "mmap failed");

  // From here on the Shard owns the mapping: returning an error destroys it.
  Shard shard;
  shard.path_ = path;
  shard.map_ = static_cast<const uint8_t*>(map);
  shard.map_bytes_ = file_bytes;
  const uint8_t* h = shard.map_;

  if (std::memcmp(h, kShardMagic, sizeof(kShardMagic)) != 0) {
    return absl::DataLossError(absl::StrCat(path, ": not a token shard: expected magic \"SFSHARD\\0\", found \"",
                                            show_bytes(h, sizeof(kShardMagic)), "\""));
  }
  const uint32_t version = get<uint32_t>(h, kOffVersion);
  if (version != kShardVersion) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": unsupported shard version ", version,
                                                   " (this build reads version ", kShardVersion,
                                                   ")"));
  }
  const uint32_t dtype = get<uint32_t>(h, kOffDtype);
  if (dtype != 1 && dtype != 2 && dtype != 4) {
    return absl::DataLossError(
        absl::StrCat(path, ": bad token dtype ", dtype, " (expected 1, 2 or 4 bytes per token)"));
  }
  const uint64_t count = get<uint64_t>(h, kOffCount);
  // Compare in a way that cannot overflow for absurd counts from a corrupt header.
  const uint64_t payload = file_bytes - kShardHeaderBytes;
  if (count > payload / dtype || count * dtype != payload) {
    const bool small = count > payload / dtype;
    std::string expected = count > (UINT64_MAX - kShardHeaderBytes) / dtype
                               ? std::string("too many")
                               : absl::StrCat(kShardHeaderBytes + count * dtype);
    return absl::DataLossError(absl::StrCat(
        path, small ? ": truncated: " : ": size mismatch (trailing bytes): ", "header says ",
        count, " tokens (", expected, " bytes) but file has ", file_bytes, " bytes"));
  }
  const uint32_t vocab = get<uint32_t>(h, kOffVocab);
  if (vocab == 0) return absl::DataLossError(absl::StrCat(path, ": vocab size is 0"));

  shard.count_ = count;
  shard.vocab_size_ = vocab;
  shard.documents_ = get<uint32_t>(h, kOffDocs);
  shard.token_bytes_ = dtype;

  if (verify_checksum) {
    // One pass: the checksum and the largest id (ids >= vocab would index past
    // the embedding table, so they must be caught here, not on the GPU).
    const uint8_t* tokens = h + kShardHeaderBytes;
    const uint64_t expected = get<uint64_t>(h, kOffChecksum);
    const uint64_t actual = fnv1a64(tokens, payload);
    if (actual != expected) {
      return absl::DataLossError(absl::StrFormat(
          "%s: checksum mismatch: header says %016x, token bytes hash to %016x (corrupt file)",
          path, expected, actual));
    }
    int64_t max_id = -1;
    uint64_t max_at = 0;
    for (uint64_t i = 0; i < count; ++i) {
      const int64_t t = shard.token(i);
      if (t > max_id) {
        max_id = t;
        max_at = i;
      }
    }
    if (max_id >= static_cast<int64_t>(vocab)) {
      return absl::DataLossError(absl::StrCat(path, ": token ", max_at, " has id ", max_id,
                                              " but the vocab size is ", vocab));
    }
  }
  return shard;
}

Shard::Shard(Shard&& other) noexcept
    : path_(std::move(other.path_)),
      map_(other.map_),
      map_bytes_(other.map_bytes_),
      count_(other.count_),
      vocab_size_(other.vocab_size_),
      documents_(other.documents_),
      token_bytes_(other.token_bytes_) {
  other.map_ = nullptr;
  other.map_bytes_ = 0;
  other.count_ = 0;
}

Shard& Shard::operator=(Shard&& other) noexcept {
  if (this == &other) return *this;
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_bytes_);
  path_ = std::move(other.path_);
  map_ = other.map_;
  map_bytes_ = other.map_bytes_;
  count_ = other.count_;
  vocab_size_ = other.vocab_size_;
  documents_ = other.documents_;
  token_bytes_ = other.token_bytes_;
  other.map_ = nullptr;
  other.map_bytes_ = 0;
  other.count_ = 0;
  return *this;
}

Shard::~Shard() {
  if (map_ != nullptr) ::munmap(const_cast<uint8_t*>(map_), map_bytes_);
}

int64_t Shard::token(uint64_t i) const {
  assert(i < count_);
  const uint8_t* p = map_ + kShardHeaderBytes + i * token_bytes_;
  switch (token_bytes_) {
    case 1:
      return *p;
    case 2: {
      uint16_t v;
      std::memcpy(&v, p, 2);
      return v;
    }
    default: {
      uint32_t v;
      std::memcpy(&v, p, 4);
      return v;
    }
  }
}

void Shard::read(uint64_t begin, uint64_t count, int64_t* out) const {
  assert(begin + count <= count_);
  const uint8_t* p = map_ + kShardHeaderBytes + begin * token_bytes_;
  // One loop per dtype keeps the inner loop branch-free.
  switch (token_bytes_) {
    case 1:
      for (uint64_t i = 0; i < count; ++i) out[i] = p[i];
      break;
    case 2:
      for (uint64_t i = 0; i < count; ++i) {
        uint16_t v;
        std::memcpy(&v, p + 2 * i, 2);
        out[i] = v;
      }
      break;
    default:
      for (uint64_t i = 0; i < count; ++i) {
        uint32_t v;
        std::memcpy(&v, p + 4 * i, 4);
        out[i] = v;
      }
      break;
  }
}

}  // namespace sparseflash::data
