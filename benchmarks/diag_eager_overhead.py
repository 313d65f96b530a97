"""Where the time of an eager decode-sized call goes (CPU-side launch overhead vs the kernel).

    python benchmarks/diag_eager_overhead.py [--shape M,N,K]

Times, for int8_linear at M=1 N=14336 K=4096 (or ``--shape``) on a CUDA GPU: the public functions
(quantize_per_token, int8_matmul, int8_linear), the raw Triton ``kernel[grid](...)`` launch of
the quantize kernel, the same through a CUDA graph (the kernel alone), and a cProfile of the
eager int8_linear call (top entries by own time). Prints a table.
"""

import os

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench import harness
from deepseek_kernels.ops.int8_matmul import quantize_launch
from deepseek_kernels.triton import _direct
from deepseek_kernels.triton.int8_matmul import _quantize_per_token_kernel

from _tuning import per_call_us, print_host_profile  # benchmarks/ is on sys.path when a script in it runs


def graphed_us(fn, n=200):
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return per_call_us(g.replay, n)


def main():
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,14336,4096", help="M,N,K (e.g. 2048,4096,4096: is a mid-size row host-bound?)")
    M, N, K = (int(v) for v in ap.parse_args().shape.split(","))
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
    ws = torch.rand(N, device="cuda") / 100
    xq, xs = dk.quantize_per_token(x)
    q, s = torch.empty_like(xq), torch.empty_like(xs)

    def raw_quant():  # the launcher's tile and warps
        _quantize_per_token_kernel[(M,)](x, x, q, s, K, x.stride(0), q.stride(0), HAS_SMOOTH=False,
                                         **quantize_launch(K))

    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    sets = [(xq, w, xs, ws)]

    def bench_method(calls_per_sample=None):  # the bench harness's eager timer (bursts of calls between events)
        return harness.time_cuda(lambda *a: dk.int8_matmul(*a), sets, reps=100,
                                 calls_per_sample=calls_per_sample)["ms"] * 1e3

    def direct_launch(on: bool):  # off: every launch through Triton's kernel[grid]
        os.environ["DSK_DIRECT_LAUNCH"] = "1" if on else "0"
        _direct.refresh()

    cases = {
        "quantize_per_token": lambda: dk.quantize_per_token(x),
        "raw quantize kernel[grid]": raw_quant,
        "int8_matmul": lambda: dk.int8_matmul(xq, w, xs, ws),
        "int8_linear": lambda: dk.int8_linear(x, w, ws),
        "int8_linear, no direct launch": lambda: dk.int8_linear(x, w, ws),
        "int8_matmul, no direct launch": lambda: dk.int8_matmul(xq, w, xs, ws),
        "bf16 F.linear": lambda: torch.nn.functional.linear(x, wb),
        "torch.empty x2": lambda: (torch.empty(M, K, device="cuda", dtype=torch.int8),
                                   torch.empty(M, 1, device="cuda")),
    }
    print(f"{'call':<32} {'wall us':>9} {'host us':>9} {'graphed us':>11}")
    for name, fn in cases.items():
        direct_launch("no direct" not in name)
        g = graphed_us(fn) if "empty" not in name and "direct" not in name else float("nan")
        print(f"{name:<32} {per_call_us(fn):9.1f} {per_call_us(fn, wait=False):9.1f} {g:11.1f}")
    direct_launch(True)
    print(f"int8_matmul through the bench harness's eager timer: {bench_method():.1f} us per call in bursts, "
          f"{bench_method(1):.1f} us with one call per event pair (shape {M},{N},{K})")
    print_host_profile(cases["int8_linear"])


if __name__ == "__main__":
    main()
