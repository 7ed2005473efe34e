// Hopper (sm_90a) warpgroup MMA building blocks: shared-memory matrix
// descriptors, the 128-byte swizzled tile layout they describe, and thin
// wrappers over wgmma.{fence,commit_group,wait_group,mma_async} for
// m64n32k16 (shared-memory operands), m64n64k16 and m64n128k16 with bf16
// inputs and fp32 accumulators.
// Written from the PTX ISA ("Asynchronous Warpgroup Level Matrix Multiply-
// Accumulate"); tests/kernels/wgmma_probe_test.cu checks every layout below on
// random inputs against a CPU reference.
//
// A warpgroup is 4 consecutive warps (128 threads, the first warp's id a
// multiple of 4). All four warps must execute each wgmma instruction.
//
// --- the 128B-swizzled shared-memory tile (one "panel") -------------------
// A panel is [rows x 64] bf16, each row 64 elements = 128 bytes, rows % 8 == 0,
// and its base 1024-byte aligned. Rows are stored one after another (row r at
// byte 128 r); inside a row the 16-byte chunk c (elements 8c..8c+7) is stored at
// chunk position c ^ (r % 8). Eight rows x 128 bytes (1024 bytes) form one
// swizzle atom. The hardware applies the XOR to address bits [4:6] from bits
// [7:9] of the *absolute* shared address, which is why the base must be
// 1024-byte aligned (the descriptor's base-offset field, bits 49-51, would
// otherwise have to say how far off it is; we always use 0). Tiles wider than
// 64 columns are stored as consecutive panels: columns 64p..64p+63 in panel p,
// panel p at byte p * rows * 128. sw128_index() gives this layout.
//
// --- the two operand orientations -------------------------------------------
// K-major: the operand's K (reduction) index runs along the 128-byte rows:
//   A [M x K] row-major, or B stored [N x K] row-major (C = A B^T, S = Q K^T).
//   One k16 step reads 32 bytes of every row: its descriptor starts at
//   panel(k0 / 64) + 2 * (k0 % 64) bytes; the hardware swizzles the address
//   it forms, so the start may sit inside the atom. LBO is unused for swizzled
//   K-major layouts (we encode 16 bytes, i.e. 1); SBO = 1024 bytes, the step
//   from one group of 8 rows (M or N) to the next.
// MN-major: the operand's M or N index runs along the 128-byte rows:
//   B stored [K x N] row-major (C = A B, e.g. dV += P^T dO with dO [keys x D]);
//   read with imm-trans-b = 1. One k16 step reads 16 rows (two atoms of 8
//   k-rows): its descriptor starts at panel 0 + 128 * k0 bytes. SBO = 1024
//   bytes, the step between groups of 8 k-rows; LBO = rows * 128 bytes, the
//   step from one 64-wide block of N (one panel) to the next; it matters only
//   when N > 64 (m64n128k16). With N = 32 the operand may be either half of a
//   64-wide panel: the start moves 64 bytes for columns 32..63, inside the
//   atom, as the K-major k16 steps do.
// Both follow the PTX ISA's canonical 128B layouts (section "Major-ness supported
// by Strides"; T = 8 bf16 per 16 bytes, in elements): K-major
// ((8,m),(T,2k)):((8T,SBO),(1,T)), MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO)).
//
// --- register fragments (per warp w = warp % 4 of the warpgroup, lane l,
//     g = l / 4, t = l % 4; warp w owns rows 16w..16w+15 of the 64-row tile) -
// Accumulator D [64 x N] fp32, N / 2 floats per thread: for j = 0..N/8-1
//   d[4j+0], d[4j+1] = D(16w + g,     8j + 2t), D(16w + g,     8j + 2t + 1)
//   d[4j+2], d[4j+3] = D(16w + g + 8, 8j + 2t), D(16w + g + 8, 8j + 2t + 1)
// (the mma.sync m16n8 C layout, repeated over N in steps of 8).
// A from registers [64 x 16] bf16, four b32 per thread (low half = lower column):
//   a[0] = A(16w + g,     2t..2t+1)     a[1] = A(16w + g + 8, 2t..2t+1)
//   a[2] = A(16w + g,     8 + 2t..)     a[3] = A(16w + g + 8, 8 + 2t..)
// (the mma.sync m16n8k16 A layout per warp), so an accumulator pair of
// n-blocks 2j, 2j+1 packed to bf16 is the A fragment of k-step j (P V, P^T dO).
//
// --- ordering -------------------------------------------------------------
// Data written to shared memory with ordinary stores must be made visible to
// the async proxy (fence_proxy_async_shared(), then a barrier) before wgmma
// reads it. wgmma_fence() must precede the first wgmma of a group and any
// wgmma whose accumulator or A registers were touched by other instructions;
// the accumulators may be read only after wgmma_wait<0>() (or the wait that
// retires their group).
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SF_WGMMA_ENABLED 1
#else
#define SF_WGMMA_ENABLED 0
#endif

