// read_gguf_vocab: the glue between checkpoint::GgufFile and GgufVocab.
#include <cstdint>
#include <stdexcept>

#include "checkpoint/gguf.h"
#include "tokenizer/gguf_vocab.h"

namespace sparseflash::tokenizer {

GgufVocab read_gguf_vocab(const checkpoint::GgufFile& file) {
  GgufVocab v;
  if (!file.has("tokenizer.ggml.model"))
    throw std::runtime_error(file.path() + ": no embedded tokenizer (tokenizer.ggml.model is missing); "
                             "pass a tokenizer.json with --tokenizer");
  v.model = file.get_string("tokenizer.ggml.model");
  if (file.has("tokenizer.ggml.pre")) v.pre = file.get_string("tokenizer.ggml.pre");
  v.tokens = file.get_string_array("tokenizer.ggml.tokens");
  if (file.has("tokenizer.ggml.scores"))
    for (const double s : file.get_float_array("tokenizer.ggml.scores")) v.scores.push_back(static_cast<float>(s));
  if (file.has("tokenizer.ggml.token_type"))
    for (const int64_t t : file.get_int_array("tokenizer.ggml.token_type"))
      v.types.push_back(t < INT32_MIN || t > INT32_MAX ? -1 : static_cast<int32_t>(t));
  if (file.has("tokenizer.ggml.merges")) v.merges = file.get_string_array("tokenizer.ggml.merges");
  const auto id = [&](const char* key) -> int32_t {
    if (!file.has(key)) return -1;
    const int64_t value = file.get_int(key);
    if (value < 0 || value >= static_cast<int64_t>(v.tokens.size()))
      throw std::runtime_error(file.path() + ": " + key + " is " + std::to_string(value) +
                               ", outside the vocabulary of " + std::to_string(v.tokens.size()) + " tokens");
    return static_cast<int32_t>(value);
  };
  v.bos_id = id("tokenizer.ggml.bos_token_id");
  v.eos_id = id("tokenizer.ggml.eos_token_id");
  v.unk_id = id("tokenizer.ggml.unknown_token_id");
  if (file.has("tokenizer.ggml.add_bos_token")) v.add_bos = file.get_bool("tokenizer.ggml.add_bos_token");
  if (file.has("tokenizer.ggml.add_space_prefix"))
    v.add_space_prefix = file.get_bool("tokenizer.ggml.add_space_prefix");
  return v;
}

}  // namespace sparseflash::tokenizer
