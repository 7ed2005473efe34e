// `sparseflash launch`: read the job's shape from the flags and hand it to
// the launcher (launch/launcher.h), which starts and watches the workers.
#include "absl/flags/flag.h"
#include "cli/command.h"
#include "launch/launcher.h"

ABSL_FLAG(int32_t, nproc_per_node, 1, "Workers to start on this node (one per GPU).");
ABSL_FLAG(int32_t, nnodes, 1, "Nodes taking part in the job.");
ABSL_FLAG(int32_t, node_rank, 0, "This node's index in [0, --nnodes).");
ABSL_FLAG(std::string, master_addr, "127.0.0.1",
          "Address of node 0, where rank 0 hosts the rendezvous store (c10d::TCPStore).");
ABSL_FLAG(int32_t, master_port, 29500, "TCP port of the rendezvous store on --master-addr.");
ABSL_FLAG(int32_t, max_restarts, 0,
          "Restart the workers of this node up to this many times after a failure; each "
          "restart resumes from the last checkpoint in checkpoint.out_dir.");

namespace sparseflash::cli {
namespace {

// positional: the worker command after "--".
int run_launch(const Args& positional, const Args&) {
  launch::LaunchOptions o;
  o.nproc_per_node = absl::GetFlag(FLAGS_nproc_per_node);
  o.nnodes = absl::GetFlag(FLAGS_nnodes);
  o.node_rank = absl::GetFlag(FLAGS_node_rank);
  o.master_addr = absl::GetFlag(FLAGS_master_addr);
  o.master_port = absl::GetFlag(FLAGS_master_port);
  o.max_restarts = absl::GetFlag(FLAGS_max_restarts);
  o.command = positional;
  return launch::run_launcher(o);
}

}  // namespace

Command launch_command() {
  return {"launch",
          "sparseflash launch --nproc-per-node N [--nnodes M --node-rank R --master-addr A "
          "--master-port P] [--max-restarts K] -- train ...",
          "start a data-parallel job: one worker per GPU (no torchrun)",
          "Starts --nproc-per-node copies of this binary running the command after --, sets\n"
          "RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; rank 0\n"
          "hosts the rendezvous (c10d::TCPStore). When a worker fails the others are stopped\n"
          "(SIGTERM, then SIGKILL) and the launcher exits 1 naming the rank and the cause;\n"
          "--max-restarts restarts them from the last checkpoint. SIGINT/SIGTERM are forwarded:\n"
          "workers write a checkpoint and exit. Several nodes: run it on each with --nnodes,\n"
          "--node-rank and node 0's --master-addr. Workers also start without it under srun or\n"
          "mpirun (docs/distributed.md). Example:\n"
          "  sparseflash launch --nproc-per-node 2 -- train --config preset:gpt2_small_hash8k",
          {"nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "max_restarts"},
          run_launch};
}

}  // namespace sparseflash::cli
