// Storage types and their conversion to float32 (and, for the types we write, back).
#include "checkpoint/tensor.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>

namespace sparseflash::checkpoint {

// --- Type table ---------------------------------------------------------------

namespace {

struct TypeTraits {
  const char* name;
  int64_t block_size;
  int64_t block_bytes;
};

TypeTraits traits(DType dtype) {
  switch (dtype) {
    case DType::kF32: return {"F32", 1, 4};
    case DType::kF16: return {"F16", 1, 2};
    case DType::kBF16: return {"BF16", 1, 2};
    case DType::kQ8_0: return {"Q8_0", 32, 2 + 32};
    case DType::kQ4_0: return {"Q4_0", 32, 2 + 16};
    case DType::kQ4_1: return {"Q4_1", 32, 2 + 2 + 16};
    case DType::kQ5_0: return {"Q5_0", 32, 2 + 4 + 16};
    case DType::kQ5_1: return {"Q5_1", 32, 2 + 2 + 4 + 16};
    case DType::kQ2_K: return {"Q2_K", 256, 16 + 64 + 2 + 2};
    case DType::kQ3_K: return {"Q3_K", 256, 32 + 64 + 12 + 2};
    case DType::kQ4_K: return {"Q4_K", 256, 2 + 2 + 12 + 128};
    case DType::kQ5_K: return {"Q5_K", 256, 2 + 2 + 12 + 32 + 128};
    case DType::kQ6_K: return {"Q6_K", 256, 128 + 64 + 16 + 2};
    case DType::kQ8_K: return {"Q8_K", 256, 4 + 256 + 32};
    case DType::kF64: return {"F64", 1, 8};
    case DType::kI64: return {"I64", 1, 8};
    case DType::kI32: return {"I32", 1, 4};
    case DType::kI16: return {"I16", 1, 2};
    case DType::kI8: return {"I8", 1, 1};
    case DType::kU8: return {"U8", 1, 1};
    case DType::kBool: return {"BOOL", 1, 1};
  }
  return {"?", 1, 1};
}

template <typename T>
T load(const uint8_t* p) {
  T value;
  std::memcpy(&value, p, sizeof(T));
  return value;
}

}  // namespace

const char* dtype_name(DType dtype) { return traits(dtype).name; }
int64_t dtype_block_size(DType dtype) { return traits(dtype).block_size; }
int64_t dtype_block_bytes(DType dtype) { return traits(dtype).block_bytes; }
bool dtype_is_quantized(DType dtype) { return traits(dtype).block_size > 1; }

int64_t dtype_nbytes(DType dtype, int64_t numel) {
  TypeTraits t = traits(dtype);
  if (numel < 0 || numel % t.block_size != 0) return -1;
  int64_t blocks = numel / t.block_size;
  if (blocks > std::numeric_limits<int64_t>::max() / t.block_bytes) return -1;
  return blocks * t.block_bytes;
}

int64_t shape_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i > 0) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t TensorInfo::numel() const { return shape_numel(shape); }

// --- Scalar conversions ------------------------------------------------------

float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exponent = (h >> 10) & 0x1f;
  uint32_t mantissa = h & 0x3ff;
  uint32_t bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;
  } else {
    // Subnormal half: mantissa * 2^-24, exact in float.
    float f = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -f : f;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float bf16_to_float(uint16_t b) {
  uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

uint16_t float_to_half(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000);
  uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00;             // nan
  if (abs >= 0x477ff000u) return sign | 0x7c00;            // rounds to inf
  if (abs < 0x38800000u) {                                 // subnormal or zero half
    float a;
    std::memcpy(&a, &abs, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f));  // a / 2^-24
  }
  uint32_t rounded = abs + 0xfff + ((abs >> 13) & 1);
  return sign | static_cast<uint16_t>((rounded - (112u << 23)) >> 13);
}

// --- Encoding float32 ---------------------------------------------------------

void quantize_q8_0(const float* x, int64_t n, uint8_t* out) {
  if (n % 32 != 0)
    throw std::invalid_argument("Q8_0: " + std::to_string(n) + " values are not whole blocks of 32");
  for (int64_t b = 0; b < n / 32; ++b, x += 32, out += 34) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
    const float d = amax / 127;
    const float id = d != 0 ? 1.0f / d : 0.0f;
    const uint16_t d16 = float_to_half(d);
    std::memcpy(out, &d16, 2);
    for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::round(x[j] * id)));
  }
}

