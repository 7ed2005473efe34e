// SAAP decode attention: split kernel (one CTA per chunk of a head's keys)
// and combine kernel. See decode.h for the interface and the semantics.
//
// Work layout. The keys of head (b, h) are a list of spans: the selected
// partitions in list order (skipped ids and repeats get length 0), then the
// two dense ranges. Every CTA of the head rebuilds that list in shared
// memory (a few hundred bytes of reads) and takes the keys
// [T * s / S, T * (s + 1) / S) of it, T the head's total. Inside a CTA a
// "group" of D / 8 lanes owns one key at a time: each lane holds 8 of the
// D elements (one 16-byte load of K and one of V per key), the dot product
// is a shuffle reduction over the group. A group issues the loads of
// kKeysPerGroup keys (K and V) before using any of them, so a 4-warp CTA has
// 32 (D = 128) or 64 (D = 64) key rows in flight. Each group keeps its own
// running max / sum / acc (base-2 exponent, scale folded into q); the CTA
// merges its groups through shared memory at the end. No atomics.
#include "saap/kernels/decode.h"

#include "attention/kernels/convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace sparseflash::saap::kernels {
namespace {

constexpr int kThreads = 128;      // 4 warps per CTA
constexpr int kKeysPerGroup = 4;   // keys a group loads before it reduces
// Splits: chunks of about 512 keys, up to 8 waves of CTAs (an H100 has 132
// SMs x 4 resident CTAs at ~116 registers). Heads differ in their number of
// keys (the selected partitions differ in size), so several waves of smaller
// chunks let the block scheduler even that out; but each chunk adds a
// start-up (span list) and a partial result to combine. Measured on an H100
// (bench_saap_decode's sweep of chunks per head, Llama-3.1-8B shapes, 5% of
// keys): the kernel was fastest at 16 chunks per head for 128k keys and at
// 16-32 for 256k and 512k, at batch 1 and 8 alike, i.e. at 400-800 keys
// per chunk; 128 keys per chunk (64 chunks) cost 15-25% more at batch 1.
constexpr int kTargetCtas = 4096;
constexpr int kMinKeysPerSplit = 512;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------
// Element conversions (8 elements = one 16-byte load).

template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]);

template <>
__device__ __forceinline__ void unpack8<__nv_bfloat16>(const uint4& raw, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

template <>
__device__ __forceinline__ void unpack8<__half>(const uint4& raw, float (&f)[8]) {
  const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x;
    f[2 * i + 1] = x.y;
  }
}

using sparseflash::kernels::from_float;  // attention/kernels/convert.cuh

template <int D>
struct Shape {
  static constexpr int kLanesPerKey = D / 8;                 // lanes sharing one key row
  static constexpr int kGroups = kThreads / kLanesPerKey;     // groups per CTA
  static constexpr int kRowsPerStep = kGroups * kKeysPerGroup;
};

// Shared memory of the split kernel, carved from the dynamic allocation.
struct SpanList {
  int64_t* prefix;  // [n + 1]: keys of spans before span i
  int64_t* row;     // [n]: first row of span i in its tensor
  int64_t* len;     // [n]
  int32_t* ids;     // [top_l]: selected ids, -1 where skipped
  float* group_m;   // [kGroups]
  float* group_l;   // [kGroups]
  float* group_acc; // [kGroups * D]
};

__host__ __device__ inline size_t align16(size_t x) { return (x + 15) / 16 * 16; }

template <int D>
__host__ __device__ inline size_t split_smem_bytes(int top_l) {
  const int n = top_l + 2;
  return align16(sizeof(int64_t) * (n + 1)) + align16(sizeof(int64_t) * n) +
         align16(sizeof(int64_t) * n) + align16(sizeof(int32_t) * (top_l > 0 ? top_l : 1)) +
         align16(sizeof(float) * Shape<D>::kGroups * 2) +
         align16(sizeof(float) * Shape<D>::kGroups * D);
}

template <int D>
__device__ SpanList carve(char* smem, int top_l) {
  const int n = top_l + 2;
  SpanList s;
  s.prefix = reinterpret_cast<int64_t*>(smem);
  smem += align16(sizeof(int64_t) * (n + 1));
  s.row = reinterpret_cast<int64_t*>(smem);
  smem += align16(sizeof(int64_t) * n);
  s.len = reinterpret_cast<int64_t*>(smem);
  smem += align16(sizeof(int64_t) * n);
  s.ids = reinterpret_cast<int32_t*>(smem);
  smem += align16(sizeof(int32_t) * (top_l > 0 ? top_l : 1));
  s.group_m = reinterpret_cast<float*>(smem);
  s.group_l = s.group_m + Shape<D>::kGroups;
  smem += align16(sizeof(float) * Shape<D>::kGroups * 2);
  s.group_acc = reinterpret_cast<float*>(smem);
  return s;
}

