// Reference sparse causal attention in LibTorch ops: pattern drawing (LSH
// buckets, drop masks) and a chunked, memory-bounded attention with a
// recomputing backward. Correct on CPU and GPU; the CUDA kernels are tested
// against it.
#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#ifdef SPARSEFLASH_WITH_CUDA
#include <ATen/cuda/CUDAGeneratorImpl.h>
#endif
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/custom_function.h>

#include "attention/attention.h"
#include "attention/flash.h"
#include "attention/pattern_context.h"
#include "profile/phases.h"

namespace sparseflash::attention {

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

Options Options::from_config(const config::Attention& c) {
  Options o;
  switch (c.kind()) {
    case config::Attention::DENSE: o.kind = Kind::kDense; break;
    case config::Attention::HASH: o.kind = Kind::kHash; break;
    case config::Attention::DROP: o.kind = Kind::kDrop; break;
    case config::Attention::SHIFT: o.kind = Kind::kShift; break;
  }
  o.num_buckets = c.num_buckets();
  o.fixed_rotation = c.fixed_rotation();
  o.rotation_seed = c.rotation_seed();
  o.shared_qk = c.shared_qk();
  o.drop_prob = c.drop_prob();
  o.chunk_size = c.chunk_size();
  o.deterministic = c.deterministic();
  o.lsh_center = c.lsh_center();
  o.lsh_center_block = c.lsh_center_block();
  o.lsh_capacity = c.lsh_capacity();
  o.group_size = c.group_size();
  o.sink_tokens = c.sink_tokens();
  o.local_window = c.local_window();
  switch (c.backend()) {
    case config::Attention::AUTO: o.backend = Backend::kAuto; break;
    case config::Attention::REFERENCE: o.backend = Backend::kReference; break;
    case config::Attention::KERNEL: o.backend = Backend::kKernel; break;
    case config::Attention::CUDNN: o.backend = Backend::kCudnn; break;
  }
  return o;
}

// ---------------------------------------------------------------------------
// the pattern

int64_t lsh_bucket_capacity(double capacity, int64_t num_buckets) {
  TORCH_CHECK(capacity == 0 || capacity >= 1,
              "lsh bucket capacity must be 0 (no cap) or >= 1, got ", capacity);
  TORCH_CHECK(num_buckets >= 1, "lsh bucket capacity: num_buckets must be >= 1, got ", num_buckets);
  if (capacity == 0) return 0;
  const auto rows = static_cast<int64_t>(
      std::ceil(capacity * static_cast<double>(kLshCapacityBlock) / static_cast<double>(num_buckets)));
  return std::min(rows, kLshCapacityBlock);
}

Tensor capped_argmax(const Tensor& scores, int64_t block, int64_t cap) {
  TORCH_CHECK(scores.dim() >= 2 && scores.device().is_cpu(),
              "capped_argmax: scores must be CPU [..., N, nb], got ", scores.sizes(), " on ",
              scores.device());
  TORCH_CHECK(block >= 1 && cap >= 1, "capped_argmax: block and cap must be >= 1, got ", block,
              " and ", cap);
  const int64_t N = scores.size(-2), nb = scores.size(-1);
  TORCH_CHECK(cap * nb >= block, "capped_argmax: cap * nb (", cap, " * ", nb,
              ") must be >= block (", block, ") so that every row finds room");
  Tensor s = scores.to(at::kDouble).contiguous().view({-1, N, nb});
  Tensor out = at::empty({s.size(0), N}, at::kLong);
  const double* v = s.data_ptr<double>();
  int64_t* o = out.data_ptr<int64_t>();
  std::vector<int64_t> count(static_cast<size_t>(nb));
  for (int64_t row = 0; row < s.size(0); ++row) {
    for (int64_t n = 0; n < N; ++n) {
      if (n % block == 0) std::fill(count.begin(), count.end(), 0);
      const double* p = v + (row * N + n) * nb;
      int64_t best = -1;
      for (int64_t j = 0; j < nb; ++j)
        if (count[j] < cap && (best < 0 || p[j] > p[best])) best = j;
      ++count[best];
      o[row * N + n] = best;
    }
  }
  std::vector<int64_t> shape(scores.sizes().begin(), scores.sizes().end() - 1);
  return out.view(shape);
}

Tensor lsh_buckets(const Tensor& x_in, const Tensor& rotations, int64_t center_block,
                   double capacity) {
  TORCH_CHECK(x_in.dim() == 4, "lsh_buckets: x must be [B, H, N, D], got ", x_in.sizes());
  TORCH_CHECK(rotations.dim() == 3 && rotations.size(1) == x_in.size(3),
              "lsh_buckets: rotations must be [H, D, nb/2] with D = ", x_in.size(3), ", got ",
              rotations.sizes());
  TORCH_CHECK(center_block >= 0, "lsh_buckets: center_block must be >= 0, got ", center_block);
  const int64_t heads = x_in.size(1), rot_heads = rotations.size(0);
  TORCH_CHECK(heads % rot_heads == 0, "lsh_buckets: ", heads,
              " heads is not a multiple of ", rot_heads, " rotations");
  const bool center = center_block > 0 && x_in.size(2) > center_block;
  const int64_t nb = 2 * rotations.size(2);
  const int64_t cap = lsh_bucket_capacity(capacity, nb);
  TORCH_CHECK(cap == 0 || nb <= 64, "lsh_buckets: a bucket capacity needs nb <= 64, got ", nb);
  // Head h uses rotation h / group: expand the rotations to one per head.
  auto per_head = [&] {
    return rotations.to(x_in.device(), at::kFloat).repeat_interleave(heads / rot_heads, 0);
  };
  // On the GPU one fused kernel (attention/kernels) does it without copies;
  // the centring enters as the projected means of the earlier blocks.
  if (flash_lsh_supported(x_in, rotations)) {
    if (!center) return flash_lsh_buckets(x_in, rotations, {}, 0, cap);
    Tensor offsets = at::matmul(earlier_block_means(x_in, center_block), per_head().unsqueeze(0));
    return flash_lsh_buckets(x_in, rotations, offsets, center_block, cap);
  }
  Tensor x = center ? center_by_earlier_blocks(x_in, center_block) : x_in;
  Tensor proj = at::matmul(x.to(at::kFloat), per_head().unsqueeze(0));  // [B, H, N, nb/2]
  Tensor scores = at::cat({proj, -proj}, -1);
  if (cap == 0) return scores.argmax(-1);
  return capped_argmax(scores.cpu(), kLshCapacityBlock, cap).to(x_in.device());
}

Tensor earlier_block_means(const Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 4, "earlier_block_means: x must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK(block >= 1, "earlier_block_means: block must be >= 1, got ", block);
  const int64_t B = x.size(0), H = x.size(1), N = x.size(2), D = x.size(3);
  const int64_t blocks = (N + block - 1) / block, whole = N / block;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor means = at::zeros({B, blocks, H, D}, x.options().dtype(acc));
  if (blocks <= 1 || whole == 0) return means.permute({0, 2, 1, 3});
  // Token-major: for the usual [B, N, H, D] memory of a projection's view,
  // the block split is a view and the sum one pass over the rows.
  Tensor sums = x.slice(2, 0, whole * block).transpose(1, 2).reshape({B, whole, block, H, D})
                    .sum(2, false, acc);  // [B, whole, H, D]
  // Mean of blocks 0..j-1 for block j = 1..blocks-1.
  Tensor prefix = sums.cumsum(1).slice(1, 0, blocks - 1);
  Tensor count = at::arange(1, blocks, sums.options()).mul_(static_cast<double>(block));
  means.slice(1, 1, blocks).copy_(prefix / count.view({1, blocks - 1, 1, 1}));
  return means.permute({0, 2, 1, 3});
}

Tensor center_by_earlier_blocks(const Tensor& x, int64_t block) {
  TORCH_CHECK(x.dim() == 4, "center_by_earlier_blocks: x must be [B, H, N, D], got ", x.sizes());
  TORCH_CHECK(block >= 1, "center_by_earlier_blocks: block must be >= 1, got ", block);
  const int64_t N = x.size(2);
  if (N <= block) return x;
  // Rows of block j minus mean[j] (zero for the first block).
  Tensor means = earlier_block_means(x, block).to(x.scalar_type());
  return x - means.repeat_interleave(block, 2).slice(2, 0, N);
}

// A generator seeded from (seed, layer) that always draws the same rotation.
static at::Generator fixed_generator(uint64_t seed, int layer) {
  uint64_t s = seed ^ (0x9e3779b97f4a7c15ull * static_cast<uint64_t>(layer + 1));
  return at::detail::createCPUGenerator(s);
}

// Where the draws of one call come from: the CPU generator itself, or on a
// GPU a Philox generator on that device seeded with a number taken from it.
static at::Generator draw_generator(at::Generator& cpu, const at::Device& device) {
#ifdef SPARSEFLASH_WITH_CUDA
  if (device.is_cuda() && cpu.device().is_cpu()) {
    uint64_t seed;
    {
      std::lock_guard<std::mutex> lock(cpu.mutex());
      seed = cpu.get<at::CPUGeneratorImpl>()->random64();
    }
    at::Generator g = at::cuda::detail::createCUDAGenerator(device.index());
    g.set_current_seed(seed);
    return g;
  }
#endif
  (void)device;
  return cpu;
}

Pattern shift_groups(int64_t B, int64_t H, int64_t Hkv, int64_t Nq, int64_t Nk,
                     int64_t group_size, const at::Device& device) {
  TORCH_CHECK(group_size >= 0, "shift attention: group_size must be >= 0, got ", group_size);
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "shift attention: ", H,
              " query heads is not a multiple of ", Hkv, " key heads");
  TORCH_CHECK(Nq <= Nk, "shift attention: more queries (", Nq, ") than keys (", Nk, ")");
  const int64_t G = group_size > 0 ? group_size : std::max<int64_t>(1, (Nk + 3) / 4);
  auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  // Shift of each key head: G / 2 for the upper half.
  Tensor shift = Hkv >= 2 ? at::arange(Hkv, i64).ge(Hkv / 2).to(at::kLong) * (G / 2)
                          : at::zeros({Hkv}, i64);
  auto groups = [&](const Tensor& head_shift, int64_t first, int64_t n) {
    Tensor pos = at::arange(first, first + n, i64);
    return (pos.unsqueeze(0) + head_shift.unsqueeze(1)).div(G, "floor");  // [heads, n]
  };
  Pattern p;
  p.k_bucket = groups(shift, 0, Nk).unsqueeze(0).expand({B, Hkv, Nk}).contiguous();
  p.q_bucket = groups(shift.repeat_interleave(H / Hkv), Nk - Nq, Nq)
                   .unsqueeze(0).expand({B, H, Nq}).contiguous();
  p.num_buckets = (Nk - 1 + G / 2) / G + 1;
  return p;
}

