// bench/attention: our sparse flash attention kernels against SDPA's flash
// (FA2) and cuDNN backends, in the same run on the same GPU.
//
// Shapes: B*N = 65,536 tokens, 12 heads at D = 64, 8 heads at D = 128, bf16,
// causal. Ours is timed *with packing*: LSH bucket ids (one matmul + argmax
// per side), the bucket sort, tile ranges, then the kernels; dropping draws
// its keep masks and sorts them the same way. CUDA events, warm-up, median.
// FLOPs: forward 4*B*H*N^2*D / 2 (causal), forward+backward 3.5x that.
//
// usage: bench_attention [--n 2048,4096,...] [--d 64,128] [--reps 20] [--json FILE]
//                        [--cases dense,hash:16,drop:0.7] [--nosdpa] [--deterministic]
//                        [--lsh-center]
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/InferenceMode.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#include <torch/cuda.h>

#include "bench/cuda_timing.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "attention/attention.h"
#include "attention/kernels/sparse_flash.h"
#include "nlohmann/json.hpp"

namespace sk = sparseflash::kernels;
namespace attention = sparseflash::attention;
using at::Tensor;

namespace {

#define CUDA_OK(expr)                                                                   \
  do {                                                                                  \
    cudaError_t e_ = (expr);                                                            \
    if (e_ != cudaSuccess) {                                                            \
      std::cerr << #expr << ": " << cudaGetErrorString(e_) << "\n";                     \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

using sparseflash::bench::median_ms;

sk::Layout layout_of(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// Everything one call of ours needs, allocated once per shape.
struct Ours {
  std::string mode;  // dense, hash, drop, shift (param: groups per sequence)
  double param = 0;
  int B, H, N, D;
  Tensor q, k, v, out, lse, dout, dq, dk, dv, delta, dq_accum;
  Tensor qb, kb, qkeep, kkeep, qperm, kperm, qbs, kbs, qseg, kseg, qtiles, ktiles, ws, rot;
  size_t ws_bytes = 0;
  int sort_bits = 0, dead_bucket = INT_MAX;
  sk::ForwardParams fwd;
  sk::BackwardParams bwd;

  void init(const std::string& m, double prm, int b, int h, int n, int d, bool deterministic) {
    mode = m, param = prm, B = b, H = h, N = n, D = d;
    auto o = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    auto i32 = at::TensorOptions().dtype(at::kInt).device(at::kCUDA);
    q = at::randn({B, H, N, D}, o);
    k = at::randn({B, H, N, D}, o);
    v = at::randn({B, H, N, D}, o);
    dout = at::randn({B, H, N, D}, o);
    out = at::empty_like(q), dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
    lse = at::empty({B, H, N}, o.dtype(at::kFloat));
    delta = at::empty({B, H, N}, o.dtype(at::kFloat));
    qperm = at::empty({B * H, N}, i32), kperm = at::empty({B * H, N}, i32);
    qbs = at::empty({B * H, N}, i32), kbs = at::empty({B * H, N}, i32);
    qtiles = at::empty({B * H, sk::num_tiles(N), 4}, i32);
    ktiles = at::empty({B * H, sk::num_tiles(N), 4}, i32);
    // As attention/flash.cc packs: drop gives dropped rows buckets 1 (queries)
    // and 2 (keys), the dead ones.
    const int ids = mode == "drop"    ? 3
                    : mode == "hash"  ? static_cast<int>(prm)
                    : mode == "shift" ? static_cast<int>(prm) + 1
                                      : 1;
    sort_bits = sk::bucket_sort_bits(false, ids);
    dead_bucket = mode == "drop" ? 1 : INT_MAX;
    const int nseg = mode == "dense" ? 0 : sk::num_segments_for(sort_bits);
    if (nseg > 0) {
      qseg = at::empty({B * H, nseg + 1}, i32);
      kseg = at::empty({B * H, nseg + 1}, i32);
    }
    ws_bytes = sk::pack_workspace_bytes(B * H, N, sort_bits);
    ws = at::empty({static_cast<int64_t>(ws_bytes)}, o.dtype(at::kByte));
    if (mode == "hash") rot = at::randn({H, D, static_cast<int64_t>(param) / 2}, o.dtype(at::kFloat));
    fwd.dtype = sk::DType::kBF16;
    fwd.B = B, fwd.H = H, fwd.Hkv = H, fwd.Nq = N, fwd.Nk = N, fwd.D = D;
    fwd.scale = 1.0f / std::sqrt(static_cast<float>(D));
    fwd.q = q.data_ptr(), fwd.k = k.data_ptr(), fwd.v = v.data_ptr(), fwd.out = out.data_ptr();
    fwd.q_layout = layout_of(q), fwd.k_layout = layout_of(k), fwd.v_layout = layout_of(v);
    fwd.out_layout = layout_of(out);
    fwd.lse = lse.data_ptr<float>();
    const bool dense = mode == "dense";
    auto packing = [&](const Tensor& perm, const Tensor& sorted, const Tensor& seg,
                       const Tensor& tiles) {
      sk::Packing pk;
      pk.perm = dense ? nullptr : perm.data_ptr<int>();
      pk.bucket = dense ? nullptr : sorted.data_ptr<int>();
      pk.tiles = reinterpret_cast<sk::TileRange*>(tiles.data_ptr<int>());
      pk.segments = seg.defined() ? seg.data_ptr<int>() : nullptr;
      pk.num_segments = seg.defined() ? nseg : 0;
      pk.dead_bucket = dead_bucket;
      return pk;
    };
    fwd.q_pack = packing(qperm, qbs, qseg, qtiles);
    fwd.k_pack = packing(kperm, kbs, kseg, ktiles);
    bwd.fwd = fwd;
    bwd.dout = dout.data_ptr(), bwd.dout_layout = layout_of(dout);
    bwd.dq = dq.data_ptr(), bwd.dk = dk.data_ptr(), bwd.dv = dv.data_ptr();
    bwd.dq_layout = layout_of(dq), bwd.dk_layout = layout_of(dk), bwd.dv_layout = layout_of(dv);
    bwd.delta = delta.data_ptr<float>();
    if (!deterministic) {
      dq_accum = at::empty({B, H, N, D}, o.dtype(at::kFloat));
      bwd.dq_accum = dq_accum.data_ptr<float>();
    }
  }

  // Bucket ids, sort, tile ranges: what every training step pays.
  void pack() {
    cudaStream_t s = at::cuda::getCurrentCUDAStream();
    if (mode == "hash") {
      // As training does (attention::lsh_buckets on CUDA): the fused kernel
      // writes int64 ids, the wrapper narrows them for the sort.
      auto ids = [&](const Tensor& x) {
        Tensor out = at::empty({B, H, N}, x.options().dtype(at::kLong));
        CUDA_OK(sk::lsh_bucket_ids(sk::DType::kBF16, x.data_ptr(), layout_of(x), B, H, N, D,
                                   rot.data_ptr<float>(), H, static_cast<int>(param) / 2,
                                   out.data_ptr<int64_t>(), s));
        return out.to(at::kInt);
      };
      qb = ids(q), kb = ids(k);
    } else if (mode == "shift") {
      // S2-Attn as attention::shift_groups builds it on the device each call:
      // groups of N / param positions, the upper half of the heads shifted.
      attention::Pattern p = attention::shift_groups(B, H, H, N, N, (N + static_cast<int>(param) - 1) /
                                                     static_cast<int>(param), at::kCUDA);
      qb = p.q_bucket.to(at::kInt), kb = p.k_bucket.to(at::kInt);
    } else if (mode == "drop") {
      // The pattern: keep masks drawn on the GPU each step. As attention/flash.cc
      // does, the sort reads them directly, dropped rows taking ids 1 (queries)
      // and 2 (keys).
      auto f = at::TensorOptions().device(at::kCUDA);
      qkeep = at::rand({B, H, N}, f).ge(param);
      kkeep = at::rand({B, H, N}, f).ge(param);
    }
    if (mode != "dense") {
      auto seg = [](Tensor& t) { return t.defined() ? t.data_ptr<int>() : nullptr; };
      auto ids = [](Tensor& t) { return t.defined() ? t.data_ptr<int>() : nullptr; };
      auto keep = [](Tensor& t) { return t.defined() ? t.data_ptr<bool>() : nullptr; };
      CUDA_OK(sk::pack_by_bucket(ids(qb), B * H, N, sort_bits, qperm.data_ptr<int>(),
                                 qbs.data_ptr<int>(), seg(qseg), ws.data_ptr(), ws_bytes, s,
                                 keep(qkeep), 1));
      CUDA_OK(sk::pack_by_bucket(ids(kb), B * H, N, sort_bits, kperm.data_ptr<int>(),
                                 kbs.data_ptr<int>(), seg(kseg), ws.data_ptr(), ws_bytes, s,
                                 keep(kkeep), 2));
    }
    CUDA_OK(sk::compute_tile_ranges(fwd.q_pack.perm, fwd.q_pack.bucket, B * H, N, 0, dead_bucket,
                                    reinterpret_cast<sk::TileRange*>(qtiles.data_ptr<int>()), s));
    CUDA_OK(sk::compute_tile_ranges(fwd.k_pack.perm, fwd.k_pack.bucket, B * H, N, 0, dead_bucket,
                                    reinterpret_cast<sk::TileRange*>(ktiles.data_ptr<int>()), s));
  }
  // Tile pairs the kernels visit after tile skipping, counted on the host
  // from this call's packing: forward (128-row query blocks x 64-row key
  // tiles) and dK/dV (128-row key blocks x 64-row query tiles), and the blocks
  // that meet at least one tile. The row blocks and their ranges are the
  // kernels' (row_block, row_block_range: fixed blocks, or blocks aligned to
  // the bucket segments). Needs pack() first.
  struct Work {
    int64_t fwd_pairs = 0, fwd_blocks = 0, bwd_pairs = 0, bwd_blocks = 0;
  };
  static std::vector<int> host_ints(const Tensor& t) {
    if (!t.defined()) return {};
    Tensor c = t.cpu().contiguous();
    return std::vector<int>(c.data_ptr<int>(), c.data_ptr<int>() + c.numel());
  }
  // The ranges of one side's 128-row blocks, per sequence.
  std::vector<std::vector<sk::TileRange>> block_ranges(const std::vector<sk::TileRange>& tiles,
                                                       const std::vector<int>& perm,
                                                       const std::vector<int>& seg,
                                                       int nseg) const {
    constexpr int kBR = 128;
    const int nt = sk::num_tiles(N);
    std::vector<std::vector<sk::TileRange>> out(static_cast<size_t>(B) * H);
    for (int64_t bh = 0; bh < int64_t{B} * H; ++bh) {
      const sk::TileRange* t = tiles.data() + bh * nt;
      if (seg.empty()) {
        for (int t0 = 0; t0 < nt; t0 += 2)
          out[bh].push_back(t0 + 1 < nt ? sk::tile_union(t[t0], t[t0 + 1]) : t[t0]);
        continue;
      }
      const int* sg = seg.data() + bh * (nseg + 1);
      const int* pr = perm.data() + bh * N;
      for (int b = 0; b < nseg; ++b)
        for (int r0 = sg[b]; r0 < sg[b + 1]; r0 += kBR) {
          const int r1 = std::min(sg[b + 1], r0 + kBR);
          out[bh].push_back(b >= dead_bucket ? sk::TileRange{b, b, INT_MAX, INT_MIN}
                                             : sk::TileRange{b, b, pr[r0], pr[r1 - 1]});
        }
    }
    return out;
  }
  Work work() const {
    const int nt = sk::num_tiles(N);
    auto host_tiles = [&](const Tensor& t) {
      const std::vector<int> v = host_ints(t);
      std::vector<sk::TileRange> r(v.size() / 4);
      std::memcpy(r.data(), v.data(), r.size() * sizeof(sk::TileRange));
      return r;
    };
    const std::vector<sk::TileRange> qv = host_tiles(qtiles), kv = host_tiles(ktiles);
    const int nseg = fwd.q_pack.num_segments;
    const auto qblocks = block_ranges(qv, host_ints(qperm), host_ints(qseg), nseg);
    const auto kblocks = block_ranges(kv, host_ints(kperm), host_ints(kseg), nseg);
    Work w;
    for (int64_t bh = 0; bh < int64_t{B} * H; ++bh) {
      const sk::TileRange *q = qv.data() + bh * nt, *k = kv.data() + bh * nt;
      for (const sk::TileRange& qb : qblocks[bh]) {
        int64_t f = 0;
        for (int t = 0; t < nt; ++t) f += sk::tiles_meet(qb, k[t]);
        w.fwd_pairs += f, w.fwd_blocks += f > 0;
      }
      for (const sk::TileRange& kb : kblocks[bh]) {
        int64_t g = 0;
        for (int t = 0; t < nt; ++t) g += sk::tiles_meet(q[t], kb);
        w.bwd_pairs += g, w.bwd_blocks += g > 0;
      }
    }
    return w;
  }
  void forward() { CUDA_OK(sk::attention_forward(fwd, at::cuda::getCurrentCUDAStream())); }
  void backward() { CUDA_OK(sk::attention_backward(bwd, at::cuda::getCurrentCUDAStream())); }
};

struct Row {
  std::string impl, mode;
  double param;
  bool has_param;
  int N, D, B, H;
  double fwd_ms, bwd_ms, fwdbwd_ms;
  double pack_ms = 0;  // ours: bucket ids + sort + tile ranges alone
  Ours::Work work;     // ours: tile pairs visited
};

// "dense,hash:16,drop:0.7" -> cases; false on a malformed entry.
struct Case {
  std::string mode;
  double param;
};
bool parse_cases(const std::string& s, std::vector<Case>& out) {
  out.clear();
  for (absl::string_view part : absl::StrSplit(s, ',')) {
    std::vector<std::string> mp = absl::StrSplit(part, ':');
    double prm = 0;
    if (mp[0] == "dense" && mp.size() == 1) {
      out.push_back({"dense", 0});
    } else if ((mp[0] == "hash" || mp[0] == "drop" || mp[0] == "shift") && mp.size() == 2 &&
               absl::SimpleAtod(mp[1], &prm) &&
               (mp[0] == "hash"    ? prm >= 2 && prm == std::floor(prm) && static_cast<int>(prm) % 2 == 0
                : mp[0] == "shift" ? prm >= 1 && prm == std::floor(prm)
                                   : prm >= 0 && prm < 1)) {
      out.push_back({mp[0], prm});
    } else {
      return false;
    }
  }
  return !out.empty();
}

std::vector<int> parse_list(const std::string& s) {
  std::vector<int> out;
  for (auto part : absl::StrSplit(s, ',')) {
    int x;
    if (absl::SimpleAtoi(part, &x)) out.push_back(x);
  }
  return out;
}

}  // namespace

// --lsh-center: the LSH centring (attention.lsh_center) on the model's layout
// (q a [B, N, H, D] view of the fused projection, B*N = 65,536, 12 heads,
// D = 64, nb 16, blocks of 256 rows): centred rows in ATen ops then the LSH
// kernel, against the kernel subtracting the projected block means, and the
// uncentred kernel alone. Prints ms per call (one side).
int bench_lsh_center(const std::vector<int>& ns, int reps, const std::string& json_path) {
  nlohmann::json j = nlohmann::json::array();
  std::cout << absl::StrFormat("%-22s %6s %10s\n", "impl", "N", "ms");
  for (int N : ns) {
    const int64_t B = std::max(1, 65536 / N), H = 12, D = 64, block = 256;
    auto o = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
    // Rows with a common direction, as a trained model's queries have.
    Tensor qkv = at::randn({B, N, 3 * H * D}, o) + 2.0 * at::randn({1, 1, 3 * H * D}, o);
    Tensor q = qkv.narrow(2, 0, H * D).view({B, N, H, D}).transpose(1, 2);
    Tensor r = at::randn({H, D, 8}, at::TensorOptions().device(at::kCUDA));
    Tensor a = attention::lsh_buckets(attention::center_by_earlier_blocks(q, block), r);
    Tensor f = attention::lsh_buckets(q, r, block);
    const double agree = a.eq(f).to(at::kDouble).mean().item<double>();
    const std::vector<std::pair<std::string, std::function<void()>>> impls = {
        {"lsh_center_aten", [&] { attention::lsh_buckets(attention::center_by_earlier_blocks(q, block), r); }},
        {"lsh_center_fused", [&] { attention::lsh_buckets(q, r, block); }},
        {"lsh_raw", [&] { attention::lsh_buckets(q, r); }}};
    for (const auto& [name, fn] : impls) {
      const double ms = median_ms(fn, reps);
      std::cout << absl::StrFormat("%-22s %6d %10.4f\n", name, N, ms);
      j.push_back({{"impl", name}, {"N", N}, {"B", B}, {"H", H}, {"D", D}, {"ms", ms},
                   {"buckets_agree", agree}});
    }
    std::cout << absl::StrFormat("  buckets equal in %.4f of the rows (aten vs fused)\n", agree);
  }
  if (!json_path.empty()) std::ofstream(json_path) << j.dump(1) << "\n";
  return 0;
}

int main(int argc, char** argv) {
  std::vector<int> ns = {2048, 4096, 8192, 16384, 32768}, ds = {64, 128};
  int reps = 20;
  std::string json_path;
  bool deterministic = false, sdpa = true, lsh_center = false;
  std::vector<Case> cases = {{"dense", 0}, {"hash", 2}, {"hash", 8}, {"hash", 16}, {"hash", 32},
                             {"drop", 0.3}, {"drop", 0.5}, {"drop", 0.7}, {"shift", 4}};
  const char* usage =
      "usage: bench_attention [--n LIST] [--d LIST] [--reps R] [--json FILE] [--deterministic]\n"
      "                       [--cases LIST] [--nosdpa]\n"
      "  --deterministic  our backward computes dQ by its second pass (bit-reproducible)\n"
      "                   instead of fp32 atomics\n"
      "  --cases LIST     our cases, e.g. dense,hash:16,drop:0.7,shift:4 (hash: even nb >= 2;\n"
      "                   drop: the dropped fraction s in [0, 1); shift: groups per\n"
      "                   sequence, LongLoRA's S2-Attn with half the heads shifted);\n"
      "                   default all nine\n"
      "  --nosdpa         leave out the SDPA anchors (for profiling our kernels alone)\n"
      "  --lsh-center     only time the LSH centring: ATen ops + kernel against the kernel\n"
      "                   subtracting the projected block means (one side, nb 16, D 64)\n";
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--deterministic") {
      deterministic = true;
      continue;
    }
    if (a == "--nosdpa") {
      sdpa = false;
      continue;
    }
    if (a == "--lsh-center") {
      lsh_center = true;
      continue;
    }
    if (a == "--help" || a == "-h") {
      std::cout << usage;
      return 0;
    }
    if (i + 1 >= argc) {
      std::cerr << "bench_attention: " << a << " needs a value\n" << usage;
      return 2;
    }
    const std::string value = argv[++i];
    if (a == "--n") ns = parse_list(value);
    else if (a == "--d") ds = parse_list(value);
    else if (a == "--reps") reps = std::atoi(value.c_str());
    else if (a == "--json") json_path = value;
    else if (a == "--cases") {
      if (!parse_cases(value, cases)) {
        std::cerr << "bench_attention: bad --cases " << value << "\n" << usage;
        return 2;
      }
    } else {
      std::cerr << "bench_attention: unknown argument " << a << "\n" << usage;
      return 2;
    }
  }
  if (!torch::cuda::is_available()) {
    std::cerr << "bench_attention: no CUDA GPU\n";
    return 1;
  }
  if (lsh_center) return bench_lsh_center(ns, reps, json_path);
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::vector<Row> rows;
  auto& ctx = at::globalContext();

  for (int D : ds)
    for (int N : ns) {
      const int H = D == 64 ? 12 : 8, B = std::max(1, 65536 / N);
      // SDPA backends through autograd, as a PyTorch user would call them.
      for (const char* impl : {"sdpa_flash", "sdpa_cudnn"}) {
        if (!sdpa) break;
        const bool flash = std::string(impl) == "sdpa_flash";
        ctx.setSDPUseFlash(flash);
        ctx.setSDPUseCuDNN(!flash);
        ctx.setSDPUseMemEfficient(false);
        ctx.setSDPUseMath(false);
        auto o = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
        Tensor q = at::randn({B, H, N, D}, o).requires_grad_(), k = at::randn({B, H, N, D}, o).requires_grad_(),
               v = at::randn({B, H, N, D}, o).requires_grad_(), g = at::randn({B, H, N, D}, o);
        Tensor out;
        try {
          const double f = median_ms([&] {
            c10::InferenceMode ng;
            at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
          }, reps);
          const double fb = median_ms([&] {
            out = at::scaled_dot_product_attention(q, k, v, {}, 0.0, true);
            out.backward(g);
          }, reps);
          rows.push_back({impl, "dense", 0, false, N, D, B, H, f, fb - f, fb});
        } catch (const std::exception& e) {
          std::cerr << impl << " N=" << N << " D=" << D << ": " << std::string(e.what()).substr(0, 200) << "\n";
        }
      }
      for (const auto& c : cases) {
        Ours ours;
        ours.init(c.mode, c.param, B, H, N, D, deterministic);
        const double f = median_ms([&] { ours.pack(); ours.forward(); }, reps);
        const double fb = median_ms([&] { ours.pack(); ours.forward(); ours.backward(); }, reps);
        const double pk = median_ms([&] { ours.pack(); }, reps);
        rows.push_back({"sparseflash", c.mode, c.param, c.mode != "dense", N, D, B, H,
                        f, fb - f, fb, pk, ours.work()});
      }
    }

  nlohmann::json j = nlohmann::json::array();
  std::cout << absl::StrFormat("GPU: %s\n%-12s %-6s %6s %6s %4s %12s %12s %12s %10s %9s %8s\n",
                               prop.name, "impl", "mode", "param", "N", "D", "fwd_ms", "bwd_ms",
                               "fwdbwd_ms", "TFLOP/s", "xFA2", "pack_ms");
  for (const auto& r : rows) {
    const double flops = 3.5 * 4.0 * r.B * r.H * double(r.N) * r.N * r.D / 2;
    double fa2 = 0;
    for (const auto& o : rows)
      if (o.impl == "sdpa_flash" && o.N == r.N && o.D == r.D) fa2 = o.fwdbwd_ms;
    std::cout << absl::StrFormat("%-12s %-6s %6s %6d %4d %12.3f %12.3f %12.3f %10.1f %9.3f %8.3f %9d %9d\n",
                                 r.impl, r.mode, r.has_param ? absl::StrFormat("%g", r.param) : "-",
                                 r.N, r.D, r.fwd_ms, r.bwd_ms, r.fwdbwd_ms,
                                 flops / (r.fwdbwd_ms * 1e-3) / 1e12, fa2 > 0 ? r.fwdbwd_ms / fa2 : 0,
                                 r.pack_ms, r.work.fwd_pairs, r.work.bwd_pairs);
    nlohmann::json row = {{"impl", r.impl}, {"mode", r.mode}, {"N", r.N}, {"D", r.D},
                          {"B", r.B}, {"H", r.H}, {"fwd_ms", r.fwd_ms}, {"bwd_ms", r.bwd_ms},
                          {"fwdbwd_ms", r.fwdbwd_ms}};
    if (r.impl == "sparseflash") {
      row["pack_ms"] = r.pack_ms;
      row["deterministic"] = deterministic;
      row["fwd_tile_pairs"] = r.work.fwd_pairs, row["fwd_blocks_met"] = r.work.fwd_blocks;
      row["bwd_tile_pairs"] = r.work.bwd_pairs, row["bwd_blocks_met"] = r.work.bwd_blocks;
    }
    row["param"] = r.has_param ? nlohmann::json(r.param) : nlohmann::json(nullptr);
    j.push_back(row);
  }
  if (!json_path.empty()) std::ofstream(json_path) << j.dump(1) << "\n";
  return 0;
}
