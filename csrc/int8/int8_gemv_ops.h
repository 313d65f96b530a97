// Torch-level entry points of the decode-sized int8 ops (registered in csrc/bindings.cpp).
#pragma once

#include <optional>

#include <ATen/core/Tensor.h>

namespace dsk {

// out [M, N] = (a_q [M, K] @ b_q [N, K]^T) * a_scale * b_scale (+ bias), M <= 16, K % 16 == 0. `pdl` (every entry
// here): on sm_90+, the kernels are programmatic dependent launches of the kernel before them in the stream (they
// wait for it before reading anything it may write; the GEMV prefetches the first bytes of its weight rows into L2
// before that wait, DSK_INT8_PREFETCH); the same bits either way.
at::Tensor int8_gemv_cuda(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, bool pdl);

// quantize_per_token(x [M, K], smooth) then int8_gemv with weight [N, K] and weight_scale [N]: two launches from
// one call; the output in x's dtype (float32 for float32).
at::Tensor int8_linear_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                                 bool pdl);

// Bytes of each weight row the GEMV prefetches into L2 before its wait when `pdl` (DSK_INT8_PREFETCH or the
// default; read once per process).
int int8_gemv_prefetch_bytes();

// The eager fast paths of int8_matmul and int8_linear (bound with pybind11 in csrc/bindings.cpp, called from
// Python without the dispatcher): the ops above when the operands qualify for the decode kernels (M <= 16 rows,
// K % 16 == 0, 16-byte aligned int8 rows, one device, sm_80+, nothing needing grad, no CUDA-graph capture on
// the current stream; *_eager_ok says whether they do), else nullopt and nothing launched: the caller takes
// its general path, which also raises the errors (a None for a required operand included). int8_linear_eager
// takes x [..., K] and returns [..., N].
bool int8_gemv_eager_ok(const std::optional<at::Tensor>& a_q, const std::optional<at::Tensor>& b_q,
                        const std::optional<at::Tensor>& a_scale, const std::optional<at::Tensor>& b_scale,
                        const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);
bool int8_linear_eager_ok(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
                          const std::optional<at::Tensor>& weight_scale, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& smooth);
std::optional<at::Tensor> int8_gemv_eager(const std::optional<at::Tensor>& a_q, const std::optional<at::Tensor>& b_q,
                                          const std::optional<at::Tensor>& a_scale,
                                          const std::optional<at::Tensor>& b_scale,
                                          const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                                          bool pdl);
std::optional<at::Tensor> int8_linear_eager(const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& weight_scale,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& smooth, bool pdl);

}  // namespace dsk
