// libFuzzer target: the SAAP index reader (saap/index_file.h: safetensors
// container, base64 SaapHeader protobuf in the metadata, header checks, every
// tensor's name, dtype, shape and values) without LibTorch; read_saap_index
// only wraps the buffers it fills into tensors. Errors must be a Status (the
// container parser's too); any exception is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "saap/index_file.h"

using namespace sparseflash;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto parsed =
      checkpoint::SafetensorsFile::parse(checkpoint::MappedFile::from_bytes("fuzz.saap", data, size));
  if (!parsed.ok()) return 0;
  const std::shared_ptr<const checkpoint::SafetensorsFile> file = *parsed;
  std::vector<std::vector<float>> buffers;
  absl::StatusOr<saap::SaapHeader> header = saap::read_saap_file(
      *file, "fuzz.saap", [&](size_t, const std::string&, const std::vector<int64_t>& shape) {
        buffers.emplace_back(static_cast<size_t>(checkpoint::shape_numel(shape)));
        return buffers.back().data();
      });
  if (header.ok() && buffers.size() != header->num_layers() * saap::saap_tensor_suffixes(*header).size())
    __builtin_trap();
  return 0;
}
