// Token window loader: deterministic, rank-independent training windows and a
// fixed evaluation sequence over memory-mapped shards.
#include "data/loader.h"

#include <algorithm>
#include <cassert>

#include "absl/strings/str_cat.h"

namespace sparseflash::data {

// --- Hashing ------------------------------------------------------------------

namespace {

// splitmix64 finalizer: a bijective 64-bit mix with full avalanche.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// Maps a 64-bit hash to [0, n) by a 128-bit multiply (Lemire): no division,
// and the bias (n / 2^64) is negligible for any realistic window count.
__extension__ typedef unsigned __int128 uint128;  // GCC/Clang builtin; quiet under -Wpedantic
uint64_t reduce(uint64_t h, uint64_t n) {
  return static_cast<uint64_t>((static_cast<uint128>(h) * n) >> 64);
}

// Seed of the evaluation sequence; fixed so every run evaluates on the same windows.
constexpr uint64_t kEvalSeed = 0x5eed0fe7a1e7a1ull;

const char* split_name(Split split) { return split == Split::kTrain ? "train" : "val"; }

}  // namespace

// --- TokenLoader ----------------------------------------------------------------

absl::StatusOr<TokenLoader> TokenLoader::open(const std::string& dir, Split split, int seq_len) {
  if (seq_len <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("seq_len must be positive, got ", seq_len));
  }
  auto meta = read_meta(dir);
  if (!meta.ok()) return meta.status();
  TokenLoader loader;
  loader.meta_ = *std::move(meta);
  loader.seq_len_ = seq_len;
  const std::vector<std::string>& names =
      split == Split::kTrain ? loader.meta_.train_shards : loader.meta_.val_shards;
  if (names.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, "/meta.json: split ", split_name(split), " has no shards (too few documents?)"));
  }
  uint64_t total = 0, largest = 0;
  for (const auto& name : names) {
    auto shard = Shard::open(dir + "/" + name, /*verify_checksum=*/true);
    if (!shard.ok()) return shard.status();
    if (shard->vocab_size() != static_cast<uint32_t>(loader.meta_.vocab_size)) {
      return absl::DataLossError(absl::StrCat(shard->path(), ": vocab size ", shard->vocab_size(),
                                              " differs from meta.json's ",
                                              loader.meta_.vocab_size));
    }
    // A window is seq_len + 1 consecutive tokens within one shard, so a shard
    // of n tokens has starts 0 .. n - seq_len - 1.
    const uint64_t n = shard->size();
    largest = std::max(largest, n);
    total += n > static_cast<uint64_t>(seq_len) ? n - seq_len : 0;
    loader.window_prefix_.push_back(total);
    loader.shards_.push_back(*std::move(shard));
  }
  if (total == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        dir, ": split ", split_name(split), " has only ", largest,
        " tokens in its largest shard; seq_len ", seq_len, " needs ", seq_len + 1));
  }
  return loader;
}

uint64_t TokenLoader::total_tokens() const {
  uint64_t total = 0;
  for (const auto& s : shards_) total += s.size();
  return total;
}

void TokenLoader::window(uint64_t r, int64_t* x, int64_t* y) const {
  // window_prefix_[i] = windows in shards 0..i, so the shard holding window r
  // is the first whose prefix exceeds r.
  const size_t i = static_cast<size_t>(
      std::upper_bound(window_prefix_.begin(), window_prefix_.end(), r) - window_prefix_.begin());
  assert(i < shards_.size());
  const uint64_t start = r - (i == 0 ? 0 : window_prefix_[i - 1]);
  shards_[i].read(start, seq_len_, x);
  shards_[i].read(start + 1, seq_len_, y);
}

void TokenLoader::sample(uint64_t seed, int64_t step, int micro_step, int64_t first_row, int count,
                         int64_t* x, int64_t* y) const {
  // Hash chain mix(mix(mix(mix(seed) ^ step) ^ micro_step) ^ row): each draw
  // depends only on its own coordinates, never on a generator's history, so
  // any rank can produce any global row, and a resumed run reproduces the
  // windows of the steps it replays.
  const uint64_t total = window_prefix_.back();
  const uint64_t base =
      mix(mix(mix(seed) ^ static_cast<uint64_t>(step)) ^ static_cast<uint64_t>(micro_step));
  for (int i = 0; i < count; ++i) {
    const uint64_t row = static_cast<uint64_t>(first_row + i);
    const uint64_t r = reduce(mix(base ^ row), total);
    window(r, x + static_cast<int64_t>(i) * seq_len_, y + static_cast<int64_t>(i) * seq_len_);
  }
}

void TokenLoader::eval_batch(int64_t batch_index, int count, int64_t* x, int64_t* y) const {
  // Window j of the evaluation sequence is a fixed hash of j: the same for
  // every run and every batch size split. Small splits simply repeat windows.
  const uint64_t total = window_prefix_.back();
  const uint64_t base = mix(kEvalSeed);
  for (int i = 0; i < count; ++i) {
    const uint64_t j = static_cast<uint64_t>(batch_index) * static_cast<uint64_t>(count) + i;
    const uint64_t r = reduce(mix(base ^ j), total);
    window(r, x + static_cast<int64_t>(i) * seq_len_, y + static_cast<int64_t>(i) * seq_len_);
  }
}

}  // namespace sparseflash::data
