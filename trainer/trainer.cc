// The training loop. Reading order: devices and signals, evaluation, the
// run's setup (data, output directory, resume), the step loop, the end.
#include "trainer/trainer.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <sstream>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "configs/config.h"
#include "io/atomic_file.h"
#include "nlohmann/json.hpp"
#include "model/factory.h"
#include "tokenizer/tokenizer.h"
#include "model/generate.h"
#include "trainer/distributed.h"
#include "trainer/schedule.h"
#include "trainer/checkpoint.h"
#include "trainer/step.h"
#include "trainer/tensorboard.h"

namespace sparseflash::trainer {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------------------
// devices and signals

// Peak GPU memory the caching allocator handed out on `device` since the process
// started, in GiB (0 on the CPU).
static double peak_gpu_gib(const c10::Device& device) {
  if (!device.is_cuda()) return 0;
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
  constexpr auto kAll = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
  return static_cast<double>(stats.allocated_bytes[kAll].peak) / (1 << 30);
}

// Each layer's share of the dense causal pairs its last pattern allowed
// (attention::pattern_density; 1 for a dense layer), read with one copy to the
// host; empty when every layer is dense. Trained LSH buckets are uneven, and
// the sparse kernels' time grows with this share.
static std::vector<double> pattern_densities(const model::CausalLM& model) {
  const std::vector<attention::Pattern> patterns = model->last_patterns();
  std::vector<at::Tensor> sparse;
  std::vector<size_t> layers;
  for (size_t i = 0; i < patterns.size(); ++i) {
    const attention::Pattern& p = patterns[i];
    if (!p.q_bucket.defined() && !p.q_keep.defined()) continue;
    sparse.push_back(attention::pattern_density(p).to(at::kFloat).reshape({}));
    layers.push_back(i);
  }
  if (sparse.empty()) return {};
  std::vector<double> out(patterns.size(), 1.0);
  const at::Tensor values = at::stack(sparse).cpu().to(at::kDouble);
  for (size_t j = 0; j < layers.size(); ++j) out[layers[j]] = values[j].item<double>();
  return out;
}

absl::StatusOr<c10::Device> resolve_device(const std::string& name) {
  const bool have_cuda = torch::cuda::is_available();
  if (name == "auto") return have_cuda ? c10::Device(c10::kCUDA, 0) : c10::Device(c10::kCPU);
  if (name == "cpu") return c10::Device(c10::kCPU);
  if (name == "cuda" || name.rfind("cuda:", 0) == 0) {
    if (!have_cuda)
      return absl::FailedPreconditionError(absl::StrCat(
          "train.device is \"", name, "\" but no CUDA GPU is available (use \"cpu\" or \"auto\")"));
    int index = 0;
    if (name.size() > 5 && (!absl::SimpleAtoi(name.substr(5), &index) || index < 0 ||
                            index >= static_cast<int>(torch::cuda::device_count())))
      return absl::InvalidArgumentError(absl::StrCat("train.device \"", name, "\": this machine has ",
                                                     torch::cuda::device_count(), " GPU(s)"));
    return c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("train.device \"", name, "\": expected auto, cpu, cuda or cuda:N"));
}

static std::atomic<int> g_signal{0};

static void on_signal(int signo) { g_signal.store(signo); }

void install_signal_handlers() {
  struct sigaction action {};
  action.sa_handler = on_signal;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESETHAND;  // a second Ctrl-C kills at once
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

int pending_signal() { return g_signal.load(); }

void request_stop(int signo) { g_signal.store(signo); }

// ---------------------------------------------------------------------------
// batches and evaluation

namespace {

Batch make_batch(int rows, int seq_len, c10::Device device,
                 const std::function<void(int64_t*, int64_t*)>& fill) {
  at::Tensor x = at::empty({rows, seq_len}, at::kLong), y = at::empty({rows, seq_len}, at::kLong);
  fill(x.data_ptr<int64_t>(), y.data_ptr<int64_t>());
  if (device.is_cuda()) {
    x = x.pin_memory().to(device, /*non_blocking=*/true);
    y = y.pin_memory().to(device, /*non_blocking=*/true);
  }
  return {x, y};
}

}  // namespace

EvalResult evaluate(model::CausalLM model, const data::TokenLoader& val, int batches, int batch_size,
                    c10::Device device, bool bf16) {
  torch::NoGradGuard no_grad;
  model->eval();
  at::Tensor total = at::zeros({}, at::TensorOptions().dtype(at::kDouble).device(device));
  for (int b = 0; b < batches; ++b) {
    Batch batch = make_batch(batch_size, val.seq_len(), device, [&](int64_t* x, int64_t* y) {
      val.eval_batch(b, batch_size, x, y);
    });
    Autocast autocast(bf16 && device.is_cuda());
    total += model->loss(batch.x, batch.y).to(at::kDouble);
  }
  model->train();
  EvalResult r;
  r.loss = total.item<double>() / batches;
  r.bits_per_byte = r.loss / std::log(2.0) / val.meta().bytes_per_token();
  r.tokens = static_cast<int64_t>(batches) * batch_size * val.seq_len();
  return r;
}

// ---------------------------------------------------------------------------
// output directory, metrics

namespace {

absl::Status prepare_out_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec)
    return absl::PermissionDeniedError(absl::StrCat("checkpoint.out_dir \"", dir,
                                                    "\" cannot be created: ", ec.message()));
  const std::string probe = (fs::path(dir) / ".write_probe").string();
  std::ofstream out(probe);
  if (!out || !(out << "ok") || (out.close(), !out)) {
    return absl::PermissionDeniedError(
        absl::StrCat("checkpoint.out_dir \"", dir, "\" is not writable"));
  }
  fs::remove(probe, ec);
  return absl::OkStatus();
}

// Keeps the records of steps <= `step` (a resumed run rewrites what follows).
// Returns the last step with an evaluation among them (-1: none), so that
// rerunning a finished run does not log its final evaluation twice.
absl::StatusOr<int64_t> truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return -1;
  std::string kept, line;
  int64_t last_eval_step = -1;
  while (std::getline(in, line)) {
    auto record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_object() && record.contains("step") && record["step"].is_number_integer() &&
        record["step"].get<int64_t>() <= step) {
      kept += line + "\n";
      if (record.contains("val_loss"))
        last_eval_step = std::max(last_eval_step, record["step"].get<int64_t>());
    }
  }
  if (auto s = io::write_file_atomically(path, kept); !s.ok()) return s;
  return last_eval_step;
}

