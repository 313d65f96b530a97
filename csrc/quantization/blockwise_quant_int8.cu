// int8 instantiations of the blockwise quantization kernels (one file per format so the
// variants compile in parallel).
#include "blockwise_quant.cuh"

namespace dsk {

cudaError_t quantize_blockwise_int8(const QuantizeArgs& a, cudaStream_t stream) {
  return quant::quantize_dispatch<QFormat::kInt8>(a, stream);
}

cudaError_t dequantize_blockwise_int8(const DequantizeArgs& a, cudaStream_t stream) {
  return quant::dequantize_dispatch<QFormat::kInt8>(a, stream);
}

}  // namespace dsk
