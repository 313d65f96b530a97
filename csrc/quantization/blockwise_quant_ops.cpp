// Torch-facing wrappers of the blockwise quantization launchers: argument checks, output
// allocation, device guard and stream. The kernels themselves live in blockwise_quant_*.cu.
#include "quantization/blockwise_quant_ops.h"

#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "quantization/blockwise_quant.h"

namespace dsk {
namespace {

QFormat parse_format(c10::string_view fmt) {
  if (fmt == "int8") return QFormat::kInt8;
  if (fmt == "fp8_e4m3") return QFormat::kE4M3;
  if (fmt == "fp8_e5m2") return QFormat::kE5M2;
  TORCH_CHECK_VALUE(false, "quantize_blockwise: fmt must be one of 'int8', 'fp8_e4m3', 'fp8_e5m2', got '",
                    std::string(fmt), "'");
}

at::ScalarType code_dtype(QFormat f) {
  switch (f) {
    case QFormat::kInt8: return at::kChar;
    case QFormat::kE4M3: return at::kFloat8_e4m3fn;
    case QFormat::kE5M2: return at::kFloat8_e5m2;
  }
  return at::kChar;
}

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kF32;
    case at::kHalf: return DType::kF16;
    case at::kBFloat16: return DType::kBF16;
    default: return DType::kNone;
  }
}

void check_block(const char* op, int64_t block) {
  TORCH_CHECK_VALUE(block > 0 && block % 16 == 0, op,
                    ": block must be a positive multiple of 16, got ", std::to_string(block));
}

// Messages pass only strings to TORCH_CHECK: shapes, numbers, dtypes and devices are formatted
// here first. Streaming an integer (or an ArrayRef of them) into the check's message from this
// extension segfaulted on the H200 image (torch 2.11, extension built there) instead of raising;
// strings stream fine. tests/test_quantization.py::test_cuda_bad_input covers every message.
std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
std::string dtype_str(at::ScalarType t) { return c10::toString(t); }
std::string device_str(const at::Device& d) { return d.str(); }

std::vector<int64_t> scales_shape(at::IntArrayRef shape, int64_t nblocks) {
  std::vector<int64_t> s(shape.begin(), shape.end() - 1);
  s.push_back(nblocks);
  return s;
}

QFormat format_of_codes(const char* op, const char* arg, at::ScalarType t) {
  switch (t) {
    case at::kChar: return QFormat::kInt8;
    case at::kFloat8_e4m3fn: return QFormat::kE4M3;
    case at::kFloat8_e5m2: return QFormat::kE5M2;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", arg, " must be int8, float8_e4m3fn or float8_e5m2, got ", dtype_str(t));
  }
  return QFormat::kInt8;
}

cudaError_t launch_quantize(QFormat f, const QuantizeArgs& a, cudaStream_t stream) {
  switch (f) {
    case QFormat::kInt8: return quantize_blockwise_int8(a, stream);
    case QFormat::kE4M3: return quantize_blockwise_e4m3(a, stream);
    case QFormat::kE5M2: return quantize_blockwise_e5m2(a, stream);
  }
  return cudaErrorInvalidValue;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err));
}

