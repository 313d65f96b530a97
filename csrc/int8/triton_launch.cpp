// The registry and launcher of csrc/int8/triton_launch.h.
#include "int8/triton_launch.h"

#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <unordered_map>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda.h>
#include <cuda_runtime_api.h>

namespace dsk {
namespace {

constexpr int kKeyInts = 9;    // M, N, K, four operand strides, out dtype, bias dtype
constexpr int kMaxParams = 32;  // the GEMM has 15 runtime parameters plus Triton's scratch pointers

struct Key {
  int64_t device;
  std::array<int64_t, kKeyInts> v;
  bool operator==(const Key& o) const { return device == o.device && v == o.v; }
};

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 1469598103934665603ull ^ static_cast<uint64_t>(k.device);
    for (int64_t x : k.v) h = (h ^ static_cast<uint64_t>(x)) * 1099511628211ull;
    return static_cast<size_t>(h);
  }
};

struct Plan {
  CUfunction function;
  unsigned grid_x, threads, shared_bytes;
  std::vector<int8_t> params;
};

std::mutex registry_mutex;
std::unordered_map<Key, Plan, KeyHash>& registry() {
  static auto* r = new std::unordered_map<Key, Plan, KeyHash>();  // never destroyed: no teardown-order issues
  return *r;
}
std::atomic<int64_t> launches{0};

int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return 0;
    case at::kHalf: return 1;
    case at::kFloat: return 2;
    default: return -2;
  }
}

using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);

// cuLaunchKernel from the driver the runtime loaded (no link-time dependency on libcuda: the extension still
// imports on machines without a GPU driver).
LaunchFn launch_fn() {
  static LaunchFn fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuLaunchKernel", &p, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuLaunchKernel", &p, cudaEnableDefault, &status);
#endif
    TORCH_CHECK(err == cudaSuccess && status == cudaDriverEntryPointSuccess && p != nullptr,
                "int8_matmul: could not get cuLaunchKernel from the CUDA driver (", cudaGetErrorString(err), ")");
    return reinterpret_cast<LaunchFn>(p);
  }();
  return fn;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool int8_2d(const at::Tensor& t, const at::Device& device) {
  return t.scalar_type() == at::kChar && t.dim() == 2 && t.device() == device;
}

// fp32, n elements as [n] (or [n, 1] where `column` is allowed), contiguous, on `device`.
bool scale_ok(const at::Tensor& t, int64_t n, bool column, const at::Device& device) {
  return t.scalar_type() == at::kFloat && t.numel() == n && t.is_contiguous() && t.device() == device &&
         (t.dim() == 1 || (column && t.dim() == 2 && t.size(1) == 1));
}

}  // namespace

void int8_matmul_cubin_register(int64_t device, const std::vector<int64_t>& key, int64_t function, int64_t grid_x,
                                int64_t threads, int64_t shared_bytes, const std::vector<int64_t>& params) {
  TORCH_CHECK_VALUE(key.size() == kKeyInts, "int8_matmul_cubin_register: key must hold ", std::to_string(kKeyInts),
                    " integers, got ", std::to_string(key.size()));
  TORCH_CHECK_VALUE(function != 0 && grid_x > 0 && grid_x <= 0x7fffffffLL && threads > 0 && threads <= 1024 &&
                        shared_bytes >= 0 && params.size() <= kMaxParams,
                    "int8_matmul_cubin_register: a launch shape out of range (grid ", std::to_string(grid_x),
                    ", threads ", std::to_string(threads), ", shared bytes ", std::to_string(shared_bytes), ", ",
                    std::to_string(params.size()), " parameters)");
  Plan plan{reinterpret_cast<CUfunction>(static_cast<uintptr_t>(function)), static_cast<unsigned>(grid_x),
            static_cast<unsigned>(threads), static_cast<unsigned>(shared_bytes), {}};
  for (int64_t c : params) {
    const bool ok = (c >= kCubinPtr && c <= kCubinPtr + 5) || (c >= kCubinI32 && c < kCubinI32 + 9) ||
                    (c >= kCubinI64 && c < kCubinI64 + 9) || c == kCubinNull;
    TORCH_CHECK_VALUE(ok, "int8_matmul_cubin_register: unknown parameter code ", std::to_string(c));
    plan.params.push_back(static_cast<int8_t>(c));
  }
  Key k{device, {}};
  std::copy(key.begin(), key.end(), k.v.begin());
  const std::lock_guard<std::mutex> lock(registry_mutex);
  registry()[k] = std::move(plan);
}