Pattern draw_pattern(const Options& options, const Tensor& q, const Tensor& k,
                     at::Generator& generator, int layer) {
  Pattern p;
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  auto cpu_float = at::TensorOptions().dtype(at::kFloat);
  auto draw_float = cpu_float.device(q.device());
  switch (options.kind) {
    case Kind::kDense:
      break;
    case Kind::kHash: {
      TORCH_CHECK(options.num_buckets >= 2 && options.num_buckets % 2 == 0,
                  "hash attention: num_buckets must be even and >= 2, got ", options.num_buckets);
      // One rotation per KV head so a query and the keys it may meet hash alike.
      Tensor rotations;
      if (options.fixed_rotation) {
        // The same R on every device: drawn on the CPU, copied without a sync.
        at::Generator fixed = fixed_generator(options.rotation_seed, layer);
        rotations = at::randn({Hkv, D, options.num_buckets / 2}, fixed, cpu_float);
        if (q.is_cuda()) rotations = rotations.pin_memory().to(q.device(), /*non_blocking=*/true);
      } else {
        at::Generator g = draw_generator(generator, q.device());
        rotations = at::randn({Hkv, D, options.num_buckets / 2}, g, draw_float);
      }
      const int64_t center = options.lsh_center ? options.lsh_center_block : 0;
      p.q_bucket = lsh_buckets(q.detach(), rotations, center, options.lsh_capacity);
      p.num_buckets = options.num_buckets;
      if (options.shared_qk) {
        // k = q / |q| has the same argmax as q: reuse the query buckets.
        TORCH_CHECK(Hkv == H && Nk == Nq,
                    "shared_qk needs as many key heads and keys as queries, got q ", q.sizes(),
                    " k ", k.sizes());
        p.k_bucket = p.q_bucket;
      } else {
        p.k_bucket = lsh_buckets(k.detach(), rotations, center, options.lsh_capacity);
      }
      break;
    }
    case Kind::kDrop: {
      TORCH_CHECK(options.drop_prob >= 0 && options.drop_prob < 1,
                  "drop attention: drop_prob must be in [0, 1), got ", options.drop_prob);
      at::Generator g = draw_generator(generator, q.device());
      Tensor uq = at::rand({B, H, Nq}, g, draw_float);
      Tensor uk = at::rand({B, Hkv, Nk}, g, draw_float);
      p.q_keep = uq.ge(options.drop_prob);
      p.k_keep = uk.ge(options.drop_prob);
      break;
    }
    case Kind::kShift:
      p = shift_groups(B, H, Hkv, Nq, Nk, options.group_size, q.device());
      break;
  }
  if (options.kind != Kind::kDense) {
    TORCH_CHECK(options.sink_tokens >= 0 && options.local_window >= 0,
                "attention: sink_tokens and local_window must be >= 0, got ", options.sink_tokens,
                " and ", options.local_window);
    p.sink_tokens = options.sink_tokens;
    p.local_window = options.local_window;
  }
  return p;
}

