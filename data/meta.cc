// meta.json: written by prepare (meta_json), read by every user of prepared data.
#include "data/meta.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "data/files.h"
#include "nlohmann/json.hpp"

namespace sparseflash::data {

using files::join_path;
using files::read_file;

double Meta::bytes_per_token() const {
  const uint64_t tokens = train_tokens + val_tokens;
  return tokens == 0 ? 0.0 : static_cast<double>(train_bytes + val_bytes) / tokens;
}

namespace {

nlohmann::ordered_json meta_to_json(const Meta& m) {
  nlohmann::ordered_json j;
  j["format"] = "sparseflash-shards";
  j["version"] = 1;
  j["tokenizer"] = m.tokenizer;
  j["tokenizer_source"] = m.tokenizer_source;
  j["tokenizer_kind"] = m.tokenizer_kind;
  j["vocab_size"] = m.vocab_size;
  j["document_separator"] = m.document_separator;
  j["add_bos"] = m.add_bos;
  j["train"] = {{"tokens", m.train_tokens},
                {"documents", m.train_documents},
                {"bytes", m.train_bytes},
                {"shards", m.train_shards}};
  j["val"] = {{"tokens", m.val_tokens},
              {"documents", m.val_documents},
              {"bytes", m.val_bytes},
              {"shards", m.val_shards}};
  j["skipped_documents"] = m.skipped_documents;
  if (m.min_document_tokens > 0) {
    j["min_document_tokens"] = m.min_document_tokens;
    j["short_documents"] = m.short_documents;
  }
  j["unigram_bits_per_byte"] = m.unigram_bits_per_byte;
  return j;
}

// Typed access to meta.json with errors that name the file and the key.
class MetaReader {
 public:
  explicit MetaReader(std::string file) : file_(std::move(file)) {}

  absl::StatusOr<const nlohmann::json*> field(const nlohmann::json& obj, const std::string& key,
                                              const std::string& full_key) const {
    auto it = obj.find(key);
    if (it == obj.end()) return error(full_key, "is missing");
    return &*it;
  }
  absl::StatusOr<uint64_t> u64(const nlohmann::json& obj, const std::string& key,
                               const std::string& prefix = "") const {
    auto f = field(obj, key, prefix + key);
    if (!f.ok()) return f.status();
    if (!(*f)->is_number_unsigned() && !((*f)->is_number_integer() && (*f)->get<int64_t>() >= 0)) {
      return error(prefix + key, "must be a non-negative integer");
    }
    return (*f)->get<uint64_t>();
  }
  absl::StatusOr<std::string> str(const nlohmann::json& obj, const std::string& key) const {
    auto f = field(obj, key, key);
    if (!f.ok()) return f.status();
    if (!(*f)->is_string()) return error(key, "must be a string");
    return (*f)->get<std::string>();
  }
  // A key that older meta.json files lack: `fallback` when absent.
  absl::StatusOr<std::string> optional_str(const nlohmann::json& obj, const std::string& key,
                                           const std::string& fallback) const {
    if (!obj.contains(key)) return fallback;
    return str(obj, key);
  }
  absl::StatusOr<int64_t> optional_int(const nlohmann::json& obj, const std::string& key,
                                       int64_t fallback) const {
    if (!obj.contains(key)) return fallback;
    if (!obj.at(key).is_number_integer()) return error(key, "must be an integer");
    return obj.at(key).get<int64_t>();
  }
  absl::StatusOr<bool> optional_bool(const nlohmann::json& obj, const std::string& key,
                                     bool fallback) const {
    if (!obj.contains(key)) return fallback;
    if (!obj.at(key).is_boolean()) return error(key, "must be true or false");
    return obj.at(key).get<bool>();
  }
  absl::StatusOr<double> number(const nlohmann::json& obj, const std::string& key) const {
    auto f = field(obj, key, key);
    if (!f.ok()) return f.status();
    if (!(*f)->is_number()) return error(key, "must be a number");
    return (*f)->get<double>();
  }
  absl::Status error(const std::string& key, const std::string& what) const {
    return absl::DataLossError(absl::StrCat(file_, ": key \"", key, "\" ", what));
  }

  // Reads one split object into the Meta fields passed by pointer.
  absl::Status split(const nlohmann::json& root, const std::string& name, uint64_t* tokens,
                     uint64_t* documents, uint64_t* bytes, std::vector<std::string>* shards) const {
    auto f = field(root, name, name);
    if (!f.ok()) return f.status();
    const nlohmann::json& s = **f;
    if (!s.is_object()) return error(name, "must be an object");
    const std::string prefix = name + ".";
    auto t = u64(s, "tokens", prefix);
    if (!t.ok()) return t.status();
    auto d = u64(s, "documents", prefix);
    if (!d.ok()) return d.status();
    auto b = u64(s, "bytes", prefix);
    if (!b.ok()) return b.status();
    auto sh = field(s, "shards", prefix + "shards");
    if (!sh.ok()) return sh.status();
    if (!(*sh)->is_array()) return error(prefix + "shards", "must be an array of file names");
    shards->clear();
    for (const auto& e : **sh) {
      // Plain file names only: meta.json must not point outside its directory.
      if (!e.is_string() || e.get<std::string>().empty() ||
          e.get<std::string>().find('/') != std::string::npos) {
        return error(prefix + "shards", "must be an array of file names (no '/')");
      }
      shards->push_back(e.get<std::string>());
    }
    *tokens = *t;
    *documents = *d;
    *bytes = *b;
    return absl::OkStatus();
  }

