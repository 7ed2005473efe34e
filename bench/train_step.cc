// bench/train_step: the whole training step (forward, backward, clipping,
// AdamW) of GPT-2-small, timed as `sparseflash train` runs it: the same
// trainer::train_step, one wait per step for the loss.
//
// For each context N (--n) and attention mode (--modes), B = --tokens / N
// sequences per step. Random tokens unless --data names a prepared corpus;
// with --train_first K the model first trains K steps on it (AdamW, the
// config's learning rate), so that LSH buckets come from a model that has
// learned something rather than from its initialisation. Then --warmup steps,
// then --steps timed steps (wall clock over the steps, the GPU kept busy as
// in training). Reported per row: tokens/s, ms per step, peak GPU memory
// (allocated, over the timed steps), the pattern density per layer (share of
// the dense causal pairs the sparse pattern allows: attention::pattern_density;
// uniform hash buckets give 1 / nb), and with --phases the GPU time per phase
// of the step (profile::Phase marks, from 3 more steps), and with --kernels
// the top kernels of one step by GPU time (Kineto).
//
// Modes: dense (cuDNN where it applies: attention.backend AUTO), dense-ours
// (our dense kernel), hash:NB (shared QK, the paper's LM setting),
// hash:NB:sep (separate Q and K), with :raw LSH of the uncentred vectors
// (attention.lsh_center=false), with :cap buckets of equal size in each block
// of 128 rows (attention.lsh_capacity=1), drop:P, shift[:G] (S2-Attn); all but
// hash:NB with separate query and key projections. A sparse mode with :sN:wW
// adds N sink tokens and a local window of W (attention.sink_tokens,
// attention.local_window), e.g. hash:16:sep:s4:w64. Anything else of the config can be set with
// --set as in `sparseflash train` (after the mode's own settings:
// e.g. --set attention.lsh_center=false).
//
// JSON: --json PATH (bench/results/train-step-<gpu>.json by convention); the
// PyTorch anchors come from bench/train_step_torch.py in the same call
// (scripts/gpu_train_step.sh runs both).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "attention/attention.h"
#include "configs/config.h"
#include "data/loader.h"
#include "model/gpt.h"
#include "nlohmann/json.hpp"
#include "model/factory.h"
#include "profile/phases.h"
#include "trainer/schedule.h"
#include "trainer/optimizer.h"
#include "trainer/step.h"

ABSL_FLAG(std::vector<std::string>, n, std::vector<std::string>({"1024", "8192", "16384"}),
          "context lengths N, comma separated");
ABSL_FLAG(std::vector<std::string>, modes,
          std::vector<std::string>({"dense", "hash:16", "hash:16:sep", "drop:0.5"}),
          "attention modes: dense, dense-ours, hash:NB[:sep][:raw][:cap], drop:P, shift[:G]; sparse "
          "kinds take :sN:wW (N sink tokens, a local window of W), e.g. hash:16:sep:s4:w64");
ABSL_FLAG(int64_t, tokens, 16384, "tokens per step (B = tokens / N)");
ABSL_FLAG(int64_t, warmup, 3, "untimed steps before timing");
ABSL_FLAG(int64_t, steps, 20, "timed steps");
ABSL_FLAG(std::string, config, "preset:gpt2_small_hash8k", "base config (file or preset:NAME)");
ABSL_FLAG(std::vector<std::string>, set, {},
          "config overrides path=value, comma-separated (one list: a second --set replaces "
          "the first)");
ABSL_FLAG(int64_t, vocab, 50304,
          "vocabulary size (model.vocab_size); 0 = the config's (e.g. from model.init_from)");
ABSL_FLAG(std::string, data, "", "prepared corpus for real tokens (default: random tokens)");
ABSL_FLAG(int64_t, train_first, 0, "with --data: steps of training before the warm-up");
ABSL_FLAG(bool, phases, true, "GPU time per phase of the step (3 extra steps)");
ABSL_FLAG(bool, kernels, false, "top kernels of one step by GPU time (Kineto)");
ABSL_FLAG(std::string, json, "", "write the results here");

