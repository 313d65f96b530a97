"""A/B of one module-level switch of ``deepseek_kernels.triton.sparse_ffn`` on the graphed sparse-FFN decode op
(router + decode kernels, programmatic dependent launches as the op runs them), in alternating rounds
(A B B A A B ...): the readings of one setting move ~0.7 us with their position in a run (session 28), so a
sub-microsecond difference needs both orders. Also checks that both settings give the same bits.

    python benchmarks/ab_sparse_decode_flag.py ROUTER_EARLY_W [--values "False;True"] [--tokens 1,2] [--rounds 6]
    python benchmarks/ab_sparse_decode_flag.py FUSED_ROUTE_TOKENS --values "();(2,)" --tokens 2

bf16, d_model 4096, d_ff 14336, 64 blocks, ratio 0.15 (the bench suite's decode shape).
"""

import argparse
import ast
import statistics

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import time_cuda_graph
from deepseek_kernels.reference.sparse_ffn import n_active, swiglu_ffn_ref
from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import save_json
from diag_sparse_decode import decode_sets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flag", help="a module-level name of deepseek_kernels.triton.sparse_ffn")
    ap.add_argument("--values", default="False;True", help="the two settings as Python literals, ';'-separated")
    ap.add_argument("--tokens", default="1,2")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out")
    args = ap.parse_args()
    if not hasattr(tk, args.flag):
        raise SystemExit(f"deepseek_kernels.triton.sparse_ffn has no {args.flag!r}")
    before = getattr(tk, args.flag)
    values = [ast.literal_eval(v.strip()) for v in args.values.split(";")]
    if len(values) != 2:
        raise SystemExit(f"--values: two settings, got {values}")
    D, F_, NB, dt = 4096, 14336, 64, torch.bfloat16
    k = n_active(args.ratio, NB)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        torch.manual_seed(0)
        sets = decode_sets(T, k, D, F_, NB, dt)

        def op(x, wr, wg, wu, wd):
            return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=args.ratio)

        times = {v: [] for v in values}
        outs = {}
        try:
            with torch.no_grad():
                for r in range(args.rounds):
                    order = values if r % 4 in (0, 3) else values[::-1]
                    for v in order:
                        setattr(tk, args.flag, v)
                        times[v].append(time_cuda_graph(op, sets)["ms"] * 1e3)
                        outs.setdefault(v, [op(*st) for st in sets])
                dense = time_cuda_graph(lambda x, wr, wg, wu, wd: swiglu_ffn_ref(x, wg, wu, wd), sets[:1])["ms"] * 1e3
        finally:
            setattr(tk, args.flag, before)
        same = all(torch.equal(a, b) for a, b in zip(outs[values[0]], outs[values[1]]))
        med = {v: statistics.median(t) for v, t in times.items()}
        rows.append(dict(T=T, flag=args.flag, times_us={str(v): t for v, t in times.items()},
                         median_us={str(v): m for v, m in med.items()}, dense_us=dense, same_bits=same))
        print(f"T{T} {args.flag}: " + "; ".join(
            f"{v}: {' / '.join(f'{x:.1f}' for x in times[v])} us (median {med[v]:.2f}, {dense / med[v]:.2f}x dense)"
            for v in values) + f"; dense {dense:.1f} us; same bits: {same}", flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
