// GGUF reader: validation at open, metadata decoded on demand.
#include "checkpoint/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <utility>

#include "io/errors.h"

namespace sparseflash::checkpoint {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as little-endian u32
constexpr int kMaxArrayDepth = 8;
constexpr uint32_t kMaxDims = 4;         // GGML_MAX_DIMS
constexpr uint64_t kDefaultAlignment = 32;

// Size of a fixed-size value type; 0 for strings and arrays.
size_t scalar_size(GgufType type) {
  switch (type) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kBool: return 1;
    case GgufType::kUint16: case GgufType::kInt16: return 2;
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kFloat32: return 4;
    case GgufType::kUint64: case GgufType::kInt64: case GgufType::kFloat64: return 8;
    default: return 0;
  }
}

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kFloat64); }

bool is_integer(GgufType t) {
  switch (t) {
    case GgufType::kUint8: case GgufType::kInt8: case GgufType::kUint16: case GgufType::kInt16:
    case GgufType::kUint32: case GgufType::kInt32: case GgufType::kUint64: case GgufType::kInt64:
    case GgufType::kBool:
      return true;
    default:
      return false;
  }
}

template <typename T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

// GGML tensor type ids (ggml.h) of the types we read; names of the others
// for error messages.
bool dtype_from_ggml(uint32_t id, DType* dtype) {
  switch (id) {
    case 0: *dtype = DType::kF32; return true;
    case 1: *dtype = DType::kF16; return true;
    case 2: *dtype = DType::kQ4_0; return true;
    case 3: *dtype = DType::kQ4_1; return true;
    case 6: *dtype = DType::kQ5_0; return true;
    case 7: *dtype = DType::kQ5_1; return true;
    case 8: *dtype = DType::kQ8_0; return true;
    case 10: *dtype = DType::kQ2_K; return true;
    case 11: *dtype = DType::kQ3_K; return true;
    case 12: *dtype = DType::kQ4_K; return true;
    case 13: *dtype = DType::kQ5_K; return true;
    case 14: *dtype = DType::kQ6_K; return true;
    case 15: *dtype = DType::kQ8_K; return true;
    case 24: *dtype = DType::kI8; return true;
    case 25: *dtype = DType::kI16; return true;
    case 26: *dtype = DType::kI32; return true;
    case 27: *dtype = DType::kI64; return true;
    case 28: *dtype = DType::kF64; return true;
    case 30: *dtype = DType::kBF16; return true;
    default: return false;
  }
}

std::string ggml_type_label(uint32_t id) {
  static const char* kNames[] = {"F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1",
                                 "Q8_0", "Q8_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K",
                                 "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S",
                                 "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
                                 "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0",
                                 "IQ4_NL_4_4", "IQ4_NL_4_8", "IQ4_NL_8_8", "MXFP4"};
  std::string label = "ggml type " + std::to_string(id);
  if (id < sizeof(kNames) / sizeof(kNames[0])) label += std::string(" (") + kNames[id] + ")";
  return label;
}

// Reads a GGUF string (u64 length + bytes) whose bytes stay in the mapping.
std::string read_string(ByteReader& r, const std::string& field) {
  uint64_t len = r.read<uint64_t>(field + " length");
  const uint8_t* p = r.take(len, field);
  return std::string(reinterpret_cast<const char*>(p), len);
}

// Advances past one value of `type`, validating it; returns its first byte.
void skip_value(ByteReader& r, GgufType type, int depth, const std::string& file,
                const std::string& field) {
  if (size_t n = scalar_size(type)) {
    const uint8_t* p = r.take(n, field);
    if (type == GgufType::kBool && *p > 1) fail(file, field, "bool value " + std::to_string(*p));
    return;
  }
  if (type == GgufType::kString) {
    uint64_t len = r.read<uint64_t>(field + " length");
    r.take(len, field);
    return;
  }
  // Array.
  if (depth >= kMaxArrayDepth) fail(file, field, "arrays nested deeper than " + std::to_string(kMaxArrayDepth));
  uint32_t elem = r.read<uint32_t>(field + " element type");
  if (!valid_type(elem)) fail(file, field + " element type", "unknown value type " + std::to_string(elem));
  uint64_t count = r.read<uint64_t>(field + " count");
  GgufType et = static_cast<GgufType>(elem);
  size_t min_size = scalar_size(et);
  if (min_size == 0) min_size = et == GgufType::kString ? 8 : 12;
  if (count > r.remaining() / min_size) {
    fail(file, field + " count",
         std::to_string(count) + " elements cannot fit in the " + std::to_string(r.remaining()) +
             " bytes left");
  }
  if (scalar_size(et) != 0 && et != GgufType::kBool) {
    r.take(count * min_size, field);
    return;
  }
  for (uint64_t i = 0; i < count; ++i) {
    skip_value(r, et, depth + 1, file, field + "[" + std::to_string(i) + "]");
  }
}

