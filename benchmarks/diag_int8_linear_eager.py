"""Why eager ``int8_linear`` rows of the int8 suite measure ~2x what diag_eager_overhead.py measures.

    python benchmarks/diag_int8_linear_eager.py [--shape 1,14336,4096]

Session 10: the suite's eager int8_linear M1 row took 121-137 us per call (bursts of back-to-back
calls, bench harness) while diag_eager_overhead.py measured 59 us per call in a loop, one minute
earlier on the same machine. This times the same call (bench harness timer, bursts; and a plain
loop's wall time) in several states of one process, in order: fresh; again; after CUDA-graph
captures of it (the suite's graphed rows run first); with the garbage collector off; with
DSK_DIRECT_LAUNCH=0. Then a cProfile of the call. Session 10 on the H200: 56-68 us in every
state (not reproduced: the suite's figure depends on the rows before it, NOTES.md).
"""

import argparse
import gc
import os
import time

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench import harness
from deepseek_kernels.triton import _direct

from _tuning import print_host_profile  # benchmarks/ is on sys.path when a script in it runs


def loop_us(fn, args, n=300):
    for _ in range(10):
        fn(*args)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(*args)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,14336,4096")
    M, N, K = (int(v) for v in ap.parse_args().shape.split(","))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    ws = torch.rand(N, device="cuda") * 1e-3
    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)

    def ours(x, w, ws, wb):
        return dk.int8_linear(x, w, ws)

    def base(x, w, ws, wb):
        return torch.nn.functional.linear(x, wb)

    sets = [(x, w, ws, wb)]
    rows = []

    def measure(state):
        t = harness.time_cuda(ours, sets, reps=30)
        b = harness.time_cuda(base, sets, reps=30)
        rows.append((state, t["ms"] * 1e3, t["calls_per_sample"], loop_us(ours, sets[0]), b["ms"] * 1e3))

    measure("fresh")
    measure("again")
    for _ in range(2):  # what the suite's graphed rows do before the next eager row
        harness.time_cuda_graph(ours, sets, reps=10)
    measure("after 2 graph captures")
    gc.disable()
    measure("gc disabled")
    gc.enable()
    os.environ["DSK_DIRECT_LAUNCH"] = "0"
    _direct.refresh()
    measure("DSK_DIRECT_LAUNCH=0")
    os.environ["DSK_DIRECT_LAUNCH"] = "1"
    _direct.refresh()
    print(f"int8_linear M{M} N{N} K{K}, eager")
    print(f"{'state':<26} {'bench us':>9} {'calls':>6} {'loop us':>8} {'bf16 us':>8}")
    for state, ms, g, loop, b in rows:
        print(f"{state:<26} {ms:9.1f} {g:6d} {loop:8.1f} {b:8.1f}")
    print_host_profile(lambda: ours(*sets[0]), top=14, width=150)


if __name__ == "__main__":
    main()
