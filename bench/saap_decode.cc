// bench/saap_decode: one SAAP decode step against SDPA over the full cache,
// Llama-3.1-8B-shaped attention (32 query heads, 8 KV heads, head dim 128,
// bf16), in the same run on the same GPU.
//
// Setup (not timed), per cache length N, for the largest batch (smaller
// batches use its first rows):
//   * keys with cluster structure: per (batch row, KV head) `--centres` random
//     centres (N(0, 1)), each key = a random centre + 0.5 N(0, 1) noise + an
//     offset shared by all keys of the head (N(0, 1) * 2); values N(0, 1);
//   * the time-ordered cache k_dense / v_dense [B, 8, N, 128]: rows
//     [0, sinks) and [N - window, N) are always attended, the rows between are
//     routed;
//   * C partitions (N / 256 unless --partitions) per KV head: centroids are C
//     distinct routed keys drawn at random, every routed key goes to its
//     nearest one (saap::assign_to_centroids, Euclidean), and the routed keys
//     are copied, sorted by partition, into k_part / v_part (the synthetic
//     keys have no RoPE, so one tensor serves as pre- and post-RoPE key);
//   * a QueryClassifier of the trained shape (32 heads, 128 -> 256 -> C,
//     random weights); queries N(0, 1).
// Timed (CUDA events, 3 warm-up calls, median of --reps): one decode step =
// classifier on the pre-RoPE query [B, 32, 128] -> logits [32, B, C] (its
// input scaling folded into the first layer, checked against forward()),
// top-l selection straight into the int32 `selected` [B, 32, l]
// (launch_top_l; checked against at::topk, which is also timed), and
// launch_saap_decode with the sinks and the window as dense ranges. l is
// round(--visit * C) unless --top_l; the visited fraction reported is
// measured: keys of the distinct selected partitions / routed keys, averaged
// over (batch, query head). The step is timed eagerly and as one CUDA graph
// (replay); classifier, selection and kernel are also timed on their own.
// Anchors: at::scaled_dot_product_attention with q_len 1 over the whole
// cache [B, 8, N, 128] (the same tensors), each backend alone (flash, cuDNN,
// efficient, math; the FA3 switch is left off), GQA two ways:
// enable_gqa=true, and "grouped" (the 4 query heads of a KV head as 4 query
// rows of one head, no copy). A backend that refuses a shape, or runs out of
// memory, is reported as skipped with its message.
// Check (not timed): our output against SDPA math with a boolean mask of the
// keys SAAP attends to (max abs difference, printed and in the JSON).
#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/cuda.h>

#include "bench/cuda_timing.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/flags/usage_config.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"
#include "saap/classifier.h"
#include "saap/kernels/decode.h"
#include "saap/kernels/top_l.h"
#include "saap/kmeans.h"

ABSL_FLAG(std::vector<std::string>, n, std::vector<std::string>({"131072", "262144", "524288"}),
          "cache lengths N (tokens), comma separated");
ABSL_FLAG(std::vector<std::string>, batch, std::vector<std::string>({"1", "8"}), "batch sizes, comma separated");
ABSL_FLAG(int64_t, partitions, 0, "C: key partitions per KV head (0: N / 256)");
ABSL_FLAG(double, visit, 0.05, "target fraction of routed keys visited: l = round(visit * C)");
ABSL_FLAG(int64_t, top_l, 0, "l: selected partitions per query head (0: from --visit)");
ABSL_FLAG(int64_t, sinks, 4, "always-attended first tokens");
ABSL_FLAG(int64_t, window, 64, "always-attended local window (last tokens)");
ABSL_FLAG(int64_t, centres, 256, "cluster centres per KV head in the synthetic keys");
ABSL_FLAG(int64_t, hidden, 256, "classifier hidden width");
ABSL_FLAG(int64_t, reps, 20, "timed repetitions per figure (median; at least 20)");
ABSL_FLAG(uint64_t, seed, 1234, "seed of the synthetic cache, queries and classifier");
ABSL_FLAG(bool, graph, true, "also time the step as one CUDA graph");
ABSL_FLAG(bool, sweep_splits, true, "also time the kernel alone with 1, 2, 4, ..., 64 chunks per head");
ABSL_FLAG(bool, check, true, "check our output against masked SDPA math (not timed)");
ABSL_FLAG(std::string, sdpa, "flash,cudnn,efficient,math", "SDPA backends to time, comma separated");
ABSL_FLAG(std::string, json, "", "JSON output (default bench/results/saap-decode-<gpu>.json)");

