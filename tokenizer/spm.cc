#include "tokenizer/spm.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <queue>
#include <stdexcept>

#include "tokenizer/identity.h"

namespace sparseflash::tokenizer {

namespace {
constexpr const char* kSpaceMarker = "\xE2\x96\x81";   // U+2581, SentencePiece's space

std::string replace_all(std::string_view text, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = text.find(from, pos);
    if (hit == std::string_view::npos) break;
    out.append(text.substr(pos, hit - pos));
    out.append(to);
    pos = hit + from.size();
  }
  out.append(text.substr(pos));
  return out;
}

// "<0x4A>" -> 0x4A; -1 when `piece` is not of that form.
int parse_byte_token(std::string_view piece) {
  if (piece.size() != 6 || piece.substr(0, 3) != "<0x" || piece[5] != '>') return -1;
  int value = 0;
  for (size_t i = 3; i < 5; ++i) {
    const char c = piece[i];
    const int digit = c >= '0' && c <= '9' ? c - '0' : c >= 'A' && c <= 'F' ? c - 'A' + 10
                    : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}
}  // namespace

// ---------------------------------------------------------------------------------
// ScoreMerger

ScoreMerger::ScoreMerger(const std::vector<std::string>& tokens, const std::vector<float>& scores,
                         const std::vector<bool>& mergeable)
    : scores_(scores) {
  for (size_t id = 0; id < tokens.size(); ++id)
    if (mergeable[id]) lookup_.emplace(tokens[id], static_cast<int32_t>(id));   // first wins
}

int32_t ScoreMerger::find(std::string_view piece) const {
  const auto it = lookup_.find(std::string(piece));
  return it == lookup_.end() ? -1 : it->second;
}

std::vector<ScoreMerger::Symbol> ScoreMerger::merge(
    std::vector<Symbol> symbols,
    std::unordered_map<std::string, std::pair<std::string, std::string>>* split_of) const {
  const int n = static_cast<int>(symbols.size());
  std::vector<int> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int i = 0; i < n; ++i) {
    prev[i] = i - 1;
    next[i] = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    float score;
    int left;
    size_t length;   // of the merged text: tells a stale entry
    int32_t id;
    bool operator<(const Candidate& o) const {   // max-heap: higher score, then leftmost
      return score != o.score ? score < o.score : left > o.left;
    }
  };
  std::priority_queue<Candidate> queue;
  const auto push_pair = [&](int left) {
    if (left < 0 || next[left] < 0) return;
    const std::string& a = symbols[left].text;
    const std::string& b = symbols[next[left]].text;
    const int32_t id = find(a + b);
    if (id >= 0) queue.push({scores_[id], left, a.size() + b.size(), id});
  };
  for (int i = 0; i + 1 < n; ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    const int left = top.left;
    if (!alive[left] || next[left] < 0) continue;
    const int right = next[left];
    if (symbols[left].text.size() + symbols[right].text.size() != top.length) continue;
    if (split_of) split_of->emplace(symbols[left].text + symbols[right].text,
                                    std::make_pair(symbols[left].text, symbols[right].text));
    symbols[left].text += symbols[right].text;
    symbols[left].id = top.id;
    alive[right] = false;
    next[left] = next[right];
    if (next[right] >= 0) prev[next[right]] = left;
    push_pair(prev[left]);
    push_pair(left);
  }
  std::vector<Symbol> out;
  for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) out.push_back(std::move(symbols[i]));
  return out;
}

// ---------------------------------------------------------------------------------
// SpmTokenizer