Tensor pattern_density(const Pattern& p) {
  if (p.q_bucket.defined()) {
    // Bucket frequencies per (batch, head); key heads expanded to query heads.
    const int64_t H = p.q_bucket.size(1), Hkv = p.k_bucket.size(1);
    const int64_t nb = p.num_buckets > 0
                           ? p.num_buckets
                           : std::max(p.q_bucket.max().item<int64_t>(),
                                      p.k_bucket.max().item<int64_t>()) + 1;
    auto frequencies = [&](const Tensor& ids, const Tensor& keep) {
      Tensor flat = ids.reshape({ids.size(0) * ids.size(1), ids.size(2)});
      Tensor weight = keep.defined() ? keep.reshape(flat.sizes()).to(at::kFloat)
                                     : at::ones(flat.sizes(), flat.options().dtype(at::kFloat));
      Tensor counts = at::zeros({flat.size(0), nb}, weight.options());
      counts.scatter_add_(1, flat.to(at::kLong), weight);
      return (counts / static_cast<double>(ids.size(2))).view({ids.size(0), ids.size(1), nb});
    };
    Tensor fq = frequencies(p.q_bucket, p.q_keep);
    Tensor fk = frequencies(p.k_bucket, p.k_keep).repeat_interleave(H / Hkv, 1);
    return (fq * fk).sum(-1).mean();
  }
  if (p.q_keep.defined())
    return p.q_keep.to(at::kFloat).mean() * p.k_keep.to(at::kFloat).mean();
  return at::ones({}, at::TensorOptions().dtype(at::kFloat));
}