namespace {

namespace sk = sparseflash::saap::kernels;
namespace saap = sparseflash::saap;
using at::Tensor;

constexpr int64_t kQHeads = 32, kKvHeads = 8, kDim = 128;
// Our bf16 output against the float32 masked reference: bf16 rounding of
// outputs of order 1 (and fp32 accumulation order) stays well below this.
constexpr double kCheckTolerance = 2e-2;

double median_us(const std::function<void()>& fn, int reps) {
  return 1e3 * sparseflash::bench::median_ms(fn, reps);
}

std::vector<int64_t> parse_list(const std::vector<std::string>& items, const char* flag) {
  std::vector<int64_t> out;
  for (const auto& s : items) {
    int64_t x;
    if (!absl::SimpleAtoi(s, &x) || x <= 0) {
      std::fprintf(stderr, "bench_saap_decode: --%s: '%s' is not a positive integer\n", flag, s.c_str());
      std::exit(2);
    }
    out.push_back(x);
  }
  return out;
}

// ---------------------------------------------------------------------------
// The synthetic cache of one N, for batch rows [0, B).

struct Cache {
  int64_t B = 0, N = 0, C = 0, sinks = 0, window = 0, routed = 0;
  Tensor k_dense, v_dense;   // [B, 8, N, 128] bf16, time order
  Tensor k_part, v_part;     // [B, 8, routed, 128] bf16, partition-contiguous
  Tensor part_start, part_len;  // int32 [B, 8, C]
  Tensor key_partition;      // int64 [B, 8, N], -1 on sink / window rows (for the check)
};

Cache make_cache(int64_t B, int64_t N, int64_t C, int64_t sinks, int64_t window, int64_t centres,
                 at::Generator& gen) {
  auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  auto f32 = bf16.dtype(at::kFloat);
  Cache c;
  c.B = B, c.N = N, c.C = C, c.sinks = sinks, c.window = window, c.routed = N - sinks - window;
  c.k_dense = at::empty({B, kKvHeads, N, kDim}, bf16);
  c.v_dense = at::empty({B, kKvHeads, N, kDim}, bf16);
  c.k_part = at::empty({B, kKvHeads, c.routed, kDim}, bf16);
  c.v_part = at::empty({B, kKvHeads, c.routed, kDim}, bf16);
  c.part_start = at::empty({B, kKvHeads, C}, f32.dtype(at::kInt));
  c.part_len = at::empty({B, kKvHeads, C}, f32.dtype(at::kInt));
  c.key_partition = at::full({B, kKvHeads, N}, -1, f32.dtype(at::kLong));
  for (int64_t b = 0; b < B; ++b) {
    Tensor centre = at::randn({kKvHeads, centres, kDim}, gen, f32);
    Tensor offset = at::randn({kKvHeads, 1, kDim}, gen, f32) * 2.0;
    Tensor which = at::randint(centres, {kKvHeads, N}, gen, f32.dtype(at::kLong));
    Tensor keys = at::gather(centre, 1, which.unsqueeze(-1).expand({kKvHeads, N, kDim})) +
                  0.5 * at::randn({kKvHeads, N, kDim}, gen, f32) + offset;
    c.k_dense[b].copy_(keys);
    c.v_dense[b].copy_(at::randn({kKvHeads, N, kDim}, gen, f32));
    Tensor routed = keys.slice(1, sinks, N - window);  // [8, R, 128]
    std::vector<Tensor> picks;
    for (int64_t g = 0; g < kKvHeads; ++g)
      picks.push_back(at::randperm(c.routed, gen, f32.dtype(at::kLong)).slice(0, 0, C));
    Tensor pick = at::stack(picks, 0);  // [8, C]: C distinct routed keys per KV head
    Tensor centroids = at::gather(routed, 1, pick.unsqueeze(-1).expand({kKvHeads, C, kDim}));
    Tensor assign = saap::assign_to_centroids(routed, centroids, saap::KMeansMetric::kEuclidean);  // [8, R]
    c.key_partition[b].slice(1, sinks, N - window).copy_(assign);
    Tensor perm = std::get<1>(at::sort(assign, /*stable=*/true, /*dim=*/1, /*descending=*/false));
    auto rows = perm.unsqueeze(-1).expand({kKvHeads, c.routed, kDim});
    c.k_part[b].copy_(at::gather(c.k_dense[b].slice(1, sinks, N - window), 1, rows));
    c.v_part[b].copy_(at::gather(c.v_dense[b].slice(1, sinks, N - window), 1, rows));
    Tensor len = at::zeros({kKvHeads, C}, f32.dtype(at::kLong)).scatter_add_(1, assign, at::ones_like(assign));
    c.part_len[b].copy_(len);
    c.part_start[b].copy_(at::cumsum(len, 1) - len);
  }
  return c;
}

// ---------------------------------------------------------------------------
// One decode step of ours for batch rows [0, B) of a cache.

struct Step {
  const Cache* cache = nullptr;
  int64_t B = 0, l = 0;
  saap::QueryClassifier classifier{nullptr};
  Tensor w1, b1;            // input scaling folded in: [32, 128, 256], [32, 1, 256]
  Tensor w2, b2;            // [32, 256, C], [32, 1, C]
  bool bf16_classifier = false;  // w1, b1, w2, b2 in bf16 (half the bytes, no cast of q)
  bool torch_top_l = false;      // selection by at::topk + a transposing int32 copy instead of launch_top_l
  Tensor q_pre, q_rope;     // [B, 32, 128] bf16
  Tensor logits, selected;  // [32, B, C] float32 (bf16 with bf16_classifier), int32 [B, 32, l]
  Tensor out, lse, workspace;
  sk::DecodeParams params;