// metrics.jsonl, and every number of a record but its step also as a
// TensorBoard scalar of that step, tagged with its JSON key (when `events`);
// element i of a list of numbers is tagged KEY/i.
class Metrics {
 public:
  Metrics(std::string path, std::unique_ptr<EventWriter> events)
      : path_(std::move(path)), out_(path_, std::ios::app), events_(std::move(events)) {}
  absl::Status write(const nlohmann::json& record) {
    out_ << record.dump() << "\n";
    out_.flush();
    if (!out_) return absl::InternalError(absl::StrCat("cannot write ", path_));
    if (!events_) return absl::OkStatus();
    std::vector<std::pair<std::string, double>> scalars;
    for (const auto& [key, value] : record.items()) {
      if (key != "step" && value.is_number()) scalars.emplace_back(key, value.get<double>());
      // A list of numbers (one per layer): tags KEY/0, KEY/1, ...
      if (value.is_array())
        for (size_t i = 0; i < value.size(); ++i)
          if (value[i].is_number())
            scalars.emplace_back(absl::StrCat(key, "/", i), value[i].get<double>());
    }
    return events_->add_scalars(record["step"].get<int64_t>(), scalars);
  }

 private:
  std::string path_;
  std::ofstream out_;
  std::unique_ptr<EventWriter> events_;
};

// The config as TensorBoard's text dashboard shows it: Markdown, so fenced.
std::string config_markdown(const config::Experiment& exp) {
  return absl::StrCat("```\n", config_to_text(exp), "```\n");
}

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(seconds);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s / 60) % 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

}  // namespace

// ---------------------------------------------------------------------------
// the run