// Workspace: per (head, split) the base-2 running max, the sum and the
// unnormalised accumulator.
struct Partials {
  float* m;    // [heads * S]
  float* l;    // [heads * S]
  float* acc;  // [heads * S * D]
};

__host__ __device__ inline Partials partials_of(void* ws, int64_t heads, int splits, int d) {
  char* p = static_cast<char*>(ws);
  const int64_t n = heads * splits;
  Partials r;
  r.m = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * n);
  r.l = reinterpret_cast<float*>(p);
  p += align16(sizeof(float) * n);
  r.acc = reinterpret_cast<float*>(p);
  (void)d;
  return r;
}

size_t partials_bytes(int64_t heads, int splits, int d) {
  const int64_t n = heads * splits;
  return 2 * align16(sizeof(float) * n) + align16(sizeof(float) * n * d);
}

struct KernelArgs {
  DecodeParams p;
  int splits;
  float q_scale;  // softmax scale * log2(e)
};

// ---------------------------------------------------------------------------
// Span list of head (b, h): selected partitions (skipped / repeated -> 0 keys)
// then the dense ranges; exclusive prefix sums. Ends with __syncthreads.

template <int D>
__device__ void build_spans(const DecodeParams& p, int b, int h, const SpanList& s) {
  const int top_l = p.top_l, n = top_l + 2, C = p.num_partitions;
  const int g = h / (p.q_heads / p.kv_heads);
  const int32_t* sel = p.selected + (static_cast<int64_t>(b) * p.q_heads + h) * top_l;
  for (int i = threadIdx.x; i < top_l; i += kThreads) {
    const int id = sel[i];
    s.ids[i] = (id >= 0 && id < C) ? id : -1;
  }
  __syncthreads();
  const int64_t part_base = (static_cast<int64_t>(b) * p.kv_heads + g) * C;
  for (int i = threadIdx.x; i < n; i += kThreads) {
    int64_t lo = 0, hi = 0;
    if (i < top_l) {
      const int id = s.ids[i];
      bool first = id >= 0;
      for (int j = 0; first && j < i; ++j) first = s.ids[j] != id;
      if (first) {
        const int64_t start = p.part_start[part_base + id];
        lo = max(start, int64_t{0});
        hi = min(start + p.part_len[part_base + id], p.part_capacity);
      }
    } else {
      lo = p.dense_begin[i - top_l];
      hi = p.dense_end[i - top_l];
    }
    s.row[i] = lo;
    s.len[i] = hi > lo ? hi - lo : 0;
  }
  __syncthreads();
  // Exclusive scan of len by warp 0, 32 spans at a time.
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int64_t carry = 0;
    if (lane == 0) s.prefix[0] = 0;
    for (int base = 0; base < n; base += 32) {
      int64_t x = base + lane < n ? s.len[base + lane] : 0;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int64_t y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
      }
      if (base + lane < n) s.prefix[base + lane + 1] = carry + x;
      carry += __shfl_sync(0xffffffffu, x, 31);
    }
  }
  __syncthreads();
}

