// libFuzzer target: the llama2.c checkpoint parser (legacy and "ak42" v1).
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "checkpoint/llama.h"

using namespace sparseflash::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A malformed file is an error status; any exception, sanitizer report or
  // crash is a bug.
  absl::StatusOr<LlamaCheckpoint> ckpt = parse_llama2c(MappedFile::from_bytes("fuzz.bin", data, size));
  if (!ckpt.ok()) return 0;
  for (const auto& [name, t] : ckpt->tensors) {
    if (t.numel() <= (1 << 16)) to_float32(t);
  }
  llama_identity(*ckpt);
  return 0;
}
