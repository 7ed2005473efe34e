#include "tests/kernels/cpu_reference.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>

namespace sparseflash::kernels_test {
namespace {

void check_size(const char* name, size_t got, size_t want) {
  if (got != want) {
    throw std::invalid_argument(std::string("reference_attention: ") + name + " has " +
                                std::to_string(got) + " elements, expected " +
                                std::to_string(want));
  }
}

}  // namespace

RefResult reference_attention(const RefProblem& p) {
  if (p.B < 0 || p.H <= 0 || p.Hkv <= 0 || p.Nq < 0 || p.Nk < 0 || p.D <= 0 ||
      p.H % p.Hkv != 0) {
    throw std::invalid_argument("reference_attention: bad shape");
  }
  const size_t B = p.B, H = p.H, Hkv = p.Hkv, Nq = p.Nq, Nk = p.Nk, D = p.D;
  check_size("q", p.q.size(), B * H * Nq * D);
  check_size("dout", p.dout.size(), B * H * Nq * D);
  check_size("k", p.k.size(), B * Hkv * Nk * D);
  check_size("v", p.v.size(), B * Hkv * Nk * D);
  if (!p.q_bucket.empty()) check_size("q_bucket", p.q_bucket.size(), B * H * Nq);
  if (!p.k_bucket.empty()) check_size("k_bucket", p.k_bucket.size(), B * Hkv * Nk);

  const double scale = p.scale;
  const size_t group = H / Hkv;
  const long offset = static_cast<long>(Nk) - static_cast<long>(Nq);

  RefResult r;
  r.out.assign(B * H * Nq * D, 0.0);
  r.lse.assign(B * H * Nq, -std::numeric_limits<double>::infinity());
  r.dq.assign(B * H * Nq * D, 0.0);
  r.dk.assign(B * Hkv * Nk * D, 0.0);
  r.dv.assign(B * Hkv * Nk * D, 0.0);

  std::vector<size_t> keys;
  std::vector<double> s;
  for (size_t b = 0; b < B; ++b) {
    for (size_t h = 0; h < H; ++h) {
      const size_t hk = h / group;
      const size_t qrow = b * H + h;    // (b, h) row sequence of queries
      const size_t krow = b * Hkv + hk;  // (b, hk) row sequence of keys/values
      for (size_t i = 0; i < Nq; ++i) {
        const int qb = p.q_bucket.empty() ? 0 : p.q_bucket[qrow * Nq + i];
        const long last = std::min(static_cast<long>(i) + offset, static_cast<long>(Nk) - 1);
        keys.clear();
        for (long j = 0; j <= last; ++j) {
          const int kb = p.k_bucket.empty() ? 0 : p.k_bucket[krow * Nk + j];
          if (kb == qb) keys.push_back(static_cast<size_t>(j));
        }
        if (keys.empty()) continue;  // out 0, lse -inf, no gradient

        const float* qi = &p.q[(qrow * Nq + i) * D];
        const float* doi = &p.dout[(qrow * Nq + i) * D];
        double* oi = &r.out[(qrow * Nq + i) * D];
        double* dqi = &r.dq[(qrow * Nq + i) * D];

        s.resize(keys.size());
        double m = -std::numeric_limits<double>::infinity();
        for (size_t t = 0; t < keys.size(); ++t) {
          const float* kj = &p.k[(krow * Nk + keys[t]) * D];
          double dot = 0;
          for (size_t d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * kj[d];
          s[t] = scale * dot;
          m = std::max(m, s[t]);
        }
        double sum = 0;
        for (double x : s) sum += std::exp(x - m);
        const double lse = m + std::log(sum);
        r.lse[qrow * Nq + i] = lse;
        for (double& x : s) x = std::exp(x - lse);  // s now holds P

        for (size_t t = 0; t < keys.size(); ++t) {
          const float* vj = &p.v[(krow * Nk + keys[t]) * D];
          for (size_t d = 0; d < D; ++d) oi[d] += s[t] * vj[d];
        }
        double delta = 0;  // rowsum(dout * out)
        for (size_t d = 0; d < D; ++d) delta += static_cast<double>(doi[d]) * oi[d];

        for (size_t t = 0; t < keys.size(); ++t) {
          const size_t kj_index = (krow * Nk + keys[t]) * D;
          const float* kj = &p.k[kj_index];
          const float* vj = &p.v[kj_index];
          double dp = 0;
          for (size_t d = 0; d < D; ++d) dp += static_cast<double>(doi[d]) * vj[d];
          const double P = s[t];
          const double ds = P * (dp - delta);
          double* dkj = &r.dk[kj_index];
          double* dvj = &r.dv[kj_index];
          for (size_t d = 0; d < D; ++d) {
            dqi[d] += scale * ds * kj[d];
            dkj[d] += scale * ds * qi[d];
            dvj[d] += P * doi[d];
          }
        }
      }
    }
  }
  return r;
}

}  // namespace sparseflash::kernels_test
