// Data parallelism: rendezvous, process group, gradient buckets with hooks,
// ZeRO-1 AdamW. Reading order: connecting, collectives (numbering, waiting,
// naming the ranks behind), buckets and hooks, the end of a step (wait,
// average, clip), small collectives, ShardedAdamW.
#include "trainer/distributed.h"

#include "trainer/step.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <future>
#include <iostream>
#include <optional>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/nn/utils/clip_grad.h>
#include <torch/serialize/archive.h>
#ifdef SF_HAVE_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#endif
#ifdef SF_HAVE_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace sparseflash::trainer {

using Clock = std::chrono::steady_clock;

namespace {

std::string first_line(const std::string& s) { return s.substr(0, s.find('\n')); }

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

// The store key under which a rank records the last collective it started.
std::string progress_key(int rank) { return absl::StrCat("sparseflash/collective/", rank); }

}  // namespace

// ---------------------------------------------------------------------------
// connecting

DataParallel::DataParallel(const World& world, const config::Distributed& options,
                           c10::Device device)
    : world_(world), options_(options), device_(device) {}

DataParallel::~DataParallel() {
  // Hooks hold a raw pointer to this object; remove them with it.
  for (auto& p : params_) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  // NCCL wants its communicators shut down before the process group goes.
  if (group_) {
    try {
      group_->shutdown();
    } catch (const std::exception&) {
    }
  }
}

absl::StatusOr<std::unique_ptr<DataParallel>> DataParallel::connect(
    const World& world, const config::Distributed& options, c10::Device device) {
  std::unique_ptr<DataParallel> dp(new DataParallel(world, options, device));
  const auto timeout = std::chrono::milliseconds(int64_t{options.timeout_s()} * 1000);
  if (!world.test_hang.empty()) {
    const std::string& text = world.test_hang;
    const size_t colon = text.find(':');
    if (colon == std::string::npos || !absl::SimpleAtoi(text.substr(0, colon), &dp->hang_rank_) ||
        !absl::SimpleAtoi(text.substr(colon + 1), &dp->hang_step_) || dp->hang_step_ < 1)
      return absl::InvalidArgumentError(absl::StrCat(
          "SPARSEFLASH_TEST_HANG=\"", text, "\": expected RANK:STEP (a test hook, e.g. 1:3)"));
  }
  const std::string where = absl::StrCat(world.master_addr, ":", world.master_port);

  config::Distributed::Backend backend = options.backend();
  if (backend == config::Distributed::AUTO)
    backend = device.is_cuda() ? config::Distributed::NCCL : config::Distributed::GLOO;
  if (backend == config::Distributed::NCCL && !device.is_cuda())
    return absl::InvalidArgumentError(absl::StrCat(
        "distributed.backend is NCCL but train.device resolves to ", device.str(),
        " (NCCL needs CUDA devices; use GLOO or AUTO)"));

  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = static_cast<uint16_t>(world.master_port);
    store_options.isServer = world.rank == 0;
    store_options.numWorkers = world.world_size;
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    dp->store_ = c10::make_intrusive<c10d::TCPStore>(world.master_addr, store_options);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrFormat(
        "rank %d of %d (%s): rendezvous at %s failed within distributed.timeout_s = %d s: %s",
        world.rank, world.world_size, world.launched_by, where, options.timeout_s(),
        first_line(e.what())));
  }

  try {
    if (backend == config::Distributed::NCCL) {
#ifdef SF_HAVE_NCCL
      // CUDA events around each collective, so Work::getDuration() works.
      setenv("TORCH_NCCL_ENABLE_TIMING", "1", /*overwrite=*/0);
      auto nccl_options = c10d::ProcessGroupNCCL::Options::create();
      nccl_options->timeout = timeout;
      dp->group_ = c10::make_intrusive<c10d::ProcessGroupNCCL>(dp->store_, world.rank,
                                                               world.world_size, nccl_options);
      dp->backend_name_ = "nccl";
#else
      return absl::UnimplementedError(
          "distributed.backend NCCL: this build has no NCCL (nccl.h was not found at configure "
          "time)");
#endif
    } else {
#ifdef SF_HAVE_GLOO
      auto gloo_options = c10d::ProcessGroupGloo::Options::create(timeout);
      gloo_options->devices.push_back(
          c10d::ProcessGroupGloo::createDeviceForHostname(world.master_addr == "localhost"
                                                              ? "127.0.0.1"
                                                              : world.master_addr));
      dp->group_ = c10::make_intrusive<c10d::ProcessGroupGloo>(dp->store_, world.rank,
                                                               world.world_size, gloo_options);
      dp->backend_name_ = "gloo";
#else
      return absl::UnimplementedError(
          "distributed.backend GLOO: this build has no Gloo headers (install libgloo-dev and "
          "reconfigure)");
#endif
    }
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrFormat("rank %d: creating the %s process group: %s",
                                                  world.rank,
                                                  config::Distributed::Backend_Name(backend),
                                                  first_line(e.what())));
  }
  return dp;
}

