// sparseflash: the command-line entry point. One binary, one subcommand per
// job (train, eval, prepare, sample); each subcommand owns a set of Abseil
// flags and explains them with `sparseflash <command> --help`.
//
// Flags are written with hyphens (--val-fraction); Abseil names them with
// underscores, so hyphens are translated before parsing. --set is collected
// separately because it repeats and its values contain commas.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/reflection.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "configs/config.h"
#include "data/prepare.h"
#include "launch/llama_commands.h"
#include "launch/saap_commands.h"
#include "launch/launcher.h"
#include "model/factory.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"
#include "trainer/trainer.h"

// ---------------------------------------------------------------------------
// flags (grouped by the commands that read them)

ABSL_FLAG(std::string, config, "",
          "Experiment config: a text-format file, or preset:NAME for a built-in preset. Empty = "
          "the default preset for the machine (gpu_default with a GPU, else cpu_default).");
ABSL_FLAG(bool, print_config, false, "Print the resolved config and exit without training.");

ABSL_FLAG(std::string, checkpoint, "runs/cpu_default",
          "Checkpoint file, or a run directory holding ckpt.pt.");
ABSL_FLAG(std::string, device, "auto", "auto, cpu, cuda or cuda:N.");
ABSL_FLAG(std::string, data, "",
          "Prepared data directory; empty = the one the checkpoint was trained on. eval --model: "
          "token shards (comma-separated .bin files) or a prepared directory (its val shards).");
ABSL_FLAG(int32_t, batches, 20, "Validation batches to evaluate.");
ABSL_FLAG(int32_t, batch_size, 0, "Sequences per batch; 0 = the checkpoint's data.batch_size.");
ABSL_FLAG(bool, json, false, "Print the result as one JSON object on stdout.");

ABSL_FLAG(std::string, out, "data/linux-docs", "Output directory for shards and meta.json.");
ABSL_FLAG(std::vector<std::string>, include, {},
          "Comma-separated glob patterns a document path must match (fnmatch; '*' also "
          "matches '/'). Empty = every document.");
ABSL_FLAG(std::vector<std::string>, exclude, {},
          "Comma-separated glob patterns of document paths to leave out.");
ABSL_FLAG(double, val_fraction, 0.05, "Fraction of documents held out for validation.");
ABSL_FLAG(std::string, tokenizer, "byte",
          "prepare: byte (vocabulary 256, byte 0 ends a document) or a tokenizer file: a "
          "tokenizer.json, a directory holding one, a .gguf (its embedded vocabulary) or a "
          "llama2.c tokenizer.bin; meta.json records its identity and absolute path. eval "
          "--model, generate: a tokenizer file of the same kinds; byte = the model's own.");
ABSL_FLAG(int64_t, document_separator, -1,
          "Token id written after each document; -1 = the tokenizer's end-of-sequence token "
          "(byte: 0). Needed for a tokenizer without one.");
ABSL_FLAG(bool, add_bos, false,
          "Start each document with the tokenizer's BOS (as its configuration puts it in front "
          "of a sequence); an error for tokenizers that add none, such as byte.");
ABSL_FLAG(bool, join_dir, false,
          "One document per directory: the files of a directory (after --include/--exclude) are "
          "concatenated in path order, named by the directory's path (which decides its split); "
          "subdirectories are documents of their own. Archive members are grouped by their "
          "parent directory; an archive's matched text is held in memory until it is read.");
ABSL_FLAG(uint64_t, shard_tokens, 100000000, "Maximum tokens per shard file.");
ABSL_FLAG(uint64_t, max_bytes, 0, "Stop reading input after this many bytes (0 = no limit).");

