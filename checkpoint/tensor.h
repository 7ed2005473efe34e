// Tensor descriptors shared by the checkpoint readers, and conversion of
// every supported storage type to float32 (GGML block quantisations included).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace sparseflash::checkpoint {

// Storage types. The quantised ones are GGML's block formats (ggml-common.h):
//   Q8_0: 32 values = fp16 scale d, int8 q[32];             x = d * q
//   Q4_0: 32 values = fp16 d, uint8 qs[16];                 x = d * (nibble - 8)
//   Q4_1: 32 values = fp16 d, fp16 m, uint8 qs[16];         x = d * nibble + m
//   Q5_0: 32 values = fp16 d, uint32 qh, uint8 qs[16];      x = d * ((nibble | bit5 << 4) - 16)
//   Q5_1: 32 values = fp16 d, fp16 m, uint32 qh, uint8 qs[16]; x = d * (nibble | bit5 << 4) + m
// with value j < 16 in the low nibble of qs[j] and value j + 16 in its high
// nibble; bit5 of value j is bit j of qh.
// The K-quants hold 256 values in 16 or 8 sub-blocks with their own scales
// (and minimums), quantised against one fp16 (Q8_K: float32) super-scale:
//   Q2_K (84 B):  scales[16] (4-bit scale | 4-bit min), qs[64] (2 bits), d, dmin
//   Q3_K (110 B): hmask[32] (3rd bit), qs[64] (2 bits), scales[12] (16 6-bit), d
//   Q4_K (144 B): d, dmin, scales[12] (8 6-bit scales + 8 6-bit mins), qs[128]
//   Q5_K (176 B): d, dmin, scales[12], qh[32] (5th bit), qs[128]
//   Q6_K (210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], d
//   Q8_K (292 B): float32 d, int8 qs[256], int16 bsums[16]
// (checkpoint/tensor.cc spells out the bit layouts.) The integer and F64
// types exist so safetensors files holding buffers of those types still open.
enum class DType {
  kF32, kF16, kBF16, kQ8_0, kQ4_0, kQ4_1, kQ5_0, kQ5_1,
  kQ2_K, kQ3_K, kQ4_K, kQ5_K, kQ6_K, kQ8_K,
  kF64, kI64, kI32, kI16, kI8, kU8, kBool,
};

const char* dtype_name(DType dtype);
// Values per block (1 for the plain types) and bytes per block.
int64_t dtype_block_size(DType dtype);
int64_t dtype_block_bytes(DType dtype);
bool dtype_is_quantized(DType dtype);
// Bytes that `numel` values of `dtype` occupy, or -1 when numel is not a whole
// number of blocks or the size overflows int64.
int64_t dtype_nbytes(DType dtype, int64_t numel);

struct TensorInfo {
  std::string name;              // as stored in the file
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;    // row-major, outermost first (PyTorch order; GGUF's ne reversed)
  const uint8_t* data = nullptr; // points into the mapped file; bounds-checked at open
  size_t nbytes = 0;
  int64_t numel() const;
};

// Product of the dimensions, or -1 when one is negative or the product
// overflows int64.
int64_t shape_numel(const std::vector<int64_t>& shape);
std::string shape_string(const std::vector<int64_t>& shape);  // "[2, 3]"

// Converts or dequantises all numel() values of t into out. Throws
// std::runtime_error naming the tensor when nbytes does not match the shape.
void to_float32(const TensorInfo& t, float* out);
std::vector<float> to_float32(const TensorInfo& t);

// The inverse for the types we write: n float32 values stored as `dtype`
// (F32, F16, BF16 or Q8_0) into dtype_nbytes(dtype, n) bytes at out. F16 and
// BF16 round to nearest even. Throws std::invalid_argument for other types
// and for Q8_0 when n is not a multiple of 32.
void from_float32(const float* x, int64_t n, DType dtype, uint8_t* out);

// Q8_0 as llama.cpp's reference quantiser (quantize_row_q8_0_ref) and the
// gguf package compute it, bit for bit: per block of 32, d = max|x| / 127 in
// float32, q = round(x * (1 / d)) with halves rounded away from zero, d
// stored as fp16 (rounded after q is computed); a block of zeros has d = 0
// and q = 0.
void quantize_q8_0(const float* x, int64_t n, uint8_t* out);

// IEEE half and bfloat16 to float (exact).
float half_to_float(uint16_t h);
float bf16_to_float(uint16_t b);
uint16_t float_to_bf16(float f);  // round to nearest even (NaN stays NaN)
uint16_t float_to_half(float f);  // round to nearest even

}  // namespace sparseflash::checkpoint
