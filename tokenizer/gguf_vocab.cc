#include "tokenizer/gguf_vocab.h"

#include <stdexcept>

#include "tokenizer/bpe.h"
#include "tokenizer/spm.h"

namespace sparseflash::tokenizer {

std::unique_ptr<Tokenizer> make_gguf_tokenizer(const GgufVocab& v, const std::string& source,
                                               bool pre_as_transformers) {
  const auto fail = [&](const std::string& what) { throw std::invalid_argument(source + ": " + what); };
  if (v.tokens.empty()) fail("tokenizer.ggml.tokens is missing or empty");
  if (!v.types.empty() && v.types.size() != v.tokens.size())
    fail("tokenizer.ggml.token_type has " + std::to_string(v.types.size()) + " entries, tokenizer.ggml.tokens " +
         std::to_string(v.tokens.size()));
  if (v.model == "gpt2") {
    BpeVocab bpe;
    bpe.tokens = v.tokens;
    set_gguf_pre_tokenizer(pre_as_transformers || v.pre.empty() ? "default" : v.pre, &bpe, source);
    bpe.merges.reserve(v.merges.size());
    for (size_t i = 0; i < v.merges.size(); ++i) {
      const std::string& m = v.merges[i];
      const size_t space = m.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 >= m.size() ||
          m.find(' ', space + 1) != std::string::npos)
        fail("tokenizer.ggml.merges[" + std::to_string(i) + "] is \"" + m + "\", expected \"left right\"");
      bpe.merges.emplace_back(m.substr(0, space), m.substr(space + 1));
    }
    // Control and user-defined tokens are written literally in text (chat templates).
    for (size_t id = 0; id < v.types.size(); ++id)
      if (v.types[id] == kTokenControl || v.types[id] == kTokenUserDefined) {
        std::string text;
        byte_level_to_bytes(v.tokens[id], &text);
        bpe.added.push_back({text, static_cast<int32_t>(id)});
      }
    bpe.unk_id = v.unk_id;
    bpe.bos_id = v.bos_id;
    bpe.eos_id = v.eos_id;
    if (v.add_bos.value_or(false)) {
      if (v.bos_id < 0) fail("tokenizer.ggml.add_bos_token is true but tokenizer.ggml.bos_token_id is missing");
      bpe.bos_prefix = {v.bos_id};
    }
    return std::make_unique<BpeTokenizer>(std::move(bpe), source);
  }
  if (v.model == "llama") {
    SpmVocab spm;
    spm.tokens = v.tokens;
    spm.scores = v.scores;
    if (spm.scores.empty()) fail("tokenizer.ggml.scores is missing (needed by the llama tokenizer)");
    spm.types = v.types;
    spm.bos_id = v.bos_id;
    spm.eos_id = v.eos_id;
    spm.unk_id = v.unk_id;
    spm.add_bos = v.add_bos.value_or(true);
    spm.add_space_prefix = v.add_space_prefix.value_or(true);
    return std::make_unique<SpmTokenizer>(std::move(spm), source);
  }
  fail("tokenizer.ggml.model \"" + v.model + "\" is not supported (supported: gpt2, llama)");
  return nullptr;
}

}  // namespace sparseflash::tokenizer