namespace sparseflash::kernels::wgmma {

// ---------------------------------------------------------------------------
// layout

constexpr int kPanelCols = 64;        // bf16 elements per 128-byte row
constexpr int kAtomBytes = 1024;      // 8 rows x 128 bytes
constexpr uint32_t kSwizzle128B = 1;  // descriptor bits 62-63: 0 none, 1 128B, 2 64B, 3 32B

// Element index (not bytes) of (row, col) in a [rows x cols] bf16 tile stored
// as 128B-swizzled panels of 64 columns (see the top of this file).
__host__ __device__ constexpr int sw128_index(int row, int col, int rows) {
  return (col / kPanelCols) * rows * kPanelCols + row * kPanelCols +
         ((((col % kPanelCols) / 8) ^ (row % 8)) * 8) + col % 8;
}

// ---------------------------------------------------------------------------
// descriptors
//
// bits  0-13  start address >> 4 (shared-window byte address; 18 bits of it)
// bits 16-29  leading dimension byte offset >> 4 (LBO)
// bits 32-45  stride dimension byte offset >> 4 (SBO)
// bits 49-51  base offset (0: our panels are 1024-byte aligned)
// bits 62-63  swizzle mode (1 = 128B)
// all other bits 0.

__host__ __device__ constexpr uint64_t make_desc(uint32_t smem_addr, uint32_t lbo_bytes,
                                                 uint32_t sbo_bytes, uint32_t swizzle) {
  return (static_cast<uint64_t>((smem_addr >> 4) & 0x3FFF)) |
         (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFF) << 32) |
         (static_cast<uint64_t>(swizzle & 0x3) << 62);
}

// K-major 128B-swizzled operand whose k16 slice starts at smem_addr (a panel
// base plus 32 bytes per k16 step inside the panel). LBO unused (encoded 1).
__host__ __device__ constexpr uint64_t desc_k_major_sw128(uint32_t smem_addr) {
  return make_desc(smem_addr, 16, kAtomBytes, kSwizzle128B);
}

// MN-major 128B-swizzled operand whose k16 slice starts at smem_addr (panel 0
// base plus 128 bytes per k row); panel_bytes = rows * 128, the distance
// between 64-wide MN blocks.
__host__ __device__ constexpr uint64_t desc_mn_major_sw128(uint32_t smem_addr,
                                                           uint32_t panel_bytes) {
  return make_desc(smem_addr, panel_bytes, kAtomBytes, kSwizzle128B);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---------------------------------------------------------------------------
// ordering

// Makes this thread's generic-proxy shared stores visible to the async proxy
// (wgmma operand reads); follow it with a barrier.
__device__ __forceinline__ void fence_proxy_async_shared() {
#if SF_WGMMA_ENABLED
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_fence() {
#if SF_WGMMA_ENABLED
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void wgmma_commit() {
#if SF_WGMMA_ENABLED
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

// Waits until at most N committed groups are still pending.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
#if SF_WGMMA_ENABLED
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#else
  __trap();
#endif
}

// Keeps the compiler from moving reads or writes of accumulator registers
// across the asynchronous region (between an mma_async and its wait).
template <int N>
__device__ __forceinline__ void fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for register A fragments ([k-steps][4] packed pairs): keeps them
// live and unchanged up to this point (after the wait that retires their wgmma).
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) asm volatile("" : "+r"(a[i][r])::"memory");
}

// ---------------------------------------------------------------------------
// mma_async: D[64 x N] (+)= (ScaleA * A[64 x 16]) (ScaleB * B[16 x N]).
// scale_d is the PTX predicate operand (runtime): 0 -> D = A B (the old D is
// not read), nonzero -> D += A B. ScaleA / ScaleB are the imm-scale
// immediates (1 or -1). TransA / TransB are imm-trans-a / imm-trans-b: 0 for a
// K-major operand, 1 for an MN-major one (A from registers has no TransA).

// m64n32k16, A and B from shared-memory descriptors.
template <int ScaleA, int ScaleB, int TransA, int TransB>
__device__ __forceinline__ void mma_ss_m64n32k16(float (&d)[16], uint64_t desc_a, uint64_t desc_b,
                                                 int scale_d) {
#if SF_WGMMA_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15"
      "}, %16, %17, p, %19, %20, %21, %22;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(ScaleA), "n"(ScaleB), "n"(TransA), "n"(TransB)
      : "memory");
#else
  __trap();
#endif
}

