// Blockwise quantization kernels, templated on input dtype, residual dtype, format and vector
// width. Included by one .cu per format (blockwise_quant_{int8,e4m3,e5m2}.cu) so the
// instantiations compile in parallel.
//
// Mapping: a *group* of `group` consecutive lanes (a power of two <= 32) owns one quantization
// block. Each lane loads whole vectors of VEC elements (16 bytes of input), keeps up to KMAX of
// them in registers, the group reduces amax with shuffles, and the same lanes then encode and
// store. So every input byte is read once and every output byte written once (one pass); blocks
// longer than group*KMAX vectors re-read the rest from L1/L2 rather than spill registers.
//
// Arithmetic (must match deepseek_kernels/reference/quantization.py bit for bit, so every op
// below is an explicitly rounded IEEE op; nothing may be contracted into an FMA):
//   y      = x (+ e)                       fp32
//   scale  = amax(|y|) / qmax              NaN if the block holds a non-finite y
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

#include "blockwise_quant.h"

namespace dsk {
namespace quant {

constexpr int kThreads = 256;
constexpr int kMaxCachedVectors = 4;  // KMAX: vectors per lane kept in registers between passes

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

// Lanes of the calling lane's group, for the shuffles (whole groups exit together).
__device__ __forceinline__ unsigned group_mask(int group) {
  if (group == 32) return 0xffffffffu;
  const int first = (threadIdx.x & 31) & ~(group - 1);
  return ((1u << group) - 1u) << first;
}

template <typename T, typename ET, bool kHasError, int VEC>
__device__ __forceinline__ void load_y(const T* x, const ET* e, float (&y)[VEC]) {
  const Pack<T, VEC> xv = *reinterpret_cast<const Pack<T, VEC>*>(x);
  if constexpr (kHasError) {
    const Pack<ET, VEC> ev = *reinterpret_cast<const Pack<ET, VEC>*>(e);
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = __fadd_rn(to_f32(xv.v[i]), to_f32(ev.v[i]));
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) y[i] = to_f32(xv.v[i]);
  }
}

template <typename ET, bool kHasError, QFormat F, int VEC>
__device__ __forceinline__ void encode_store(const float (&y)[VEC], float scale, float inv,
                                             bool bad, const QuantizeArgs& a, int64_t index,
                                             uint8_t* q, ET* e) {
  using Fmt = Format<F>;
  Pack<uint8_t, VEC> codes;
  Pack<ET, VEC> residual;
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    if (bad) {
      codes.v[i] = 0;
      continue;
    }
    const float v = fminf(fmaxf(__fmul_rn(y[i], inv), -Fmt::kMax), Fmt::kMax);
    const uint8_t c = a.stochastic ? Fmt::round_stochastic(v, uniform01(a.key, index + i))
                                   : Fmt::round_nearest(v);
    codes.v[i] = c;
    if constexpr (kHasError) {
      residual.v[i] = from_f32<ET>(__fsub_rn(y[i], __fmul_rn(Fmt::decode(c), scale)));
    }
  }
  *reinterpret_cast<Pack<uint8_t, VEC>*>(q) = codes;
  if constexpr (kHasError) {
    if (!bad) *reinterpret_cast<Pack<ET, VEC>*>(e) = residual;
  }
}

template <typename T, typename ET, bool kHasError, QFormat F, int VEC>
__global__ void __launch_bounds__(kThreads)
    blockwise_quantize_kernel(const QuantizeArgs a, const int group, const int log2_group) {
  constexpr int KMAX = kMaxCachedVectors;
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * (kThreads >> log2_group) +
                      (threadIdx.x >> log2_group);
  if (gid >= a.rows * nblocks) return;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = gid / nblocks;
  const int64_t col0 = (gid - row * nblocks) * a.block;
  const int nv = static_cast<int>(min(a.block, a.cols - col0)) / VEC;  // exact: see launcher
  const int64_t index0 = row * a.cols + col0;  // logical element index (stochastic rounding)
  const T* x = static_cast<const T*>(a.x) + row * a.x_row_stride + col0;
  ET* e = kHasError ? static_cast<ET*>(a.error) + index0 : nullptr;
  uint8_t* q = a.q + index0;

  // Pass 1: load (keeping KMAX vectors per lane in registers) and reduce amax.
  float y[KMAX][VEC];
  float amax = 0.f;
  bool bad = false;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = lane + k * group;
    if (j < nv) {
      load_y<T, ET, kHasError, VEC>(x + j * VEC, kHasError ? e + j * VEC : nullptr, y[k]);
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float m = fabsf(y[k][i]);
        amax = fmaxf(amax, m);
        bad |= !(m <= FLT_MAX);  // NaN or Inf
      }
    }
  }
  for (int j = lane + KMAX * group; j < nv; j += group) {
    float t[VEC];
    load_y<T, ET, kHasError, VEC>(x + j * VEC, kHasError ? e + j * VEC : nullptr, t);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float m = fabsf(t[i]);
      amax = fmaxf(amax, m);
      bad |= !(m <= FLT_MAX);
    }
  }
  const unsigned mask = group_mask(group);
  for (int off = group >> 1; off > 0; off >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(mask, amax, off));
  }
  bad = __any_sync(mask, bad);

  const float scale = bad ? __int_as_float(0x7fc00000) : __fdiv_rn(amax, Format<F>::kMax);
  const float inv = scale > 0.f ? __frcp_rn(scale) : 0.f;
  if (lane == 0) a.scales[gid] = scale;

  // Pass 2: encode, store codes (and the new residual).
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = lane + k * group;
    if (j < nv) {
      encode_store<ET, kHasError, F, VEC>(y[k], scale, inv, bad, a, index0 + j * VEC,
                                          q + j * VEC, kHasError ? e + j * VEC : nullptr);
    }
  }
  for (int j = lane + KMAX * group; j < nv; j += group) {
    float t[VEC];
    load_y<T, ET, kHasError, VEC>(x + j * VEC, kHasError ? e + j * VEC : nullptr, t);
    encode_store<ET, kHasError, F, VEC>(t, scale, inv, bad, a, index0 + j * VEC, q + j * VEC,
                                        kHasError ? e + j * VEC : nullptr);
  }
}