int64_t scalar_as_int(GgufType type, const uint8_t* p, const std::string& file,
                      const std::string& key) {
  switch (type) {
    case GgufType::kUint8: return load<uint8_t>(p);
    case GgufType::kInt8: return load<int8_t>(p);
    case GgufType::kBool: return load<uint8_t>(p);
    case GgufType::kUint16: return load<uint16_t>(p);
    case GgufType::kInt16: return load<int16_t>(p);
    case GgufType::kUint32: return load<uint32_t>(p);
    case GgufType::kInt32: return load<int32_t>(p);
    case GgufType::kInt64: return load<int64_t>(p);
    case GgufType::kUint64: {
      uint64_t v = load<uint64_t>(p);
      if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(file, key, "value " + std::to_string(v) + " does not fit int64");
      }
      return static_cast<int64_t>(v);
    }
    default:
      fail(file, key, std::string("expected an integer, found ") + gguf_type_name(type));
  }
}

double scalar_as_float(GgufType type, const uint8_t* p, const std::string& file,
                       const std::string& key) {
  if (type == GgufType::kFloat32) return load<float>(p);
  if (type == GgufType::kFloat64) return load<double>(p);
  if (is_integer(type) && type != GgufType::kBool) {
    return static_cast<double>(scalar_as_int(type, p, file, key));
  }
  fail(file, key, std::string("expected a number, found ") + gguf_type_name(type));
}

// The "found ..." half of an array getter's wrong-type message: "found string",
// "found array of float32".
std::string found_type(const GgufValue& v) {
  std::string found = std::string("found ") + gguf_type_name(v.type);
  if (v.type == GgufType::kArray) found += std::string(" of ") + gguf_type_name(v.elem_type);
  return found;
}

// get_int_array and get_float_array: an array whose element type passes
// `accepts`, each element decoded by `convert` (scalar_as_int or scalar_as_float).
template <typename T, typename Accepts, typename Convert>
std::vector<T> numeric_array(const GgufValue& v, Accepts accepts, const char* expected,
                             Convert convert, const std::string& file, const std::string& field) {
  if (v.type != GgufType::kArray || !accepts(v.elem_type)) {
    fail(file, field, std::string("expected an array of ") + expected + ", " + found_type(v));
  }
  size_t size = scalar_size(v.elem_type);
  std::vector<T> out(v.count);
  for (uint64_t i = 0; i < v.count; ++i) {
    out[i] = convert(v.elem_type, v.raw + i * size, file, field);
  }
  return out;
}

}  // namespace

const char* gguf_type_name(GgufType type) {
  switch (type) {
    case GgufType::kUint8: return "uint8";
    case GgufType::kInt8: return "int8";
    case GgufType::kUint16: return "uint16";
    case GgufType::kInt16: return "int16";
    case GgufType::kUint32: return "uint32";
    case GgufType::kInt32: return "int32";
    case GgufType::kFloat32: return "float32";
    case GgufType::kBool: return "bool";
    case GgufType::kString: return "string";
    case GgufType::kArray: return "array";
    case GgufType::kUint64: return "uint64";
    case GgufType::kInt64: return "int64";
    case GgufType::kFloat64: return "float64";
  }
  return "unknown";
}

// --- Parsing ---------------------------------------------------------------------

absl::StatusOr<std::shared_ptr<const GgufFile>> GgufFile::open(const std::string& path) {
  absl::StatusOr<std::shared_ptr<const MappedFile>> file = MappedFile::open(path);
  if (!file.ok()) return file.status();
  return parse(*std::move(file));
}

absl::StatusOr<std::shared_ptr<const GgufFile>> GgufFile::parse(
    std::shared_ptr<const MappedFile> file) {
  return io::status_of([&] { return parse_or_throw(file); });
}

