// libFuzzer target: the safetensors header parser (and the HF config.json
// parser, which reads the same kind of JSON). A malformed input is an error
// status; any exception, any sanitizer report or any crash is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/llama.h"
#include "checkpoint/safetensors.h"

using namespace sparseflash::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto file = SafetensorsFile::parse(MappedFile::from_bytes("fuzz.safetensors", data, size));
  if (file.ok()) {
    for (const TensorInfo& t : (*file)->tensors()) {
      if ((*file)->find(t.name) != &t) __builtin_trap();
      if (t.numel() <= (1 << 16)) to_float32(t);
    }
    for (const auto& kv : (*file)->metadata()) (void)kv.second.size();
  }
  (void)llama_config_from_json("fuzz.json", std::string(reinterpret_cast<const char*>(data), size));
  return 0;
}
