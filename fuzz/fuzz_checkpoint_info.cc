// libFuzzer target: read_checkpoint_info (trainer/checkpoint.h), the header of our
// training checkpoints: our check of the archive's pickles (trainer/checkpoint.cc
// check_archive), LibTorch's zip reader and unpickler (InputArchive), then the
// "format", "config" (text proto, configs/), "tokenizer" and "state/*" entries. LibTorch is not instrumented, so coverage guides only
// through our code; sanitizers still see what LibTorch does to our memory.
// read_checkpoint_info returns a Status for every bad file: an exception
// escaping it, a sanitizer report or a crash is a bug.
#include <sys/mman.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "trainer/checkpoint.h"

// LibTorch's PyTorchStreamReader leaks miniz's reader state (about 1.3 KB)
// when a file is not a readable zip: its constructor throws after
// mz_zip_reader_init allocated it. Not ours to fix, and harmless for a
// process that reads one checkpoint; everything else leaking is reported.
extern "C" const char* __lsan_default_suppressions() {
  return "leak:mz_zip_reader_init\nleak:mz_zip_reader_read_central_dir\n";
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The reader takes a path: the input goes into one in-memory file per process.
  static const int fd = memfd_create("fuzz_checkpoint_info", 0);
  static const std::string path = "/proc/self/fd/" + std::to_string(fd);
  if (fd < 0 || ftruncate(fd, 0) != 0 ||
      pwrite(fd, data, size, 0) != static_cast<ssize_t>(size))
    __builtin_trap();
  (void)sparseflash::trainer::read_checkpoint_info(path);
  return 0;
}
