// e5m2 instantiations of the blockwise quantization kernels (one file per format so the
// variants compile in parallel).
#include "blockwise_quant.cuh"

namespace dsk {

cudaError_t quantize_blockwise_e5m2(const QuantizeArgs& a, cudaStream_t stream) {
  return quant::quantize_dispatch<QFormat::kE5M2>(a, stream);
}

cudaError_t dequantize_blockwise_e5m2(const DequantizeArgs& a, cudaStream_t stream) {
  return quant::dequantize_dispatch<QFormat::kE5M2>(a, stream);
}

}  // namespace dsk