// The optional device-resident stochastic-rounding key: int32 [1] on `device`; its bits are the key.
const uint32_t* key_pointer(const char* op, const std::optional<at::Tensor>& key, const at::Device& device) {
  if (!key.has_value()) return nullptr;
  const at::Tensor& k = *key;
  TORCH_CHECK_VALUE(k.scalar_type() == at::kInt && k.numel() == 1, op,
                    ": key must be an int32 tensor of one element, got ", dtype_str(k.scalar_type()), " ",
                    shape_str(k.sizes()));
  TORCH_CHECK_VALUE(k.device() == device, op, ": key must be on the device of the data (", device_str(device),
                    "), got ", device_str(k.device()));
  return reinterpret_cast<const uint32_t*>(k.data_ptr<int32_t>());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& x,
                                                           c10::string_view fmt, int64_t block,
                                                           bool stochastic, int64_t seed,
                                                           const std::optional<at::Tensor>& error) {
  const char* op = "quantize_blockwise";
  const QFormat f = parse_format(fmt);
  check_block(op, block);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", device_str(x.device()));
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension");
  TORCH_CHECK_VALUE(to_dtype(x.scalar_type()) != DType::kNone, op,
                    ": x must be float32, float16 or bfloat16, got ", dtype_str(x.scalar_type()));
  if (error.has_value()) {
    const at::Tensor& e = *error;
    TORCH_CHECK_VALUE(e.device() == x.device(), op, ": error must be on the device of x (",
                      device_str(x.device()), "), got ", device_str(e.device()));
    TORCH_CHECK_VALUE(e.sizes() == x.sizes(), op, ": error must have the shape of x ",
                      shape_str(x.sizes()), ", got ", shape_str(e.sizes()));
    TORCH_CHECK_VALUE(to_dtype(e.scalar_type()) != DType::kNone, op,
                      ": error must be float32, bfloat16 or float16, got ", dtype_str(e.scalar_type()));
    TORCH_CHECK_VALUE(e.is_contiguous(), op, ": error is updated in place and must be contiguous");
  }

  const int64_t cols = x.size(-1);
  const int64_t nblocks = (cols + block - 1) / block;
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(code_dtype(f)));
  at::Tensor scales = at::empty(scales_shape(x.sizes(), nblocks), x.options().dtype(at::kFloat));
  if (x.numel() == 0) return {q, scales};

  // A [rows, cols] view with a unit last stride; copy only when no such view exists.
  at::Tensor x2 = x.reshape({-1, cols});
  if (x2.stride(1) != 1 || (x2.size(0) > 1 && x2.stride(0) < cols)) x2 = x2.contiguous();

  const c10::cuda::CUDAGuard guard(x.device());
  QuantizeArgs a;
  a.x = x2.data_ptr();
  a.x_dtype = to_dtype(x.scalar_type());
  a.x_row_stride = x2.size(0) > 1 ? x2.stride(0) : cols;
  if (error.has_value()) {
    a.error = error->data_ptr();
    a.error_dtype = to_dtype(error->scalar_type());
  }
  a.q = static_cast<uint8_t*>(q.data_ptr());
  a.scales = scales.data_ptr<float>();
  a.rows = x2.size(0);
  a.cols = cols;
  a.block = block;
  a.stochastic = stochastic;
  a.key = stochastic_key(static_cast<uint64_t>(seed));
  a.vectors_per_thread = tuning_vectors_per_thread();
  check_launch(launch_quantize(f, a, c10::cuda::getCurrentCUDAStream()), op);
  return {q, scales};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block,
                                     at::ScalarType out_dtype) {
  const char* op = "dequantize_blockwise";
  check_block(op, block);
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", device_str(q.device()));
  TORCH_CHECK_VALUE(q.dim() >= 1, op, ": q must have at least one dimension");
  const QFormat f = format_of_codes(op, "q", q.scalar_type());
  TORCH_CHECK_VALUE(to_dtype(out_dtype) != DType::kNone, op,
                    ": out_dtype must be float32, float16 or bfloat16, got ", dtype_str(out_dtype));
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ",
                    dtype_str(scales.scalar_type()));
  TORCH_CHECK_VALUE(scales.device() == q.device(), op, ": scales must be on the device of q (",
                    device_str(q.device()), "), got ", device_str(scales.device()));
  const int64_t cols = q.size(-1);
  const int64_t nblocks = (cols + block - 1) / block;
  const auto expected = scales_shape(q.sizes(), nblocks);
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef(expected), op, ": scales must have shape ",
                    shape_str(expected), " for q of shape ", shape_str(q.sizes()), " and block ", std::to_string(block),
                    ", got ", shape_str(scales.sizes()));

  at::Tensor out = at::empty(q.sizes(), q.options().dtype(out_dtype));
  if (q.numel() == 0) return out;
  const at::Tensor q2 = q.reshape({-1, cols}).contiguous();
  const at::Tensor s2 = scales.contiguous();

  const c10::cuda::CUDAGuard guard(q.device());
  DequantizeArgs a;
  a.q = static_cast<const uint8_t*>(q2.data_ptr());
  a.scales = s2.data_ptr<float>();
  a.out = out.data_ptr();
  a.out_dtype = to_dtype(out_dtype);
  a.rows = q2.size(0);
  a.cols = cols;
  a.block = block;
  a.vectors_per_thread = tuning_vectors_per_thread();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (f) {
    case QFormat::kInt8: err = dequantize_blockwise_int8(a, stream); break;
    case QFormat::kE4M3: err = dequantize_blockwise_e4m3(a, stream); break;
    case QFormat::kE5M2: err = dequantize_blockwise_e5m2(a, stream); break;
  }
  check_launch(err, op);
  return out;
}