void from_float32(const float* x, int64_t n, DType dtype, uint8_t* out) {
  switch (dtype) {
    case DType::kF32: std::memcpy(out, x, static_cast<size_t>(n) * 4); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = float_to_half(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t b = float_to_bf16(x[i]);
        std::memcpy(out + 2 * i, &b, 2);
      }
      return;
    case DType::kQ8_0: quantize_q8_0(x, n, out); return;
    default:
      throw std::invalid_argument(std::string("cannot encode float32 as ") + dtype_name(dtype) +
                                  " (F32, F16, BF16 or Q8_0)");
  }
}

// --- Dequantisation ----------------------------------------------------------

namespace {

constexpr int kBlock = 32;

void dequantize_q8_0(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 34, out += kBlock) {
    float d = half_to_float(load<uint16_t>(p));
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(static_cast<int8_t>(p[2 + j]));
  }
}

void dequantize_q4_0(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 18, out += kBlock) {
    float d = half_to_float(load<uint16_t>(p));
    const uint8_t* qs = p + 2;
    for (int j = 0; j < kBlock / 2; ++j) {
      out[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
      out[j + kBlock / 2] = static_cast<float>((qs[j] >> 4) - 8) * d;
    }
  }
}

void dequantize_q4_1(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 20, out += kBlock) {
    float d = half_to_float(load<uint16_t>(p));
    float m = half_to_float(load<uint16_t>(p + 2));
    const uint8_t* qs = p + 4;
    for (int j = 0; j < kBlock / 2; ++j) {
      out[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
      out[j + kBlock / 2] = static_cast<float>(qs[j] >> 4) * d + m;
    }
  }
}

void dequantize_q5_0(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 22, out += kBlock) {
    float d = half_to_float(load<uint16_t>(p));
    uint32_t qh = load<uint32_t>(p + 2);
    const uint8_t* qs = p + 6;
    for (int j = 0; j < kBlock / 2; ++j) {
      int lo = (qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1) << 4);
      int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
      out[j] = static_cast<float>(lo - 16) * d;
      out[j + kBlock / 2] = static_cast<float>(hi - 16) * d;
    }
  }
}

void dequantize_q5_1(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 24, out += kBlock) {
    float d = half_to_float(load<uint16_t>(p));
    float m = half_to_float(load<uint16_t>(p + 2));
    uint32_t qh = load<uint32_t>(p + 4);
    const uint8_t* qs = p + 8;
    for (int j = 0; j < kBlock / 2; ++j) {
      int lo = (qs[j] & 0x0f) | static_cast<int>(((qh >> j) & 1) << 4);
      int hi = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1) << 4);
      out[j] = static_cast<float>(lo) * d + m;
      out[j + kBlock / 2] = static_cast<float>(hi) * d + m;
    }
  }
}

// --- K-quants: 256 values per super-block ------------------------------------

constexpr int kSuper = 256;

// Q2_K: 16 sub-blocks of 16 values. scales[i]: low nibble the sub-block's
// scale, high nibble its minimum (both times the fp16 d, dmin at the end).
// qs holds 2-bit values: byte l of a 32-byte group carries values l, l + 32,
// l + 64 and l + 96 of its 128-value half in bits 0-1, 2-3, 4-5, 6-7.
// x = d * scale * q - dmin * min.
void dequantize_q2_k(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 84) {
    const uint8_t* scales = p;
    const uint8_t* qs = p + 16;
    const float d = half_to_float(load<uint16_t>(p + 80));
    const float dmin = half_to_float(load<uint16_t>(p + 82));
    int sub = 0;
    for (int half = 0; half < 2; ++half, qs += 32) {
      for (int shift = 0; shift < 8; shift += 2) {
        for (int part = 0; part < 2; ++part, ++sub, out += 16) {
          const float scale = d * static_cast<float>(scales[sub] & 0x0f);
          const float min = dmin * static_cast<float>(scales[sub] >> 4);
          for (int l = 0; l < 16; ++l)
            out[l] = scale * static_cast<float>((qs[part * 16 + l] >> shift) & 3) - min;
        }
      }
    }
  }
}