SpmTokenizer::SpmTokenizer(SpmVocab vocab, const std::string& source) : vocab_(std::move(vocab)) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument(source + ": " + what);
  };
  const size_t n = vocab_.tokens.size();
  if (n == 0) fail("the vocabulary is empty");
  if (n > static_cast<size_t>(INT32_MAX)) fail("the vocabulary is too large");
  if (vocab_.scores.size() != n)
    fail("tokenizer.ggml.scores has " + std::to_string(vocab_.scores.size()) + " entries, tokens " +
         std::to_string(n));
  if (vocab_.types.empty()) {
    vocab_.types.assign(n, kTokenNormal);
    for (size_t id = 0; id < n; ++id)
      if (parse_byte_token(vocab_.tokens[id]) >= 0) vocab_.types[id] = kTokenByte;
  }
  if (vocab_.types.size() != n)
    fail("tokenizer.ggml.token_type has " + std::to_string(vocab_.types.size()) + " entries, tokens " +
         std::to_string(n));
  vocab_size_ = static_cast<int64_t>(n);
  for (size_t id = 0; id < n; ++id) {
    if (vocab_.types[id] < kTokenNormal || vocab_.types[id] > kTokenByte)
      fail("token " + std::to_string(id) + " has token type " + std::to_string(vocab_.types[id]) +
           " (known: 1..6)");
    if (!std::isfinite(vocab_.scores[id])) fail("token " + std::to_string(id) + " has a non-finite score");
  }
  const auto check_special = [&](int32_t id, const char* what) {
    if (id >= vocab_size_) fail(std::string(what) + " " + std::to_string(id) + " is outside the vocabulary");
    return id < 0 ? -1 : id;
  };
  bos_id_ = check_special(vocab_.bos_id, "the BOS id");
  eos_id_ = check_special(vocab_.eos_id, "the EOS id");
  vocab_.unk_id = check_special(vocab_.unk_id, "the unknown-token id");
  adds_bos_ = vocab_.add_bos && bos_id_ >= 0;

  std::vector<bool> mergeable(n);
  byte_id_.assign(256, -1);
  id_to_text_.resize(n);
  std::vector<AddedToken> specials;
  for (size_t id = 0; id < n; ++id) {
    const int32_t type = vocab_.types[id];
    const std::string& token = vocab_.tokens[id];
    mergeable[id] = type == kTokenNormal || type == kTokenUserDefined || type == kTokenUnused;
    if (type == kTokenByte) {
      const int byte = parse_byte_token(token);
      if (byte < 0) fail("token " + std::to_string(id) + " has the byte type but is \"" + token + "\", not <0xNN>");
      if (byte_id_[byte] < 0) byte_id_[byte] = static_cast<int32_t>(id);
      id_to_text_[id] = std::string(1, static_cast<char>(byte));
    } else if (type == kTokenControl) {
      id_to_text_[id] = "";   // sequence markers, not text
    } else {
      id_to_text_[id] = replace_all(token, kSpaceMarker, " ");
    }
    if (type == kTokenControl || type == kTokenUserDefined)
      specials.push_back({token, static_cast<int32_t>(id)});
  }
  merger_ = ScoreMerger(vocab_.tokens, vocab_.scores, mergeable);
  specials_ = AddedTokenSplitter(std::move(specials));

  ContentHash hash;   // everything encode and decode read, for identity()
  for (size_t id = 0; id < n; ++id) {
    hash.add_bytes(vocab_.tokens[id]);
    hash.add_float(vocab_.scores[id]);
    hash.add_int(vocab_.types[id]);
  }
  for (const int32_t id : {bos_id_, eos_id_, vocab_.unk_id}) hash.add_int(id);
  hash.add_int(vocab_.add_space_prefix * 2 + adds_bos_);
  identity_ = hash.identity(kind(), vocab_size_);
}

std::vector<int32_t> SpmTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos && adds_bos_) ids.push_back(bos_id_);
  // As llama.cpp: the space prefix goes in front of the first text and of text that
  // follows a special token.
  bool after_special = true;
  for (const AddedTokenSplitter::Piece& part : specials_.split(text)) {
    if (part.token >= 0) {
      ids.push_back(part.token);
      after_special = true;
      continue;
    }
    std::string fragment = vocab_.add_space_prefix && after_special ? " " : "";
    fragment.append(part.text);
    encode_fragment(replace_all(fragment, " ", kSpaceMarker), &ids);
    after_special = false;
  }
  return ids;
}

