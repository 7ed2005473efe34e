// Reading the tokens to evaluate on: text through a tokenizer, or shards.
#include "data/tokens.h"

#include <dirent.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "data/shard.h"

namespace sparseflash::data {

namespace {

namespace fs = std::filesystem;

absl::StatusOr<std::string> read_text_file(const std::string& path, const char* flag) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(flag, ": cannot read ", path));
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Shard files (comma-separated) or a prepared directory (its val_*.bin).
absl::StatusOr<std::vector<int64_t>> read_shards(const std::string& spec, int64_t vocab) {
  std::vector<std::string> paths;
  if (fs::is_directory(spec)) {
    // POSIX listing: std::filesystem's iterators are also exported by
    // libtorch.so, and binding to its copy crashed on the GPU host.
    DIR* dir = opendir(spec.c_str());
    if (dir == nullptr) return absl::NotFoundError(absl::StrCat("--data: cannot list ", spec));
    while (const dirent* e = readdir(dir)) {
      const std::string name = e->d_name;
      if (name.rfind("val_", 0) == 0 && name.size() > 8 &&
          name.compare(name.size() - 4, 4, ".bin") == 0)
        paths.push_back((fs::path(spec) / name).string());
    }
    closedir(dir);
    std::sort(paths.begin(), paths.end());
    if (paths.empty()) return absl::NotFoundError(absl::StrCat("--data: no val_*.bin in ", spec));
  } else {
    paths = absl::StrSplit(spec, ',', absl::SkipEmpty());
  }
  std::vector<int64_t> ids;
  for (const auto& p : paths) {
    auto shard = Shard::open(p);
    if (!shard.ok()) return shard.status();
    if (shard->vocab_size() > vocab)
      return absl::InvalidArgumentError(absl::StrCat(
          "--data: ", p, " holds ids of a vocabulary of ", shard->vocab_size(),
          ", the model has ", vocab));
    const size_t at = ids.size();
    ids.resize(at + shard->size());
    shard->read(0, shard->size(), ids.data() + at);
  }
  return ids;
}

}  // namespace

absl::StatusOr<Tokens> read_tokens(const TokenSource& source, const tokenizer::Tokenizer* tokenizer,
                                   int64_t vocab_size) {
  const bool from_text = !source.text.empty(), from_data = !source.shards.empty();
  if (from_text == from_data)
    return absl::InvalidArgumentError("give exactly one of --text FILE or --data SHARDS");
  Tokens t;
  if (from_text) {
    t.source = source.text;
    auto text = read_text_file(source.text, "--text");
    if (!text.ok()) return text.status();
    if (!tokenizer) return absl::InternalError("--text needs the model's tokenizer loaded");
    const auto start = std::chrono::steady_clock::now();
    auto encoded = tokenizer->encode(*text, /*add_bos=*/true);
    t.ids.assign(encoded.begin(), encoded.end());
    t.text_bytes = static_cast<int64_t>(text->size());
    t.encode_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  } else {
    t.source = source.shards;
    auto read = read_shards(source.shards, vocab_size);
    if (!read.ok()) return read.status();
    t.ids = std::move(*read);
  }
  if (source.max_tokens > 0 && static_cast<int64_t>(t.ids.size()) > source.max_tokens)
    t.ids.resize(source.max_tokens);
  return t;
}

}  // namespace sparseflash::data
