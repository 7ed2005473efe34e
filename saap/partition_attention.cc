// SAAP attention: the full-sequence path (masked, chunked over queries) and
// the partition-contiguous decode cache. See attention.h for the contract.
#include "saap/partition_attention.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "saap/kmeans.h"

#ifdef SF_SAAP_WITH_KERNELS
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "saap/kernels/decode.h"
#endif

namespace sparseflash::saap {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool is_index_type(const Tensor& t) {
  return t.scalar_type() == at::kLong || t.scalar_type() == at::kInt;
}

// The dtype attention is computed in: float64 for float64 inputs, else float32.
at::ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

double softmax_scale(double scale, int64_t head_dim) {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

// Checks ids lie in [low, high): one sync, only for non-empty tensors.
void check_id_range(const Tensor& ids, int64_t low, int64_t high, const char* what,
                    const char* name) {
  if (ids.numel() == 0) return;
  Tensor extrema = at::stack({ids.min().to(at::kLong), ids.max().to(at::kLong)}).cpu();
  const int64_t lo = extrema[0].item<int64_t>(), hi = extrema[1].item<int64_t>();
  TORCH_CHECK(lo >= low && hi < high, what, ": ", name, " ids must lie in [", low, ", ", high,
              "), found ", lo, " .. ", hi);
}

// Bool [rows..., C + 1] with true at the selected partitions of each row;
// ids -1 mark the extra column C, which no key has.
Tensor membership(const Tensor& selected, int64_t num_partitions) {
  Tensor ids = selected.to(at::kLong);
  ids = at::where(ids < 0, at::full_like(ids, num_partitions), ids);
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.back() = num_partitions + 1;
  Tensor member = at::zeros(shape, ids.options().dtype(at::kBool));
  return member.scatter_(-1, ids, true);
}

void check_options(const SaapAttentionOptions& o, const char* what) {
  TORCH_CHECK(o.local_window >= 1, what, ": options.local_window must be >= 1 (the query's own "
              "key is in its window), got ", o.local_window);
  TORCH_CHECK(o.sink_tokens >= 0, what, ": options.sink_tokens must be >= 0, got ",
              o.sink_tokens);
  TORCH_CHECK(o.chunk_size >= 1, what, ": options.chunk_size must be >= 1, got ", o.chunk_size);
}

}  // namespace

SaapVisitStats& SaapVisitStats::operator+=(const SaapVisitStats& o) {
  visited_pairs += o.visited_pairs;
  causal_pairs += o.causal_pairs;
  routed_visited += o.routed_visited;
  routable_pairs += o.routable_pairs;
  return *this;
}

Tensor select_partitions(const Tensor& scores, int64_t l) {
  TORCH_CHECK(scores.defined() && scores.dim() >= 1 && at::isFloatingType(scores.scalar_type()),
              "select_partitions: scores must be a floating tensor [..., C], got ",
              scores.defined() ? scores.sizes() : at::IntArrayRef{});
  const int64_t c = scores.size(-1);
  TORCH_CHECK(l >= 1 && l <= c, "select_partitions: l must lie in [1, C = ", c, "], got ", l);
  return std::get<1>(scores.topk(l, -1, /*largest=*/true, /*sorted=*/true));
}

Tensor assign_key_partitions(const Tensor& k_pre, const Tensor& centroids) {
  TORCH_CHECK(k_pre.defined() && k_pre.dim() == 4, "assign_key_partitions: k_pre must be "
              "[B, Hkv, N, D], got ", k_pre.defined() ? k_pre.sizes() : at::IntArrayRef{});
  TORCH_CHECK(centroids.defined() && centroids.dim() == 3 && centroids.size(0) == k_pre.size(1) &&
                  centroids.size(2) == k_pre.size(3),
              "assign_key_partitions: centroids must be [Hkv = ", k_pre.size(1), ", C, D = ",
              k_pre.size(3), "], got ", centroids.defined() ? centroids.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(k_pre.scalar_type()),
              "assign_key_partitions: k_pre must be floating, got ", k_pre.scalar_type());
  const int64_t b = k_pre.size(0), h = k_pre.size(1), n = k_pre.size(2), d = k_pre.size(3);
  if (b * n == 0) return at::zeros({b, h, n}, k_pre.options().dtype(at::kLong));
  // [B, Hkv, N, D] -> [Hkv, B * N, D]: one batched assignment over all heads.
  Tensor x = k_pre.to(at::kFloat).transpose(0, 1).reshape({h, b * n, d});
  Tensor c = centroids.to(k_pre.device(), at::kFloat);
  Tensor assignment = assign_to_centroids(x, c, KMeansMetric::kEuclidean);
  return assignment.view({h, b, n}).transpose(0, 1).contiguous();
}

// ---------------------------------------------------------------------------
// Full sequences

Tensor saap_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& key_partition,
                      const Tensor& selected, const SaapAttentionOptions& o,
                      SaapVisitStats* stats) {
  const char* what = "saap_attention";
  TORCH_CHECK(q.defined() && k.defined() && v.defined() && key_partition.defined() &&
                  selected.defined(),
              what, ": q, k, v, key_partition and selected must all be defined");
  TORCH_CHECK(q.dim() == 4, what, ": q must be [B, Hq, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, what, ": k must be [B, Hkv, Nk, D], got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), what, ": v must have k's shape ", k.sizes(), ", got ",
              v.sizes());
  for (const auto& [t, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), what, ": ", name,
                " must be floating, got ", t->scalar_type());
    TORCH_CHECK(t->device() == q.device(), what, ": ", name, " is on ", t->device(),
                " but q is on ", q.device());
  }
  const int64_t batch = q.size(0), hq = q.size(1), nq = q.size(2), d = q.size(3);
  const int64_t hkv = k.size(1), nk = k.size(2);
  TORCH_CHECK(k.size(0) == batch && k.size(3) == d, what, ": k ", k.sizes(),
              " does not match q ", q.sizes(), " in batch or head dim");
  TORCH_CHECK(hkv >= 1 && hq % hkv == 0, what, ": query heads ", hq,
              " are not a multiple of KV heads ", hkv);
  TORCH_CHECK(nq <= nk, what, ": more queries (", nq, ") than keys (", nk,
              "); queries are bottom-right aligned");
  TORCH_CHECK(key_partition.sizes() == at::IntArrayRef({batch, hkv, nk}) &&
                  is_index_type(key_partition),
              what, ": key_partition must be int64 or int32 [", batch, ", ", hkv, ", ", nk,
              "], got ", key_partition.scalar_type(), " ", key_partition.sizes());
  TORCH_CHECK(selected.dim() == 4 && selected.size(0) == batch && selected.size(1) == hq &&
                  selected.size(2) == nq && selected.size(3) >= 1 && is_index_type(selected),
              what, ": selected must be int64 or int32 [", batch, ", ", hq, ", ", nq,
              ", l >= 1], got ", selected.scalar_type(), " ", selected.sizes());
  TORCH_CHECK(key_partition.device() == q.device() && selected.device() == q.device(), what,
              ": key_partition (", key_partition.device(), ") and selected (",
              selected.device(), ") must be on q's device ", q.device());
  check_options(o, what);
  const int64_t num_partitions = o.num_partitions;
  TORCH_CHECK(num_partitions >= 1, what, ": options.num_partitions must be >= 1, got ",
              num_partitions);
  TORCH_CHECK(selected.size(3) <= num_partitions, what, ": selected has l = ", selected.size(3),
              " partitions per query, more than C = ", num_partitions);
  check_id_range(key_partition, 0, num_partitions, what, "key_partition");
  check_id_range(selected, -1, num_partitions, what, "selected");

  const at::ScalarType ct = compute_type(q);
  const int64_t group = hq / hkv, offset = nk - nq;
  const double scale = softmax_scale(o.scale, d);
  Tensor keys = k.to(ct), values = v.to(ct);
  Tensor partition = key_partition.to(at::kLong);
  Tensor out = at::empty({batch, hq, nq, d}, q.options().dtype(ct));
  auto index_options = q.options().dtype(at::kLong);
  Tensor visited = at::zeros({}, index_options), routed_visited = at::zeros({}, index_options);

  for (int64_t start = 0; start < nq; start += o.chunk_size) {
    const int64_t m = std::min(o.chunk_size, nq - start);
    const int64_t n = offset + start + m;  // keys past the chunk's last query are never attended
    // [B, Hq, m, D] -> [B, Hkv, group * m, D]: query head h = kv * group + g.
    Tensor qc = q.narrow(2, start, m).to(ct).reshape({batch, hkv, group * m, d});
    Tensor scores = at::matmul(qc, keys.narrow(2, 0, n).transpose(2, 3)).mul_(scale);
    // Allowed pairs: causal, and (sink or window or key in a selected partition).
    Tensor member = membership(selected.narrow(2, start, m), num_partitions)
                        .reshape({batch, hkv, group * m, num_partitions + 1});
    Tensor allowed = member.gather(
        3, partition.narrow(2, 0, n).unsqueeze(2).expand({batch, hkv, group * m, n}));
    Tensor pos = (at::arange(m, index_options) + (offset + start)).repeat({group});  // [g*m]
    Tensor key = at::arange(n, index_options).unsqueeze(0);                         // [1, n]
    Tensor query = pos.unsqueeze(1);                                                // [g*m, 1]
    Tensor causal = key <= query;
    Tensor always = (key < o.sink_tokens) | (key > query - o.local_window);
    allowed.logical_or_(always).logical_and_(causal);  // in place: the largest tensor
    scores.masked_fill_(allowed.logical_not(), kNegInf);
    Tensor weights = at::softmax(scores, -1);
    out.narrow(2, start, m)
        .copy_(at::matmul(weights, values.narrow(2, 0, n)).view({batch, hq, m, d}));
    if (stats != nullptr) {
      Tensor routable = (key >= o.sink_tokens) & (key <= query - o.local_window);
      visited += allowed.sum();
      routed_visited += (allowed & routable).sum();
    }
  }
  if (stats != nullptr) {
    *stats = SaapVisitStats{};
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t p = offset + i;
      stats->causal_pairs += p + 1;
      stats->routable_pairs += std::max<int64_t>(0, p - o.local_window - o.sink_tokens + 1);
    }
    stats->causal_pairs *= batch * hq;
    stats->routable_pairs *= batch * hq;
    stats->visited_pairs = visited.item<int64_t>();
    stats->routed_visited = routed_visited.item<int64_t>();
  }
  return out.to(q.scalar_type());
}

