// Data parallelism over c10d process groups (NCCL on GPUs, Gloo on CPU).
//
// Every rank holds the whole model. Parameters are broadcast from rank 0 at
// the start. Gradients accumulate into flat bucket buffers (each parameter's
// .grad is a view into one); a post-accumulate-grad hook counts the gradients
// of a bucket and, on the last micro-step of an optimizer step, launches the
// bucket's collective as soon as the bucket is complete, so communication
// overlaps the rest of the backward pass. Buckets are launched in a fixed
// order on every rank (NCCL requires the same order everywhere).
//
// Plain mode all-reduces the buckets; every rank then clips and steps AdamW
// identically. ZeRO-1 mode reduce-scatters them instead: rank r owns slice r
// of every bucket, keeps AdamW state for that slice only (ShardedAdamW), steps
// it, and the parameters (views into flat bucket buffers too) are
// all-gathered.
//
// Every collective is numbered, and each rank records the number and name of
// the last one it started in the TCPStore (one small message, no reply).
// When a collective fails or times out (distributed.timeout_s), the error
// names this rank, the operation, and the ranks that never started it, with
// the last collective each of them did start: the ones hung or gone.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include "absl/status/statusor.h"
#include "configs/experiment.pb.h"
#include "trainer/optimizer.h"


namespace sparseflash::trainer {

// Where this process stands among the workers of one job (filled from the
// environment by launch/launcher.h: `sparseflash launch`, SLURM or mpirun).
struct World {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;  // index on this node: the CUDA device it uses
  int local_world_size = 1;
  std::string master_addr = "127.0.0.1";  // where rank 0 hosts the c10d::TCPStore
  int master_port = 29500;
  std::string launched_by = "single process";  // for messages
  // Test hook SPARSEFLASH_TEST_HANG ("RANK:STEP", read from the environment with
  // the rest; empty: off): that rank hangs before the gradient collective of
  // that step (tests/failure_test.cc).
  std::string test_hang;
  bool distributed() const { return world_size > 1; }
};

// A collective failed or timed out. Thrown from inside the step (collectives
// run under autograd hooks); train() turns it into an error status. The
// message reads "rank R of W: <operation> (collective #N, gloo) timed out
// after distributed.timeout_s = T s: rank S has not started it (its last
// collective: #M, <operation>)".
class CollectiveError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Communication figures of one optimizer step.
struct CommStats {
  double wait_ms = 0;   // time the step waited for gradient collectives after backward
  double comm_ms = 0;   // summed duration of the gradient collectives (0 = unknown)
  int64_t bytes = 0;    // gradient bytes reduced
  double bus_gb_per_s = 0;  // bus bandwidth over comm_ms (NCCL-tests convention)
};

class DataParallel {
 public:
  // Rendezvous at world.master_addr:master_port (rank 0 hosts the TCPStore)
  // and creates the process group. Errors name the address, the rank and
  // the timeout.
  //
  // Test hook: SPARSEFLASH_TEST_HANG=R:N (World::test_hang) makes rank R hang
  // for good where it would start the first gradient collective of the N-th
  // optimizer step this process runs, so that the others time out in it
  // (tests/failure_test.cc). Not for use outside tests.
  static absl::StatusOr<std::unique_ptr<DataParallel>> connect(const World& world,
                                                              const config::Distributed& options,
                                                              c10::Device device);
  ~DataParallel();

  const World& world() const { return world_; }
  int rank() const { return world_.rank; }
  int size() const { return world_.world_size; }
  const std::string& backend_name() const { return backend_name_; }
  bool zero1() const { return options_.zero1(); }

  // Copies rank 0's values into `params` on every rank, then builds the
  // buckets and installs the gradient hooks. Call once, after the model is on
  // its device and before the first backward.
  void attach(const std::vector<std::pair<std::string, at::Tensor>>& named_params);