void SpmTokenizer::encode_fragment(std::string_view text, std::vector<int32_t>* out) const {
  std::vector<ScoreMerger::Symbol> symbols;
  for (size_t pos = 0; pos < text.size();) {
    const size_t len = utf8_char_length(text, pos);
    std::string piece(text.substr(pos, len));
    const int32_t id = merger_.find(piece);
    symbols.push_back({std::move(piece), id});
    pos += len;
  }
  std::unordered_map<std::string, std::pair<std::string, std::string>> split_of;
  const auto merged = merger_.merge(std::move(symbols), &split_of);
  // Unused tokens are split back into the pieces they were merged from (SentencePiece's
  // resegmentation).
  std::vector<std::string_view> stack;
  for (const auto& symbol : merged) {
    stack.push_back(symbol.text);
    std::vector<std::string_view> order;
    while (!stack.empty()) {
      const std::string_view piece = stack.back();
      stack.pop_back();
      const int32_t id = merger_.find(piece);
      const auto it = id >= 0 && vocab_.types[id] == kTokenUnused ? split_of.find(std::string(piece))
                                                                   : split_of.end();
      if (it != split_of.end()) {
        stack.push_back(it->second.second);
        stack.push_back(it->second.first);
      } else {
        emit(piece, out);
      }
    }
  }
}

void SpmTokenizer::emit(std::string_view piece, std::vector<int32_t>* out) const {
  const int32_t id = merger_.find(piece);
  if (id >= 0) {
    out->push_back(id);
    return;
  }
  bool have_bytes = true;
  for (const char c : piece) have_bytes = have_bytes && byte_id_[static_cast<uint8_t>(c)] >= 0;
  if (have_bytes) {
    for (const char c : piece) out->push_back(byte_id_[static_cast<uint8_t>(c)]);
    return;
  }
  // No byte tokens: the unknown token, one for a run of unknown characters.
  if (vocab_.unk_id >= 0 && (out->empty() || out->back() != vocab_.unk_id)) out->push_back(vocab_.unk_id);
}

std::string SpmTokenizer::decode_token(int32_t id) const {
  check_id(id);
  return id_to_text_[id];
}

std::string SpmTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  bool at_start = true;   // no text yet, or right after a special token
  for (const int32_t id : ids) {
    check_id(id);
    std::string_view text = id_to_text_[id];
    const int32_t type = vocab_.types[id];
    if (type == kTokenControl || type == kTokenUserDefined) {
      out.append(text);
      at_start = true;
      continue;
    }
    // The encoder's space prefix: first text, and text right after a special token.
    if (at_start && vocab_.add_space_prefix && !text.empty() && text[0] == ' ' && type != kTokenByte)
      text.remove_prefix(1);
    at_start = false;
    out.append(text);
  }
  return out;
}

// ---------------------------------------------------------------------------------
// Llama2cTokenizer

std::unique_ptr<Llama2cTokenizer> Llama2cTokenizer::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open the llama2.c tokenizer file");
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) throw std::runtime_error(path + ": read error");
  const auto fail = [&](const std::string& what) {
    throw std::runtime_error(path + ": llama2.c tokenizer: " + what);
  };
  size_t pos = 0;
  const auto read_i32 = [&](const std::string& field) {
    if (data.size() - pos < 4) fail(field + ": the file ends at byte " + std::to_string(data.size()));
    int32_t v;
    std::memcpy(&v, data.data() + pos, 4);
    pos += 4;
    return v;
  };
  const int32_t max_token_length = read_i32("max_token_length");
  if (max_token_length <= 0 || max_token_length > (1 << 20))
    fail("max_token_length is " + std::to_string(max_token_length) + " (expected 1..1048576)");
  std::vector<std::string> tokens;
  std::vector<float> scores;
  while (pos < data.size()) {
    const std::string where = "token " + std::to_string(tokens.size());
    const int32_t score_bits = read_i32(where + " score");
    float score;
    std::memcpy(&score, &score_bits, 4);
    if (!std::isfinite(score)) fail(where + ": the score is not finite");
    const int32_t length = read_i32(where + " length");
    if (length < 0 || length > max_token_length)
      fail(where + ": length " + std::to_string(length) + " is outside 0..max_token_length (" +
           std::to_string(max_token_length) + ")");
    if (data.size() - pos < static_cast<size_t>(length))
      fail(where + ": its " + std::to_string(length) + " bytes run past the end of the file");
    tokens.emplace_back(data.substr(pos, length));
    scores.push_back(score);
    pos += length;
  }
  if (tokens.size() < 3)
    fail(std::to_string(tokens.size()) + " tokens; at least <unk>, <s>, </s> are needed");
  return std::make_unique<Llama2cTokenizer>(std::move(tokens), std::move(scores), path);
}