  void classify() {
    Tensor x = q_pre.transpose(0, 1);  // [32, B, 128]
    if (!bf16_classifier) x = x.to(at::kFloat);
    Tensor h = at::baddbmm(b1, x, w1).relu_();
    logits = at::baddbmm(b2, h, w2);
  }
  void select() {
    if (torch_top_l) {
      Tensor idx = std::get<1>(at::topk(logits, l, -1, /*largest=*/true, /*sorted=*/false));  // [32, B, l]
      selected.copy_(idx.transpose(0, 1));
      return;
    }
    logits = logits.contiguous();  // (a fresh baddbmm result already is: no copy)
    sk::TopLParams t;
    t.dtype = logits.scalar_type() == at::kFloat ? sk::ScoreType::kFloat32 : sk::ScoreType::kBF16;
    t.scores = logits.data_ptr();  // [32, B, C]
    t.outer = static_cast<int>(kQHeads), t.inner = static_cast<int>(B);
    t.num_partitions = static_cast<int>(cache->C), t.top_l = static_cast<int>(l);
    t.transpose = true;  // -> [B, 32, l]
    t.out = selected.data_ptr<int32_t>();
    t.stream = at::cuda::getCurrentCUDAStream();
    sk::launch_top_l(t);
  }
  void attend() {
    params.stream = at::cuda::getCurrentCUDAStream();
    sk::launch_saap_decode(params);
  }
  void run() {
    classify();
    select();
    attend();
  }
};

void point_step(Step& s);

void init_step(Step& s, const Cache& c, int64_t B, int64_t l, int64_t hidden, uint64_t seed, at::Generator& gen) {
  auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  s.cache = &c, s.B = B, s.l = l;
  s.classifier = saap::QueryClassifier(kQHeads, kDim, hidden, c.C, seed, torch::kCUDA);
  // Input scaling of a fitted classifier, then folded into the first layer:
  // ((x - mean) / std) W1 + b1 = x (W1 / std) + (b1 - (mean / std) W1).
  s.classifier->in_mean.copy_(0.1 * at::randn(s.classifier->in_mean.sizes(), gen, bf16.dtype(at::kFloat)));
  s.classifier->in_std.copy_(at::rand(s.classifier->in_std.sizes(), gen, bf16.dtype(at::kFloat)) + 0.5);
  Tensor inv = (1.0 / s.classifier->in_std).unsqueeze(-1);  // [32, 128, 1]
  s.w1 = s.classifier->w1 * inv;
  s.b1 = (s.classifier->b1.unsqueeze(1) -
          at::bmm((s.classifier->in_mean.unsqueeze(-1) * inv).transpose(1, 2), s.classifier->w1));
  s.w2 = s.classifier->w2;
  s.b2 = s.classifier->b2.unsqueeze(1);
  s.q_pre = at::randn({B, kQHeads, kDim}, gen, bf16.dtype(at::kFloat)).to(at::kBFloat16);
  s.q_rope = at::randn({B, kQHeads, kDim}, gen, bf16.dtype(at::kFloat)).to(at::kBFloat16);
  point_step(s);
}

// Fresh outputs for a step and the kernel's params pointing at them.
void point_step(Step& s) {
  const Cache& c = *s.cache;
  const int64_t B = s.B, l = s.l;
  auto bf16 = at::TensorOptions().dtype(at::kBFloat16).device(at::kCUDA);
  s.selected = at::empty({B, kQHeads, l}, bf16.dtype(at::kInt));
  s.out = at::empty({B, kQHeads, kDim}, bf16);
  s.lse = at::empty({B, kQHeads}, bf16.dtype(at::kFloat));
  sk::DecodeParams& p = s.params;
  p.dtype = sk::DType::kBF16;
  p.batch = static_cast<int>(B), p.q_heads = kQHeads, p.kv_heads = kKvHeads, p.head_dim = kDim;
  p.num_partitions = static_cast<int>(c.C), p.top_l = static_cast<int>(l);
  p.q = s.q_rope.data_ptr();
  p.k_part = c.k_part.data_ptr(), p.v_part = c.v_part.data_ptr(), p.part_capacity = c.routed;
  p.part_start = c.part_start.data_ptr<int32_t>(), p.part_len = c.part_len.data_ptr<int32_t>();
  p.selected = s.selected.data_ptr<int32_t>();
  p.k_dense = c.k_dense.data_ptr(), p.v_dense = c.v_dense.data_ptr(), p.dense_capacity = c.N;
  p.dense_begin[0] = 0, p.dense_end[0] = c.sinks;
  p.dense_begin[1] = c.N - c.window, p.dense_end[1] = c.N;
  p.out = s.out.data_ptr(), p.lse = s.lse.data_ptr<float>();
  // Room for any split count (the --sweep_splits timings force them).
  p.num_splits = sk::kMaxSplits;
  const size_t ws = sk::decode_workspace_bytes(p);
  p.num_splits = 0;
  s.workspace = at::empty({static_cast<int64_t>(std::max<size_t>(ws, 16))}, bf16.dtype(at::kByte));
  p.workspace = s.workspace.data_ptr(), p.workspace_bytes = ws;
}

// The same step (queries, classifier) with the classifier's weights in bf16.
Step with_bf16_classifier(const Step& s) {
  Step t = s;
  t.bf16_classifier = true;
  t.w1 = s.w1.to(at::kBFloat16), t.b1 = s.b1.to(at::kBFloat16);
  t.w2 = s.w2.to(at::kBFloat16), t.b2 = s.b2.to(at::kBFloat16);
  point_step(t);
  return t;
}

// Mean over rows (b, h) of |ids in both selections| / l; a, b: [B, 32, l] ids.
double selection_agreement_of(const Tensor& a, const Tensor& b) {
  Tensor x = std::get<0>(a.to(at::kLong).sort(-1)).cpu(), y = std::get<0>(b.to(at::kLong).sort(-1)).cpu();
  auto X = x.accessor<int64_t, 3>();
  auto Y = y.accessor<int64_t, 3>();
  const int64_t rows = x.size(0) * x.size(1), l = x.size(2);
  double sum = 0;
  for (int64_t i = 0; i < x.size(0); ++i)
    for (int64_t h = 0; h < x.size(1); ++h) {
      int64_t common = 0;
      for (int64_t p = 0, q = 0; p < l && q < l;) {
        if (X[i][h][p] == Y[i][h][q]) ++common, ++p, ++q;
        else if (X[i][h][p] < Y[i][h][q]) ++p;
        else ++q;
      }
      sum += static_cast<double>(common) / l;
    }
  return sum / rows;
}

// Keys of the distinct selected partitions / routed keys, averaged over (b, h).
double visited_fraction(const Step& s) {
  const Cache& c = *s.cache;
  Tensor sel = s.selected.to(at::kLong).cpu();   // [B, 32, l]
  Tensor len = c.part_len.slice(0, 0, s.B).to(at::kLong).cpu();  // [B, 8, C]
  auto S = sel.accessor<int64_t, 3>();
  auto L = len.accessor<int64_t, 3>();
  double sum = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < kQHeads; ++h) {
      std::vector<char> seen(c.C, 0);
      int64_t keys = 0;
      for (int64_t i = 0; i < s.l; ++i) {
        const int64_t id = S[b][h][i];
        if (id < 0 || id >= c.C || seen[id]) continue;
        seen[id] = 1;
        keys += L[b][h / (kQHeads / kKvHeads)][id];
      }
      sum += static_cast<double>(keys) / c.routed;
    }
  return sum / (s.B * kQHeads);
}