ABSL_FLAG(std::string, prompt, "The kernel ", "Text the sample continues.");
ABSL_FLAG(int32_t, tokens, 300, "Tokens to sample.");
ABSL_FLAG(double, temperature, 0.8, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(int32_t, top_k, 40, "Sample among the k most likely tokens; 0 = all.");
ABSL_FLAG(uint64_t, seed, 1, "Seed of the sampler.");

namespace sparseflash {
namespace {

using Args = std::vector<std::string>;

struct Command {
  const char* name;
  const char* usage;
  const char* summary;
  const char* description;
  std::vector<std::string> flags;  // abseil names (underscores)
  int (*run)(const Args& positional, const Args& overrides);
};

int fail(const char* command, const std::string& message) {
  std::cerr << "sparseflash " << command << ": error: " << message << "\n";
  return 1;
}

// ---------------------------------------------------------------------------
// train

int run_train(const Args& positional, const Args& overrides) {
  if (!positional.empty())
    return fail("train", absl::StrCat("unexpected argument '", positional[0],
                                      "' (configs are given with --config)"));
  auto device = trainer::resolve_device("auto");
  const std::string preset =
      device.ok() && device->is_cuda() ? "gpu_default" : "cpu_default";
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

// ---------------------------------------------------------------------------
// eval

int run_eval(const Args& positional, const Args&) {
  if (llama_commands::eval_model_given()) return llama_commands::run_eval(positional);
  if (!positional.empty())
    return fail("eval", absl::StrCat("unexpected argument '", positional[0], "'"));
  auto loaded = trainer::load_model(absl::GetFlag(FLAGS_checkpoint), absl::GetFlag(FLAGS_device));
  if (!loaded.ok()) return fail("eval", std::string(loaded.status().message()));
  const auto& cfg = loaded->config;
  const std::string dir =
      absl::GetFlag(FLAGS_data).empty() ? cfg.data().dir() : absl::GetFlag(FLAGS_data);
  auto val = data::TokenLoader::open(dir, data::Split::kVal, cfg.data().seq_len());
  if (!val.ok()) return fail("eval", std::string(val.status().message()));
  if (val->meta().tokenizer != loaded->tokenizer)
    return fail("eval", absl::StrCat("data in ", dir, " uses tokenizer \"", val->meta().tokenizer,
                                     "\", the checkpoint \"", loaded->tokenizer, "\""));
  const int batches = absl::GetFlag(FLAGS_batches);
  const int batch_size =
      absl::GetFlag(FLAGS_batch_size) > 0 ? absl::GetFlag(FLAGS_batch_size) : cfg.data().batch_size();
  if (batches < 1) return fail("eval", "--batches must be >= 1");
  const bool bf16 = cfg.train().bf16() && loaded->device.is_cuda();
  auto r = trainer::evaluate(loaded->model, *val, batches, batch_size, loaded->device, bf16);
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = {{"checkpoint", absl::GetFlag(FLAGS_checkpoint)},
                        {"step", loaded->step},
                        {"data", dir},
                        {"tokens", r.tokens},
                        {"loss", r.loss},
                        {"bits_per_byte", r.bits_per_byte},
                        {"unigram_bits_per_byte", val->meta().unigram_bits_per_byte}};
    std::cout << j.dump() << "\n";
  } else {
    std::cout << absl::StrFormat(
        "step %d: val loss %.4f nats/token, %.4f bits/byte over %d tokens (unigram baseline "
        "%.4f bits/byte)\n",
        loaded->step, r.loss, r.bits_per_byte, r.tokens, val->meta().unigram_bits_per_byte);
  }
  return 0;
}

// ---------------------------------------------------------------------------
// prepare

int run_prepare(const Args& positional, const Args&) {
  if (positional.empty()) return fail("prepare", "no input given (files, directories or .tar.xz)");
  data::PrepareOptions o;
  o.inputs = positional;
  o.out_dir = absl::GetFlag(FLAGS_out);
  o.include = absl::GetFlag(FLAGS_include);
  o.exclude = absl::GetFlag(FLAGS_exclude);
  o.val_fraction = absl::GetFlag(FLAGS_val_fraction);
  o.tokenizer = absl::GetFlag(FLAGS_tokenizer);
  o.document_separator = absl::GetFlag(FLAGS_document_separator);
  o.add_bos = absl::GetFlag(FLAGS_add_bos);
  o.join_dir = absl::GetFlag(FLAGS_join_dir);
  o.shard_tokens = absl::GetFlag(FLAGS_shard_tokens);
  o.max_bytes = absl::GetFlag(FLAGS_max_bytes);
  if (!(o.val_fraction > 0 && o.val_fraction < 1))
    return fail("prepare", absl::StrCat("--val-fraction must be in (0, 1), got ", o.val_fraction));
  if (o.shard_tokens < 1) return fail("prepare", "--shard-tokens must be >= 1");
  if (o.document_separator < -1)
    return fail("prepare", absl::StrCat("--document-separator must be a token id or -1, got ",
                                        o.document_separator));
  const bool tty = isatty(STDERR_FILENO);
  o.progress = [tty](const std::string& line) {
    if (tty) std::cerr << "\r\033[K" << line << std::flush;
    else std::cerr << line << "\n";
  };
  auto meta = data::prepare(o);
  if (tty) std::cerr << "\n";
  if (!meta.ok()) return fail("prepare", std::string(meta.status().message()));
  std::cout << absl::StrFormat(
      "wrote %s: train %d documents, %d tokens in %d shard(s); val %d documents, %d tokens; "
      "%d skipped; unigram baseline %.4f bits/byte; tokenizer %s (vocabulary %d)\n",
      o.out_dir, meta->train_documents, meta->train_tokens, meta->train_shards.size(),
      meta->val_documents, meta->val_tokens, meta->skipped_documents,
      meta->unigram_bits_per_byte, meta->tokenizer, meta->vocab_size);
  return 0;
}

// ---------------------------------------------------------------------------
// sample

// The tokenizer a checkpoint was trained with: byte, or the one its prepared data
// (data.dir of its config) was made with, which must be the one the checkpoint names.
absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> checkpoint_tokenizer(
    const trainer::LoadedModel& loaded) {
  if (loaded.tokenizer == "byte") return tokenizer::open_tokenizer("byte");
  const std::string& dir = loaded.config.data().dir();
  auto meta = data::read_meta(dir);
  if (!meta.ok())
    return absl::Status(meta.status().code(),
                        absl::StrCat("the checkpoint's tokenizer ", loaded.tokenizer,
                                     " is found through its data: ", meta.status().message()));
  if (meta->tokenizer != loaded.tokenizer)
    return absl::FailedPreconditionError(
        absl::StrCat("the checkpoint was trained with tokenizer ", loaded.tokenizer, ", but ", dir,
                     " now holds data of tokenizer ", meta->tokenizer));
  return data::open_data_tokenizer(*meta);
}

int run_sample(const Args& positional, const Args&) {
  if (!positional.empty())
    return fail("sample", absl::StrCat("unexpected argument '", positional[0],
                                       "' (the prompt is given with --prompt)"));
  auto loaded = trainer::load_model(absl::GetFlag(FLAGS_checkpoint), absl::GetFlag(FLAGS_device));
  if (!loaded.ok()) return fail("sample", std::string(loaded.status().message()));
  auto tokenizer = checkpoint_tokenizer(*loaded);
  if (!tokenizer.ok()) return fail("sample", std::string(tokenizer.status().message()));
  if (absl::GetFlag(FLAGS_tokens) < 0) return fail("sample", "--tokens must be >= 0");
  std::cout << trainer::sample_text(loaded->model, **tokenizer, absl::GetFlag(FLAGS_prompt),
                                    absl::GetFlag(FLAGS_tokens), absl::GetFlag(FLAGS_temperature),
                                    absl::GetFlag(FLAGS_top_k), absl::GetFlag(FLAGS_seed))
            << "\n";
  return 0;
}

// ---------------------------------------------------------------------------
// generate, convert (launch/llama_commands.cc)

int run_generate(const Args& positional, const Args&) {
  return llama_commands::run_generate(positional);
}

int run_convert(const Args& positional, const Args&) {
  return llama_commands::run_convert(positional);
}

// eval's flags: those of our GPT checkpoints, then those of the --model form.
std::vector<std::string> eval_command_flags() {
  std::vector<std::string> flags = {"checkpoint", "data", "batches", "batch_size", "device",
                                    "json"};
  for (const auto& f : llama_commands::eval_flags())
    if (std::find(flags.begin(), flags.end(), f) == flags.end()) flags.push_back(f);
  return flags;
}

// ---------------------------------------------------------------------------
// dispatch and help

const std::vector<Command>& commands() {
  static const std::vector<Command> all = {
      {"train", "sparseflash train [--config FILE|preset:NAME] [--set path=value ...]",
       "train a GPT (or resume the run in checkpoint.out_dir)",
       "Trains the model the config describes on prepared data. Without --config it uses the\n"
       "gpu_default preset when a GPU is present, else cpu_default. --set overrides any\n"
       "config field and may repeat, e.g. --set optim.lr=3e-4 --set attention.kind=DROP.\n"
       "Writes ckpt.pt, config.txtpb and metrics.jsonl into checkpoint.out_dir; rerunning the\n"
       "same command resumes. SIGINT/SIGTERM write a checkpoint and exit with 128+signal.",
       {"config", "print_config"},
       run_train},
      {"eval",
       "sparseflash eval [--checkpoint PATH] [--data DIR] [--batches N] [--json]\n"
       "       sparseflash eval --model PATH [--tokenizer PATH] (--text FILE | --data SHARDS)\n"
       "                        --context L --stride S [--attention dense|hash|drop] [--dtype T]\n"
       "                        [--json] [--json-file FILE]",
       "validation loss of a checkpoint, or perplexity of a pretrained model",
       "With --checkpoint: evaluates our GPT checkpoint on the validation split of prepared\n"
       "data (by default the data it was trained on); prints nats/token and bits/byte.\n"
       "With --model: sliding-window perplexity of a pretrained Llama-family model (HF\n"
       "directory, .gguf, llama2.c .bin, or `sparseflash convert` output) on a text file or\n"
       "token shards. Windows of --context tokens start every --stride tokens; each scores\n"
       "only the tokens no earlier window scored (transformers' recipe), so every token but\n"
       "the first is scored once. Prints tokens, mean NLL, perplexity and tokens/s; progress\n"
       "goes to stderr.",
       eval_command_flags(),
       run_eval},
      {"prepare",
       "sparseflash prepare INPUT... [--out DIR] [--include GLOBS] [--exclude GLOBS]\n"
       "                           [--tokenizer byte|FILE] [--document-separator ID] [--add-bos]\n"
       "                           [--join-dir]",
       "turn text files, directories or .tar.xz archives into token shards",
       "Reads documents (files; directories recursively; members of .tar, .tar.xz, .tar.gz),\n"
       "skips binary ones, splits them by document into train and validation, tokenizes\n"
       "and writes train_*.bin, val_*.bin and meta.json (see README, Data formats).\n"
       "--tokenizer byte (the default) writes one token per byte; a tokenizer file\n"
       "(tokenizer.json, .gguf, llama2.c tokenizer.bin) writes its ids (uint16 or uint32),\n"
       "with its end-of-sequence token after each document. --join-dir makes each\n"
       "directory's files one document (a source tree gives long documents).\n"
       "Example (the default corpus):\n"
       "  sparseflash prepare /usr/src/linux-source-6.1.tar.xz --out data/linux-docs \\\n"
       "      --include '*/Documentation/*.rst,*/Documentation/*.txt'",
       {"out", "include", "exclude", "val_fraction", "tokenizer", "document_separator", "add_bos",
        "join_dir", "shard_tokens", "max_bytes"},
       run_prepare},
      {"launch",
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
       [](const Args& positional, const Args&) { return launch::run_launch_command(positional); }},
      {"sample", "sparseflash sample [--checkpoint PATH] [--prompt TEXT] [--tokens N]",
       "generate text from a checkpoint",
       "Continues --prompt with tokens sampled from the model (temperature, top-k). The\n"
       "tokenizer is the checkpoint's: byte, or the tokenizer file its prepared data\n"
       "(data.dir) was made with, checked to be unchanged.",
       {"checkpoint", "prompt", "tokens", "temperature", "top_k", "seed", "device"},
       run_sample},
      {"generate",
       "sparseflash generate --model PATH [--tokenizer PATH] --prompt TEXT\n"
       "                            [--max-new-tokens N] [--temperature T] [--top-p P] [--seed S]",
       "continue a prompt with a pretrained model (KV cache)",
       "Encodes --prompt with the model's tokenizer (BOS added when the tokenizer's own\n"
       "configuration adds one) and generates up to --max-new-tokens tokens with the KV\n"
       "cache, streaming them to stdout; stops at the end-of-sequence token. Temperature 0\n"
       "is greedy (argmax); otherwise --top-p keeps the smallest set of tokens with that\n"
       "much probability and --seed fixes the draws. --json prints one JSON object instead.",
       llama_commands::generate_flags(),
       run_generate},
      {"convert",
       "sparseflash convert --input PATH --output DIR [--to native|hf-gpt2] [--dtype T]",
       "convert checkpoints: any Llama input to native, our GPT to HF GPT-2",
       "--to native: any Llama checkpoint eval/generate read (HF safetensors directory,\n"
       ".gguf, llama2.c .bin) -> DIR/model.safetensors + config.json in the HF Llama layout\n"
       "(dequantised, Q/K in rotate-half order; transformers loads it too).\n"
       "--to hf-gpt2: our GPT run directory or ckpt.pt -> DIR/model.safetensors + config.json\n"
       "for transformers' GPT2LMHeadModel (vocab = our byte tokenizer). GPT-2 attends\n"
       "densely: a run trained with hash or drop attention is exported with dense attention\n"
       "(the command says so); shared_qk runs cannot be exported.",
       llama_commands::convert_flags(),
       run_convert},
      {"saap",
       "sparseflash saap fit --model PATH (--text FILE | --data SHARDS) --saap-index OUT\n"
       "                         [--context L] [--partitions C] [--key-space pre-rope|rope] ...\n"
       "       sparseflash saap eval --model PATH --text FILE --saap-index FILE [--rope-index FILE]\n"
       "                         [--context L] [--top-l 4,8,16,32] [--noperplexity] [--noneedle]",
       "fit SAAP key partitions and query classifiers; measure them",
       "fit: runs the model over windows of --context tokens of calibration text, clusters\n"
       "every KV head's pre-RoPE keys (batched k-means on the device) into --partitions\n"
       "partitions, computes for sampled queries the exact attention mass per partition\n"
       "outside the local window and sinks, trains one MLP classifier per query head on it\n"
       "(KL loss) and writes the index (protobuf header + safetensors, with the model's\n"
       "identity). It also stores per-head budget curves: the routed attention lost and the\n"
       "attention-output error of every query head at each --budget-grid key budget.\n"
       "--recency-bands (default auto) weights each partition's keys in the count prior by their\n"
       "age (the attention per key each head gives each age band, measured in the fit).\n"
       "Progress and time per phase go to stderr. --key-space rope fits the RoPE'd-keys\n"
       "baseline instead.\n"
       "eval: on held-out text, recall@l of the attention mass and keys visited for SAAP and\n"
       "the baselines (symmetric k-means, RoPE'd k-means with --rope-index, random, oracle);\n"
       "perplexity dense vs SAAP at each l; a pass-key retrieval check. Prints a table;\n"
       "--per-head-budgets adds perplexity with each key budget split over the heads.\n"
       "--json-file writes everything. To run SAAP in eval/generate: --attention saap\n"
       "--saap-index FILE --top-l L (or --key-budget F [--per-head-budgets]). See docs/saap.md.",
       saap_commands::saap_flags(),
       [](const Args& positional, const Args&) { return saap_commands::run_saap(positional); }},
  };
  return all;
}

void print_general_help() {
  std::cout << "sparseflash: GPT training with sparse flash attention\n\n"
               "usage: sparseflash <command> [flags]\n\ncommands:\n";
  for (const auto& c : commands()) std::cout << absl::StrFormat("  %-9s %s\n", c.name, c.summary);
  std::cout << "\n"
               "`sparseflash <command> --help` explains a command and its flags.\n";
}

std::string dashed(const std::string& name) { return absl::StrReplaceAll(name, {{"_", "-"}}); }

void print_command_help(const Command& c) {
  std::cout << "usage: " << c.usage << "\n\n" << c.description << "\n\nflags:\n";
  for (const auto& name : c.flags) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (!flag) continue;
    std::cout << absl::StrFormat("  --%s (default: %s)\n      %s\n", dashed(name),
                                 flag->DefaultValue().empty() ? "\"\"" : flag->DefaultValue(),
                                 flag->Help());
  }
  if (std::string(c.name) == "train") {
    std::cout << "  --set path=value (repeatable)\n      Override one config field.\n"
                 "\npresets: "
              << absl::StrJoin(preset_names(), ", ") << "\n";
  }
  std::cout << "  --help\n      This text.\n";
}

int dispatch(int argc, char** argv) {
  if (argc < 2 || std::string(argv[1]) == "--help" || std::string(argv[1]) == "-h") {
    print_general_help();
    return argc < 2 ? 2 : 0;
  }
  std::string name = argv[1];
  bool help = false;
  if (name == "help") {
    if (argc < 3) {
      print_general_help();
      return 0;
    }
    name = argv[2];
    help = true;
  }
  auto it = std::find_if(commands().begin(), commands().end(),
                         [&](const Command& c) { return name == c.name; });
  if (it == commands().end()) {
    std::cerr << "sparseflash: unknown command '" << name << "'\n\n";
    print_general_help();
    return 2;
  }
  const Command& command = *it;
  if (help) {
    print_command_help(command);
    return 0;
  }

  // Collect --set, translate hyphens, refuse flags of other commands.
  Args overrides;
  std::vector<std::string> kept = {argv[0]};
  for (int i = 2; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "--") {
      kept.push_back(arg);  // flags end here (launch's worker command follows)
      for (++i; i < argc; ++i) kept.push_back(argv[i]);
      break;
    }
    if (arg == "--help" || arg == "-h") {
      print_command_help(command);
      return 0;
    }
    if (arg == "--set" || arg.rfind("--set=", 0) == 0) {
      if (command.run != run_train) {
        std::cerr << "sparseflash " << name << ": --set is an option of train only\n";
        return 2;
      }
      if (arg == "--set") {
        if (i + 1 >= argc) {
          std::cerr << "sparseflash train: --set needs a value: --set path=value\n";
          return 2;
        }
        overrides.push_back(argv[++i]);
      } else {
        overrides.push_back(arg.substr(6));
      }
      continue;
    }
    if (arg.size() > 2 && arg[0] == '-' && arg != "-") {
      const size_t start = arg[1] == '-' ? 2 : 1;
      const size_t eq = arg.find('=');
      std::string flag = absl::StrReplaceAll(arg.substr(start, eq - start), {{"-", "_"}});
      std::string base = flag.rfind("no", 0) == 0 ? flag.substr(2) : flag;
      auto& allowed = command.flags;
      if (std::find(allowed.begin(), allowed.end(), flag) == allowed.end() &&
          std::find(allowed.begin(), allowed.end(), base) == allowed.end()) {
        std::cerr << "sparseflash " << name << ": unknown flag '" << arg.substr(0, eq)
                  << "' (see sparseflash " << name << " --help)\n";
        return 2;
      }
      arg = "--" + flag + (eq == std::string::npos ? "" : arg.substr(eq));
    }
    kept.push_back(arg);
  }
  std::vector<char*> cargv;
  for (auto& s : kept) cargv.push_back(s.data());
  std::vector<char*> rest = absl::ParseCommandLine(static_cast<int>(cargv.size()), cargv.data());
  Args positional(rest.begin() + 1, rest.end());
  return command.run(positional, overrides);
}

}  // namespace
}  // namespace sparseflash

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("GPT training with sparse flash attention; see sparseflash --help");
  try {
    return sparseflash::dispatch(argc, argv);
  } catch (const std::exception& e) {
    // LibTorch reports bad shapes, devices and out-of-memory as exceptions.
    std::string what = e.what();
    std::cerr << "sparseflash: error: " << what.substr(0, what.find("\nException raised from"))
              << "\n";
    return 1;
  }
}
