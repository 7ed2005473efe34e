#include "tokenizer/hf_json.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <stdexcept>
#include <string_view>

#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace sparseflash::tokenizer {

namespace {
using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
}

json parse_json(const std::string& path, std::string_view text) {
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON: " + e.what());
  }
}

class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}
  [[noreturn]] void fail(const std::string& field, const std::string& what) const {
    throw std::runtime_error(path_ + ": " + field + ": " + what);
  }
  const json& need(const json& obj, const std::string& key, const std::string& field) const {
    if (!obj.is_object() || !obj.contains(key)) fail(field, "missing \"" + key + "\"");
    return obj.at(key);
  }
  std::string string_of(const json& v, const std::string& field) const {
    if (!v.is_string()) fail(field, "expected a string, found " + v.dump().substr(0, 80));
    return v.get<std::string>();
  }
  bool bool_or(const json& obj, const std::string& key, bool fallback, const std::string& field) const {
    if (!obj.is_object() || !obj.contains(key) || obj.at(key).is_null()) return fallback;
    if (!obj.at(key).is_boolean()) fail(field + "." + key, "expected true or false");
    return obj.at(key).get<bool>();
  }
  int32_t id_of(const json& v, const std::string& field) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= INT32_MAX)
      fail(field, "expected a token id (integer 0..2^31-2), found " + v.dump().substr(0, 80));
    return static_cast<int32_t>(v.get<int64_t>());
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct PreTokenizerSpec {
  std::vector<std::string> patterns;
  bool byte_level = false;
  bool add_prefix_space = false;
};

void read_pre_tokenizer(const Reader& r, const json& node, const std::string& field,
                        PreTokenizerSpec* spec) {
  const std::string type = r.string_of(r.need(node, "type", field), field + ".type");
  if (type == "Sequence") {
    const json& steps = r.need(node, "pretokenizers", field);
    if (!steps.is_array()) r.fail(field + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < steps.size(); ++i)
      read_pre_tokenizer(r, steps[i], field + ".pretokenizers[" + std::to_string(i) + "]", spec);
  } else if (type == "ByteLevel") {
    if (spec->byte_level) r.fail(field, "a second ByteLevel step");
    spec->byte_level = true;
    spec->add_prefix_space = r.bool_or(node, "add_prefix_space", false, field);
    if (spec->add_prefix_space && !spec->patterns.empty())
      r.fail(field, "add_prefix_space after other splits is not supported");
    if (r.bool_or(node, "use_regex", true, field)) spec->patterns.push_back(kGpt2Pattern);
  } else if (type == "Split") {
    const json& pattern = r.need(node, "pattern", field);
    std::string regex;
    if (pattern.is_object() && pattern.contains("Regex")) {
      regex = r.string_of(pattern.at("Regex"), field + ".pattern.Regex");
    } else if (pattern.is_object() && pattern.contains("String")) {
      regex = RE2::QuoteMeta(r.string_of(pattern.at("String"), field + ".pattern.String"));
    } else {
      r.fail(field + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    const std::string behavior = r.string_of(r.need(node, "behavior", field), field + ".behavior");
    if (behavior != "Isolated")
      r.fail(field + ".behavior", "\"" + behavior + "\" is not supported (only Isolated)");
    if (r.bool_or(node, "invert", false, field)) r.fail(field + ".invert", "true is not supported");
    spec->patterns.push_back(regex);
  } else if (type == "Digits") {
    spec->patterns.push_back(r.bool_or(node, "individual_digits", false, field) ? R"(\p{N})" : R"(\p{N}+)");
  } else {
    r.fail(field + ".type", "pre-tokenizer \"" + type +
                                "\" is not supported (byte-level BPE: ByteLevel, Split, Digits, Sequence)");
  }
}

bool has_byte_level_decoder(const Reader& r, const json& node) {
  if (!node.is_object() || !node.contains("type")) return false;
  const std::string type = r.string_of(node.at("type"), "decoder.type");
  if (type == "ByteLevel") return true;
  if (type == "Sequence" && node.contains("decoders") && node.at("decoders").is_array())
    for (const json& d : node.at("decoders"))
      if (has_byte_level_decoder(r, d)) return true;
  return false;
}

// Ids the post-processor puts before the text of a single sequence.
void read_post_processor(const Reader& r, const json& node, const std::string& field,
                         std::vector<int32_t>* prefix) {
  if (node.is_null()) return;
  const std::string type = r.string_of(r.need(node, "type", field), field + ".type");
  if (type == "ByteLevel") return;
  if (type == "Sequence") {
    const json& steps = r.need(node, "processors", field);
    if (!steps.is_array()) r.fail(field + ".processors", "expected an array");
    for (size_t i = 0; i < steps.size(); ++i)
      read_post_processor(r, steps[i], field + ".processors[" + std::to_string(i) + "]", prefix);
    return;
  }
  if (type == "TemplateProcessing") {
    const json& single = r.need(node, "single", field);
    const json& specials = r.need(node, "special_tokens", field);
    if (!single.is_array()) r.fail(field + ".single", "expected an array");
    for (size_t i = 0; i < single.size(); ++i) {
      const std::string item = field + ".single[" + std::to_string(i) + "]";
      if (single[i].is_object() && single[i].contains("Sequence")) break;   // $A: the text
      if (!single[i].is_object() || !single[i].contains("SpecialToken"))
        r.fail(item, "expected {\"SpecialToken\": ...} or {\"Sequence\": ...}");
      const std::string name = r.string_of(r.need(single[i].at("SpecialToken"), "id", item), item + ".id");
      const json& entry = r.need(specials, name, field + ".special_tokens");
      const json& ids = r.need(entry, "ids", field + ".special_tokens." + name);
      if (!ids.is_array()) r.fail(field + ".special_tokens." + name + ".ids", "expected an array");
      for (const json& id : ids) prefix->push_back(r.id_of(id, field + ".special_tokens." + name + ".ids"));
    }
    return;
  }
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    const json& cls = r.need(node, "cls", field);
    if (!cls.is_array() || cls.size() != 2) r.fail(field + ".cls", "expected [token, id]");
    prefix->push_back(r.id_of(cls[1], field + ".cls[1]"));
    return;
  }
  r.fail(field + ".type", "post-processor \"" + type + "\" is not supported");
}

// "bos_token": "<s>" or {"content": "<s>", ...} in tokenizer_config.json.
std::string special_token_text(const json& config, const std::string& key) {
  if (!config.is_object() || !config.contains(key)) return "";
  const json& v = config.at(key);
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v.at("content").is_string())
    return v.at("content").get<std::string>();
  return "";
}