std::optional<at::Tensor> int8_matmul_cubin_eager(const std::optional<at::Tensor>& a_q,
                                                  const std::optional<at::Tensor>& b_q,
                                                  const std::optional<at::Tensor>& a_scale,
                                                  const std::optional<at::Tensor>& b_scale,
                                                  const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  if (!a_q || !b_q || !a_scale || !b_scale || !a_q->is_cuda()) return std::nullopt;
  const at::Device device = a_q->device();
  if (!int8_2d(*a_q, device) || !int8_2d(*b_q, device)) return std::nullopt;
  const int64_t M = a_q->size(0), N = b_q->size(0), K = a_q->size(1);
  const int out_code = dtype_code(out_dtype);
  if (M <= 16 || N < 1 || K < 1 || b_q->size(1) != K || out_code < 0) return std::nullopt;
  if (!scale_ok(*a_scale, M, true, device) || !scale_ok(*b_scale, N, false, device)) return std::nullopt;
  int bias_code = -1;
  if (bias.has_value()) {
    bias_code = dtype_code(bias->scalar_type());
    if (bias_code < 0 || bias->dim() != 1 || bias->size(0) != N || !bias->is_contiguous() || bias->device() != device)
      return std::nullopt;
  }
  const void* ptrs[6] = {a_q->data_ptr(), b_q->data_ptr(), nullptr, a_scale->data_ptr(), b_scale->data_ptr(),
                         bias.has_value() ? bias->data_ptr() : nullptr};
  for (const void* p : {ptrs[0], ptrs[1], ptrs[3], ptrs[4], ptrs[5]}) {
    if (!aligned16(p)) return std::nullopt;  // Triton compiled for the 16-byte aligned pointers it saw
  }
  const std::array<int64_t, 9> ints = {M, N, K, a_q->stride(0), a_q->stride(1), b_q->stride(0), b_q->stride(1), N, 1};
  Key k{device.index(), {M, N, K, ints[3], ints[4], ints[5], ints[6], out_code, bias_code}};
  Plan plan;
  {
    const std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = registry().find(k);
    if (it == registry().end()) return std::nullopt;
    plan = it->second;
  }
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({M, N}, a_q->options().dtype(out_dtype));
  ptrs[2] = out.data_ptr();
  if (!bias.has_value()) ptrs[5] = ptrs[2];  // what the Python launch passes for the unused bias pointer

  uint64_t storage[kMaxParams];
  void* params[kMaxParams];
  for (size_t i = 0; i < plan.params.size(); ++i) {
    const int c = plan.params[i];
    if (c == kCubinNull) {
      storage[i] = 0;
    } else if (c >= kCubinI64) {
      storage[i] = static_cast<uint64_t>(ints[c - kCubinI64]);
    } else if (c >= kCubinI32) {
      const int32_t v = static_cast<int32_t>(ints[c - kCubinI32]);
      storage[i] = 0;
      std::memcpy(&storage[i], &v, sizeof(v));
    } else {
      storage[i] = reinterpret_cast<uintptr_t>(ptrs[c - kCubinPtr]);
    }
    params[i] = &storage[i];
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(device.index()).stream();
  const CUresult res = launch_fn()(plan.function, plan.grid_x, 1, 1, plan.threads, 1, 1, plan.shared_bytes,
                                   reinterpret_cast<CUstream>(stream), params, nullptr);
  TORCH_CHECK(res == CUDA_SUCCESS, "int8_matmul: launching the compiled Triton GEMM failed (CUDA driver error ",
              std::to_string(static_cast<int>(res)), "); DSK_INT8_CUBIN=0 takes Triton's own launcher");
  launches.fetch_add(1, std::memory_order_relaxed);
  return out;
}

int64_t int8_matmul_cubin_entries() {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  return static_cast<int64_t>(registry().size());
}

int64_t int8_matmul_cubin_launches() { return launches.load(std::memory_order_relaxed); }

void int8_matmul_cubin_clear() {
  const std::lock_guard<std::mutex> lock(registry_mutex);
  registry().clear();
}

}  // namespace dsk
