"""Where a graphed sparse-FFN decode step spends its GPU time: the router kernel, the two decode
kernels, the whole op, next to the dense SwiGLU FFN, each replayed from a CUDA graph with the bench
harness's timer (several calls per graph, input copies cycled past the L2).

    python benchmarks/diag_sparse_decode.py [--ratio 0.15] [--tokens 1,2,8] [--out results.json]
    python benchmarks/diag_sparse_decode.py --once --tokens 1   # four eager op calls, nothing timed (for ncu)

bf16, d_model 4096, d_ff 14336, 64 blocks (the bench suite's decode shape).
"""

import argparse

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import time_cuda_graph
from deepseek_kernels.reference.sparse_ffn import n_active, swiglu_ffn_ref
from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import kernel_times, print_kernel_times, save_json, sets_for


def decode_sets(T: int, k: int, D: int, F_: int, NB: int, dt: torch.dtype) -> list[tuple]:
    """(x, router, w_gate, w_up, w_down) on the GPU, in enough copies that consecutive calls read the weights from
    HBM (a token uses ~k/NB of them: :func:`_tuning.sets_for`)."""
    sets = []
    for _ in range(sets_for(int(min(1.0, T * k / NB) * 3 * F_ * D * 2))):
        x = torch.randn(T, D, device="cuda", dtype=dt)
        wr = torch.randn(NB, D, device="cuda", dtype=dt) * D**-0.5
        wg, wu = (torch.randn(F_, D, device="cuda", dtype=dt) * D**-0.5 for _ in range(2))
        wd = torch.randn(D, F_, device="cuda", dtype=dt) * F_**-0.5
        sets.append((x, wr, wg, wu, wd))
    return sets


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--tokens", default="1,2,8")
    ap.add_argument("--once", action="store_true", help="four eager calls of the op per token count, for Nsight Compute")
    ap.add_argument("--out")
    args = ap.parse_args()
    D, F_, NB, dt = 4096, 14336, 64, torch.bfloat16
    k = n_active(args.ratio, NB)
    if args.once:
        for T in (int(t) for t in args.tokens.split(",")):
            x, wr, wg, wu, wd = decode_sets(T, k, D, F_, NB, dt)[0]
            with torch.no_grad():
                for _ in range(4):
                    dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=args.ratio)
        torch.cuda.synchronize()
        return
    rows = []
    print(f"{'T':>3} {'router':>9} {'decode kernels':>15} {'whole op':>9} {'dense':>9} {'op vs dense':>12}")
    for T in (int(t) for t in args.tokens.split(",")):
        torch.manual_seed(0)
        sets = []
        for x, wr, wg, wu, wd in decode_sets(T, k, D, F_, NB, dt):
            idx, w, _ = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select="loop")
            sets.append((x, wr, wg, wu, wd, idx, w))
        n = len(sets)
        with torch.no_grad():
            t_route = time_cuda_graph(lambda x, wr, *_: tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid",
                                                                            weighting="gate"), sets)
            t_dec = time_cuda_graph(lambda x, wr, wg, wu, wd, idx, w: tk.sparse_ffn_decode(
                x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB), sets)
            t_op = time_cuda_graph(lambda x, wr, wg, wu, wd, *_: dk.gated_sparse_ffn(
                x, wr, wg, wu, wd, active_ratio=args.ratio), sets)
            t_dense = time_cuda_graph(lambda x, wr, wg, wu, wd, *_: swiglu_ffn_ref(x, wg, wu, wd), sets[:1])
            # the router's variants: one kernel (the path before the split), split with 1 warp selecting
            t_route1 = time_cuda_graph(lambda x, wr, *_: tk.sparse_ffn_route(
                x, wr, k=k, gate="sigmoid", weighting="gate", splits=1, select="loop"), sets)
            t_route_w1 = time_cuda_graph(lambda x, wr, *_: tk.sparse_ffn_route(
                x, wr, k=k, gate="sigmoid", weighting="gate", num_warps=1, select="loop"), sets)
            t_loop = time_cuda_graph(lambda x, wr, *_: tk.sparse_ffn_route(
                x, wr, k=k, gate="sigmoid", weighting="gate", select="loop"), sets)
            # top-k by rank (the default up to RANK_SELECT_MAX_T tokens since session 10): 2 tokens per selecting program, 4 or 1 warps
            t_rank = {w: time_cuda_graph(lambda x, wr, *_, w=w: tk.sparse_ffn_route(
                x, wr, k=k, gate="sigmoid", weighting="gate", select="rank", num_warps=w), sets) for w in (4, 1)}
            # the down projection in slices (session 10, opt-in): the decode kernels alone, per slice count
            t_split = {sp: time_cuda_graph(lambda x, wr, wg, wu, wd, idx, w, sp=sp: tk.sparse_ffn_decode(
                x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB, config={"down": {"splits": sp}}), sets)
                for sp in (2, 4, 8)}
            # down-kernel variants against the default: all 16 h rows loaded (before DECODE_MASK_H_ROWS), and
            # the first w_down tile loaded before the PDL wait or not (DECODE_DOWN_EARLY_W); each timed as the decode
            # kernels and as the whole op, with a same-bits check
            base_out = [tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB)
                        for x, wr, wg, wu, wd, idx, w in sets]
            variants = {}
            for name, attr, value in (("h rows unmasked", "DECODE_MASK_H_ROWS", False),
                                      ("early w off", "DECODE_DOWN_EARLY_W", False),
                                      ("early w on", "DECODE_DOWN_EARLY_W", True),
                                      # the router split kernel's weight tile before its PDL wait (the decode
                                      # kernels' row is unchanged by it: read the op's)
                                      ("router early w on", "ROUTER_EARLY_W", True),
                                      ("router early w off", "ROUTER_EARLY_W", False)):
                before = getattr(tk, attr)
                try:
                    setattr(tk, attr, value)
                    v_dec = time_cuda_graph(lambda x, wr, wg, wu, wd, idx, w: tk.sparse_ffn_decode(
                        x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB), sets)
                    v_op = time_cuda_graph(lambda x, wr, wg, wu, wd, *_: dk.gated_sparse_ffn(
                        x, wr, wg, wu, wd, active_ratio=args.ratio), sets)
                    v_same = all(torch.equal(tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB),
                                             o) for (x, wr, wg, wu, wd, idx, w), o in zip(sets, base_out))
                finally:
                    setattr(tk, attr, before)
                variants[name] = {"decode_ms": v_dec["ms"], "op_ms": v_op["ms"], "same_bits": v_same}
            # the default once more (drift check)
            t_op_again = time_cuda_graph(lambda x, wr, wg, wu, wd, *_: dk.gated_sparse_ffn(
                x, wr, wg, wu, wd, active_ratio=args.ratio), sets)
            same = all(torch.equal(tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select="rank")[0],
                                   idx) for x, wr, *_, idx, _w in sets)
            # the router's selection fused into the gate/up kernel (session 11, FUSED_ROUTE_TOKENS)
            t_fused, fused_same = None, None
            if T <= tk.FUSED_ROUTE_BLOCK_TS:
                def op(x, wr, wg, wu, wd, *_):
                    return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=args.ratio)

                before = tk.FUSED_ROUTE_TOKENS
                try:
                    tk.FUSED_ROUTE_TOKENS = ()
                    plain = [op(*st) for st in sets]
                    tk.FUSED_ROUTE_TOKENS = tuple(range(1, tk.FUSED_ROUTE_BLOCK_TS + 1))
                    fused_same = all(torch.equal(op(*st), r) for st, r in zip(sets, plain))
                    t_fused = time_cuda_graph(op, sets)
                finally:
                    tk.FUSED_ROUTE_TOKENS = before
        print(f"    router: default {t_route['ms'] * 1e3:.1f}u, loop ({tk.router_splits(T, D, sets[0][0].device)} splits) "
              f"{t_loop['ms'] * 1e3:.1f}u, one kernel {t_route1['ms'] * 1e3:.1f}u, split + 1-warp select {t_route_w1['ms'] * 1e3:.1f}u, "
              f"rank select 4 / 1 warps {t_rank[4]['ms'] * 1e3:.1f} / {t_rank[1]['ms'] * 1e3:.1f}u "
              f"(same idx as the loop: {same})")
        if t_fused is not None:
            print(f"    whole op with the selection fused into gate/up: {t_fused['ms'] * 1e3:.1f}u vs "
                  f"{t_op['ms'] * 1e3:.1f}u (same bits: {fused_same})")
        print(f"    decode kernels: default {t_dec['ms'] * 1e3:.1f}u, down in 2 / 4 / 8 slices "
              + " / ".join(f"{t_split[sp]['ms'] * 1e3:.1f}" for sp in (2, 4, 8)) + "u")
        print(f"    down variants (default: decode kernels {t_dec['ms'] * 1e3:.1f}u, op {t_op['ms'] * 1e3:.1f}u, "
              f"again {t_op_again['ms'] * 1e3:.1f}u): " + "; ".join(
                  f"{n} {v['decode_ms'] * 1e3:.1f}u / op {v['op_ms'] * 1e3:.1f}u (same bits: {v['same_bits']})"
                  for n, v in variants.items()))
        # each kernel's device time (eager calls under the profiler, cycling the weight copies)
        it = iter(range(10**9))

        def op_step():
            x, wr, wg, wu, wd, *_ = sets[next(it) % len(sets)]
            with torch.no_grad():
                dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=args.ratio)

        per_kernel = kernel_times(op_step, steps=3 * len(sets))
        print("    per kernel (profiler, device time per call):")
        print_kernel_times(per_kernel)
        row = dict(T=T, ratio=args.ratio, k=k, weight_copies=n, router_ms=t_route["ms"], decode_ms=t_dec["ms"],
                   per_kernel_us=per_kernel,
                   op_ms=t_op["ms"], dense_ms=t_dense["ms"], router_one_kernel_ms=t_route1["ms"],
                   router_split_w1_ms=t_route_w1["ms"], router_rank_ms=t_rank[4]["ms"],
                   router_rank_w1_ms=t_rank[1]["ms"], router_rank_same_idx=same,
                   decode_down_splits_ms={sp: t["ms"] for sp, t in t_split.items()},
                   op_fused_route_ms=t_fused["ms"] if t_fused else None, fused_route_same_bits=fused_same,
                   down_variants=variants, op_again_ms=t_op_again["ms"],
                   defaults={"DECODE_MASK_H_ROWS": tk.DECODE_MASK_H_ROWS, "DECODE_DOWN_EARLY_W": tk.DECODE_DOWN_EARLY_W,
                             "ROUTER_EARLY_W": tk.ROUTER_EARLY_W})
        rows.append(row)
        print(f"{T:>3} {t_route['ms'] * 1e3:8.1f}u {t_dec['ms'] * 1e3:14.1f}u {t_op['ms'] * 1e3:8.1f}u "
              f"{t_dense['ms'] * 1e3:8.1f}u {t_dense['ms'] / t_op['ms']:11.2f}x", flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