// The span holding virtual key v (the first span whose end is past v; spans
// of length 0 are passed over). v < prefix[n] unless the chunk is empty.
__device__ inline int first_span(const SpanList& s, int n, int64_t v) {
  int lo = 0, hi = n - 1;  // answer in [lo, hi]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (s.prefix[mid + 1] > v) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

// Row addresses of one lane's keys, visited in increasing virtual order: the
// span index only moves forward. The pointers include the lane's 8 columns.
template <typename T, int D>
struct KeyCursor {
  __device__ KeyCursor(const SpanList& s, int top_l, int span, const T* k_part, const T* v_part,
                       const T* k_dense, const T* v_dense)
      : spans(s), top_l(top_l), span(span), k_part(k_part), v_part(v_part), k_dense(k_dense),
        v_dense(v_dense) {}

  // Loads key v's slices of K and V, or zeros when v >= end (no memory access).
  __device__ __forceinline__ void load(int64_t v, int64_t end, uint4& k, uint4& val) {
    if (v >= end) {
      k = val = make_uint4(0, 0, 0, 0);
      return;
    }
    while (spans.prefix[span + 1] <= v) ++span;
    const int64_t row = (spans.row[span] + (v - spans.prefix[span])) * D;
    const bool dense = span >= top_l;
    k = __ldg(reinterpret_cast<const uint4*>((dense ? k_dense : k_part) + row));
    val = __ldg(reinterpret_cast<const uint4*>((dense ? v_dense : v_part) + row));
  }

  const SpanList& spans;
  const int top_l;
  int span;
  const T *k_part, *v_part, *k_dense, *v_dense;
};

// ---------------------------------------------------------------------------
// Split kernel: grid (splits, q_heads, batch).

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
decode_split_kernel(const __grid_constant__ KernelArgs args) {
  using S = Shape<D>;
  extern __shared__ __align__(16) char smem[];
  const DecodeParams& p = args.p;
  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int g = h / (p.q_heads / p.kv_heads);
  const SpanList spans = carve<D>(smem, p.top_l);
  build_spans<D>(p, b, h, spans);

  const int n = p.top_l + 2;
  const int64_t total = spans.prefix[n];
  const int64_t chunk_begin = total * split / args.splits;
  const int64_t chunk_end = total * (split + 1) / args.splits;

  const int group = threadIdx.x / S::kLanesPerKey;
  const int lane = threadIdx.x % S::kLanesPerKey;
  const int64_t head = static_cast<int64_t>(b) * p.q_heads + h;

  float q[8];
  unpack8<T>(*reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + head * D + lane * 8), q);
#pragma unroll
  for (int j = 0; j < 8; ++j) q[j] *= args.q_scale;

  float m = -INFINITY, l = 0.f, acc[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j] = 0.f;

  const int64_t kv = static_cast<int64_t>(b) * p.kv_heads + g;
  KeyCursor<T, D> cursor(spans, p.top_l, first_span(spans, n, chunk_begin),
                         static_cast<const T*>(p.k_part) + kv * p.part_capacity * D + lane * 8,
                         static_cast<const T*>(p.v_part) + kv * p.part_capacity * D + lane * 8,
                         static_cast<const T*>(p.k_dense) + kv * p.dense_capacity * D + lane * 8,
                         static_cast<const T*>(p.v_dense) + kv * p.dense_capacity * D + lane * 8);
  // Software pipeline: the loads of step t + 1 are issued before step t is
  // reduced. Every thread runs the same number of steps (the shuffles need
  // the whole warp); keys past the chunk's end load nothing and score -inf.
  uint4 kr[kKeysPerGroup], vr[kKeysPerGroup];
#pragma unroll
  for (int u = 0; u < kKeysPerGroup; ++u)
    cursor.load(chunk_begin + u * S::kGroups + group, chunk_end, kr[u], vr[u]);
  for (int64_t base = chunk_begin; base < chunk_end; base += S::kRowsPerStep) {
    uint4 kn[kKeysPerGroup], vn[kKeysPerGroup];
#pragma unroll
    for (int u = 0; u < kKeysPerGroup; ++u)
      cursor.load(base + S::kRowsPerStep + u * S::kGroups + group, chunk_end, kn[u], vn[u]);
    float s[kKeysPerGroup];
#pragma unroll
    for (int u = 0; u < kKeysPerGroup; ++u) {
      float k[8];
      unpack8<T>(kr[u], k);
      float d = 0.f;
#pragma unroll
      for (int j = 0; j < 8; ++j) d = fmaf(q[j], k[j], d);
#pragma unroll
      for (int o = S::kLanesPerKey / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      s[u] = base + u * S::kGroups + group < chunk_end ? d : -INFINITY;
    }
    float mx = m;
#pragma unroll
    for (int u = 0; u < kKeysPerGroup; ++u) mx = fmaxf(mx, s[u]);
    if (mx != -INFINITY) {  // (else none of this group's keys of the step were in the chunk)
      const float factor = exp2f(m - mx);
      l *= factor;
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[j] *= factor;
#pragma unroll
      for (int u = 0; u < kKeysPerGroup; ++u) {
        const float w = exp2f(s[u] - mx);
        float v[8];
        unpack8<T>(vr[u], v);
        l += w;
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[j] = fmaf(w, v[j], acc[j]);
      }
      m = mx;
    }
#pragma unroll
    for (int u = 0; u < kKeysPerGroup; ++u) kr[u] = kn[u], vr[u] = vn[u];
  }

  // Merge the groups of this CTA.
  if (lane == 0) {
    spans.group_m[group] = m;
    spans.group_l[group] = l;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) spans.group_acc[group * D + lane * 8 + j] = acc[j];
  __syncthreads();
  if (threadIdx.x >= D) return;
  const int d = threadIdx.x;
  float mx = -INFINITY;
  for (int k = 0; k < S::kGroups; ++k) mx = fmaxf(mx, spans.group_m[k]);
  float sum = 0.f, a = 0.f;
  if (mx != -INFINITY) {
    for (int k = 0; k < S::kGroups; ++k) {
      const float w = exp2f(spans.group_m[k] - mx);
      sum += w * spans.group_l[k];
      a += w * spans.group_acc[k * D + d];
    }
  }
  if (args.splits == 1) {
    static_cast<T*>(p.out)[head * D + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
    if (p.lse != nullptr && d == 0) p.lse[head] = sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
    return;
  }
  const Partials part = partials_of(p.workspace, int64_t{p.batch} * p.q_heads, args.splits, D);
  const int64_t slot = head * args.splits + split;
  part.acc[slot * D + d] = a;
  if (d == 0) {
    part.m[slot] = mx;
    part.l[slot] = sum;
  }
}

// ---------------------------------------------------------------------------
// Combine kernel: grid (batch * q_heads), D threads.

template <typename T, int D>
__global__ void __launch_bounds__(D) decode_combine_kernel(const __grid_constant__ KernelArgs args) {
  const DecodeParams& p = args.p;
  const int64_t head = blockIdx.x;
  const int d = threadIdx.x, splits = args.splits;
  const Partials part = partials_of(p.workspace, int64_t{p.batch} * p.q_heads, splits, D);
  const float* m = part.m + head * splits;
  const float* l = part.l + head * splits;
  const float* acc = part.acc + head * splits * D;
  float mx = -INFINITY;
  for (int s = 0; s < splits; ++s) mx = fmaxf(mx, m[s]);
  float sum = 0.f, a = 0.f;
  if (mx != -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float w = exp2f(m[s] - mx);
      sum += w * l[s];
      a += w * acc[s * D + d];
    }
  }
  static_cast<T*>(p.out)[head * D + d] = from_float<T>(sum > 0.f ? a / sum : 0.f);
  if (p.lse != nullptr && d == 0) p.lse[head] = sum > 0.f ? (mx + log2f(sum)) * kLn2 : -INFINITY;
}

// ---------------------------------------------------------------------------
// Host side.

[[noreturn]] void invalid(const std::string& field, const std::string& what) {
  throw std::invalid_argument("launch_saap_decode: DecodeParams." + field + " " + what);
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void require_tensor(const void* ptr, const char* field) {
  if (ptr == nullptr) invalid(field, "is null");
  if (!aligned16(ptr)) invalid(field, "must be 16-byte aligned (16-byte vector loads)");
}

bool any_dense(const DecodeParams& p) {
  return p.dense_end[0] > p.dense_begin[0] || p.dense_end[1] > p.dense_begin[1];
}

void validate_shapes(const DecodeParams& p) {
  if (p.dtype != DType::kBF16 && p.dtype != DType::kFP16) invalid("dtype", "is not kBF16 or kFP16");
  if (p.batch <= 0 || p.batch > 65535) invalid("batch", "must be in [1, 65535], got " + std::to_string(p.batch));
  if (p.q_heads <= 0 || p.q_heads > 65535)
    invalid("q_heads", "must be in [1, 65535], got " + std::to_string(p.q_heads));
  if (p.kv_heads <= 0 || p.q_heads % p.kv_heads != 0)
    invalid("kv_heads", "must be positive and divide q_heads (" + std::to_string(p.q_heads) +
                            "), got " + std::to_string(p.kv_heads));
  if (p.head_dim != 64 && p.head_dim != 128)
    invalid("head_dim", "must be 64 or 128, got " + std::to_string(p.head_dim));
  if (p.num_partitions < 0) invalid("num_partitions", "is negative: " + std::to_string(p.num_partitions));
  if (p.top_l < 0 || p.top_l > kMaxTopL)
    invalid("top_l", "must be in [0, " + std::to_string(kMaxTopL) + "], got " + std::to_string(p.top_l));
  if (p.part_capacity < 0) invalid("part_capacity", "is negative: " + std::to_string(p.part_capacity));
  if (p.dense_capacity < 0) invalid("dense_capacity", "is negative: " + std::to_string(p.dense_capacity));
  for (int r = 0; r < 2; ++r) {
    const std::string name = "[" + std::to_string(r) + "]";
    if (p.dense_begin[r] < 0 || p.dense_begin[r] > p.dense_end[r] || p.dense_end[r] > p.dense_capacity)
      invalid("dense_begin" + name + "/dense_end" + name,
              "must satisfy 0 <= begin <= end <= dense_capacity (" + std::to_string(p.dense_capacity) +
                  "), got [" + std::to_string(p.dense_begin[r]) + ", " + std::to_string(p.dense_end[r]) + ")");
  }
  const bool both = p.dense_end[0] > p.dense_begin[0] && p.dense_end[1] > p.dense_begin[1];
  if (both && p.dense_begin[0] < p.dense_end[1] && p.dense_begin[1] < p.dense_end[0])
    invalid("dense_begin/dense_end", "ranges 0 and 1 overlap (a key would count twice)");
  if (!std::isfinite(p.scale)) invalid("scale", "is not finite");
  if (p.num_splits < 0 || p.num_splits > kMaxSplits)
    invalid("num_splits", "must be in [0, " + std::to_string(kMaxSplits) + "], got " + std::to_string(p.num_splits));
}

}  // namespace

int decode_splits(const DecodeParams& p) {
  if (p.num_splits > 0) return std::min(p.num_splits, kMaxSplits);
  const int64_t heads = int64_t{p.batch} * p.q_heads;
  if (heads <= 0) return 1;
  // Expected keys of a head: top_l partitions of average size plus the dense rows.
  int64_t keys = 0;
  if (p.num_partitions > 0 && p.top_l > 0)
    keys += static_cast<int64_t>(static_cast<double>(p.part_capacity) * std::min(p.top_l, p.num_partitions) /
                                 p.num_partitions);
  for (int r = 0; r < 2; ++r) keys += std::max<int64_t>(0, p.dense_end[r] - p.dense_begin[r]);
  int64_t splits = (kTargetCtas + heads - 1) / heads;
  splits = std::min(splits, std::max<int64_t>(1, keys / kMinKeysPerSplit));
  return static_cast<int>(std::clamp<int64_t>(splits, 1, kMaxSplits));
}

size_t decode_workspace_bytes(const DecodeParams& p) {
  const int splits = decode_splits(p);
  if (splits == 1 || p.batch <= 0 || p.q_heads <= 0 || p.head_dim <= 0) return 0;
  return partials_bytes(int64_t{p.batch} * p.q_heads, splits, p.head_dim);
}

void launch_saap_decode(const DecodeParams& p) {
  validate_shapes(p);
  require_tensor(p.q, "q");
  require_tensor(p.out, "out");
  if (p.top_l > 0 && p.selected == nullptr) invalid("selected", "is null (top_l > 0)");
  if (p.top_l > 0 && p.num_partitions > 0) {
    require_tensor(p.k_part, "k_part");
    require_tensor(p.v_part, "v_part");
    if (p.part_start == nullptr) invalid("part_start", "is null");
    if (p.part_len == nullptr) invalid("part_len", "is null");
  }
  if (any_dense(p)) {
    require_tensor(p.k_dense, "k_dense");
    require_tensor(p.v_dense, "v_dense");
  }
  if (p.lse != nullptr && reinterpret_cast<uintptr_t>(p.lse) % alignof(float) != 0)
    invalid("lse", "is not 4-byte aligned");
  const int splits = decode_splits(p);
  const size_t need = decode_workspace_bytes(p);
  if (need > 0) {
    if (p.workspace == nullptr) invalid("workspace", "is null (" + std::to_string(need) + " bytes needed)");
    if (!aligned16(p.workspace)) invalid("workspace", "must be 16-byte aligned");
    if (p.workspace_bytes < need)
      invalid("workspace_bytes", "is " + std::to_string(p.workspace_bytes) + ", decode_workspace_bytes gives " +
                                     std::to_string(need));
  }

  KernelArgs args{p, splits, 0.f};
  const float scale = p.scale > 0.f ? p.scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  args.q_scale = scale * kLog2e;

  auto run = [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim_tag)::value;
    const dim3 grid(splits, p.q_heads, p.batch);
    decode_split_kernel<T, D><<<grid, kThreads, split_smem_bytes<D>(p.top_l), p.stream>>>(args);
    if (splits > 1) decode_combine_kernel<T, D><<<p.batch * p.q_heads, D, 0, p.stream>>>(args);
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (p.dtype == DType::kBF16) {
    p.head_dim == 64 ? run(__nv_bfloat16{}, D64{}) : run(__nv_bfloat16{}, D128{});
  } else {
    p.head_dim == 64 ? run(__half{}, D64{}) : run(__half{}, D128{});
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("launch_saap_decode: kernel launch failed: ") + cudaGetErrorString(e));
}

}  // namespace sparseflash::saap::kernels
