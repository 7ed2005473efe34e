// Runs of ours and pretrained files, loaded to be evaluated, sampled or
// exported. Reading order: a run's tokenizer, loading for inference, the
// validation loss of a run.
#include <exception>

#include "absl/strings/str_cat.h"
#include "data/prepare.h"
#include "model/factory.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"

namespace sparseflash::trainer {

// ---------------------------------------------------------------------------
// a run's tokenizer

absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> run_tokenizer(const RestoredRun& run) {
  if (run.tokenizer == "byte") return tokenizer::open_tokenizer("byte");
  const std::string& dir = run.config.data().dir();
  absl::Status problem;
  auto meta = data::read_meta(dir);
  if (!meta.ok()) {
    problem = absl::Status(meta.status().code(),
                           absl::StrCat("the checkpoint's tokenizer ", run.tokenizer,
                                        " is found through its data: ", meta.status().message()));
  } else if (meta->tokenizer != run.tokenizer) {
    problem = absl::FailedPreconditionError(
        absl::StrCat("the checkpoint was trained with tokenizer ", run.tokenizer, ", but ", dir,
                     " now holds data of tokenizer ", meta->tokenizer));
  } else {
    auto opened = data::open_data_tokenizer(*meta);
    if (opened.ok()) return opened;
    problem = opened.status();
  }
  // A fine-tuned run: the pretrained file may carry the same tokenizer.
  const std::string& init_from = run.config.model().init_from();
  if (!init_from.empty() && !model::is_training_checkpoint(init_from)) {
    auto own = tokenizer::load_tokenizer(init_from, "");
    if (own.ok() && (*own)->identity() == run.tokenizer) return own;
  }
  return problem;
}

std::string run_tokenizer_source(const RestoredRun& run) {
  auto meta = data::read_meta(run.config.data().dir());
  return meta.ok() ? meta->tokenizer_source : "";
}

// ---------------------------------------------------------------------------
// loading for inference

absl::StatusOr<model::LoadedModel> load_for_inference(const std::string& path,
                                                      const model::LoadOptions& options) {
  if (!model::is_training_checkpoint(path)) return model::load_pretrained_model(path, options);
  if (!options.rope_scaling.empty())
    return absl::InvalidArgumentError(absl::StrCat(
        "--rope-scaling applies to pretrained files; the run ", path,
        " keeps the RoPE scaling it was trained with (its config's model.rope_scaling)"));
  auto run = restore_run(path, "cpu");
  if (!run.ok()) return run.status();
  std::unique_ptr<tokenizer::Tokenizer> tokenizer;
  if (options.need_tokenizer && options.tokenizer.empty()) {
    auto t = run_tokenizer(*run);
    if (!t.ok()) return t.status();
    tokenizer = *std::move(t);
  }
  const std::string identity = absl::StrCat("run:", checkpoint_path(path), "@", run->step);
  return model::prepare_run_model(run->model, run->config, path, identity, std::move(tokenizer),
                                  options);
}

// ---------------------------------------------------------------------------
// validation loss of a run

absl::StatusOr<ValidationReport> evaluate_run(const ValidationOptions& o) {
  auto loaded = restore_run(o.checkpoint, o.device);
  if (!loaded.ok()) return loaded.status();
  const auto& cfg = loaded->config;
  ValidationReport report;
  report.step = loaded->step;
  report.data_dir = o.data_dir.empty() ? cfg.data().dir() : o.data_dir;
  auto val = data::TokenLoader::open(report.data_dir, data::Split::kVal, cfg.data().seq_len());
  if (!val.ok()) return val.status();
  if (val->meta().tokenizer != loaded->tokenizer)
    return absl::FailedPreconditionError(
        absl::StrCat("data in ", report.data_dir, " uses tokenizer \"", val->meta().tokenizer,
                     "\", the checkpoint \"", loaded->tokenizer, "\""));
  if (o.batches < 1) return absl::InvalidArgumentError("--batches must be >= 1");
  const int batch_size = o.batch_size > 0 ? o.batch_size : cfg.data().batch_size();
  const bool bf16 = cfg.train().bf16() && loaded->device.is_cuda();
  report.result = evaluate(loaded->model, *val, o.batches, batch_size, loaded->device, bf16);
  report.unigram_bits_per_byte = val->meta().unigram_bits_per_byte;
  return report;
}

}  // namespace sparseflash::trainer
