"""Times our kernels only (no baseline), for launch-parameter tuning, one line per case:

    DSK_QUANT_VECTORS_PER_THREAD=4 python benchmarks/tune_quantization.py [quantization|comm_hook]

``quantization`` (default): the blockwise quantize/dequantize cases. ``comm_hook``: the fused hook
pipeline per 25 MiB bucket (eager and CUDA-graph rows). Its sum + requantize kernel takes the run-time
knobs ``DSK_REDUCE_FORM=wide|narrow`` (else chosen by size) and ``DSK_REDUCE_CTA=256`` (the
256-thread CTAs used until session 22), and compile-time ones (``DSK_REDUCE_NARROW_VEC``,
``DSK_REDUCE_ROUNDS``, ...; benchmarks/tune_variants.sh rebuilds per variant:
``DSK_TUNE_SUITE=comm_hook benchmarks/tune_variants.sh "-DDSK_REDUCE_NARROW_VEC=8"``).
``DSK_TUNE_FILTER=REGEX`` keeps only the cases whose name matches (``"graph"``: the GPU-time rows). Graphed
cases (``case.graph``) are timed as the suite times them (``harness.time_cuda_graph``)."""

import os
import re
import sys

import torch

from deepseek_kernels.bench import harness
from deepseek_kernels.bench.suites import comm_hook, quantization

SUITES = {"quantization": quantization, "comm_hook": comm_hook}

if __name__ == "__main__":
    name = sys.argv[1] if len(sys.argv) > 1 else "quantization"
    if name not in SUITES:
        raise SystemExit(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    copy = harness.measure_copy_bandwidth()
    vpt = os.environ.get("DSK_QUANT_VECTORS_PER_THREAD", "default")
    keep = re.compile(os.environ.get("DSK_TUNE_FILTER", ""))
    for case in SUITES[name].cases():
        if not keep.search(case.name):
            continue
        inputs = harness.rotated_inputs(case.make_inputs)
        timer = harness.time_cuda_graph if case.graph else harness.time_cuda
        t = timer(case.ours.fn, inputs, reps=30)
        gbps = case.bytes / (t["ms"] * 1e-3) / 1e9
        print(f"vpt={vpt:<8} {case.name:<26} {t['ms']:.4f} ms  {gbps:7.0f} GB/s  {100 * gbps * 1e9 / copy:5.1f}% of copy")
        del inputs
        torch.cuda.empty_cache()