// ---------------------------------------------------------------------------
// collectives: numbering, waiting, naming the ranks behind

int64_t DataParallel::started(const char* what) {
  ++collectives_;
  // A diagnostic only: a store that fails here fails the collective too.
  try {
    const std::string record = absl::StrCat(collectives_, " ", what);
    store_->set(progress_key(world_.rank), std::vector<uint8_t>(record.begin(), record.end()));
  } catch (const std::exception&) {
  }
  return collectives_;
}

void DataParallel::run(const char* what,
                       const std::function<c10::intrusive_ptr<c10d::Work>()>& collective) {
  const auto start = Clock::now();
  const int64_t number = started(what);
  wait(collective(), what, number, start);
}

std::string DataParallel::ranks_behind(int64_t collective) const {
  // On its own thread with a deadline: the store lives in rank 0, which may
  // be the rank that stopped.
  auto answer = std::make_shared<std::promise<std::string>>();
  std::future<std::string> future = answer->get_future();
  std::thread([store = store_, me = world_.rank, size = world_.world_size, collective, answer] {
    std::vector<std::string> behind, ahead;
    try {
      for (int r = 0; r < size; ++r) {
        if (r == me) continue;
        if (!store->check({progress_key(r)})) {
          behind.push_back(absl::StrCat("rank ", r, " has started none"));
          continue;
        }
        const std::vector<uint8_t> bytes = store->get(progress_key(r));
        const std::string record(bytes.begin(), bytes.end());
        const size_t space = record.find(' ');
        int64_t number = 0;
        if (space == std::string::npos || !absl::SimpleAtoi(record.substr(0, space), &number))
          continue;
        const std::string last = absl::StrCat("#", number, ", ", record.substr(space + 1));
        if (number < collective)
          behind.push_back(
              absl::StrCat("rank ", r, " has not started it (its last collective: ", last, ")"));
        else if (number > collective)
          ahead.push_back(absl::StrCat("rank ", r, " is past it (at ", last, ")"));
      }
    } catch (const std::exception&) {
      answer->set_value("");
      return;
    }
    std::string text = absl::StrJoin(behind, "; ");
    if (!ahead.empty())
      text = absl::StrCat(text, text.empty() ? "" : "; ", absl::StrJoin(ahead, "; "),
                          ": the ranks disagree on the order of collectives");
    answer->set_value(text);
  }).detach();
  if (future.wait_for(std::chrono::seconds(2)) != std::future_status::ready) return "";
  return future.get();
}

void DataParallel::wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what,
                        int64_t collective, Clock::time_point start) {
  try {
    work->wait();
  } catch (const std::exception& e) {
    const std::string error = first_line(e.what());
    const double waited = std::chrono::duration<double>(Clock::now() - start).count();
    const std::string lower = absl::AsciiStrToLower(error);
    const bool timed_out = waited >= 0.9 * options_.timeout_s() ||
                           absl::StrContains(lower, "timed out") ||
                           absl::StrContains(lower, "timeout");
    std::string message = absl::StrFormat("rank %d of %d: %s (collective #%d, %s) ", world_.rank,
                                          world_.world_size, what, collective, backend_name_);
    if (timed_out)
      absl::StrAppendFormat(&message, "timed out after distributed.timeout_s = %d s",
                            options_.timeout_s());
    else
      absl::StrAppendFormat(&message, "failed after %.1f s: %s", waited, error);
    const std::string behind = ranks_behind(collective);
    if (!behind.empty())
      absl::StrAppend(&message, ": ", behind);
    else if (timed_out)
      absl::StrAppend(&message, ". Another rank has probably stopped, or the network failed");
    else
      absl::StrAppendFormat(&message,
                            ". Another rank has probably died or stopped; a collective waits at "
                            "most distributed.timeout_s = %d s",
                            options_.timeout_s());
    if (timed_out) absl::StrAppend(&message, ". ", backend_name_, ": ", error);
    throw CollectiveError(message);
  }
}

