// GGUF byte builder and the streaming file writer.
#include "checkpoint/gguf_writer.h"

#include <algorithm>
#include <stdexcept>

#include "io/atomic_file.h"

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

GgufEntry gguf_entry(const GgufFile& file, const std::string& key) {
  auto it = file.metadata().find(key);
  if (it == file.metadata().end()) fail(file.path(), "metadata '" + key + "'", "missing");
  const GgufValue& v = it->second;
  GgufEntry e{key, static_cast<uint32_t>(v.type), {}};
  if (v.type == GgufType::kArray)
    e.value_bytes = GgufBuilder::encode(static_cast<uint32_t>(v.elem_type)) + GgufBuilder::encode(v.count);
  e.value_bytes.append(reinterpret_cast<const char*>(v.raw), v.raw_size);
  return e;
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

// --- Streaming writer -------------------------------------------------------------

namespace {

constexpr uint32_t kAlignment = 32;
constexpr size_t kMaxName = 63;       // GGML_MAX_NAME (64) with its NUL
constexpr size_t kMaxDims = 4;        // GGML_MAX_DIMS
constexpr int64_t kSlice = 1 << 16;   // values converted at a time (a multiple of 32)

uint64_t aligned(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

}  // namespace

GgufWriter::GgufWriter(std::string path) : path_(std::move(path)) { header_.set_alignment(kAlignment); }

void GgufWriter::add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                            const float* values) {
  add({name, dtype, 0, 0, values, nullptr}, shape);
}

void GgufWriter::add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                            std::function<void(float*)> fill) {
  add({name, dtype, 0, 0, nullptr, std::move(fill)}, shape);
}

void GgufWriter::add(Pending t, const std::vector<int64_t>& shape) {
  const std::string field = "tensor '" + t.name + "'";
  if (t.name.empty() || t.name.size() > kMaxName)
    fail(path_, field, "name must have 1 to " + std::to_string(kMaxName) + " bytes");
  if (names_.count(t.name) != 0) fail(path_, field, "duplicate name");
  if (t.dtype != DType::kF32 && t.dtype != DType::kF16 && t.dtype != DType::kBF16 && t.dtype != DType::kQ8_0)
    fail(path_, field, std::string("cannot write ") + dtype_name(t.dtype) + " (F32, F16, BF16 or Q8_0)");
  if (shape.empty() || shape.size() > kMaxDims)
    fail(path_, field, "shape " + shape_string(shape) + " must have 1 to 4 dimensions");
  t.numel = shape_numel(shape);
  const int64_t block = dtype_block_size(t.dtype);
  if (t.numel <= 0 || shape.back() % block != 0)
    fail(path_, field, std::string(dtype_name(t.dtype)) + " shape " + shape_string(shape) +
                           ": rows must be whole blocks of " + std::to_string(block) + " values");
  if (t.values == nullptr && !t.fill) fail(path_, field, "no data");
  names_.insert(t.name);
  t.offset = aligned(data_size_);
  data_size_ = t.offset + static_cast<uint64_t>(dtype_nbytes(t.dtype, t.numel));
  header_.add_tensor_info(t.name, std::vector<uint64_t>(shape.rbegin(), shape.rend()), ggml_type_id(t.dtype),
                          t.offset);
  tensors_.push_back(std::move(t));
}

void GgufWriter::write() const {
  io::AtomicFile out(path_);
  const std::string header = header_.bytes();  // ends padded to the alignment
  out.write(header.data(), header.size());
  const uint64_t data_start = out.size();
  std::vector<float> filled;
  std::vector<uint8_t> encoded;
  for (const Pending& t : tensors_) {
    out.write_zeros(data_start + t.offset - out.size());
    const float* values = t.values;
    if (values == nullptr) {
      filled.assign(static_cast<size_t>(t.numel), 0.0f);
      try {
        t.fill(filled.data());
      } catch (const std::exception& e) {
        fail(path_, "tensor '" + t.name + "'", e.what());
      }
      values = filled.data();
    }
    if (t.dtype == DType::kF32) {
      out.write(values, static_cast<size_t>(t.numel) * 4);
    } else {
      for (int64_t begin = 0; begin < t.numel; begin += kSlice) {
        const int64_t n = std::min(kSlice, t.numel - begin);
        encoded.resize(static_cast<size_t>(dtype_nbytes(t.dtype, n)));
        from_float32(values + begin, n, t.dtype, encoded.data());
        out.write(encoded.data(), encoded.size());
      }
    }
    if (!filled.empty()) std::vector<float>().swap(filled);
  }
  out.commit();
}

}  // namespace sparseflash::checkpoint
