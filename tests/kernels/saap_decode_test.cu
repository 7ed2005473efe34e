// Torch-free tests of the SAAP decode kernel (saap/kernels/decode.h) against
// a float64 CPU reference computed from the same bf16 / fp16 inputs, and of
// the top-l selection kernel (saap/kernels/top_l.h) against a CPU sort.
//
// GPU tests skip themselves without a GPU; the SaapDecodeParams.* tests
// (validation and workspace sizing) never touch the device and always run.
// Every GPU case fills out and lse with 0xFF bytes (NaN) first, so an element
// the kernel leaves alone fails the check. The selected lists carry -1 entries,
// out-of-range ids and repeats (a repeated partition counts once: decode.h).
// SF_KERNEL_TEST_VERBOSE=1 prints the measured errors of passing cases too.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include "saap/kernels/decode.h"
#include "saap/kernels/top_l.h"

namespace sparseflash::saap::kernels_test {
namespace {

namespace sk = ::sparseflash::saap::kernels;
using sk::DType;

constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------
// Tolerances. Inputs are N(0, 1) (keys also get a random offset per head), so
// outputs are convex combinations of N(0, 1) values: |out| is O(1) and the
// error is dominated by rounding out to bf16 (8-bit mantissa) or fp16 (11-bit).
// The kernel accumulates in fp32; lse is fp32 end to end.

double out_tol(DType t) { return t == DType::kBF16 ? 2e-2 : 3e-3; }  // max abs error of out
double lse_tol(double lse) { return 1e-3 * std::max(1.0, std::fabs(lse)); }

// ---------------------------------------------------------------------------
// CUDA plumbing.

void check_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string(file) + ":" + std::to_string(line) + ": " + expr + " failed: " +
                             cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}
#define SF_CUDA_CHECK(expr) check_cuda((expr), #expr, __FILE__, __LINE__)

bool have_gpu() {
  static const bool has = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return n > 0;
  }();
  return has;
}

