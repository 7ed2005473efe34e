// Writing GGUF files. GgufBuilder builds one byte by byte in memory: valid
// files for tests and fuzz seed corpora, deliberately broken ones (add_raw_kv,
// add_tensor_info with an explicit offset) for the corruption tests, and the
// header of the files GgufWriter streams to disk (`sparseflash convert`).
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "checkpoint/tensor.h"

namespace sparseflash::checkpoint {

// The GGML type id of a dtype (ggml.h).
uint32_t ggml_type_id(DType dtype);

// One metadata entry as stored (GgufBuilder::add_raw_kv's arguments), for
// carrying a key from one file to another unchanged.
struct GgufEntry {
  std::string key;
  uint32_t type = 0;        // GgufType
  std::string value_bytes;  // what follows the type: the value, or an array's
                            // element type, count and elements
};
// The entry `key` of `file` exactly as stored. Throws std::runtime_error
// naming the file and the key when it is absent.
GgufEntry gguf_entry(const GgufFile& file, const std::string& key);

class GgufBuilder {
 public:
  explicit GgufBuilder(uint32_t version = 3) : version_(version) {}

  // Metadata, in call order. Encoders for single values:
  static std::string encode_string(const std::string& s);  // u64 length + bytes
  template <typename T>
  static std::string encode(T value) {
    return std::string(reinterpret_cast<const char*>(&value), sizeof(T));
  }
  void add_raw_kv(const std::string& key, uint32_t type, const std::string& value_bytes);
  void add(const GgufEntry& e) { add_raw_kv(e.key, e.type, e.value_bytes); }
  void add_u32(const std::string& key, uint32_t v) { add_raw_kv(key, 4, encode(v)); }
  void add_i32(const std::string& key, int32_t v) { add_raw_kv(key, 5, encode(v)); }
  void add_u64(const std::string& key, uint64_t v) { add_raw_kv(key, 10, encode(v)); }
  void add_f32(const std::string& key, float v) { add_raw_kv(key, 6, encode(v)); }
  void add_bool(const std::string& key, bool v) { add_raw_kv(key, 7, encode<uint8_t>(v)); }
  void add_string(const std::string& key, const std::string& v) { add_raw_kv(key, 8, encode_string(v)); }
  void add_string_array(const std::string& key, const std::vector<std::string>& v);
  void add_i32_array(const std::string& key, const std::vector<int32_t>& v);
  void add_f32_array(const std::string& key, const std::vector<float>& v);
  // Sets general.alignment (u32) and uses it for the data layout.
  void set_alignment(uint32_t alignment);

  // A tensor: `shape` outermost first (written reversed as GGUF's ne),
  // `bytes` its stored data; placed at the next aligned offset.
  void add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                  const std::string& bytes);
  // A tensor info with everything explicit and no data (corruption tests);
  // pair with append_data().
  void add_tensor_info(const std::string& name, const std::vector<uint64_t>& ne, uint32_t ggml_type,
                       uint64_t offset);
  void append_data(const std::string& bytes) { data_ += bytes; }

  // The file: header, metadata, tensor infos, padding, data.
  std::string bytes() const;

 private:
  uint32_t version_;
  uint64_t alignment_ = 32;
  uint64_t kv_count_ = 0;
  uint64_t tensor_count_ = 0;
  std::string kv_;
  std::string infos_;
  std::string data_;
};

// A GGUF v3 file written to disk: metadata through metadata() (GgufBuilder's
// add_* calls; alignment 32, stated in general.alignment), tensors given as
// float32 values and stored as F32, F16, BF16 or Q8_0 (from_float32), each
// converted in slices while the data section streams out, so a model needs no
// second copy of itself in memory. write() goes through io::AtomicFile: on any
// error no file (and no temporary) is left at the path. Errors throw
// std::runtime_error naming the path and, for a tensor, its name.
class GgufWriter {
 public:
  explicit GgufWriter(std::string path);

  GgufBuilder& metadata() { return header_; }  // not its add_tensor*: use these
  // `values`: the tensor's numel float32 values, alive until write().
  void add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                  const float* values);
  // `fill` is called once, during write(), to put the numel values in the
  // buffer it gets (values computed on the way: permuted rows, a cast).
  void add_tensor(const std::string& name, DType dtype, const std::vector<int64_t>& shape,
                  std::function<void(float*)> fill);
  void write() const;

 private:
  struct Pending {
    std::string name;
    DType dtype;
    int64_t numel;
    uint64_t offset;
    const float* values;
    std::function<void(float*)> fill;
  };
  void add(Pending t, const std::vector<int64_t>& shape);

  std::string path_;
  GgufBuilder header_;
  std::vector<Pending> tensors_;
  std::set<std::string> names_;
  uint64_t data_size_ = 0;
};

}  // namespace sparseflash::checkpoint
