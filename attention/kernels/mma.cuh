// Warp-level tensor-core building blocks (sm_80+ mma.sync m16n8k16) and the
// shared-memory tile layout the attention kernels use.
//
// Fragment layouts (lane = threadIdx.x % 32, g = lane / 4, t = lane % 4):
//   A 16x16: a0 (g, 2t..2t+1)  a1 (g+8, 2t..)  a2 (g, 8+2t..)  a3 (g+8, 8+2t..)
//   B 16x8:  b0 (k = 2t..2t+1, n = g)  b1 (k = 8+2t.., n = g)
//   C 16x8:  c0,c1 (g, 2t..2t+1)  c2,c3 (g+8, 2t..2t+1)
// A C fragment pair (n-blocks 2j, 2j+1) converts to one A fragment: this is
// how P = softmax(S) feeds P V without going through shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "attention/kernels/convert.cuh"

namespace sparseflash::kernels {

// ---------------------------------------------------------------------------
// element types

template <typename T>
struct Pack2;
template <>
struct Pack2<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return kernels::from_float<__nv_bfloat16>(x);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return kernels::to_float(x); }
  // The two values of a packed pair (low half first).
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    __nv_bfloat162 v;
    *reinterpret_cast<uint32_t*>(&v) = w;
    return __bfloat1622float2(v);
  }
};
template <>
struct Pack2<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ __half from_float(float x) { return kernels::from_float<__half>(x); }
  static __device__ __forceinline__ float to_float(__half x) { return kernels::to_float(x); }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    __half2 v;
    *reinterpret_cast<uint32_t*>(&v) = w;
    return __half22float2(v);
  }
};

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Shared-space (32-bit) address of a pointer into shared memory.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// addr: this lane's row address (shared space), as SmemTile::ldm gives it.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy that bypasses registers; zero-fills when !valid.
__device__ __forceinline__ void cp_async_16(void* smem, const void* global, bool valid) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(global),
               "r"(bytes));
}
// One 4-byte copy (zero-filled when !valid).
__device__ __forceinline__ void cp_async_4(void* smem, const void* global, bool valid) {
  uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(addr), "l"(global),
               "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

// ---------------------------------------------------------------------------
// shared-memory tiles: rows of W 2-byte elements, 16-byte chunks XOR-swizzled
// by row so that ldmatrix over 8 consecutive rows hits 8 different bank groups.

// Byte offset of element (row, col) in such a tile.
template <int W>
__host__ __device__ constexpr uint32_t swizzled_offset(int row, int col) {
  return static_cast<uint32_t>(row * 2 * W + (((col >> 3) ^ (row & 7)) << 4) + 2 * (col & 7));
}

// A lane's fixed part of its swizzled addresses. Every access pattern of the
// kernels is "block origin (r0, c0) + the lane's own (row, col) inside the
// block" with row, col < 16 and r0 % 8 == 0: the row swizzle (row & 7) then
// does not depend on r0, so once per kernel
//   lane = swizzled_offset(row, col)
// and per access one XOR with a compile-time constant (none when c0 % 64 == 0)
// and one add that folds into the load's immediate offset:
//   swizzled_offset(r0 + row, c0 + col) == at(r0, c0).
// Needs c0 % 8 == 0, and c0 % 16 == 0 when col >= 8 (so that adding col to c0
// carries into no chunk bit that the swizzle touches).
template <int W>
struct SwizzledLane {
  static_assert(W % 64 == 0, "the swizzle pattern spans 8 chunks of 16 bytes");
  uint32_t lane;
  __host__ __device__ constexpr uint32_t at(int r0, int c0) const {
    return xored(c0) + block(r0, c0);
  }
  // The two terms of at(): the lane's offset with the block's swizzle bits,
  // and the (compile-time) rest of the block's offset.
  __host__ __device__ constexpr uint32_t xored(int c0) const {
    return lane ^ static_cast<uint32_t>((c0 & 56) << 1);
  }
  __host__ __device__ static constexpr uint32_t block(int r0, int c0) {
    return static_cast<uint32_t>(r0 * 2 * W + (c0 & ~63) * 2);
  }
};

// The two ldmatrix_x4 lane patterns over a 16 x 16 block (lane l gives the
// address of one 8-element row of one of the four 8 x 8 matrices):
//   "a": matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15):
//        an A operand, or a B operand read with .trans;
//   "b": matrices (0-7, 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15):
//        two B operands (n-blocks of 8 rows) from a row-major [n][k] tile.
template <int W>
__host__ __device__ constexpr SwizzledLane<W> ldm_lane_a(int lane) {
  return {swizzled_offset<W>(lane % 16, (lane / 16) * 8)};
}
template <int W>
__host__ __device__ constexpr SwizzledLane<W> ldm_lane_b(int lane) {
  return {swizzled_offset<W>(lane % 8 + (lane / 16) * 8, ((lane / 8) % 2) * 8)};
}
// An accumulator fragment's pair of columns (row lane / 4, cols 2 (lane % 4), +1):
// at(r0, c0) for its element (r0 + lane / 4, c0 + 2 (lane % 4)).
template <int W>
__host__ __device__ constexpr SwizzledLane<W> acc_lane(int lane) {
  return {swizzled_offset<W>(lane / 4, (lane % 4) * 2)};
}

template <typename T, int D>
struct SmemTile {
  static_assert(sizeof(T) == 2, "2-byte elements");
  static constexpr uint32_t kRowBytes = 2 * D;
  T* base;
  __device__ __forceinline__ T* at(int row, int col) const {
    return reinterpret_cast<T*>(reinterpret_cast<char*>(base) + swizzled_offset<D>(row, col));
  }
  // Shared-space address of this lane's part of the block at (r0, c0). The
  // base is added before the block offset so that the latter stays an add
  // (folded into the ldmatrix immediate): added to the lane offset alone, the
  // compiler, knowing the bits are disjoint, turns it into an OR.
  __device__ __forceinline__ uint32_t ldm(SwizzledLane<D> l, int r0, int c0) const {
    return (smem_u32(base) + l.xored(c0)) + SwizzledLane<D>::block(r0, c0);
  }
  // This lane's pair of elements of an accumulator fragment at (r0, c0), as one word.
  __device__ __forceinline__ uint32_t* pair(SwizzledLane<D> l, int r0, int c0) const {
    return reinterpret_cast<uint32_t*>(reinterpret_cast<char*>(base) + l.at(r0, c0));
  }
};

// The source rows of one thread's 16-byte copies of a kNumRows-row tile
// (packed rows first .. first + kNumRows - 1, through perm when given; -1 past
// n): read from the permutation (fetch), or from a [kNumRows] array in shared
// memory that was filled a tile ahead (from_rows), which keeps the copies
// from waiting on a dependent global load.
template <int D, int kThreads, int kNumRows>
struct RowGather {
  static constexpr int kChunks = D / 8;
  static constexpr int kPer = kNumRows * kChunks / kThreads;
  static_assert((kNumRows * kChunks) % kThreads == 0, "whole rounds of 16-byte copies");
  int orig[kPer];

  __device__ __forceinline__ void fetch(const int* perm, int first, int n) {
#pragma unroll
    for (int it = 0; it < kPer; ++it) {
      const int packed = first + (static_cast<int>(threadIdx.x) + it * kThreads) / kChunks;
      orig[it] = packed < n ? (perm ? __ldg(perm + packed) : packed) : -1;
    }
  }
  __device__ __forceinline__ void from_rows(const int* rows) {
#pragma unroll
    for (int it = 0; it < kPer; ++it)
      orig[it] = rows[(static_cast<int>(threadIdx.x) + it * kThreads) / kChunks];
  }
};

// Copies the rows of g into shared memory: chunk c (elements 8c..8c+7) of
// row r goes to dst(r, c); rows past n are zero-filled.
template <typename T, int D, int kThreads, int kNumRows, typename Dst>
__device__ __forceinline__ void load_rows_gathered_to(Dst dst, const T* src, int64_t row_stride,
                                                      const RowGather<D, kThreads, kNumRows>& g) {
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int it = 0; it < RowGather<D, kThreads, kNumRows>::kPer; ++it) {
    const int idx = static_cast<int>(threadIdx.x) + it * kThreads;
    const int r = idx / kChunks, c = idx % kChunks;
    const bool valid = g.orig[it] >= 0;
    cp_async_16(dst(r, c), src + (valid ? g.orig[it] : 0) * row_stride + c * 8, valid);
  }
}

// Loads kNumRows packed rows (first .. first + kNumRows - 1, gathered through
// perm when given) into shared memory, as load_rows_gathered_to.
template <typename T, int D, int kThreads, int kNumRows, typename Dst>
__device__ __forceinline__ void load_rows_async_to(Dst dst, const T* src, int64_t row_stride,
                                                   const int* perm, int first, int n) {
  RowGather<D, kThreads, kNumRows> g;
  g.fetch(perm, first, n);
  load_rows_gathered_to<T, D, kThreads, kNumRows>(dst, src, row_stride, g);
}

// The same into rows row0 .. row0 + kNumRows - 1 of an SmemTile.
template <typename T, int D, int kThreads, int kNumRows>
__device__ __forceinline__ void load_rows_async(SmemTile<T, D> tile, int row0, const T* src,
                                                int64_t row_stride, const int* perm, int first,
                                                int n) {
  load_rows_async_to<T, D, kThreads, kNumRows>(
      [&](int r, int c) { return tile.at(row0 + r, c * 8); }, src, row_stride, perm, first, n);
}

}  // namespace sparseflash::kernels
