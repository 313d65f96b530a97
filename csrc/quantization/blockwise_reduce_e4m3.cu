// e4m3 instantiations of the quantized-shard reductions (one file per format so the variants
// compile in parallel).
#include "blockwise_reduce.cuh"

namespace dsk {

cudaError_t dequantize_sum_blockwise_e4m3(const DequantizeSumArgs& a, cudaStream_t stream) {
  return quant::dequantize_sum_dispatch<QFormat::kE4M3>(a, stream);
}

cudaError_t requantize_sum_blockwise_e4m3(const RequantizeSumArgs& a, cudaStream_t stream) {
  return quant::requantize_sum_dispatch<QFormat::kE4M3>(a, stream);
}

}  // namespace dsk
