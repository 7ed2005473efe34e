// Hostile and truncated checkpoint files: safetensors, GGUF, llama2.c and the
// Llama loader fail with errors that name the file and the field.
#include "tests/checkpoint_test_util.h"

namespace sparseflash::checkpoint {
namespace {

// --- Corruption: safetensors ------------------------------------------------------


std::string st_bytes(const std::string& header, const std::string& data) {
  std::string out;
  append<uint64_t>(&out, header.size());
  return out + header + data;
}

// Every proper prefix of `bytes` shorter than `must_fail_below` fails with an
// error naming `name`; none crashes.
void expect_prefixes_fail(const std::string& name, const std::string& bytes, size_t must_fail_below,
                          const std::function<absl::Status(std::shared_ptr<const MappedFile>)>& parse) {
  size_t checked = 0;
  for (size_t n = 0; n < must_fail_below; n += (n < 512 ? 1 : 13)) {
    const absl::Status status = parse(mem(name, bytes.substr(0, n)));
    if (status.ok()) {
      ADD_FAILURE() << "prefix of " << n << " bytes parsed";
    } else {
      EXPECT_EQ(std::string(status.message()).rfind(name + ": ", 0), 0u) << status.message();
    }
    ++checked;
  }
  EXPECT_GT(checked, 100u);
}

TEST(SafetensorsCorrupt, EveryTruncationFails) {
  std::string dir = make_temp_dir();
  std::vector<float> a = random_floats(12, std::random_device{}());
  std::vector<uint16_t> b(5, 0x3c00);
  must(write_safetensors(dir + "/t.safetensors",
                    {{"a", DType::kF32, {3, 4}, a.data(), 48}, {"b", DType::kF16, {5}, b.data(), 10}},
                    {{"k", "v"}}));
  std::string bytes = read_file(dir + "/t.safetensors");
  expect_prefixes_fail("t.safetensors", bytes, bytes.size(),
                       [](auto f) { return SafetensorsFile::parse(f).status(); });
}

TEST(SafetensorsCorrupt, HostileHeadersNameTheField) {
  std::string data(64, '\x11');
  auto parse = [](const std::string& bytes) { return SafetensorsFile::parse(mem("bad.safetensors", bytes)).status(); };
  auto tensor = [](const std::string& body) { return "{\"w\": " + body + "}"; };
  std::string huge;
  append<uint64_t>(&huge, uint64_t{1} << 63);
  expect_error([&] { return parse(huge); }, {"bad.safetensors", "header length", "exceeds"});
  expect_error([&] { return parse(""); }, {"bad.safetensors", "header length", "truncated"});
  std::string short_header;
  append<uint64_t>(&short_header, 1000);
  expect_error([&] { return parse(short_header + "{}"); }, {"bad.safetensors", "header", "truncated"});
  expect_error([&] { return parse(st_bytes("{not json", data)); }, {"header", "invalid JSON"});
  expect_error([&] { return parse(st_bytes("{\"w\xff\xfe\": 1}", data)); }, {"header", "invalid JSON"});
  expect_error([&] { return parse(st_bytes("[1, 2]", data)); }, {"header", "expected a JSON object"});
  expect_error([&] { return parse(st_bytes(tensor("7"), data)); }, {"tensor 'w'", "expected an object"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"shape": [2], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.dtype", "missing"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]})"), data)); },
               {"tensor 'w'.dtype", "unsupported dtype 'F8_E4M3'"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": 3, "shape": [2], "data_offsets": [0, 2]})"), data)); },
               {"tensor 'w'.dtype", "expected a string"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape[0]", "negative"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape[0]", "non-negative integer"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": {}, "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape", "expected an array"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]})"), data)); },
               {"tensor 'w'.data_offsets", "needs 24 bytes but the range holds 20"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [4611686018427387904, 4], "data_offsets": [0, 8]})"), data)); },
               {"tensor 'w'.shape", "overflows"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [20], "data_offsets": [0, 80]})"), data)); },
               {"tensor 'w'.data_offsets", "runs past the data section of 64 bytes"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [1], "data_offsets": [18446744073709551615, 4]})"), data)); },
               {"tensor 'w'.data_offsets[0]", "too large"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [0], "data_offsets": [8, 4]})"), data)); },
               {"tensor 'w'.data_offsets", "before begin"});
  expect_error([&] { return parse(st_bytes(tensor(R"({"dtype": "F32", "shape": [2], "data_offsets": [0]})"), data)); },
               {"tensor 'w'.data_offsets", "expected [begin, end]"});
  expect_error([&] {
    return parse(st_bytes(R"({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                       "v": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}})", data));
  }, {"bad.safetensors", "overlaps tensor", "[12, 20)"});
  expect_error([&] { return parse(st_bytes(R"({"__metadata__": {"k": 5}})", data)); }, {"__metadata__.k", "expected a string"});
  expect_error([&] { return parse(st_bytes(R"({"__metadata__": [1]})", data)); }, {"__metadata__", "expected an object"});
  // Empty tensors may share an offset; a valid header with them parses.
  auto ok = must(SafetensorsFile::parse(mem("ok.safetensors", st_bytes(
      R"({"w": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
          "v": {"dtype": "U8", "shape": [64], "data_offsets": [0, 64]}})", data))));
  EXPECT_EQ(ok->tensors().size(), 2u);
}

TEST(SafetensorsCorrupt, BrokenShardIndexes) {
  std::string dir = make_temp_dir();
  std::vector<float> a(4, 0.25f);
  must(write_safetensors(dir + "/s1.safetensors", {{"a", DType::kF32, {4}, a.data(), 16}}, {}));
  must(write_safetensors(dir + "/s2.safetensors", {{"a", DType::kF32, {4}, a.data(), 16}}, {}));
  auto open_index = [&](const std::string& text) {
    write_file(dir + "/model.safetensors.index.json", text);
    return SafetensorsModel::open(dir).status();
  };
  expect_error([&] { return open_index("{\"weight_map\": "); }, {"model.safetensors.index.json", "invalid JSON"});
  expect_error([&] { return open_index("{}"); }, {"model.safetensors.index.json", "weight_map"});
  expect_error([&] { return open_index(R"({"weight_map": {"a": "../s1.safetensors"}})"); }, {"weight_map.a", "not a plain file name"});
  expect_error([&] { return open_index(R"({"weight_map": {"a": 3}})"); }, {"weight_map.a", "expected a file name"});
  expect_error([&] { return open_index(R"({"weight_map": {"b": "s1.safetensors"}})"); }, {"weight_map.b", "not in shard s1.safetensors"});
  expect_error([&] { return open_index(R"({"weight_map": {"a": "missing.safetensors"}})"); }, {"missing.safetensors", "cannot open"});
  expect_error([&] { return open_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})"); },
               {"s2.safetensors", "tensor 'a'", "another shard"});
  expect_error([&] { return open_index(R"({"weight_map": {}})"); }, {"weight_map", "lists no tensors"});
  std::string empty_dir = make_temp_dir();
  expect_error([&] { return SafetensorsModel::open(empty_dir); }, {empty_dir, "neither model.safetensors"});
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
  auto g = must(GgufFile::parse(file));  // the whole file is valid
  size_t end = 0;
  for (const TensorInfo& t : g->tensors()) end = std::max(end, static_cast<size_t>(t.data - file->data()) + t.nbytes);
  ASSERT_EQ(end, bytes.size());
  expect_prefixes_fail("t.gguf", bytes, bytes.size(), [](auto f) { return GgufFile::parse(f).status(); });
}