// ---------------------------------------------------------------------------
// masks

// Allowed pairs for query rows [q0, q1) against keys [0, k1): bool
// [B or 1, H or 1, q1 - q0, k1]. Key-side tensors are [B, Hkv, Nk] and are
// expanded to query heads.
static Tensor chunk_mask(const Pattern& p, int64_t q0, int64_t q1, int64_t k1, int64_t offset,
                         int64_t group, const at::Device& device) {
  auto idx = at::TensorOptions().dtype(at::kLong).device(device);
  Tensor qpos = at::arange(q0, q1, idx) + offset;
  Tensor kpos = at::arange(0, k1, idx);
  Tensor distance = qpos.unsqueeze(1) - kpos.unsqueeze(0);
  Tensor causal = distance.ge(0).view({1, 1, q1 - q0, k1});
  auto per_query_head = [&](const Tensor& t) {
    return group == 1 ? t : t.repeat_interleave(group, 1);
  };
  Tensor mask = causal;
  if (p.q_bucket.defined()) {
    Tensor qb = p.q_bucket.slice(2, q0, q1).unsqueeze(-1);
    Tensor kb = per_query_head(p.k_bucket.slice(2, 0, k1)).unsqueeze(-2);
    mask = mask.logical_and(qb.eq(kb));
  }
  if (p.q_keep.defined()) {
    Tensor qk = p.q_keep.slice(2, q0, q1).unsqueeze(-1);
    Tensor kk = per_query_head(p.k_keep.slice(2, 0, k1)).unsqueeze(-2);
    mask = mask.logical_and(qk).logical_and(kk);
  }
  if (p.has_local()) {
    Tensor local = kpos.lt(p.sink_tokens).unsqueeze(0).logical_or(distance.lt(p.local_window));
    mask = mask.logical_or(causal.logical_and(local.view({1, 1, q1 - q0, k1})));
  }
  return mask;
}