// m64n64k16, A and B from shared-memory descriptors.
template <int ScaleA, int ScaleB, int TransA, int TransB>
__device__ __forceinline__ void mma_ss_m64n64k16(float (&d)[32], uint64_t desc_a, uint64_t desc_b,
                                                 int scale_d) {
#if SF_WGMMA_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,"
      "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
      "}, %32, %33, p, %35, %36, %37, %38;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(ScaleA), "n"(ScaleB), "n"(TransA), "n"(TransB)
      : "memory");
#else
  __trap();
#endif
}

// m64n64k16, A from registers (the fragment at the top of this file), B from a descriptor.
template <int ScaleA, int ScaleB, int TransB>
__device__ __forceinline__ void mma_rs_m64n64k16(float (&d)[32], const uint32_t (&a)[4],
                                                 uint64_t desc_b, int scale_d) {
#if SF_WGMMA_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,"
      "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31"
      "}, {%32,%33,%34,%35}, %36, p, %38, %39, %40;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(ScaleA),
        "n"(ScaleB), "n"(TransB)
      : "memory");
#else
  __trap();
#endif
}

// m64n128k16, A and B from shared-memory descriptors.
template <int ScaleA, int ScaleB, int TransA, int TransB>
__device__ __forceinline__ void mma_ss_m64n128k16(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                  int scale_d) {
#if SF_WGMMA_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,"
      "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,"
      "%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,"
      "%62,%63"
      "}, %64, %65, p, %67, %68, %69, %70;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(ScaleA), "n"(ScaleB), "n"(TransA), "n"(TransB)
      : "memory");
#else
  __trap();
#endif
}

// m64n128k16, A from registers (the fragment at the top of this file), B from a descriptor.
template <int ScaleA, int ScaleB, int TransB>
__device__ __forceinline__ void mma_rs_m64n128k16(float (&d)[64], const uint32_t (&a)[4],
                                                  uint64_t desc_b, int scale_d) {
#if SF_WGMMA_ENABLED
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,"
      "%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,"
      "%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,"
      "%62,%63"
      "}, {%64,%65,%66,%67}, %68, p, %70, %71, %72;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(ScaleA),
        "n"(ScaleB), "n"(TransB)
      : "memory");
#else
  __trap();
#endif
}

// The same, with N as a template argument (32, 64 or 128 for SS; 64 or 128 for RS).
template <int N, int ScaleA, int ScaleB, int TransA, int TransB>
__device__ __forceinline__ void mma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                       int scale_d) {
  static_assert(N == 32 || N == 64 || N == 128, "mma_ss: N must be 32, 64 or 128");
  if constexpr (N == 32)
    mma_ss_m64n32k16<ScaleA, ScaleB, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else if constexpr (N == 64)
    mma_ss_m64n64k16<ScaleA, ScaleB, TransA, TransB>(d, desc_a, desc_b, scale_d);
  else
    mma_ss_m64n128k16<ScaleA, ScaleB, TransA, TransB>(d, desc_a, desc_b, scale_d);
}
template <int N, int ScaleA, int ScaleB, int TransB>
__device__ __forceinline__ void mma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                       int scale_d) {
  static_assert(N == 64 || N == 128, "mma_rs: N must be 64 or 128");
  if constexpr (N == 64)
    mma_rs_m64n64k16<ScaleA, ScaleB, TransB>(d, a, desc_b, scale_d);
  else
    mma_rs_m64n128k16<ScaleA, ScaleB, TransB>(d, a, desc_b, scale_d);
}

}  // namespace sparseflash::kernels::wgmma