template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const std::vector<T>& h) : n_(h.size()) {
    SF_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p_), std::max<size_t>(n_, 1) * sizeof(T)));
    if (n_ > 0) SF_CUDA_CHECK(cudaMemcpy(p_, h.data(), n_ * sizeof(T), cudaMemcpyHostToDevice));
  }
  ~DeviceBuffer() { cudaFree(p_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return p_; }
  std::vector<T> download() const {
    std::vector<T> h(n_);
    SF_CUDA_CHECK(cudaDeviceSynchronize());
    if (n_ > 0) SF_CUDA_CHECK(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }

 private:
  T* p_ = nullptr;
  size_t n_ = 0;
};

// ---------------------------------------------------------------------------
// 16-bit storage on the host: values are rounded once, and the reference reads
// the rounded values back, so kernel and reference see identical inputs.

uint16_t to_bits(DType t, float x) {
  if (t == DType::kFP16) {
    const __half h = __float2half_rn(x);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);  // round to nearest even (inputs are finite)
  return static_cast<uint16_t>(u >> 16);
}

double from_bits(DType t, uint16_t b) {
  if (t == DType::kFP16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return static_cast<double>(__half2float(h));
  }
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// ---------------------------------------------------------------------------
// One test case: shapes, the partition layout and the selection.

struct Case {
  std::string name;
  DType dtype = DType::kBF16;
  int batch = 1, q_heads = 4, kv_heads = 4, head_dim = 128;
  int num_partitions = 16, top_l = 4;
  int routed = 1000;       // routed keys per (b, kv head), spread over the partitions
  int sinks = 4, window = 64;  // dense ranges [0, sinks) and [dense_capacity - window, dense_capacity)
  float scale = 0;
  bool blank_head = false;  // (0, 0) selects nothing (all -1); with no dense keys it has no key at all
  uint64_t seed = 1;
};

struct Inputs {
  std::vector<uint16_t> q, k_part, v_part, k_dense, v_dense;
  std::vector<int32_t> part_start, part_len, selected;
  int64_t part_capacity = 0, dense_capacity = 0;
  int64_t dense_begin[2] = {0, 0}, dense_end[2] = {0, 0};
};

Inputs make_inputs(const Case& c) {
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<double> unif(0.0, 1.0);
  const int B = c.batch, Hq = c.q_heads, Hkv = c.kv_heads, D = c.head_dim, C = c.num_partitions;
  Inputs in;

  // Partition sizes: keys drawn into partitions with skewed (log-normal)
  // weights, then partition 0 emptied and partition 1 cut to a single key.
  std::vector<std::vector<int>> lens(static_cast<size_t>(B) * Hkv, std::vector<int>(C, 0));
  for (auto& l : lens) {
    if (C == 0) continue;
    std::vector<double> w(C);
    for (auto& x : w) x = std::exp(1.5 * normal(rng));
    std::discrete_distribution<int> pick(w.begin(), w.end());
    for (int k = 0; k < c.routed; ++k) ++l[pick(rng)];
    if (C >= 3) {
      l[2] += l[0], l[0] = 0;
      if (l[1] > 1) l[2] += l[1] - 1, l[1] = 1;
      if (l[1] == 0 && l[2] > 0) l[1] = 1, --l[2];
    }
  }
  // Layout: partitions in a random order, with random gaps (rows no partition owns).
  in.part_start.assign(static_cast<size_t>(B) * Hkv * C, 0);
  in.part_len.assign(in.part_start.size(), 0);
  for (size_t bg = 0; bg < lens.size(); ++bg) {
    std::vector<int> order(C);
    for (int i = 0; i < C; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), rng);
    int64_t row = 0;
    for (int ci : order) {
      row += static_cast<int64_t>(rng() % 3);
      in.part_start[bg * C + ci] = static_cast<int32_t>(row);
      in.part_len[bg * C + ci] = lens[bg][ci];
      row += lens[bg][ci];
    }
    in.part_capacity = std::max(in.part_capacity, row + 3);
  }
  in.dense_capacity = static_cast<int64_t>(c.routed) + c.sinks + c.window;
  in.dense_begin[0] = 0, in.dense_end[0] = c.sinks;
  in.dense_begin[1] = in.dense_capacity - c.window, in.dense_end[1] = in.dense_capacity;

  auto fill = [&](std::vector<uint16_t>& v, int64_t rows_per_head, bool offset) {
    v.resize(static_cast<size_t>(B) * Hkv * rows_per_head * D);
    for (size_t bg = 0; bg < static_cast<size_t>(B) * Hkv; ++bg) {
      std::vector<float> shift(D, 0.f);
      if (offset)
        for (auto& s : shift) s = 0.5f * normal(rng);
      for (int64_t r = 0; r < rows_per_head; ++r)
        for (int d = 0; d < D; ++d)
          v[(bg * rows_per_head + r) * D + d] = to_bits(c.dtype, normal(rng) + shift[d]);
    }
  };
  fill(in.k_part, in.part_capacity, true);
  fill(in.v_part, in.part_capacity, false);
  fill(in.k_dense, in.dense_capacity, true);
  fill(in.v_dense, in.dense_capacity, false);
  in.q.resize(static_cast<size_t>(B) * Hq * D);
  for (auto& x : in.q) x = to_bits(c.dtype, normal(rng));

  // Selections: mostly valid ids, with -1, out-of-range ids and repeats.
  in.selected.resize(static_cast<size_t>(B) * Hq * c.top_l);
  for (size_t bh = 0; bh < static_cast<size_t>(B) * Hq; ++bh)
    for (int i = 0; i < c.top_l; ++i) {
      int32_t& id = in.selected[bh * c.top_l + i];
      const double u = unif(rng);
      if (u < 0.1) id = -1;
      else if (u < 0.13) id = (rng() % 2) ? C + static_cast<int>(rng() % 5) : -2 - static_cast<int>(rng() % 5);
      else if (u < 0.25 && i > 0) id = in.selected[bh * c.top_l + rng() % i];
      else id = C > 0 ? static_cast<int32_t>(rng() % C) : -1;
    }
  if (c.blank_head)
    for (int i = 0; i < c.top_l; ++i) in.selected[i] = -1;
  return in;
}

// ---------------------------------------------------------------------------
// float64 reference: softmax over the union of the selected partitions (each
// once) and the dense ranges.

struct Reference {
  std::vector<double> out, lse;
  int64_t max_keys = 0;  // the most keys any head attends to
};

Reference reference(const Case& c, const Inputs& in) {
  const int B = c.batch, Hq = c.q_heads, Hkv = c.kv_heads, D = c.head_dim, C = c.num_partitions;
  const double scale = c.scale > 0 ? c.scale : 1.0 / std::sqrt(static_cast<double>(D));
  Reference ref;
  ref.out.assign(static_cast<size_t>(B) * Hq * D, 0.0);
  ref.lse.assign(static_cast<size_t>(B) * Hq, -kInf);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h) {
      const int g = h / (Hq / Hkv);
      const size_t bg = static_cast<size_t>(b) * Hkv + g, bh = static_cast<size_t>(b) * Hq + h;
      // (rows of k_part / v_part or k_dense / v_dense, row index)
      std::vector<std::pair<bool, int64_t>> keys;
      std::set<int> seen;
      for (int i = 0; i < c.top_l; ++i) {
        const int id = in.selected[bh * c.top_l + i];
        if (id < 0 || id >= C || !seen.insert(id).second) continue;
        for (int r = 0; r < in.part_len[bg * C + id]; ++r) keys.push_back({false, in.part_start[bg * C + id] + r});
      }
      for (int r = 0; r < 2; ++r)
        for (int64_t j = in.dense_begin[r]; j < in.dense_end[r]; ++j) keys.push_back({true, j});
      ref.max_keys = std::max<int64_t>(ref.max_keys, keys.size());
      if (keys.empty()) continue;
      std::vector<double> s(keys.size());
      double mx = -kInf;
      for (size_t k = 0; k < keys.size(); ++k) {
        const auto& K = keys[k].first ? in.k_dense : in.k_part;
        const int64_t rows = keys[k].first ? in.dense_capacity : in.part_capacity;
        const size_t base = (bg * rows + keys[k].second) * D;
        double dot = 0;
        for (int d = 0; d < D; ++d) dot += from_bits(c.dtype, in.q[bh * D + d]) * from_bits(c.dtype, K[base + d]);
        s[k] = dot * scale;
        mx = std::max(mx, s[k]);
      }
      double sum = 0;
      std::vector<double> acc(D, 0.0);
      for (size_t k = 0; k < keys.size(); ++k) {
        const double w = std::exp(s[k] - mx);
        sum += w;
        const auto& V = keys[k].first ? in.v_dense : in.v_part;
        const int64_t rows = keys[k].first ? in.dense_capacity : in.part_capacity;
        const size_t base = (bg * rows + keys[k].second) * D;
        for (int d = 0; d < D; ++d) acc[d] += w * from_bits(c.dtype, V[base + d]);
      }
      for (int d = 0; d < D; ++d) ref.out[bh * D + d] = acc[d] / sum;
      ref.lse[bh] = mx + std::log(sum);
    }
  return ref;
}