Tensor allowed_mask(const Pattern& p, int64_t B, int64_t H, int64_t Nq, int64_t Nk,
                    const at::TensorOptions& device) {
  int64_t Hkv = p.k_bucket.defined() ? p.k_bucket.size(1)
                : p.k_keep.defined() ? p.k_keep.size(1) : H;
  return chunk_mask(p, 0, Nq, Nk, Nk - Nq, H / Hkv, device.device()).expand({B, H, Nq, Nk});
}

static void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& p) {
  TORCH_CHECK(q.dim() == 4, "attention: q must be [B, H, Nq, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(),
              "attention: k and v must both be [B, Hkv, Nk, D], got k ", k.sizes(), " v ",
              v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3),
              "attention: k ", k.sizes(), " does not match q ", q.sizes(), " in batch or head dim");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "attention: ", q.size(1),
              " query heads is not a multiple of ", k.size(1), " key heads");
  TORCH_CHECK(q.size(2) <= k.size(2), "attention: more queries (", q.size(2), ") than keys (",
              k.size(2), ")");
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k, v dtypes differ: ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  auto check = [&](const Tensor& t, const char* name, const Tensor& like) {
    if (!t.defined()) return;
    TORCH_CHECK(t.dim() == 3 && t.size(0) == like.size(0) && t.size(1) == like.size(1) &&
                    t.size(2) == like.size(2),
                "attention: pattern.", name, " must be [", like.size(0), ", ", like.size(1), ", ",
                like.size(2), "], got ", t.sizes());
    TORCH_CHECK(t.device() == like.device(), "attention: pattern.", name, " is on ", t.device(),
                ", q is on ", like.device());
  };
  check(p.q_bucket, "q_bucket", q);
  check(p.k_bucket, "k_bucket", k);
  check(p.q_keep, "q_keep", q);
  check(p.k_keep, "k_keep", k);
  TORCH_CHECK(p.q_bucket.defined() == p.k_bucket.defined(),
              "attention: pattern has q_bucket or k_bucket but not both");
  TORCH_CHECK(p.q_keep.defined() == p.k_keep.defined(),
              "attention: pattern has q_keep or k_keep but not both");
}

// ---------------------------------------------------------------------------
// chunked attention with a recomputing backward