// ---------------------------------------------------------------------------
// Partition-contiguous decode cache

PartitionedKVCache::PartitionedKVCache(const Tensor& centroids, int64_t batch,
                                       const SaapAttentionOptions& options, at::ScalarType dtype,
                                       at::Device device)
    : options_(options), dtype_(dtype), device_(device) {
  const char* what = "PartitionedKVCache";
  TORCH_CHECK(centroids.defined() && centroids.dim() == 3 && centroids.size(0) >= 1 &&
                  centroids.size(1) >= 1 && centroids.size(2) >= 1,
              what, ": centroids must be [Hkv, C, D] with positive sizes, got ",
              centroids.defined() ? centroids.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(centroids.scalar_type()), what,
              ": centroids must be floating, got ", centroids.scalar_type());
  TORCH_CHECK(batch >= 1, what, ": batch must be >= 1, got ", batch);
  TORCH_CHECK(at::isFloatingType(dtype), what, ": dtype must be floating, got ", dtype);
  check_options(options, what);
  kv_heads_ = centroids.size(0);
  num_partitions_ = centroids.size(1);
  head_dim_ = centroids.size(2);
  batch_ = batch;
  options_.num_partitions = num_partitions_;
  centroids_ = centroids.to(device, at::kFloat).contiguous();
  // "cuda" names no index; the tensors' device does ("cuda:0"), and appends
  // compare against it.
  device_ = centroids_.device();
  TORCH_CHECK(at::isfinite(centroids_).all().item<bool>(), what,
              ": centroids contain NaN or Inf");
  auto f = at::TensorOptions().dtype(dtype_).device(device_);
  k_time_ = at::zeros({batch_, kv_heads_, 0, head_dim_}, f);
  v_time_ = at::zeros_like(k_time_);
  part_time_ = at::zeros({batch_, kv_heads_, 0}, f.dtype(at::kLong));
  routed_end_ = options_.sink_tokens;
  rebuild();  // the empty layout: every partition has room for 16 keys
  rebuilds_ = 0;
}