namespace {

// A pretrained model reads the ids of its own tokenizer: the data must have
// been prepared with it (the same identity, tokenizer/tokenizer.h).
absl::Status check_pretrained_tokenizer(const std::string& init_from, const data::Meta& meta,
                                        const std::string& data_dir) {
  if (init_from.empty()) return absl::OkStatus();
  std::string identity, source = init_from;
  if (model::is_training_checkpoint(init_from)) {
    auto info = read_checkpoint_info(checkpoint_path(init_from));
    if (!info.ok()) return info.status();
    identity = info->tokenizer;
  } else {
    auto own = tokenizer::load_tokenizer(init_from, "");
    if (!own.ok()) {
      // A model file without a tokenizer (e.g. an HF directory without
      // tokenizer.json): nothing to compare with.
      std::cerr << "note: model.init_from " << init_from
                << " has no tokenizer to compare the data's with (" << own.status().message()
                << "); make sure " << data_dir << " was prepared with the model's tokenizer\n";
      return absl::OkStatus();
    }
    identity = (*own)->identity();
  }
  if (identity == meta.tokenizer) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the data in ", data_dir, " was prepared with tokenizer ", meta.tokenizer, " (",
      meta.tokenizer_source, "), but model.init_from ", init_from, " reads tokenizer ", identity,
      ": its ids would mean other tokens. Prepare the data with `sparseflash prepare --tokenizer ",
      source, " ...`"));
}

}  // namespace
//
// With several processes (world.world_size > 1) every rank runs this same
// loop on its rows of the global batch; rank 0 alone writes files, logs,
// evaluates and samples (trainer/distributed.h has the collectives).

