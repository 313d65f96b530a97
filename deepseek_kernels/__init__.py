"""deepseek_kernels: fast GPU kernels for DeepSeek-style training and serving, as PyTorch ops.

Every op is registered under ``torch.ops.deepseek_kernels`` (CUDA kernels from the compiled
extension ``deepseek_kernels._C``, CPU paths from ``deepseek_kernels.reference``) and exposed here
as a plain function. ``info()`` prints what this install can do; ``explain(op, *args)`` says which
implementation a call takes.
"""

from deepseek_kernels import _extension
from deepseek_kernels.info import info
from deepseek_kernels.ops import (
    dequantize_blockwise,
    dequantize_sum_blockwise,
    gated_sparse_ffn,
    hierarchical_attention,
    int8_linear,
    int8_matmul,
    int8_mm,
    quantize_blockwise,
    quantize_blockwise_into,
    quantize_per_token,
    requantize_sum_blockwise,
    window_attention,
)
from deepseek_kernels.ops._registry import explain
from deepseek_kernels.decode import RollingKVCache, window_attention_decode
from deepseek_kernels.hierarchical_decode import HierarchicalKVCache, hierarchical_attention_decode
from deepseek_kernels.nn import quantize_model

__version__ = "0.1.0"

__all__ = [
    "HierarchicalKVCache",
    "RollingKVCache",
    "__version__",
    "dequantize_blockwise",
    "dequantize_sum_blockwise",
    "explain",
    "gated_sparse_ffn",
    "hierarchical_attention",
    "hierarchical_attention_decode",
    "info",
    "int8_linear",
    "int8_matmul",
    "int8_mm",
    "quantize_blockwise",
    "quantize_blockwise_into",
    "quantize_model",
    "quantize_per_token",
    "requantize_sum_blockwise",
    "window_attention",
    "window_attention_decode",
]


def extension_available() -> bool:
    """True when the compiled CUDA extension is loaded."""
    return _extension.available()
