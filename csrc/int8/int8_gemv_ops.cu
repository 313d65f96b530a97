// Torch-facing wrappers of the decode-sized int8 kernels (int8_gemv.cuh): argument checks with
// messages that name the argument, output allocation, device guard, stream, launch. Checks are
// whole here (the Python fast path calls these ops without checking first).
#include "int8/int8_gemv_ops.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <exception>
#include <string>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/core/GradMode.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>

#include "int8/int8_gemv.cuh"

namespace dsk {
namespace {

using gemv::FType;

// Messages pass only strings to TORCH_CHECK (see csrc/quantization/blockwise_quant_ops.cpp).
std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
std::string dtype_str(at::ScalarType t) { return c10::toString(t); }

bool float_type(at::ScalarType t, FType* out) {
  switch (t) {
    case at::kFloat: *out = FType::kF32; return true;
    case at::kHalf: *out = FType::kF16; return true;
    case at::kBFloat16: *out = FType::kBF16; return true;
    default: return false;
  }
}

void check_cuda(const char* op, const char* arg, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", arg, " must be on one device with the first operand (",
                    device.str(), "), got ", t.device().str());
}

// An int8 [rows, K] operand the kernel reads in 16-byte pieces.
void check_codes(const char* op, const char* arg, const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kChar, op, ": ", arg, " must be int8, got ", dtype_str(t.scalar_type()),
                    "; quantize first (quantize_per_token / Int8Linear.from_float)");
  TORCH_CHECK_VALUE(t.dim() == 2, op, ": ", arg, " must be 2-D ", what, ", got shape ", shape_str(t.sizes()));
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got ", t.device().str());
  const bool rows_ok = t.size(0) == 1 || t.stride(0) % 16 == 0;
  TORCH_CHECK_VALUE(t.stride(1) == 1 && rows_ok && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ",
                    arg, " must have unit stride along K and 16-byte aligned rows (strides ", shape_str(t.strides()),
                    "); int8_matmul takes any layout");
}

// fp32 [n] or [n, 1] (`shapes` names them), made contiguous if it is not.
at::Tensor scale_vector(const char* op, const char* arg, const at::Tensor& t, int64_t n, const char* shapes,
                        const at::Device& device) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat, op, ": ", arg, " must be float32, got ", dtype_str(t.scalar_type()));
  TORCH_CHECK_VALUE(t.numel() == n && t.dim() <= 2 && (t.dim() < 2 || t.size(1) == 1), op, ": ", arg,
                    " must have shape ", shapes, " = ", std::to_string(n), ", got ", shape_str(t.sizes()));
  check_cuda(op, arg, t, device);
  return t.is_contiguous() ? t : t.contiguous();
}

// An optional floating-point vector [n]: (pointer or nullptr, its type), kept alive in `keep`.
const void* float_vector(const char* op, const char* arg, const std::optional<at::Tensor>& t, int64_t n,
                         const char* dim_name, const at::Device& device, FType* type, at::Tensor* keep) {
  *type = FType::kF32;
  if (!t.has_value()) return nullptr;
  TORCH_CHECK_VALUE(float_type(t->scalar_type(), type) && t->dim() == 1 && t->size(0) == n, op, ": ", arg,
                    " must be a floating-point tensor (float32, float16 or bfloat16) of shape [", dim_name, "] = (",
                    std::to_string(n), ",), got ", dtype_str(t->scalar_type()), " ", shape_str(t->sizes()));
  check_cuda(op, arg, *t, device);
  *keep = t->is_contiguous() ? *t : t->contiguous();
  return keep->data_ptr();
}

void check_rows(const char* op, const char* arg, int64_t M, int64_t K) {
  TORCH_CHECK_VALUE(M >= 1 && M <= gemv::kMaxRows, op, ": ", arg, " must have 1 to 16 rows (decode sizes), got ",
                    std::to_string(M), "; int8_matmul / int8_linear take any M");
  TORCH_CHECK_VALUE(K > 0 && K % 16 == 0, op, ": K must be a positive multiple of 16, got ", std::to_string(K),
                    "; int8_matmul / int8_linear take any K");
}

