// Blockwise quantization kernels, templated on input dtype, residual dtype, format and vector
// width. Included by one .cu per format (blockwise_quant_{int8,e4m3,e5m2}.cu) so the
// instantiations compile in parallel.
//
// Mapping: a *group* of `group` consecutive lanes (a power of two <= 32) owns one quantization
// block per round; a CTA runs kRounds rounds over consecutive spans of blocks. Each lane loads
// whole vectors of VEC elements (16 bytes of input) for all rounds first (several independent
// loads in flight), keeps them in registers, the group reduces amax with shuffles, and the same
// lanes then encode and store. So every input byte is read once and every output byte written
// once (one pass); blocks longer than the register cache re-read the rest from L1/L2 rather than
// spill.
//
// Arithmetic (must match deepseek_kernels/reference/quantization.py bit for bit, so every op
// below is an explicitly rounded IEEE op; nothing may be contracted into an FMA):
//   y      = x (+ e)                       fp32
//   scale  = amax(|y|) / qmax              NaN if the block holds a non-finite y, 0 below 2^-126
//   inv    = scale > 0 ? 1 / scale : 0
//   v      = clamp(y * inv, -qmax, qmax)
//   code   = round_half_even(v) (int8) | saturating RNE cast (fp8) | stochastic rounding
//   e_new  = y - decode(code) * scale      (only for finite blocks; others keep e)
#pragma once

#include <cfloat>
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <type_traits>

#include "blockwise_quant.h"

namespace dsk {
namespace quant {

constexpr int kThreads = 256;

// A vector of N elements loaded or stored with one (or, above 16 bytes, several) wide access.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Uniform in [0, 1) with 24 random bits (exactly representable in fp32).
__device__ __forceinline__ float uniform01(uint32_t key, int64_t index) {
  const uint32_t lo = static_cast<uint32_t>(index);
  const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(index) >> 32);
  const uint32_t h = mix32(mix32(lo ^ key) + hi);
  return static_cast<float>(h >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

template <QFormat F>
struct Format;

template <>
struct Format<QFormat::kInt8> {
  static constexpr float kMax = 127.f;
  __device__ __forceinline__ static uint8_t round_nearest(float v) {
    return static_cast<uint8_t>(static_cast<int8_t>(__float2int_rn(v)));
  }
  __device__ __forceinline__ static float decode(uint8_t c) {
    return static_cast<float>(static_cast<int8_t>(c));
  }
  // Round up with probability frac(v): floor(v) + [u < v - floor(v)]; v - floor(v) is exact.
  __device__ __forceinline__ static uint8_t round_stochastic(float v, float u) {
    const float lo = floorf(v);
    const int c = static_cast<int>(lo) + (u < __fsub_rn(v, lo) ? 1 : 0);
    return static_cast<uint8_t>(static_cast<int8_t>(c));
  }
};

template <__nv_fp8_interpretation_t I, int kMaxInt>
struct Fp8Format {
  static constexpr float kMax = static_cast<float>(kMaxInt);
  __device__ __forceinline__ static uint8_t round_nearest(float v) {
    return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, I));
  }
  __device__ __forceinline__ static float decode(uint8_t c) {
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(static_cast<__nv_fp8_storage_t>(c), I)));
  }
  // Stochastic rounding on the magnitude between the two neighbouring fp8 values lo <= |v| <= hi:
  // pick hi with probability (|v| - lo) / (hi - lo). hi - lo is a power of two and u has 24 bits,
  // so u * (hi - lo) is exact and the comparison carries no rounding bias.
  __device__ __forceinline__ static uint8_t round_stochastic(float v, float u) {
    const float mag = fabsf(v);
    const uint8_t c = round_nearest(mag);
    const float cf = decode(c);
    const uint8_t lo_bits = cf > mag ? static_cast<uint8_t>(c - 1) : c;
    const uint8_t hi_bits = cf < mag ? static_cast<uint8_t>(c + 1) : c;
    const float lo = decode(lo_bits), hi = decode(hi_bits);
    const uint8_t bits = __fmul_rn(u, __fsub_rn(hi, lo)) < __fsub_rn(mag, lo) ? hi_bits : lo_bits;
    return signbit(v) ? static_cast<uint8_t>(bits | 0x80u) : bits;
  }
};