int32_t first_id(const json& config, const std::string& key) {
  if (!config.is_object() || !config.contains(key)) return -1;
  const json& v = config.at(key);
  const json& first = v.is_array() && !v.empty() ? v[0] : v;
  if (!first.is_number_integer() || first.get<int64_t>() < 0 || first.get<int64_t>() >= INT32_MAX) return -1;
  return static_cast<int32_t>(first.get<int64_t>());
}

// tokenizer.json as `root`. read_configs gives tokenizer_config.json and config.json
// beside it (null when absent); it runs after tokenizer.json is checked, so that its
// errors come first.
using ConfigReader = std::function<void(json* tokenizer_config, json* model_config)>;
BpeVocab vocab_from_json(const std::string& path, const json& root, const ConfigReader& read_configs) {
  const Reader r(path);
  if (!root.is_object()) r.fail("(top level)", "expected a JSON object");
  BpeVocab vocab;

  // normalizer: none, or an empty sequence.
  if (root.contains("normalizer") && !root.at("normalizer").is_null()) {
    const json& n = root.at("normalizer");
    const std::string type = r.string_of(r.need(n, "type", "normalizer"), "normalizer.type");
    if (!(type == "Sequence" && n.contains("normalizers") && n.at("normalizers").is_array() &&
          n.at("normalizers").empty()))
      r.fail("normalizer", "normalizer \"" + type + "\" is not supported (byte-level BPE has none)");
  }

  PreTokenizerSpec pre;
  const json& pre_tokenizer = r.need(root, "pre_tokenizer", "(top level)");
  if (pre_tokenizer.is_null()) r.fail("pre_tokenizer", "null: not a byte-level BPE tokenizer");
  read_pre_tokenizer(r, pre_tokenizer, "pre_tokenizer", &pre);
  if (!pre.byte_level) r.fail("pre_tokenizer", "no ByteLevel step: not a byte-level BPE tokenizer");
  vocab.split_patterns = pre.patterns;
  vocab.add_prefix_space = pre.add_prefix_space;
  if (root.contains("decoder") && !has_byte_level_decoder(r, root.at("decoder")))
    r.fail("decoder", "no ByteLevel decoder: not a byte-level BPE tokenizer");

  const json& model = r.need(root, "model", "(top level)");
  const std::string type = model.contains("type") ? r.string_of(model.at("type"), "model.type") : "BPE";
  if (type != "BPE") r.fail("model.type", "\"" + type + "\" is not supported (only BPE)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model.at(key).is_null() &&
        !(model.at(key).is_string() && model.at(key).get<std::string>().empty()))
      r.fail(std::string("model.") + key, "not supported in byte-level BPE");
  if (model.contains("dropout") && model.at("dropout").is_number() && model.at("dropout").get<double>() > 0)
    r.fail("model.dropout", "BPE dropout is not supported (encoding would be random)");
  vocab.ignore_merges = r.bool_or(model, "ignore_merges", false, "model");
  vocab.byte_fallback = r.bool_or(model, "byte_fallback", false, "model");

  const json& entries = r.need(model, "vocab", "model");
  if (!entries.is_object()) r.fail("model.vocab", "expected an object of token: id");
  std::map<int32_t, std::string> by_id;
  for (const auto& [token, id] : entries.items()) {
    const int32_t i = r.id_of(id, "model.vocab[\"" + token + "\"]");
    if (!by_id.emplace(i, token).second)
      r.fail("model.vocab", "id " + std::to_string(i) + " is given to both \"" + by_id[i] + "\" and \"" + token + "\"");
  }
  const json* added = root.contains("added_tokens") ? &root.at("added_tokens") : nullptr;
  if (added && !added->is_array() && !added->is_null()) r.fail("added_tokens", "expected an array");
  if (added && added->is_array()) {
    for (size_t i = 0; i < added->size(); ++i) {
      const std::string field = "added_tokens[" + std::to_string(i) + "]";
      const json& t = (*added)[i];
      AddedToken token;
      token.id = r.id_of(r.need(t, "id", field), field + ".id");
      token.content = r.string_of(r.need(t, "content", field), field + ".content");
      if (token.content.empty()) r.fail(field + ".content", "empty");
      token.lstrip = r.bool_or(t, "lstrip", false, field);
      token.rstrip = r.bool_or(t, "rstrip", false, field);
      token.single_word = r.bool_or(t, "single_word", false, field);
      const auto it = by_id.find(token.id);
      if (it == by_id.end()) by_id.emplace(token.id, bytes_to_byte_level(token.content));
      vocab.added.push_back(std::move(token));
    }
  }
  if (by_id.empty()) r.fail("model.vocab", "empty");
  // Ids may leave holes, but not so many that a hostile file makes us allocate gigabytes.
  const size_t max_id = static_cast<size_t>(by_id.rbegin()->first);
  if (max_id >= 4 * by_id.size() + 65536)
    r.fail("model.vocab", "id " + std::to_string(max_id) + " is far beyond the " +
                              std::to_string(by_id.size()) + " tokens given");
  vocab.tokens.resize(static_cast<size_t>(by_id.rbegin()->first) + 1);   // holes stay "" (never produced)
  for (auto& [id, token] : by_id) vocab.tokens[id] = std::move(token);
  if (model.contains("unk_token") && model.at("unk_token").is_string()) {
    const auto it = entries.find(model.at("unk_token").get<std::string>());
    if (it == entries.end()) r.fail("model.unk_token", "not in model.vocab");
    vocab.unk_id = r.id_of(*it, "model.unk_token");
  }

  const json& merges = r.need(model, "merges", "model");
  if (!merges.is_array()) r.fail("model.merges", "expected an array");
  vocab.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string field = "model.merges[" + std::to_string(i) + "]";
    const json& m = merges[i];
    if (m.is_string()) {   // "a b"
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || space == 0 || space + 1 >= s.size() ||
          s.find(' ', space + 1) != std::string::npos)
        r.fail(field, "expected \"left right\", found \"" + s + "\"");
      vocab.merges.emplace_back(s.substr(0, space), s.substr(space + 1));
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      vocab.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
    } else {
      r.fail(field, "expected \"left right\" or [\"left\", \"right\"]");
    }
  }

  if (root.contains("post_processor"))
    read_post_processor(r, root.at("post_processor"), "post_processor", &vocab.bos_prefix);

  // BOS/EOS: tokenizer_config.json, then config.json, then the post-processor's prefix.
  json tokenizer_config, model_config;
  read_configs(&tokenizer_config, &model_config);
  const auto id_of_text = [&](const std::string& text) -> int32_t {
    if (text.empty()) return -1;
    for (const AddedToken& t : vocab.added)
      if (t.content == text) return t.id;
    const auto it = entries.find(bytes_to_byte_level(text));
    return it != entries.end() && it->is_number_integer() ? it->get<int32_t>() : -1;
  };
  vocab.bos_id = id_of_text(special_token_text(tokenizer_config, "bos_token"));
  vocab.eos_id = id_of_text(special_token_text(tokenizer_config, "eos_token"));
  if (vocab.bos_id < 0) vocab.bos_id = first_id(model_config, "bos_token_id");
  if (vocab.eos_id < 0) vocab.eos_id = first_id(model_config, "eos_token_id");
  if (vocab.bos_id < 0 && !vocab.bos_prefix.empty()) vocab.bos_id = vocab.bos_prefix.front();
  return vocab;
}

// The files beside tokenizer.json, as messages name them.
std::string beside(const std::string& path, const char* name) {
  return (std::filesystem::path(path).parent_path() / name).string();
}

}  // namespace

BpeVocab read_hf_tokenizer_json(const std::string& path) {
  return vocab_from_json(path, read_json(path), [&](json* tokenizer_config, json* model_config) {
    if (std::filesystem::exists(beside(path, "tokenizer_config.json")))
      *tokenizer_config = read_json(beside(path, "tokenizer_config.json"));
    if (std::filesystem::exists(beside(path, "config.json"))) *model_config = read_json(beside(path, "config.json"));
  });
}

BpeVocab parse_hf_tokenizer_json(const std::string& path, std::string_view text,
                                 std::string_view tokenizer_config, std::string_view model_config) {
  return vocab_from_json(path, parse_json(path, text), [&](json* tc, json* mc) {
    if (!tokenizer_config.empty()) *tc = parse_json(beside(path, "tokenizer_config.json"), tokenizer_config);
    if (!model_config.empty()) *mc = parse_json(beside(path, "config.json"), model_config);
  });
}

}  // namespace sparseflash::tokenizer