// ---------------------------------------------------------------------------
// A case's inputs on the device, out / lse / workspace filled with 0xFF
// (NaN), and the params that point at them.

struct DeviceCase {
  DeviceCase(const Case& c, const Inputs& in, int num_splits = 0)
      : q(in.q), k_part(in.k_part), v_part(in.v_part), k_dense(in.k_dense), v_dense(in.v_dense),
        part_start(in.part_start), part_len(in.part_len), selected(in.selected),
        out(std::vector<uint16_t>(static_cast<size_t>(c.batch) * c.q_heads * c.head_dim, 0xFFFF)),
        lse(std::vector<float>(static_cast<size_t>(c.batch) * c.q_heads, std::numeric_limits<float>::quiet_NaN())) {
    p.dtype = c.dtype;
    p.batch = c.batch, p.q_heads = c.q_heads, p.kv_heads = c.kv_heads, p.head_dim = c.head_dim;
    p.num_partitions = c.num_partitions, p.top_l = c.top_l;
    p.q = q.get(), p.k_part = k_part.get(), p.v_part = v_part.get(), p.part_capacity = in.part_capacity;
    p.part_start = part_start.get(), p.part_len = part_len.get(), p.selected = selected.get();
    p.k_dense = k_dense.get(), p.v_dense = v_dense.get(), p.dense_capacity = in.dense_capacity;
    for (int r = 0; r < 2; ++r) p.dense_begin[r] = in.dense_begin[r], p.dense_end[r] = in.dense_end[r];
    p.scale = c.scale;
    p.num_splits = num_splits;
    p.out = out.get(), p.lse = lse.get();
    workspace = std::make_unique<DeviceBuffer<uint8_t>>(std::vector<uint8_t>(sk::decode_workspace_bytes(p), 0xFF));
    p.workspace_bytes = sk::decode_workspace_bytes(p);
    p.workspace = p.workspace_bytes > 0 ? workspace->get() : nullptr;
  }
  DeviceBuffer<uint16_t> q, k_part, v_part, k_dense, v_dense;
  DeviceBuffer<int32_t> part_start, part_len, selected;
  DeviceBuffer<uint16_t> out;
  DeviceBuffer<float> lse;
  std::unique_ptr<DeviceBuffer<uint8_t>> workspace;
  sk::DecodeParams p;
};

