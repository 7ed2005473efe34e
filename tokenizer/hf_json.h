// HF tokenizer.json (byte-level BPE) into BpeVocab. Reads tokenizer_config.json and
// config.json beside it, when present, for the BOS/EOS tokens.
#pragma once

#include <string>
#include <string_view>

#include "tokenizer/bpe.h"

namespace sparseflash::tokenizer {

// Throws std::runtime_error naming the file and the JSON field at fault, also for
// tokenizers that are not byte-level BPE (WordPiece, Unigram, Metaspace...).
BpeVocab read_hf_tokenizer_json(const std::string& path);

// The same from the files' contents (the fuzzer's entry point): `path` names
// tokenizer.json in messages and is not opened; tokenizer_config and model_config
// are the texts of tokenizer_config.json and config.json beside it, empty when absent.
BpeVocab parse_hf_tokenizer_json(const std::string& path, std::string_view text,
                                 std::string_view tokenizer_config = {},
                                 std::string_view model_config = {});

}  // namespace sparseflash::tokenizer
