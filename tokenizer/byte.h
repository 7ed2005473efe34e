// The byte tokenizer: each byte of the text is a token (vocabulary 256) and byte 0,
// which text documents never contain, ends a document. Its ids are exactly those of
// the data prepared before the other tokenizers existed, and its identity is "byte".
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace sparseflash::tokenizer {

class ByteTokenizer final : public Tokenizer {
 public:
  ByteTokenizer();
  // add_bos adds nothing: there is no BOS.
  std::vector<int32_t> encode(std::string_view text, bool add_bos) const override;
  // Id 0 (end of document) renders as nothing.
  std::string decode_token(int32_t id) const override;
  std::string kind() const override { return "byte"; }
};

}  // namespace sparseflash::tokenizer
