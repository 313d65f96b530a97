// Torch-level entry points of the blockwise quantization ops (registered in csrc/bindings.cpp).
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

namespace dsk {

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x,
                                                           c10::string_view fmt, int64_t block,
                                                           bool stochastic, int64_t seed,
                                                           const std::optional<at::Tensor>& error);

at::Tensor dequantize_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block,
                                     at::ScalarType out_dtype);

// Sum over dim 0 of W quantized tensors q [W, ..., N] (scales [W, ..., nb]) in fp32, ascending w,
// optionally / W; out [..., N] in out_dtype.
at::Tensor dequantize_sum_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block,
                                         bool average, at::ScalarType out_dtype);

// The same sum re-quantized in q's format and block (+ error feedback): codes [..., N], scales.
std::tuple<at::Tensor, at::Tensor> requantize_sum_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales,
                                                                 int64_t block, bool average, bool stochastic,
                                                                 int64_t seed,
                                                                 const std::optional<at::Tensor>& error,
                                                                 const std::optional<at::Tensor>& key);

// Quantizes a 1-d x [N] into the first N codes of q_out [M] and ceil(N / block) scales of
// scales_out [ceil(M / block)], zero-filling the rest of both (a padded send buffer).
void quantize_blockwise_into_cuda(const at::Tensor& x, c10::string_view fmt, int64_t block, bool stochastic,
                                  int64_t seed, const std::optional<at::Tensor>& error, const at::Tensor& q_out,
                                  const at::Tensor& scales_out, const std::optional<at::Tensor>& key);

int tuning_vectors_per_thread();
// Benchmark-only knobs of the sum + requantize kernel, read once: DSK_REDUCE_FORM=wide|narrow (else chosen
// by size) and DSK_REDUCE_CTA=256 (256-thread CTAs, the form until session 21; else 64).
int tuning_reduce_form();
int tuning_reduce_cta();

}  // namespace dsk
