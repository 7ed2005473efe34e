// GGUF byte builder.
#include "checkpoint/gguf_writer.h"

#include <stdexcept>

namespace sparseflash::checkpoint {

uint32_t ggml_type_id(DType dtype) {
  switch (dtype) {
    case DType::kF32: return 0;
    case DType::kF16: return 1;
    case DType::kQ4_0: return 2;
    case DType::kQ4_1: return 3;
    case DType::kQ5_0: return 6;
    case DType::kQ5_1: return 7;
    case DType::kQ8_0: return 8;
    case DType::kI8: return 24;
    case DType::kI16: return 25;
    case DType::kI32: return 26;
    case DType::kI64: return 27;
    case DType::kF64: return 28;
    case DType::kBF16: return 30;
    case DType::kU8: case DType::kBool: break;
  }
  throw std::runtime_error(std::string("GGUF has no type for ") + dtype_name(dtype));
}

std::string GgufBuilder::encode_string(const std::string& s) { return encode<uint64_t>(s.size()) + s; }

void GgufBuilder::add_raw_kv(const std::string& key, uint32_t type, const std::string& value_bytes) {
  kv_ += encode_string(key) + encode(type) + value_bytes;
  ++kv_count_;
}

void GgufBuilder::add_string_array(const std::string& key, const std::vector<std::string>& v) {
  std::string value = encode<uint32_t>(8) + encode<uint64_t>(v.size());
  for (const std::string& s : v) value += encode_string(s);
  add_raw_kv(key, 9, value);
}

void GgufBuilder::add_i32_array(const std::string& key, const std::vector<int32_t>& v) {
  std::string value = encode<uint32_t>(5) + encode<uint64_t>(v.size());
  for (int32_t x : v) value += encode(x);
  add_raw_kv(key, 9, value);
}

void GgufBuilder::add_f32_array(const std::string& key, const std::vector<float>& v) {
  std::string value = encode<uint32_t>(6) + encode<uint64_t>(v.size());
  for (float x : v) value += encode(x);
  add_raw_kv(key, 9, value);
}

void GgufBuilder::set_alignment(uint32_t alignment) {
  add_u32("general.alignment", alignment);
  alignment_ = alignment;
}

void GgufBuilder::add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                             const std::string& bytes) {
  if (alignment_ > 0 && data_.size() % alignment_ != 0) data_.append(alignment_ - data_.size() % alignment_, '\0');
  std::vector<uint64_t> ne(shape.rbegin(), shape.rend());
  add_tensor_info(name, ne, ggml_type_id(dtype), data_.size());
  data_ += bytes;
}

void GgufBuilder::add_tensor_info(const std::string& name, const std::vector<uint64_t>& ne, uint32_t ggml_type,
                                  uint64_t offset) {
  infos_ += encode_string(name) + encode<uint32_t>(static_cast<uint32_t>(ne.size()));
  for (uint64_t n : ne) infos_ += encode(n);
  infos_ += encode(ggml_type) + encode(offset);
  ++tensor_count_;
}

std::string GgufBuilder::bytes() const {
  std::string out = "GGUF" + encode(version_) + encode(tensor_count_) + encode(kv_count_) + kv_ + infos_;
  if (alignment_ > 0 && out.size() % alignment_ != 0) out.append(alignment_ - out.size() % alignment_, '\0');
  return out + data_;
}

}  // namespace sparseflash::checkpoint