template <>
struct Format<QFormat::kE4M3> : Fp8Format<__NV_E4M3, 448> {};
template <>
struct Format<QFormat::kE5M2> : Fp8Format<__NV_E5M2, 57344> {};

// ---- per-vector helpers ------------------------------------------------------------------------
//
// amax is carried as the bit pattern of |value| (an unsigned integer, monotone in the value for
// non-negative floats), so NaN (0x7fc00000) and Inf (0x7f800000) win every max and one test at the
// end finds them: bits > 0x7f7fffff (FLT_MAX) means the block is not finite.

__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// max |x| over one vector of raw inputs, as |float| bits (16-bit types reduce in packed pairs with
// NaN-propagating max, two elements per instruction).
template <int VEC>
__device__ __forceinline__ uint32_t vec_absmax_bits(const Pack<float, VEC>& p) {
  uint32_t m = 0;
#pragma unroll
  for (int i = 0; i < VEC; ++i) m = max(m, abs_bits(p.v[i]));
  return m;
}
template <int VEC>
__device__ __forceinline__ uint32_t vec_absmax_bits(const Pack<__nv_bfloat16, VEC>& p) {
  if constexpr (VEC % 2 == 0) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(p.v);
    __nv_bfloat162 m = __habs2(h[0]);
#pragma unroll
    for (int i = 1; i < VEC / 2; ++i) m = __hmax2_nan(m, __habs2(h[i]));
    return abs_bits(__bfloat162float(__hmax_nan(m.x, m.y)));
  } else {
    return abs_bits(__bfloat162float(p.v[0]));
  }
}
template <int VEC>
__device__ __forceinline__ uint32_t vec_absmax_bits(const Pack<__half, VEC>& p) {
  if constexpr (VEC % 2 == 0) {
    const __half2* h = reinterpret_cast<const __half2*>(p.v);
    __half2 m = __habs2(h[0]);
#pragma unroll
    for (int i = 1; i < VEC / 2; ++i) m = __hmax2_nan(m, __habs2(h[i]));
    return abs_bits(__half2float(__hmax_nan(m.x, m.y)));
  } else {
    return abs_bits(__half2float(p.v[0]));
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void to_floats(const Pack<T, VEC>& p, float (&f)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = to_f32(p.v[i]);
}

// 1.5 * 2^23: adding it to |v| < 2^22 rounds v to an integer (half to even) in the low mantissa
// bits, so the int8 code is the low byte of the sum's bit pattern and sum - magic is the code's
// exact value. Full-rate FADDs instead of quarter-rate float<->int conversions.
constexpr float kRoundMagic = 12582912.f;

// Packs the low bytes of four 32-bit values into one word (element i -> byte i).
__device__ __forceinline__ uint32_t pack_low_bytes(uint32_t b0, uint32_t b1, uint32_t b2, uint32_t b3) {
  return __byte_perm(__byte_perm(b0, b1, 0x0040), __byte_perm(b2, b3, 0x0040), 0x5410);
}

// Encodes VEC scaled values v (already y * inv) with round-to-nearest-even into packed code
// words (element i -> byte i % 4 of word i / 4) and, for error feedback, their decoded values.
// No clamp is needed here: with a normal scale, |y * inv| <= qmax * (1 + 3 * 2^-24), which
// rounds to at most qmax (int8) and saturates to qmax (fp8, satfinite) exactly as clamping first
// would.
template <QFormat F, int VEC>
__device__ __forceinline__ void encode_nearest(const float (&v)[VEC], uint32_t (&words)[VEC / 4],
                                               float (&decoded)[VEC]) {
  static_assert(VEC % 4 == 0, "packed encoding needs whole words");
  if constexpr (F == QFormat::kInt8) {
    uint32_t b[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float t = __fadd_rn(v[i], kRoundMagic);
      b[i] = __float_as_uint(t);
      decoded[i] = __fsub_rn(t, kRoundMagic);
    }
#pragma unroll
    for (int w = 0; w < VEC / 4; ++w) words[w] = pack_low_bytes(b[4 * w], b[4 * w + 1], b[4 * w + 2], b[4 * w + 3]);
  } else {
    constexpr __nv_fp8_interpretation_t I = F == QFormat::kE4M3 ? __NV_E4M3 : __NV_E5M2;
    uint32_t pairs[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      const __nv_fp8x2_storage_t c2 = __nv_cvt_float2_to_fp8x2(make_float2(v[i], v[i + 1]), __NV_SATFINITE, I);
      pairs[i / 2] = c2;
      const float2 d = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(c2, I)));
      decoded[i] = d.x;
      decoded[i + 1] = d.y;
    }
#pragma unroll
    for (int w = 0; w < VEC / 4; ++w) words[w] = __byte_perm(pairs[2 * w], pairs[2 * w + 1], 0x5410);
  }
}

