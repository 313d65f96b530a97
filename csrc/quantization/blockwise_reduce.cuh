// Sums of W blockwise-quantized tensors (the DDP hook's reduce step), optionally re-quantized in
// the same kernel. Included by one .cu per format (blockwise_reduce_{int8,e4m3,e5m2}.cu).
//
// Inputs: codes [W, rows, cols] and fp32 scales [W, rows, nblocks], both contiguous (shard w is
// one rank's copy). Arithmetic, bit for bit as deepseek_kernels/reference/quantization.py
// (dequantize_sum_blockwise_ref / requantize_sum_blockwise_ref), every op explicitly rounded:
//   acc = d_0 + d_1 + ... + d_{W-1}     ascending w, d_w = decode(q_w) * scale_w   (fp32)
//   acc = acc / W                        only when averaging (a true division, not * 1/W)
// then either stored in out_dtype (dequantize_sum) or fed as y (+ residual) into exactly the
// quantization arithmetic of blockwise_quant.cuh (requantize_sum): amax, scale, encode, new
// residual. The sum never touches memory, so the reduce step reads W shards of codes once and
// writes one shard of codes: W*S + S bytes (+ scales, + residual) instead of the unfused
// dequantize (W*S in, 4*W*S out) -> mean (4*W*S in, 4*S out) -> quantize (4*S in, S out).
//
// Memory parallelism: a rank's shard is small (S = L / W elements), so there are few lanes per
// byte read; each lane issues the loads of several shards (kShardsPerStep, or the sum + requantize
// kernel's WS) before it adds any of them.
#pragma once

#include "blockwise_quant.cuh"

