"""Eager int8_matmul on large GEMMs: the persistent TMA kernel (the eager path) against the plain
kernel (the registered op, the torch.compile path) and cuBLAS bf16, in one process.

    python benchmarks/diag_int8_tma.py [--shapes "8192,8192,8192;8192,4096,4096"] [--out results.json]
"""

import argparse

import torch

import deepseek_kernels as dk

from _tuning import bench, save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192,8192,8192;8192,4096,4096;8192,14336,4096;8192,4096,14336;4096,4096,4096")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    print(f"{'M N K':>20} {'TMA eager':>10} {'plain op':>10} {'cuBLAS':>10} {'TMA/plain':>10} {'vs cuBLAS':>10}")
    for shape in args.shapes.split(";"):
        M, N, K = (int(v) for v in shape.split(","))
        a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
        b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
        sa, sb = torch.rand(M, 1, device="cuda") * 1e-3, torch.rand(N, device="cuda") * 1e-3
        x, w = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        eager = dk.int8_matmul(a, b, sa, sb)
        op = torch.ops.deepseek_kernels.int8_matmul(a, b, sa, sb, None, torch.bfloat16)
        same = torch.equal(eager, op)
        t_tma = bench(lambda: dk.int8_matmul(a, b, sa, sb))
        t_op = bench(lambda: torch.ops.deepseek_kernels.int8_matmul(a, b, sa, sb, None, torch.bfloat16))
        t_bf = bench(lambda: torch.nn.functional.linear(x, w))
        rows.append(dict(M=M, N=N, K=K, tma_ms=t_tma, plain_ms=t_op, cublas_bf16_ms=t_bf, same_bits=same))
        print(f"{shape:>20} {t_tma * 1e3:9.1f}u {t_op * 1e3:9.1f}u {t_bf * 1e3:9.1f}u {t_op / t_tma:9.2f}x "
              f"{t_bf / t_tma:9.2f}x" + ("" if same else "  BITS DIFFER"), flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
