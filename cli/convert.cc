// `sparseflash convert`: a Llama-family file to our native format (an HF
// Llama directory), or a run of ours to the HF format of its family.
#include <filesystem>
#include <iostream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "cli/command.h"
#include "model/export.h"
#include "model/factory.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, input, "", "The checkpoint to convert.");
ABSL_FLAG(std::string, output, "", "Output directory.");
ABSL_FLAG(std::string, to, "native",
          "native (a Llama file or Llama run -> HF Llama safetensors + config.json) or hf-gpt2 "
          "(our GPT run or ckpt.pt -> GPT2LMHeadModel's model.safetensors + config.json).");

ABSL_DECLARE_FLAG(std::string, dtype);

namespace sparseflash::cli {
namespace {

struct ConvertOptions {
  std::string input, output, dtype;
  model::ExportFormat format = model::ExportFormat::kHfLlama;
};

absl::StatusOr<model::ExportResult> convert(const ConvertOptions& o) {
  // hf-gpt2 reads runs only: anything else fails in trainer::load_model, naming it.
  if (o.format == model::ExportFormat::kHfLlama && !model::is_training_checkpoint(o.input))
    return model::export_llama_file(o.input, o.output, o.dtype);
  auto run = trainer::load_model(o.input, "cpu");
  if (!run.ok()) return run.status();
  model::RunSource source{o.input, run->step, run->tokenizer, trainer::run_tokenizer_source(*run)};
  return model::export_run(run->model, run->config, source, o.format, o.output, o.dtype);
}

int run_convert(const Args& positional, const Args&) {
  const char* cmd = "convert";
  if (!positional.empty())
    return fail(cmd, absl::StrCat("unexpected argument '", positional[0],
                                  "' (give --input and --output)"));
  ConvertOptions o;
  o.input = absl::GetFlag(FLAGS_input);
  o.output = absl::GetFlag(FLAGS_output);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  const std::string to = absl::GetFlag(FLAGS_to);
  if (o.input.empty()) return fail(cmd, "--input is required");
  if (o.output.empty()) return fail(cmd, "--output is required");
  if (!std::filesystem::exists(o.input))
    return fail(cmd, absl::StrCat("--input: ", o.input, " does not exist"));
  if (to == "native") o.format = model::ExportFormat::kHfLlama;
  else if (to == "hf-gpt2") o.format = model::ExportFormat::kHfGpt2;
  else return fail(cmd, absl::StrCat("--to: expected native or hf-gpt2, got \"", to, "\""));
  try {
    auto r = convert(o);
    if (!r.ok()) return fail(cmd, std::string(r.status().message()));
    for (const auto& w : r->warnings) std::cout << "note: " << w << "\n";
    std::cout << r->summary << "\n";
    return 0;
  } catch (const std::exception& e) {
    return fail(cmd, error_text(e));
  }
}

}  // namespace

Command convert_command() {
  return {"convert",
          "sparseflash convert --input PATH --output DIR [--to native|hf-gpt2] [--dtype T]",
          "convert checkpoints: Llama files and runs to HF Llama, our GPT runs to HF GPT-2",
          "--to native: any Llama checkpoint eval/generate read (HF safetensors directory,\n"
          ".gguf, llama2.c .bin) -> DIR/model.safetensors + config.json in the HF Llama layout\n"
          "(dequantised, Q/K in rotate-half order; transformers loads it too); a Llama run of\n"
          "ours (ckpt.pt or its directory) the same way, with its data's tokenizer.json.\n"
          "--to hf-gpt2: our GPT run directory or ckpt.pt -> DIR/model.safetensors + config.json\n"
          "for transformers' GPT2LMHeadModel (vocab = our byte tokenizer). GPT-2 attends\n"
          "densely: a run trained with hash or drop attention is exported with dense attention\n"
          "(the command says so); shared_qk runs cannot be exported.",
          {"input", "output", "to", "dtype"},
          run_convert};
}

}  // namespace sparseflash::cli