namespace {

struct Shapes {
  int64_t Nq, Nk, offset, group, chunk;
  double scale;
};

// Keys a chunk of queries [q0, q1) can reach causally: [0, k_end).
int64_t key_end(const Shapes& s, int64_t q1) { return std::min(s.Nk, q1 + s.offset); }

// Scores of one chunk with disallowed pairs at -inf; also returns the mask.
std::pair<Tensor, Tensor> chunk_scores(const Tensor& q, const Tensor& k, const Pattern& p,
                                       const Shapes& s, int64_t q0, int64_t q1, int64_t k1) {
  Tensor scores = at::matmul(q.slice(2, q0, q1), k.slice(2, 0, k1).transpose(-1, -2)) * s.scale;
  Tensor mask = chunk_mask(p, q0, q1, k1, s.offset, s.group, q.device());
  return {scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()), mask};
}

at::ScalarType compute_type(const Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Forward in compute precision. qc, kc, vc have H heads (GQA already expanded).
void forward_chunks(const Tensor& qc, const Tensor& kc, const Tensor& vc, const Pattern& p,
                    const Shapes& s, Tensor& out, Tensor& lse) {
  const double inf = std::numeric_limits<double>::infinity();
  for (int64_t q0 = 0; q0 < s.Nq; q0 += s.chunk) {
    const int64_t q1 = std::min(q0 + s.chunk, s.Nq), k1 = key_end(s, q1);
    if (k1 <= 0) continue;  // no key is early enough: output stays 0, lse -inf
    auto [scores, mask] = chunk_scores(qc, kc, p, s, q0, q1, k1);
    // The max is only for stability; rows with no allowed key use 0 instead of -inf.
    Tensor m = std::get<0>(scores.max(-1, true));
    m = at::where(m.eq(-inf), at::zeros_like(m), m);
    Tensor e = at::exp(scores - m);
    Tensor l = e.sum(-1, true);
    Tensor o = at::matmul(e, vc.slice(2, 0, k1)) / at::where(l.gt(0), l, at::ones_like(l));
    out.slice(2, q0, q1).copy_(o);
    lse.slice(2, q0, q1).copy_((m + at::log(l)).squeeze(-1));  // log(0) = -inf for empty rows
  }
}

Tensor expand_heads(const Tensor& t, int64_t group) {
  return group == 1 ? t : t.repeat_interleave(group, 1);
}

// Output and log-sum-exp in compute precision.
std::pair<Tensor, Tensor> attend(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Pattern& p, const Shapes& s) {
  auto ct = compute_type(q);
  Tensor qc = q.to(ct), kc = expand_heads(k.to(ct), s.group), vc = expand_heads(v.to(ct), s.group);
  Tensor out = at::zeros(qc.sizes(), qc.options());
  Tensor lse = at::full({q.size(0), q.size(1), s.Nq}, -std::numeric_limits<double>::infinity(),
                        qc.options());
  forward_chunks(qc, kc, vc, p, s, out, lse);
  return {out, lse};
}

Tensor reduce_heads(const Tensor& t, int64_t group) {
  if (group == 1) return t;
  auto sz = t.sizes();
  return t.view({sz[0], sz[1] / group, group, sz[2], sz[3]}).sum(2);
}

Shapes make_shapes(const Tensor& q, const Tensor& k, int64_t chunk_size, double scale) {
  TORCH_CHECK(chunk_size >= 1, "attention: chunk_size must be >= 1, got ", chunk_size);
  Shapes s;
  s.Nq = q.size(2);
  s.Nk = k.size(2);
  s.offset = s.Nk - s.Nq;
  s.group = q.size(1) / k.size(1);
  s.chunk = chunk_size;
  s.scale = scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  return s;
}

// Autocast must not turn the float32 math below back into bf16.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor> reference_backward(const Tensor& q, const Tensor& k,
                                                      const Tensor& v, const Pattern& p,
                                                      int64_t chunk_size, double scale,
                                                      const Tensor& out, const Tensor& lse,
                                                      const Tensor& grad_out) {
  NoAutocast no_autocast;
  Shapes s = make_shapes(q, k, chunk_size, scale);
  auto ct = compute_type(q);
  Tensor qc = q.to(ct), kc = expand_heads(k.to(ct), s.group), vc = expand_heads(v.to(ct), s.group);
  Tensor dout = grad_out.to(ct);
  Tensor dq = at::zeros_like(qc), dk = at::zeros_like(kc), dv = at::zeros_like(vc);
  // Rows with no allowed key have lse = -inf; their probabilities are 0 by the mask.
  Tensor lse_c = lse.to(ct);
  Tensor lse_safe = at::where(at::isinf(lse_c), at::zeros_like(lse_c), lse_c).unsqueeze(-1);
  Tensor delta = (dout * out.to(ct)).sum(-1, true);  // rowsum(dO * O)
  for (int64_t q0 = 0; q0 < s.Nq; q0 += s.chunk) {
    const int64_t q1 = std::min(q0 + s.chunk, s.Nq), k1 = key_end(s, q1);
    if (k1 <= 0) continue;
    auto [scores, mask] = chunk_scores(qc, kc, p, s, q0, q1, k1);
    Tensor prob = at::exp(scores - lse_safe.slice(2, q0, q1)).masked_fill(mask.logical_not(), 0);
    Tensor dout_c = dout.slice(2, q0, q1);
    dv.slice(2, 0, k1).add_(at::matmul(prob.transpose(-1, -2), dout_c));
    Tensor dprob = at::matmul(dout_c, vc.slice(2, 0, k1).transpose(-1, -2));
    Tensor dscores = prob * (dprob - delta.slice(2, q0, q1)) * s.scale;
    dq.slice(2, q0, q1).add_(at::matmul(dscores, kc.slice(2, 0, k1)));
    dk.slice(2, 0, k1).add_(at::matmul(dscores.transpose(-1, -2), qc.slice(2, q0, q1)));
  }
  return {dq.to(q.scalar_type()), reduce_heads(dk, s.group).to(k.scalar_type()),
          reduce_heads(dv, s.group).to(v.scalar_type())};
}

