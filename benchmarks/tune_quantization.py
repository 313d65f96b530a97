"""Times our quantization kernels only (no baseline), for launch-parameter tuning:
``DSK_QUANT_VECTORS_PER_THREAD=4 python benchmarks/tune_quantization.py``. Prints one line per case."""

import os

import torch

from deepseek_kernels.bench import harness
from deepseek_kernels.bench.suites import quantization

if __name__ == "__main__":
    copy = harness.measure_copy_bandwidth()
    vpt = os.environ.get("DSK_QUANT_VECTORS_PER_THREAD", "default")
    for case in quantization.cases():
        inputs = harness.rotated_inputs(case.make_inputs)
        t = harness.time_cuda(case.ours.fn, inputs, reps=30)
        gbps = case.bytes / (t["ms"] * 1e-3) / 1e9
        print(f"vpt={vpt:<8} {case.name:<22} {t['ms']:.4f} ms  {gbps:7.0f} GB/s  {100 * gbps * 1e9 / copy:5.1f}% of copy")
        del inputs
        torch.cuda.empty_cache()