namespace dsk {
namespace quant {

#ifndef DSK_REDUCE_SHARDS_PER_STEP
#define DSK_REDUCE_SHARDS_PER_STEP 4
#endif
constexpr int kShardsPerStep = DSK_REDUCE_SHARDS_PER_STEP;

// acc / W, bit for bit a true division (__fdiv_rn). For a power-of-two W the product with the exact
// reciprocal 2^-k is the same number: both are the one real value acc * 2^-k rounded to nearest even
// (also where it lands among the subnormals), and one multiply replaces the division's instruction
// sequence (W=8's reduce runs a single wave in which every lane's instructions count). The launchers
// fill `average_by` / `average_pow2` on the host (set_average), so the kernels read them from the
// parameter bank where used instead of holding two registers through the kernel (session 22's form
// did, and the e5m2 wide kernels with 16-bit residuals spilled 8 bytes for it).
template <typename Args>
void set_average(Args& a) {
  a.average_pow2 = a.world > 0 && (a.world & (a.world - 1)) == 0;
  a.average_by = a.average_pow2 ? 1.0f / static_cast<float>(a.world) : static_cast<float>(a.world);
}

template <typename Args>
__device__ __forceinline__ float average(const Args& a, float acc) {
  return a.average_pow2 ? __fmul_rn(acc, a.average_by) : __fdiv_rn(acc, a.average_by);
}

// ---- dequantize + sum (elementwise) ------------------------------------------------------------
//
// Mapping as in blockwise_dequantize_kernel: each lane owns kRoundsDequantize vectors of VEC
// outputs spread kThreads apart; for each it walks the W shards (kShardsPerStep loads in flight).
template <typename OT, QFormat F, int VEC, bool kShift>
__global__ void __launch_bounds__(kThreads)
    dequantize_sum_kernel(const DequantizeSumArgs a, const int log2_block) {
  constexpr int R = kRoundsDequantize;
  constexpr int WS = kShardsPerStep;
  const int64_t numel = a.rows * a.cols;
  const int64_t nvec = numel / VEC;
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t shard_scales = a.rows * nblocks;
  const int64_t v0 = static_cast<int64_t>(blockIdx.x) * R * kThreads + threadIdx.x;
  int64_t elem[R], sidx[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    const int64_t v = v0 + u * kThreads;
    elem[u] = v * VEC;
    if constexpr (kShift) {
      sidx[u] = elem[u] >> log2_block;
    } else {
      const int64_t row = elem[u] / a.cols;
      sidx[u] = row * nblocks + (elem[u] - row * a.cols) / a.block;
    }
  }
  float acc[R][VEC];
  for (int64_t w0 = 0; w0 < a.world; w0 += WS) {
    Pack<uint8_t, VEC> codes[WS][R];
    float scale[WS][R];
#pragma unroll
    for (int dw = 0; dw < WS; ++dw) {
      if (w0 + dw < a.world) {
#pragma unroll
        for (int u = 0; u < R; ++u) {
          if (v0 + u * kThreads < nvec) {
            codes[dw][u] = *reinterpret_cast<const Pack<uint8_t, VEC>*>(a.q + (w0 + dw) * numel + elem[u]);
            scale[dw][u] = a.scales[(w0 + dw) * shard_scales + sidx[u]];
          }
        }
      }
    }
#pragma unroll
    for (int dw = 0; dw < WS; ++dw) {
      if (w0 + dw < a.world) {
#pragma unroll
        for (int u = 0; u < R; ++u) {
          if (v0 + u * kThreads < nvec) {
            float f[VEC];
            decode_codes<F, VEC>(codes[dw][u], f);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float d = __fmul_rn(f[i], scale[dw][u]);
              acc[u][i] = w0 + dw == 0 ? d : __fadd_rn(acc[u][i], d);
            }
          }
        }
      }
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (v0 + u * kThreads < nvec) {
      if (a.average) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[u][i] = average(a, acc[u][i]);
      }
      store_floats<OT, VEC>(static_cast<OT*>(a.out) + elem[u], acc[u]);
    }
  }
}

// ---- dequantize + sum + re-quantize (one group of lanes per block) ------------------------------
//
// As blockwise_quantize_kernel with the input y = sum (+ residual): a group of `group` lanes owns
// one quantization block (kSumRounds blocks per group and CTA); each lane keeps the sums of up to
// kSumCached vectors of its block in registers between the amax pass and the encode pass. Blocks
// longer than group * kSumCached vectors recompute the rest in the second pass (same numbers).
#ifndef DSK_REDUCE_ROUNDS
#define DSK_REDUCE_ROUNDS 1
#endif
constexpr int kSumRounds = DSK_REDUCE_ROUNDS;
// Vectors of 16 codes per lane cached between the passes (lanes per 128-code block: 8 / this).
// 1 (session 12's tune-comm, graphed hook pipeline): twice the CTAs of 2 for the same work, which W=8's
// reduce (100 CTAs at 2) needs: W=8 50.2 -> 47.2 us, W=2 56.0 -> 54.2 us with 3 CTAs per SM below.
#ifndef DSK_REDUCE_CACHED
#define DSK_REDUCE_CACHED 1
#endif
constexpr int kSumCached = DSK_REDUCE_CACHED;

// acc (+)= d_w for one vector of one shard.
template <QFormat F, int VEC>
__device__ __forceinline__ void accumulate(const Pack<uint8_t, VEC>& codes, float scale, bool first,
                                           float (&acc)[VEC]) {
  float f[VEC];
  decode_codes<F, VEC>(codes, f);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    const float d = __fmul_rn(f[i], scale);
    acc[i] = first ? d : __fadd_rn(acc[i], d);
  }
}

// CTAs per SM the register allocation must allow (0: no cap). No cap and 1 differ: nvcc 12.x/13.0 read
// an explicit minimum of 1 as leave to use more registers (the fp32-residual int8 kernel went from 118 to
// 144 registers, 2 -> 1 CTA per SM, and the W=2 hook pipeline from 56 to 65 us; session 11's A/B). 3 with
// one cached vector: ptxas ~80 registers, no spills (tests/test_cuda_resources.py holds the cap).
#ifndef DSK_REDUCE_MIN_BLOCKS
#define DSK_REDUCE_MIN_BLOCKS 3
#endif
// Smaller CTAs keep the same register budget per thread: the cap scales to DSK_REDUCE_MIN_BLOCKS * 256
// threads per SM (at most 32 CTAs, the SM's limit).
constexpr int reduce_min_blocks(int cta) {
  return DSK_REDUCE_MIN_BLOCKS * kThreads / cta > 32 ? 32 : DSK_REDUCE_MIN_BLOCKS * kThreads / cta;
}
#if DSK_REDUCE_MIN_BLOCKS > 0
#define DSK_REDUCE_LAUNCH_BOUNDS __launch_bounds__(kCta, reduce_min_blocks(kCta))
#else
#define DSK_REDUCE_LAUNCH_BOUNDS __launch_bounds__(kCta)
#endif

