"""Why the int8 suite's M8192 N14336 K4096 row measures ours at ~0.98-1.0 ms (1.25-1.27x cuBLAS bf16 in
sessions 10 and 11, at 1950 MHz) when do_bench gives ~0.80-0.83 ms and the sustained row 0.87 ms.
One process, per shape: do_bench (L2 flushed, per-call events) of the eager op (persistent TMA kernel),
of the registered op (plain kernel) and of cuBLAS bf16; then the bench harness's timer on the suite's
rotated inputs, each side alone; then the suite's interleaved rounds.

    python benchmarks/diag_int8_regime.py [--shapes "8192,14336,4096;8192,4096,14336"] [--out results.json]
"""

import argparse

import torch

from deepseek_kernels.bench import harness
from deepseek_kernels.bench.suites.int8_matmul import _bf16, _inputs, _ours

from _tuning import bench, save_json


def _plain(a, b, sa, sb, bias, x, w):
    return torch.ops.deepseek_kernels.int8_matmul(a, b, sa, sb, bias, torch.bfloat16)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8192,14336,4096;8192,4096,14336;8192,8192,8192")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    print(f"{'M N K':>16} {'side':>8} {'do_bench':>9} {'harness':>9} {'interleaved':>11}  (ms)")
    for shape in args.shapes.split(";"):
        M, N, K = (int(v) for v in shape.split(","))
        sets = harness.rotated_inputs(_inputs(M, N, K))
        impls = {"tma": _ours, "plain": _plain, "cublas": _bf16}
        inter = harness.time_interleaved({"tma": _ours, "cublas": _bf16}, sets, reps=30)
        for name, fn in impls.items():
            d = bench(lambda: fn(*sets[0]))
            h = harness.time_cuda(fn, sets, reps=30)
            row = dict(M=M, N=N, K=K, side=name, do_bench_ms=d, harness_ms=h["ms"],
                       calls_per_sample=h.get("calls_per_sample"),
                       interleaved_ms=inter[name]["ms"] if name in inter else None,
                       interleaved_round_ms=inter[name]["round_ms"] if name in inter else None)
            rows.append(row)
            il = f"{row['interleaved_ms']:11.4f}" if row["interleaved_ms"] is not None else f"{'':>11}"
            print(f"{shape:>16} {name:>8} {d:9.4f} {h['ms']:9.4f} {il}", flush=True)
        print(f"{'':>16} sets {len(sets)}; clock now {harness.clock_state()}", flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