std::shared_ptr<const GgufFile> GgufFile::parse_or_throw(const std::shared_ptr<const MappedFile>& file) {
  const std::string& path = file->path();
  ByteReader r(path, file->data(), file->size());
  uint32_t magic = r.read<uint32_t>("magic");
  if (magic != kMagic) {
    char shown[5] = {0};
    std::memcpy(shown, file->data(), 4);
    for (int i = 0; i < 4; ++i) {
      if (shown[i] < 0x20 || shown[i] > 0x7e) shown[i] = '?';
    }
    fail(path, "magic", std::string("expected \"GGUF\", found \"") + shown + "\"");
  }
  std::shared_ptr<GgufFile> g(new GgufFile());
  g->file_ = file;
  g->version_ = r.read<uint32_t>("version");
  if (g->version_ != 2 && g->version_ != 3) {
    if (g->version_ == 1) fail(path, "version", "GGUF v1 (32-bit counts) is not supported");
    if ((g->version_ & 0xffff) == 0 && (g->version_ >> 16) != 0) {
      fail(path, "version", "big-endian GGUF is not supported");
    }
    fail(path, "version", "unsupported version " + std::to_string(g->version_) + " (expected 2 or 3)");
  }
  uint64_t tensor_count = r.read<uint64_t>("tensor count");
  uint64_t kv_count = r.read<uint64_t>("metadata count");
  // Smallest possible entries: key (8) + type (4) + a 1-byte value; a tensor
  // info: name (8) + n_dims (4) + type (4) + offset (8).
  if (kv_count > r.remaining() / 13) {
    fail(path, "metadata count", std::to_string(kv_count) + " entries cannot fit in the file");
  }
  if (tensor_count > r.remaining() / 24) {
    fail(path, "tensor count", std::to_string(tensor_count) + " tensors cannot fit in the file");
  }

  for (uint64_t i = 0; i < kv_count; ++i) {
    std::string key = read_string(r, "metadata key #" + std::to_string(i));
    std::string field = "metadata '" + key + "'";
    uint32_t type = r.read<uint32_t>(field + " type");
    if (!valid_type(type)) fail(path, field + " type", "unknown value type " + std::to_string(type));
    GgufValue v;
    v.type = static_cast<GgufType>(type);
    size_t begin = r.pos();
    if (v.type == GgufType::kArray) {
      ByteReader peek(path, file->data(), file->size(), begin);
      v.elem_type = static_cast<GgufType>(peek.read<uint32_t>(field + " element type"));
      v.count = peek.read<uint64_t>(field + " count");
    }
    skip_value(r, v.type, 0, path, field);
    v.raw = file->data() + begin;
    v.raw_size = r.pos() - begin;
    if (v.type == GgufType::kArray) {
      v.raw += 12;
      v.raw_size -= 12;
    }
    if (!g->values_.emplace(key, v).second) fail(path, field, "duplicate key");
  }

  if (g->has("general.alignment")) {
    int64_t a = g->get_int("general.alignment");
    if (a <= 0 || (a & (a - 1)) != 0 || a > (1 << 30)) {
      fail(path, "metadata 'general.alignment'", "must be a power of two, found " + std::to_string(a));
    }
    g->alignment_ = static_cast<uint64_t>(a);
  } else {
    g->alignment_ = kDefaultAlignment;
  }

  std::vector<uint64_t> offsets;
  for (uint64_t i = 0; i < tensor_count; ++i) {
    std::string field = "tensor #" + std::to_string(i);
    TensorInfo t;
    t.name = read_string(r, field + " name");
    field = "tensor '" + t.name + "'";
    uint32_t n_dims = r.read<uint32_t>(field + " n_dims");
    if (n_dims > kMaxDims) fail(path, field + " n_dims", std::to_string(n_dims) + " exceeds " + std::to_string(kMaxDims));
    std::vector<int64_t> ne(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t n = r.read<uint64_t>(field + " ne[" + std::to_string(d) + "]");
      if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        fail(path, field + " ne[" + std::to_string(d) + "]", "dimension " + std::to_string(n) + " is too large");
      }
      ne[d] = static_cast<int64_t>(n);
    }
    t.shape.assign(ne.rbegin(), ne.rend());
    uint32_t type = r.read<uint32_t>(field + " type");
    if (!dtype_from_ggml(type, &t.dtype)) fail(path, field + " type", "unsupported " + ggml_type_label(type));
    uint64_t offset = r.read<uint64_t>(field + " offset");
    int64_t numel = shape_numel(t.shape);
    if (numel < 0) fail(path, field + " ne", "element count of " + shape_string(t.shape) + " overflows");
    int64_t block = dtype_block_size(t.dtype);
    if (n_dims > 0 && ne[0] % block != 0) {
      fail(path, field + " ne[0]", std::to_string(ne[0]) + " is not a multiple of the " +
                                       dtype_name(t.dtype) + " block size " + std::to_string(block));
    }
    int64_t nbytes = dtype_nbytes(t.dtype, numel);
    if (nbytes < 0) fail(path, field + " ne", "byte size of " + shape_string(t.shape) + " overflows");
    if (offset % g->alignment_ != 0) {
      fail(path, field + " offset", std::to_string(offset) + " is not a multiple of the alignment " +
                                        std::to_string(g->alignment_));
    }
    t.nbytes = static_cast<size_t>(nbytes);
    offsets.push_back(offset);
    if (!g->index_.emplace(t.name, g->tensors_.size()).second) fail(path, field, "duplicate tensor name");
    g->tensors_.push_back(std::move(t));
  }

  uint64_t data_start = r.pos();
  uint64_t rem = data_start % g->alignment_;
  if (rem != 0) data_start += g->alignment_ - rem;
  uint64_t data_size = data_start <= file->size() ? file->size() - data_start : 0;
  struct Range { uint64_t begin, end; size_t tensor; };
  std::vector<Range> ranges;
  for (size_t i = 0; i < g->tensors_.size(); ++i) {
    TensorInfo& t = g->tensors_[i];
    uint64_t offset = offsets[i];
    if (offset > data_size || t.nbytes > data_size - offset) {
      fail(path, "tensor '" + t.name + "' offset",
           "range [" + std::to_string(offset) + ", +" + std::to_string(t.nbytes) +
               ") runs past the data section of " + std::to_string(data_size) + " bytes (starting at " +
               std::to_string(data_start) + ")");
    }
    t.data = file->data() + data_start + offset;
    ranges.push_back({offset, offset + t.nbytes, i});
  }
  std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* previous = nullptr;
  for (const Range& range : ranges) {
    if (range.begin == range.end) continue;
    if (previous != nullptr && range.begin < previous->end) {
      fail(path, "tensor '" + g->tensors_[range.tensor].name + "' offset",
           "overlaps tensor '" + g->tensors_[previous->tensor].name + "'");
    }
    previous = &range;
  }
  return g;
}

