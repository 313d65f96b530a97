"""Plain-PyTorch definitions of every op: readable, slow, exact. The test oracle, the CPU
implementation, and the baseline the benchmarks compile with torch.compile."""

from deepseek_kernels.reference.attention import attended_pairs, window_attention_ref, window_mask
from deepseek_kernels.reference.hierarchical_attention import (
    hierarchical_attention_bwd_ref,
    hierarchical_attention_ref,
    visible_summaries,
)
from deepseek_kernels.reference.int8_matmul import int8_matmul_ref, int8_mm_ref, quantize_per_token_ref
from deepseek_kernels.reference.sparse_ffn import (
    gated_sparse_ffn_ref,
    route_ref,
    sparse_ffn_blocks_ref,
    swiglu_ffn_ref,
)
from deepseek_kernels.reference.quantization import (
    FORMATS,
    dequantize_blockwise_ref,
    dequantize_sum_blockwise_ref,
    quantize_blockwise_into_ref,
    quantize_blockwise_ref,
    requantize_sum_blockwise_ref,
    stochastic_key,
    uniform_for_indices,
)

__all__ = [
    "FORMATS",
    "attended_pairs",
    "hierarchical_attention_bwd_ref",
    "hierarchical_attention_ref",
    "int8_matmul_ref",
    "int8_mm_ref",
    "quantize_per_token_ref",
    "gated_sparse_ffn_ref",
    "route_ref",
    "sparse_ffn_blocks_ref",
    "swiglu_ffn_ref",
    "visible_summaries",
    "window_attention_ref",
    "window_mask",
    "dequantize_blockwise_ref",
    "dequantize_sum_blockwise_ref",
    "quantize_blockwise_into_ref",
    "quantize_blockwise_ref",
    "requantize_sum_blockwise_ref",
    "stochastic_key",
    "uniform_for_indices",
]