namespace {

struct ReferenceAttention : public torch::autograd::Function<ReferenceAttention> {
  // The pattern travels as a plain struct: it is not differentiable, and
  // autograd refuses undefined tensors among a function's tensor inputs.
  static Tensor forward(AutogradContext* ctx, const Tensor& q, const Tensor& k, const Tensor& v,
                        const Pattern& p, int64_t chunk_size, double scale) {
    NoAutocast no_autocast;
    Shapes s = make_shapes(q, k, chunk_size, scale);
    auto [out, lse] = attend(q, k, v, p, s);
    ctx->save_for_backward({q, k, v, out, lse});
    save_pattern(ctx, p);
    ctx->saved_data["chunk"] = chunk_size;
    ctx->saved_data["scale"] = s.scale;
    return out.to(q.scalar_type());
  }

  static tensor_list backward(AutogradContext* ctx, tensor_list grads) {
    auto saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = reference_backward(saved[0], saved[1], saved[2], load_pattern(ctx),
                                           ctx->saved_data["chunk"].toInt(),
                                           ctx->saved_data["scale"].toDouble(), saved[3],
                                           saved[4], grads[0]);
    return {dq, dk, dv, Tensor(), Tensor(), Tensor()};
  }
};

}  // namespace

Tensor reference_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                           const Pattern& pattern, int64_t chunk_size, double scale) {
  check_inputs(q, k, v, pattern);
  return ReferenceAttention::apply(q, k, v, pattern, chunk_size, scale);
}

std::pair<Tensor, Tensor> reference_attention_with_lse(const Tensor& q, const Tensor& k,
                                                       const Tensor& v, const Pattern& pattern,
                                                       int64_t chunk_size, double scale) {
  check_inputs(q, k, v, pattern);
  NoAutocast no_autocast;
  at::NoGradGuard no_grad;
  auto [out, lse] = attend(q, k, v, pattern, make_shapes(q, k, chunk_size, scale));
  return {out.to(q.scalar_type()), lse.to(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat)};
}

