// safetensors: reader (one file, or a model sharded through
// model.safetensors.index.json) and an atomic writer.
//
// Format: u64 little-endian header length N, N bytes of UTF-8 JSON, then the
// data section. The JSON maps each tensor name to {"dtype", "shape",
// "data_offsets": [begin, end]} (offsets relative to the data section) and may
// hold "__metadata__": {string: string}. open() rejects a header longer than
// 100 MB, unknown dtypes, shapes whose byte size differs from end - begin,
// ranges outside the data section and overlapping ranges.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/tensor.h"

namespace sparseflash::checkpoint {

// The dtype for a safetensors dtype name ("F32", "BF16", ...); false if unknown.
bool dtype_from_safetensors_name(const std::string& name, DType* dtype);
// The safetensors dtype name; throws for the GGML block types, which
// safetensors cannot hold.
std::string safetensors_dtype_name(DType dtype);

class SafetensorsFile {
 public:
  // The error names the file and the field at fault.
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> open(const std::string& path);
  // Parses bytes already in memory (the fuzzer's entry point).
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> parse(
      std::shared_ptr<const MappedFile> file);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in file order
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_->path(); }

 private:
  SafetensorsFile() = default;
  static std::shared_ptr<const SafetensorsFile> parse_or_throw(
      const std::shared_ptr<const MappedFile>& file);
  std::shared_ptr<const MappedFile> file_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model: `path` is a .safetensors file, a
// model.safetensors.index.json, or a directory holding either (the index wins).
class SafetensorsModel {
 public:
  static absl::StatusOr<std::shared_ptr<const SafetensorsModel>> open(const std::string& path);

  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  // The shards in the order first listed; metadata() of the first one.
  const std::vector<std::shared_ptr<const SafetensorsFile>>& files() const { return files_; }
  const std::map<std::string, std::string>& metadata() const { return files_.front()->metadata(); }

 private:
  SafetensorsModel() = default;
  static std::shared_ptr<const SafetensorsModel> open_or_throw(const std::string& path);
  std::vector<std::shared_ptr<const SafetensorsFile>> files_;
  std::map<std::string, TensorInfo> tensors_;
};

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
  size_t nbytes;
};

// Writes a safetensors file: to a temporary in the same directory, fsync'd,
// then renamed over `path`, so readers never see a partial file. The header is
// padded with spaces to a multiple of 8 bytes. Refuses empty, reserved or
// duplicate names and sizes that do not match the shape; a failed write leaves
// `path` as it was.
absl::Status write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata);

}  // namespace sparseflash::checkpoint
