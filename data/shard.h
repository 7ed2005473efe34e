// Token shards: the on-disk format written by `sparseflash prepare`.
//
// Layout (little-endian), all offsets from the start of the file:
//   0   char[8]  magic "SFSHARD\0"
//   8   u32      version (1)
//   12  u32      token dtype: 1 = uint8, 2 = uint16, 4 = uint32 (bytes per token)
//   16  u64      token count
//   24  u64      FNV-1a 64 checksum of the token bytes
//   32  u32      vocab size
//   36  u32      document count
//   40  u8[24]   reserved, zero
//   64  tokens   token count * dtype bytes
// The file size must equal 64 + count * dtype exactly.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace sparseflash::data {

inline constexpr char kShardMagic[8] = {'S', 'F', 'S', 'H', 'A', 'R', 'D', '\0'};
inline constexpr uint32_t kShardVersion = 1;
inline constexpr size_t kShardHeaderBytes = 64;

// Smallest dtype (1, 2 or 4 bytes) that holds ids in [0, vocab_size).
uint32_t token_bytes_for_vocab(int vocab_size);

uint64_t fnv1a64(const void* data, size_t size, uint64_t state = 14695981039346656037ull);

// Writes a shard atomically (path + ".tmp", then rename): a failure never
// leaves a partial file at `path`. Every id must be < vocab_size.
absl::Status write_shard(const std::string& path, const std::vector<int32_t>& tokens,
                         int vocab_size, uint32_t document_count);

// A read-only memory-mapped shard whose header, size and checksum were checked.
class Shard {
 public:
  // Errors name the file and what is wrong (bad magic: expected/found bytes,
  // unsupported version, size mismatch = truncated, checksum mismatch).
  static absl::StatusOr<Shard> open(const std::string& path, bool verify_checksum = true);

  Shard(Shard&& other) noexcept;
  Shard& operator=(Shard&& other) noexcept;
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;
  ~Shard();

  const std::string& path() const { return path_; }
  uint64_t size() const { return count_; }  // number of tokens
  uint32_t vocab_size() const { return vocab_size_; }
  uint32_t document_count() const { return documents_; }
  uint32_t token_bytes() const { return token_bytes_; }
  // Token i widened to int64 (no bounds check beyond an assert).
  int64_t token(uint64_t i) const;
  // Copies tokens [begin, begin + count) into out.
  void read(uint64_t begin, uint64_t count, int64_t* out) const;

 private:
  Shard() = default;
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_bytes_ = 0;
  uint64_t count_ = 0;
  uint32_t vocab_size_ = 0;
  uint32_t documents_ = 0;
  uint32_t token_bytes_ = 1;
};

}  // namespace sparseflash::data
