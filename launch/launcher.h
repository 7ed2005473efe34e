// Multi-process jobs without torchrun: `sparseflash launch` starts one worker
// per GPU (fork + exec of this binary), watches them, stops the group when one
// fails, forwards SIGINT/SIGTERM and restarts from the last checkpoint.
// Workers find their place in the job from the environment, which the
// launcher, srun (SLURM) or mpirun (Open MPI) sets. Processes only: the
// collectives are in trainer/distributed.h.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "trainer/distributed.h"

namespace sparseflash::launch {

struct LaunchOptions {
  int nproc_per_node = 1;
  int nnodes = 1;
  int node_rank = 0;
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  int max_restarts = 0;
  std::vector<std::string> command;  // the worker's arguments, e.g. {"train", "--config", ...}
};

// Runs the job: exit status 0 when every worker succeeds, 128 + signal after
// a forwarded SIGINT/SIGTERM, 1 when a worker failed (after the restarts), 2
// for bad options. Messages go to stderr.
int run_launcher(const LaunchOptions& options);

// The process environment, read once per call (the project's one reader of
// it besides the kernels' switches, attention/kernels/options.h).
std::map<std::string, std::string> process_environment();

// Variables every worker gets (besides the inherited environment): RANK,
// LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR,
// MASTER_PORT, SPARSEFLASH_LAUNCHED, SPARSEFLASH_RESTART, and the NCCL/NVSHMEM
// settings that keep NVLink multicast off (NCCL_NVLS_ENABLE=0,
// TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1) unless the
// environment sets them already.
std::map<std::string, std::string> worker_environment(const LaunchOptions& options,
                                                      int local_rank, int restart);

// Where this process stands, from (in this order) RANK/WORLD_SIZE (the
// launcher, or set by hand), SLURM_PROCID/SLURM_NTASKS (srun) or
// OMPI_COMM_WORLD_RANK/SIZE (mpirun); a single process when none is set.
// `env` maps variable names to values (the process environment when null).
absl::StatusOr<trainer::World> world_from_environment(
    const std::map<std::string, std::string>* env = nullptr);

// Expands a SLURM host list: "node[01-03,07],gpu-a" ->
// {"node01", "node02", "node03", "node07", "gpu-a"}.
absl::StatusOr<std::vector<std::string>> expand_hostlist(std::string_view list);

}  // namespace sparseflash::launch
