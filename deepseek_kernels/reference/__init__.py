"""Plain-PyTorch definitions of every op: readable, slow, exact. The test oracle, the CPU
implementation, and the baseline the benchmarks compile with torch.compile."""

from deepseek_kernels.reference.quantization import (
    FORMATS,
    dequantize_blockwise_ref,
    quantize_blockwise_ref,
    stochastic_key,
    uniform_for_indices,
)

__all__ = [
    "FORMATS",
    "dequantize_blockwise_ref",
    "quantize_blockwise_ref",
    "stochastic_key",
    "uniform_for_indices",
]