TEST(GgufCorrupt, HostileHeadersNameTheField) {
  auto parse = [](const std::string& bytes) { return GgufFile::parse(mem("bad.gguf", bytes)).status(); };
  using B = GgufBuilder;
  std::string good = valid_gguf(1);
  std::string bad = good;
  bad[3] = 'X';
  expect_error([&] { return parse(bad); }, {"bad.gguf", "magic", "GGUX"});
  expect_error([&] { return parse(B(1).bytes()); }, {"bad.gguf", "version", "v1"});
  expect_error([&] { return parse(B(0x03000000).bytes()); }, {"version", "big-endian"});
  expect_error([&] { return parse(B(7).bytes()); }, {"version", "unsupported version 7"});
  auto header = [](uint64_t tensors, uint64_t kvs) {
    return "GGUF" + B::encode<uint32_t>(3) + B::encode(tensors) + B::encode(kvs);
  };
  expect_error([&] { return parse(header(uint64_t{1} << 60, 0)); }, {"tensor count", "cannot fit"});
  expect_error([&] { return parse(header(0, ~uint64_t{0})); }, {"metadata count", "cannot fit"});
  expect_error([&] { return parse(header(0, 1) + B::encode<uint64_t>(1ull << 62) + std::string(20, 'k')); },
               {"metadata key #0", "truncated"});
  {
    B b;
    b.add_raw_kv("k", 13, "");
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'k' type", "unknown value type 13"});
  }
  {
    B b;
    b.add_raw_kv("s", 8, B::encode<uint64_t>(1ull << 40) + "abc");
    expect_error([&] { return parse(b.bytes()); }, {"metadata 's'", "truncated"});
  }
  {
    B b;
    b.add_raw_kv("arr", 9, B::encode<uint32_t>(4) + B::encode<uint64_t>(1ull << 60) + "abcd");
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'arr' count", "cannot fit"});
  }
  {
    B b;
    b.add_raw_kv("arr", 9, B::encode<uint32_t>(99) + B::encode<uint64_t>(1));
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'arr' element type", "unknown value type 99"});
  }
  {
    std::string nested = B::encode<uint32_t>(4) + B::encode<uint64_t>(1) + B::encode<uint32_t>(7);
    for (int i = 0; i < 9; ++i) nested = B::encode<uint32_t>(9) + B::encode<uint64_t>(1) + nested;
    B b;
    b.add_raw_kv("deep", 9, nested);
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'deep'", "nested deeper than 8"});
  }
  {
    B b;
    b.add_raw_kv("flag", 7, B::encode<uint8_t>(2));
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'flag'", "bool value 2"});
  }
  {
    B b;
    b.add_u32("k", 1);
    b.add_u32("k", 2);
    expect_error([&] { return parse(b.bytes()); }, {"metadata 'k'", "duplicate key"});
  }
  {
    B b;
    b.add_u32("general.alignment", 24);
    expect_error([&] { return parse(b.bytes()); }, {"general.alignment", "power of two"});
    B c;
    c.add_string("general.alignment", "32");
    expect_error([&] { return parse(c.bytes()); }, {"general.alignment", "expected an integer"});
  }
  auto with_tensor = [](const std::vector<uint64_t>& ne, uint32_t type, uint64_t offset, size_t data) {
    B b;
    b.add_tensor_info("w", ne, type, offset);
    b.append_data(std::string(data, '\x01'));
    return b.bytes();
  };
  expect_error([&] { return parse(with_tensor({1, 1, 1, 1, 1}, 0, 0, 64)); }, {"tensor 'w' n_dims", "5 exceeds 4"});
  expect_error([&] { return parse(with_tensor({1ull << 63}, 0, 0, 64)); }, {"tensor 'w' ne[0]", "too large"});
  expect_error([&] { return parse(with_tensor({1ull << 40, 1ull << 40}, 0, 0, 64)); }, {"tensor 'w' ne", "overflows"});
  // K-quants are read; the IQ types are refused by name.
  expect_error([&] { return parse(with_tensor({256}, 16, 0, 64)); }, {"tensor 'w' type", "IQ2_XXS"});
  expect_error([&] { return parse(with_tensor({256}, 23, 0, 64)); }, {"tensor 'w' type", "IQ4_XS"});
  expect_error([&] { return parse(with_tensor({128}, 12, 0, 64)); }, {"tensor 'w' ne[0]", "block size 256"});
  expect_error([&] { return parse(with_tensor({256}, 12, 0, 64)); }, {"tensor 'w' offset", "runs past"});
  expect_error([&] { return parse(with_tensor({256}, 200, 0, 64)); }, {"tensor 'w' type", "ggml type 200"});
  expect_error([&] { return parse(with_tensor({16}, 8, 0, 64)); }, {"tensor 'w' ne[0]", "block size 32"});
  expect_error([&] { return parse(with_tensor({4}, 0, 8, 64)); }, {"tensor 'w' offset", "not a multiple of the alignment 32"});
  expect_error([&] { return parse(with_tensor({17}, 0, 0, 64)); }, {"bad.gguf", "tensor 'w' offset", "runs past the data section of 64"});
  expect_error([&] { return parse(with_tensor({4}, 0, 1ull << 63, 64)); }, {"tensor 'w' offset", "runs past"});
  {
    B b;
    b.add_tensor_info("w", {16}, 0, 0);
    b.add_tensor_info("v", {16}, 0, 32);
    b.append_data(std::string(96, '\x02'));
    expect_error([&] { return parse(b.bytes()); }, {"overlaps tensor 'w'"});
    B c;
    c.add_tensor_info("w", {4}, 0, 0);
    c.add_tensor_info("w", {4}, 0, 32);
    c.append_data(std::string(64, '\x02'));
    expect_error([&] { return parse(c.bytes()); }, {"tensor 'w'", "duplicate tensor name"});
  }
}

