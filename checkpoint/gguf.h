// GGUF (llama.cpp's single-file format), versions 2 and 3, little-endian.
//
// Layout: "GGUF", u32 version, u64 tensor count, u64 metadata count; the
// metadata key/values (key = u64 length + bytes; u32 value type; value);
// the tensor infos (name, u32 n_dims, u64 ne[n_dims] innermost first, u32
// ggml type, u64 offset); padding to general.alignment (default 32); the data
// section. Every count and length is checked against the bytes left in the
// file before anything is allocated, arrays nest at most 8 deep, tensors have
// at most 4 dimensions and their offsets are aligned, inside the data section
// and disjoint.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/tensor.h"

namespace sparseflash::checkpoint {

enum class GgufType : uint32_t {
  kUint8 = 0, kInt8 = 1, kUint16 = 2, kInt16 = 3, kUint32 = 4, kInt32 = 5, kFloat32 = 6,
  kBool = 7, kString = 8, kArray = 9, kUint64 = 10, kInt64 = 11, kFloat64 = 12,
};
const char* gguf_type_name(GgufType type);

// One metadata value, validated at open and decoded on demand from the
// mapped bytes (a tokenizer's 100k strings cost nothing until read).
struct GgufValue {
  GgufType type = GgufType::kUint8;
  const uint8_t* raw = nullptr;  // the value's bytes (for arrays: the first element)
  size_t raw_size = 0;
  GgufType elem_type = GgufType::kUint8;  // arrays only
  uint64_t count = 0;                     // arrays only
};

class GgufFile {
 public:
  // The error names the file and the field at fault (NotFound for a missing
  // file, InvalidArgument for a malformed one).
  static absl::StatusOr<std::shared_ptr<const GgufFile>> open(const std::string& path);
  static absl::StatusOr<std::shared_ptr<const GgufFile>> parse(std::shared_ptr<const MappedFile> file);

  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order
  const TensorInfo* find(const std::string& name) const;
  const std::string& path() const { return file_->path(); }

  // Metadata. Each getter throws std::runtime_error naming the file and the
  // key when it is absent or of another type (for the readers inside
  // checkpoint/ and tokenizer/, which convert at their boundary: io/errors.h). get_int accepts every integer
  // type (and bool); get_float every float or integer type; the array getters
  // likewise for the element type.
  bool has(const std::string& key) const { return values_.count(key) != 0; }
  const std::map<std::string, GgufValue>& metadata() const { return values_; }
  std::string get_string(const std::string& key) const;
  int64_t get_int(const std::string& key) const;
  double get_float(const std::string& key) const;
  bool get_bool(const std::string& key) const;
  std::vector<std::string> get_string_array(const std::string& key) const;
  std::vector<int64_t> get_int_array(const std::string& key) const;
  std::vector<double> get_float_array(const std::string& key) const;
  // A readable rendering of any value (arrays shortened), for diagnostics.
  std::string describe(const std::string& key) const;

 private:
  GgufFile() = default;
  static std::shared_ptr<const GgufFile> parse_or_throw(const std::shared_ptr<const MappedFile>& file);
  const GgufValue& value(const std::string& key) const;
  std::shared_ptr<const MappedFile> file_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::map<std::string, GgufValue> values_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
};

}  // namespace sparseflash::checkpoint
