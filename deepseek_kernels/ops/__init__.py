"""Public functional ops. Importing this package registers every op under torch.ops.deepseek_kernels."""

from deepseek_kernels.ops.quantization import dequantize_blockwise, quantize_blockwise

__all__ = ["dequantize_blockwise", "quantize_blockwise"]