// kCta threads per CTA (kThreads, or fewer where the grid is a single uneven wave: see the launcher).
template <typename ET, bool kHasError, QFormat F, int VEC, int WS, bool kFlat, int kCta>
__global__ void DSK_REDUCE_LAUNCH_BOUNDS
    requantize_sum_kernel(const RequantizeSumArgs a, const int group, const int log2_group) {
  constexpr int R = kSumRounds;
  constexpr int K = kSumCached;
  const int lane = threadIdx.x & (group - 1);
  const int64_t numel = a.rows * a.cols;
  const int64_t shard_scales = a.rows * ((a.cols + a.block - 1) / a.block);
  BlockCoords c[R];
#pragma unroll
  for (int u = 0; u < R; ++u) c[u] = block_coords<VEC, R, kFlat, kCta>(a.rows, a.cols, a.block, log2_group, u);
  auto index_of = [&](const BlockCoords& b) { return b.row * a.cols + b.col0; };

  // y of vector j of block b: the sum over shards, averaged, plus the residual.
  auto finish = [&](const BlockCoords& b, int j, float (&y)[VEC]) {
    if (a.average) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = average(a, y[i]);
    }
    if constexpr (kHasError) {
      const ET* e = static_cast<const ET*>(a.error) + index_of(b) + j * VEC;
      const Pack<ET, VEC> ev = *reinterpret_cast<const Pack<ET, VEC>*>(e);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y[i] = __fadd_rn(y[i], to_f32(ev.v[i]));
    }
  };
  // The uncached vectors: one at a time, shards in order.
  auto y_of = [&](const BlockCoords& b, int j, float (&y)[VEC]) {
    const int64_t off = index_of(b) + j * VEC;
    for (int64_t w = 0; w < a.world; ++w) {
      const Pack<uint8_t, VEC> cv = *reinterpret_cast<const Pack<uint8_t, VEC>*>(a.q + w * numel + off);
      accumulate<F, VEC>(cv, a.scales[w * shard_scales + b.gid], w == 0, y);
    }
    finish(b, j, y);
  };
  auto y_absmax_bits = [](const float (&y)[VEC]) {
    uint32_t m = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) m = max(m, abs_bits(y[i]));
    return m;
  };

  // Pass 1: sums of the cached vectors, WS shards of loads in flight at a time.
  float ys[R][K][VEC];
  for (int64_t w0 = 0; w0 < a.world; w0 += WS) {
    Pack<uint8_t, VEC> cv[WS][R][K];
    float sc[WS][R];
#pragma unroll
    for (int dw = 0; dw < WS; ++dw) {
      if (w0 + dw < a.world) {
#pragma unroll
        for (int u = 0; u < R; ++u) {
          if (c[u].nv == 0) continue;
          sc[dw][u] = a.scales[(w0 + dw) * shard_scales + c[u].gid];
          const uint8_t* q = a.q + (w0 + dw) * numel + index_of(c[u]);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int j = lane + k * group;
            if (j < c[u].nv) cv[dw][u][k] = *reinterpret_cast<const Pack<uint8_t, VEC>*>(q + j * VEC);
          }
        }
      }
    }
#pragma unroll
    for (int dw = 0; dw < WS; ++dw) {
      if (w0 + dw < a.world) {
#pragma unroll
        for (int u = 0; u < R; ++u) {
#pragma unroll
          for (int k = 0; k < K; ++k) {
            if (lane + k * group < c[u].nv) accumulate<F, VEC>(cv[dw][u][k], sc[dw][u], w0 + dw == 0, ys[u][k]);
          }
        }
      }
    }
  }
  uint32_t m[R];
#pragma unroll
  for (int u = 0; u < R; ++u) {
    m[u] = 0;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + k * group;
      if (j < c[u].nv) {
        finish(c[u], j, ys[u][k]);
        m[u] = max(m[u], y_absmax_bits(ys[u][k]));
      }
    }
    for (int j = lane + K * group; j < c[u].nv; j += group) {
      float t[VEC];
      y_of(c[u], j, t);
      m[u] = max(m[u], y_absmax_bits(t));
    }
  }
#pragma unroll
  for (int u = 0; u < R; ++u) m[u] = group_max(m[u], group);

  // Pass 2: encode and store codes (and the new residual), as blockwise_quantize_kernel does.
  const uint32_t key = a.key_ptr != nullptr ? *a.key_ptr : a.key;
