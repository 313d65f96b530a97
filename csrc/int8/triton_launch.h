// Eager int8_matmul above decode sizes: the Triton GEMM's compiled kernel launched from C++ (registered in
// csrc/bindings.cpp). Triton's Python launch path costs 20-55 us of host time per call on the H200's host, as much
// as a 52-us M2048 N4096 K4096 kernel (benchmarks/NOTES.md, session 21), so a loop of eager calls ran at host speed
// whenever that host was slow. Python compiles and launches the first call of each problem key through Triton and
// registers the compiled kernel here (its CUfunction, launch shape and parameter list); later calls with the same
// key are checked, allocated and launched by one pybind11 call.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>

namespace dsk {

// Parameter codes of a registered kernel, in the kernel's parameter order (Python derives them from the PTX entry
// and the values Triton specialized away; deepseek_kernels/ops/int8_matmul.py, cubin_params):
//   0..5   the pointers a_q, b_q, out, a_scale, b_scale, bias (out again where there is no bias)
//   10+i   32-bit integer i of (M, N, K, a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), N, 1)
//   20+i   the same as a 64-bit integer
//   30     a null 64-bit pointer (Triton's scratch pointers, registered only where their size is 0)
constexpr int kCubinPtr = 0, kCubinI32 = 10, kCubinI64 = 20, kCubinNull = 30;

// key: (M, N, K, a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), out dtype code, bias dtype code)
// with dtype codes 0 bf16, 1 fp16, 2 fp32, -1 no bias. Re-registering a key replaces it; the caller bounds the
// number of keys (int8_matmul_cubin_clear).
void int8_matmul_cubin_register(int64_t device, const std::vector<int64_t>& key, int64_t function, int64_t grid_x,
                                int64_t threads, int64_t shared_bytes, const std::vector<int64_t>& params);

// out [M, N] in out_dtype through the registered kernel, or nullopt (nothing launched) when the operands do not
// qualify (M <= 16, not CUDA int8 2-D on one device, K mismatch, scales not contiguous fp32 [M] / [M, 1] and [N],
// bias not a contiguous float [N], a pointer off 16 bytes) or no kernel is registered for their key: the caller
// takes its Python path, which also raises the errors.
std::optional<at::Tensor> int8_matmul_cubin_eager(const std::optional<at::Tensor>& a_q,
                                                  const std::optional<at::Tensor>& b_q,
                                                  const std::optional<at::Tensor>& a_scale,
                                                  const std::optional<at::Tensor>& b_scale,
                                                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype);

// Registered keys and launches so far (tests, diagnostics); clear forgets every key.
int64_t int8_matmul_cubin_entries();
int64_t int8_matmul_cubin_launches();
void int8_matmul_cubin_clear();

}  // namespace dsk
