// libFuzzer target: the GGUF parser, every metadata getter on every key, and
// the GGUF-to-Llama mapping.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "checkpoint/gguf.h"
#include "checkpoint/llama.h"

using namespace sparseflash::checkpoint;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // A malformed file is an error status; any exception escaping the parser
  // (io::status_of lets std::logic_error and kin through), any sanitizer report
  // or any crash is a bug.
  auto parsed = GgufFile::parse(MappedFile::from_bytes("fuzz.gguf", data, size));
  if (!parsed.ok()) return 0;
  const std::shared_ptr<const GgufFile> g = *parsed;
  for (const auto& [key, value] : g->metadata()) {
    // Each getter either returns or throws runtime_error for the wrong type.
    try { g->get_string(key); } catch (const std::runtime_error&) {}
    try { g->get_int(key); } catch (const std::runtime_error&) {}
    try { g->get_float(key); } catch (const std::runtime_error&) {}
    try { g->get_bool(key); } catch (const std::runtime_error&) {}
    try { g->get_string_array(key); } catch (const std::runtime_error&) {}
    try { g->get_int_array(key); } catch (const std::runtime_error&) {}
    try { g->get_float_array(key); } catch (const std::runtime_error&) {}
    try { g->describe(key); } catch (const std::runtime_error&) {}
  }
  for (const TensorInfo& t : g->tensors()) {
    if (g->find(t.name) != &t) __builtin_trap();
    if (t.numel() <= (1 << 16)) to_float32(t);
  }
  absl::StatusOr<LlamaCheckpoint> ckpt = gguf_llama(g);
  if (ckpt.ok()) llama_identity(*ckpt);
  return 0;
}