// Our output against SDPA math in float32 over the same keys (boolean mask,
// grouped GQA), for batch rows 0 and B - 1: the largest |difference|.
double check_against_masked_sdpa(const Step& s) {
  const Cache& c = *s.cache;
  auto& ctx = at::globalContext();
  ctx.setSDPUseFA3(false);
  ctx.setSDPUseFlash(false), ctx.setSDPUseCuDNN(false), ctx.setSDPUseMemEfficient(false), ctx.setSDPUseMath(true);
  const int64_t group = kQHeads / kKvHeads;
  double worst = 0;
  for (int64_t b : {int64_t{0}, s.B - 1}) {
    Tensor chosen = at::zeros({kQHeads, c.C + 1}, s.selected.options().dtype(at::kBool));
    chosen.scatter_(1, s.selected[b].to(at::kLong), true);  // (topk ids are in [0, C))
    Tensor part = c.key_partition[b];                     // [8, N], -1 on dense rows
    Tensor idx = at::where(part.ge(0), part, c.C);         // dense rows -> column C (false)
    idx = idx.unsqueeze(1).expand({kKvHeads, group, c.N}).reshape({kQHeads, c.N});
    Tensor dense = part.lt(0).unsqueeze(1).expand({kKvHeads, group, c.N}).reshape({kQHeads, c.N});
    Tensor mask = (at::gather(chosen, 1, idx) | dense).view({1, kKvHeads, group, c.N});
    Tensor q = s.q_rope[b].to(at::kFloat).view({1, kKvHeads, group, kDim});
    Tensor ref = at::scaled_dot_product_attention(q, c.k_dense[b].unsqueeze(0).to(at::kFloat),
                                                  c.v_dense[b].unsqueeze(0).to(at::kFloat), mask);
    worst = std::max(worst, (ref.view({kQHeads, kDim}) - s.out[b].to(at::kFloat)).abs().max().item<double>());
  }
  return worst;
}