void PartitionedKVCache::reserve(int64_t tokens) {
  const int64_t capacity = k_time_.size(2);
  if (tokens <= capacity) return;
  const int64_t grown = std::max({tokens, 2 * capacity, int64_t{256}});
  auto f = k_time_.options();
  Tensor k = at::zeros({batch_, kv_heads_, grown, head_dim_}, f);
  Tensor v = at::zeros_like(k);
  Tensor p = at::zeros({batch_, kv_heads_, grown}, part_time_.options());
  k.narrow(2, 0, length_).copy_(k_time_.narrow(2, 0, length_));
  v.narrow(2, 0, length_).copy_(v_time_.narrow(2, 0, length_));
  p.narrow(2, 0, length_).copy_(part_time_.narrow(2, 0, length_));
  k_time_ = k;
  v_time_ = v;
  part_time_ = p;
}

void PartitionedKVCache::append(const Tensor& k_pre, const Tensor& k_rope, const Tensor& v) {
  const char* what = "PartitionedKVCache::append";
  for (const auto& [t, name] : {std::pair{&k_pre, "k_pre"}, {&k_rope, "k_rope"}, {&v, "v"}}) {
    TORCH_CHECK(t->defined() && t->dim() == 4 && t->size(0) == batch_ && t->size(1) == kv_heads_ &&
                    t->size(2) >= 1 && t->size(3) == head_dim_,
                what, ": ", name, " must be [B = ", batch_, ", Hkv = ", kv_heads_, ", n >= 1, D = ",
                head_dim_, "], got ", t->defined() ? t->sizes() : at::IntArrayRef{});
    TORCH_CHECK(t->size(2) == k_pre.size(2), what, ": ", name, " has ", t->size(2),
                " tokens but k_pre has ", k_pre.size(2));
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), what, ": ", name,
                " must be floating, got ", t->scalar_type());
    TORCH_CHECK(t->device() == device_, what, ": ", name, " is on ", t->device(),
                " but the cache is on ", device_);
  }
  const int64_t n = k_pre.size(2);
  Tensor partition = assign_key_partitions(k_pre, centroids_);
  reserve(length_ + n);
  k_time_.narrow(2, length_, n).copy_(k_rope);
  v_time_.narrow(2, length_, n).copy_(v);
  part_time_.narrow(2, length_, n).copy_(partition);
  length_ += n;
  // Keys j <= T - 1 - local_window are routed; the rest are in the window.
  const int64_t end = std::max(options_.sink_tokens, length_ - options_.local_window);
  if (end > routed_end_) insert(routed_end_, end);
}

