"""Benchmark suites, one per op family. Each module defines NAME, TITLE, ``cases(quick)`` (GPU
timing cases, see ``deepseek_kernels.bench.harness.Case``) and ``accuracy(device)``."""

from deepseek_kernels.bench.suites import comm_hook, int8_matmul, quantization

SUITES = {quantization.NAME: quantization, comm_hook.NAME: comm_hook, int8_matmul.NAME: int8_matmul}