// --- Corruption: llama2.c and the Llama loader ---------------------------------------------

TEST(Llama2cCorrupt, EveryTruncationAndHostileHeaderFails) {
  uint32_t seed = std::random_device{}();
  for (int version : {0, 1}) {
    LlamaConfig c = tiny_config(version == 0);
    std::string bytes = must(llama2c_bytes(c, version, random_llama(c, seed)));
    std::string name = "m" + std::to_string(version) + ".bin";
    must(parse_llama2c(mem(name, bytes)));
    expect_prefixes_fail(name, bytes, bytes.size(), [](auto f) { return parse_llama2c(f).status(); });
    expect_error([&] { return parse_llama2c(mem(name, bytes + "x")); }, {name, "file size", "implies " + std::to_string(bytes.size())});
  }
  auto legacy = [](std::vector<int32_t> p, size_t extra) {
    std::string s;
    for (int32_t v : p) append(&s, v);
    return s + std::string(extra, '\0');
  };
  auto parse = [](const std::string& bytes) { return parse_llama2c(mem("bad.bin", bytes)).status(); };
  expect_error([&] { return parse(legacy({0, 8, 1, 2, 2, 10, 4}, 64)); }, {"bad.bin", "dim", "positive"});
  expect_error([&] { return parse(legacy({8, 8, 1, 3, 3, 10, 4}, 64)); }, {"n_heads", "does not divide dim 8"});
  expect_error([&] { return parse(legacy({8, 8, 1, 2, 4, 10, 4}, 64)); }, {"n_kv_heads", "exceeds n_heads"});
  expect_error([&] { return parse(legacy({8, 8, 1, 4, 3, 10, 4}, 64)); }, {"num_key_value_heads", "does not divide"});
  expect_error([&] { return parse(legacy({8, 8, 1, 8, 8, 10, 4}, 64)); }, {"head_dim", "even"});
  expect_error([&] { return parse(legacy({8, 8, 1, 2, 2, INT32_MIN, 4}, 64)); }, {"vocab_size"});
  expect_error([&] { return parse(legacy({INT32_MAX - 1, 8, 1, 2, 2, 10, 4}, 64)); }, {"hidden_size", "exceeds the limit"});
  expect_error([&] { return parse(legacy({1 << 24, 1 << 24, 1 << 24, 2, 2, 1 << 24, 1 << 24}, 64)); }, {"bad.bin"});
  expect_error([&] { return parse(legacy({8, 8, 1, 2, 2, 10, 4}, 64)); }, {"file size", "legacy format"});
  expect_error([&] { return parse("\x01\x02"); }, {"bad.bin", "dim", "truncated"});
  std::string v1 = "24ka";
  append<int32_t>(&v1, 2);
  expect_error([&] { return parse(v1); }, {"version", "int8"});
  std::string v1b = "24ka";
  append<int32_t>(&v1b, 1);
  for (int32_t v : {8, 8, 1, 2, 2, 10, 4}) append(&v1b, v);
  v1b.push_back(5);
  expect_error([&] { return parse(v1b + std::string(300, '\0')); }, {"shared_classifier", "0 or 1"});
  v1b.back() = 1;
  expect_error([&] { return parse(v1b + std::string(100, '\0')); }, {"header padding", "truncated"});
  expect_error([&] { return parse(v1b + std::string(300, '\0')); }, {"file size", "version 1"});
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
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  expect_error([&] { return load_llama_checkpoint(hf); }, {hf, "tensor 'model.embed_tokens.weight'", "does not match the config's [37, 24]"});
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
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  expect_error([&] { return load_llama_checkpoint(hf); }, {hf, "tensor 'model.norm.weight'", "missing"});
  // Integer tensors are not weights.
  std::vector<int32_t> ints(24, 1);
  to_write.push_back({"model.norm.weight", DType::kI32, {24}, ints.data(), 96});
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  expect_error([&] { return load_llama_checkpoint(hf); }, {"tensor 'model.norm.weight'", "I32 is not F32/F16/BF16"});
  // Native marker with an unknown version.
  to_write.pop_back();
  std::vector<float> norm(24, 1.0f);
  to_write.push_back({"model.norm.weight", DType::kF32, {24}, norm.data(), 96});
  must(write_safetensors(hf + "/model.safetensors", to_write, {{kNativeFormatKey, "llama-v9"}}));
  expect_error([&] { return load_llama_checkpoint(hf); }, {"model.safetensors", "sparseflash_format", "llama-v9"});
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  EXPECT_EQ(must(load_llama_checkpoint(hf)).format, SourceFormat::kHfSafetensors);
  // A tensor the config does not account for (a bias, a layer too many).
  to_write.push_back({"model.layers.3.self_attn.q_proj.weight", DType::kF32, {24}, norm.data(), 96});
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  expect_error([&] { return load_llama_checkpoint(hf); }, {hf, "tensor 'model.layers.3.self_attn.q_proj.weight'", "not part of"});
  to_write.pop_back();
  expect_error([&] { return write_safetensors(hf + "/x.safetensors", to_write, {{"k", "\xff"}}); },
               {"x.safetensors", "header", "cannot encode"});
  must(write_safetensors(hf + "/model.safetensors", to_write, {}));
  // config.json problems.
  write_file(hf + "/config.json", "\xff\xfe garbage");
  expect_error([&] { return load_llama_checkpoint(hf); }, {hf + "/config.json", "invalid JSON"});
  std::remove((hf + "/config.json").c_str());
  expect_error([&] { return load_llama_checkpoint(hf); }, {hf + "/config.json", "cannot open"});
  expect_error([&] { return load_llama_checkpoint(dir + "/nothing.bin"); }, {dir + "/nothing.bin", "cannot open"});

  // GGUF: wrong architecture, missing tensor.
  GgufBuilder g;
  g.add_string("general.architecture", "gpt2");
  std::string gbytes = g.bytes();
  expect_error([&] { return gguf_llama(must(GgufFile::parse(mem("a.gguf", gbytes)))); },
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
  expect_error([&] { return gguf_llama(must(GgufFile::parse(mem("l.gguf", lbytes)))); }, {"l.gguf", "tensor 'output_norm.weight'", "missing"});
  GgufBuilder m;
  m.add_string("general.architecture", "llama");
  std::string mbytes = m.bytes();
  expect_error([&] { return gguf_llama(must(GgufFile::parse(mem("m.gguf", mbytes)))); }, {"m.gguf", "llama.embedding_length", "missing"});
}

}  // namespace
}  // namespace sparseflash::checkpoint
