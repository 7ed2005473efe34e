// saap_bench: times the SAAP fitting phases at model scale on random data:
// batched k-means over all KV heads of all layers at once, and classifier
// training over all query heads. Defaults are SmolLM2-135M's shapes (30
// layers x 3 KV heads, 9 query heads, head dim 64) with 8 calibration
// windows of 8192 tokens. Prints a short table; --json writes the figures.
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>

#include <torch/cuda.h>
#include <torch/torch.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "saap/classifier.h"
#include "saap/kmeans.h"

ABSL_FLAG(int64_t, kv_heads, 90, "KV heads clustered at once (layers x KV heads per layer)");
ABSL_FLAG(int64_t, keys, 65536, "keys per KV head (calibration tokens)");
ABSL_FLAG(int64_t, head_dim, 64, "head dimension");
ABSL_FLAG(int64_t, partitions, 256, "C: k-means clusters per KV head");
ABSL_FLAG(int64_t, max_iterations, 25, "k-means Lloyd iterations at most");
ABSL_FLAG(int64_t, query_heads, 270, "query heads trained at once (layers x query heads)");
ABSL_FLAG(int64_t, queries, 16384, "training queries per query head");
ABSL_FLAG(int64_t, hidden, 256, "classifier hidden width");
ABSL_FLAG(int64_t, steps, 2000, "classifier AdamW steps");
ABSL_FLAG(int64_t, batch, 512, "queries per head per classifier step");
ABSL_FLAG(std::string, device, "cuda", "cuda or cpu");
ABSL_FLAG(std::string, json, "", "write the figures to this JSON file");

namespace {

double seconds_since(std::chrono::steady_clock::time_point start, const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Times SAAP fitting (batched k-means over all KV heads, classifier training over all "
      "query heads) on random data at model scale.\nUsage: saap_bench [--device cuda] "
      "[--kv_heads 90 --keys 65536 --partitions 256 ...]");
  absl::ParseCommandLine(argc, argv);
  using sparseflash::saap::KMeansOptions;
  const std::string device_name = absl::GetFlag(FLAGS_device);
  if (device_name != "cuda" && device_name != "cpu") {
    std::fprintf(stderr, "saap_bench: --device must be cuda or cpu, got %s\n", device_name.c_str());
    return 2;
  }
  if (device_name == "cuda" && !torch::cuda::is_available()) {
    std::fprintf(stderr, "saap_bench: --device cuda but no CUDA device is available\n");
    return 2;
  }
  const torch::Device device(device_name == "cuda" ? torch::kCUDA : torch::kCPU);
  try {
    // Keys like a Llama head's: a shared offset plus structure in a few directions.
    const int64_t kv = absl::GetFlag(FLAGS_kv_heads), n = absl::GetFlag(FLAGS_keys),
                  d = absl::GetFlag(FLAGS_head_dim), c = absl::GetFlag(FLAGS_partitions);
    torch::manual_seed(1);
    torch::Tensor keys = torch::randn({kv, n, d}, torch::device(device)) +
                         torch::randn({kv, 1, d}, torch::device(device)) * 4;
    KMeansOptions options;
    options.num_clusters = c;
    options.max_iterations = absl::GetFlag(FLAGS_max_iterations);
    options.tolerance = 0;  // run every iteration: the time per iteration is the figure
    auto start = std::chrono::steady_clock::now();
    sparseflash::saap::KMeansResult km = sparseflash::saap::batched_kmeans(keys, options);
    const double kmeans_s = seconds_since(start, device);

    const int64_t qh = absl::GetFlag(FLAGS_query_heads), nq = absl::GetFlag(FLAGS_queries);
    torch::Tensor q = torch::randn({qh, nq, d}, torch::device(device));
    torch::Tensor targets = torch::softmax(torch::randn({qh, nq, c}, torch::device(device)) * 3, -1);
    sparseflash::saap::QueryClassifier model(qh, d, absl::GetFlag(FLAGS_hidden), c, 1, device);
    sparseflash::saap::ClassifierTrainOptions train;
    train.steps = absl::GetFlag(FLAGS_steps);
    train.batch_size = absl::GetFlag(FLAGS_batch);
    train.recall_at = {1, std::min<int64_t>(8, c), std::min<int64_t>(32, c)};
    start = std::chrono::steady_clock::now();
    sparseflash::saap::ClassifierReport report =
        sparseflash::saap::train_classifier(model, q, targets, train);
    const double classifier_s = seconds_since(start, device);

    std::printf("\nSAAP fitting phases on %s (random data)\n", device_name.c_str());
    std::printf("%-34s%12s%14s\n", "phase", "seconds", "per unit");
    std::printf("%-34s%12.2f%11.1f ms  (per iteration, %lld iterations)\n",
                ("k-means " + std::to_string(kv) + " heads x " + std::to_string(n) + " keys, C=" +
                 std::to_string(c)).c_str(),
                kmeans_s, 1e3 * kmeans_s / std::max<int64_t>(1, km.iterations),
                static_cast<long long>(km.iterations));
    std::printf("%-34s%12.2f%11.2f ms  (per step)\n",
                ("classifier " + std::to_string(qh) + " heads x " + std::to_string(nq)).c_str(),
                classifier_s, 1e3 * classifier_s / train.steps);
    if (!absl::GetFlag(FLAGS_json).empty()) {
      std::ofstream out(absl::GetFlag(FLAGS_json));
      out << "{\"device\": \"" << device_name << "\", \"kv_heads\": " << kv << ", \"keys\": " << n
          << ", \"head_dim\": " << d << ", \"partitions\": " << c
          << ", \"kmeans_iterations\": " << km.iterations << ", \"kmeans_seconds\": " << kmeans_s
          << ", \"query_heads\": " << qh << ", \"queries\": " << nq
          << ", \"classifier_steps\": " << train.steps
          << ", \"classifier_seconds\": " << classifier_s
          << ", \"classifier_holdout_kl\": " << report.holdout_kl << "}\n";
      if (!out) {
        std::fprintf(stderr, "saap_bench: cannot write %s\n", absl::GetFlag(FLAGS_json).c_str());
        return 1;
      }
    }
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "saap_bench: %s\n", e.what_without_backtrace());
    return 1;
  }
  return 0;
}
