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

}  // namespace
}  // namespace sparseflash::checkpoint