namespace sf = sparseflash;
using at::Tensor;
using Clock = std::chrono::steady_clock;

namespace {

struct Mode {
  std::string name;
  std::vector<std::string> overrides;
};

Mode parse_kind(const std::string& text);

Mode parse_mode(const std::string& text) {
  std::vector<std::string> all = absl::StrSplit(text, ':'), f;
  // Sinks and a local window for the sparse kinds: fields sN and wN anywhere
  // after the kind, e.g. hash:16:sep:s4:w64.
  std::vector<std::string> local;
  for (size_t i = 0; i < all.size(); ++i) {
    int64_t v = 0;
    if (i > 0 && all[i].size() > 1 && (all[i][0] == 's' || all[i][0] == 'w') &&
        absl::SimpleAtoi(all[i].substr(1), &v)) {
      local.push_back(absl::StrCat(all[i][0] == 's' ? "attention.sink_tokens=" : "attention.local_window=", v));
    } else {
      f.push_back(all[i]);
    }
  }
  if (!local.empty() && (f[0] == "dense" || f[0] == "dense-ours"))
    throw std::invalid_argument("bad mode " + text + ": sinks and a window are for the sparse kinds");
  const std::string kind_text = absl::StrJoin(f, ":");
  Mode m = parse_kind(kind_text);
  m.name = text;
  for (auto& o : local) m.overrides.push_back(o);
  return m;
}

Mode parse_kind(const std::string& text) {
  std::vector<std::string> f = absl::StrSplit(text, ':');
  Mode m{text, {}};
  if (text == "dense") {
    m.overrides = {"attention.kind=DENSE", "attention.shared_qk=false"};
  } else if (text == "dense-ours") {
    m.overrides = {"attention.kind=DENSE", "attention.shared_qk=false", "attention.backend=KERNEL"};
  } else if (f[0] == "hash" && f.size() >= 2) {
    int nb = 0;
    bool sep = false, raw = false, capped = false;
    for (size_t i = 2; i < f.size(); ++i) {
      if (f[i] == "sep") sep = true;
      else if (f[i] == "raw") raw = true;
      else if (f[i] == "cap") capped = true;
      else throw std::invalid_argument("bad mode " + text + " (hash:NB[:sep][:raw][:cap])");
    }
    if (!absl::SimpleAtoi(f[1], &nb)) throw std::invalid_argument("bad mode " + text);
    m.overrides = {"attention.kind=HASH", absl::StrCat("attention.num_buckets=", nb),
                   absl::StrCat("attention.shared_qk=", sep ? "false" : "true"),
                   absl::StrCat("attention.lsh_center=", raw ? "false" : "true"),
                   absl::StrCat("attention.lsh_capacity=", capped ? 1 : 0)};
  } else if (f[0] == "shift" && f.size() <= 2) {
    // S2-Attn; shift:G fixes the group size, plain shift takes N / 4.
    m.overrides = {"attention.kind=SHIFT", "attention.shared_qk=false",
                   absl::StrCat("attention.group_size=", f.size() == 2 ? f[1] : "0")};
  } else if (f[0] == "drop" && f.size() == 2) {
    m.overrides = {"attention.kind=DROP", "attention.shared_qk=false",
                   absl::StrCat("attention.drop_prob=", f[1])};
  } else {
    throw std::invalid_argument("unknown mode \"" + text +
                                "\" (dense, dense-ours, hash:NB[:sep][:raw][:cap], drop:P, shift[:G]; "
                                "sparse kinds take :sN:wW for N sinks and a window of W)");
  }
  return m;
}

double peak_gib() {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(0);
  return static_cast<double>(
             stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)]
                 .peak) /
         (1 << 30);
}

