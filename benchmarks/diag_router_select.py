"""The router's top-k selection at decode sizes: "rank" (one [T, NR, NR] compare-and-count) against "sort" (one
bitonic sort of (score, index) keys per token, ``tl.topk``), 4 and 1 selecting warps, each graphed with the split
logits kernel before it (the bench harness's timer: several calls per graph, input copies past the L2), then the
whole sparse FFN decode op with each as the "auto" choice, next to the dense FFN. Prints whether both pick the same
blocks and how far their normalised weights differ (their sums are reduced in different orders).

    python benchmarks/diag_router_select.py [--tokens 1,2,8] [--ratio 0.15] [--out results.json]

bf16, d_model 4096, d_ff 14336, 64 blocks (the bench suite's decode shape).
"""

import argparse

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import time_cuda_graph
from deepseek_kernels.reference.sparse_ffn import n_active, swiglu_ffn_ref
from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import save_json
from diag_sparse_decode import decode_sets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    D, F_, NB, dt = 4096, 14336, 64, torch.bfloat16
    k = n_active(args.ratio, NB)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        torch.manual_seed(T)
        sets = decode_sets(T, k, D, F_, NB, dt)
        with torch.no_grad():
            picks = {s: [tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select=s)[:2]
                         for x, wr, *_ in sets] for s in ("rank", "sort")}
            same = all(torch.equal(a[0], b[0]) for a, b in zip(picks["rank"], picks["sort"]))  # the same blocks
            w_diff = max((a[1] - b[1]).abs().max().item() for a, b in zip(picks["rank"], picks["sort"]))
            before = tk.SMALL_T_SELECT
            outs = {}
            for s in ("rank", "sort"):
                tk.SMALL_T_SELECT = s
                outs[s] = [dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=args.ratio) for x, wr, wg, wu, wd in sets]
            tk.SMALL_T_SELECT = before
            same_op = all(torch.equal(a, b) for a, b in zip(outs["rank"], outs["sort"]))
            dense = time_cuda_graph(lambda x, wr, wg, wu, wd: swiglu_ffn_ref(x, wg, wu, wd), sets[:1])["ms"] * 1e3
            for r in range(args.rounds):
                row = {"T": T, "round": r, "same_idx": same, "weights_max_diff": w_diff, "same_op_bits": same_op,
                       "dense_us": dense}
                for s in ("rank", "sort"):
                    for w in (4, 1):
                        row[f"router_{s}_w{w}_us"] = time_cuda_graph(lambda x, wr, *_, s=s, w=w: tk.sparse_ffn_route(
                            x, wr, k=k, gate="sigmoid", weighting="gate", select=s, num_warps=w), sets)["ms"] * 1e3
                    try:
                        tk.SMALL_T_SELECT = s
                        row[f"op_{s}_us"] = time_cuda_graph(lambda x, wr, wg, wu, wd: dk.gated_sparse_ffn(
                            x, wr, wg, wu, wd, active_ratio=args.ratio), sets)["ms"] * 1e3
                    finally:
                        tk.SMALL_T_SELECT = before
                rows.append(row)
                print(f"T{T} r{r}: router rank 4w {row['router_rank_w4_us']:.2f} / 1w {row['router_rank_w1_us']:.2f} us, "
                      f"sort 4w {row['router_sort_w4_us']:.2f} / 1w {row['router_sort_w1_us']:.2f} us; op rank "
                      f"{row['op_rank_us']:.2f} us ({dense / row['op_rank_us']:.2f}x dense), sort {row['op_sort_us']:.2f} us "
                      f"({dense / row['op_sort_us']:.2f}x); dense {dense:.1f} us; same idx {same}, weights within {w_diff:.1e}, "
                      f"op bits equal {same_op}",
                      flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