// ---------------------------------------------------------------------------
// SDPA anchors.

struct Backend {
  std::string name;
  std::function<void(at::Context&)> select;
};

std::vector<Backend> sdpa_backends(const std::string& list) {
  auto only = [](bool flash, bool cudnn, bool eff, bool math) {
    return [=](at::Context& ctx) {
      ctx.setSDPUseFA3(false);
      ctx.setSDPUseFlash(flash), ctx.setSDPUseCuDNN(cudnn), ctx.setSDPUseMemEfficient(eff), ctx.setSDPUseMath(math);
    };
  };
  std::vector<Backend> all = {
      {"flash", only(true, false, false, false)},
      {"cudnn", only(false, true, false, false)},
      {"efficient", only(false, false, true, false)},
      {"math", only(false, false, false, true)},
  };
  std::vector<Backend> out;
  for (const auto& name : absl::StrSplit(list, ',', absl::SkipEmpty())) {
    auto it = std::find_if(all.begin(), all.end(), [&](const Backend& b) { return b.name == name; });
    if (it == all.end()) {
      std::fprintf(stderr, "bench_saap_decode: --sdpa: unknown backend '%s' (flash, cudnn, efficient, math)\n",
                   std::string(name).c_str());
      std::exit(2);
    }
    out.push_back(*it);
  }
  return out;
}

using AddRow = std::function<void(const std::string& impl, double us, const std::string& note)>;

// Times a step: eagerly, its three parts alone, and as one CUDA graph.
// The kernel alone with each forced split count (rows saap_kernel_splits_<S>).
void sweep_splits(Step& step, int reps, const AddRow& add) {
  for (int splits = 1; splits <= sk::kMaxSplits; splits *= 2) {
    step.params.num_splits = splits;
    add("saap_kernel_splits_" + std::to_string(splits), median_us([&] { step.attend(); }, reps), "");
  }
  step.params.num_splits = 0;
}

void time_step(Step& step, const std::string& suffix, int reps, bool graph_too, const AddRow& add) {
  add("saap_eager" + suffix, median_us([&] { step.run(); }, reps), "");
  add("saap_classifier" + suffix, median_us([&] { step.classify(); }, reps), "");
  add("saap_selection" + suffix, median_us([&] { step.select(); }, reps), "");
  if (!step.torch_top_l) {
    step.torch_top_l = true;
    add("saap_selection_torch" + suffix, median_us([&] { step.select(); }, reps), "");
    step.torch_top_l = false;
  }
  add("saap_kernel" + suffix, median_us([&] { step.attend(); }, reps), "");
  if (!graph_too) return;
  try {
    at::cuda::CUDAGraph graph;
    {
      c10::cuda::CUDAStreamGuard guard(c10::cuda::getStreamFromPool());
      step.run();  // warm-up on the capture stream
      at::cuda::getCurrentCUDAStream().synchronize();
      graph.capture_begin();
      step.run();
      graph.capture_end();
    }
    add("saap_graph" + suffix, median_us([&] { graph.replay(); }, reps), "");
  } catch (const std::exception& e) {
    add("saap_graph" + suffix, -1, std::string(e.what()).substr(0, 200));
  }
}