void check_arch(const char* op, const at::Device& device) {
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device.index());
  TORCH_CHECK(prop->major >= 8, op, ": needs an sm_80 or newer GPU (int8 mma.sync), got sm_",
              std::to_string(prop->major), std::to_string(prop->minor));
}

// An integer tuning switch from the environment (callers read it once per process): `fallback` when `name` is unset
// or empty, else its value, which must satisfy `ok` (an error names the variable and what it takes otherwise).
template <typename Ok>
int env_int(const char* name, int fallback, Ok ok, const char* expected) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == 0) return fallback;
  const std::string s(v);
  int n = 0;
  bool parsed = false;
  try {
    size_t used = 0;
    n = std::stoi(s, &used);
    parsed = used == s.size();
  } catch (const std::exception&) {
  }
  TORCH_CHECK_VALUE(parsed && ok(n), name, " must be ", expected, ", got '", s, "'");
  return n;
}

// A kernel launch on `stream`, as a programmatic dependent launch of the kernel before it when `pdl` (the kernels
// call chain_wait before touching anything another kernel writes).
template <typename... KArgs, typename... Args>
cudaError_t launch_chained(void (*kernel)(KArgs...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
                           bool pdl, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid);
  cfg.blockDim = dim3(block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

// How many CTAs of `Kernel` (with `smem` bytes of dynamic shared memory) the device holds at once (SMs x resident
// CTAs per SM), per device, asked once per kernel (the kernel is a template argument: one cache each).
template <auto Kernel>
int64_t resident_ctas(int threads, size_t smem = 0) {
  static std::array<int64_t, 64> cache{};  // 0: not asked yet
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64) return 0;
  if (cache[device] == 0) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem) != cudaSuccess) return 0;
    cache[device] = static_cast<int64_t>(per_sm) * at::cuda::getDeviceProperties(device)->multiProcessorCount;
  }
  return cache[device];
}

template <int SUB, int UNROLL>
cudaError_t launch(gemv::GemvArgs a, cudaStream_t stream, bool pdl) {
  const int ctas = (a.N + 8 * SUB - 1) / (8 * SUB);
  constexpr auto kernel = gemv::int8_gemv_kernel<SUB, UNROLL>;
  a.early_trigger = ctas <= resident_ctas<kernel>(gemv::kThreads);
  return launch_chained(kernel, ctas, gemv::kThreads, 0, stream, pdl, a);
}

// DSK_INT8_GEMV_ROWS (16, 32 or 64 weight rows per CTA; unset: by M and N, below), read once per process: the
// tuning switch benchmarks/tune_int8_gemv.py sets per child process.
int gemv_rows_override() {
  static const int rows =
      env_int("DSK_INT8_GEMV_ROWS", 0, [](int n) { return n == 16 || n == 32 || n == 64; }, "16, 32 or 64");
  return rows;
}

// Rows per CTA, from the tuners on the H200 (benchmarks/NOTES.md): 32 above 8 activation rows (sessions 14-15, M16
// N14336 K4096 graphed: 19.0-19.2 vs 19.9-20.1 us at 16 rows), and, since the kernels chain (session 20,
// diag_int8_prefetch.py, graphed, programmatic launches), also for fewer rows when 32-row CTAs still fill every SM
// twice over (M1 / M4 N14336 K4096: 16.6 / 16.6 us vs 17.3 / 17.5 at 16 rows, where plain launches had favoured 16
// rows, 17.5 vs 17.9-18.0 us; M1 N4096 K14336, 128 CTAs of 32 rows: 17.9 vs 16.9 us). 64 rows lost everywhere (M1
// N14336 K4096: 19.1 us); 8 rows per CTA, SUB 1 x UNROLL 16, too (session 15: 23.9 us at M1). Every form streams 16
// weight pieces of 16 bytes per lane and loop trip (8 x SUB rows x UNROLL K steps).
cudaError_t launch_gemv(const gemv::GemvArgs& a, cudaStream_t stream, bool pdl) {
  int rows = gemv_rows_override();
  if (rows == 0) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    rows = a.M > 8 || a.N >= 64 * sms ? 32 : 16;
  }
  switch (rows) {
    case 64: return launch<8, 2>(a, stream, pdl);
    case 32: return launch<4, 4>(a, stream, pdl);
    default: return launch<2, 8>(a, stream, pdl);
  }
}

