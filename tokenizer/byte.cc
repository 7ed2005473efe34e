#include "tokenizer/byte.h"

namespace sparseflash::tokenizer {

ByteTokenizer::ByteTokenizer() {
  vocab_size_ = 256;
  eos_id_ = 0;
  identity_ = "byte";
}

std::vector<int32_t> ByteTokenizer::encode(std::string_view text, bool /*add_bos*/) const {
  std::vector<int32_t> ids(text.size());
  // Through unsigned char: bytes >= 0x80 must map to 128..255, not negatives.
  for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
  return ids;
}

std::string ByteTokenizer::decode_token(int32_t id) const {
  check_id(id);
  if (id == eos_id_) return "";
  return std::string(1, static_cast<char>(static_cast<unsigned char>(id)));
}

}  // namespace sparseflash::tokenizer