template <int VEC>
__device__ __forceinline__ void store_words(uint8_t* q, const uint32_t (&words)[VEC / 4]) {
  Pack<uint32_t, VEC / 4> w;
#pragma unroll
  for (int i = 0; i < VEC / 4; ++i) w.v[i] = words[i];
  *reinterpret_cast<Pack<uint32_t, VEC / 4>*>(q) = w;
}

template <int VEC>
__device__ __forceinline__ void store_codes(uint8_t* q, const uint8_t (&codes)[VEC]) {
  Pack<uint8_t, VEC> c;
#pragma unroll
  for (int i = 0; i < VEC; ++i) c.v[i] = codes[i];
  *reinterpret_cast<Pack<uint8_t, VEC>*>(q) = c;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* out, const float (&f)[VEC]) {
  Pack<T, VEC> o;
  if constexpr (VEC % 2 == 0 && sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        *reinterpret_cast<__nv_bfloat162*>(&o.v[i]) = __floats2bfloat162_rn(f[i], f[i + 1]);
      } else {
        *reinterpret_cast<__half2*>(&o.v[i]) = __floats2half2_rn(f[i], f[i + 1]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_f32<T>(f[i]);
  }
  *reinterpret_cast<Pack<T, VEC>*>(out) = o;
}

// Scales, encodes and stores one vector of y values; writes the new residual when kHasError.
template <typename ET, bool kHasError, QFormat F, int VEC>
__device__ __forceinline__ void encode_store(const float (&y)[VEC], float scale, float inv, bool bad,
                                             bool stochastic, uint32_t key, int64_t index, uint8_t* q, ET* e) {
  using Fmt = Format<F>;
  float decoded[VEC];
  if (bad) {
    uint8_t zeros[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) zeros[i] = 0;
    store_codes<VEC>(q, zeros);
    return;  // the residual of a non-finite block is left unchanged
  }
  float v[VEC];
#pragma unroll
  for (int i = 0; i < VEC; ++i) v[i] = __fmul_rn(y[i], inv);
  if constexpr (VEC % 4 == 0) {
    if (!stochastic) {
      uint32_t words[VEC / 4];
      encode_nearest<F, VEC>(v, words, decoded);
      store_words<VEC>(q, words);
    }
  }
  if (stochastic || VEC % 4 != 0) {
    uint8_t codes[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float vc = fminf(fmaxf(v[i], -Fmt::kMax), Fmt::kMax);
      codes[i] = stochastic ? Fmt::round_stochastic(vc, uniform01(key, index + i)) : Fmt::round_nearest(vc);
      decoded[i] = Fmt::decode(codes[i]);
    }
    store_codes<VEC>(q, codes);
  }
  if constexpr (kHasError) {
    float r[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) r[i] = __fsub_rn(y[i], __fmul_rn(decoded[i], scale));
    store_floats<ET, VEC>(e, r);
  }
}

// Which quantization block a group owns in one round, and where its data lives.
struct BlockCoords {
  int64_t gid;   // block index in [0, rows * nblocks)
  int64_t row;
  int64_t col0;  // first column of the block
  int nv;        // vectors in this block (0 past the end)
};

// A CTA owns kRounds * (groups per CTA) consecutive blocks; in round u, group i takes block
// base + u * groups + i, so every round of a CTA reads one contiguous span (coalesced), and each
// lane has kRounds independent blocks' loads in flight before its first reduction.
template <int VEC, int kRounds, bool kFlat, int kCta = kThreads>
__device__ __forceinline__ BlockCoords block_coords(int64_t rows, int64_t cols, int64_t block,
                                                    int log2_group, int round) {
  BlockCoords c;
  const int64_t nblocks = (cols + block - 1) / block;
  const int64_t groups = kCta >> log2_group;
  c.gid = (static_cast<int64_t>(blockIdx.x) * kRounds + round) * groups + (threadIdx.x >> log2_group);
  const int64_t total = rows * nblocks;
  if (c.gid >= total) {
    c.row = c.col0 = 0;
    c.nv = 0;
    return c;
  }
  if constexpr (kFlat) {
    // One long row of whole blocks (see the launcher): no division, no tail block.
    c.row = 0;
    c.col0 = c.gid * block;
    c.nv = static_cast<int>(block) / VEC;
    return c;
  }
  c.row = total <= 0xffffffffLL ? static_cast<int64_t>(static_cast<uint32_t>(c.gid) / static_cast<uint32_t>(nblocks))
                                : c.gid / nblocks;
  c.col0 = (c.gid - c.row * nblocks) * block;
  c.nv = static_cast<int>(min(block, cols - c.col0)) / VEC;  // exact: see the launcher
  return c;
}

// Group max of |y| bits by xor-shuffles inside the group (all 32 lanes of every warp arrive here,
// lanes past the end with 0, so the full mask is valid).
__device__ __forceinline__ uint32_t group_max(uint32_t m, int group) {
  for (int off = group >> 1; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  return m;
}

__device__ __forceinline__ void scale_of(uint32_t amax_bits, float qmax, float& scale, float& inv, bool& bad) {
  bad = amax_bits > 0x7f7fffffu;  // NaN or Inf somewhere in the block
  float s = __fdiv_rn(__uint_as_float(amax_bits), qmax);
  // Scales below FLT_MIN (blocks with amax < qmax * 2^-126) flush to 0: their reciprocal would
  // overflow and the error bound above would fail. Those blocks get zero codes.
  if (!(s >= 1.17549435e-38f)) s = 0.f;
  scale = bad ? __uint_as_float(0x7fc00000u) : s;
  inv = scale > 0.f ? __frcp_rn(scale) : 0.f;
}

// Launch shape, tuned on the H200 (512 MiB bf16, block 128; see the issue notes): plain
// quantization keeps 4 rounds in flight and caps registers so 4 CTAs fit per SM; with error
// feedback each vector costs twice the registers (fp32 y), so fewer rounds without a cap: the DDP
// hook's graphed pipeline at W=2 (H200, session 9, one rebuild each) ran 56.6 us at 1 round, 57.4 at
// 2 and 71.6 at 4; three more runs at 1 round gave 56.9-57.4 us, so 1 and 2 are within the noise.
// 1 is kept: 44 registers for fp32 inputs against 80 at 2 (144 at 4).
// DSK_NVCC_EXTRA="-DDSK_QUANT_ROUNDS=.. -DDSK_QUANT_EF_ROUNDS=.. ..." overrides them for experiments.
#ifndef DSK_QUANT_ROUNDS
#define DSK_QUANT_ROUNDS 4
#endif
#ifndef DSK_QUANT_MIN_BLOCKS
#define DSK_QUANT_MIN_BLOCKS 4
#endif
#ifndef DSK_QUANT_EF_ROUNDS
#define DSK_QUANT_EF_ROUNDS 1
#endif
#ifndef DSK_QUANT_EF_MIN_BLOCKS
#define DSK_QUANT_EF_MIN_BLOCKS 1
#endif
// Vectors per lane kept in registers between the two passes with error feedback (the rest of a
// lane's vectors, x and residual, are read again in pass 2). 0 = by input type: 1 for 16-bit inputs
// (tuned on 512 MiB bf16, vectors of 8), 2 for fp32 (the DDP hook's buckets: vectors of 4, 2 per
// lane; keeping 1 re-read half of x and the residual: the hook's graphed pipeline at W=2 ran at
// 63.8 % of copy speed against 69.5 % with 2 on the H200, session 8).
#ifndef DSK_QUANT_EF_KEEP
#define DSK_QUANT_EF_KEEP 0
#endif
#ifndef DSK_DEQUANT_ROUNDS
#define DSK_DEQUANT_ROUNDS 4
#endif
template <bool kHasError>
__host__ __device__ constexpr int quantize_rounds() { return kHasError ? DSK_QUANT_EF_ROUNDS : DSK_QUANT_ROUNDS; }
template <bool kHasError>
__host__ __device__ constexpr int quantize_min_blocks() { return kHasError ? DSK_QUANT_EF_MIN_BLOCKS : DSK_QUANT_MIN_BLOCKS; }
constexpr int kRoundsDequantize = DSK_DEQUANT_ROUNDS;

template <typename T, typename ET, bool kHasError, QFormat F, int VEC, bool kFlat>
__global__ void __launch_bounds__(kThreads, quantize_min_blocks<kHasError>())
    blockwise_quantize_kernel(const QuantizeArgs a, const int group, const int log2_group) {
  constexpr int R = quantize_rounds<kHasError>();
  // Vectors per lane and round kept in registers between the passes: raw inputs, or y = x + e
  // in fp32 with error feedback (twice the registers per vector). Longer blocks re-read the rest.
  constexpr int KPR = !kHasError ? 2 : DSK_QUANT_EF_KEEP > 0 ? DSK_QUANT_EF_KEEP : (sizeof(T) == 4 ? 2 : 1);
  const int lane = threadIdx.x & (group - 1);
  const uint32_t key = a.key_ptr != nullptr ? *a.key_ptr : a.key;
  BlockCoords c[R];
#pragma unroll
  for (int u = 0; u < R; ++u) c[u] = block_coords<VEC, R, kFlat>(a.rows, a.cols, a.block, log2_group, u);

  auto x_ptr = [&](const BlockCoords& b) {
    return static_cast<const T*>(a.x) + b.row * a.x_row_stride + b.col0;
  };
  auto index_of = [&](const BlockCoords& b) { return b.row * a.cols + b.col0; };
  auto load_x = [&](const BlockCoords& b, int j) {
    return *reinterpret_cast<const Pack<T, VEC>*>(x_ptr(b) + j * VEC);
  };
  auto load_y = [&](const BlockCoords& b, int j, float (&y)[VEC]) {
    to_floats<T, VEC>(load_x(b, j), y);
    if constexpr (kHasError) {
      const ET* e = static_cast<const ET*>(a.error) + index_of(b) + j * VEC;
      const Pack<ET, VEC> ev = *reinterpret_cast<const Pack<ET, VEC>*>(e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = __fadd_rn(y[i], to_f32(ev.v[i]));
    }
  };
  auto y_absmax_bits = [](const float (&y)[VEC]) {
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) m = max(m, abs_bits(y[i]));
    return m;
  };

  // Pass 1: issue every cached load of every round, then reduce amax per round.
  Pack<T, VEC> raw[kHasError ? 1 : R][KPR];
  float ys[kHasError ? R : 1][KPR][VEC];
#pragma unroll
  for (int u = 0; u < R; ++u) {
#pragma unroll
    for (int k = 0; k < KPR; ++k) {
      const int j = lane + k * group;
      if (j < c[u].nv) {
        if constexpr (kHasError) {
          load_y(c[u], j, ys[u][k]);
        } else {
          raw[u][k] = load_x(c[u], j);
        }
      }
    }
  }
  uint32_t m[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    m[u] = 0;
#pragma unroll
    for (int k = 0; k < KPR; ++k) {
      if (lane + k * group < c[u].nv) {
        if constexpr (kHasError) {
          m[u] = max(m[u], y_absmax_bits(ys[u][k]));
        } else {
          m[u] = max(m[u], vec_absmax_bits<VEC>(raw[u][k]));
        }
      }
    }
    for (int j = lane + KPR * group; j < c[u].nv; j += group) {
      float t[VEC];
      load_y(c[u], j, t);
      m[u] = max(m[u], y_absmax_bits(t));
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) m[u] = group_max(m[u], group);

  // Pass 2: encode and store codes (and the new residual), round by round.
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (c[u].nv == 0) break;  // later rounds are past the end too
    float scale, inv;
    bool bad;
    scale_of(m[u], Format<F>::kMax, scale, inv, bad);
    if (lane == 0) a.scales[c[u].gid] = scale;
    const int64_t index0 = index_of(c[u]);
    uint8_t* q = a.q + index0;
    ET* e = kHasError ? static_cast<ET*>(a.error) + index0 : nullptr;
#pragma unroll
    for (int k = 0; k < KPR; ++k) {
      const int j = lane + k * group;
      if (j < c[u].nv) {
        if constexpr (kHasError) {
          encode_store<ET, kHasError, F, VEC>(ys[u][k], scale, inv, bad, a.stochastic, key, index0 + j * VEC,
                                              q + j * VEC, e + j * VEC);
        } else {
          float y[VEC];
          to_floats<T, VEC>(raw[u][k], y);
          encode_store<ET, kHasError, F, VEC>(y, scale, inv, bad, a.stochastic, key, index0 + j * VEC, q + j * VEC,
                                              nullptr);
        }
      }
    }
    for (int j = lane + KPR * group; j < c[u].nv; j += group) {
      float t[VEC];
      load_y(c[u], j, t);
      encode_store<ET, kHasError, F, VEC>(t, scale, inv, bad, a.stochastic, key, index0 + j * VEC, q + j * VEC,
                                          kHasError ? e + j * VEC : nullptr);
    }
  }
}

// Decodes VEC code bytes to fp32 (int8 through the rounding magic: byte c becomes the float
// 1.5 * 2^23 + (c ^ 0x80), minus 1.5 * 2^23 + 128; fp8 two at a time through half2).
template <QFormat F, int VEC>
__device__ __forceinline__ void decode_codes(const Pack<uint8_t, VEC>& c, float (&f)[VEC]) {
  if constexpr (F == QFormat::kInt8 && VEC % 4 == 0) {
    const Pack<uint32_t, VEC / 4>& w = *reinterpret_cast<const Pack<uint32_t, VEC / 4>*>(&c);
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
      const uint32_t biased = w.v[i] ^ 0x80808080u;
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        f[4 * i + b] = __fsub_rn(__uint_as_float(__byte_perm(biased, 0x4B400000u, 0x7640 + b)),
                                 kRoundMagic + 128.f);
      }
    }
  } else if constexpr (F != QFormat::kInt8 && VEC % 4 == 0) {
    constexpr __nv_fp8_interpretation_t I = F == QFormat::kE4M3 ? __NV_E4M3 : __NV_E5M2;
    const Pack<uint32_t, VEC / 4>& w = *reinterpret_cast<const Pack<uint32_t, VEC / 4>*>(&c);
#pragma unroll
    for (int i = 0; i < VEC / 4; ++i) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const auto c2 = static_cast<__nv_fp8x2_storage_t>(w.v[i] >> (16 * h));
        const float2 d = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(c2, I)));
        f[4 * i + 2 * h] = d.x;
        f[4 * i + 2 * h + 1] = d.y;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = Format<F>::decode(c.v[i]);
  }
}