// Runs the kernel on one case and compares.
void run_case(const Case& c, int num_splits = 0) {
  const Inputs in = make_inputs(c);
  const Reference ref = reference(c, in);
  DeviceCase dev(c, in, num_splits);
  const sk::DecodeParams& p = dev.p;
  sk::launch_saap_decode(p);
  SF_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<uint16_t> got = dev.out.download();
  const std::vector<float> got_lse = dev.lse.download();

  double max_err = 0, max_lse_err = 0;
  int64_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double v = from_bits(c.dtype, got[i]);
    const double err = std::isfinite(v) ? std::fabs(v - ref.out[i]) : kInf;
    max_err = std::max(max_err, err);
    if (err > out_tol(c.dtype) && bad++ < 5)
      ADD_FAILURE() << c.name << ": out[" << i << "] = " << v << ", reference " << ref.out[i];
  }
  for (size_t i = 0; i < got_lse.size(); ++i) {
    if (std::isinf(ref.lse[i])) {
      EXPECT_TRUE(std::isinf(got_lse[i]) && got_lse[i] < 0) << c.name << ": lse[" << i << "] = " << got_lse[i]
                                                            << ", a head with no key must give -inf";
      for (int d = 0; d < c.head_dim; ++d)
        EXPECT_EQ(got[i * c.head_dim + d] & 0x7FFF, 0) << c.name << ": a head with no key must output 0";
      continue;
    }
    const double err = std::isfinite(got_lse[i]) ? std::fabs(got_lse[i] - ref.lse[i]) : kInf;
    max_lse_err = std::max(max_lse_err, err);
    EXPECT_LE(err, lse_tol(ref.lse[i])) << c.name << ": lse[" << i << "] = " << got_lse[i] << ", reference "
                                        << ref.lse[i];
  }
  EXPECT_LE(max_err, out_tol(c.dtype)) << c.name;
  if (std::getenv("SF_KERNEL_TEST_VERBOSE") != nullptr)
    std::printf("%-28s splits %2d  keys/head <= %6lld  max|out err| %.2e  max|lse err| %.2e\n", c.name.c_str(),
                sk::decode_splits(p), static_cast<long long>(ref.max_keys), max_err, max_lse_err);
}

std::vector<Case> cases() {
  std::vector<Case> v;
  auto add = [&](Case c) { v.push_back(std::move(c)); };
  uint64_t seed = 100;
  for (DType t : {DType::kBF16, DType::kFP16})
    for (int D : {64, 128}) {
      const std::string tn = std::string(t == DType::kBF16 ? "bf16" : "fp16") + "_d" + std::to_string(D);
      Case c;
      c.dtype = t, c.head_dim = D;
      // GQA 32/8, batch 1, ~5% of a 4097-key cache per head: several splits.
      c.name = tn + "_gqa_b1_4097";
      c.batch = 1, c.q_heads = 32, c.kv_heads = 8, c.num_partitions = 64, c.top_l = 8, c.routed = 4097;
      c.seed = ++seed;
      add(c);
      // MQA, batch 3, 1000 keys, a custom scale.
      c.name = tn + "_mqa_b3_1000";
      c.batch = 3, c.q_heads = 8, c.kv_heads = 1, c.num_partitions = 20, c.top_l = 12, c.routed = 1000;
      c.scale = 0.3f, c.seed = ++seed;
      add(c);
      c.scale = 0;
      // Hq == Hkv, batch 8, 127 keys, few partitions, no sinks.
      c.name = tn + "_mha_b8_127";
      c.batch = 8, c.q_heads = 4, c.kv_heads = 4, c.num_partitions = 7, c.top_l = 5, c.routed = 127;
      c.sinks = 0, c.window = 16, c.seed = ++seed;
      add(c);
      c.sinks = 4, c.window = 64;
      // One routed key, one partition, no dense keys; head (0, 0) selects nothing: 0 / -inf.
      c.name = tn + "_one_key_blank_head";
      c.batch = 3, c.q_heads = 32, c.kv_heads = 8, c.num_partitions = 1, c.top_l = 3, c.routed = 1;
      c.sinks = 0, c.window = 0, c.blank_head = true, c.seed = ++seed;
      add(c);
      c.sinks = 4, c.window = 64, c.blank_head = false;
      // Dense ranges only (top_l = 0), and a long routed cache with many splits.
      c.name = tn + "_dense_only";
      c.batch = 1, c.q_heads = 8, c.kv_heads = 2, c.num_partitions = 16, c.top_l = 0, c.routed = 300;
      c.sinks = 5, c.window = 700, c.seed = ++seed;
      add(c);
      c.sinks = 4, c.window = 64;
      c.name = tn + "_gqa_b1_long";
      c.batch = 1, c.q_heads = 4, c.kv_heads = 1, c.num_partitions = 96, c.top_l = 40, c.routed = 20000;
      c.seed = ++seed;
      add(c);
    }
  return v;
}

// The generated inputs exercise what the kernel must handle (runs without a GPU).
TEST(SaapDecodeInputs, CoverTheEdgeCases) {
  int minus_one = 0, out_of_range = 0, repeats = 0, empty = 0, single = 0, blank = 0;
  for (const Case& c : cases()) {
    const Inputs in = make_inputs(c);
    for (size_t bh = 0; bh < static_cast<size_t>(c.batch) * c.q_heads; ++bh) {
      std::set<int> seen;
      for (int i = 0; i < c.top_l; ++i) {
        const int id = in.selected[bh * c.top_l + i];
        minus_one += id == -1;
        out_of_range += id != -1 && (id < 0 || id >= c.num_partitions);
        repeats += id >= 0 && id < c.num_partitions && !seen.insert(id).second;
      }
    }
    for (int32_t len : in.part_len) empty += len == 0, single += len == 1;
    const Reference ref = reference(c, in);
    blank += static_cast<int>(std::count(ref.lse.begin(), ref.lse.end(), -kInf));
    for (size_t i = 0; i < ref.lse.size(); ++i)
      if (std::isfinite(ref.lse[i]))
        for (int d = 0; d < c.head_dim; ++d) ASSERT_TRUE(std::isfinite(ref.out[i * c.head_dim + d])) << c.name;
  }
  EXPECT_GT(minus_one, 0);
  EXPECT_GT(out_of_range, 0);
  EXPECT_GT(repeats, 0);
  EXPECT_GT(empty, 0);
  EXPECT_GT(single, 0);
  EXPECT_GT(blank, 0) << "no case has a head without any key";
}