namespace {

// Stable rank of every id among the equal ids of its row: ids [R, n] in [0, C)
// -> (rank [R, n], count per id [R, C]), both int64.
std::pair<Tensor, Tensor> rank_within_partition(const Tensor& ids, int64_t num_partitions) {
  const int64_t rows = ids.size(0), n = ids.size(1);
  Tensor counts = at::zeros({rows, num_partitions}, ids.options())
                      .scatter_add_(1, ids, at::ones_like(ids));
  auto [sorted, order] = ids.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false);
  Tensor first = counts.cumsum(1) - counts;  // first sorted slot of each id
  Tensor rank_sorted = at::arange(n, ids.options()).unsqueeze(0) - first.gather(1, sorted);
  Tensor rank = at::empty_like(ids).scatter_(1, order, rank_sorted);
  return {rank, counts};
}

}  // namespace

// Writes the routed keys at positions [begin, end) into their partitions'
// next free rows (the caller has made sure they fit).
void PartitionedKVCache::insert(int64_t begin, int64_t end) {
  const int64_t rows = batch_ * kv_heads_, n = end - begin;
  Tensor ids = part_time_.narrow(2, begin, n).reshape({rows, n});
  Tensor start = start_.view({rows, num_partitions_}), len = len_.view({rows, num_partitions_});
  // One token per step (decode): its rank within its partition is 0.
  Tensor rank, counts;
  if (n > 1) std::tie(rank, counts) = rank_within_partition(ids, num_partitions_);
  if (n > min_slack_) {
    // The new keys could overfill a partition: check (one sync), and lay
    // every partition out anew (new keys included) when one would.
    if (!counts.defined()) {
      counts = at::zeros({rows, num_partitions_}, ids.options())
                   .scatter_add_(1, ids, at::ones_like(ids));
    }
    if ((len + counts > cap_.view({rows, num_partitions_})).any().item<bool>()) {
      routed_end_ = end;
      rebuild();
      return;
    }
  }
  Tensor row = (start.gather(1, ids) + len.gather(1, ids)).to(at::kLong);  // [R, n]
  if (rank.defined()) row += rank;
  write_rows(row, begin);
  len.scatter_add_(1, ids, at::ones_like(ids, len.options()));
  routed_end_ = end;
  if (n > min_slack_) {
    refresh_slack();
  } else {
    min_slack_ -= n;
  }
}