  // Before each micro-step's backward: `last` is true on the last micro-step
  // of an optimizer step (the only one that communicates).
  void begin_backward(bool last);
  // After the last micro-step's backward: launches what is left, waits for
  // every bucket and averages. Returns the step's byte count (and on CPU its
  // times); complete() fills in the GPU times once the step has synchronised
  // with the device (after the loss is read).
  CommStats finish_gradients();
  void complete(CommStats& stats);
  // Zeroes the gradient buckets (the .grad views stay in place).
  void zero_grad();

  // Global gradient L2 norm, with clipping to max_norm (0 = no clipping) as
  // torch::nn::utils::clip_grad_norm_ does. In ZeRO-1 mode it works on the
  // gradient shards and all-reduces the squared norm.
  double clip_grad_norm(double max_norm);

  // Sums `values` over ranks (in place, float64 on the CPU side).
  void all_reduce_sum(std::vector<double>& values, const char* what);
  void barrier(const char* what);

  // Measures all-reduce bus bandwidth on a buffer of `megabytes` (for the log).
  double measure_all_reduce_gb_per_s(double megabytes, int iterations);

  // ZeRO-1 optimizer over this object's buckets.
  std::unique_ptr<Optimizer> make_sharded_adamw(const config::Optimizer& options);

 private:
  friend class ShardedAdamW;
  struct Bucket {
    std::vector<int> params;            // indices into params_
    std::vector<int64_t> offsets;       // element offset of each in the flat buffers
    int64_t numel = 0;                  // padded to a multiple of the world size
    bool decay = true;                  // AdamW weight decay group
    at::Tensor grad;                    // flat gradient buffer
    at::Tensor grad_shard;              // ZeRO-1: this rank's reduced slice
    at::Tensor param;                   // ZeRO-1: flat parameter buffer
    int pending = 0;                    // gradients still to arrive this step
    c10::intrusive_ptr<c10d::Work> work;
    int64_t collective = 0;             // number of this step's collective (see started())
    std::chrono::steady_clock::time_point launched;
    std::shared_ptr<std::atomic<int64_t>> done_ns;  // Gloo: completion time (steady clock)
  };
  DataParallel(const World& world, const config::Distributed& options, c10::Device device);
  void on_gradient_ready(int param_index);
  void launch(Bucket& bucket);
  // Numbers a collective about to start and records it in the store.
  int64_t started(const char* what);
  // Waits for collective number `collective`, started at `start`; a failure
  // or timeout throws CollectiveError naming it and the ranks behind.
  void wait(const c10::intrusive_ptr<c10d::Work>& work, const char* what, int64_t collective,
            std::chrono::steady_clock::time_point start);
  // started() + the collective + wait().
  void run(const char* what, const std::function<c10::intrusive_ptr<c10d::Work>()>& collective);
  // "rank 1 has not started it (its last collective: #56, ...)", from the
  // store; empty when every rank started it, or the store does not answer
  // within 2 s.
  std::string ranks_behind(int64_t collective) const;
  int64_t shard_numel(const Bucket& b) const { return b.numel / world_.world_size; }
  at::Tensor param_shard(Bucket& b);

  World world_;
  config::Distributed options_;
  c10::Device device_;
  std::string backend_name_;
  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> group_;
  std::vector<std::string> names_;
  std::vector<at::Tensor> params_;
  std::vector<int> bucket_of_;  // param index -> bucket index
  std::vector<Bucket> buckets_;
  std::unique_ptr<c10::Event> wait_start_, wait_end_;  // GPU: the step's wait for gradients
  size_t next_launch_ = 0;
  bool communicate_ = false;
  int64_t collectives_ = 0;  // collectives started by this rank
  int64_t steps_ = 0;        // optimizer steps started by this process
  int hang_rank_ = -1;       // SPARSEFLASH_TEST_HANG
  int64_t hang_step_ = 0;
};

}  // namespace sparseflash::trainer