static absl::StatusOr<RunResult> train_ranks(config::Experiment exp, const TrainHooks& hooks,
                                             const World& world) {
  // One GPU per local rank unless the config names one.
  std::string device_name = exp.train().device();
  if (world.distributed() && (device_name == "auto" || device_name == "cuda") &&
      torch::cuda::is_available())
    device_name = absl::StrCat("cuda:", world.local_rank);
  auto device_or = resolve_device(device_name);
  if (!device_or.ok()) return device_or.status();
  const c10::Device device = *device_or;
  if (device.is_cuda()) c10::impl::getDeviceGuardImpl(c10::kCUDA)->setDevice(device);
  const bool rank0 = world.rank == 0;
  const int world_size = world.world_size;
  const bool bf16 = exp.train().bf16() && device.is_cuda();
  if (exp.train().cpu_threads() > 0) at::set_num_threads(exp.train().cpu_threads());

  // A config resolved by resolve_config with model::complete_from_pretrained
  // already holds the pretrained file's architecture; one built otherwise
  // gets it here (the file must agree with any field it sets).
  if (!exp.model().init_from().empty()) {
    if (auto s = model::complete_from_pretrained(&exp); !s.ok()) return s;
    fill_defaults(&exp);
    if (auto s = validate_config(exp, "the config"); !s.ok()) return s;
  }

  // Data first: the vocabulary comes from it.
  const auto& d = exp.data();
  auto train_data = data::TokenLoader::open(d.dir(), data::Split::kTrain, d.seq_len());
  if (!train_data.ok()) return train_data.status();
  auto val_data = data::TokenLoader::open(d.dir(), data::Split::kVal, d.seq_len());
  if (!val_data.ok()) return val_data.status();
  const data::Meta& meta = train_data->meta();
  auto tokenizer = data::open_data_tokenizer(meta);
  if (!tokenizer.ok() && !exp.model().init_from().empty() &&
      !model::is_training_checkpoint(exp.model().init_from())) {
    // The data's tokenizer file is not here (data prepared on another
    // machine), but the pretrained model carries the same tokenizer.
    auto own = tokenizer::load_tokenizer(exp.model().init_from(), "");
    if (own.ok() && (*own)->identity() == meta.tokenizer) tokenizer = std::move(own);
  }
  if (!tokenizer.ok()) return tokenizer.status();
  if (exp.model().vocab_size() == 0) exp.mutable_model()->set_vocab_size(meta.vocab_size);
  if (exp.model().vocab_size() < meta.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat(
        "model.vocab_size ", exp.model().vocab_size(), " is smaller than the data's vocabulary (",
        meta.vocab_size, " in ", d.dir(), "/meta.json)"));
  if (auto s = check_pretrained_tokenizer(exp.model().init_from(), meta, d.dir()); !s.ok())
    return s;

  const std::string out_dir = exp.checkpoint().out_dir();
  const std::string ckpt = (fs::path(out_dir) / "ckpt.pt").string();
  const std::string metrics_path = (fs::path(out_dir) / "metrics.jsonl").string();
  if (rank0) {
    if (auto s = prepare_out_dir(out_dir); !s.ok()) return s;
    std::cerr << "# resolved config\n" << config_to_text(exp) << std::flush;
    if (auto s = io::write_file_atomically((fs::path(out_dir) / "config.txtpb").string(),
                                           config_to_text(exp));
        !s.ok())
      return s;
  }

  std::unique_ptr<DataParallel> dp;
  if (world.distributed()) {
    auto connected = DataParallel::connect(world, exp.distributed(), device);
    if (!connected.ok()) return connected.status();
    dp = *std::move(connected);
  }

  // Resume only into the same architecture and tokenizer.
  TrainState state;
  const bool resuming = exp.checkpoint().resume() && fs::exists(ckpt);
  if (resuming) {
    auto info = read_checkpoint_info(ckpt);
    if (!info.ok()) return info.status();
    if (auto s = check_same_architecture(info->config, exp); !s.ok())
      return absl::FailedPreconditionError(absl::StrCat(
          "cannot resume from ", ckpt, ": it was written for another model:\n", s.message(),
          "\n(use another checkpoint.out_dir, or --set checkpoint.resume=false to start over)"));
    if (info->tokenizer != meta.tokenizer)
      return absl::FailedPreconditionError(absl::StrCat("cannot resume from ", ckpt,
                                                        ": tokenizer \"", info->tokenizer,
                                                        "\", data uses \"", meta.tokenizer, "\""));
    state = info->state;
  }

  torch::manual_seed(exp.train().seed());
  auto built = model::build_model(exp, meta.vocab_size);
  if (!built.ok()) return built.status();
  model::CausalLM model = *std::move(built);
  // A resumed run's weights come from its checkpoint below.
  if (!resuming)
    if (auto s = model::load_pretrained(exp, model); !s.ok()) return s;
  model->to(device);
  std::unique_ptr<Optimizer> optimizer;
  if (dp) {
    std::vector<std::pair<std::string, Tensor>> named;
    // Frozen parameters (LoRA's base) get no gradient, so no bucket.
    for (const auto& item : model->named_parameters())
      if (item.value().requires_grad()) named.emplace_back(item.key(), item.value());
    dp->attach(named);  // rank 0's initial weights everywhere, buckets, hooks
    if (dp->zero1()) optimizer = dp->make_sharded_adamw(exp.optim());
  }
  if (!optimizer) optimizer = std::make_unique<AdamW>(model, exp.optim());
  if (resuming) {
    if (auto s = load_checkpoint(ckpt, model, optimizer.get()); !s.ok()) return s;
    if (rank0) std::cerr << absl::StrFormat("resumed from %s at step %d\n", ckpt, state.step);
  }
  // Only rank 0 writes metrics (metrics.jsonl and event files, which keep the
  // same steps); the others append to /dev/null.
  std::unique_ptr<EventWriter> events;
  int64_t last_eval_step = -1;
  if (rank0) {
    const int64_t resume_step = resuming ? state.step : -1;
    auto truncated = truncate_metrics(metrics_path, resume_step);
    if (!truncated.ok()) return truncated.status();
    last_eval_step = *truncated;
    auto opened = open_run_events(out_dir, resume_step);
    if (!opened.ok()) return opened.status();
    events = *std::move(opened);
    if (auto s = events->add_text(state.step, "config", config_markdown(exp)); !s.ok()) return s;
  }
  Metrics metrics(rank0 ? metrics_path : "/dev/null", std::move(events));

  const int B = d.batch_size(), N = d.seq_len(), accum = exp.train().grad_accum();
  const int64_t max_steps = exp.train().max_steps();
  const int64_t tokens_per_step = static_cast<int64_t>(B) * N * accum * world_size;
  if (dp && rank0) {
    std::cerr << absl::StrFormat(
        "data parallel: %d ranks (%s), %s, %s; global batch %d ranks x %d sequences x %d "
        "micro-steps; "
        "all-reduce bus bandwidth %.2f GB/s (%.0f MB probe)\n",
        world_size, world.launched_by, dp->backend_name(),
        dp->zero1() ? "ZeRO-1 (sharded AdamW state)" : "all-reduce",
        world_size, B, accum, dp->measure_all_reduce_gb_per_s(exp.distributed().bucket_mb(), 5),
        exp.distributed().bucket_mb());
  } else if (dp) {
    dp->measure_all_reduce_gb_per_s(exp.distributed().bucket_mb(), 5);  // a collective: all ranks
  }
  int64_t trainable_count = 0;
  for (const Tensor& p : trainable_parameters(model)) trainable_count += p.numel();
  if (rank0)
    std::cerr << absl::StrFormat(
      "model: %s, %d parameters%s, %d layers, d_model %d, attention %s%s; device %s%s%s\n"
      "data: %s, %d train / %d val tokens; %d tokens per step; unigram baseline %.3f bits/byte\n",
      model::arch_name(model->arch()), model->num_parameters(),
      trainable_count == model->num_parameters()
          ? ""
          : absl::StrFormat(" (%d trained: LoRA rank %d)", trainable_count,
                            exp.model().lora().rank()).c_str(),
      exp.model().n_layer(),
      exp.model().d_model(), config::Attention::Kind_Name(exp.attention().kind()),
      exp.model().init_from().empty() ? ""
                                      : absl::StrCat("; from ", exp.model().init_from()).c_str(),
      device.str(), bf16 ? " (bf16)" : "",
      exp.train().activation_checkpointing() ? ", activation checkpointing" : "",
      d.dir(), meta.train_tokens, meta.val_tokens, tokens_per_step, meta.unigram_bits_per_byte);

  RunResult result;
  result.unigram_bits_per_byte = meta.unigram_bits_per_byte;
  const bool tty = rank0 && isatty(STDERR_FILENO);
  const auto run_start = Clock::now();
  auto window_start = run_start;
  int64_t window_tokens = 0, steps_this_run = 0, window_steps = 0;
  double last_loss = NAN;
  CommStats window_comm;  // summed over the steps of the logging window
  // Training time (state.train_seconds, metrics' train_s): this process's time
  // since run_start without evaluations and checkpoint writes, added to what
  // the checkpoint it resumed from had counted. The pauses also leave the
  // logging window, so tokens_per_s is the speed of training alone.
  const double train_seconds_at_start = state.train_seconds;
  double paused_s = 0;
  auto train_seconds_at = [&](Clock::time_point t) {
    return train_seconds_at_start + std::chrono::duration<double>(t - run_start).count() -
           paused_s;
  };
  auto paused = [&](auto&& work) -> absl::Status {
    const auto start = Clock::now();
    absl::Status s = work();
    const auto pause = Clock::now() - start;
    paused_s += std::chrono::duration<double>(pause).count();
    window_start += pause;
    return s;
  };

  // Every rank calls save() (a sharded optimizer gathers its state first).
  auto save = [&]() -> absl::Status {
    state.train_seconds = train_seconds_at(Clock::now());
    optimizer->gather_state();
    if (!rank0) return absl::OkStatus();
    return save_checkpoint(ckpt, exp, meta.tokenizer, model, optimizer.get(), state);
  };
  // Rank 0 only. Evaluation leaves the attention's random stream where it was,
  // so that training draws the same patterns on every rank (and with any
  // eval.interval).
  auto run_eval = [&](int64_t step) -> absl::Status {
    if (!rank0) return absl::OkStatus();
    const Tensor rng = model->attention_generator().get_state();
    // The windows one process evaluates with batch_size W B, in W times as
    // many batches of B (equal-sized batches: the same mean).
    EvalResult e =
        evaluate(model, *val_data, exp.eval().batches() * world_size, B, device, bf16);
    model->attention_generator().set_state(rng);
    result.val_loss = e.loss;
    result.val_bits_per_byte = e.bits_per_byte;
    std::cerr << (tty ? "\r\033[K" : "")
              << absl::StrFormat("step %d: val loss %.4f, %.4f bits/byte (unigram %.3f)\n", step,
                                 e.loss, e.bits_per_byte, meta.unigram_bits_per_byte);
    if (step <= last_eval_step) return absl::OkStatus();  // a finished run rerun
    last_eval_step = step;
    return metrics.write(
        {{"step", step}, {"val_loss", e.loss}, {"val_bits_per_byte", e.bits_per_byte}});
  };

  model->train();
  std::unique_ptr<GradientSync> sync =
      dp ? data_parallel_gradients(*dp) : local_gradients(trainable_parameters(model));
  StepOptions step_options;
  step_options.grad_accum = accum;
  step_options.grad_clip = exp.optim().grad_clip();
  step_options.bf16 = bf16;
  while (state.step < max_steps) {
    const double lr = learning_rate(exp, state.step);
    // The rows of a step are numbered micro-step-major over the ranks:
    // micro-step m of rank r reads rows [(m W + r) B, (m W + r + 1) B).
    // So W ranks read the rows one process reads with batch_size W B, or
    // with grad_accum W A, and a step's data does not depend on the split.
    StepResult step = train_step(model, *optimizer, *sync, step_options, lr, [&](int micro) {
      const int64_t first_row = (int64_t{micro} * world_size + world.rank) * B;
      return make_batch(B, N, device, [&](int64_t* x, int64_t* y) {
        train_data->sample(d.seed(), state.step, /*micro_step=*/0, first_row, B, x, y);
      });
    });
    // The step's one wait: for its loss and gradient norm (the update may
    // still be running). A non-finite loss stops the run before anything of
    // this step is saved.
    auto [loss_value, grad_norm] = step.values();
    CommStats comm = step.comm;
    if (dp) {
      // The loss of the global batch.
      std::vector<double> shared = {loss_value};
      dp->all_reduce_sum(shared, "all-reduce of the loss");
      loss_value = shared[0] / world_size;
      dp->complete(comm);
      window_comm.wait_ms += comm.wait_ms;
      window_comm.comm_ms += comm.comm_ms;
      window_comm.bytes += comm.bytes;
    }
    if (!std::isfinite(loss_value)) {
      return absl::InternalError(absl::StrFormat(
          "step %d: training loss is %f (previous step %f); stopping without writing a "
          "checkpoint, %s still holds the last good state. Lower optim.lr or raise "
          "schedule.warmup_steps.",
          state.step, loss_value, last_loss, ckpt));
    }
    last_loss = loss_value;
    ++state.step;
    ++steps_this_run;
    ++window_steps;
    state.tokens += tokens_per_step;
    window_tokens += tokens_per_step;
    if (hooks.on_step) hooks.on_step(state.step, loss_value);

    // Progress and metrics.
    const bool log_now = state.step % exp.logging().interval() == 0 || state.step == max_steps;
    if (log_now || tty) {
      const auto now = Clock::now();
      const double window_s = std::chrono::duration<double>(now - window_start).count();
      const double elapsed = std::chrono::duration<double>(now - run_start).count();
      const double tps = window_s > 0 ? window_tokens / window_s : 0;
      const double eta = elapsed / steps_this_run * (max_steps - state.step);
      std::string line = absl::StrFormat(
          "step %d/%d  loss %.4f  lr %.2e  |g| %.3f  %.0f tok/s  elapsed %s  eta %s", state.step,
          max_steps, loss_value, lr, grad_norm, tps, format_duration(elapsed),
          format_duration(eta));
      // Per step, over the window: time waiting for gradients after backward,
      // time the gradient collectives ran, and their bus bandwidth.
      const double n = std::max<int64_t>(1, window_steps);
      const double comm_bw = window_comm.comm_ms > 0 ? window_comm.bytes *
                                                           (dp && dp->zero1() ? 1.0 : 2.0) *
                                                           (world_size - 1) / world_size /
                                                           (window_comm.comm_ms * 1e6)
                                                     : 0;
      if (dp)
        line += absl::StrFormat("  comm %.1f ms (wait %.1f ms, %.1f GB/s)",
                                window_comm.comm_ms / n, window_comm.wait_ms / n, comm_bw);
      if (log_now) {
        nlohmann::json record = {{"step", state.step}, {"loss", loss_value}, {"lr", lr},
                                 {"grad_norm", grad_norm}, {"tokens_per_s", tps},
                                 {"tokens", state.tokens}, {"elapsed_s", elapsed},
                                 {"train_s", train_seconds_at(now)}};
        if (device.is_cuda()) record["peak_gpu_gib"] = peak_gpu_gib(device);
        if (std::vector<double> d = pattern_densities(model); !d.empty())
          record["pattern_density"] = d;
        if (dp) {
          record["world_size"] = world_size;
          record["comm_ms"] = window_comm.comm_ms / n;
          record["comm_wait_ms"] = window_comm.wait_ms / n;
          record["comm_bus_gb_per_s"] = comm_bw;
        }
        if (auto s = metrics.write(record); !s.ok()) return s;
        result.tokens_per_second = tps;
        window_start = now;
        window_tokens = 0;
        window_steps = 0;
        window_comm = CommStats();
      }
      if (tty) std::cerr << "\r\033[K" << line << std::flush;
      else if (log_now && rank0) std::cerr << line << "\n";
    }

    const bool last = state.step == max_steps;
    if (exp.eval().interval() > 0 && state.step % exp.eval().interval() == 0 && !last)
      if (auto s = paused([&] { return run_eval(state.step); }); !s.ok()) return s;
    // Whether any rank got a signal: all ranks stop after the same step.
    int stop_signal = pending_signal();
    if (dp) {
      std::vector<double> shared = {static_cast<double>(stop_signal), stop_signal ? 1.0 : 0.0};
      dp->all_reduce_sum(shared, "all-reduce of the stop flag");
      if (shared[1] > 0) stop_signal = static_cast<int>(std::lround(shared[0] / shared[1]));
    }
    if (const int signo = stop_signal) {
      if (auto s = save(); !s.ok()) return s;
      if (dp) dp->barrier("barrier after the checkpoint");
      if (rank0)
        std::cerr << (tty ? "\n" : "")
                  << absl::StrFormat("%s: checkpoint written at step %d to %s; rerun the same "
                                     "command to resume\n",
                                     strsignal(signo), state.step, ckpt);
      result.steps = state.step;
      result.interrupted_by = signo;
      g_signal.store(0);
      return result;
    }
    if (exp.checkpoint().interval() > 0 && state.step % exp.checkpoint().interval() == 0 && !last)
      if (auto s = paused(save); !s.ok()) return s;
  }
  if (tty) std::cerr << "\n";

  if (steps_this_run > 0)
    if (auto s = save(); !s.ok()) return s;
  if (auto s = run_eval(state.step); !s.ok()) return s;
  if (rank0 && exp.eval().sample_tokens() > 0) {
    result.sample = sample_text(model, **tokenizer, exp.eval().sample_prompt(),
                                exp.eval().sample_tokens(), /*temperature=*/0.8, /*top_k=*/40,
                                exp.train().seed());
  }
  // The others wait for rank 0's evaluation, so that all leave the group together.
  if (dp) dp->barrier("barrier at the end of the run");
  result.steps = state.step;
  return result;
}