namespace {

// Shared checks of the two reductions: q [W, ..., N] codes, scales [W, ..., nb] fp32.
QFormat check_sum_args(const char* op, const at::Tensor& q, const at::Tensor& scales, int64_t block) {
  check_block(op, block);
  TORCH_CHECK_VALUE(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", device_str(q.device()));
  TORCH_CHECK_VALUE(q.dim() >= 2, op, ": q must be [W, ..., N] (at least two dimensions), got shape ",
                    shape_str(q.sizes()));
  TORCH_CHECK_VALUE(q.size(0) >= 1, op, ": q must hold at least one tensor to sum (W >= 1), got shape ",
                    shape_str(q.sizes()));
  const QFormat f = format_of_codes(op, "q", q.scalar_type());
  TORCH_CHECK_VALUE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ",
                    dtype_str(scales.scalar_type()));
  TORCH_CHECK_VALUE(scales.device() == q.device(), op, ": scales must be on the device of q (",
                    device_str(q.device()), "), got ", device_str(scales.device()));
  const int64_t nblocks = (q.size(-1) + block - 1) / block;
  const auto expected = scales_shape(q.sizes(), nblocks);
  TORCH_CHECK_VALUE(scales.sizes() == at::IntArrayRef(expected), op, ": scales must have shape ",
                    shape_str(expected), " for q of shape ", shape_str(q.sizes()), " and block ",
                    std::to_string(block), ", got ", shape_str(scales.sizes()));
  return f;
}

}  // namespace

