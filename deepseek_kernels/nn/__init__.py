"""Drop-in modules built on the ops, and model-level conversions."""

from deepseek_kernels.nn.attention import WindowedAttention
from deepseek_kernels.nn.int8 import Int8Linear, QuantizeReport, quantize_model

__all__ = ["Int8Linear", "QuantizeReport", "WindowedAttention", "quantize_model"]