// GPU time per kernel name over one step, largest first.
nlohmann::json top_kernels(const std::function<void()>& step, int top) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities = {ActivityType::CPU, ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  step();
  cudaDeviceSynchronize();
  auto result = prof::disableProfiler();
  std::map<std::string, std::pair<double, int>> by_name;
  double total = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    auto& [ms, count] = by_name[e.name()];
    ms += e.durationNs() / 1e6;
    ++count;
    total += e.durationNs() / 1e6;
  }
  std::vector<std::pair<std::string, std::pair<double, int>>> sorted(by_name.begin(),
                                                                     by_name.end());
  std::sort(sorted.begin(), sorted.end(),
            [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
  nlohmann::json out = {{"total_ms", total}, {"kernels", nlohmann::json::array()}};
  for (int i = 0; i < std::min<int>(top, sorted.size()); ++i)
    out["kernels"].push_back({{"name", sorted[i].first.substr(0, 160)},
                              {"ms", sorted[i].second.first},
                              {"count", sorted[i].second.second}});
  return out;
}

nlohmann::json run_row(int64_t N, const Mode& mode) {
  const int64_t tokens = absl::GetFlag(FLAGS_tokens);
  const int64_t B = std::max<int64_t>(1, tokens / N);
  std::vector<std::string> overrides = {
      absl::StrCat("model.block_size=", N), absl::StrCat("data.seq_len=", N),
      absl::StrCat("data.batch_size=", B), "train.device=cuda", "train.bf16=true"};
  if (!absl::GetFlag(FLAGS_data).empty())
    overrides.push_back(absl::StrCat("data.dir=", absl::GetFlag(FLAGS_data)));
  if (absl::GetFlag(FLAGS_vocab) > 0)
    overrides.push_back(absl::StrCat("model.vocab_size=", absl::GetFlag(FLAGS_vocab)));
  for (const auto& o : mode.overrides) overrides.push_back(o);
  for (const auto& o : absl::GetFlag(FLAGS_set)) overrides.push_back(o);
  auto exp_or = sf::resolve_config(absl::GetFlag(FLAGS_config), overrides, "gpt2_small_hash8k",
                                   sf::model::complete_from_pretrained);
  if (!exp_or.ok()) throw std::runtime_error(std::string(exp_or.status().message()));
  const sf::config::Experiment exp = *exp_or;
  const at::Device device(at::kCUDA, 0);

  nlohmann::json row = {{"n", N}, {"batch", B}, {"tokens_per_step", B * N}, {"mode", mode.name}};
  torch::manual_seed(exp.train().seed());
  auto built = sf::model::build_model(exp, exp.model().vocab_size());
  if (!built.ok()) throw std::runtime_error(std::string(built.status().message()));
  sf::model::CausalLM model = *built;
  if (auto s = sf::model::load_pretrained(exp, model); !s.ok())
    throw std::runtime_error(std::string(s.message()));
  model->to(device);
  model->train();
  sf::trainer::AdamW optimizer(model, exp.optim());
  const std::vector<Tensor> trained = sf::trainer::trainable_parameters(model);
  auto sync = sf::trainer::local_gradients(trained);
  int64_t trained_count = 0;
  for (const Tensor& p : trained) trained_count += p.numel();
  row["parameters"] = model->num_parameters();
  row["trained_parameters"] = trained_count;
  row["activation_checkpointing"] = model->activation_checkpointing();
  sf::trainer::StepOptions options;
  options.grad_accum = 1;
  options.grad_clip = exp.optim().grad_clip();
  options.bf16 = true;

  // Batches: real windows from --data (keyed on the step) or fixed random tokens.
  std::optional<sf::data::TokenLoader> loader;
  if (!absl::GetFlag(FLAGS_data).empty()) {
    auto l = sf::data::TokenLoader::open(absl::GetFlag(FLAGS_data), sf::data::Split::kTrain,
                                         static_cast<int>(N));
    if (!l.ok()) throw std::runtime_error(std::string(l.status().message()));
    loader = std::move(*l);
  }
  const Tensor random_x = at::randint(0, model->vocab_size(), {B, N},
                                      at::TensorOptions().dtype(at::kLong).device(device));
  const Tensor random_y = random_x.roll(-1, 1);
  int64_t step_index = 0;
  auto batch = [&](int) {
    if (!loader) return sf::trainer::Batch{random_x, random_y};
    Tensor x = at::empty({B, N}, at::kLong), y = at::empty({B, N}, at::kLong);
    loader->sample(exp.data().seed(), step_index, 0, 0, static_cast<int>(B),
                   x.data_ptr<int64_t>(), y.data_ptr<int64_t>());
    return sf::trainer::Batch{x.pin_memory().to(device, true), y.pin_memory().to(device, true)};
  };
  double last_loss = 0;
  auto one_step = [&](double lr) {
    auto r = sf::trainer::train_step(model, optimizer, *sync, options, lr, batch);
    last_loss = r.values().first;
    ++step_index;
  };

  const int64_t train_first = loader ? absl::GetFlag(FLAGS_train_first) : 0;
  for (int64_t s = 0; s < train_first; ++s) {
    sf::config::Experiment schedule = exp;
    schedule.mutable_train()->set_max_steps(train_first);
    one_step(sf::trainer::learning_rate(schedule, s));
    if ((s + 1) % 50 == 0 || s + 1 == train_first)
      std::cerr << absl::StrFormat("  N %d %s: trained %d/%d steps, loss %.3f\n", N, mode.name,
                                   s + 1, train_first, last_loss);
  }
  if (train_first > 0) row["loss_after_training"] = last_loss;
  // Timing steps use a small learning rate: the model stays where it is.
  const double lr = exp.optim().lr() * 0.01;
  for (int64_t s = 0; s < absl::GetFlag(FLAGS_warmup); ++s) one_step(lr);
  cudaDeviceSynchronize();
  c10::cuda::CUDACachingAllocator::resetPeakStats(0);
  const int64_t steps = absl::GetFlag(FLAGS_steps);
  const auto start = Clock::now();
  for (int64_t s = 0; s < steps; ++s) one_step(lr);
  cudaDeviceSynchronize();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  row["ms_per_step"] = 1e3 * seconds / steps;
  row["tokens_per_s"] = static_cast<double>(B * N * steps) / seconds;
  row["peak_gib"] = peak_gib();
  row["loss"] = last_loss;

  // Pattern density per layer, from the last step's patterns.
  nlohmann::json density = nlohmann::json::array();
  for (const auto& pattern : model->last_patterns())
    density.push_back(sf::attention::pattern_density(pattern).item<double>());
  row["pattern_density"] = density;

  if (absl::GetFlag(FLAGS_phases)) {
    sf::profile::set_enabled(true);
    sf::profile::collect();
    const int reps = 3;
    const auto t0 = Clock::now();
    for (int s = 0; s < reps; ++s) one_step(lr);
    cudaDeviceSynchronize();
    const double ms = 1e3 * std::chrono::duration<double>(Clock::now() - t0).count() / reps;
    sf::profile::set_enabled(false);
    nlohmann::json phases = {{"step_wall_ms", ms}};
    for (const auto& [name, t] : sf::profile::collect()) phases[name] = t / reps;
    row["phases_ms"] = phases;
  }
  if (absl::GetFlag(FLAGS_kernels)) {
    try {
      row["kernels"] = top_kernels([&] { one_step(lr); }, 30);
    } catch (const std::exception& e) {
      row["kernels_error"] = e.what();
    }
  }
  return row;
}

std::string fmt_phase(const nlohmann::json& row, const char* key) {
  if (!row.contains("phases_ms") || !row["phases_ms"].contains(key)) return "-";
  return absl::StrFormat("%.1f", row["phases_ms"][key].get<double>());
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "bench_train_step: tokens/s of the whole GPT training step per context and attention "
      "mode.\nUsage: bench_train_step [--n 1024,8192,16384] [--modes dense,hash:16,...] "
      "[--json FILE]");
  absl::ParseCommandLine(argc, argv);
  if (!torch::cuda::is_available()) {
    std::cerr << "bench_train_step: no CUDA GPU\n";
    return 1;
  }
  std::vector<Mode> modes;
  std::vector<int64_t> ns;
  try {
    for (const auto& m : absl::GetFlag(FLAGS_modes)) modes.push_back(parse_mode(m));
    for (const auto& s : absl::GetFlag(FLAGS_n)) {
      int64_t n = 0;
      if (!absl::SimpleAtoi(s, &n) || n <= 0) throw std::invalid_argument("bad --n " + s);
      ns.push_back(n);
    }
  } catch (const std::exception& e) {
    std::cerr << "bench_train_step: " << e.what() << "\n";
    return 2;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  nlohmann::json out = {{"gpu", prop.name},
                        {"torch", "libtorch 2.11"},
                        {"tokens_per_step", absl::GetFlag(FLAGS_tokens)},
                        {"warmup", absl::GetFlag(FLAGS_warmup)},
                        {"steps", absl::GetFlag(FLAGS_steps)},
                        {"data", absl::GetFlag(FLAGS_data).empty() ? "random tokens"
                                                                   : absl::GetFlag(FLAGS_data)},
                        {"train_first", absl::GetFlag(FLAGS_train_first)},
                        {"rows", nlohmann::json::array()}};
  auto write_json = [&] {
    if (absl::GetFlag(FLAGS_json).empty()) return;
    std::ofstream f(absl::GetFlag(FLAGS_json));
    f << out.dump(2) << "\n";
  };
  for (int64_t n : ns)
    for (const auto& mode : modes) {
      nlohmann::json row;
      try {
        row = run_row(n, mode);
        std::cerr << absl::StrFormat("N %6d %-12s %8.0f tok/s %7.1f ms/step %6.1f GiB\n", n,
                                     mode.name, row["tokens_per_s"].get<double>(),
                                     row["ms_per_step"].get<double>(),
                                     row["peak_gib"].get<double>());
      } catch (const c10::OutOfMemoryError& e) {
        row = {{"n", n}, {"mode", mode.name}, {"error", "out of memory"}};
        std::cerr << absl::StrFormat("N %6d %-12s out of memory\n", n, mode.name);
      } catch (const std::exception& e) {
        row = {{"n", n}, {"mode", mode.name}, {"error", std::string(e.what()).substr(0, 2000)}};
        std::cerr << absl::StrFormat("N %6d %-12s error: %s\n", n, mode.name,
                                     std::string(e.what()).substr(0, 300));
      }
      out["rows"].push_back(row);
      c10::cuda::CUDACachingAllocator::emptyCache();
      write_json();  // after every row: a killed run keeps what it measured
    }

  std::printf("\n%-7s %-12s %9s %8s %7s %7s | %7s %7s %7s %7s %7s %7s\n", "N", "mode", "tok/s",
              "ms/step", "GiB", "density", "fwd", "bwd", "attn.f", "attn.b", "pattern", "optim");
  for (const auto& row : out["rows"]) {
    if (row.contains("error")) {
      std::printf("%-7lld %-12s %s\n", static_cast<long long>(row["n"].get<int64_t>()),
                  row["mode"].get<std::string>().c_str(),
                  row["error"].get<std::string>().substr(0, 60).c_str());
      continue;
    }
    double density = 0;
    for (const auto& d : row["pattern_density"]) density += d.get<double>();
    density /= std::max<size_t>(1, row["pattern_density"].size());
    std::printf("%-7lld %-12s %9.0f %8.1f %7.1f %7.3f | %7s %7s %7s %7s %7s %7s\n",
                static_cast<long long>(row["n"].get<int64_t>()),
                row["mode"].get<std::string>().c_str(), row["tokens_per_s"].get<double>(),
                row["ms_per_step"].get<double>(), row["peak_gib"].get<double>(), density,
                fmt_phase(row, "step.forward").c_str(), fmt_phase(row, "step.backward").c_str(),
                fmt_phase(row, "attention.forward").c_str(),
                fmt_phase(row, "attention.backward").c_str(),
                fmt_phase(row, "attention.pattern").c_str(),
                fmt_phase(row, "step.optimizer").c_str());
  }
  write_json();
  return 0;
}