Llama2cTokenizer::Llama2cTokenizer(std::vector<std::string> tokens, std::vector<float> scores,
                                   const std::string& source)
    : tokens_(std::move(tokens)), scores_(std::move(scores)) {
  if (tokens_.size() < 3)
    throw std::invalid_argument(source + ": llama2.c tokenizer: " + std::to_string(tokens_.size()) +
                                " tokens; at least <unk>, <s>, </s> are needed");
  if (scores_.size() != tokens_.size())
    throw std::invalid_argument(source + ": llama2.c tokenizer: scores and tokens differ in number");
  vocab_size_ = static_cast<int64_t>(tokens_.size());
  bos_id_ = 1;
  eos_id_ = 2;
  adds_bos_ = true;
  merger_ = ScoreMerger(tokens_, scores_, std::vector<bool>(tokens_.size(), true));
  ContentHash hash;   // the ids of <s> and </s> and the BOS are fixed by the format
  for (size_t id = 0; id < tokens_.size(); ++id) {
    hash.add_bytes(tokens_[id]);
    hash.add_float(scores_[id]);
  }
  identity_ = hash.identity(kind(), vocab_size_);
}

std::vector<int32_t> Llama2cTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos) ids.push_back(bos_id_);
  std::vector<ScoreMerger::Symbol> symbols;
  // run.c: a " " token in front of any non-empty text.
  if (!text.empty()) {
    const int32_t space = merger_.find(" ");
    if (space >= 0) symbols.push_back({tokens_[space], space});
  }
  // Up to 4 bytes: a lead byte and the continuation bytes after it; the group is a token
  // if the vocabulary has it, else each of its bytes becomes token byte + 3.
  std::string group;
  for (size_t i = 0; i < text.size(); ++i) {
    const auto c = static_cast<uint8_t>(text[i]);
    if ((c & 0xC0) != 0x80) group.clear();
    group.push_back(static_cast<char>(c));
    const bool next_continues = i + 1 < text.size() && (static_cast<uint8_t>(text[i + 1]) & 0xC0) == 0x80;
    if (next_continues && group.size() < 4) continue;
    const int32_t id = merger_.find(group);
    if (id >= 0) {
      symbols.push_back({group, id});
    } else {
      for (const char b : group) {
        int32_t byte_id = static_cast<uint8_t>(b) + 3;
        if (byte_id >= vocab_size_) byte_id = 0;   // a vocabulary without byte tokens: <unk>
        symbols.push_back({tokens_[byte_id], byte_id});
      }
    }
    group.clear();
  }
  for (const auto& symbol : merger_.merge(std::move(symbols), nullptr)) ids.push_back(symbol.id);
  return ids;
}

std::string Llama2cTokenizer::decode_token(int32_t id) const {
  check_id(id);
  if (id == bos_id_ || id == eos_id_) return "";
  const std::string& piece = tokens_[id];
  const int byte = parse_byte_token(piece);
  return byte >= 0 ? std::string(1, static_cast<char>(byte)) : piece;
}

std::string Llama2cTokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string out;
  for (size_t i = 0; i < ids.size(); ++i) {
    std::string piece = decode_token(ids[i]);
    // run.c drops the space after <s>; the first token carries the encoder's " " too.
    if ((i == 0 || ids[i - 1] == bos_id_) && !piece.empty() && piece[0] == ' ' &&
        parse_byte_token(tokens_[ids[i]]) < 0)
      piece.erase(0, 1);
    out += piece;
  }
  return out;
}

}  // namespace sparseflash::tokenizer
