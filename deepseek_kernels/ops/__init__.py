"""Public functional ops. Importing this package registers every op under torch.ops.deepseek_kernels."""

from deepseek_kernels.ops.attention import window_attention
from deepseek_kernels.ops.hierarchical_attention import hierarchical_attention
from deepseek_kernels.ops.int8_matmul import int8_linear, int8_matmul, int8_mm, quantize_per_token
from deepseek_kernels.ops.quantization import (
    dequantize_blockwise,
    dequantize_sum_blockwise,
    quantize_blockwise,
    quantize_blockwise_into,
    requantize_sum_blockwise,
)
from deepseek_kernels.ops.sparse_ffn import SparseRouting, gated_sparse_ffn

__all__ = [
    "SparseRouting",
    "dequantize_blockwise",
    "dequantize_sum_blockwise",
    "gated_sparse_ffn",
    "hierarchical_attention",
    "int8_linear",
    "int8_matmul",
    "int8_mm",
    "quantize_blockwise",
    "quantize_blockwise_into",
    "quantize_per_token",
    "requantize_sum_blockwise",
    "window_attention",
]