// The reference with every partition selected once equals plain softmax
// attention over all routed and dense rows, computed here independently.
TEST(SaapDecodeInputs, ReferenceWithAllPartitionsIsDenseAttention) {
  Case c;
  c.dtype = DType::kFP16, c.batch = 2, c.q_heads = 4, c.kv_heads = 2, c.head_dim = 64, c.num_partitions = 9;
  c.top_l = 9, c.routed = 200, c.seed = 5;
  Inputs in = make_inputs(c);
  for (size_t bh = 0; bh < static_cast<size_t>(c.batch) * c.q_heads; ++bh)
    for (int i = 0; i < c.top_l; ++i) in.selected[bh * c.top_l + i] = i;
  const Reference ref = reference(c, in);
  const int D = c.head_dim;
  for (int b = 0; b < c.batch; ++b)
    for (int h = 0; h < c.q_heads; ++h) {
      const size_t bh = static_cast<size_t>(b) * c.q_heads + h, bg = static_cast<size_t>(b) * c.kv_heads + h / 2;
      std::vector<std::pair<const std::vector<uint16_t>*, size_t>> k, v;  // row offsets
      for (int ci = 0; ci < c.num_partitions; ++ci)
        for (int r = 0; r < in.part_len[bg * c.num_partitions + ci]; ++r) {
          const size_t off = (bg * in.part_capacity + in.part_start[bg * c.num_partitions + ci] + r) * D;
          k.push_back({&in.k_part, off}), v.push_back({&in.v_part, off});
        }
      for (int rr = 0; rr < 2; ++rr)
        for (int64_t j = in.dense_begin[rr]; j < in.dense_end[rr]; ++j) {
          const size_t off = (bg * in.dense_capacity + j) * D;
          k.push_back({&in.k_dense, off}), v.push_back({&in.v_dense, off});
        }
      ASSERT_EQ(k.size(), static_cast<size_t>(c.routed + c.sinks + c.window));
      std::vector<double> w(k.size());
      double sum = 0;
      for (size_t j = 0; j < k.size(); ++j) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += from_bits(c.dtype, in.q[bh * D + d]) * from_bits(c.dtype, (*k[j].first)[k[j].second + d]);
        w[j] = std::exp(dot / std::sqrt(static_cast<double>(D)));
        sum += w[j];
      }
      EXPECT_NEAR(ref.lse[bh], std::log(sum), 1e-9);
      for (int d = 0; d < D; ++d) {
        double o = 0;
        for (size_t j = 0; j < v.size(); ++j) o += w[j] * from_bits(c.dtype, (*v[j].first)[v[j].second + d]);
        EXPECT_NEAR(ref.out[bh * D + d], o / sum, 1e-9);
      }
    }
}

class SaapDecode : public ::testing::TestWithParam<Case> {};

TEST_P(SaapDecode, MatchesFloat64Reference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU";
  run_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Shapes, SaapDecode, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<Case>& i) { return i.param.name; });

// Forced split counts give the same result, also with more chunks than keys
// (empty chunks) and with one chunk.
TEST(SaapDecodeSplits, ForcedSplitCountsMatchTheReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU";
  for (int splits : {1, 3, 64}) {
    Case c;
    c.name = "forced_splits_" + std::to_string(splits);
    c.batch = 2, c.q_heads = 8, c.kv_heads = 2, c.num_partitions = 12, c.top_l = 3, c.routed = 40;
    c.sinks = 1, c.window = 2, c.seed = 40 + splits;
    run_case(c, splits);
  }
}

// The same inputs twice give the same bits (no atomics, fixed split order).
TEST(SaapDecodeRepeat, BitIdenticalRuns) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU";
  Case c;
  c.batch = 2, c.q_heads = 32, c.kv_heads = 8, c.num_partitions = 64, c.top_l = 16, c.routed = 4097, c.seed = 7;
  DeviceCase dev(c, make_inputs(c));
  ASSERT_GT(sk::decode_splits(dev.p), 1);
  sk::launch_saap_decode(dev.p);
  const std::vector<uint16_t> first = dev.out.download();
  const std::vector<float> first_lse = dev.lse.download();
  sk::launch_saap_decode(dev.p);
  EXPECT_EQ(dev.out.download(), first);
  EXPECT_EQ(dev.lse.download(), first_lse);
}

