// safetensors reader and writer.
#include "checkpoint/safetensors.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <stdexcept>

#include "io/atomic_file.h"
#include "io/errors.h"
#include "checkpoint/json_brief.h"
#include "nlohmann/json.hpp"

namespace sparseflash::checkpoint {

namespace {

using nlohmann::json;

// The reference implementation's limit; a larger header is hostile.
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

struct NameType {
  const char* name;
  DType dtype;
};
constexpr NameType kNames[] = {
    {"F32", DType::kF32}, {"F16", DType::kF16}, {"BF16", DType::kBF16}, {"F64", DType::kF64},
    {"I64", DType::kI64}, {"I32", DType::kI32}, {"I16", DType::kI16},   {"I8", DType::kI8},
    {"U8", DType::kU8},   {"BOOL", DType::kBool},
};

std::string json_kind(const json& j) { return j.type_name(); }

// A non-negative integer that fits int64, or a failure naming `field`.
int64_t json_index(const std::string& file, const std::string& field, const json& j) {
  if (j.is_number_unsigned()) {
    uint64_t v = j.get<uint64_t>();
    if (v > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail(file, field, "value " + std::to_string(v) + " is too large");
    }
    return static_cast<int64_t>(v);
  }
  if (j.is_number_integer()) {
    fail(file, field, "negative value " + std::to_string(j.get<int64_t>()));
  }
  fail(file, field, "expected a non-negative integer, found " + json_kind(j));
}

}  // namespace

bool dtype_from_safetensors_name(const std::string& name, DType* dtype) {
  for (const NameType& nt : kNames) {
    if (name == nt.name) {
      *dtype = nt.dtype;
      return true;
    }
  }
  return false;
}

std::string safetensors_dtype_name(DType dtype) {
  for (const NameType& nt : kNames) {
    if (nt.dtype == dtype) return nt.name;
  }
  throw std::runtime_error(std::string("safetensors cannot store dtype ") + dtype_name(dtype));
}

// --- SafetensorsFile ------------------------------------------------------------

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::open(
    const std::string& path) {
  absl::StatusOr<std::shared_ptr<const MappedFile>> file = MappedFile::open(path);
  if (!file.ok()) return file.status();
  return parse(*std::move(file));
}

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::parse(
    std::shared_ptr<const MappedFile> file) {
  return io::status_of([&] { return parse_or_throw(file); });
}

std::shared_ptr<const SafetensorsFile> SafetensorsFile::parse_or_throw(
    const std::shared_ptr<const MappedFile>& file) {
  const std::string& path = file->path();
  ByteReader reader(path, file->data(), file->size());
  uint64_t header_len = reader.read<uint64_t>("header length");
  if (header_len > kMaxHeaderBytes) {
    fail(path, "header length", std::to_string(header_len) + " exceeds the limit of " +
                                    std::to_string(kMaxHeaderBytes) + " bytes");
  }
  const uint8_t* header_bytes = reader.take(header_len, "header");
  const uint8_t* data_begin = header_bytes + header_len;
  uint64_t data_size = file->size() - 8 - header_len;

  json header;
  try {
    header = json::parse(header_bytes, header_bytes + header_len);
  } catch (const json::exception& e) {
    fail(path, "header", std::string("invalid JSON: ") + e.what());
  }
  if (!header.is_object()) fail(path, "header", "expected a JSON object, found " + json_kind(header));

  std::shared_ptr<SafetensorsFile> st(new SafetensorsFile());
  st->file_ = file;
  struct Range {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) fail(path, "__metadata__", "expected an object, found " + json_kind(entry));
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          fail(path, "__metadata__." + m.key(), "expected a string, found " + json_kind(m.value()));
        }
        st->metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    std::string field = "tensor '" + name + "'";
    if (!entry.is_object()) fail(path, field, "expected an object, found " + json_kind(entry));
    for (const char* key : {"dtype", "shape", "data_offsets"}) {
      if (!entry.contains(key)) fail(path, field + "." + key, "missing");
    }
    const json& jdtype = entry["dtype"];
    if (!jdtype.is_string()) fail(path, field + ".dtype", "expected a string, found " + json_kind(jdtype));
    TensorInfo t;
    t.name = name;
    if (!dtype_from_safetensors_name(jdtype.get<std::string>(), &t.dtype)) {
      fail(path, field + ".dtype", "unsupported dtype '" + jdtype.get<std::string>() + "'");
    }
    const json& jshape = entry["shape"];
    if (!jshape.is_array()) fail(path, field + ".shape", "expected an array, found " + json_kind(jshape));
    for (size_t d = 0; d < jshape.size(); ++d) {
      t.shape.push_back(json_index(path, field + ".shape[" + std::to_string(d) + "]", jshape[d]));
    }
    const json& joff = entry["data_offsets"];
    if (!joff.is_array() || joff.size() != 2) {
      fail(path, field + ".data_offsets", "expected [begin, end], found " + json_brief(joff));
    }
    uint64_t begin = json_index(path, field + ".data_offsets[0]", joff[0]);
    uint64_t end = json_index(path, field + ".data_offsets[1]", joff[1]);
    if (end < begin) {
      fail(path, field + ".data_offsets",
           "end " + std::to_string(end) + " is before begin " + std::to_string(begin));
    }
    if (end > data_size) {
      fail(path, field + ".data_offsets",
           "range [" + std::to_string(begin) + ", " + std::to_string(end) +
               ") runs past the data section of " + std::to_string(data_size) + " bytes");
    }
    int64_t numel = shape_numel(t.shape);
    int64_t expected = numel < 0 ? -1 : dtype_nbytes(t.dtype, numel);
    if (expected < 0) fail(path, field + ".shape", "size of " + shape_string(t.shape) + " overflows");
    if (static_cast<uint64_t>(expected) != end - begin) {
      fail(path, field + ".data_offsets",
           std::string(dtype_name(t.dtype)) + " " + shape_string(t.shape) + " needs " +
               std::to_string(expected) + " bytes but the range holds " +
               std::to_string(end - begin));
    }
    t.data = data_begin + begin;
    t.nbytes = end - begin;
    ranges.push_back({begin, end, st->tensors_.size()});
    st->index_[name] = st->tensors_.size();
    st->tensors_.push_back(std::move(t));
  }
  // Overlaps: sort by begin; each non-empty range must start at or after the
  // previous non-empty one's end.
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  const Range* previous = nullptr;
  for (const Range& r : ranges) {
    if (r.begin == r.end) continue;
    if (previous != nullptr && r.begin < previous->end) {
      fail(path, "tensor '" + st->tensors_[r.tensor].name + "'.data_offsets",
           "range [" + std::to_string(r.begin) + ", " + std::to_string(r.end) +
               ") overlaps tensor '" + st->tensors_[previous->tensor].name + "' [" +
               std::to_string(previous->begin) + ", " + std::to_string(previous->end) + ")");
    }
    previous = &r;
  }
  return st;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

