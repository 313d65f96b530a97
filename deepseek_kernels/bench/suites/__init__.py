"""Benchmark suites, one per op family. Each module defines NAME, TITLE, ``cases(quick)`` (GPU
timing cases, see ``deepseek_kernels.bench.harness.Case``) and ``accuracy(device)`` (rows with
``matches_reference``: bit for bit where the op is defined exactly, within the suite's stated
tolerance otherwise, and the relative error); optionally ``summary()``, a dict whose ``text`` is
printed and which is stored in the JSON (figures that are not timings, e.g. cache sizes)."""

from deepseek_kernels.bench.suites import attention, comm_hook, hierarchical, int8_matmul, quantization, sparse_ffn

SUITES = {
    quantization.NAME: quantization,
    comm_hook.NAME: comm_hook,
    int8_matmul.NAME: int8_matmul,
    attention.NAME: attention,
    sparse_ffn.NAME: sparse_ffn,
    hierarchical.NAME: hierarchical,
}