// ---------------------------------------------------------------------------
// Validation: runs without a GPU (nothing touches the device before it).

sk::DecodeParams valid_params() {
  // Fake, 16-byte aligned addresses: launch_saap_decode must throw before using them.
  alignas(16) static char fake[256];
  sk::DecodeParams p;
  p.batch = 2, p.q_heads = 32, p.kv_heads = 8, p.head_dim = 128, p.num_partitions = 64, p.top_l = 4;
  p.q = fake, p.k_part = fake, p.v_part = fake, p.part_capacity = 1 << 20;
  p.part_start = reinterpret_cast<const int32_t*>(fake), p.part_len = reinterpret_cast<const int32_t*>(fake);
  p.selected = reinterpret_cast<const int32_t*>(fake);
  p.k_dense = fake, p.v_dense = fake, p.dense_capacity = 5000;
  p.dense_begin[0] = 0, p.dense_end[0] = 4, p.dense_begin[1] = 4936, p.dense_end[1] = 5000;
  p.out = fake;
  p.lse = reinterpret_cast<float*>(fake);
  p.workspace = fake;
  p.workspace_bytes = 1 << 30;
  return p;
}

void expect_rejected(const sk::DecodeParams& p, const std::string& field) {
  try {
    sk::launch_saap_decode(p);
    ADD_FAILURE() << "accepted bad " << field;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << "message for " << field << ": " << e.what();
  }
}

TEST(SaapDecodeParams, BadFieldsAreNamed) {
  alignas(16) static char buf[64];
  const void* misaligned = buf + 2;
  struct Bad {
    std::string field;
    void (*edit)(sk::DecodeParams&, const void*);
  };
  const std::vector<Bad> bad = {
      {"dtype", [](sk::DecodeParams& p, const void*) { p.dtype = static_cast<DType>(7); }},
      {"batch", [](sk::DecodeParams& p, const void*) { p.batch = 0; }},
      {"q_heads", [](sk::DecodeParams& p, const void*) { p.q_heads = -1; }},
      {"kv_heads", [](sk::DecodeParams& p, const void*) { p.kv_heads = 3; }},
      {"kv_heads", [](sk::DecodeParams& p, const void*) { p.kv_heads = 0; }},
      {"head_dim", [](sk::DecodeParams& p, const void*) { p.head_dim = 96; }},
      {"num_partitions", [](sk::DecodeParams& p, const void*) { p.num_partitions = -1; }},
      {"top_l", [](sk::DecodeParams& p, const void*) { p.top_l = -1; }},
      {"top_l", [](sk::DecodeParams& p, const void*) { p.top_l = sk::kMaxTopL + 1; }},
      {"part_capacity", [](sk::DecodeParams& p, const void*) { p.part_capacity = -5; }},
      {"dense_capacity", [](sk::DecodeParams& p, const void*) { p.dense_capacity = -1; }},
      {"dense_begin[0]", [](sk::DecodeParams& p, const void*) { p.dense_begin[0] = 5; }},
      {"dense_end[1]", [](sk::DecodeParams& p, const void*) { p.dense_end[1] = 5001; }},
      {"dense_begin[1]", [](sk::DecodeParams& p, const void*) { p.dense_begin[1] = -1; }},
      {"overlap", [](sk::DecodeParams& p, const void*) { p.dense_begin[1] = 2; }},
      {"scale", [](sk::DecodeParams& p, const void*) { p.scale = std::numeric_limits<float>::quiet_NaN(); }},
      {"scale", [](sk::DecodeParams& p, const void*) { p.scale = std::numeric_limits<float>::infinity(); }},
      {"num_splits", [](sk::DecodeParams& p, const void*) { p.num_splits = -1; }},
      {"num_splits", [](sk::DecodeParams& p, const void*) { p.num_splits = sk::kMaxSplits + 1; }},
      {"q", [](sk::DecodeParams& p, const void*) { p.q = nullptr; }},
      {"q", [](sk::DecodeParams& p, const void* m) { p.q = m; }},
      {"out", [](sk::DecodeParams& p, const void*) { p.out = nullptr; }},
      {"out", [](sk::DecodeParams& p, const void* m) { p.out = const_cast<void*>(m); }},
      {"selected", [](sk::DecodeParams& p, const void*) { p.selected = nullptr; }},
      {"k_part", [](sk::DecodeParams& p, const void*) { p.k_part = nullptr; }},
      {"v_part", [](sk::DecodeParams& p, const void* m) { p.v_part = m; }},
      {"part_start", [](sk::DecodeParams& p, const void*) { p.part_start = nullptr; }},
      {"part_len", [](sk::DecodeParams& p, const void*) { p.part_len = nullptr; }},
      {"k_dense", [](sk::DecodeParams& p, const void*) { p.k_dense = nullptr; }},
      {"v_dense", [](sk::DecodeParams& p, const void* m) { p.v_dense = m; }},
      {"lse", [](sk::DecodeParams& p, const void* m) {
         p.lse = reinterpret_cast<float*>(const_cast<char*>(static_cast<const char*>(m)));
       }},
      {"workspace", [](sk::DecodeParams& p, const void*) { p.workspace = nullptr; }},
      {"workspace", [](sk::DecodeParams& p, const void* m) { p.workspace = const_cast<void*>(m); }},
      {"workspace_bytes", [](sk::DecodeParams& p, const void*) { p.workspace_bytes = 16; }},
  };
  ASSERT_GT(sk::decode_workspace_bytes(valid_params()), 16u) << "the workspace cases need splits > 1";
  for (const Bad& b : bad) {
    sk::DecodeParams p = valid_params();
    b.edit(p, misaligned);
    expect_rejected(p, b.field);
  }
}

