// The single-process training loop, evaluation and sampling from checkpoints.
//
// One step: for each of train.grad_accum micro-batches, read windows keyed on
// (data.seed, step, micro, row), forward under bf16 autocast on GPU, backward;
// then clip, AdamW at the scheduled learning rate, log. Evaluation, checkpoints
// and signals are handled between steps.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include <c10/core/Device.h>

#include "absl/status/statusor.h"
#include "configs/experiment.pb.h"
#include "data/loader.h"
#include "model/causal_lm.h"
#include "model/load.h"
#include "tokenizer/tokenizer.h"
#include "trainer/distributed.h"

namespace sparseflash::trainer {

// "auto" -> CUDA when available, else CPU; "cpu", "cuda", "cuda:N".
absl::StatusOr<c10::Device> resolve_device(const std::string& name);

// SIGINT/SIGTERM set a flag the loop reads between steps; a second signal
// gets the default action (immediate exit).
void install_signal_handlers();
int pending_signal();  // 0 when none
// Asks the loop to checkpoint and stop after the current step, as a signal does.
void request_stop(int signo);

struct RunResult {
  int64_t steps = 0;        // optimizer steps done in total
  int interrupted_by = 0;   // signal number when a signal ended the run early
  double val_loss = 0;      // nats per token, last evaluation
  double val_bits_per_byte = 0;
  double unigram_bits_per_byte = 0;
  double tokens_per_second = 0;  // training throughput of this process
  std::string sample;            // text sampled at the end (eval.sample_tokens)
};

// Runs (or resumes) the experiment. Progress goes to stderr, metrics to
// out_dir/metrics.jsonl. Errors name the file, field or step at fault.
struct TrainHooks {
  // Called after every optimizer step with the step number (1-based) and loss.
  std::function<void(int64_t step, double loss)> on_step;
};
// `world` says which process of a data-parallel job this is (see
// trainer/distributed.h); the default is a single process.
absl::StatusOr<RunResult> train(config::Experiment exp, const TrainHooks& hooks = {},
                                const World& world = {});

struct EvalResult {
  double loss = 0;            // mean cross-entropy, nats per token
  double bits_per_byte = 0;   // loss / ln 2 / bytes per token
  int64_t tokens = 0;
};

EvalResult evaluate(model::CausalLM model, const data::TokenLoader& val, int batches,
                    int batch_size, c10::Device device, bool bf16);

// Samples up to `tokens` tokens after `prompt` (model/generate.h; stops at
// the context length) and returns prompt + continuation.
std::string sample_text(model::CausalLM model, const tokenizer::Tokenizer& tokenizer,
                        const std::string& prompt, int tokens, double temperature, int top_k,
                        uint64_t seed);

// A model restored from a checkpoint for eval/sample.
struct RestoredRun {
  config::Experiment config;
  std::string tokenizer;
  int64_t step = 0;
  model::CausalLM model{nullptr};
  c10::Device device{c10::kCPU};
};
absl::StatusOr<RestoredRun> restore_run(const std::string& checkpoint_file_or_dir,
                                        const std::string& device);

// ---------------------------------------------------------------------------
// runs and pretrained files for evaluation, generation and export (trainer/load.cc)

// The tokenizer a run was trained with: byte, or the one its prepared data
// (data.dir of its config) was made with, which must be the one the run
// names and unchanged since `prepare`; failing that, the tokenizer of the
// pretrained file it was fine-tuned from (model.init_from) when identical.
absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> run_tokenizer(const RestoredRun& run);

// The tokenizer file the run's data was prepared with ("" when unknown).
std::string run_tokenizer_source(const RestoredRun& run);

// A pretrained file (model::load_pretrained_model) or a run of ours
// (load_model, then model::prepare_run_model with run_tokenizer): what
// `eval --model`, `generate` and `saap` run.
absl::StatusOr<model::LoadedModel> load_for_inference(const std::string& path,
                                                      const model::LoadOptions& options);

// Validation loss of a run on prepared data, as training reports it.
struct ValidationOptions {
  std::string checkpoint;      // ckpt.pt or its run directory
  std::string device = "auto";
  std::string data_dir;        // empty = the data the run was trained on
  int batches = 20;            // >= 1
  int batch_size = 0;          // 0 = the run's data.batch_size
};
struct ValidationReport {
  int64_t step = 0;
  std::string data_dir;
  EvalResult result;
  double unigram_bits_per_byte = 0;  // of the data, the baseline to beat
};
// Errors name the file, or the data whose tokenizer differs from the run's.
absl::StatusOr<ValidationReport> evaluate_run(const ValidationOptions& options);

}  // namespace sparseflash::trainer