Tensor naive_attention(const Tensor& q, const Tensor& k, const Tensor& v, const Pattern& pattern,
                       double scale) {
  check_inputs(q, k, v, pattern);
  const int64_t group = q.size(1) / k.size(1);
  if (scale <= 0) scale = 1.0 / std::sqrt(static_cast<double>(q.size(3)));
  Tensor mask = allowed_mask(pattern, q.size(0), q.size(1), q.size(2), k.size(2), q.options());
  Tensor scores = at::matmul(q, expand_heads(k, group).transpose(-1, -2)) * scale;
  // A row with no allowed key would be all -inf (NaN after softmax, also in
  // the backward): give it finite scores, then zero its probabilities.
  Tensor any = mask.any(-1, true);
  scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity())
               .masked_fill(any.logical_not(), 0);
  Tensor prob = at::where(any, at::softmax(scores, -1), at::zeros_like(scores));
  return at::matmul(prob, expand_heads(v, group));
}

// ---------------------------------------------------------------------------

Tensor Attention::forward(const Tensor& q, const Tensor& k, const Tensor& v,
                          at::Generator& generator) {
  if (options_.kind == Kind::kDense) {
    // Grouped-query attention goes to cuDNN with its keys and values repeated
    // to the query heads (transformers' repeat_kv): one copy of K and V per
    // layer, which costs less than our dense kernel's extra time.
    const bool gqa = q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() &&
                     k.size(1) != q.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0 &&
                     k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3);
    auto repeated = [&](const Tensor& t) {
      return gqa ? t.repeat_interleave(q.size(1) / t.size(1), 1) : t;
    };
    // What cuDNN would see, judged without the copies.
    const bool cudnn_takes =
        gqa ? cudnn_supported(q, q, q) && k.is_cuda() && v.is_cuda() &&
                  k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type()
            : cudnn_supported(q, k, v);
    TORCH_CHECK(options_.backend != Backend::kCudnn || cudnn_takes,
                "attention.backend CUDNN: cuDNN does not take q ", q.sizes(), " ",
                q.scalar_type(), " on ", q.device(), ", k ", k.sizes(),
                " (it needs CUDA bf16/fp16, head dim a multiple of 8 up to 128, as many keys as "
                "queries, and query heads a multiple of the key heads)");
    const bool cudnn = options_.backend == Backend::kCudnn ||
                       (options_.backend == Backend::kAuto && !options_.deterministic &&
                        cudnn_takes);
    if (cudnn) {
      last_pattern_ = Pattern();
      return cudnn_attention(q, repeated(k), repeated(v));
    }
  } else {
    TORCH_CHECK(options_.backend != Backend::kCudnn,
                "attention.backend CUDNN serves DENSE layers only; layer ", layer_,
                " is sparse (use AUTO or KERNEL)");
  }
  Tensor keys = k, values = v;
  if (options_.kind == Kind::kShift && k.size(1) == 1 && q.size(1) >= 2) {
    // One key head cannot be both plain and shifted: give each half of the
    // query heads its own copy (the first half plain, the second shifted);
    // an odd head count gets one copy per query head.
    const int64_t copies = q.size(1) % 2 == 0 ? 2 : q.size(1);
    keys = k.expand({k.size(0), copies, k.size(2), k.size(3)}).contiguous();
    values = v.expand({v.size(0), copies, v.size(2), v.size(3)}).contiguous();
  }
  {
    profile::Phase phase("attention.pattern");
    last_pattern_ = draw_pattern(options_, q, keys, generator, layer_);
  }
  const bool kernel = options_.backend == Backend::kKernel ||
                      (options_.backend == Backend::kAuto && flash_supported(q, keys, values));
  if (last_pattern_.has_local())
    return local_attention(q, keys, values, last_pattern_, kernel, options_.chunk_size, 0,
                           options_.deterministic);
  if (kernel) return flash_attention(q, keys, values, last_pattern_, 0, options_.deterministic);
  return reference_attention(q, keys, values, last_pattern_, options_.chunk_size);
}

}  // namespace sparseflash::attention