// The 16 six-bit scales of Q3_K, packed in 12 bytes: bytes 0-7 hold the low
// four bits (scale j in the low nibble of byte j % 8 for j < 8, the high
// nibble for j >= 8), bytes 8-11 the high two bits (scale j's in bits
// 2 (j / 4) .. of byte 8 + j % 4). Stored with an offset of 32.
void q3_k_scales(const uint8_t* packed, int* scales) {
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? packed[j] & 0x0f : packed[j - 8] >> 4;
    const int high = (packed[8 + j % 4] >> (2 * (j / 4))) & 3;
    scales[j] = (low | (high << 4)) - 32;
  }
}

// Q3_K: 16 sub-blocks of 16; 2 low bits as in Q2_K, the third bit from
// hmask (value l + 32 k of a 128-value half: bit (4 half + k) of hmask[l]),
// and a missing third bit subtracts 4. x = d * scale * q.
void dequantize_q3_k(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 110) {
    const uint8_t* hmask = p;
    const uint8_t* qs = p + 32;
    int scales[16];
    q3_k_scales(p + 96, scales);
    const float d = half_to_float(load<uint16_t>(p + 108));
    int sub = 0, bit = 0;
    for (int half = 0; half < 2; ++half, qs += 32) {
      for (int shift = 0; shift < 8; shift += 2, ++bit) {
        for (int part = 0; part < 2; ++part, ++sub, out += 16) {
          const float scale = d * static_cast<float>(scales[sub]);
          for (int l = 0; l < 16; ++l) {
            const int i = part * 16 + l;
            const int q = ((qs[i] >> shift) & 3) - (((hmask[i] >> bit) & 1) ? 0 : 4);
            out[l] = scale * static_cast<float>(q);
          }
        }
      }
    }
  }
}

// The 8 six-bit scales and 8 six-bit minimums of Q4_K and Q5_K in 12 bytes:
// for j < 4, scale = bytes[j] & 63 and min = bytes[j + 4] & 63; for j >= 4
// the low four bits come from byte j + 4 (scale: low nibble, min: high) and
// the high two from the top bits of bytes j - 4 (scale) and j (min).
void k4_scale_min(const uint8_t* packed, int j, int* scale, int* min) {
  if (j < 4) {
    *scale = packed[j] & 63;
    *min = packed[j + 4] & 63;
  } else {
    *scale = (packed[j + 4] & 0x0f) | ((packed[j - 4] >> 6) << 4);
    *min = (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4);
  }
}

// Q4_K and Q5_K: 8 sub-blocks of 32. Each 32-byte group of qs holds two
// sub-blocks, the first in the low nibbles; Q5_K's fifth bit of value l of
// sub-block s is bit s of qh[l]. x = d * scale * q - dmin * min.
void dequantize_q45_k(const uint8_t* p, int64_t blocks, float* out, bool five_bits) {
  const int64_t bytes = five_bits ? 176 : 144;
  for (int64_t b = 0; b < blocks; ++b, p += bytes) {
    const float d = half_to_float(load<uint16_t>(p));
    const float dmin = half_to_float(load<uint16_t>(p + 2));
    const uint8_t* packed = p + 4;
    const uint8_t* qh = p + 16;
    const uint8_t* qs = p + (five_bits ? 48 : 16);
    for (int s = 0; s < 8; ++s, out += 32) {
      int scale, min;
      k4_scale_min(packed, s, &scale, &min);
      const float ds = d * static_cast<float>(scale), ms = dmin * static_cast<float>(min);
      const uint8_t* group = qs + 32 * (s / 2);
      for (int l = 0; l < 32; ++l) {
        int q = s % 2 == 0 ? group[l] & 0x0f : group[l] >> 4;
        if (five_bits && ((qh[l] >> s) & 1)) q += 16;
        out[l] = ds * static_cast<float>(q) - ms;
      }
    }
  }
}