struct Row {
  std::string impl;  // saap_graph, saap_eager, saap_classifier, saap_selection, saap_kernel, sdpa_<backend>_<gqa>
  int64_t N, B, C, l;
  double visited, us;  // us < 0: skipped
  std::string note;
};

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times one SAAP decode step (classifier, top-l selection, saap decode kernel) against "
      "scaled_dot_product_attention over the full cache, Llama-3.1-8B attention shapes "
      "(32 query heads, 8 KV heads, head dim 128, bf16).\n"
      "Usage: bench_saap_decode [--n 131072,262144,524288] [--batch 1,8] [--visit 0.05] [--json FILE]");
  absl::FlagsUsageConfig usage_config;
  usage_config.contains_help_flags = [](absl::string_view file) {
    return absl::EndsWith(file, "bench/saap_decode.cc");
  };
  absl::SetFlagsUsageConfig(usage_config);
  absl::ParseCommandLine(argc, argv);
  const std::vector<int64_t> ns = parse_list(absl::GetFlag(FLAGS_n), "n");
  std::vector<int64_t> batches = parse_list(absl::GetFlag(FLAGS_batch), "batch");
  std::sort(batches.begin(), batches.end());
  const int reps = static_cast<int>(absl::GetFlag(FLAGS_reps));
  const int64_t sinks = absl::GetFlag(FLAGS_sinks), window = absl::GetFlag(FLAGS_window);
  const double visit = absl::GetFlag(FLAGS_visit);
  if (reps < 20) return std::fprintf(stderr, "bench_saap_decode: --reps must be at least 20\n"), 2;
  if (sinks < 0 || window < 0) return std::fprintf(stderr, "bench_saap_decode: --sinks/--window must be >= 0\n"), 2;
  if (!(visit > 0 && visit <= 1)) return std::fprintf(stderr, "bench_saap_decode: --visit must be in (0, 1]\n"), 2;
  if (absl::GetFlag(FLAGS_centres) <= 0 || absl::GetFlag(FLAGS_hidden) <= 0)
    return std::fprintf(stderr, "bench_saap_decode: --centres and --hidden must be positive\n"), 2;
  const std::vector<Backend> backends = sdpa_backends(absl::GetFlag(FLAGS_sdpa));
  if (!torch::cuda::is_available()) return std::fprintf(stderr, "bench_saap_decode: no CUDA GPU\n"), 1;

  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::string gpu = prop.name;
  for (char& ch : gpu)
    if (!std::isalnum(static_cast<unsigned char>(ch)) && ch != '-') ch = '_';
  std::string json_path = absl::GetFlag(FLAGS_json);
  if (json_path.empty()) json_path = "bench/results/saap-decode-" + gpu + ".json";

  at::NoGradGuard no_grad;  // (InferenceMode would make the classifier's parameters inference tensors)
  auto& ctx = at::globalContext();
  std::vector<Row> rows;
  nlohmann::json checks = nlohmann::json::array();
  at::Generator gen = at::cuda::detail::getDefaultCUDAGenerator();
  gen.set_current_seed(absl::GetFlag(FLAGS_seed));

  bool failed = false;
  for (int64_t N : ns) {
    const int64_t C = absl::GetFlag(FLAGS_partitions) > 0 ? absl::GetFlag(FLAGS_partitions) : std::max<int64_t>(1, N / 256);
    const int64_t l = absl::GetFlag(FLAGS_top_l) > 0 ? absl::GetFlag(FLAGS_top_l)
                                                       : std::max<int64_t>(1, std::llround(visit * C));
    if (N - sinks - window < C) {
      std::fprintf(stderr, "bench_saap_decode: N = %lld leaves fewer routed keys than C = %lld partitions\n",
                   static_cast<long long>(N), static_cast<long long>(C));
      return 2;
    }
    if (l > std::min<int64_t>(C, sk::kMaxTopL)) {
      std::fprintf(stderr, "bench_saap_decode: l = %lld must be at most min(C, %d)\n", static_cast<long long>(l),
                   sk::kMaxTopL);
      return 2;
    }
    // A failure (out of memory, a torch call this build refuses) costs this N only.
    try {
      std::printf("N = %lld: building the cache (B = %lld, C = %lld) ...\n", static_cast<long long>(N),
                  static_cast<long long>(batches.back()), static_cast<long long>(C));
      std::fflush(stdout);
      ctx.setAllowTF32CuBLAS(true);  // nearest-centroid assignment only; off again for the timed step
      Cache cache = make_cache(batches.back(), N, C, sinks, window, absl::GetFlag(FLAGS_centres), gen);
      ctx.setAllowTF32CuBLAS(false);
      torch::cuda::synchronize();

      for (int64_t B : batches) {
        Step step;
        init_step(step, cache, B, l, absl::GetFlag(FLAGS_hidden), absl::GetFlag(FLAGS_seed) + N + B, gen);
        // The folded classifier equals forward() (up to float rounding).
        step.classify();
        const double fold_err =
            (step.logits - step.classifier->forward(step.q_pre.transpose(0, 1))).abs().max().item<double>();
        // launch_top_l must pick the same partitions as at::topk (continuous
        // scores: no ties); else the step falls back to at::topk.
        step.classify();
        step.torch_top_l = true;
        step.select();
        const Tensor torch_selected = step.selected.clone();
        step.torch_top_l = false;
        step.select();
        const double top_l_agreement = selection_agreement_of(torch_selected, step.selected);
        if (top_l_agreement != 1.0) {
          std::printf("warning: launch_top_l agrees with at::topk on %.4f of the selections only; "
                      "timing the step with at::topk\n", top_l_agreement);
          step.torch_top_l = true;
          failed = true;
        }
        step.run();
        torch::cuda::synchronize();
        const double visited = visited_fraction(step);
        auto add = [&](const std::string& impl, double us, const std::string& note = "") {
          rows.push_back({impl, N, B, C, l, visited, us, note});
        };
        time_step(step, "", reps, absl::GetFlag(FLAGS_graph), add);
        if (absl::GetFlag(FLAGS_sweep_splits)) sweep_splits(step, reps, add);
        // The same step with a bf16 classifier: its own rows, visited fraction and
        // agreement with the float32 selection.
        Step fast = with_bf16_classifier(step);
        fast.run();
        torch::cuda::synchronize();
        const double agreement = selection_agreement_of(step.selected, fast.selected);
        const double fast_visited = visited_fraction(fast);
        time_step(fast, "_bf16cls", reps, absl::GetFlag(FLAGS_graph),
                  [&](const std::string& impl, double us, const std::string& note) {
                    rows.push_back({impl, N, B, C, l, fast_visited, us, note});
                  });
        double check = -1;
        if (absl::GetFlag(FLAGS_check)) {
          try {
            step.run();
            check = check_against_masked_sdpa(step);
          } catch (const std::exception& e) {
            std::fprintf(stderr, "check N=%lld B=%lld failed: %s\n", static_cast<long long>(N),
                         static_cast<long long>(B), std::string(e.what()).substr(0, 200).c_str());
          }
          c10::cuda::CUDACachingAllocator::emptyCache();
        }
        checks.push_back({{"N", N}, {"B", B}, {"max_abs_diff_vs_masked_sdpa", check},
                          {"classifier_fold_max_abs_diff", fold_err},
                          {"bf16_classifier_selection_agreement", agreement},
                        {"top_l_kernel_agreement_with_topk", top_l_agreement},
                        {"splits", sk::decode_splits(step.params)}});

        // SDPA over the full cache, the same tensors.
        Tensor k = cache.k_dense.slice(0, 0, B), v = cache.v_dense.slice(0, 0, B);
        for (const Backend& be : backends) {
          for (const bool grouped : {false, true}) {
            const std::string impl = "sdpa_" + be.name + (grouped ? "_grouped" : "_gqa");
            try {
              be.select(ctx);
              Tensor q = grouped ? step.q_rope.view({B, kKvHeads, kQHeads / kKvHeads, kDim})
                                 : step.q_rope.view({B, kQHeads, 1, kDim});
              add(impl, median_us([&] {
                    at::scaled_dot_product_attention(q, k, v, {}, 0.0, false, std::nullopt, !grouped);
                  }, reps));
            } catch (const std::exception& e) {
              std::string msg = e.what();
              msg = msg.substr(0, msg.find('\n'));
              add(impl, -1, msg.substr(0, 160));
              c10::cuda::CUDACachingAllocator::emptyCache();
            }
          }
        }
      }
    } catch (const std::exception& e) {
      std::string msg = e.what();
      std::fprintf(stderr, "bench_saap_decode: N = %lld failed: %s\n", static_cast<long long>(N),
                   msg.substr(0, msg.find('\n')).c_str());
      failed = true;
      ctx.setAllowTF32CuBLAS(false);
      c10::cuda::CUDACachingAllocator::emptyCache();
    }
  }

  // Table: one line per (N, B, classifier weights).
  std::printf("\nGPU: %s  (us per decode step; ours = classifier + top-l + int32 + kernel, as one CUDA graph)\n",
              prop.name);
  std::printf("%7s %2s %5s %4s %4s %8s | %8s %8s %8s %8s %8s %8s | %-20s %8s | %8s\n", "N", "B", "C", "l", "cls",
              "visited", "ours", "eager", "classif", "select", "(topk)", "kernel", "fastest SDPA", "us", "speedup");
  nlohmann::json j = nlohmann::json::array();
  for (int64_t N : ns)
    for (int64_t B : batches) {
      auto find = [&](const std::string& impl) -> const Row* {
        for (const auto& r : rows)
          if (r.N == N && r.B == B && r.impl == impl) return &r;
        return nullptr;
      };
      const Row* best = nullptr;
      for (const auto& r : rows)
        if (r.N == N && r.B == B && r.impl.rfind("sdpa_", 0) == 0 && r.us > 0 && (!best || r.us < best->us)) best = &r;
      for (const std::string suffix : {"", "_bf16cls"}) {
        const Row* graph = find("saap_graph" + suffix);
        const Row* eager = find("saap_eager" + suffix);
        if (eager == nullptr) continue;
        const double ours = graph && graph->us > 0 ? graph->us : eager->us;
        auto us = [&](const std::string& impl) { return find(impl) ? find(impl)->us : std::nan(""); };
        std::printf("%7lld %2lld %5lld %4lld %4s %7.2f%% | %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f | %-20s %8.1f | %7.2fx\n",
                    static_cast<long long>(N), static_cast<long long>(B), static_cast<long long>(eager->C),
                    static_cast<long long>(eager->l), suffix.empty() ? "f32" : "bf16", 100 * eager->visited, ours,
                    eager->us, us("saap_classifier" + suffix), us("saap_selection" + suffix),
                    us("saap_selection_torch" + suffix), us("saap_kernel" + suffix), best ? best->impl.c_str() + 5 : "(none ran)",
                    best ? best->us : 0.0, best ? best->us / ours : 0.0);
      }
    }
  std::printf("(ours: the graph replay where capture worked, else eager; cls: classifier weights; select: "
              "launch_top_l, (topk): at::topk + int32 copy for comparison; speedup = fastest SDPA / ours, "
              "the target is >= 2.5x)\n");
  if (absl::GetFlag(FLAGS_sweep_splits)) {
    std::printf("\nkernel alone (f32 classifier's selection) by chunks per head, us:\n");
    for (int64_t N : ns)
      for (int64_t B : batches) {
        std::string line;
        for (const auto& r : rows)
          if (r.N == N && r.B == B && r.impl.rfind("saap_kernel_splits_", 0) == 0)
            line += absl::StrFormat("  %s: %.1f", r.impl.substr(19), r.us);
        int chosen = 0;
        for (const auto& c : checks)
          if (c["N"] == N && c["B"] == B) chosen = c["splits"].get<int>();
        if (!line.empty())
          std::printf("  N=%-7lld B=%lld%s   (chosen: %d)\n", static_cast<long long>(N), static_cast<long long>(B),
                      line.c_str(), chosen);
      }
  }
  std::printf("\nSDPA backends (us; skipped ones with their reason):\n");
  for (const auto& r : rows)
    if (r.impl.rfind("sdpa_", 0) == 0)
      std::printf("  N=%-7lld B=%lld %-24s %s\n", static_cast<long long>(r.N), static_cast<long long>(r.B),
                  r.impl.c_str(), r.us > 0 ? absl::StrFormat("%.1f", r.us).c_str() : ("skipped: " + r.note).c_str());
  std::printf("\nchecks (max |ours - masked SDPA math| per (N, B), must be <= %g; folded classifier vs forward()):\n%s\n",
              kCheckTolerance, checks.dump().c_str());
  for (const auto& c : checks)
    if (!(c["max_abs_diff_vs_masked_sdpa"].get<double>() >= 0 &&
          c["max_abs_diff_vs_masked_sdpa"].get<double>() <= kCheckTolerance) && absl::GetFlag(FLAGS_check)) {
      std::printf("CHECK FAILED at N = %lld, B = %lld\n", static_cast<long long>(c["N"].get<int64_t>()),
                  static_cast<long long>(c["B"].get<int64_t>()));
      failed = true;
    }
  for (const auto& r : rows) {
    nlohmann::json row = {{"impl", r.impl}, {"N", r.N}, {"B", r.B}, {"Hq", kQHeads}, {"Hkv", kKvHeads},
                          {"D", kDim}, {"C", r.C}, {"l", r.l}, {"visited_fraction", r.visited},
                          {"sinks", sinks}, {"window", window}};
    row["us"] = r.us > 0 ? nlohmann::json(r.us) : nlohmann::json(nullptr);
    if (!r.note.empty()) row["skipped"] = r.note;
    j.push_back(row);
  }
  nlohmann::json doc = {{"gpu", prop.name}, {"rows", j}, {"checks", checks}};
  std::ofstream f(json_path);
  if (!f) return std::fprintf(stderr, "bench_saap_decode: cannot write %s\n", json_path.c_str()), 1;
  f << doc.dump(1) << "\n";
  std::printf("wrote %s\n", json_path.c_str());
  return failed ? 1 : 0;
}
