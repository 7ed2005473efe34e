// Writes fuzz_checkpoint_info's seed corpus into OUT: real training checkpoints
// from save_checkpoint (trainer/checkpoint.h), of a model with two tiny parameters
// (the header is what the fuzzer reads; weights only make the file bigger),
// with and without optimizer state, for two presets. Each must read back.
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/ATen.h>

#include "configs/config.h"
#include "model/causal_lm.h"
#include "tests/tiny_causal_lm.h"
#include "trainer/checkpoint.h"

using namespace sparseflash;

namespace {

void check(const absl::Status& s, const std::string& what) {
  if (!s.ok()) {
    std::fprintf(stderr, "make_checkpoint_seeds: %s: %s\n", what.c_str(), std::string(s.message()).c_str());
    std::exit(1);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || std::strcmp(argv[1], "--help") == 0) {
    std::fprintf(stderr, "usage: make_checkpoint_seeds OUT\nWrites tiny training checkpoints to OUT.\n");
    return argc == 2 ? 0 : 2;
  }
  const std::string out = argv[1];
  mkdir(out.c_str(), 0755);
  at::manual_seed(1234);
  model::CausalLM model = test_util::tiny_causal_lm();
  for (const char* preset : {"tiny_test", "llama_finetune"}) {
    absl::StatusOr<config::Experiment> exp = load_preset(preset);
    check(exp.status(), preset);
    fill_defaults(&*exp);
    trainer::AdamW adamw(model, exp->optim());
    for (const bool with_optimizer : {false, true}) {
      const std::string path = out + "/" + preset + (with_optimizer ? "_optim.pt" : ".pt");
      check(trainer::save_checkpoint(path, *exp, with_optimizer ? "bpe:4:fnv1a64:0123456789abcdef" : "byte",
                                     model, with_optimizer ? &adamw : nullptr, {12, 3456}),
            path);
      // A corpus of unreadable files would fuzz only the first check.
      absl::StatusOr<trainer::CheckpointInfo> back = trainer::read_checkpoint_info(path);
      check(back.status(), path);
    }
  }
  return 0;
}