const TensorInfo* GgufFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// --- Metadata getters ---------------------------------------------------------------

const GgufValue& GgufFile::value(const std::string& key) const {
  auto it = values_.find(key);
  if (it == values_.end()) fail(path(), "metadata '" + key + "'", "missing");
  return it->second;
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufType::kString) {
    fail(path(), "metadata '" + key + "'", std::string("expected a string, found ") + gguf_type_name(v.type));
  }
  return std::string(reinterpret_cast<const char*>(v.raw + 8), v.raw_size - 8);
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue& v = value(key);
  return scalar_as_int(v.type, v.raw, path(), "metadata '" + key + "'");
}

double GgufFile::get_float(const std::string& key) const {
  const GgufValue& v = value(key);
  return scalar_as_float(v.type, v.raw, path(), "metadata '" + key + "'");
}

bool GgufFile::get_bool(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufType::kBool) {
    fail(path(), "metadata '" + key + "'", std::string("expected a bool, found ") + gguf_type_name(v.type));
  }
  return v.raw[0] != 0;
}

std::vector<std::string> GgufFile::get_string_array(const std::string& key) const {
  const GgufValue& v = value(key);
  std::string field = "metadata '" + key + "'";
  if (v.type != GgufType::kArray || v.elem_type != GgufType::kString) {
    fail(path(), field, "expected an array of strings, " + found_type(v));
  }
  std::vector<std::string> out;
  out.reserve(v.count);
  ByteReader r(path(), v.raw, v.raw_size);
  for (uint64_t i = 0; i < v.count; ++i) out.push_back(read_string(r, field));
  return out;
}

std::vector<int64_t> GgufFile::get_int_array(const std::string& key) const {
  return numeric_array<int64_t>(value(key), is_integer, "integers", scalar_as_int, path(),
                                "metadata '" + key + "'");
}

std::vector<double> GgufFile::get_float_array(const std::string& key) const {
  auto is_number = [](GgufType t) { return scalar_size(t) != 0 && t != GgufType::kBool; };
  return numeric_array<double>(value(key), is_number, "numbers", scalar_as_float, path(),
                               "metadata '" + key + "'");
}

std::string GgufFile::describe(const std::string& key) const {
  const GgufValue& v = value(key);
  switch (v.type) {
    case GgufType::kString: return "\"" + get_string(key) + "\"";
    case GgufType::kFloat32: case GgufType::kFloat64: return std::to_string(get_float(key));
    case GgufType::kBool: return get_bool(key) ? "true" : "false";
    case GgufType::kArray:
      return std::string("array of ") + std::to_string(v.count) + " " + gguf_type_name(v.elem_type);
    case GgufType::kUint64:
      return std::to_string(load<uint64_t>(v.raw));
    default: return std::to_string(get_int(key));
  }
}

}  // namespace sparseflash::checkpoint
