// `sparseflash train`: resolve the config (file or preset, --set overrides,
// model.init_from's architecture) and run trainer::train, as one worker of a
// data-parallel job when the environment says so.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/command.h"
#include "configs/config.h"
#include "launch/launcher.h"
#include "model/factory.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, config, "",
          "Experiment config: a text-format file, or preset:NAME for a built-in preset. Empty = "
          "the default preset for the machine (gpu_default with a GPU, else cpu_default).");
ABSL_FLAG(bool, print_config, false, "Print the resolved config and exit without training.");

namespace sparseflash::cli {
namespace {

int run_train(const Args& positional, const Args& overrides) {
  if (!positional.empty())
    return fail("train", absl::StrCat("unexpected argument '", positional[0],
                                      "' (configs are given with --config)"));
  auto device = trainer::resolve_device("auto");
  const std::string preset = device.ok() && device->is_cuda() ? "gpu_default" : "cpu_default";
  auto exp = resolve_config(absl::GetFlag(FLAGS_config), overrides, preset,
                            model::complete_from_pretrained);
  if (!exp.ok()) return fail("train", std::string(exp.status().message()));
  if (absl::GetFlag(FLAGS_print_config)) {
    std::cout << config_to_text(*exp);
    return 0;
  }
  // One of several workers when started by `sparseflash launch`, srun or mpirun.
  auto world = launch::world_from_environment();
  if (!world.ok()) return fail("train", std::string(world.status().message()));
  trainer::install_signal_handlers();
  auto result = trainer::train(*exp, {}, *world);
  if (!result.ok()) return fail("train", std::string(result.status().message()));
  if (result->interrupted_by) return 128 + result->interrupted_by;
  if (world->rank != 0) return 0;  // rank 0 reports
  std::cout << absl::StrFormat(
      "final: step %d, val loss %.4f nats/token = %.4f bits/byte (unigram baseline %.4f "
      "bits/byte), %.0f tokens/s\n",
      result->steps, result->val_loss, result->val_bits_per_byte, result->unigram_bits_per_byte,
      result->tokens_per_second);
  if (!result->sample.empty()) std::cout << "sample:\n" << result->sample << "\n";
  return 0;
}

}  // namespace

Command train_command() {
  return {"train",
          "sparseflash train [--config FILE|preset:NAME] [--set path=value ...]",
          "train a GPT or a Llama (or resume the run in checkpoint.out_dir)",
          "Trains the model the config describes (model.arch: GPT or LLAMA; model.init_from: a\n"
          "pretrained file to start from) on prepared data. Without --config it uses the\n"
          "gpu_default preset when a GPU is present, else cpu_default. --set overrides any\n"
          "config field and may repeat, e.g. --set optim.lr=3e-4 --set attention.kind=DROP.\n"
          "Writes ckpt.pt, config.txtpb and metrics.jsonl into checkpoint.out_dir; rerunning the\n"
          "same command resumes. SIGINT/SIGTERM write a checkpoint and exit with 128+signal.",
          {"config", "print_config"},
          run_train};
}

}  // namespace sparseflash::cli