template <typename OT, QFormat F, int VEC>
__global__ void __launch_bounds__(kThreads)
    blockwise_dequantize_kernel(const DequantizeArgs a, const int group, const int log2_group) {
  constexpr int KMAX = kMaxCachedVectors;
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t gid = static_cast<int64_t>(blockIdx.x) * (kThreads >> log2_group) +
                      (threadIdx.x >> log2_group);
  if (gid >= a.rows * nblocks) return;
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = gid / nblocks;
  const int64_t col0 = (gid - row * nblocks) * a.block;
  const int nv = static_cast<int>(min(a.block, a.cols - col0)) / VEC;
  const uint8_t* q = a.q + row * a.cols + col0;
  OT* out = static_cast<OT*>(a.out) + row * a.cols + col0;
  const float scale = a.scales[gid];

  // All loads of a lane are issued before its first store (q and out may not be known
  // to be disjoint by the compiler, so it would not reorder them for us).
  Pack<uint8_t, VEC> codes[KMAX];
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = lane + k * group;
    if (j < nv) codes[k] = *reinterpret_cast<const Pack<uint8_t, VEC>*>(q + j * VEC);
  }
  auto emit = [&](const Pack<uint8_t, VEC>& c, int j) {
    Pack<OT, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_f32<OT>(__fmul_rn(Format<F>::decode(c.v[i]), scale));
    *reinterpret_cast<Pack<OT, VEC>*>(out + j * VEC) = o;
  };
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
    const int j = lane + k * group;
    if (j < nv) emit(codes[k], j);
  }
  for (int j = lane + KMAX * group; j < nv; j += group) {
    emit(*reinterpret_cast<const Pack<uint8_t, VEC>*>(q + j * VEC), j);
  }
}

// ---- launch helpers -----------------------------------------------------------------------

inline int floor_log2(int v) {
  int l = 0;
  while ((2 << l) <= v) ++l;
  return l;
}

// Lanes per block: enough that each lane handles about `vectors_per_thread` vectors.
inline int pick_log2_group(int64_t block, int vec, int vectors_per_thread) {
  const int vpt = vectors_per_thread > 0 ? vectors_per_thread : 2;
  int64_t lanes = (block / vec) / vpt;
  if (lanes < 1) lanes = 1;
  if (lanes > 32) lanes = 32;
  return floor_log2(static_cast<int>(lanes));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int VEC, typename Kernel, typename Args>
cudaError_t launch_grouped(Kernel kernel, const Args& a, int vectors_per_thread,
                           cudaStream_t stream) {
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t groups = a.rows * nblocks;
  if (groups == 0) return cudaSuccess;
  const int log2_group = pick_log2_group(a.block, VEC, vectors_per_thread);
  const int64_t per_cta = kThreads >> log2_group;
  const int64_t grid = (groups + per_cta - 1) / per_cta;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a, 1 << log2_group, log2_group);
  return cudaGetLastError();
}

template <typename T, typename ET, bool kHasError, QFormat F>
cudaError_t quantize_typed(const QuantizeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(T);
  // The wide path needs every vector to start on a 16-byte boundary: whole rows of vectors
  // (cols % VEC == 0, block % VEC == 0 since block % 16 == 0) and aligned base pointers.
  const bool wide = a.cols % VEC == 0 && a.x_row_stride % VEC == 0 && aligned16(a.x) &&
                    (!kHasError || aligned16(a.error));
  if (wide) {
    return launch_grouped<VEC>(blockwise_quantize_kernel<T, ET, kHasError, F, VEC>, a,
                               a.vectors_per_thread, stream);
  }
  return launch_grouped<1>(blockwise_quantize_kernel<T, ET, kHasError, F, 1>, a,
                           a.vectors_per_thread, stream);
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

template <typename OT, QFormat F>
cudaError_t dequantize_typed(const DequantizeArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(OT);
  if (a.cols % VEC == 0 && aligned16(a.out) && reinterpret_cast<uintptr_t>(a.q) % VEC == 0) {
    return launch_grouped<VEC>(blockwise_dequantize_kernel<OT, F, VEC>, a, a.vectors_per_thread,
                               stream);
  }
  return launch_grouped<1>(blockwise_dequantize_kernel<OT, F, 1>, a, a.vectors_per_thread, stream);
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
