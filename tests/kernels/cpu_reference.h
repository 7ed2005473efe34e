// Float64 CPU reference of sparse causal attention (forward and backward), for
// the torch-free kernel tests. Plain C++: no CUDA, no LibTorch.
//
// Query i (0 <= i < Nq) may attend to key j (0 <= j < Nk) when
//     i + Nk - Nq >= j   and   q_bucket(i) == k_bucket(j)
// (the semantics of attention/kernels/sparse_flash.h with original indices).
// Query head h reads kv head h / (H / Hkv). A row with no allowed key has
// out = 0, lse = -inf and contributes nothing to any gradient.
#pragma once

#include <vector>

namespace sparseflash::kernels_test {

struct RefProblem {
  int B = 0, H = 0, Hkv = 0, Nq = 0, Nk = 0, D = 0;
  float scale = 0;
  // [B, H, Nq, D], [B, Hkv, Nk, D], [B, Hkv, Nk, D], [B, H, Nq, D]; contiguous,
  // values already rounded to the kernel dtype.
  std::vector<float> q, k, v, dout;
  // Original order, [B * H * Nq] and [B * Hkv * Nk]; empty = all 0.
  std::vector<int> q_bucket, k_bucket;
};

struct RefResult {
  std::vector<double> out;  // [B, H, Nq, D]
  std::vector<double> lse;  // [B, H, Nq], natural log; -inf where no key is allowed
  std::vector<double> dq;   // [B, H, Nq, D]
  std::vector<double> dk;   // [B, Hkv, Nk, D], summed over the query heads of a group
  std::vector<double> dv;   // [B, Hkv, Nk, D], summed over the query heads of a group
};

// O(Nq * Nk * D). Throws std::invalid_argument on inconsistent sizes.
RefResult reference_attention(const RefProblem& p);

}  // namespace sparseflash::kernels_test
