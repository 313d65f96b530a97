// Raw-pointer launchers for blockwise quantization (no torch headers here).
//
// Layout: the input is viewed as a matrix [rows, cols] whose last dimension is contiguous
// (row stride `x_row_stride` elements). Each row is cut into `nblocks = ceil(cols / block)`
// blocks of `block` elements (the last one may be shorter). Codes `q` are contiguous
// [rows, cols] bytes, `scales` contiguous fp32 [rows, nblocks]. The math is defined in
// deepseek_kernels/reference/quantization.py; the kernels reproduce it bit for bit.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace dsk {

enum class QFormat : int { kInt8 = 0, kE4M3 = 1, kE5M2 = 2 };
enum class DType : int { kNone = -1, kF32 = 0, kF16 = 1, kBF16 = 2 };

struct QuantizeArgs {
  const void* x = nullptr;      // [rows, cols], row stride x_row_stride, unit stride
  DType x_dtype = DType::kF32;
  int64_t x_row_stride = 0;
  void* error = nullptr;        // optional residual [rows, cols] contiguous, read + written
  DType error_dtype = DType::kNone;
  uint8_t* q = nullptr;         // codes [rows, cols] contiguous (int8 or fp8 bit patterns)
  float* scales = nullptr;      // [rows, nblocks] contiguous
  int64_t rows = 0, cols = 0, block = 0;
  bool stochastic = false;
  uint32_t key = 0;             // stochastic-rounding key derived from the seed (see reference)
  const uint32_t* key_ptr = nullptr;  // optional: the key read from device memory instead (a CUDA
                                      // graph replays one launch with a new key each time)
  int vectors_per_thread = 0;   // tuning knob; 0 = default
};

struct DequantizeArgs {
  const uint8_t* q = nullptr;   // [rows, cols] contiguous codes
  const float* scales = nullptr;
  void* out = nullptr;          // [rows, cols] contiguous
  DType out_dtype = DType::kF32;
  int64_t rows = 0, cols = 0, block = 0;
  int vectors_per_thread = 0;
};

// Sum of `world` quantized tensors (the DDP hook's reduce step). Codes `q` are contiguous
// [world, rows, cols] bytes and `scales` contiguous fp32 [world, rows, nblocks]: shard w starts at
// w * rows * cols codes and w * rows * nblocks scales. Per element, in fp32 with every op rounded
// once: acc = d_0 + d_1 + ... + d_{world-1} (ascending w, d_w = decode(q) * scale), then
// acc / world when `average`. Defined in reference/quantization.py (dequantize_sum_blockwise_ref).
struct DequantizeSumArgs {
  const uint8_t* q = nullptr;
  const float* scales = nullptr;
  void* out = nullptr;          // [rows, cols] contiguous
  DType out_dtype = DType::kF32;
  int64_t world = 0, rows = 0, cols = 0, block = 0;
  bool average = false;
  // Filled by the launcher from `world` (set_average in blockwise_reduce.cuh): 1/W for a power of two, else W.
  float average_by = 1.f;
  bool average_pow2 = false;
};

// The same sum, re-quantized in the format of `q` with the same block (one kernel: the sum never
// leaves registers). Writes codes `out_q` [rows, cols] and `out_scales` [rows, nblocks]; with
// `error` given, quantizes sum + error and updates the residual in place, exactly as
// quantize_blockwise does (requantize_sum_blockwise_ref).
enum class ReduceForm : int { kAuto = 0, kWide = 1, kNarrow = 2 };

struct RequantizeSumArgs {
  const uint8_t* q = nullptr;
  const float* scales = nullptr;
  int64_t world = 0, rows = 0, cols = 0, block = 0;
  bool average = false;
  float average_by = 1.f;       // filled by the launcher from `world`, as in DequantizeSumArgs
  bool average_pow2 = false;
  void* error = nullptr;        // optional residual [rows, cols] contiguous, read + written
  DType error_dtype = DType::kNone;
  uint8_t* out_q = nullptr;
  float* out_scales = nullptr;
  bool stochastic = false;
  uint32_t key = 0;
  const uint32_t* key_ptr = nullptr;  // optional: the key from device memory (as in QuantizeArgs)
  // Launch form (blockwise_reduce.cuh): chosen by size unless a benchmark knob fixes it.
  ReduceForm form = ReduceForm::kAuto;
  int sm_count = 0;    // SMs of the device (the size rule's unit); 0: the wide form
  int cta_threads = 0;  // 256: 256-thread CTAs (the form until session 21); otherwise 64
};

// murmur3's 32-bit finalizer. The stochastic-rounding stream is a hash of (key, logical element
// index), so it is reproducible, independent of strides and launch shape, and the reference
// computes the same numbers.
__host__ __device__ inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t stochastic_key(uint64_t seed) {
  return mix32(static_cast<uint32_t>(seed) ^
               mix32(static_cast<uint32_t>(seed >> 32) ^ 0x9e3779b9u));
}

// Each returns the cudaError_t of the launch (cudaSuccess when there is nothing to do).
cudaError_t quantize_blockwise_int8(const QuantizeArgs& a, cudaStream_t stream);
cudaError_t quantize_blockwise_e4m3(const QuantizeArgs& a, cudaStream_t stream);
cudaError_t quantize_blockwise_e5m2(const QuantizeArgs& a, cudaStream_t stream);
cudaError_t dequantize_blockwise_int8(const DequantizeArgs& a, cudaStream_t stream);
cudaError_t dequantize_blockwise_e4m3(const DequantizeArgs& a, cudaStream_t stream);
cudaError_t dequantize_blockwise_e5m2(const DequantizeArgs& a, cudaStream_t stream);
cudaError_t dequantize_sum_blockwise_int8(const DequantizeSumArgs& a, cudaStream_t stream);
cudaError_t dequantize_sum_blockwise_e4m3(const DequantizeSumArgs& a, cudaStream_t stream);
cudaError_t dequantize_sum_blockwise_e5m2(const DequantizeSumArgs& a, cudaStream_t stream);
cudaError_t requantize_sum_blockwise_int8(const RequantizeSumArgs& a, cudaStream_t stream);
cudaError_t requantize_sum_blockwise_e4m3(const RequantizeSumArgs& a, cudaStream_t stream);
cudaError_t requantize_sum_blockwise_e5m2(const RequantizeSumArgs& a, cudaStream_t stream);

}  // namespace dsk