// Q6_K: 16 sub-blocks of 16, int8 scales. Per 128-value half, ql (64 bytes)
// holds the low 4 bits: byte l (< 32) value l (low nibble) and l + 64 (high),
// byte l + 32 values l + 32 and l + 96; qh (32 bytes) byte l holds the high
// 2 bits of values l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7.
// x = d * scale * (q - 32).
void dequantize_q6_k(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 210) {
    const uint8_t* ql = p;
    const uint8_t* qh = p + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(p + 192);
    const float d = half_to_float(load<uint16_t>(p + 208));
    for (int half = 0; half < 2; ++half, ql += 64, qh += 32, scales += 8, out += 128) {
      for (int l = 0; l < 32; ++l) {
        const int sub = l / 16;
        const int q[4] = {(ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4),
                          (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4),
                          (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
                          (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)};
        for (int k = 0; k < 4; ++k)
          out[l + 32 * k] =
              d * static_cast<float>(scales[sub + 2 * k]) * static_cast<float>(q[k] - 32);
      }
    }
  }
}

// Q8_K: float32 d, int8 values; bsums (sums of 16 values, for dot products)
// are not needed to dequantise.
void dequantize_q8_k(const uint8_t* p, int64_t blocks, float* out) {
  for (int64_t b = 0; b < blocks; ++b, p += 292, out += kSuper) {
    const float d = load<float>(p);
    const int8_t* qs = reinterpret_cast<const int8_t*>(p + 4);
    for (int l = 0; l < kSuper; ++l) out[l] = d * static_cast<float>(qs[l]);
  }
}

template <typename T>
void convert_plain(const uint8_t* p, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(load<T>(p + i * sizeof(T)));
}

}  // namespace

void to_float32(const TensorInfo& t, float* out) {
  int64_t n = t.numel();
  int64_t expected = n < 0 ? -1 : dtype_nbytes(t.dtype, n);
  if (expected < 0 || static_cast<uint64_t>(expected) != t.nbytes) {
    throw std::runtime_error("tensor " + t.name + ": " + dtype_name(t.dtype) + " shape " +
                             shape_string(t.shape) + " does not match its " +
                             std::to_string(t.nbytes) + " bytes");
  }
  if (n == 0) return;
  const uint8_t* p = t.data;
  int64_t blocks = n / dtype_block_size(t.dtype);
  switch (t.dtype) {
    case DType::kF32: std::memcpy(out, p, static_cast<size_t>(n) * 4); return;
    case DType::kF16:
      for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(load<uint16_t>(p + 2 * i));
      return;
    case DType::kBF16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(load<uint16_t>(p + 2 * i));
      return;
    case DType::kQ8_0: dequantize_q8_0(p, blocks, out); return;
    case DType::kQ4_0: dequantize_q4_0(p, blocks, out); return;
    case DType::kQ4_1: dequantize_q4_1(p, blocks, out); return;
    case DType::kQ5_0: dequantize_q5_0(p, blocks, out); return;
    case DType::kQ5_1: dequantize_q5_1(p, blocks, out); return;
    case DType::kQ2_K: dequantize_q2_k(p, blocks, out); return;
    case DType::kQ3_K: dequantize_q3_k(p, blocks, out); return;
    case DType::kQ4_K: dequantize_q45_k(p, blocks, out, /*five_bits=*/false); return;
    case DType::kQ5_K: dequantize_q45_k(p, blocks, out, /*five_bits=*/true); return;
    case DType::kQ6_K: dequantize_q6_k(p, blocks, out); return;
    case DType::kQ8_K: dequantize_q8_k(p, blocks, out); return;
    case DType::kF64: convert_plain<double>(p, n, out); return;
    case DType::kI64: convert_plain<int64_t>(p, n, out); return;
    case DType::kI32: convert_plain<int32_t>(p, n, out); return;
    case DType::kI16: convert_plain<int16_t>(p, n, out); return;
    case DType::kI8: convert_plain<int8_t>(p, n, out); return;
    case DType::kU8: convert_plain<uint8_t>(p, n, out); return;
    case DType::kBool:
      for (int64_t i = 0; i < n; ++i) out[i] = p[i] != 0 ? 1.0f : 0.0f;
      return;
  }
}

std::vector<float> to_float32(const TensorInfo& t) {
  int64_t n = t.numel();
  if (n < 0) throw std::runtime_error("tensor " + t.name + ": invalid shape " + shape_string(t.shape));
  std::vector<float> out(static_cast<size_t>(n));
  to_float32(t, out.data());
  return out;
}

}  // namespace sparseflash::checkpoint
