// The tokenizer embedded in a GGUF file (tokenizer.ggml.* metadata), from plain data so
// that it does not depend on how the file is read; read_gguf_vocab fills it from a
// checkpoint::GgufFile.
#pragma once

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace sparseflash::checkpoint {
class GgufFile;
}

namespace sparseflash::tokenizer {

struct GgufVocab {
  std::string model;                 // tokenizer.ggml.model: "gpt2" or "llama"
  std::string pre;                   // tokenizer.ggml.pre ("" when absent: "default")
  std::vector<std::string> tokens;   // tokenizer.ggml.tokens
  std::vector<float> scores;         // tokenizer.ggml.scores (llama; optional for gpt2)
  std::vector<int32_t> types;        // tokenizer.ggml.token_type (optional)
  std::vector<std::string> merges;   // tokenizer.ggml.merges, "left right" (gpt2)
  int32_t bos_id = -1, eos_id = -1, unk_id = -1;   // tokenizer.ggml.{bos,eos,unknown}_token_id
  std::optional<bool> add_bos;              // tokenizer.ggml.add_bos_token
  std::optional<bool> add_space_prefix;     // tokenizer.ggml.add_space_prefix
};

// Throws std::invalid_argument starting with `source` and naming the key at fault.
// pre_as_transformers: see LoadOptions::gguf_pre_as_transformers.
std::unique_ptr<Tokenizer> make_gguf_tokenizer(const GgufVocab& vocab, const std::string& source,
                                               bool pre_as_transformers = false);

// Throws std::runtime_error naming the file and the key.
GgufVocab read_gguf_vocab(const checkpoint::GgufFile& file);

}  // namespace sparseflash::tokenizer
