"""Why the eager ``M2048 N4096 K4096`` int8 row swings (1.22-1.71x across runs): host time per call
against GPU time, and the suite's burst timer at several burst lengths, both sides, on the suite's own
inputs (rotated sets, bias), on the GPU.

    python benchmarks/diag_int8_burst.py [--shape 2048,4096,4096] [--out FILE.json]

Prints, for ours (``dk.int8_matmul``) and the baseline (``F.linear`` in bf16): host microseconds per call
(queued, no waiting), GPU microseconds per call (CUDA-graph replays over the rotated sets), and
``time_cuda`` with 1 / 4 / 16 / 64 calls per sample (what the suite's eager rows time), then the top
host functions of ours by cProfile.
"""

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tuning import save_json  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048,4096,4096")
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    from deepseek_kernels.bench.harness import host_probe, rotated_inputs, time_cuda, time_cuda_graph
    from deepseek_kernels.bench.suites import int8_matmul as suite

    M, N, K = map(int, args.shape.split(","))
    sets = rotated_inputs(suite._inputs(M, N, K))
    sides = {"ours": suite._ours, "cuBLAS bf16": suite._bf16}
    result = {"shape": [M, N, K], "sets": len(sets), "host_probe": host_probe(), "sides": {}}
    for name, fn in sides.items():
        for i in range(10):
            fn(*sets[i % len(sets)])
        torch.cuda.synchronize()
        n = 200
        t0 = time.perf_counter()
        for i in range(n):
            fn(*sets[i % len(sets)])
        host_us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        gpu_us = time_cuda_graph(fn, sets)["ms"] * 1e3
        bursts = {}
        for g in (1, 4, 16, 64):
            r = time_cuda(fn, sets, calls_per_sample=g)
            bursts[g] = {"ms": r["ms"], "p20": r["ms_p20"], "p80": r["ms_p80"]}
        auto = time_cuda(fn, sets)
        result["sides"][name] = {"host_us": host_us, "gpu_us": gpu_us, "bursts": bursts,
                                 "auto": {"ms": auto["ms"], "calls_per_sample": auto["calls_per_sample"]}}
        print(f"{name:12s} host {host_us:6.1f} us/call  GPU (graphed) {gpu_us:6.1f} us | burst of 1/4/16/64 calls: "
              + " / ".join(f"{1e3 * bursts[g]['ms']:.1f}" for g in (1, 4, 16, 64))
              + f" us | auto ({auto['calls_per_sample']} calls) {1e3 * auto['ms']:.1f} us")
    prof = cProfile.Profile()
    prof.enable()
    for i in range(200):
        suite._ours(*sets[i % len(sets)])
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(14)
    text = s.getvalue()
    print("\n".join(line for line in text.splitlines() if line.strip())[:4000])
    result["cprofile_top"] = text
    result["host_probe_after"] = host_probe()
    from deepseek_kernels import _extension
    if _extension.available() and hasattr(_extension._C, "int8_matmul_cubin_launches"):
        result["cubin_launches"] = _extension._C.int8_matmul_cubin_launches()  # ours' calls launched from C++
        print("ours' calls launched from C++ (int8_matmul_cubin_eager):", result["cubin_launches"])
    print("host probe before / after:", result["host_probe"], result["host_probe_after"])
    save_json(args.out, result)


if __name__ == "__main__":
    main()
