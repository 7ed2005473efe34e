// libFuzzer target: the HF tokenizer.json reader (with tokenizer_config.json and
// config.json beside it) and, when it accepts the file, the byte-level BPE built
// from it, encoding and decoding a few texts: a hostile vocabulary, merge list,
// added token or split regex could crash there rather than in the reader.
// Input: tokenizer.json [NUL tokenizer_config.json [NUL config.json]] (JSON holds
// no NUL byte). Errors must be std::runtime_error (reader) or
// std::invalid_argument (BpeTokenizer); anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "tokenizer/bpe.h"
#include "tokenizer/hf_json.h"

using namespace sparseflash::tokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view input(reinterpret_cast<const char*>(data), size);
  std::string_view parts[3];
  for (int i = 0; i < 2 && !input.empty(); ++i) {
    const size_t nul = input.find('\0');
    parts[i] = input.substr(0, nul);
    input = nul == std::string_view::npos ? std::string_view() : input.substr(nul + 1);
  }
  parts[2] = input;
  std::unique_ptr<BpeTokenizer> tok;
  try {
    tok = std::make_unique<BpeTokenizer>(
        parse_hf_tokenizer_json("fuzz/tokenizer.json", parts[0], parts[1], parts[2]), "fuzz/tokenizer.json");
  } catch (const std::runtime_error&) {
    return 0;
  } catch (const std::invalid_argument&) {
    return 0;
  }
  const std::string texts[] = {"", "Hello world", "  two  spaces\n\tand 12345 digits", "<s>a</s><|im_start|>",
                               "caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x98\x80", "\xff\xfe\x80 broken utf-8",
                               std::string(parts[0].substr(0, 200))};
  for (const std::string& text : texts) {
    for (const bool add_bos : {false, true}) {
      const std::vector<int32_t> ids = tok->encode(text, add_bos);
      for (const int32_t id : ids)
        if (id < 0 || id >= tok->vocab_size()) __builtin_trap();   // decode would refuse it
      tok->decode(ids);
    }
  }
  for (int32_t id = 0; id < tok->vocab_size() && id < 512; ++id) tok->decode_token(id);
  (void)tok->identity();
  return 0;
}