at::Tensor dequantize_sum_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales, int64_t block,
                                         bool average, at::ScalarType out_dtype) {
  const char* op = "dequantize_sum_blockwise";
  const QFormat f = check_sum_args(op, q, scales, block);
  TORCH_CHECK_VALUE(to_dtype(out_dtype) != DType::kNone, op,
                    ": out_dtype must be float32, float16 or bfloat16, got ", dtype_str(out_dtype));
  at::Tensor out = at::empty(q.sizes().slice(1), q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const at::Tensor q2 = q.contiguous();
  const at::Tensor s2 = scales.contiguous();

  const c10::cuda::CUDAGuard guard(q.device());
  DequantizeSumArgs a;
  a.q = static_cast<const uint8_t*>(q2.data_ptr());
  a.scales = s2.data_ptr<float>();
  a.out = out.data_ptr();
  a.out_dtype = to_dtype(out_dtype);
  a.world = q.size(0);
  a.cols = q.size(-1);
  a.rows = out.numel() / a.cols;
  a.block = block;
  a.average = average;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (f) {
    case QFormat::kInt8: err = dequantize_sum_blockwise_int8(a, stream); break;
    case QFormat::kE4M3: err = dequantize_sum_blockwise_e4m3(a, stream); break;
    case QFormat::kE5M2: err = dequantize_sum_blockwise_e5m2(a, stream); break;
  }
  check_launch(err, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> requantize_sum_blockwise_cuda(const at::Tensor& q, const at::Tensor& scales,
                                                                 int64_t block, bool average, bool stochastic,
                                                                 int64_t seed,
                                                                 const std::optional<at::Tensor>& error,
                                                                 const std::optional<at::Tensor>& key) {
  const char* op = "requantize_sum_blockwise";
  const QFormat f = check_sum_args(op, q, scales, block);
  const uint32_t* key_ptr = key_pointer(op, key, q.device());
  const at::IntArrayRef shape = q.sizes().slice(1);
  if (error.has_value()) {
    const at::Tensor& e = *error;
    TORCH_CHECK_VALUE(e.device() == q.device(), op, ": error must be on the device of q (",
                      device_str(q.device()), "), got ", device_str(e.device()));
    TORCH_CHECK_VALUE(e.sizes() == shape, op, ": error must have the shape of one summand q[0] ",
                      shape_str(shape), ", got ", shape_str(e.sizes()));
    TORCH_CHECK_VALUE(to_dtype(e.scalar_type()) != DType::kNone, op,
                      ": error must be float32, bfloat16 or float16, got ", dtype_str(e.scalar_type()));
    TORCH_CHECK_VALUE(e.is_contiguous(), op, ": error is updated in place and must be contiguous");
  }
  at::Tensor out_q = at::empty(shape, q.options());
  at::Tensor out_scales = at::empty(scales.sizes().slice(1), scales.options());
  if (out_q.numel() == 0) return {out_q, out_scales};
  const at::Tensor q2 = q.contiguous();
  const at::Tensor s2 = scales.contiguous();

  const c10::cuda::CUDAGuard guard(q.device());
  RequantizeSumArgs a;
  a.q = static_cast<const uint8_t*>(q2.data_ptr());
  a.scales = s2.data_ptr<float>();
  a.world = q.size(0);
  a.cols = q.size(-1);
  a.rows = out_q.numel() / a.cols;
  a.block = block;
  a.average = average;
  if (error.has_value()) {
    a.error = error->data_ptr();
    a.error_dtype = to_dtype(error->scalar_type());
  }
  a.out_q = static_cast<uint8_t*>(out_q.data_ptr());
  a.out_scales = out_scales.data_ptr<float>();
  a.stochastic = stochastic;
  a.key = stochastic_key(static_cast<uint64_t>(seed));
  a.key_ptr = key_ptr;
  a.sm_count = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  a.cta_threads = tuning_reduce_cta();
  a.form = static_cast<ReduceForm>(tuning_reduce_form());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = cudaSuccess;
  switch (f) {
    case QFormat::kInt8: err = requantize_sum_blockwise_int8(a, stream); break;
    case QFormat::kE4M3: err = requantize_sum_blockwise_e4m3(a, stream); break;
    case QFormat::kE5M2: err = requantize_sum_blockwise_e5m2(a, stream); break;
  }
  check_launch(err, op);
  return {out_q, out_scales};
}

void quantize_blockwise_into_cuda(const at::Tensor& x, c10::string_view fmt, int64_t block, bool stochastic,
                                  int64_t seed, const std::optional<at::Tensor>& error, const at::Tensor& q_out,
                                  const at::Tensor& scales_out, const std::optional<at::Tensor>& key) {
  const char* op = "quantize_blockwise_into";
  const QFormat f = parse_format(fmt);
  check_block(op, block);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", device_str(x.device()));
  TORCH_CHECK_VALUE(x.dim() == 1, op, ": x must be 1-d [N], got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(to_dtype(x.scalar_type()) != DType::kNone, op,
                    ": x must be float32, float16 or bfloat16, got ", dtype_str(x.scalar_type()));
  TORCH_CHECK_VALUE(q_out.scalar_type() == code_dtype(f), op, ": q_out must hold ", std::string(fmt),
                    " codes (", dtype_str(code_dtype(f)), "), got ", dtype_str(q_out.scalar_type()));
  TORCH_CHECK_VALUE(q_out.dim() == 1 && q_out.is_contiguous(), op,
                    ": q_out must be a contiguous 1-d buffer, got shape ", shape_str(q_out.sizes()));
  TORCH_CHECK_VALUE(q_out.size(0) >= x.size(0), op, ": q_out must hold at least the ", std::to_string(x.size(0)),
                    " codes of x, got ", std::to_string(q_out.size(0)));
  const int64_t nb_out = (q_out.size(0) + block - 1) / block;
  TORCH_CHECK_VALUE(scales_out.scalar_type() == at::kFloat && scales_out.dim() == 1 &&
                        scales_out.is_contiguous() && scales_out.size(0) == nb_out,
                    op, ": scales_out must be a contiguous float32 [", std::to_string(nb_out),
                    "] buffer (ceil(q_out.numel() / block)), got ", dtype_str(scales_out.scalar_type()), " ",
                    shape_str(scales_out.sizes()));
  for (const at::Tensor* t : {&q_out, &scales_out}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), op, ": q_out and scales_out must be on the device of x (",
                      device_str(x.device()), "), got ", device_str(t->device()));
  }
  if (error.has_value()) {
    const at::Tensor& e = *error;
    TORCH_CHECK_VALUE(e.device() == x.device(), op, ": error must be on the device of x (",
                      device_str(x.device()), "), got ", device_str(e.device()));
    TORCH_CHECK_VALUE(e.sizes() == x.sizes(), op, ": error must have the shape of x ", shape_str(x.sizes()),
                      ", got ", shape_str(e.sizes()));
    TORCH_CHECK_VALUE(to_dtype(e.scalar_type()) != DType::kNone, op,
                      ": error must be float32, bfloat16 or float16, got ", dtype_str(e.scalar_type()));
    TORCH_CHECK_VALUE(e.is_contiguous(), op, ": error is updated in place and must be contiguous");
  }
  const uint32_t* key_ptr = key_pointer(op, key, x.device());
  const at::Tensor x2 = x.contiguous();
  const int64_t n = x.size(0);
  const int64_t nb = (n + block - 1) / block;

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n > 0) {
    QuantizeArgs a;
    a.x = x2.data_ptr();
    a.x_dtype = to_dtype(x.scalar_type());
    a.x_row_stride = n;
    if (error.has_value()) {
      a.error = error->data_ptr();
      a.error_dtype = to_dtype(error->scalar_type());
    }
    a.q = static_cast<uint8_t*>(q_out.data_ptr());
    a.scales = scales_out.data_ptr<float>();
    a.rows = 1;
    a.cols = n;
    a.block = block;
    a.stochastic = stochastic;
    a.key = stochastic_key(static_cast<uint64_t>(seed));
    a.key_ptr = key_ptr;
    a.vectors_per_thread = tuning_vectors_per_thread();
    check_launch(launch_quantize(f, a, stream), op);
  }
  // The padding: zero codes and zero scales (memsets, no kernel of ours).
  if (q_out.size(0) > n) {
    check_launch(cudaMemsetAsync(static_cast<uint8_t*>(q_out.data_ptr()) + n, 0, q_out.size(0) - n, stream), op);
  }
  if (nb_out > nb) {
    check_launch(cudaMemsetAsync(scales_out.data_ptr<float>() + nb, 0, (nb_out - nb) * sizeof(float), stream), op);
  }
}

int tuning_vectors_per_thread() {
  // Benchmark-only knob (vectors each lane handles); read once. Unset: the launcher's default.
  static const int v = [] {
    const char* s = std::getenv("DSK_QUANT_VECTORS_PER_THREAD");
    return s ? std::atoi(s) : 0;
  }();
  return v;
}

int tuning_reduce_form() {
  static const int v = [] {
    const char* s = std::getenv("DSK_REDUCE_FORM");
    if (s == nullptr) return 0;
    const std::string f(s);
    return f == "wide" ? 1 : f == "narrow" ? 2 : 0;
  }();
  return v;
}

int tuning_reduce_cta() {
  static const int v = [] {
    const char* s = std::getenv("DSK_REDUCE_CTA");
    const int c = s ? std::atoi(s) : 0;
    return c == 256 ? c : 0;
  }();
  return v;
}

}  // namespace dsk