#pragma unroll
  for (int u = 0; u < R; ++u) {
    if (c[u].nv == 0) break;  // later rounds are past the end too
    float scale, inv;
    bool bad;
    scale_of(m[u], Format<F>::kMax, scale, inv, bad);
    if (lane == 0) a.out_scales[c[u].gid] = scale;
    const int64_t index0 = index_of(c[u]);
    uint8_t* q = a.out_q + index0;
    ET* e = kHasError ? static_cast<ET*>(a.error) + index0 : nullptr;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int j = lane + k * group;
      if (j < c[u].nv) {
        encode_store<ET, kHasError, F, VEC>(ys[u][k], scale, inv, bad, a.stochastic, key, index0 + j * VEC,
                                            q + j * VEC, kHasError ? e + j * VEC : nullptr);
      }
    }
    for (int j = lane + K * group; j < c[u].nv; j += group) {
      float t[VEC];
      y_of(c[u], j, t);
      encode_store<ET, kHasError, F, VEC>(t, scale, inv, bad, a.stochastic, key, index0 + j * VEC, q + j * VEC,
                                          kHasError ? e + j * VEC : nullptr);
    }
  }
}

// ---- launchers ----------------------------------------------------------------------------------

template <typename OT, QFormat F, int VEC>
cudaError_t launch_dequantize_sum(DequantizeSumArgs a, cudaStream_t stream) {
  bool flat = false;
  if (a.cols % a.block == 0) {  // whole blocks: one long row per shard (same scale indices)
    a.cols *= a.rows;
    a.rows = 1;
    flat = true;
  }
  const int64_t nvec = a.rows * a.cols / VEC;
  if (nvec == 0 || a.world == 0) return cudaSuccess;
  set_average(a);
  const DequantLaunch l = dequant_launch(nvec, a.block);
  if (l.grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (flat && l.pow2) {
    dequantize_sum_kernel<OT, F, VEC, true><<<static_cast<unsigned>(l.grid), kThreads, 0, stream>>>(a, l.log2_block);
  } else {
    dequantize_sum_kernel<OT, F, VEC, false><<<static_cast<unsigned>(l.grid), kThreads, 0, stream>>>(a, l.log2_block);
  }
  return cudaGetLastError();
}

template <typename OT, QFormat F>
cudaError_t dequantize_sum_typed(const DequantizeSumArgs& a, cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(OT);
  const bool wide = a.cols % VEC == 0 && aligned16(a.out) && reinterpret_cast<uintptr_t>(a.q) % VEC == 0;
  return wide ? launch_dequantize_sum<OT, F, VEC>(a, stream) : launch_dequantize_sum<OT, F, 1>(a, stream);
}

template <QFormat F>
cudaError_t dequantize_sum_dispatch(const DequantizeSumArgs& a, cudaStream_t stream) {
  switch (a.out_dtype) {
    case DType::kF32: return dequantize_sum_typed<float, F>(a, stream);
    case DType::kF16: return dequantize_sum_typed<__half, F>(a, stream);
    case DType::kBF16: return dequantize_sum_typed<__nv_bfloat16, F>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

// Launch forms of the sum + requantize kernel, chosen per call (H200, session 22: the DDP hook's graphed
// pipeline per 25 MiB fp32 bucket, int8, % of copy speed at W=2 / W=8, each a few runs):
//   256-thread CTAs, 16 codes per vector, 4 shards per step (the form until session 21)  74.6 / 68.1-68.8
//    64-thread CTAs, 16 codes per vector, 4 shards per step ("wide")                     75.9-76.2 / 69.1-69.4
//    64-thread CTAs,  8 codes per vector, 8 shards per step                              72.9-73.0 / 69.5-70.1
//    64-thread CTAs,  4 codes per vector, 8 shards per step ("narrow")                   (wide) / 70.1-70.4
// A W=8 shard (51200 vectors of 16 codes) is less than one wave of lanes that each sum 8 shards: it is
// latency-bound, so smaller CTAs (spread evenly over the SMs: 200 CTAs of 256 threads put 2 on some SMs
// and 1 on others) and more lanes, each with all 8 shards' loads in flight, finish it sooner. A W=2 shard
// is bandwidth-bound, where the wide form's fewer, fuller lanes win. Narrow up to kNarrowVectorsPerSm
// 16-code vectors per SM (W=8 at 25 MiB: 388 per SM of the H200's 132; W=2: 1551).
constexpr int kNarrowVectorsPerSm = 512;
#ifndef DSK_REDUCE_NARROW_VEC
#define DSK_REDUCE_NARROW_VEC 4
#endif
constexpr int kNarrowVec = DSK_REDUCE_NARROW_VEC;  // codes per vector of the narrow form (4 or 8)
static_assert(kNarrowVec == 4 || kNarrowVec == 8, "DSK_REDUCE_NARROW_VEC: 4 or 8");

template <typename ET, bool kHasError, QFormat F, int VEC, int WS, int kCta>
cudaError_t launch_requantize_sum_cta(const RequantizeSumArgs& a, bool flat, int64_t groups, int log2_group,
                                      cudaStream_t stream) {
  const int64_t per_cta = (kCta >> log2_group) * kSumRounds;
  const int64_t grid = (groups + per_cta - 1) / per_cta;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  if (flat) {
    requantize_sum_kernel<ET, kHasError, F, VEC, WS, true, kCta>
        <<<static_cast<unsigned>(grid), kCta, 0, stream>>>(a, 1 << log2_group, log2_group);
  } else {
    requantize_sum_kernel<ET, kHasError, F, VEC, WS, false, kCta>
        <<<static_cast<unsigned>(grid), kCta, 0, stream>>>(a, 1 << log2_group, log2_group);
  }
  return cudaGetLastError();
}

// VEC codes per vector (16 or kNarrowVec where every vector starts on a 16-byte boundary of every buffer, else 1),
// WS shards per step; 64-thread CTAs for the vector forms unless the benchmark knob asks for 256.
template <typename ET, bool kHasError, QFormat F, int VEC, int WS>
cudaError_t launch_requantize_sum(RequantizeSumArgs a, cudaStream_t stream) {
  bool flat = false;
  if (a.cols % a.block == 0) {
    a.cols *= a.rows;
    a.rows = 1;
    flat = true;
  }
  const int64_t nblocks = (a.cols + a.block - 1) / a.block;
  const int64_t groups = a.rows * nblocks;
  if (groups == 0 || a.world == 0) return cudaSuccess;
  set_average(a);
  const int log2_group = pick_log2_group(a.block, VEC, kSumCached);
  if constexpr (VEC == 1) {
    return launch_requantize_sum_cta<ET, kHasError, F, VEC, WS, kThreads>(a, flat, groups, log2_group, stream);
  } else {
    return a.cta_threads == kThreads
               ? launch_requantize_sum_cta<ET, kHasError, F, VEC, WS, kThreads>(a, flat, groups, log2_group, stream)
               : launch_requantize_sum_cta<ET, kHasError, F, VEC, WS, 64>(a, flat, groups, log2_group, stream);
  }
}

template <typename ET, bool kHasError, QFormat F>
cudaError_t requantize_sum_typed(const RequantizeSumArgs& a, cudaStream_t stream) {
  const bool wide = a.cols % 16 == 0 && aligned16(a.q) && aligned16(a.out_q) && (!kHasError || aligned16(a.error));
  if (!wide) return launch_requantize_sum<ET, kHasError, F, 1, kShardsPerStep>(a, stream);
  const bool narrow = a.form == ReduceForm::kNarrow ||
                      (a.form == ReduceForm::kAuto && a.sm_count > 0 &&
                       a.rows * a.cols / 16 <= int64_t{kNarrowVectorsPerSm} * a.sm_count);
  return narrow ? launch_requantize_sum<ET, kHasError, F, kNarrowVec, 8>(a, stream)
                : launch_requantize_sum<ET, kHasError, F, 16, 4>(a, stream);
}

template <QFormat F>
cudaError_t requantize_sum_dispatch(const RequantizeSumArgs& a, cudaStream_t stream) {
  switch (a.error_dtype) {
    case DType::kNone: return requantize_sum_typed<float, false, F>(a, stream);
    case DType::kF32: return requantize_sum_typed<float, true, F>(a, stream);
    case DType::kF16: return requantize_sum_typed<__half, true, F>(a, stream);
    case DType::kBF16: return requantize_sum_typed<__nv_bfloat16, true, F>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace quant
}  // namespace dsk
