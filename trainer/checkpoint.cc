// Training checkpoints. A checkpoint is one LibTorch archive holding:
//   format, config (text), tokenizer, state/step, state/tokens, state/train_seconds,
//   model/<parameter name>, optim/<parameter name>/{exp_avg,exp_avg_sq,step},
//   rng/attention, rng/cpu.
#include "trainer/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <caffe2/serialize/inline_container.h>
#include <google/protobuf/text_format.h>
#include <torch/serialize/archive.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "io/atomic_file.h"
#include "configs/config.h"

namespace sparseflash::trainer {

namespace fs = std::filesystem;

std::string checkpoint_path(const std::string& file_or_dir) {
  std::error_code ec;
  if (fs::is_directory(file_or_dir, ec)) return (fs::path(file_or_dir) / "ckpt.pt").string();
  return file_or_dir;
}

absl::Status save_checkpoint(const std::string& path, const config::Experiment& exp,
                             const std::string& tokenizer, model::CausalLM model,
                             const Optimizer* optimizer, const TrainState& state) {
  // What a failed write leaves: the previous checkpoint, untouched.
  auto failed = [&](const std::string& why) {
    std::error_code ec;
    return absl::InternalError(absl::StrCat(
        "cannot write checkpoint ", path, ": ", why, "; ",
        fs::exists(path, ec) ? absl::StrCat(path, " still holds the previous checkpoint")
                             : std::string("no checkpoint was written"),
        " (free space and rerun the same command to resume from it)"));
  };
  // A temporary left by a killed run would hold as much space as this one needs.
  io::AtomicFile::remove_stale_temporaries(path);
  try {
    io::AtomicFile file(path);
    torch::serialize::OutputArchive archive;
    archive.write("format", c10::IValue(kCheckpointFormat));
    archive.write("config", c10::IValue(config_to_text(exp)));
    archive.write("tokenizer", c10::IValue(tokenizer));
    archive.write("state/step", c10::IValue(state.step));
    archive.write("state/tokens", c10::IValue(state.tokens));
    archive.write("state/train_seconds", c10::IValue(state.train_seconds));
    for (const auto& item : model->named_parameters())
      archive.write("model/" + item.key(), item.value().detach().cpu());
    if (optimizer) optimizer->save(archive);
    archive.write("rng/attention", model->attention_generator().get_state(), true);
    archive.write("rng/cpu", at::detail::getDefaultCPUGenerator().get_state(), true);
    // LibTorch's zip writer must not see a failed write: it throws, and its
    // destructor then finishes the archive, throws again and terminates the
    // process. So the first error is kept and the rest of the bytes dropped.
    std::string write_error;
    archive.save_to([&](const void* data, size_t n) -> size_t {
      if (write_error.empty()) {
        try {
          file.write(data, n);
        } catch (const std::exception& e) {
          write_error = e.what();
        }
      }
      return n;
    });
    if (!write_error.empty()) return failed(write_error);  // ~AtomicFile removes the temporary
    file.commit();
  } catch (const std::exception& e) {
    return failed(e.what());
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// checking an archive before LibTorch unpickles it
//
// LibTorch's Unpickler trusts the numbers in a pickle: BINPUT / LONG_BINPUT
// grow its memo table to whatever index they name (one 5-byte opcode: up to
// 2^32 IValues, 64 GB, zeroed), and BINUNICODE lengths size a string before
// its bytes are read. A corrupt checkpoint must not get an OOM kill for an
// answer, so every pickle record of the archive (data.pkl, constants.pkl,
// code/*.debug_pkl) is first walked here, opcode by opcode, building nothing.
// The walk accepts exactly the opcodes LibTorch's unpickler reads (protocol 2,
// as its pickler writes them; torch/csrc/jit/serialization/pickler.h) and
// refuses only what LibTorch would also refuse or mishandle.

namespace {

// The opcodes torch::jit::Unpickler reads; any other byte it rejects.
enum PickleOp : uint8_t {
  kMark = '(', kStop = '.', kBinFloat = 'G', kBinInt = 'J', kBinInt1 = 'K', kBinInt2 = 'M',
  kNone = 'N', kBinPersId = 'Q', kReduce = 'R', kBinUnicode = 'X', kEmptyList = ']',
  kAppend = 'a', kBuild = 'b', kGlobal = 'c', kDict = 'd', kAppends = 'e', kBinGet = 'h',
  kLongBinGet = 'j', kList = 'l', kBinPut = 'q', kLongBinPut = 'r', kSetItem = 's',
  kTuple = 't', kSetItems = 'u', kEmptyTuple = ')', kEmptyDict = '}', kProto = 0x80,
  kNewObj = 0x81, kTuple1 = 0x85, kTuple2 = 0x86, kTuple3 = 0x87, kNewTrue = 0x88,
  kNewFalse = 0x89, kLong1 = 0x8a, kBinUnicode8 = 0x8d,
};

// Walks one pickle; returns what is wrong with it ("" if nothing). Besides the
// bytes it tracks only the stack depth and the MARK positions, which is enough
// to see the counts LibTorch indexes its stack with without checking (a DICT
// of an odd count, a MARK above the stack reads past its end). Every global
// LibTorch resolves pushes one value and every REDUCE / BUILD leaves one.
std::string check_pickle(const uint8_t* p, size_t n) {
  if (n < 2 || p[0] != kProto || p[1] != 2)
    return "does not start with PROTO 2 (LibTorch reads pickle protocol 2 only)";
  size_t pos = 2, opcodes = 1, depth = 0, memo_size = 0;
  std::vector<size_t> marks;
  while (pos < n) {
    const size_t at = pos;
    const uint8_t op = p[pos++];
    ++opcodes;
    auto fail = [&](const std::string& why) {
      return absl::StrFormat("opcode 0x%02x at byte %d: %s", op, at, why);
    };
    auto operand = [&](size_t bytes, uint64_t* value) {  // little-endian, false if truncated
      if (n - pos < bytes) return false;
      *value = 0;
      for (size_t i = 0; i < bytes; ++i) *value |= uint64_t{p[pos + i]} << (8 * i);
      pos += bytes;
      return true;
    };
    auto take_mark = [&](size_t* mark) {  // false if there is none, or it lies above the stack
      if (marks.empty() || marks.back() > depth) return false;
      *mark = marks.back();
      marks.pop_back();
      return true;
    };
    uint64_t v = 0;
    size_t mark = 0;
    switch (op) {
      case kStop:
        return "";
      case kMark:
        marks.push_back(depth);
        break;
      case kNone: case kNewTrue: case kNewFalse: case kEmptyTuple: case kEmptyList:
      case kEmptyDict:
        ++depth;
        break;
      case kBinInt1: case kBinInt2: case kBinInt: case kBinFloat: {
        const size_t bytes = op == kBinInt1 ? 1 : op == kBinInt2 ? 2 : op == kBinInt ? 4 : 8;
        if (!operand(bytes, &v)) return fail("truncated operand");
        ++depth;
        break;
      }
      case kLong1:  // LibTorch reads only 8-byte LONG1s
        if (!operand(1, &v) || v != 8 || !operand(8, &v))
          return fail("LONG1 is truncated or not 8 bytes long");
        ++depth;
        break;
      case kBinUnicode: case kBinUnicode8:  // a length, then that many bytes
        if (!operand(op == kBinUnicode ? 4 : 8, &v)) return fail("truncated length");
        if (v > n - pos)
          return fail(absl::StrCat("string of ", v, " bytes, but only ", n - pos, " remain"));
        pos += v;
        ++depth;
        break;
      case kGlobal:  // "module\nname\n"
        for (int line = 0; line < 2; ++line) {
          const void* nl = std::memchr(p + pos, '\n', n - pos);
          if (!nl) return fail("GLOBAL name runs past the end");
          pos = static_cast<const uint8_t*>(nl) - p + 1;
        }
        ++depth;
        break;
      case kBinPut: case kLongBinPut:
        // A pickler numbers its memo entries 0, 1, 2, ... as it writes them,
        // so no index can exceed the opcodes before it; LibTorch would
        // allocate the table up to any index it is given.
        if (!operand(op == kBinPut ? 1 : 4, &v)) return fail("truncated memo index");
        if (v > opcodes)
          return fail(absl::StrCat("memo index ", v, " after only ", opcodes, " opcodes"));
        if (depth == 0) return fail("memo store from an empty stack");
        memo_size = std::max<size_t>(memo_size, v + 1);
        break;
      case kBinGet: case kLongBinGet:
        if (!operand(op == kBinGet ? 1 : 4, &v)) return fail("truncated memo index");
        if (v >= memo_size)
          return fail(absl::StrCat("memo index ", v, " was never stored (", memo_size, " were)"));
        ++depth;
        break;
      case kTuple: case kList: case kDict: case kAppends: case kSetItems: {
        // Everything above the last MARK goes into a new container (TUPLE,
        // LIST, DICT) or the one just below the MARK (APPENDS, SETITEMS).
        if (!take_mark(&mark)) return fail("no MARK below it on the stack");
        const bool pairs = op == kDict || op == kSetItems, into_existing = op == kAppends || op == kSetItems;
        if (pairs && (depth - mark) % 2 != 0) return fail("a key without a value");
        if (into_existing && mark == 0) return fail("nothing to add to");
        depth = into_existing ? mark : mark + 1;
        break;
      }
      case kTuple1: case kTuple2: case kTuple3: {
        const size_t k = op - kTuple1 + 1;
        if (depth < k) return fail("too few values on the stack");
        depth -= k - 1;
        break;
      }
      case kAppend: case kSetItem: case kReduce: case kBuild: case kNewObj: case kBinPersId: {
        // (values taken, values left): APPEND list x; SETITEM dict k v; REDUCE /
        // BUILD callable arg; NEWOBJ pops its (empty) argument tuple; BINPERSID
        // turns a tuple into a tensor.
        const size_t take = op == kSetItem ? 3 : op == kNewObj || op == kBinPersId ? 1 : 2;
        const size_t leave = op == kNewObj ? 0 : 1;
        if (depth < take) return fail("too few values on the stack");
        depth = depth - take + leave;
        break;
      }
      default:
        return fail("not an opcode LibTorch reads");
    }
  }
  return "ends without STOP (truncated)";
}

// LibTorch reports what it cannot read or use by throwing (not a zip, a bad
// record, an entry of another type, an RNG state of the wrong size): a Status
// naming the file, with the first line of LibTorch's message.
absl::Status thrown(const std::string& path, const std::exception& e) {
  std::string what = e.what();
  return absl::DataLossError(absl::StrCat("checkpoint ", path, " is not a readable sparseflash checkpoint: ",
                                          what.substr(0, what.find('\n'))));
}

// Opens `path` with LibTorch's zip reader and checks every record it would
// read: sizes the file can hold, and pickles check_pickle accepts.
absl::Status check_archive(const std::string& path) {
  std::error_code ec;
  const uintmax_t file_size = fs::file_size(path, ec);
  if (ec) return absl::NotFoundError(absl::StrCat("checkpoint ", path, ": ", ec.message()));
  auto corrupt = [&](const std::string& record, const std::string& why) {
    return absl::DataLossError(absl::StrCat("corrupt checkpoint: ", path, ": record '", record,
                                            "' ", why));
  };
  try {
    caffe2::serialize::PyTorchStreamReader reader(path);
    for (const std::string& name : reader.getAllRecords()) {
      // Records are stored or deflated (code/), and deflate expands at most
      // 1032-fold: a larger size in the zip directory is a lie LibTorch would
      // allocate for before reading.
      const size_t size = reader.getRecordSize(name);
      if (size / 1032 > file_size)
        return corrupt(name, absl::StrCat("claims ", size, " bytes in a file of ", file_size));
      if (name.size() < 3 || name.compare(name.size() - 3, 3, "pkl") != 0) continue;
      auto [data, got] = reader.getRecord(name);
      const std::string why = check_pickle(static_cast<const uint8_t*>(data.get()), got);
      if (!why.empty()) return corrupt(name, why);
    }
  } catch (const std::exception& e) {
    return thrown(path, e);
  }
  return absl::OkStatus();
}

}  // namespace

static absl::Status open_archive(const std::string& path, torch::serialize::InputArchive& archive) {
  std::error_code ec;
  if (!fs::is_regular_file(path, ec))
    return absl::NotFoundError(absl::StrCat("checkpoint ", path, " does not exist"));
  if (auto s = check_archive(path); !s.ok()) return s;
  try {
    archive.load_from(path, c10::Device(c10::kCPU));
  } catch (const std::exception& e) {
    return thrown(path, e);
  }
  return absl::OkStatus();
}

static absl::StatusOr<CheckpointInfo> read_info(const std::string& path) {
  torch::serialize::InputArchive archive;
  if (auto s = open_archive(path, archive); !s.ok()) return s;
  c10::IValue format, text, tokenizer, step, tokens;
  if (!archive.try_read("format", format) || !format.isInt())
    return absl::DataLossError(absl::StrCat("checkpoint ", path,
                                            " has no 'format' entry: not a sparseflash checkpoint"));
  if (format.toInt() != kCheckpointFormat)
    return absl::FailedPreconditionError(absl::StrCat("checkpoint ", path, " has format ",
                                                      format.toInt(), ", this build reads ",
                                                      kCheckpointFormat));
  if (!archive.try_read("config", text) || !text.isString() ||
      !archive.try_read("tokenizer", tokenizer) || !tokenizer.isString() ||
      !archive.try_read("state/step", step) || !archive.try_read("state/tokens", tokens))
    return absl::DataLossError(absl::StrCat("checkpoint ", path,
                                            " lacks config, tokenizer or state entries"));
  auto config = parse_config(text.toStringRef(), path + " (embedded config)");
  if (!config.ok()) return config.status();
  CheckpointInfo info;
  info.config = *std::move(config);
  info.tokenizer = tokenizer.toStringRef();
  info.state.step = step.toInt();
  info.state.tokens = tokens.toInt();
  // Optional: checkpoints written before it was recorded count from zero.
  c10::IValue train_seconds;
  if (archive.try_read("state/train_seconds", train_seconds) && train_seconds.isDouble())
    info.state.train_seconds = train_seconds.toDouble();
  return info;
}

static absl::Status load_into(const std::string& path, model::CausalLM model,
                              Optimizer* optimizer) {
  torch::serialize::InputArchive archive;
  if (auto s = open_archive(path, archive); !s.ok()) return s;
  auto wrap = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat("checkpoint ", path, ": ", s.message()));
  };
  for (auto& item : model->named_parameters())
    if (auto s = read_into(archive, "model/" + item.key(), item.value()); !s.ok()) return wrap(s);
  if (!optimizer) return absl::OkStatus();
  if (auto s = optimizer->load(archive); !s.ok()) return wrap(s);
  Tensor attention_rng, cpu_rng;
  if (!archive.try_read("rng/attention", attention_rng, true) ||
      !archive.try_read("rng/cpu", cpu_rng, true))
    return wrap(absl::DataLossError("RNG state entries are missing"));
  model->attention_generator().set_state(attention_rng);
  at::Generator cpu_generator = at::detail::getDefaultCPUGenerator();
  cpu_generator.set_state(cpu_rng);
  return absl::OkStatus();
}

absl::StatusOr<CheckpointInfo> read_checkpoint_info(const std::string& path) {
  try {
    return read_info(path);
  } catch (const std::exception& e) {
    return thrown(path, e);
  }
}

absl::Status load_checkpoint(const std::string& path, model::CausalLM model,
                             Optimizer* optimizer) {
  try {
    return load_into(path, std::move(model), optimizer);
  } catch (const std::exception& e) {
    return thrown(path, e);
  }
}

}  // namespace sparseflash::trainer
