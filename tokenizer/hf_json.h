// HF tokenizer.json (byte-level BPE) into BpeVocab. Reads tokenizer_config.json and
// config.json beside it, when present, for the BOS/EOS tokens.
#pragma once

#include <string>

#include "tokenizer/bpe.h"

namespace sparseflash::tokenizer {

// Throws std::runtime_error naming the file and the JSON field at fault, also for
// tokenizers that are not byte-level BPE (WordPiece, Unigram, Metaspace...).
BpeVocab read_hf_tokenizer_json(const std::string& path);

}  // namespace sparseflash::tokenizer