TEST(SaapDecodeParams, OptionalInputsMayBeNull) {
  // Without a GPU these must still get past validation; only then may the
  // launch itself fail (std::runtime_error), never with invalid_argument.
  auto expect_valid = [](const sk::DecodeParams& p, const char* what) {
    try {
      if (have_gpu()) return;  // fake pointers: do not launch on a real device
      sk::launch_saap_decode(p);
    } catch (const std::invalid_argument& e) {
      ADD_FAILURE() << what << ": " << e.what();
    } catch (const std::exception&) {
      // the launch without a device fails: expected here
    }
  };
  sk::DecodeParams p = valid_params();
  p.top_l = 0, p.selected = nullptr, p.k_part = p.v_part = nullptr, p.part_start = p.part_len = nullptr;
  expect_valid(p, "top_l = 0 without partitions");
  p = valid_params();
  p.dense_end[0] = p.dense_begin[0], p.dense_begin[1] = p.dense_end[1] = 0, p.k_dense = p.v_dense = nullptr;
  expect_valid(p, "no dense keys without dense tensors");
  p = valid_params();
  p.lse = nullptr;
  expect_valid(p, "no lse");
}

TEST(SaapDecodeParams, SplitsAndWorkspace) {
  sk::DecodeParams p = valid_params();
  for (int batch : {1, 3, 8, 64})
    for (int64_t capacity : {int64_t{0}, int64_t{1000}, int64_t{1} << 17, int64_t{1} << 19}) {
      p.batch = batch, p.part_capacity = capacity;
      const int s = sk::decode_splits(p);
      EXPECT_GE(s, 1);
      EXPECT_LE(s, 64);
      if (s == 1) EXPECT_EQ(sk::decode_workspace_bytes(p), 0u);
      else EXPECT_GE(sk::decode_workspace_bytes(p), static_cast<size_t>(batch) * 32 * s * (128 + 2) * 4);
      EXPECT_EQ(sk::decode_workspace_bytes(p) % 16, 0u);
    }
  // Llama-3.1-8B decode at 128k, 5% of the keys, batch 1: enough CTAs to fill an H100.
  p.batch = 1, p.part_capacity = 131072, p.num_partitions = 512, p.top_l = 26;
  EXPECT_GE(sk::decode_splits(p) * 32, 256);
}

// ---------------------------------------------------------------------------
// Top-l selection.