// Copies the keys and values at time positions [begin, begin + n) of every
// (b, kv head) to the partition rows row [B * Hkv, n].
void PartitionedKVCache::write_rows(const Tensor& row, int64_t begin) {
  const int64_t rows = row.size(0), n = row.size(1), capacity = k_part_.size(2);
  Tensor row_d = row.unsqueeze(-1).expand({rows, n, head_dim_});
  k_part_.view({rows, capacity, head_dim_})
      .scatter_(1, row_d, k_time_.narrow(2, begin, n).reshape({rows, n, head_dim_}));
  v_part_.view({rows, capacity, head_dim_})
      .scatter_(1, row_d, v_time_.narrow(2, begin, n).reshape({rows, n, head_dim_}));
  row_pos_.view({rows, capacity})
      .scatter_(1, row, (at::arange(n, row.options()) + begin).unsqueeze(0).expand({rows, n}));
}

void PartitionedKVCache::refresh_slack() {
  min_slack_ = (cap_ - len_).min().item<int64_t>();
}

// Lays every partition out anew from the time-ordered cache: partition c of
// each (b, kv head) gets cap_c = len_c + ceil(len_c / 4) + 16 rows, the
// partitions in id order; the buffer is as long as the longest row needs.
void PartitionedKVCache::rebuild() {
  const int64_t rows = batch_ * kv_heads_, sinks = options_.sink_tokens;
  const int64_t n = std::max<int64_t>(0, routed_end_ - sinks);
  auto index_options = part_time_.options();
  Tensor ids = part_time_.narrow(2, std::min(sinks, length_), n).reshape({rows, n});
  auto [rank, counts] = rank_within_partition(ids, num_partitions_);
  Tensor cap = counts + at::floor_divide(counts + 3, 4) + 16;
  Tensor start = cap.cumsum(1) - cap;
  const int64_t capacity = cap.sum(1).max().item<int64_t>();
  auto f = at::TensorOptions().dtype(dtype_).device(device_);
  k_part_ = at::zeros({batch_, kv_heads_, capacity, head_dim_}, f);
  v_part_ = at::zeros_like(k_part_);
  row_pos_ = at::full({batch_, kv_heads_, capacity}, -1, index_options);
  if (n > 0) write_rows(start.gather(1, ids) + rank, sinks);
  start_ = start.to(at::kInt).view({batch_, kv_heads_, num_partitions_}).contiguous();
  len_ = counts.to(at::kInt).view({batch_, kv_heads_, num_partitions_}).contiguous();
  cap_ = cap.to(at::kInt).view({batch_, kv_heads_, num_partitions_}).contiguous();
  min_slack_ = 16;  // a lower bound: every partition got at least 16 free rows
  ++rebuilds_;
}

