// `sparseflash convert`: a Llama-family file or a Llama run of ours to our
// native format (an HF Llama directory) or to GGUF for llama.cpp, or our GPT
// run to HF GPT-2.
#include <filesystem>
#include <iostream>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "cli/command.h"
#include "model/export.h"
#include "model/factory.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, input, "", "The checkpoint to convert.");
ABSL_FLAG(std::string, output, "", "Output directory (a .gguf file for --to gguf).");
ABSL_FLAG(std::string, to, "native",
          "native (a Llama file or Llama run -> HF Llama safetensors + config.json), gguf (the "
          "same -> one GGUF file llama.cpp runs) or hf-gpt2 (our GPT run or ckpt.pt -> "
          "GPT2LMHeadModel's model.safetensors + config.json). Not given: gguf when --output ends "
          "in .gguf, else native.");
ABSL_FLAG(std::string, gguf_type, "f16",
          "--to gguf: how the matrices are stored: f32, f16, bf16 or q8_0 (norms stay f32).");

ABSL_DECLARE_FLAG(std::string, dtype);
ABSL_DECLARE_FLAG(std::string, rope_scaling);

namespace sparseflash::cli {
namespace {

struct ConvertOptions {
  std::string input, output, dtype;
  std::string gguf_type;
  std::string rope_scaling;  // GGUF from a file only
  model::ExportFormat format = model::ExportFormat::kHfLlama;
};

absl::StatusOr<model::ExportResult> convert(const ConvertOptions& o) {
  const bool gguf = o.format == model::ExportFormat::kGguf;
  // hf-gpt2 reads runs only: anything else fails in trainer::restore_run, naming it.
  if (o.format != model::ExportFormat::kHfGpt2 && !model::is_training_checkpoint(o.input)) {
    if (gguf) return model::export_llama_file_gguf(o.input, o.output, o.gguf_type, o.rope_scaling);
    return model::export_llama_file(o.input, o.output, o.dtype);
  }
  if (!o.rope_scaling.empty())
    return absl::InvalidArgumentError(
        "--rope-scaling: runs keep the context they were trained for; it applies to pretrained files");
  auto run = trainer::restore_run(o.input, "cpu");
  if (!run.ok()) return run.status();
  model::RunSource source{o.input, run->step, run->tokenizer, trainer::run_tokenizer_source(*run)};
  return model::export_run(run->model, run->config, source, o.format, o.output,
                           gguf ? o.gguf_type : o.dtype);
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
  std::string to = absl::GetFlag(FLAGS_to);
  o.gguf_type = absl::GetFlag(FLAGS_gguf_type);
  o.rope_scaling = absl::GetFlag(FLAGS_rope_scaling);
  if (o.input.empty()) return fail(cmd, "--input is required");
  if (o.output.empty()) return fail(cmd, "--output is required");
  if (!std::filesystem::exists(o.input))
    return fail(cmd, absl::StrCat("--input: ", o.input, " does not exist"));
  if (!flag_given("to") && absl::EndsWith(o.output, ".gguf")) to = "gguf";
  if (to == "native") o.format = model::ExportFormat::kHfLlama;
  else if (to == "gguf") o.format = model::ExportFormat::kGguf;
  else if (to == "hf-gpt2") o.format = model::ExportFormat::kHfGpt2;
  else return fail(cmd, absl::StrCat("--to: expected native, gguf or hf-gpt2, got \"", to, "\""));
  if (o.format == model::ExportFormat::kGguf) {
    if (o.dtype != "auto")
      return fail(cmd, absl::StrCat("--dtype ", o.dtype,
                                    ": GGUF output takes --gguf-type (f32, f16, bf16, q8_0)"));
    if (auto t = model::parse_gguf_type(o.gguf_type); !t.ok()) return fail(cmd, std::string(t.status().message()));
  } else {
    if (flag_given("gguf_type"))
      return fail(cmd, absl::StrCat("--gguf-type applies to --to gguf (this is --to ", to, ")"));
    if (!o.rope_scaling.empty())
      return fail(cmd, absl::StrCat("--rope-scaling applies to --to gguf (this is --to ", to, ")"));
  }
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
          "sparseflash convert --input PATH --output DIR|FILE.gguf [--to native|gguf|hf-gpt2]\n"
          "                          [--dtype T] [--gguf-type f32|f16|bf16|q8_0] [--rope-scaling TYPE:FACTOR]",
          "convert checkpoints: Llama files and runs to HF Llama or GGUF, our GPT runs to HF GPT-2",
          "--to native: any Llama checkpoint eval/generate read (HF safetensors directory,\n"
          ".gguf, llama2.c .bin) -> DIR/model.safetensors + config.json in the HF Llama layout\n"
          "(dequantised, Q/K in rotate-half order; transformers loads it too); a Llama run of\n"
          "ours (ckpt.pt or its directory) the same way, with its data's tokenizer.json.\n"
          "--to gguf (the default for an --output ending in .gguf): the same inputs -> one GGUF v3\n"
          "file llama.cpp runs (architecture llama, llama.cpp's tensor names and Q/K row order,\n"
          "RoPE scaling as llama.rope.scaling.* or rope_freqs.weight). --gguf-type stores the\n"
          "matrices as f32, f16 (default), bf16 or q8_0; norms stay f32. A GGUF input's tokenizer\n"
          "is carried over, as is the tokenizer of a run prepared with a .gguf; otherwise the file\n"
          "says no_vocab (the command warns). --rope-scaling TYPE:FACTOR (linear or yarn) extends a\n"
          "pretrained file's context first, as eval does. Example:\n"
          "  sparseflash convert --input SmolLM2-135M-Instruct.Q4_1.gguf --output smol-q8.gguf \\\n"
          "    --gguf-type q8_0\n"
          "--to hf-gpt2: our GPT run directory or ckpt.pt -> DIR/model.safetensors + config.json\n"
          "for transformers' GPT2LMHeadModel (vocab = our byte tokenizer). GPT-2 attends\n"
          "densely: a run trained with hash or drop attention is exported with dense attention\n"
          "(the command says so); shared_qk runs cannot be exported.",
          {"input", "output", "to", "dtype", "gguf_type", "rope_scaling"},
          run_convert};
}

}  // namespace sparseflash::cli