// --- SafetensorsModel ------------------------------------------------------------

namespace {

json read_json_file(const std::string& path) {
  std::string text = read_text_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    fail(path, "", std::string("invalid JSON: ") + e.what());
  }
}

}  // namespace

absl::StatusOr<std::shared_ptr<const SafetensorsModel>> SafetensorsModel::open(
    const std::string& path) {
  return io::status_of([&] { return open_or_throw(path); });
}

std::shared_ptr<const SafetensorsModel> SafetensorsModel::open_or_throw(const std::string& path) {
  std::string index_path;
  std::string single_path;
  if (is_directory(path)) {
    if (is_regular_file(path + "/model.safetensors.index.json")) {
      index_path = path + "/model.safetensors.index.json";
    } else if (is_regular_file(path + "/model.safetensors")) {
      single_path = path + "/model.safetensors";
    } else {
      fail(path, "", "holds neither model.safetensors nor model.safetensors.index.json");
    }
  } else if (ends_with(path, ".json")) {
    index_path = path;
  } else {
    single_path = path;
  }

  std::shared_ptr<SafetensorsModel> model(new SafetensorsModel());
  auto add_file = [&](std::shared_ptr<const SafetensorsFile> f) {
    for (const TensorInfo& t : f->tensors()) {
      if (!model->tensors_.emplace(t.name, t).second) {
        fail(f->path(), "tensor '" + t.name + "'", "also stored in another shard");
      }
    }
    model->files_.push_back(std::move(f));
  };
  if (!single_path.empty()) {
    add_file(io::value_or_throw(SafetensorsFile::open(single_path)));
    return model;
  }

  json index = read_json_file(index_path);
  if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object()) {
    fail(index_path, "weight_map", "missing or not an object");
  }
  const json& weight_map = index["weight_map"];
  std::string dir = dirname_of(index_path);
  std::map<std::string, std::shared_ptr<const SafetensorsFile>> shards;
  for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
    std::string field = "weight_map." + it.key();
    if (!it.value().is_string()) fail(index_path, field, "expected a file name, found " + json_kind(it.value()));
    std::string shard = it.value().get<std::string>();
    // Shards live next to the index: no absolute paths, no escaping upwards.
    if (shard.empty() || shard[0] == '/' || shard.find("..") != std::string::npos) {
      fail(index_path, field, "shard name '" + shard + "' is not a plain file name");
    }
    if (shards.count(shard) == 0) {
      auto f = io::value_or_throw(SafetensorsFile::open(dir + "/" + shard));
      shards[shard] = f;
      add_file(f);
    }
    if (shards[shard]->find(it.key()) == nullptr) {
      fail(index_path, field, "tensor is not in shard " + shard);
    }
  }
  if (model->files_.empty()) fail(index_path, "weight_map", "lists no tensors");
  return model;
}

const TensorInfo* SafetensorsModel::find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

// --- Writer ------------------------------------------------------------------

namespace {

void write_safetensors_or_throw(const std::string& path, const std::vector<TensorToWrite>& tensors,
                                const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  std::set<std::string> names;
  for (const TensorToWrite& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__" || !names.insert(t.name).second) {
      fail(path, "tensor '" + t.name + "'", "empty, reserved or duplicate name");
    }
    int64_t numel = shape_numel(t.shape);
    int64_t expected = numel < 0 ? -1 : dtype_nbytes(t.dtype, numel);
    if (expected < 0 || static_cast<uint64_t>(expected) != t.nbytes) {
      fail(path, "tensor '" + t.name + "'",
           std::string(dtype_name(t.dtype)) + " " + shape_string(t.shape) + " does not match " +
               std::to_string(t.nbytes) + " bytes");
    }
    if (t.nbytes > 0 && t.data == nullptr) fail(path, "tensor '" + t.name + "'", "no data");
    header[t.name] = {{"dtype", safetensors_dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const json::exception& e) {  // names or metadata that are not UTF-8
    fail(path, "header", std::string("cannot encode: ") + e.what());
  }
  text.append((8 - text.size() % 8) % 8, ' ');

  io::AtomicFile out(path);
  uint64_t header_len = text.size();
  out.write(&header_len, 8);
  out.write(text.data(), text.size());
  for (const TensorToWrite& t : tensors) out.write(t.data, t.nbytes);
  out.commit();
}

}  // namespace

absl::Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  return io::status_of([&] { write_safetensors_or_throw(path, tensors, metadata); });
}

}  // namespace sparseflash::checkpoint
