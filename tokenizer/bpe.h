// Byte-level BPE (GPT-2, Llama-3, SmolLM, Qwen2): added tokens are cut out first, the
// rest is split by the pre-tokenizer regexes, each piece's bytes start as one symbol
// per byte and are merged by rank (lowest first, leftmost on ties) with a priority
// queue, as HF tokenizers' BPE does. The model works on raw bytes: the vocabulary's
// byte-level characters are mapped back to bytes once, at construction.
#pragma once

#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/pretokenizer.h"
#include "tokenizer/text.h"
#include "tokenizer/tokenizer.h"

namespace sparseflash::tokenizer {

// Plain data of a byte-level BPE tokenizer, however it was stored.
struct BpeVocab {
  std::vector<std::string> tokens;   // id -> token, in byte-level characters ("Ġthe")
  std::vector<std::pair<std::string, std::string>> merges;   // by rank, byte-level characters
  std::vector<AddedToken> added;     // matched in the text before pre-tokenisation
  std::vector<std::string> split_patterns;   // HF regexes, applied in order
  bool add_prefix_space = false;     // HF ByteLevel: a space before each piece not starting with one
  bool ignore_merges = false;        // a piece that is a whole token is that token (Llama-3)
  bool byte_fallback = false;        // a byte missing from the vocabulary becomes <0xNN>
  int32_t unk_id = -1;               // for a byte missing from the vocabulary, else dropped
  std::vector<int32_t> bos_prefix;   // what add_bos prepends
  int32_t bos_id = -1;
  int32_t eos_id = -1;
};

class BpeTokenizer final : public Tokenizer {
 public:
  // Throws std::invalid_argument naming the merge or token at fault; `source` (a file
  // name) starts each message.
  BpeTokenizer(BpeVocab vocab, const std::string& source);

  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  std::string decode_token(int32_t id) const override;
  std::string kind() const override { return "bpe"; }

  // The pieces the pre-tokenizer makes of a text without added tokens (for tests).
  std::vector<std::string> pre_tokenize(std::string_view text) const;

 private:
  void encode_piece(std::string_view piece, std::vector<int32_t>* out) const;
  void merge_word(std::string_view piece, std::vector<int32_t>* out) const;

  std::vector<std::string> id_to_bytes_;
  std::unordered_map<std::string, int32_t> bytes_to_id_;
  std::vector<int32_t> byte_id_;   // byte -> id of the single-byte token, -1 when absent
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  std::unordered_map<uint64_t, Merge> merges_;   // (left id << 32 | right id) -> merge
  AddedTokenSplitter added_;
  PreTokenizer pre_;
  bool add_prefix_space_ = false;
  bool ignore_merges_ = false;
  int32_t unk_id_ = -1;
  std::vector<int32_t> bos_prefix_;

  // Pieces seen before: most text repeats its words.
  mutable std::mutex cache_mutex_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// GGUF "gpt2" vocabularies: tokenizer.ggml.pre names the pre-tokenizer. Known names:
// default, gpt2, llama-bpe, llama3, smollm, qwen2. Throws naming `source` otherwise.
void set_gguf_pre_tokenizer(const std::string& pre, BpeVocab* vocab, const std::string& source);

}  // namespace sparseflash::tokenizer