// Dequantization is elementwise: each lane owns whole vectors (VEC codes: 16 bytes of output),
// kRounds of them spread kThreads apart so every round of a CTA is one contiguous span; the scale of a
// vector comes from a shift (power-of-two blocks over whole rows) or from its row and column.
template <typename OT, QFormat F, int VEC, bool kShift>
__global__ void __launch_bounds__(kThreads)
    blockwise_dequantize_kernel(const DequantizeArgs a, const int log2_block) {
  constexpr int R = kRoundsDequantize;
  const int64_t nvec = a.rows * a.cols / VEC;
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * R * kThreads + threadIdx.x;
  Pack<uint8_t, VEC> codes[R];
  float scale[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int64_t v = v0 + u * kThreads;
    if (v < nvec) {
      const int64_t e = v * VEC;
      codes[u] = *reinterpret_cast<const Pack<uint8_t, VEC>*>(a.q + e);
      int64_t sidx;
      if constexpr (kShift) {
        sidx = e >> log2_block;
      } else {
        const int64_t row = e / a.cols;
        sidx = row * nblocks + (e - row * a.cols) / a.block;
      }
      scale[u] = a.scales[sidx];
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int64_t v = v0 + u * kThreads;
    if (v < nvec) {
      float f[VEC];
      decode_codes<F, VEC>(codes[u], f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = __fmul_rn(f[i], scale[u]);
      store_floats<OT, VEC>(static_cast<OT*>(a.out) + v * VEC, f);
    }
  }
}

// ---- launch helpers -----------------------------------------------------------------------

// Lanes per block: the power of two (<= 32) that gives each lane about `vectors_per_thread`
// vectors of a block (default 2, measured fastest on the H200: a block of 128 bf16 is 8 lanes x
// 2 x 16 bytes).
inline int pick_log2_group(int64_t block, int vec, int vectors_per_thread) {
  const int64_t vpt = vectors_per_thread > 0 ? vectors_per_thread : 2;
  const int64_t want = (block / vec + vpt - 1) / vpt;
  int log2 = 0;
  while ((int64_t{1} << log2) < want && log2 < 5) ++log2;
  return log2;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rows that are whole blocks and back to back in memory form one long row.
template <typename Args>
bool flatten(Args& a, int64_t row_stride) {
  if (a.rows >= 1 && row_stride == a.cols && a.cols % a.block == 0) {
    a.cols *= a.rows;
    a.rows = 1;
    return true;
  }
  return a.rows == 1 && a.cols % a.block == 0;
}

template <typename T, typename ET, bool kHasError, QFormat F, int VEC>
cudaError_t launch_quantize(QuantizeArgs a, cudaStream_t stream) {
  const bool flat = flatten(a, a.x_row_stride);
  if (flat) a.x_row_stride = a.cols;
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t groups = a.rows * nblocks;
  if (groups == 0) return cudaSuccess;
  const int log2_group = pick_log2_group(a.block, VEC, a.vectors_per_thread);
  const int64_t per_cta = (kThreads >> log2_group) * quantize_rounds<kHasError>();
  const int64_t grid = (groups + per_cta - 1) / per_cta;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (flat) {
    blockwise_quantize_kernel<T, ET, kHasError, F, VEC, true>
        <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, 1 << log2_group, log2_group);
  } else {
    blockwise_quantize_kernel<T, ET, kHasError, F, VEC, false>
        <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, 1 << log2_group, log2_group);
  }
  return cudaGetLastError();
}

template <typename T, typename ET, bool kHasError, QFormat F>
cudaError_t quantize_typed(const QuantizeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  // The wide path needs every vector to start on a 16-byte boundary: whole rows of vectors
  // (cols % VEC == 0, block % VEC == 0 since block % 16 == 0) and aligned base pointers (q too:
  // quantize_blockwise_into writes into a caller's buffer).
  const bool wide = a.cols % VEC == 0 && a.x_row_stride % VEC == 0 && aligned16(a.x) && aligned16(a.q) &&
                    (!kHasError || aligned16(a.error));
  return wide ? launch_quantize<T, ET, kHasError, F, VEC>(a, stream)
              : launch_quantize<T, ET, kHasError, F, 1>(a, stream);
}

template <typename T, QFormat F>
cudaError_t quantize_error_dispatch(const QuantizeArgs& a, cudaStream_t stream) {
  switch (a.error_dtype) {
    case DType::kNone: return quantize_typed<T, float, false, F>(a, stream);
    case DType::kF32: return quantize_typed<T, float, true, F>(a, stream);
    case DType::kF16: return quantize_typed<T, __half, true, F>(a, stream);
    case DType::kBF16: return quantize_typed<T, __nv_bfloat16, true, F>(a, stream);
  }
  return cudaErrorInvalidValue;
}

template <QFormat F>
cudaError_t quantize_dispatch(const QuantizeArgs& a, cudaStream_t stream) {
  switch (a.x_dtype) {
    case DType::kF32: return quantize_error_dispatch<float, F>(a, stream);
    case DType::kF16: return quantize_error_dispatch<__half, F>(a, stream);
    case DType::kBF16: return quantize_error_dispatch<__nv_bfloat16, F>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Launch shape of the elementwise dequantize-style kernels (kRoundsDequantize vectors per lane):
// the grid for nvec vectors, and log2(block) for the shift-based scale index of power-of-two blocks.
struct DequantLaunch {
  int64_t grid = 0;
  int log2_block = 0;
  bool pow2 = false;
};

inline DequantLaunch dequant_launch(int64_t nvec, int64_t block) {
  DequantLaunch l;
  const int64_t per_cta = int64_t{kThreads} * kRoundsDequantize;
  l.grid = (nvec + per_cta - 1) / per_cta;
  l.pow2 = (block & (block - 1)) == 0;
  while ((int64_t{1} << l.log2_block) < block) ++l.log2_block;
  return l;
}

template <typename OT, QFormat F, int VEC>
cudaError_t launch_dequantize(DequantizeArgs a, cudaStream_t stream) {
  const bool flat = flatten(a, a.cols);
  const int64_t nvec = a.rows * a.cols / VEC;
  if (nvec == 0) return cudaSuccess;
  const DequantLaunch l = dequant_launch(nvec, a.block);
  if (l.grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (flat && l.pow2) {
    blockwise_dequantize_kernel<OT, F, VEC, true><<<static_cast<unsigned>(l.grid), kThreads, 0, stream>>>(a, l.log2_block);
  } else {
    blockwise_dequantize_kernel<OT, F, VEC, false><<<static_cast<unsigned>(l.grid), kThreads, 0, stream>>>(a, l.log2_block);
  }
  return cudaGetLastError();
}

template <typename OT, QFormat F>
cudaError_t dequantize_typed(const DequantizeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(OT);
  const bool wide = a.cols % VEC == 0 && aligned16(a.out) && reinterpret_cast<uintptr_t>(a.q) % VEC == 0;
  return wide ? launch_dequantize<OT, F, VEC>(a, stream) : launch_dequantize<OT, F, 1>(a, stream);
}

template <QFormat F>
cudaError_t dequantize_dispatch(const DequantizeArgs& a, cudaStream_t stream) {
  switch (a.out_dtype) {
    case DType::kF32: return dequantize_typed<float, F>(a, stream);
    case DType::kF16: return dequantize_typed<__half, F>(a, stream);
    case DType::kBF16: return dequantize_typed<__nv_bfloat16, F>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quant
}  // namespace dsk