Tensor PartitionedKVCache::keys() const { return k_time_.narrow(2, 0, length_); }
Tensor PartitionedKVCache::values() const { return v_time_.narrow(2, 0, length_); }
Tensor PartitionedKVCache::key_partition() const { return part_time_.narrow(2, 0, length_); }

Tensor PartitionedKVCache::partition_keys(int64_t b, int64_t g, int64_t c) const {
  TORCH_CHECK(b >= 0 && b < batch_ && g >= 0 && g < kv_heads_ && c >= 0 && c < num_partitions_,
              "PartitionedKVCache::partition_keys: (b, g, c) = (", b, ", ", g, ", ", c,
              ") outside [", batch_, ", ", kv_heads_, ", ", num_partitions_, ")");
  const int64_t start = start_[b][g][c].item<int64_t>(), len = len_[b][g][c].item<int64_t>();
  return k_part_[b][g].narrow(0, start, len);
}

namespace {

// The always-attended rows of the newest token's query, as (begins, ends):
// the sinks [0, min(S, T)) and the window [max(T - W, min(S, T)), T), disjoint.
std::pair<std::array<int64_t, 2>, std::array<int64_t, 2>> dense_ranges(
    int64_t length, const SaapAttentionOptions& o) {
  const int64_t sink_end = std::min(o.sink_tokens, length);
  return {{0, std::max(length - o.local_window, sink_end)}, {sink_end, length}};
}

void check_decode_inputs(const Tensor& q, const Tensor& selected, int64_t batch, int64_t kv_heads,
                         int64_t head_dim, int64_t num_partitions, int64_t length,
                         const at::Device& device, bool check_ids) {
  const char* what = "PartitionedKVCache::decode";
  TORCH_CHECK(length >= 1, what, ": the cache is empty; append the new token first");
  TORCH_CHECK(q.defined() && q.dim() == 3 && q.size(0) == batch && q.size(2) == head_dim &&
                  q.size(1) >= 1 && q.size(1) % kv_heads == 0,
              what, ": q_rope must be [B = ", batch, ", Hq (a multiple of ", kv_heads, "), D = ",
              head_dim, "], got ", q.defined() ? q.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), what, ": q_rope must be floating, got ",
              q.scalar_type());
  TORCH_CHECK(selected.defined() && selected.dim() == 3 && selected.size(0) == batch &&
                  selected.size(1) == q.size(1) && selected.size(2) >= 1 &&
                  selected.size(2) <= num_partitions && is_index_type(selected),
              what, ": selected must be int64 or int32 [", batch, ", ", q.size(1),
              ", l in [1, C = ", num_partitions, "]], got ",
              selected.defined() ? selected.sizes() : at::IntArrayRef{});
  TORCH_CHECK(q.device() == device && selected.device() == device, what, ": q_rope (",
              q.device(), ") and selected (", selected.device(), ") must be on the cache's device ",
              device);
  if (check_ids) check_id_range(selected, -1, num_partitions, what, "selected");
}

}  // namespace

