// The torch-free half of a SAAP index file (layout in saap/index.h): the
// header's checks, the tensors a header implies with their shapes, and the
// reader that checks a parsed file's metadata, header, tensor names, dtypes,
// shapes and values. read_saap_index (saap/index.h) turns what it reads into
// tensors; fuzz/fuzz_saap_index.cc runs it on hostile bytes without LibTorch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/safetensors.h"
#include "saap/saap_index.pb.h"

namespace sparseflash::saap {

constexpr const char* kSaapFormatKey = "sparseflash_format";
constexpr const char* kSaapFormatValue = "saap-v1";
constexpr const char* kSaapHeaderKey = "saap_header";
constexpr int kSaapFormatVersion = 1;

// Positive counts, query heads a multiple of KV heads, version, budget grid and
// recency edges ascending. `where` starts each message.
absl::Status validate_saap_header(const SaapHeader& h, const std::string& where);

// The suffixes of the tensors every layer holds under `h` ("centroids",
// "classifier.w1", ... "budget.keys", "recency"), in file order.
std::vector<std::string> saap_tensor_suffixes(const SaapHeader& h);

// "layers.{layer}.{suffix}".
std::string saap_tensor_name(size_t layer, const std::string& suffix);

// The shape the tensor `suffix` must have under `h`.
std::vector<int64_t> saap_tensor_shape(const SaapHeader& h, const std::string& suffix);

// Where read_saap_file converts a tensor's values to: a buffer of shape's
// product floats, owned by the caller.
using SaapTensorBuffer =
    std::function<float*(size_t layer, const std::string& suffix, const std::vector<int64_t>& shape)>;

// Checks `file` (named `path` in messages) as a SAAP index: the metadata's format
// and base64 header, the header, exactly the tensors the header implies (F32, the
// shapes above), their values finite, classifier.in_std positive and budget curves
// non-negative. Values are converted into the buffers `buffer` gives. Errors are
// InvalidArgument naming the path and the field or tensor at fault.
absl::StatusOr<SaapHeader> read_saap_file(const checkpoint::SafetensorsFile& file,
                                          const std::string& path, const SaapTensorBuffer& buffer);

}  // namespace sparseflash::saap
