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

int tuning_vectors_per_thread();

}  // namespace dsk