Tensor PartitionedKVCache::decode_reference(const Tensor& q, const Tensor& selected,
                                            SaapVisitStats* stats) const {
  check_decode_inputs(q, selected, batch_, kv_heads_, head_dim_, num_partitions_, length_,
                      device_, /*check_ids=*/true);
  const at::ScalarType ct = compute_type(q);
  const int64_t hq = q.size(1), group = hq / kv_heads_, rows = batch_ * kv_heads_;
  const int64_t capacity = k_part_.size(2);
  const double scale = softmax_scale(options_.scale, head_dim_);
  Tensor qf = q.to(ct).view({batch_, kv_heads_, group, head_dim_});

  // Routed rows: row r of (b, g) belongs to the partition c with
  // start_c <= r < start_c + len_c (starts increase with c), if any.
  Tensor start = start_.view({rows, num_partitions_}).to(at::kLong);
  Tensor len = len_.view({rows, num_partitions_}).to(at::kLong);
  Tensor row = at::arange(capacity, start.options()).unsqueeze(0).expand({rows, capacity});
  Tensor part = (at::searchsorted(start, row.contiguous(), /*out_int32=*/false, /*right=*/true) - 1)
                    .clamp_min_(0);
  Tensor used = row < start.gather(1, part) + len.gather(1, part);  // [R, capacity]
  Tensor member = membership(selected, num_partitions_)
                      .view({batch_, kv_heads_, group, num_partitions_ + 1});
  Tensor routed = member.gather(3, part.view({batch_, kv_heads_, 1, capacity})
                                       .expand({batch_, kv_heads_, group, capacity})) &
                  used.view({batch_, kv_heads_, 1, capacity});
  Tensor routed_scores = at::matmul(qf, k_part_.to(ct).transpose(2, 3)).mul_(scale);
  routed_scores.masked_fill_(routed.logical_not(), kNegInf);

  auto [begin, end] = dense_ranges(length_, options_);
  std::vector<Tensor> dense_k, dense_v;
  for (int r = 0; r < 2; ++r) {
    dense_k.push_back(k_time_.narrow(2, begin[r], end[r] - begin[r]));
    dense_v.push_back(v_time_.narrow(2, begin[r], end[r] - begin[r]));
  }
  Tensor kd = at::cat(dense_k, 2).to(ct), vd = at::cat(dense_v, 2).to(ct);
  Tensor dense_scores = at::matmul(qf, kd.transpose(2, 3)).mul_(scale);

  Tensor weights = at::softmax(at::cat({routed_scores, dense_scores}, 3), 3);
  Tensor out = at::matmul(weights.narrow(3, 0, capacity), v_part_.to(ct)) +
               at::matmul(weights.narrow(3, capacity, kd.size(2)), vd);
  if (stats != nullptr) {
    *stats = SaapVisitStats{};
    const int64_t queries = batch_ * hq;
    stats->routed_visited = routed.sum().item<int64_t>();
    stats->visited_pairs = stats->routed_visited + queries * kd.size(2);
    stats->causal_pairs = queries * length_;
    stats->routable_pairs =
        queries * std::max<int64_t>(0, length_ - options_.local_window - options_.sink_tokens);
  }
  return out.view({batch_, hq, head_dim_}).to(q.scalar_type());
}

bool PartitionedKVCache::uses_kernel(at::ScalarType q_dtype) const {
#ifdef SF_SAAP_WITH_KERNELS
  return device_.is_cuda() && (dtype_ == at::kBFloat16 || dtype_ == at::kHalf) &&
         q_dtype == dtype_ && (head_dim_ == 64 || head_dim_ == 128);
#else
  (void)q_dtype;
  return false;
#endif
}

