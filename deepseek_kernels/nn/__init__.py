"""Drop-in modules built on the ops, and model-level conversions."""

from deepseek_kernels.nn.attention import WindowedAttention
from deepseek_kernels.nn.int8 import Int8Linear, QuantizeReport, quantize_model
from deepseek_kernels.nn.sparse_ffn import GatedSparseFFN, SparsityReport

__all__ = ["GatedSparseFFN", "Int8Linear", "QuantizeReport", "SparsityReport", "WindowedAttention", "quantize_model"]