// ---------------------------------------------------------------------------
// buckets and hooks

namespace {

// Calls DataParallel::on_gradient_ready after autograd has accumulated a
// parameter's gradient.
class ReadyHook : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(std::function<void()> ready) : ready_(std::move(ready)) {}
  void operator()(const torch::autograd::Variable&) override { ready_(); }

 private:
  std::function<void()> ready_;
};

}  // namespace

void DataParallel::attach(const std::vector<std::pair<std::string, at::Tensor>>& named_params) {
  at::NoGradGuard no_grad;
  const int W = world_.world_size;
  for (const auto& [name, p] : named_params) {
    TORCH_CHECK(p.device() == device_ && p.scalar_type() == at::kFloat,
                "data parallel expects float32 parameters on ", device_.str(), "; ", name,
                " is ", p.scalar_type(), " on ", p.device().str());
    names_.push_back(name);
    params_.push_back(p);
  }

  // Rank 0's initial values everywhere (one flat buffer, one broadcast).
  {
    std::vector<at::Tensor> flat_list;
    for (auto& p : params_) flat_list.push_back(p.reshape({-1}));
    std::vector<at::Tensor> flat = {at::cat(flat_list)};
    c10d::BroadcastOptions o;
    o.rootRank = 0;
    run("broadcast of the initial parameters", [&] { return group_->broadcast(flat, o); });
    int64_t offset = 0;
    for (auto& p : params_) {
      p.copy_(flat[0].narrow(0, offset, p.numel()).view(p.sizes()));
      offset += p.numel();
    }
  }

  // Buckets follow the reverse parameter order (roughly the order in which
  // backward produces gradients), one weight-decay group each so that a
  // ZeRO-1 shard steps with one decay value.
  const int64_t cap =
      std::max<int64_t>(1, static_cast<int64_t>(options_.bucket_mb() * 1024 * 1024 / 4));
  bucket_of_.assign(params_.size(), -1);
  for (bool decay : {true, false}) {
    Bucket* open = nullptr;
    for (int i = static_cast<int>(params_.size()) - 1; i >= 0; --i) {
      if ((params_[i].dim() >= 2) != decay) continue;
      if (!open || open->numel >= cap) {
        buckets_.emplace_back();
        open = &buckets_.back();
        open->decay = decay;
      }
      open->params.push_back(i);
      open->offsets.push_back(open->numel);
      open->numel += params_[i].numel();
      bucket_of_[i] = static_cast<int>(buckets_.size()) - 1;
    }
  }
  // (re-taken after the emplace_backs above, which may move the buckets)
  const auto options = params_[0].options();
  for (auto& b : buckets_) {
    b.numel = (b.numel + W - 1) / W * W;
    b.grad = at::zeros({b.numel}, options);
    if (zero1()) {
      b.grad_shard = at::zeros({b.numel / W}, options);
      b.param = at::zeros({b.numel}, options);
    }
    for (size_t k = 0; k < b.params.size(); ++k) {
      at::Tensor& p = params_[b.params[k]];
      p.mutable_grad() = b.grad.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
      if (zero1()) {
        at::Tensor view = b.param.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
        view.copy_(p);
        p.set_data(view);  // the parameter now lives in the flat buffer
      }
    }
  }
  for (size_t i = 0; i < params_.size(); ++i) {
    const int index = static_cast<int>(i);
    torch::autograd::impl::set_post_acc_grad_hooks(
        params_[i], std::make_unique<ReadyHook>([this, index] { on_gradient_ready(index); }));
  }
}

void DataParallel::begin_backward(bool last) {
  communicate_ = last;
  if (!last) return;
  ++steps_;
  next_launch_ = 0;
  for (auto& b : buckets_) {
    b.pending = static_cast<int>(b.params.size());
    b.work.reset();
  }
}