// The order the kernel promises: larger score first, lower id first among
// equal scores (compared as the kernel's unsigned keys, so -0 < +0).
uint32_t order_key(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct TopLCase {
  std::string name;
  sk::ScoreType dtype = sk::ScoreType::kFloat32;
  int outer = 32, inner = 1, C = 512, l = 26;
  bool transpose = true;
  bool ties = false;  // scores on a coarse grid: many equal scores, also at the l-th
  uint64_t seed = 1;
};

void run_top_l_case(const TopLCase& c) {
  std::mt19937_64 rng(c.seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t rows = static_cast<size_t>(c.outer) * c.inner;
  std::vector<float> score(rows * c.C);
  std::vector<uint16_t> bits(score.size());
  for (size_t k = 0; k < score.size(); ++k) {
    float x = c.ties ? std::round(normal(rng) * 2.f) / 2.f + 0.25f : normal(rng) * 3.f;
    if (c.dtype == sk::ScoreType::kBF16) {
      bits[k] = to_bits(DType::kBF16, x);
      x = static_cast<float>(from_bits(DType::kBF16, bits[k]));
    }
    score[k] = x;
  }
  DeviceBuffer<float> s32(c.dtype == sk::ScoreType::kFloat32 ? score : std::vector<float>());
  DeviceBuffer<uint16_t> s16(c.dtype == sk::ScoreType::kBF16 ? bits : std::vector<uint16_t>());
  DeviceBuffer<int32_t> out(std::vector<int32_t>(rows * c.l, -7));
  sk::TopLParams p;
  p.dtype = c.dtype;
  p.scores = c.dtype == sk::ScoreType::kFloat32 ? static_cast<const void*>(s32.get()) : s16.get();
  p.outer = c.outer, p.inner = c.inner, p.num_partitions = c.C, p.top_l = c.l, p.transpose = c.transpose;
  p.out = out.get();
  sk::launch_top_l(p);
  const std::vector<int32_t> got = out.download();
  int bad = 0;
  for (int o = 0; o < c.outer; ++o)
    for (int i = 0; i < c.inner; ++i) {
      const size_t row = static_cast<size_t>(o) * c.inner + i;
      std::vector<int> ids(c.C);
      for (int j = 0; j < c.C; ++j) ids[j] = j;
      std::stable_sort(ids.begin(), ids.end(), [&](int a, int b) {
        return order_key(score[row * c.C + a]) > order_key(score[row * c.C + b]);
      });
      ids.resize(c.l);
      std::sort(ids.begin(), ids.end());
      const size_t out_row = c.transpose ? static_cast<size_t>(i) * c.outer + o : row;
      const std::vector<int32_t> mine(got.begin() + out_row * c.l, got.begin() + (out_row + 1) * c.l);
      if (std::vector<int32_t>(ids.begin(), ids.end()) != mine && bad++ < 3) {
        std::string a, b;
        for (int k = 0; k < std::min(c.l, 12); ++k) a += std::to_string(ids[k]) + " ", b += std::to_string(mine[k]) + " ";
        ADD_FAILURE() << c.name << ": row (" << o << ", " << i << "): expected " << a << "... got " << b << "...";
      }
    }
  EXPECT_EQ(bad, 0) << c.name << ": rows with a wrong selection";
}

std::vector<TopLCase> top_l_cases() {
  std::vector<TopLCase> v;
  uint64_t seed = 500;
  for (auto t : {sk::ScoreType::kFloat32, sk::ScoreType::kBF16})
    for (bool ties : {false, true}) {
      const std::string tn = std::string(t == sk::ScoreType::kFloat32 ? "f32" : "bf16") + (ties ? "_ties" : "");
      auto add = [&](const std::string& name, int outer, int inner, int C, int l, bool transpose) {
        TopLCase c;
        c.name = tn + "_" + name, c.dtype = t, c.ties = ties, c.outer = outer, c.inner = inner, c.C = C, c.l = l;
        c.transpose = transpose, c.seed = ++seed;
        v.push_back(c);
      };
      add("llama_128k_b1", 32, 1, 512, 26, true);
      add("llama_512k_b8", 32, 8, 2048, 102, true);
      add("all_of_7", 4, 3, 7, 7, false);
      add("one_of_one", 2, 2, 1, 1, true);
      add("one_of_3000", 3, 5, 3000, 1, false);
      add("half_of_300", 5, 2, 300, 150, true);
    }
  return v;
}

class SaapTopL : public ::testing::TestWithParam<TopLCase> {};

TEST_P(SaapTopL, MatchesSortedReference) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA GPU";
  run_top_l_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(Shapes, SaapTopL, ::testing::ValuesIn(top_l_cases()),
                         [](const ::testing::TestParamInfo<TopLCase>& i) { return i.param.name; });

TEST(SaapTopLParams, BadFieldsAreNamed) {
  alignas(16) static char fake[64];
  auto valid = [&] {
    sk::TopLParams p;
    p.scores = fake, p.out = reinterpret_cast<int32_t*>(fake);
    p.outer = 32, p.inner = 2, p.num_partitions = 512, p.top_l = 26;
    return p;
  };
  auto rejected = [](const sk::TopLParams& p, const std::string& field) {
    try {
      sk::launch_top_l(p);
      ADD_FAILURE() << "accepted bad " << field;
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(field), std::string::npos) << e.what();
    }
  };
  sk::TopLParams p = valid();
  p.dtype = static_cast<sk::ScoreType>(5);
  rejected(p, "dtype");
  p = valid(), p.outer = 0;
  rejected(p, "outer");
  p = valid(), p.inner = -1;
  rejected(p, "inner");
  p = valid(), p.num_partitions = 0;
  rejected(p, "num_partitions");
  p = valid(), p.top_l = 0;
  rejected(p, "top_l");
  p = valid(), p.top_l = 513;
  rejected(p, "top_l");
  p = valid(), p.scores = nullptr;
  rejected(p, "scores");
  p = valid(), p.scores = fake + 2;
  rejected(p, "scores");
  p = valid(), p.out = nullptr;
  rejected(p, "out");
  p = valid(), p.out = reinterpret_cast<int32_t*>(fake + 2);
  rejected(p, "out");
}

}  // namespace
}  // namespace sparseflash::saap::kernels_test