 private:
  std::string file_;
};

}  // namespace

std::string meta_json(const Meta& meta) { return meta_to_json(meta).dump(2) + "\n"; }

absl::StatusOr<Meta> read_meta(const std::string& dir) {
  const std::string file = join_path(dir, "meta.json");
  auto text = read_file(file);
  if (!text.ok()) {
    return absl::Status(text.status().code(),
                        absl::StrCat(text.status().message(),
                                     " (is this a directory written by `sparseflash prepare`?)"));
  }
  nlohmann::json root = nlohmann::json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::DataLossError(absl::StrCat(file, ": not valid JSON"));
  if (!root.is_object()) return absl::DataLossError(absl::StrCat(file, ": not a JSON object"));
  MetaReader r(file);

  auto format = r.str(root, "format");
  if (!format.ok()) return format.status();
  if (*format != "sparseflash-shards") {
    return r.error("format", absl::StrCat("is \"", *format, "\", expected \"sparseflash-shards\""));
  }
  auto version = r.u64(root, "version");
  if (!version.ok()) return version.status();
  if (*version != 1) return r.error("version", absl::StrCat("is ", *version, ", this build reads 1"));

  Meta m;
  auto tokenizer = r.str(root, "tokenizer");
  if (!tokenizer.ok()) return tokenizer.status();
  m.tokenizer = *tokenizer;
  auto vocab = r.u64(root, "vocab_size");
  if (!vocab.ok()) return vocab.status();
  if (*vocab == 0 || *vocab > static_cast<uint64_t>(INT32_MAX)) {
    return r.error("vocab_size", "must be in [1, 2^31)");
  }
  m.vocab_size = static_cast<int>(*vocab);
  // Written since prepare took tokenizer files; before, every tokenizer was "byte".
  const bool byte = m.tokenizer == "byte";
  auto source = r.optional_str(root, "tokenizer_source", byte ? "byte" : "");
  if (!source.ok()) return source.status();
  m.tokenizer_source = *source;
  auto kind = r.optional_str(root, "tokenizer_kind", byte ? "byte" : "");
  if (!kind.ok()) return kind.status();
  m.tokenizer_kind = *kind;
  auto separator = r.optional_int(root, "document_separator", byte ? 0 : -1);
  if (!separator.ok()) return separator.status();
  if (*separator < -1 || *separator >= m.vocab_size)
    return r.error("document_separator", absl::StrCat("is ", *separator, ", outside the vocabulary of ",
                                                      m.vocab_size, " tokens"));
  m.document_separator = *separator;
  auto add_bos = r.optional_bool(root, "add_bos", false);
  if (!add_bos.ok()) return add_bos.status();
  m.add_bos = *add_bos;
  absl::Status s = r.split(root, "train", &m.train_tokens, &m.train_documents, &m.train_bytes,
                           &m.train_shards);
  if (!s.ok()) return s;
  s = r.split(root, "val", &m.val_tokens, &m.val_documents, &m.val_bytes, &m.val_shards);
  if (!s.ok()) return s;
  auto skipped = r.u64(root, "skipped_documents");
  if (!skipped.ok()) return skipped.status();
  m.skipped_documents = *skipped;
  for (auto [key, target] : {std::pair{"min_document_tokens", &m.min_document_tokens},
                             std::pair{"short_documents", &m.short_documents}}) {
    if (!root.contains(key)) continue;
    auto v = r.u64(root, key);
    if (!v.ok()) return v.status();
    *target = *v;
  }
  auto bpb = r.number(root, "unigram_bits_per_byte");
  if (!bpb.ok()) return bpb.status();
  m.unigram_bits_per_byte = *bpb;
  return m;
}

absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> open_data_tokenizer(const Meta& meta) {
  if (meta.tokenizer_source.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the prepared data's tokenizer \"", meta.tokenizer,
        "\" cannot be opened: its meta.json does not say where it came from (no "
        "\"tokenizer_source\"); prepare the data again"));
  }
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> opened =
      tokenizer::open_tokenizer(meta.tokenizer_source);
  if (!opened.ok()) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot open the tokenizer the data was prepared with: ", opened.status().message()));
  }
  std::unique_ptr<tokenizer::Tokenizer> tok = *std::move(opened);
  if (tok->identity() != meta.tokenizer) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the tokenizer ", meta.tokenizer_source, " is now ", tok->identity(),
        ", but the data was prepared with ", meta.tokenizer,
        ": the file changed since `sparseflash prepare`; restore it or prepare the data again"));
  }
  return tok;
}

}  // namespace sparseflash::data
