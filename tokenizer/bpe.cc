#include "tokenizer/bpe.h"

#include <cstdio>
#include <queue>
#include <stdexcept>

#include "tokenizer/identity.h"

namespace sparseflash::tokenizer {

namespace {
constexpr size_t kCacheEntries = 1 << 16;
constexpr size_t kCachedPieceBytes = 64;

uint64_t pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}
}  // namespace

BpeTokenizer::BpeTokenizer(BpeVocab vocab, const std::string& source)
    : add_prefix_space_(vocab.add_prefix_space),
      ignore_merges_(vocab.ignore_merges),
      unk_id_(vocab.unk_id),
      bos_prefix_(std::move(vocab.bos_prefix)) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument(source + ": " + what);
  };
  if (vocab.tokens.empty()) fail("the vocabulary is empty");
  if (vocab.tokens.size() > static_cast<size_t>(INT32_MAX)) fail("the vocabulary is too large");
  vocab_size_ = static_cast<int64_t>(vocab.tokens.size());
  id_to_bytes_.resize(vocab.tokens.size());
  for (size_t id = 0; id < vocab.tokens.size(); ++id) {
    byte_level_to_bytes(vocab.tokens[id], &id_to_bytes_[id]);
    bytes_to_id_.emplace(id_to_bytes_[id], static_cast<int32_t>(id));   // first one wins
  }
  byte_id_.assign(256, -1);
  for (int b = 0; b < 256; ++b) {
    const auto it = bytes_to_id_.find(std::string(1, static_cast<char>(b)));
    if (it != bytes_to_id_.end()) {
      byte_id_[b] = it->second;
    } else if (vocab.byte_fallback) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      const auto fb = bytes_to_id_.find(name);
      if (fb != bytes_to_id_.end()) byte_id_[b] = fb->second;
    }
  }
  const auto id_of = [&](const std::string& token, size_t rank, const char* side) {
    std::string bytes;
    byte_level_to_bytes(token, &bytes);
    const auto it = bytes_to_id_.find(bytes);
    if (it == bytes_to_id_.end())
      fail("merge " + std::to_string(rank) + " (\"" + vocab.merges[rank].first + " " +
           vocab.merges[rank].second + "\"): its " + side + " \"" + token + "\" is not in the vocabulary");
    return it->second;
  };
  merges_.reserve(vocab.merges.size());
  std::vector<int32_t> merge_ids;   // left, right, result per rank (for the identity)
  merge_ids.reserve(3 * vocab.merges.size());
  for (size_t rank = 0; rank < vocab.merges.size(); ++rank) {
    const auto& [a, b] = vocab.merges[rank];
    const int32_t left = id_of(a, rank, "left part");
    const int32_t right = id_of(b, rank, "right part");
    const int32_t merged = id_of(a + b, rank, "result");
    merges_.emplace(pair_key(left, right), Merge{static_cast<int32_t>(rank), merged});   // first rank wins
    merge_ids.insert(merge_ids.end(), {left, right, merged});
  }
  for (const AddedToken& t : vocab.added) {
    if (t.id < 0 || t.id >= vocab_size_)
      fail("added token \"" + t.content + "\" has id " + std::to_string(t.id) +
           " outside the vocabulary (size " + std::to_string(vocab_size_) + ")");
    // Its text is what it decodes to, whatever the vocabulary spells.
    id_to_bytes_[t.id] = t.content;
  }
  added_ = AddedTokenSplitter(vocab.added);
  for (const std::string& pattern : vocab.split_patterns) {
    try {
      pre_.add_split(pattern);
    } catch (const std::invalid_argument& e) {
      fail(e.what());
    }
  }
  for (const int32_t id : bos_prefix_)
    if (id < 0 || id >= vocab_size_) fail("the BOS id " + std::to_string(id) + " is outside the vocabulary");
  const auto check_special = [&](int32_t id, const char* what) {
    if (id >= vocab_size_) fail(std::string(what) + " " + std::to_string(id) + " is outside the vocabulary");
    return id < 0 ? -1 : id;
  };
  unk_id_ = check_special(unk_id_, "the unknown-token id");
  bos_id_ = check_special(vocab.bos_id, "the BOS id");
  eos_id_ = check_special(vocab.eos_id, "the EOS id");
  adds_bos_ = !bos_prefix_.empty();

  // The identity covers what the tables above were built from, after the byte-level
  // characters became bytes: decoding (every token's bytes), merging, pre-tokenizing,
  // the added tokens and the special ids.
  ContentHash hash;
  for (const std::string& bytes : id_to_bytes_) hash.add_bytes(bytes);
  hash.add_int(static_cast<int64_t>(merge_ids.size()));
  for (const int32_t id : merge_ids) hash.add_int(id);
  hash.add_int(static_cast<int64_t>(vocab.added.size()));
  for (const AddedToken& t : vocab.added) {
    hash.add_int(t.id);
    hash.add_bytes(t.content);
    hash.add_int(t.lstrip * 4 + t.rstrip * 2 + t.single_word);
  }
  hash.add_int(static_cast<int64_t>(vocab.split_patterns.size()));
  for (const std::string& pattern : vocab.split_patterns) hash.add_bytes(pattern);
  hash.add_int(add_prefix_space_ * 2 + ignore_merges_);
  for (const int32_t id : byte_id_) hash.add_int(id);   // covers byte_fallback
  hash.add_int(static_cast<int64_t>(bos_prefix_.size()));
  for (const int32_t id : bos_prefix_) hash.add_int(id);
  for (const int32_t id : {unk_id_, bos_id_, eos_id_}) hash.add_int(id);
  identity_ = hash.identity(kind(), vocab_size_);
}