// Bytes of each weight row the GEMV prefetches into L2 before its grid-dependency wait, when it is a programmatic
// dependent launch (DSK_INT8_PREFETCH: a multiple of 16, 0 for none; read once per process: a tuning switch, like
// DSK_INT8_GEMV_ROWS). Without the launch attribute the wait returns at once and a prefetch would gain nothing.
constexpr int kDefaultPrefetch = 1024;

int prefetch_setting() {
  static const int bytes = env_int("DSK_INT8_PREFETCH", kDefaultPrefetch, [](int n) { return n >= 0 && n % 16 == 0; },
                                   "a non-negative multiple of 16 (bytes)");
  return bytes;
}

// A programmatic dependent launch where asked for and the device has one (sm_90+).
bool chain_ok(bool pdl, const at::Device& device) {
  return pdl && at::cuda::getDeviceProperties(device.index())->major >= 9;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The GEMV on checked operands: a [M, K] int8 rows `lda` bytes apart, b [N, K] rows `ldb` apart; out [M, N].
void run_gemv(const char* op, const int8_t* a, int64_t lda, const at::Tensor& b_q, const float* a_scale,
              const float* b_scale, const void* bias, FType bias_t, int64_t M, int64_t K, void* out, FType out_t,
              cudaStream_t stream, bool pdl) {
  const int64_t N = b_q.size(0);
  gemv::GemvArgs g;
  g.a = a;
  g.b = b_q.data_ptr<int8_t>();
  g.a_scale = a_scale;
  g.b_scale = b_scale;
  g.bias = bias;
  g.bias_t = bias_t;
  g.out = out;
  g.out_t = out_t;
  g.lda = M > 1 ? lda : K;
  g.ldb = N > 1 ? b_q.stride(0) : K;
  g.M = static_cast<int>(M);
  g.N = static_cast<int>(N);
  g.K = static_cast<int>(K);
  g.prefetch = pdl ? static_cast<int>(std::min<int64_t>(prefetch_setting(), K)) : 0;  // K % 16 == 0
  g.early_trigger = false;
  check_launch(launch_gemv(g, stream, pdl), op);
}

// int8_linear's two steps on checked operands: x2 [M, K] (unit stride along K), weight [N, K], sw fp32 [N]
// contiguous; the output [*out_shape] in x's dtype. One workspace holds the codes [M, K] and the scales [M]
// (K % 16 == 0: the scales start 16-byte aligned): two host allocations per call, not three.
at::Tensor run_linear(const char* op, const at::Tensor& x2, FType x_t, const at::Tensor& weight, const at::Tensor& sw,
                      const void* bias, FType bias_t, const void* smooth, FType smooth_t, at::IntArrayRef out_shape,
                      cudaStream_t stream, bool pdl) {
  const int64_t M = x2.size(0), K = x2.size(1);
  at::Tensor out = at::empty(out_shape, x2.options());
  at::Tensor work = at::empty({M * K + 4 * M}, x2.options().dtype(at::kChar));
  int8_t* codes = work.data_ptr<int8_t>();
  float* scales = reinterpret_cast<float*>(codes + M * K);
  check_launch(launch_chained(gemv::quantize_rows_kernel, static_cast<unsigned>(M), gemv::kQuantThreads, 0, stream,
                              pdl, x2.data_ptr(), x_t, M > 1 ? x2.stride(0) : K, smooth, smooth_t, codes, K, scales,
                              static_cast<int>(K)),
               op);
  run_gemv(op, codes, K, weight, scales, sw.data_ptr<float>(), bias, bias_t, M, K, out.data_ptr(), x_t, stream, pdl);
  return out;
}

// ---- the eager entries' predicates: true exactly when the checked ops below would accept the operands and take
// the decode kernels, so a false never hides an error (the caller's general path raises it). None for a required
// operand: false. They read no device state; launchable() does, under the caller's device guard. ----

using OptTensor = std::optional<at::Tensor>;

bool rows_ok(const at::Tensor& t) {  // int8 [rows, K], 16-byte pieces
  return t.scalar_type() == at::kChar && t.dim() == 2 && t.stride(1) == 1 && (t.size(0) == 1 || t.stride(0) % 16 == 0) &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

bool on(const at::Tensor& t, const at::Device& device) { return t.device() == device; }

bool vector_ok(const OptTensor& t, int64_t n, const at::Device& device, FType* type) {
  *type = FType::kF32;
  return !t.has_value() || (float_type(t->scalar_type(), type) && t->dim() == 1 && t->size(0) == n && on(*t, device));
}

bool scale_ok(const at::Tensor& t, int64_t n, const at::Device& device) {
  return t.scalar_type() == at::kFloat && t.numel() == n && t.dim() >= 1 && t.dim() <= 2 &&
         (t.dim() < 2 || t.size(1) == 1) && on(t, device);
}

bool wants_grad(const OptTensor& t) { return t.has_value() && t->requires_grad() && c10::GradMode::is_enabled(); }

// The types the kernels take, found by the predicates.
struct Types {
  FType x = FType::kF32, out = FType::kF32, bias = FType::kF32, smooth = FType::kF32;
};

bool gemv_qualifies(const OptTensor& a_q, const OptTensor& b_q, const OptTensor& a_scale, const OptTensor& b_scale,
                    const OptTensor& bias, at::ScalarType out_dtype, Types* ty) {
  if (!a_q || !b_q || !a_scale || !b_scale || !a_q->is_cuda() || !rows_ok(*a_q) || !rows_ok(*b_q)) return false;
  const at::Device device = a_q->device();
  const int64_t M = a_q->size(0), N = b_q->size(0), K = a_q->size(1);
  return M >= 1 && M <= gemv::kMaxRows && K > 0 && K % 16 == 0 && b_q->size(1) == K && N >= 1 && on(*b_q, device) &&
         float_type(out_dtype, &ty->out) && scale_ok(*a_scale, M, device) && scale_ok(*b_scale, N, device) &&
         vector_ok(bias, N, device, &ty->bias) && !wants_grad(a_scale) && !wants_grad(b_scale) && !wants_grad(bias);
}

bool linear_qualifies(const OptTensor& x, const OptTensor& weight, const OptTensor& weight_scale, const OptTensor& bias,
                      const OptTensor& smooth, Types* ty) {
  if (!x || !weight || !weight_scale || !x->is_cuda() || !float_type(x->scalar_type(), &ty->x) || x->dim() < 1 ||
      !rows_ok(*weight))
    return false;
  const at::Device device = x->device();
  const int64_t K = x->size(-1), N = weight->size(0);
  if (K <= 0 || K % 16 != 0 || weight->size(1) != K || N < 1 || !on(*weight, device)) return false;
  const int64_t M = x->numel() / K;
  return M >= 1 && M <= gemv::kMaxRows && weight_scale->dim() == 1 && scale_ok(*weight_scale, N, device) &&
         vector_ok(bias, N, device, &ty->bias) && vector_ok(smooth, K, device, &ty->smooth) && !wants_grad(x) &&
         !wants_grad(bias) && !wants_grad(smooth);
}

// Under a guard for `device`: sm_80 or newer, and its current stream not capturing a CUDA graph (under capture
// the Triton kernels run: as fast or faster there, benchmarks/NOTES.md, session 14).
bool launchable(const at::Device& device) {
  return at::cuda::getDeviceProperties(device.index())->major >= 8 &&
         c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
}

// A qualified 1-d vector's data, made contiguous in `keep` if it is not (nullptr for none).
const void* vector_data(const OptTensor& t, at::Tensor* keep) {
  if (!t.has_value()) return nullptr;
  *keep = t->is_contiguous() ? *t : t->contiguous();
  return keep->data_ptr();
}

at::Tensor contiguous(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

}  // namespace

int int8_gemv_prefetch_bytes() { return prefetch_setting(); }

at::Tensor int8_gemv_cuda(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                          at::ScalarType out_dtype, bool pdl) {
  const char* op = "int8_matmul (decode kernel)";
  check_codes(op, "a_q", a_q, "[M, K]");
  check_codes(op, "b_q", b_q, "[N, K]");
  const at::Device device = a_q.device();
  check_cuda(op, "b_q", b_q, device);
  TORCH_CHECK_VALUE(a_q.size(1) == b_q.size(1), op, ": K mismatch: a_q is ", shape_str(a_q.sizes()),
                    " ([M, K]) and b_q is ", shape_str(b_q.sizes()), " ([N, K])");
  const int64_t M = a_q.size(0), N = b_q.size(0), K = a_q.size(1);
  check_rows(op, "a_q", M, K);
  TORCH_CHECK_VALUE(N >= 1, op, ": b_q must have at least one row, got ", shape_str(b_q.sizes()));
  FType out_t;
  TORCH_CHECK_VALUE(float_type(out_dtype, &out_t), op, ": out_dtype must be bfloat16, float16 or float32, got ",
                    dtype_str(out_dtype));
  const at::Tensor sa = scale_vector(op, "a_scale", a_scale, M, "[M, 1] or [M] with M", device);
  const at::Tensor sb = scale_vector(op, "b_scale", b_scale, N, "[N] with N", device);
  FType bias_t;
  at::Tensor bias_keep;
  const void* bias_ptr = float_vector(op, "bias", bias, N, "N", device, &bias_t, &bias_keep);
  check_arch(op, device);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({M, N}, a_q.options().dtype(out_dtype));
  run_gemv(op, a_q.data_ptr<int8_t>(), a_q.stride(0), b_q, sa.data_ptr<float>(), sb.data_ptr<float>(), bias_ptr,
           bias_t, M, K, out.data_ptr(), out_t, at::cuda::getCurrentCUDAStream(device.index()).stream(),
           chain_ok(pdl, device));
  return out;
}

at::Tensor int8_linear_gemv_cuda(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& weight_scale,
                                 const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& smooth,
                                 bool pdl) {
  const char* op = "int8_linear (decode kernel)";
  FType x_t;
  TORCH_CHECK_VALUE(float_type(x.scalar_type(), &x_t), op,
                    ": x must be a floating-point tensor (float32, float16 or bfloat16) [M, K], got ",
                    dtype_str(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device().str());
  check_codes(op, "weight", weight, "[N, K]");
  const at::Device device = x.device();
  check_cuda(op, "weight", weight, device);
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), op, ": K mismatch: x is ", shape_str(x.sizes()),
                    " ([M, K]) and weight is ", shape_str(weight.sizes()), " ([N, K])");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  check_rows(op, "x", M, K);
  TORCH_CHECK_VALUE(N >= 1, op, ": weight must have at least one row, got ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(weight_scale.scalar_type() == at::kFloat && weight_scale.dim() == 1, op,
                    ": weight_scale must be a float32 tensor of shape [N] = (", std::to_string(N), ",), got ",
                    dtype_str(weight_scale.scalar_type()), " ", shape_str(weight_scale.sizes()));
  const at::Tensor sw = scale_vector(op, "weight_scale", weight_scale, N, "[N] with N", device);
  FType bias_t, smooth_t;
  at::Tensor bias_keep, smooth_keep;
  const void* bias_ptr = float_vector(op, "bias", bias, N, "N", device, &bias_t, &bias_keep);
  const void* smooth_ptr = float_vector(op, "smooth", smooth, K, "K", device, &smooth_t, &smooth_keep);
  check_arch(op, device);

  const c10::cuda::CUDAGuard guard(device);
  const at::Tensor x2 = x.stride(1) == 1 ? x : x.contiguous();
  return run_linear(op, x2, x_t, weight, sw, bias_ptr, bias_t, smooth_ptr, smooth_t, {M, N},
                    at::cuda::getCurrentCUDAStream(device.index()).stream(), chain_ok(pdl, device));
}

bool int8_gemv_eager_ok(const OptTensor& a_q, const OptTensor& b_q, const OptTensor& a_scale, const OptTensor& b_scale,
                        const OptTensor& bias, at::ScalarType out_dtype) {
  Types ty;
  if (!gemv_qualifies(a_q, b_q, a_scale, b_scale, bias, out_dtype, &ty)) return false;
  const c10::cuda::CUDAGuard guard(a_q->device());
  return launchable(a_q->device());
}

bool int8_linear_eager_ok(const OptTensor& x, const OptTensor& weight, const OptTensor& weight_scale,
                          const OptTensor& bias, const OptTensor& smooth) {
  Types ty;
  if (!linear_qualifies(x, weight, weight_scale, bias, smooth, &ty)) return false;
  const c10::cuda::CUDAGuard guard(x->device());
  return launchable(x->device());
}

OptTensor int8_gemv_eager(const OptTensor& a_q, const OptTensor& b_q, const OptTensor& a_scale, const OptTensor& b_scale,
                          const OptTensor& bias, at::ScalarType out_dtype, bool pdl) {
  Types ty;
  if (!gemv_qualifies(a_q, b_q, a_scale, b_scale, bias, out_dtype, &ty)) return std::nullopt;
  const at::Device device = a_q->device();
  const c10::cuda::CUDAGuard guard(device);
  if (!launchable(device)) return std::nullopt;
  const int64_t M = a_q->size(0), N = b_q->size(0), K = a_q->size(1);
  const at::Tensor sa = contiguous(*a_scale), sb = contiguous(*b_scale);
  at::Tensor bias_keep;
  const void* bias_ptr = vector_data(bias, &bias_keep);
  at::Tensor out = at::empty({M, N}, a_q->options().dtype(out_dtype));
  run_gemv("int8_matmul (decode kernel)", a_q->data_ptr<int8_t>(), a_q->stride(0), *b_q, sa.data_ptr<float>(),
           sb.data_ptr<float>(), bias_ptr, ty.bias, M, K, out.data_ptr(), ty.out,
           at::cuda::getCurrentCUDAStream(device.index()).stream(), chain_ok(pdl, device));
  return out;
}

OptTensor int8_linear_eager(const OptTensor& x, const OptTensor& weight, const OptTensor& weight_scale,
                            const OptTensor& bias, const OptTensor& smooth, bool pdl) {
  Types ty;
  if (!linear_qualifies(x, weight, weight_scale, bias, smooth, &ty)) return std::nullopt;
  const at::Device device = x->device();
  const c10::cuda::CUDAGuard guard(device);
  if (!launchable(device)) return std::nullopt;
  const int64_t K = x->size(-1), N = weight->size(0);
  at::Tensor x2 = x->reshape({x->numel() / K, K});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  at::Tensor bias_keep, smooth_keep;
  const void* bias_ptr = vector_data(bias, &bias_keep);
  const void* smooth_ptr = vector_data(smooth, &smooth_keep);
  std::vector<int64_t> out_shape(x->sizes().begin(), x->sizes().end());
  out_shape.back() = N;
  return run_linear("int8_linear (decode kernel)", x2, ty.x, *weight, contiguous(*weight_scale), bias_ptr, ty.bias,
                    smooth_ptr, ty.smooth, out_shape, at::cuda::getCurrentCUDAStream(device.index()).stream(),
                    chain_ok(pdl, device));
}

}  // namespace dsk