void DataParallel::on_gradient_ready(int param_index) {
  if (!communicate_) return;
  Bucket& b = buckets_[bucket_of_[param_index]];
  --b.pending;
  // Launch in bucket order only, the same on every rank.
  while (next_launch_ < buckets_.size() && buckets_[next_launch_].pending == 0)
    launch(buckets_[next_launch_++]);
}

void DataParallel::launch(Bucket& b) {
  if (world_.rank == hang_rank_ && steps_ == hang_step_ && &b == &buckets_.front()) {
    std::cerr << absl::StrFormat(
                     "rank %d: SPARSEFLASH_TEST_HANG: hanging before the gradient collective "
                     "of this process's step %d (a test hook)\n",
                     world_.rank, steps_)
              << std::flush;
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  }
  b.launched = Clock::now();
  b.collective = started(zero1() ? "gradient reduce-scatter" : "gradient all-reduce");
  if (zero1()) b.work = group_->_reduce_scatter_base(b.grad_shard, b.grad);
  else {
    std::vector<at::Tensor> tensors = {b.grad};
    b.work = group_->allreduce(tensors);
  }
  // Gloo runs collectives on its own threads: the future's completion is the
  // end of the transfer where Gloo offers a future (all-reduce does,
  // reduce-scatter does not: then the time wait() returns is used). NCCL
  // reports durations from CUDA events instead.
  if (!device_.is_cuda()) {
    b.done_ns = std::make_shared<std::atomic<int64_t>>(0);
    try {
      auto done = b.done_ns;
      b.work->getFuture()->addCallback([done](c10::ivalue::Future&) {
        done->store(Clock::now().time_since_epoch().count());
      });
    } catch (const std::exception&) {
    }
  }
}

// ---------------------------------------------------------------------------
// the end of a step

CommStats DataParallel::finish_gradients() {
  CommStats stats;
  const auto start = Clock::now();
  // On a GPU the waits below only order streams; CUDA events time them.
  std::optional<c10::Stream> stream;
  if (device_.is_cuda()) {
    stream = c10::impl::getDeviceGuardImpl(c10::kCUDA)->getStream(device_);
    wait_start_ = std::make_unique<c10::Event>(c10::kCUDA, c10::EventFlag::BACKEND_DEFAULT);
    wait_end_ = std::make_unique<c10::Event>(c10::kCUDA, c10::EventFlag::BACKEND_DEFAULT);
    wait_start_->record(*stream);
  }
  // Buckets whose parameters got no gradient this step (none in our models) still
  // have to take part, in order.
  while (next_launch_ < buckets_.size()) launch(buckets_[next_launch_++]);
  const double inv = 1.0 / world_.world_size;
  for (auto& b : buckets_) {
    wait(b.work, zero1() ? "gradient reduce-scatter" : "gradient all-reduce", b.collective,
         b.launched);
    if (b.done_ns && b.done_ns->load() == 0)
      b.done_ns->store(Clock::now().time_since_epoch().count());
    (zero1() ? b.grad_shard : b.grad).mul_(inv);
    stats.bytes += b.numel * 4;
  }
  if (stream) {
    wait_end_->record(*stream);
  } else {
    stats.wait_ms = ms_between(start, Clock::now());
    for (auto& b : buckets_) {
      const Clock::time_point done{Clock::duration(b.done_ns->load())};
      stats.comm_ms += std::max(0.0, ms_between(b.launched, done));
    }
  }
  communicate_ = false;
  return stats;
}

void DataParallel::complete(CommStats& stats) {
  if (device_.is_cuda() && wait_end_) {
    try {
      stats.wait_ms = wait_start_->elapsedTime(*wait_end_);
      stats.comm_ms = 0;
      for (auto& b : buckets_) stats.comm_ms += b.work->getDuration();
    } catch (const std::exception&) {
      stats.comm_ms = 0;  // timing not available in this process group
    }
  }
  // An all-reduce moves 2 (W-1)/W of the data over each rank's link, a
  // reduce-scatter (W-1)/W (the NCCL-tests "bus bandwidth").
  const double W = world_.world_size;
  const double factor = (zero1() ? 1.0 : 2.0) * (W - 1) / W;
  if (stats.comm_ms > 0) stats.bus_gb_per_s = stats.bytes * factor / (stats.comm_ms * 1e6);
}

