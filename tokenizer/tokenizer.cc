#include "tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "tokenizer/bpe.h"
#include "tokenizer/byte.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/hf_json.h"
#include "checkpoint/gguf.h"
#include "io/errors.h"
#include "tokenizer/spm.h"

namespace sparseflash::tokenizer {

void Tokenizer::check_id(int32_t id) const {
  if (id < 0 || id >= vocab_size_)
    throw std::out_of_range("token id " + std::to_string(id) + " is outside the vocabulary (size " +
                            std::to_string(vocab_size_) + ")");
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (const int32_t id : ids) out += decode_token(id);
  return out;
}

namespace {
namespace fs = std::filesystem;

enum class FileKind { kGguf, kJson, kOther };

FileKind sniff(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open");
  char head[64] = {};
  in.read(head, sizeof head);
  const std::streamsize n = in.gcount();
  if (n >= 4 && std::string(head, 4) == "GGUF") return FileKind::kGguf;
  for (std::streamsize i = 0; i < n; ++i) {
    const char c = head[i];
    if (c == ' ' || c == '\n' || c == '\r' || c == '\t') continue;
    return c == '{' ? FileKind::kJson : FileKind::kOther;
  }
  return FileKind::kOther;
}

std::unique_ptr<Tokenizer> load_gguf(const std::string& path, const LoadOptions& options) {
  const auto file = io::value_or_throw(checkpoint::GgufFile::open(path));
  return make_gguf_tokenizer(read_gguf_vocab(*file), path, options.gguf_pre_as_transformers);
}

std::unique_ptr<Tokenizer> load_json(const std::string& path) {
  return std::make_unique<BpeTokenizer>(read_hf_tokenizer_json(path), path);
}

// A tokenizer file whose kind is told by its contents.
std::unique_ptr<Tokenizer> load_file(const std::string& path, const LoadOptions& options) {
  switch (sniff(path)) {
    case FileKind::kGguf: return load_gguf(path, options);
    case FileKind::kJson: return load_json(path);
    case FileKind::kOther: break;
  }
  return Llama2cTokenizer::load(path);
}

std::unique_ptr<Tokenizer> load_from_dir(const fs::path& dir) {
  const fs::path json = dir / "tokenizer.json";
  if (fs::is_regular_file(json)) return load_json(json.string());
  throw std::runtime_error(dir.string() + ": no tokenizer.json in this directory; pass --tokenizer "
                           "with a tokenizer.json, a .gguf file or a llama2.c tokenizer.bin");
}

std::unique_ptr<Tokenizer> load_or_throw(const std::string& model_path, const std::string& tokenizer_path,
                                         const LoadOptions& options) {
  if (!tokenizer_path.empty()) {
    if (fs::is_directory(tokenizer_path)) return load_from_dir(tokenizer_path);
    if (!fs::exists(tokenizer_path))
      throw io::StatusError(absl::NotFoundError(tokenizer_path + ": no such tokenizer file"));
    return load_file(tokenizer_path, options);
  }
  if (model_path.empty()) throw std::invalid_argument("load_tokenizer: neither a model nor a tokenizer path given");
  if (fs::is_directory(model_path)) return load_from_dir(model_path);
  if (!fs::exists(model_path))
    throw io::StatusError(absl::NotFoundError(model_path + ": no such file or directory"));
  switch (sniff(model_path)) {
    case FileKind::kGguf: return load_gguf(model_path, options);
    case FileKind::kJson: return load_json(model_path);
    case FileKind::kOther: break;
  }
  // A llama2.c checkpoint: its tokenizer.bin lies beside it, as llama2.c's run expects.
  const fs::path beside = fs::path(model_path).parent_path() / "tokenizer.bin";
  if (fs::is_regular_file(beside) && !fs::equivalent(beside, model_path)) return Llama2cTokenizer::load(beside.string());
  throw std::runtime_error(model_path + ": no tokenizer found (not a .gguf, no tokenizer.bin beside it); "
                           "pass --tokenizer with a tokenizer.json, a .gguf file or a llama2.c tokenizer.bin");
}
}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> load_tokenizer(const std::string& model_path,
                                                          const std::string& tokenizer_path,
                                                          const LoadOptions& options) {
  return io::status_of([&] { return load_or_throw(model_path, tokenizer_path, options); });
}

absl::StatusOr<std::unique_ptr<Tokenizer>> open_tokenizer(const std::string& spec,
                                                          const LoadOptions& options) {
  if (spec == "byte") return std::unique_ptr<Tokenizer>(std::make_unique<ByteTokenizer>());
  if (spec.empty())
    return absl::InvalidArgumentError(
        "no tokenizer given: expected \"byte\", a tokenizer.json, a directory holding one, a .gguf "
        "file or a llama2.c tokenizer.bin");
  return load_tokenizer("", spec, options);
}

}  // namespace sparseflash::tokenizer
