"""Programmatic dependent launch (DSK_PDL=1) at decode sizes: graphed time per call with and without,
for int8_linear, the sparse FFN decode (1 and 8 tokens) and the 4-block quantized stack of the int8
suite at one token.

    python benchmarks/diag_pdl.py

With PDL each kernel of the chain (int8_linear: quantize -> GEMM; sparse FFN: router split -> select ->
gate/up -> down [-> finish]) is launched as a programmatic dependent of the one before: its programs
become resident while that kernel runs and wait for it (griddepcontrol), instead of launching after it
ends. Both are timed replayed from CUDA graphs (8+ calls per graph,
weights cycled through copies larger than the L2), in three alternating rounds (a fresh capture each:
the launch attribute is fixed at capture); the table shows each side's best round.
"""

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench import harness
from deepseek_kernels.ops._registry import programmatic_launches


def graphed_ms(fn, sets, pdl: bool):
    with programmatic_launches(pdl):  # fixed at capture, which happens inside
        return harness.time_cuda_graph(fn, sets, reps=30)["ms"]


def main():
    N, K = 14336, 4096
    rows = []
    for M in (1, 16):
        def make():
            return (torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
                    torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8),
                    torch.rand(N, device="cuda") * 1e-3)

        sets = harness.rotated_inputs(make)
        times = {False: [], True: []}
        for r in range(3):  # alternating rounds, a fresh graph each time (PDL is fixed at capture)
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                times[on].append(graphed_ms(lambda x, w, ws: dk.int8_linear(x, w, ws), sets, on))
        rows.append((f"int8_linear M{M} N{N} K{K}", min(times[False]), min(times[True])))
    # the sparse FFN decode chain (router split + select, gate/up, down [+ finish]) at 15 % active
    D, F_, NB = 4096, 14336, 64
    for T in (1, 8):
        def make_ffn(T=T):
            dt = torch.bfloat16
            return (torch.randn(T, D, device="cuda", dtype=dt),
                    (torch.randn(NB, D, device="cuda") * 2 / D**0.5).to(dt),
                    (torch.randn(F_, D, device="cuda") / D**0.5).to(dt),
                    (torch.randn(F_, D, device="cuda") / D**0.5).to(dt),
                    (torch.randn(D, F_, device="cuda") / F_**0.5).to(dt))

        sets = harness.rotated_inputs(make_ffn)
        times = {False: [], True: []}
        with torch.no_grad():
            for r in range(3):
                for on in ((False, True) if r % 2 == 0 else (True, False)):
                    times[on].append(graphed_ms(lambda x, wr, wg, wu, wd: dk.gated_sparse_ffn(
                        x, wr, wg, wu, wd, active_ratio=0.15), sets, on))
        rows.append((f"sparse FFN decode T{T} ratio 0.15", min(times[False]), min(times[True])))
    from deepseek_kernels.bench.suites.int8_matmul import _stacks

    stack = _stacks()[1]
    x_sets = [(torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16),) for _ in range(4)]
    times = {False: [], True: []}
    with torch.no_grad():
        for r in range(3):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                times[on].append(graphed_ms(lambda x: stack(x), x_sets, on))
    rows.append(("4-block int8 stack, 1 token", min(times[False]), min(times[True])))
    print(f"{'case (graphed)':<34} {'ordinary us':>12} {'PDL us':>8} {'ratio':>7}")
    for name, off, on in rows:
        print(f"{name:<34} {off * 1e3:12.1f} {on * 1e3:8.1f} {off / on:6.3f}x")


if __name__ == "__main__":
    main()