void DataParallel::zero_grad() {
  for (auto& b : buckets_) b.grad.zero_();
}

at::Tensor DataParallel::param_shard(Bucket& b) {
  return b.param.narrow(0, world_.rank * shard_numel(b), shard_numel(b));
}

double DataParallel::clip_grad_norm(double max_norm) {
  at::NoGradGuard no_grad;
  if (!zero1()) {
    // Gradients are identical on every rank after the all-reduce; the same
    // multi-tensor clipping as one process (trainer/step.h), so that one and
    // several ranks differ only by the all-reduce's summation order.
    return trainer::clip_grad_norm(params_, max_norm > 0 ? max_norm : 1e300).item<double>();
  }
  at::Tensor sum_sq = at::zeros({}, params_[0].options());
  for (auto& b : buckets_) sum_sq += b.grad_shard.square().sum();
  std::vector<at::Tensor> t = {sum_sq.reshape({1})};
  run("all-reduce of the gradient norm", [&] { return group_->allreduce(t); });
  const double norm = std::sqrt(t[0].item<double>());
  if (max_norm > 0) {
    // clip_grad_norm_'s formula, so that one and several ranks agree.
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1)
      for (auto& b : buckets_) b.grad_shard.mul_(coef);
  }
  return norm;
}

// ---------------------------------------------------------------------------
// small collectives

void DataParallel::all_reduce_sum(std::vector<double>& values, const char* what) {
  at::Tensor t = at::tensor(values, at::kDouble).to(device_);
  std::vector<at::Tensor> tensors = {t};
  run(what, [&] { return group_->allreduce(tensors); });
  t = t.cpu();
  for (size_t i = 0; i < values.size(); ++i) values[i] = t[i].item<double>();
}

void DataParallel::barrier(const char* what) {
  // A one-element all-reduce rather than Backend::barrier, whose NCCL
  // version needs the device bound beforehand.
  std::vector<double> one = {1};
  all_reduce_sum(one, what);
}

double DataParallel::measure_all_reduce_gb_per_s(double megabytes, int iterations) {
  const int64_t numel = std::max<int64_t>(1, static_cast<int64_t>(megabytes * 1024 * 1024 / 4));
  std::vector<at::Tensor> t = {at::ones({numel}, at::TensorOptions().device(device_))};
  run("bandwidth probe", [&] { return group_->allreduce(t); });  // warm-up: connections, buffers
  t[0].sum().item<float>();                      // (on a GPU: the stream is idle)
  const auto start = Clock::now();
  for (int i = 0; i < iterations; ++i)
    run("bandwidth probe", [&] { return group_->allreduce(t); });
  t[0].sum().item<float>();
  const double seconds = ms_between(start, Clock::now()) / 1000 / iterations;
  const double W = world_.world_size;
  return numel * 4.0 * 2 * (W - 1) / W / seconds / 1e9;
}

// ---------------------------------------------------------------------------
// ZeRO-1 AdamW

// AdamW on this rank's slice of every bucket, with PyTorch's fused kernel
// (the same one AdamW uses, so one and several ranks agree to rounding).
class ShardedAdamW : public Optimizer {
 public:
  ShardedAdamW(DataParallel& dp, const config::Optimizer& options) : dp_(dp), options_(options) {
    for (auto& b : dp_.buckets_) {
      const auto o = b.param.options();
      exp_avg_.push_back(at::zeros({dp_.shard_numel(b)}, o));
      exp_avg_sq_.push_back(at::zeros({dp_.shard_numel(b)}, o));
      steps_.push_back(at::zeros({}, o));
    }
  }