SaapVisitStats PartitionedKVCache::decode_stats(const Tensor& selected) const {
  TORCH_CHECK(selected.defined() && selected.dim() == 3 && selected.size(0) == batch_ &&
                  selected.size(1) % kv_heads_ == 0 && is_index_type(selected) &&
                  selected.device() == device_,
              "PartitionedKVCache::decode_stats: selected must be int64 or int32 [B = ", batch_,
              ", Hq, l] on ", device_);
  check_id_range(selected, -1, num_partitions_, "PartitionedKVCache::decode_stats", "selected");
  const int64_t hq = selected.size(1), group = hq / kv_heads_;
  Tensor member = membership(selected, num_partitions_)
                      .narrow(2, 0, num_partitions_)
                      .view({batch_, kv_heads_, group, num_partitions_});
  Tensor routed = (member.to(at::kLong) * len_.to(at::kLong).unsqueeze(2)).sum();
  auto [begin, end] = dense_ranges(length_, options_);
  const int64_t queries = batch_ * hq;
  SaapVisitStats stats;
  stats.routed_visited = routed.item<int64_t>();
  stats.visited_pairs = stats.routed_visited + queries * (end[0] - begin[0] + end[1] - begin[1]);
  stats.causal_pairs = queries * length_;
  stats.routable_pairs =
      queries * std::max<int64_t>(0, length_ - options_.local_window - options_.sink_tokens);
  return stats;
}

Tensor PartitionedKVCache::decode(const Tensor& q, const Tensor& selected,
                                  SaapVisitStats* stats) const {
  if (!q.defined() || !uses_kernel(q.scalar_type())) {
    Tensor out = decode_reference(q, selected);
    if (stats != nullptr) *stats = decode_stats(selected);
    return out;
  }
#ifdef SF_SAAP_WITH_KERNELS
  // No id check here: it would cost a device sync per layer and step, and
  // the kernel skips ids outside [0, C) rather than reading them.
  check_decode_inputs(q, selected, batch_, kv_heads_, head_dim_, num_partitions_, length_,
                      device_, /*check_ids=*/false);
  if (stats != nullptr) *stats = decode_stats(selected);
  namespace sk = sparseflash::saap::kernels;
  c10::cuda::CUDAGuard guard(device_);
  Tensor qc = q.contiguous();
  Tensor sel = selected.to(at::kInt).contiguous();
  Tensor out = at::empty_like(qc);
  sk::DecodeParams p;
  p.dtype = dtype_ == at::kBFloat16 ? sk::DType::kBF16 : sk::DType::kFP16;
  p.batch = static_cast<int>(batch_);
  p.q_heads = static_cast<int>(q.size(1));
  p.kv_heads = static_cast<int>(kv_heads_);
  p.head_dim = static_cast<int>(head_dim_);
  p.num_partitions = static_cast<int>(num_partitions_);
  p.top_l = static_cast<int>(sel.size(2));
  p.q = qc.data_ptr();
  p.k_part = k_part_.data_ptr();
  p.v_part = v_part_.data_ptr();
  p.part_capacity = k_part_.size(2);
  p.part_start = start_.data_ptr<int32_t>();
  p.part_len = len_.data_ptr<int32_t>();
  p.selected = sel.data_ptr<int32_t>();
  p.k_dense = k_time_.data_ptr();
  p.v_dense = v_time_.data_ptr();
  p.dense_capacity = k_time_.size(2);
  auto [begin, end] = dense_ranges(length_, options_);
  for (int r = 0; r < 2; ++r) {
    p.dense_begin[r] = begin[r];
    p.dense_end[r] = end[r];
  }
  p.scale = static_cast<float>(softmax_scale(options_.scale, head_dim_));
  p.out = out.data_ptr();
  p.stream = at::cuda::getCurrentCUDAStream();
  p.workspace_bytes = sk::decode_workspace_bytes(p);
  Tensor workspace;
  if (p.workspace_bytes > 0) {
    workspace = at::empty({static_cast<int64_t>(p.workspace_bytes)},
                          qc.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
  }
  try {
    sk::launch_saap_decode(p);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "PartitionedKVCache::decode: ", e.what());
  }
  return out;
#else
  return decode_reference(q, selected);
#endif
}

}  // namespace sparseflash::saap
