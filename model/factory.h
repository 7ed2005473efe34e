// Building a causal LM (model/causal_lm.h) from an experiment config, from
// scratch or from a pretrained file (model.init_from): the one place that
// knows the concrete model classes. Errors are absl::Status naming the field
// or file at fault.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/llama.h"
#include "configs/experiment.pb.h"
#include "model/causal_lm.h"

namespace sparseflash::model {

// For resolve_config (configs/config.h): when model.init_from is set, reads
// the file's architecture into exp->model (arch, depth, widths, heads,
// vocabulary, RoPE, norms, tied head). A field the config gives must agree
// with the file, except block_size and rope_scaling, which the config may
// change (a longer context), and lora, which is the new run's own (a LoRA
// run's adapters are merged into its weights by load_pretrained); the error
// lists each disagreement. A Llama-family
// file sets model.arch to LLAMA unless the config says GPT (an error).
absl::Status complete_from_pretrained(config::Experiment* exp);

// The model exp describes, initialised at random from train.seed (GPT-2's
// initialisation; Llama: N(0, init_std) matrices, unit norms), float32 on the
// CPU, with model.lora's adapters (the rest frozen) and
// train.activation_checkpointing set. data_vocab_size stands for
// model.vocab_size when that is 0. With model.init_from, the weights then
// come from the file (load_pretrained).
absl::StatusOr<CausalLM> build_model(const config::Experiment& exp, int64_t data_vocab_size = 0);

// Copies the weights of exp.model.init_from into `model` (built by
// build_model from the completed config): every weight must be found with
// its shape, and none be left over.
absl::Status load_pretrained(const config::Experiment& exp, CausalLM& model);

// The Llama configuration of a LLAMA config::Model, and the reverse.
checkpoint::LlamaConfig llama_config(const config::Model& m);
void set_llama_fields(const checkpoint::LlamaConfig& c, config::Model* m);

// True when `path` is a checkpoint of ours (a ckpt.pt, or a directory holding one).
bool is_training_checkpoint(const std::string& path);

}  // namespace sparseflash::model