  void step(double lr) override {
    at::NoGradGuard no_grad;
    for (bool decay : {true, false}) {
      std::vector<at::Tensor> params, grads, m, v, steps;
      for (size_t i = 0; i < dp_.buckets_.size(); ++i) {
        auto& b = dp_.buckets_[i];
        if (b.decay != decay) continue;
        params.push_back(dp_.param_shard(b));
        grads.push_back(b.grad_shard);
        m.push_back(exp_avg_[i]);
        v.push_back(exp_avg_sq_[i]);
        steps.push_back(steps_[i]);
      }
      if (params.empty()) continue;
      at::_foreach_add_(steps, 1);
      at::_fused_adamw_(params, grads, m, v, /*max_exp_avg_sqs=*/{}, steps, lr,
                        options_.beta1(), options_.beta2(),
                        decay ? options_.weight_decay() : 0.0, options_.eps(),
                        /*amsgrad=*/false, /*maximize=*/false);
    }
    // Every rank's updated slice into every rank's parameters.
    for (auto& b : dp_.buckets_) {
      at::Tensor mine = dp_.param_shard(b).clone();
      dp_.run("all-gather of the parameters",
              [&] { return dp_.group_->_allgather_base(b.param, mine); });
    }
  }

  void zero_grad() override { dp_.zero_grad(); }

  void gather_state() override {
    full_.clear();
    for (size_t i = 0; i < dp_.buckets_.size(); ++i) {
      auto& b = dp_.buckets_[i];
      for (at::Tensor* shard : {&exp_avg_[i], &exp_avg_sq_[i]}) {
        at::Tensor whole = at::empty({b.numel}, shard->options());
        dp_.run("all-gather of the optimizer state",
                [&] { return dp_.group_->_allgather_base(whole, *shard); });
        full_.push_back(whole.cpu());
      }
    }
  }

  void save(torch::serialize::OutputArchive& archive) const override {
    TORCH_CHECK(full_.size() == 2 * dp_.buckets_.size(),
                "ShardedAdamW::save without gather_state() first");
    for (size_t i = 0; i < dp_.buckets_.size(); ++i) {
      const auto& b = dp_.buckets_[i];
      for (size_t k = 0; k < b.params.size(); ++k) {
        const at::Tensor& p = dp_.params_[b.params[k]];
        const std::string prefix = "optim/" + dp_.names_[b.params[k]];
        auto slice = [&](const at::Tensor& flat) {
          return flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes()).clone();
        };
        archive.write(prefix + "/exp_avg", slice(full_[2 * i]), /*is_buffer=*/true);
        archive.write(prefix + "/exp_avg_sq", slice(full_[2 * i + 1]), true);
        archive.write(prefix + "/step", steps_[i].cpu(), true);
      }
    }
  }

  absl::Status load(torch::serialize::InputArchive& archive) override {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < dp_.buckets_.size(); ++i) {
      auto& b = dp_.buckets_[i];
      const int64_t first = dp_.rank() * dp_.shard_numel(b), last = first + dp_.shard_numel(b);
      for (size_t k = 0; k < b.params.size(); ++k) {
        const at::Tensor& p = dp_.params_[b.params[k]];
        const std::string prefix = "optim/" + dp_.names_[b.params[k]];
        // The part of this parameter that falls into this rank's slice.
        const int64_t lo = std::max(first, b.offsets[k]);
        const int64_t hi = std::min(last, b.offsets[k] + p.numel());
        for (auto [name, shard] : {std::pair{"/exp_avg", &exp_avg_[i]},
                                   std::pair{"/exp_avg_sq", &exp_avg_sq_[i]}}) {
          at::Tensor whole = at::empty(p.sizes(), at::kFloat);
          if (auto s = read_into(archive, prefix + name, whole); !s.ok()) return s;
          if (lo < hi)
            shard->narrow(0, lo - first, hi - lo)
                .copy_(whole.reshape({-1}).narrow(0, lo - b.offsets[k], hi - lo));
        }
        at::Tensor step = at::zeros({}, at::kFloat);
        if (auto s = read_into(archive, prefix + "/step", step); !s.ok()) return s;
        steps_[i].copy_(step);
      }
    }
    return absl::OkStatus();
  }

 private:
  DataParallel& dp_;
  config::Optimizer options_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_, steps_;  // one per bucket
  std::vector<at::Tensor> full_;  // gathered state for save(): exp_avg, exp_avg_sq per bucket
};

std::unique_ptr<Optimizer> DataParallel::make_sharded_adamw(const config::Optimizer& options) {
  TORCH_CHECK(zero1() && !buckets_.empty(), "make_sharded_adamw needs zero1 and attach() first");
  return std::make_unique<ShardedAdamW>(*this, options);
}

}  // namespace sparseflash::trainer
