// SentencePiece-style tokenizers, where merges are chosen by token score rather than by
// a merge list:
//  - SpmTokenizer: GGUF "llama" vocabularies (Llama 1/2, Mistral, TinyLlama...), encoded
//    as SentencePiece's BPE model does: spaces become U+2581, one is put in front,
//    adjacent symbols whose concatenation is a normal/user-defined/unused token merge,
//    highest score first (leftmost on ties), unused results are split back, characters
//    left unknown become their <0xNN> byte tokens (or the unknown token).
//  - Llama2cTokenizer: llama2.c's tokenizer.bin, encoded as llama2.c's run.c does.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/text.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::tokenizer {

// GGUF tokenizer.ggml.token_type values.
enum TokenType : int32_t {
  kTokenNormal = 1,
  kTokenUnknown = 2,
  kTokenControl = 3,
  kTokenUserDefined = 4,
  kTokenUnused = 5,
  kTokenByte = 6,
};

struct SpmVocab {
  std::vector<std::string> tokens;   // UTF-8, spaces written as U+2581
  std::vector<float> scores;         // same length as tokens
  std::vector<int32_t> types;        // same length, or empty (all normal, <0xNN> bytes)
  int32_t bos_id = -1, eos_id = -1, unk_id = -1;
  bool add_space_prefix = true;      // tokenizer.ggml.add_space_prefix
  bool add_bos = true;               // tokenizer.ggml.add_bos_token
};

// Score-ordered merging shared by both kinds: adjacent symbols whose concatenation is a
// mergeable token merge, highest score first, leftmost on ties, until none is left.
class ScoreMerger {
 public:
  ScoreMerger() = default;
  // mergeable[id]: whether a merge may produce token `id`.
  ScoreMerger(const std::vector<std::string>& tokens, const std::vector<float>& scores,
              const std::vector<bool>& mergeable);
  // The mergeable token spelled `piece`, or -1.
  int32_t find(std::string_view piece) const;
  struct Symbol {
    std::string text;
    int32_t id;   // -1 for a symbol that is no token
  };
  // Merges `symbols` (in order) and returns the final ones. When `split_of` is given,
  // records how each merged piece was made (to split unused tokens back).
  std::vector<Symbol> merge(
      std::vector<Symbol> symbols,
      std::unordered_map<std::string, std::pair<std::string, std::string>>* split_of) const;

 private:
  std::unordered_map<std::string, int32_t> lookup_;
  std::vector<float> scores_;
};

class SpmTokenizer final : public Tokenizer {
 public:
  SpmTokenizer(SpmVocab vocab, const std::string& source);
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string decode_token(int32_t id) const override;
  std::string kind() const override { return "spm"; }

 private:
  void encode_fragment(std::string_view text, std::vector<int32_t>* out) const;
  void emit(std::string_view piece, std::vector<int32_t>* out) const;

  SpmVocab vocab_;
  ScoreMerger merger_;
  std::vector<int32_t> byte_id_;   // byte -> <0xNN> token, -1 when absent
  std::vector<std::string> id_to_text_;   // what each token decodes to
  AddedTokenSplitter specials_;
};

// llama2.c tokenizer.bin: int32 max_token_length, then per token float32 score,
// int32 length, `length` bytes. Ids 0, 1, 2 are <unk>, <s>, </s>; byte b is token b + 3.
class Llama2cTokenizer final : public Tokenizer {
 public:
  // Reads and validates the file; throws naming the file, the token and the field.
  static std::unique_ptr<Llama2cTokenizer> load(const std::string& path);
  // From plain data (tests, or another container).
  Llama2cTokenizer(std::vector<std::string> tokens, std::vector<float> scores,
                   const std::string& source);
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode(const std::vector<int32_t>& ids) const override;
  std::string decode_token(int32_t id) const override;
  std::string kind() const override { return "llama2c"; }

 private:
  std::vector<std::string> tokens_;
  std::vector<float> scores_;
  ScoreMerger merger_;
};

}  // namespace sparseflash::tokenizer
