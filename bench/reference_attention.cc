// Times the LibTorch reference attention (forward, backward) for the three
// kinds at long sequence lengths, to show it runs at N = 8192 on a GPU and
// what it costs. The CUDA kernels get their own benchmark.
//
// usage: bench_reference_attention [--n 8192] [--batch 1] [--heads 12]
//        [--head-dim 64] [--reps 5] [--json FILE]
#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/cuda.h>

#include "absl/strings/str_format.h"
#include "attention/attention.h"
#include "nlohmann/json.hpp"

using namespace sparseflash;

int main(int argc, char** argv) {
  int64_t n = 8192, batch = 1, heads = 12, head_dim = 64, reps = 5;
  std::string json_path;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--n") n = std::atoll(argv[i + 1]);
    else if (a == "--batch") batch = std::atoll(argv[i + 1]);
    else if (a == "--heads") heads = std::atoll(argv[i + 1]);
    else if (a == "--head-dim") head_dim = std::atoll(argv[i + 1]);
    else if (a == "--reps") reps = std::atoll(argv[i + 1]);
    else if (a == "--json") json_path = argv[i + 1];
    else {
      std::cerr << "unknown flag " << a << "\n";
      return 2;
    }
  }
  const bool cuda = torch::cuda::is_available();
  auto opts = at::TensorOptions().dtype(cuda ? at::kBFloat16 : at::kFloat)
                  .device(cuda ? at::kCUDA : at::kCPU);
  auto sync = [&] { if (cuda) c10::cuda::device_synchronize(); };
  struct Case { const char* mode; attention::Kind kind; double param; };
  std::vector<Case> cases = {{"dense", attention::Kind::kDense, 0},
                             {"hash", attention::Kind::kHash, 16},
                             {"drop", attention::Kind::kDrop, 0.5}};
  at::Generator gen = at::detail::createCPUGenerator(1);
  nlohmann::json rows = nlohmann::json::array();
  std::cout << absl::StrFormat("reference attention, %s, B=%d H=%d N=%d D=%d\n",
                               cuda ? "cuda bf16" : "cpu fp32", batch, heads, n, head_dim);
  std::cout << absl::StrFormat("%-6s %6s %10s %10s %10s\n", "mode", "param", "fwd_ms", "bwd_ms",
                               "peak_GiB");
  for (const auto& c : cases) {
    attention::Options o;
    o.kind = c.kind;
    o.num_buckets = 16;
    o.drop_prob = 0.5;
    at::Tensor q = at::randn({batch, heads, n, head_dim}, opts).requires_grad_();
    at::Tensor k = at::randn({batch, heads, n, head_dim}, opts).requires_grad_();
    at::Tensor v = at::randn({batch, heads, n, head_dim}, opts).requires_grad_();
    double fwd = 0, bwd = 0;
    if (cuda) c10::cuda::CUDACachingAllocator::resetPeakStats(0);
    for (int64_t r = 0; r <= reps; ++r) {  // rep 0 is warm-up
      auto p = attention::draw_pattern(o, q, k, gen, 0);
      sync();
      auto t0 = std::chrono::steady_clock::now();
      at::Tensor out = attention::reference_attention(q, k, v, p, o.chunk_size);
      sync();
      auto t1 = std::chrono::steady_clock::now();
      out.backward(at::ones_like(out));
      sync();
      auto t2 = std::chrono::steady_clock::now();
      if (r > 0) {
        fwd += std::chrono::duration<double, std::milli>(t1 - t0).count() / reps;
        bwd += std::chrono::duration<double, std::milli>(t2 - t1).count() / reps;
      }
    }
    double peak = 0;
    if (cuda) {
      auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
      peak = stats.allocated_bytes[0].peak / double(1 << 30);
    }
    std::cout << absl::StrFormat("%-6s %6g %10.2f %10.2f %10.2f\n", c.mode, c.param, fwd, bwd,
                                 peak);
    rows.push_back({{"impl", "reference"}, {"mode", c.mode}, {"param", c.param}, {"N", n},
                    {"D", head_dim}, {"B", batch}, {"H", heads}, {"fwd_ms", fwd},
                    {"bwd_ms", bwd}, {"peak_gib", peak}});
  }
  if (!json_path.empty()) std::ofstream(json_path) << rows.dump(2) << "\n";
  return 0;
}
