// Torch-level entry points of the decode-sized int8 ops (registered in csrc/bindings.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace dsk {

// out [M, N] = (a_q [M, K] @ b_q [N, K]^T) * a_scale * b_scale (+ bias), M <= 16, K % 16 == 0.
at::Tensor int8_gemv_cuda(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype);

// quantize_per_token(x [M, K], smooth) then int8_gemv with weight [N, K] and weight_scale [N]: two launches
// from one call, or one (quantize inside the GEMV) for a single row with DSK_INT8_LINEAR_ROW=1; the same
// bits either way; the output in x's dtype (float32 for float32).
at::Tensor int8_linear_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth);

}  // namespace dsk
