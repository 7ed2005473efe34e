// Tokenizers: the interface that `prepare`, the trainer and the Llama commands use, and
// open_tokenizer / load_tokenizer, which pick the implementation from what is given
// (docs/llama.md, "Tokenizers").
//   "byte"                       -> bytes are tokens, byte 0 ends a document   (byte.h)
//   tokenizer.json (HF)          -> byte-level BPE            (bpe.h, hf_json.h)
//   GGUF tokenizer.ggml.model    -> "gpt2": byte-level BPE, "llama": SentencePiece (spm.h)
//   llama2.c tokenizer.bin       -> llama2.c's greedy score merges               (spm.h)
// Torch-free. load_tokenizer and open_tokenizer return absl::StatusOr whose message names
// the file and the field at fault (io/errors.h); the readers behind them (bpe.h, spm.h,
// hf_json.h, gguf_vocab.h, pretokenizer.h) throw and are converted there.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace sparseflash::tokenizer {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Text (UTF-8; invalid bytes are kept as byte tokens where the vocabulary can hold
  // them) to ids. Special tokens written in the text ("<|im_start|>") become their ids,
  // as transformers and llama.cpp do. add_bos prepends what the tokenizer's own
  // configuration puts at the start of a sequence (HF post-processor template, GGUF
  // tokenizer.ggml.add_bos_token, always <s> for llama2.c); with a configuration
  // that asks for nothing, add_bos adds nothing (see adds_bos()).
  virtual std::vector<int32_t> encode(std::string_view text, bool add_bos) const = 0;

  // Ids to text: the exact bytes the tokens stand for (no lossy UTF-8 repair, so
  // decode(encode(s)) == s for byte-level tokenizers). SentencePiece-style tokenizers
  // drop the one space their encoder adds in front, and render control tokens
  // (<s>, </s>) as nothing. Ids outside [0, vocab_size) throw.
  virtual std::string decode(const std::vector<int32_t>& ids) const;

  // One token's bytes as it appears inside a text (for streaming output; no removal of
  // the leading space; control tokens of SentencePiece vocabularies render as nothing).
  virtual std::string decode_token(int32_t id) const = 0;

  // "byte", "bpe", "spm" or "llama2c".
  virtual std::string kind() const = 0;

  // What prepared data and checkpoints record to say which tokenizer made their ids:
  // "byte" for the byte tokenizer, else "<kind>:<vocab_size>:fnv1a64:<16 hex digits>",
  // a hash of everything that changes encoding or decoding (every token's bytes in id
  // order, merges or scores and token types, added and special tokens, the BOS prefix,
  // the pre-tokenizer). The same file loaded twice, from any path, gives the same
  // identity; a tokenizer.json and the GGUF of the same model may differ.
  const std::string& identity() const { return identity_; }

  int32_t bos_id() const { return bos_id_; }   // -1 when the tokenizer has none
  int32_t eos_id() const { return eos_id_; }   // -1 when the tokenizer has none
  int64_t vocab_size() const { return vocab_size_; }
  bool adds_bos() const { return adds_bos_; }   // whether encode(text, true) adds anything

 protected:
  void check_id(int32_t id) const;   // throws naming the id and vocab_size
  int32_t bos_id_ = -1;
  int32_t eos_id_ = -1;
  int64_t vocab_size_ = 0;
  bool adds_bos_ = false;
  std::string identity_;   // set by each constructor (identity.h)
};

struct LoadOptions {
  // GGUF "gpt2" vocabularies: ignore tokenizer.ggml.pre and split with GPT-2's regex,
  // as transformers' GGUF loader does. Off by default: the model's own tokenizer is what
  // tokenizer.ggml.pre names (SmolLM2 splits digits one by one; docs/llama.md).
  bool gguf_pre_as_transformers = false;
};

// model_path: an HF model directory (tokenizer.json inside), a .gguf file (its embedded
// vocabulary), a llama2.c checkpoint .bin (tokenizer.bin beside it), or a tokenizer.json.
// tokenizer_path, when not empty, wins: a tokenizer.json, a directory holding one, a
// .gguf file, or a llama2.c tokenizer.bin (the kind is detected from the contents).
absl::StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& model_path,
                                                          const std::string& tokenizer_path,
                                                          const LoadOptions& options = {});

// A tokenizer named the way `sparseflash prepare --tokenizer` names it: "byte" (the byte
// tokenizer; write "./byte" for a file of that name), or a tokenizer.json, a directory
// holding one, a .gguf file or a llama2.c tokenizer.bin. The error names the file
// (NotFound when it does not exist).
absl::StatusOr<std::unique_ptr<Tokenizer>> open_tokenizer(const std::string& spec,
                                                          const LoadOptions& options = {});

}  // namespace sparseflash::tokenizer
