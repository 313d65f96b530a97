// Decode-sized W8A8 matmul (M <= 16 rows of activations) on the tensor cores, and the per-token
// quantize that feeds it. Both exist for one reason: an eager decode step launches them from C++
// (one torch op call) instead of through Triton's Python launcher, which costs more host time per
// call than the kernels take on the GPU (benchmarks/NOTES.md, session 13).
//
// GEMV: out[m, n] = (sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n] (+ bias[n]), int32 sums,
// the epilogue in fp32 with the Triton kernel's operation order (mul, then fma with the bias), so
// the two paths give the same bits. One CTA owns 8 * SUB weight rows; its warps split K in steps of
// 64 bytes and meet in shared memory. Each lane streams 16-byte pieces of the weight rows straight
// into mma.sync.m16n8k32 operands: the sum over k does not care about the order of k, so lane
// (g, t) feeds the 16 bytes at k + 16 t of weight row g (and of activation rows g and g + 8) as the
// logical k slices {4t..4t+3, 16+4t..16+4t+3} of two consecutive MMAs.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace dsk {
namespace gemv {

enum class FType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr int kWarps = 8;         // warps per CTA (they split K)
constexpr int kThreads = 32 * kWarps;
constexpr int kStepBytes = 64;    // K bytes per warp step: 4 lanes x 16 bytes
constexpr int kMaxRows = 16;      // the MMA's M

__device__ __forceinline__ float load_float(const void* p, FType t, int64_t i) {
  switch (t) {
    case FType::kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case FType::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_float(void* p, FType t, int64_t i, float v) {
  switch (t) {
    case FType::kF16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case FType::kBF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// 16 weight bytes, read once: no L1 allocation (the activations own L1).
__device__ __forceinline__ uint4 load_stream(const int8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // the host side never launches this kernel below sm_80
#endif
}

struct GemvArgs {
  const int8_t* a;        // [M, K], rows `lda` bytes apart (16-byte aligned)
  const int8_t* b;        // [N, K], rows `ldb` bytes apart (16-byte aligned)
  const float* a_scale;   // [M]
  const float* b_scale;   // [N]
  const void* bias;       // [N] or nullptr
  void* out;              // [M, N] contiguous
  int64_t lda, ldb;
  int M, N, K;            // K a multiple of 16
  int prefetch;           // bytes at the start of each of the CTA's weight rows prefetched into L2 before the
                          // grid-dependency wait (a multiple of 16, <= K; 0: none)
  bool early_trigger;     // the grid fits on the GPU at once: let the next kernel launch at the start, not
                          // after the main loop (see chain_trigger)
  FType bias_t, out_t;
};

// For kernels that may be programmatic dependent launches (sm_90+; without the launch attribute both are no-ops).
// chain_wait: wait for the kernel before this one in the stream (its memory visible). chain_trigger: let the next
// one launch (it does once every CTA of this one has triggered or exited). Triggered at the start, the next
// kernel's CTAs become resident as soon as there is room and wait there: good when this grid fits on the GPU at
// once, harmful when later CTAs of this grid still need those slots (benchmarks/NOTES.md, session 11).
__device__ __forceinline__ void chain_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void chain_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// `bytes` (a multiple of 16) from the 16-byte aligned `p` into L2, no registers involved: a hint with no effect
// on what any load returns, so it may run before the grid-dependency wait (the weights' first bytes arrive
// while the kernel before still runs). sm_90+; nothing elsewhere.
__device__ __forceinline__ void prefetch_l2(const void* p, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// One loop trip's operands of one lane: UNROLL K steps of SUB weight pieces and two activation pieces.
template <int SUB, int UNROLL>
struct Trip {
  uint4 w[UNROLL][SUB], xl[UNROLL], xh[UNROLL];
};

// The lane's operands of K steps s0 .. s0 + UNROLL - 1 (zeros past the last step or K).
template <int SUB, int UNROLL>
__device__ __forceinline__ void load_trip(Trip<SUB, UNROLL>& r, const int8_t* const (&brow)[SUB], const int8_t* arow_lo,
                                          const int8_t* arow_hi, bool lo, bool hi, int s0, int steps, int k_lane,
                                          int K) {
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int off = (s0 + u) * kStepBytes;
    const bool in = s0 + u < steps && off + k_lane < K;
#pragma unroll
    for (int s = 0; s < SUB; ++s) r.w[u][s] = in ? load_stream(brow[s] + off) : zero;
    r.xl[u] = in && lo ? __ldg(reinterpret_cast<const uint4*>(arow_lo + off)) : zero;
    r.xh[u] = in && hi ? __ldg(reinterpret_cast<const uint4*>(arow_hi + off)) : zero;
  }
}

template <int SUB, int UNROLL>
__device__ __forceinline__ void mma_trip(int (&acc)[SUB][4], const Trip<SUB, UNROLL>& r) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
#pragma unroll
    for (int s = 0; s < SUB; ++s) {
      mma_s8(acc[s], r.xl[u].x, r.xh[u].x, r.xl[u].y, r.xh[u].y, r.w[u][s].x, r.w[u][s].y);
      mma_s8(acc[s], r.xl[u].z, r.xh[u].z, r.xl[u].w, r.xh[u].w, r.w[u][s].z, r.w[u][s].w);
    }
  }
}

// SUB: 8-row weight subtiles per CTA; UNROLL: K steps per loop trip (SUB * UNROLL 16-byte weight loads
// per lane). A register double-buffered loop (the next trip's loads issued before this trip's MMAs) lost
// at every shape on the H200 (session 14) and was removed.
template <int SUB, int UNROLL>
__global__ void __launch_bounds__(kThreads, 2) int8_gemv_kernel(const GemvArgs p) {
  constexpr int kRows = 8 * SUB;
  __shared__ int partial[kWarps][kMaxRows][kRows];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;
  const int n0 = blockIdx.x * kRows;

  // the weights are no kernel's output here: their first bytes may stream in before the wait
  if (p.prefetch > 0 && threadIdx.x < kRows && n0 + static_cast<int>(threadIdx.x) < p.N) {
    prefetch_l2(p.b + static_cast<int64_t>(n0 + threadIdx.x) * p.ldb, p.prefetch);
  }
  chain_wait();
  if (p.early_trigger) chain_trigger();

  const int8_t* brow[SUB];
#pragma unroll
  for (int s = 0; s < SUB; ++s) {
    const int n = min(n0 + s * 8 + g, p.N - 1);  // rows past N repeat the last one; never stored
    brow[s] = p.b + static_cast<int64_t>(n) * p.ldb + t * 16;
  }
  const bool lo = g < p.M, hi = g + 8 < p.M;  // activation rows g and g + 8 exist
  const int8_t* arow_lo = p.a + static_cast<int64_t>(lo ? g : 0) * p.lda + t * 16;
  const int8_t* arow_hi = p.a + static_cast<int64_t>(hi ? g + 8 : 0) * p.lda + t * 16;

  int acc[SUB][4];
#pragma unroll
  for (int s = 0; s < SUB; ++s) acc[s][0] = acc[s][1] = acc[s][2] = acc[s][3] = 0;

  const int steps = (p.K + kStepBytes - 1) / kStepBytes;
  constexpr int kStride = kWarps * UNROLL;  // K steps between a warp's trips
  Trip<SUB, UNROLL> cur;
  for (int s0 = warp * UNROLL; s0 < steps; s0 += kStride) {
    load_trip(cur, brow, arow_lo, arow_hi, lo, hi, s0, steps, t * 16, p.K);
    mma_trip(acc, cur);
  }
  if (!p.early_trigger) chain_trigger();

  // accumulator fragment: c0, c1 at (row g, cols 2t, 2t + 1), c2, c3 at row g + 8
#pragma unroll
  for (int s = 0; s < SUB; ++s) {
    const int col = s * 8 + 2 * t;
    partial[warp][g][col] = acc[s][0];
    partial[warp][g][col + 1] = acc[s][1];
    partial[warp][g + 8][col] = acc[s][2];
    partial[warp][g + 8][col + 1] = acc[s][3];
  }
  __syncthreads();

  for (int i = threadIdx.x; i < p.M * kRows; i += kThreads) {
    const int m = i / kRows, c = i % kRows, n = n0 + c;
    if (n >= p.N) continue;
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += partial[w][m][c];  // fixed order: deterministic
    // Triton's epilogue, operation for operation: (acc * a_scale) * b_scale, fused with + bias
    const float scaled = __fmul_rn(static_cast<float>(sum), p.a_scale[m]);
    const float v = p.bias ? __fmaf_rn(scaled, p.b_scale[n], load_float(p.bias, p.bias_t, n))
                           : __fmul_rn(scaled, p.b_scale[n]);
    store_float(p.out, p.out_t, static_cast<int64_t>(m) * p.N + n, v);
  }
}

// Per-token symmetric quantization of x [M, K] (rows `ldx` elements apart) into codes [M, K] (rows
// `ldq` bytes apart) and scales [M], one CTA per row, with the reference's arithmetic (and the
// Triton kernel's): xs = x / smooth (div.rn), scale = amax|xs| / 127 (NaN anywhere: NaN),
// q = round-half-even(clamp(xs * (1 / scale), -127, 127)), 0 where that product is NaN.
constexpr int kQuantThreads = 512;
constexpr int kQuantVals = 32;  // values per thread held in registers: rows up to 16384 are read once

__device__ __forceinline__ float scaled_input(const void* x, FType xt, int64_t i, const void* smooth, FType st,
                                              int k) {
  const float v = load_float(x, xt, i);
  return smooth ? __fdiv_rn(v, load_float(smooth, st, k)) : v;
}

__device__ __forceinline__ int8_t code_of(float xs, float inv) {
  const float y = __fmul_rn(xs, inv);
  return y != y ? 0 : static_cast<int8_t>(rintf(fminf(fmaxf(y, -127.0f), 127.0f)));
}

// The row's (scale, 1 / scale) from each thread's |x| maximum and NaN flag (NaN anywhere: NaN).
__device__ __forceinline__ float2 row_scale(float amax, int nan) {
  __shared__ float warp_amax[kQuantThreads / 32];
  __shared__ int warp_nan[kQuantThreads / 32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, d));
    nan |= __shfl_xor_sync(0xffffffffu, nan, d);
  }
  if (threadIdx.x % 32 == 0) {
    warp_amax[threadIdx.x / 32] = amax;
    warp_nan[threadIdx.x / 32] = nan;
  }
  __syncthreads();
  amax = 0.0f;
  nan = 0;
#pragma unroll
  for (int w = 0; w < kQuantThreads / 32; ++w) {
    amax = fmaxf(amax, warp_amax[w]);
    nan |= warp_nan[w];
  }
  const float s = __fdiv_rn(nan ? __int_as_float(0x7fc00000) : amax, 127.0f);
  return make_float2(s, s > 0.0f ? __fdiv_rn(1.0f, s) : 0.0f);
}

__global__ void __launch_bounds__(kQuantThreads) quantize_rows_kernel(const void* x, FType xt, int64_t ldx,
                                                                     const void* smooth, FType st, int8_t* q,
                                                                     int64_t ldq, float* scale, int K) {
  chain_wait();
  chain_trigger();  // one CTA per activation row: a decode-sized grid
  const int64_t row = blockIdx.x;
  float amax = 0.0f;  // fmaxf drops NaN: flagged separately
  int nan = 0;
  if (K <= kQuantThreads * kQuantVals) {  // one read: the row stays in registers (loads all in flight)
    float v[kQuantVals];
#pragma unroll
    for (int j = 0; j < kQuantVals; ++j) {
      const int k = j * kQuantThreads + threadIdx.x;
      v[j] = k < K ? scaled_input(x, xt, row * ldx + k, smooth, st, k) : 0.0f;
      amax = fmaxf(amax, fabsf(v[j]));
      nan |= v[j] != v[j];
    }
    const float2 s = row_scale(amax, nan);
    if (threadIdx.x == 0) scale[row] = s.x;
#pragma unroll
    for (int j = 0; j < kQuantVals; ++j) {
      const int k = j * kQuantThreads + threadIdx.x;
      if (k < K) q[row * ldq + k] = code_of(v[j], s.y);
    }
  } else {  // longer rows: read twice (the second read mostly from L2)
#pragma unroll 8
    for (int k = threadIdx.x; k < K; k += kQuantThreads) {
      const float v = scaled_input(x, xt, row * ldx + k, smooth, st, k);
      amax = fmaxf(amax, fabsf(v));
      nan |= v != v;
    }
    const float2 s = row_scale(amax, nan);
    if (threadIdx.x == 0) scale[row] = s.x;
#pragma unroll 8
    for (int k = threadIdx.x; k < K; k += kQuantThreads) {
      q[row * ldq + k] = code_of(scaled_input(x, xt, row * ldx + k, smooth, st, k), s.y);
    }
  }
}

}  // namespace gemv
}  // namespace dsk