absl::StatusOr<RunResult> train(config::Experiment exp, const TrainHooks& hooks,
                                const World& world) {
  if (!world.distributed()) return train_ranks(std::move(exp), hooks, world);
  // A failed collective throws from inside the step (possibly from an
  // autograd hook): one error message naming the rank and the operation.
  try {
    return train_ranks(std::move(exp), hooks, world);
  } catch (const CollectiveError& e) {
    return absl::UnavailableError(e.what());
  }
}

// ---------------------------------------------------------------------------
// checkpoints for eval and sample

std::string sample_text(model::CausalLM model, const tokenizer::Tokenizer& tokenizer,
                        const std::string& prompt, int tokens, double temperature, int top_k,
                        uint64_t seed) {
  auto ids32 = tokenizer.encode(prompt, /*add_bos=*/false);
  std::vector<int64_t> ids(ids32.begin(), ids32.end());
  model::SamplingOptions sampling;
  sampling.temperature = temperature;
  sampling.top_k = top_k;
  sampling.seed = seed;
  // Keep the prompt's last tokens if it does not leave room to continue.
  const int64_t room = model->context_length() - 1;
  if (static_cast<int64_t>(ids.size()) > room) ids.erase(ids.begin(), ids.end() - room);
  if (!ids.empty()) {
    auto out = model::generate(model, ids, tokens, sampling);
    ids.insert(ids.end(), out.ids.begin(), out.ids.end());
  }
  // The model's vocabulary may be larger than the tokenizer's: such ids are dropped.
  std::vector<int32_t> out32;
  for (const int64_t id : ids)
    if (id >= 0 && id < tokenizer.vocab_size()) out32.push_back(static_cast<int32_t>(id));
  return tokenizer.decode(out32);
}

absl::StatusOr<RestoredRun> restore_run(const std::string& checkpoint_file_or_dir,
                                        const std::string& device_name) {
  const std::string path = checkpoint_path(checkpoint_file_or_dir);
  auto info = read_checkpoint_info(path);
  if (!info.ok()) return info.status();
  auto device = resolve_device(device_name);
  if (!device.ok()) return device.status();
  RestoredRun loaded;
  loaded.config = info->config;
  loaded.tokenizer = info->tokenizer;
  loaded.step = info->state.step;
  loaded.device = *device;
  auto built = model::build_model(info->config, info->config.model().vocab_size());
  if (!built.ok()) return built.status();
  loaded.model = *std::move(built);
  if (auto s = load_checkpoint(path, loaded.model, nullptr); !s.ok()) return s;
  loaded.model->to(*device);
  loaded.model->eval();
  return loaded;
}

}  // namespace sparseflash::trainer