std::vector<std::string> BpeTokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> out;
  std::string prefixed;
  if (add_prefix_space_ && (text.empty() || text[0] != ' ')) {
    prefixed = " " + std::string(text);
    text = prefixed;
  }
  for (const std::string_view piece : pre_.split(text)) out.emplace_back(piece);
  return out;
}

std::vector<int32_t> BpeTokenizer::encode(std::string_view text, bool add_bos) const {
  std::vector<int32_t> ids;
  if (add_bos) ids = bos_prefix_;
  for (const AddedTokenSplitter::Piece& part : added_.split(text)) {
    if (part.token >= 0) {
      ids.push_back(part.token);
      continue;
    }
    for (const std::string& piece : pre_tokenize(part.text)) encode_piece(piece, &ids);
  }
  return ids;
}

void BpeTokenizer::encode_piece(std::string_view piece, std::vector<int32_t>* out) const {
  if (piece.empty()) return;
  if (ignore_merges_) {
    const auto it = bytes_to_id_.find(std::string(piece));
    if (it != bytes_to_id_.end()) {
      out->push_back(it->second);
      return;
    }
  }
  const bool cacheable = piece.size() <= kCachedPieceBytes;
  std::string key;
  if (cacheable) {
    key.assign(piece);
    std::lock_guard<std::mutex> lock(cache_mutex_);
    const auto it = cache_.find(key);
    if (it != cache_.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> word;
  merge_word(piece, &word);
  out->insert(out->end(), word.begin(), word.end());
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() >= kCacheEntries) cache_.clear();
    cache_.emplace(std::move(key), std::move(word));
  }
}

void BpeTokenizer::merge_word(std::string_view piece, std::vector<int32_t>* out) const {
  // Symbols in a doubly linked list; merged-away symbols get id -1.
  struct Symbol {
    int32_t id;
    int prev, next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (const char c : piece) {
    const int32_t id = byte_id_[static_cast<uint8_t>(c)];
    if (id < 0) {
      // HF BPE: an unknown character becomes the unknown token, or vanishes without one.
      if (unk_id_ < 0) continue;
      if (!symbols.empty() && symbols.back().id == unk_id_) continue;   // fused
      symbols.push_back({unk_id_, 0, 0});
      continue;
    }
    symbols.push_back({id, 0, 0});
  }
  const int n = static_cast<int>(symbols.size());
  for (int i = 0; i < n; ++i) {
    symbols[i].prev = i - 1;
    symbols[i].next = i + 1 < n ? i + 1 : -1;
  }
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t id;
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  const auto push_pair = [&](int left) {
    if (left < 0) return;
    const int right = symbols[left].next;
    if (right < 0) return;
    const auto it = merges_.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges_.end()) queue.push({it->second.rank, left, it->second.id});
  };
  for (int i = 0; i + 1 < n; ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    Symbol& right = symbols[left.next];
    const auto it = merges_.find(pair_key(left.id, right.id));
    if (it == merges_.end() || it->second.id != top.id) continue;   // stale entry
    left.id = top.id;
    right.id = -1;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push_pair(left.prev);
    push_pair(top.pos);
  }
  for (int i = n > 0 ? 0 : -1; i >= 0; i = symbols[i].next) out->push_back(symbols[i].id);
}

std::string BpeTokenizer::decode_token(int32_t id) const {
  check_id(id);
  return id_to_bytes_[id];
}

void set_gguf_pre_tokenizer(const std::string& pre, BpeVocab* vocab, const std::string& source) {
  vocab->split_patterns.clear();
  vocab->ignore_merges = false;
  if (pre == "default" || pre == "gpt2" || pre == "gpt-2") {
    vocab->split_patterns = {kGpt2Pattern};
  } else if (pre == "llama-bpe" || pre == "llama3" || pre == "llama-v3") {
    vocab->split_patterns = {kLlama3Pattern};
    vocab->ignore_merges = true;   // as Llama-3's tokenizer.json and llama.cpp
  } else if (pre == "smollm") {
    // Digits one by one first (HF Digits(individual_digits=true)), then GPT-2's regex.
    vocab->split_patterns = {R"(\p{N})", kGpt2Pattern};
  } else if (pre == "qwen2") {
    vocab->split_patterns = {kQwen2Pattern};
  } else {
    throw std::invalid_argument(source + ": tokenizer.ggml.pre \"" + pre +
                                "\" is not supported (supported: default, gpt2, llama-bpe, "
                                "llama3, smollm, qwen2)");
  }
}

}  // namespace sparseflash::tokenizer
