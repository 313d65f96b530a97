"""Sweep the sparse-FFN grouped-GEMM launch shapes on this GPU, one kernel at a time.

    python benchmarks/tune_sparse_ffn.py [--tokens 8192] [--ratio 0.3] [--full] [--out results.json]
    python benchmarks/tune_sparse_ffn.py --decode [--ratio 0.15] [--out results.json]

bf16, d_model 4096, d_ff 14336, 64 blocks (the bench suite's shape). For each kernel of the forward
(gate_up, down) and of the backward (dact, dx, dw_gate_up, dw_down) the candidates are timed
through ``sparse_ffn_fwd`` / ``sparse_ffn_bwd`` with that kernel's config replaced and the others
at their defaults; ``block_m`` (shared: it sets the grouping) is swept first. Every config's result
is compared with the default config's (relative error < 1e-2, else reported, not timed). Prints
the best per kernel and the combined config, next to the dense SwiGLU (cuBLAS) on the same tokens;
the winners go into ``launch_config`` / ``bwd_launch_config`` in deepseek_kernels/triton/sparse_ffn.py.

``--decode``: the two decode kernels (``sparse_ffn_decode``, 1 and 8 tokens), each swept with the
other at its default, timed replayed from a CUDA graph (their GPU time; eager calls add the CPU
launch cost on top) next to the dense SwiGLU replayed the same way; winners go into
``decode_launch_config``.
"""

import argparse
import itertools

import torch

from deepseek_kernels.reference.sparse_ffn import swiglu_ffn_ref
from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import bench, bench_graphed_sets, rel, save_json, sets_for  # benchmarks/ is on sys.path when a script in it runs


# (block_n, block_k, num_warps, num_stages)
FULL = list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3, 4)))
FOCUS = [(64, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3), (128, 64, 8, 4), (64, 128, 4, 3), (128, 128, 8, 3),
         (32, 64, 4, 4), (32, 128, 4, 3), (64, 32, 4, 4), (128, 32, 8, 4)]


# decode: (block_n, block_k, num_warps, num_stages) per kernel
DECODE_FULL = {"gate_up": list(itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (2, 3, 4, 6, 8))),
               "down": list(itertools.product((16, 32, 64), (32, 64, 128, 256), (2, 4), (2, 3, 4, 6, 8)))}
# Session 9: the focus lists now hold the defaults and deeper pipelines (never tried: stages stopped at 4).
# By Little's law the down kernel is latency-bound: 256 programs of 2 warps, ~16 KB of loads in flight each,
# 18 MB in 12.3 us = ~12 GB/s per SM (session 8's profile); more stages put more bytes in flight per program.
# Shared memory (aot_compile_check sizes): gate/up 32x128 at 8 stages ~160 KiB, down 16x128 at 8 ~64 KiB.
DECODE_FOCUS = {"gate_up": [(32, 256, 4, 3), (32, 128, 4, 4), (32, 128, 4, 6), (32, 128, 4, 8), (32, 256, 4, 4),
                            (16, 256, 4, 5), (32, 64, 4, 8), (16, 128, 2, 8),
                            # session 11: (32, 128, 4, 8) won at 1 token; its neighbours
                            (32, 128, 4, 7), (32, 128, 8, 8), (16, 128, 4, 8), (64, 128, 4, 6), (32, 256, 4, 5),
                            (32, 256, 8, 4), (16, 256, 4, 6), (64, 64, 4, 8)],
                "down": [(16, 128, 2, 4), (16, 128, 2, 6), (16, 128, 2, 8), (16, 128, 4, 8), (16, 64, 2, 8),
                         (16, 256, 2, 4), (32, 128, 2, 6), (16, 64, 4, 8),
                         # session 10: the pairs of a column tile in slices (fp32 partials + a finish kernel)
                         (16, 128, 2, 4, 2), (16, 128, 2, 4, 4), (16, 128, 2, 3, 8), (16, 64, 2, 4, 4),
                         (32, 128, 4, 4, 4),
                         # session 11: one K tile per block (block_k 256 >= BS 224) won at 1 token
                         (16, 256, 2, 3), (16, 256, 2, 6), (16, 256, 4, 4), (32, 256, 4, 4), (32, 256, 2, 4),
                         (16, 256, 2, 4, 2), (32, 256, 4, 4, 2), (32, 256, 4, 4, 4),
                         # session 14: deeper pipelines of the one-K-tile form (at 1 token a column tile has ~10
                         # tiles to load: 8 stages ask for 7 of them at once); wider column tiles. All fit the
                         # shared memory (aot_compile_check sizes: 32x256 at 8 stages 168 KiB, 64x256 at 5 160 KiB).
                         (32, 256, 4, 6), (32, 256, 4, 8), (32, 256, 8, 6), (64, 256, 4, 4), (64, 256, 4, 5),
                         (64, 256, 8, 5),
                         # session 15: wide column tiles for the neuron-major layout (--down-layout: a tile row is
                         # BLOCK_N contiguous outputs there), alone and in slices to keep ~128 programs at T1
                         (64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (64, 128, 4, 4, 2),
                         (128, 64, 4, 4, 4), (128, 128, 4, 3, 4)]}


def tune_decode(args):
    """The decode kernels: for 1 and 8 tokens, each kernel's configs with the other at its default."""
    D, F_, NB, dev = args.d_model, args.d_ff, 64, args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    k = max(1, round(args.ratio * NB))
    torch.manual_seed(0)
    wg, wu = ((torch.randn(F_, D, device=dev) / D**0.5).to(dt) for _ in range(2))
    wd = (torch.randn(D, F_, device=dev) / F_**0.5).to(dt)
    # --down-layout neuron-major: the sparse kernels read w_down stored [d_ff, d_model] (through .t(), the same
    # values): each used block's down slice is one contiguous 1.8 MB slab instead of 4096 row pieces of 448 bytes
    # spread over 117 MB (the T1 down kernel moves 17.6 MB at 1.74 TB/s, gate/up's contiguous slabs 2.75 TB/s).
    # The dense baseline keeps nn.Linear's layout.
    wd_dense = wd
    if args.down_layout == "neuron-major":
        wd = wd.t().contiguous().t()
    kw = dict(shared_blocks=0, n_blocks=NB)
    result = {"ratio": args.ratio, "k": k, "down_layout": args.down_layout, "cases": []}
    for T in (1, 8):
        x = torch.randn(T, D, device=dev, dtype=dt)
        idx = torch.rand(T, NB, device=dev).topk(k, dim=-1).indices.to(torch.int32)
        w = torch.rand(T, k, device=dev) + 0.1
        # weight copies cycled per replay, so the used blocks (~55 MB for one token) come from HBM
        # rather than from the L2 the previous replay left (the bench harness rotates its inputs too)
        used = torch.unique(idx).numel() / NB * 3 * F_ * D * wg.element_size()
        n = sets_for(int(used))
        ws = [(wg, wu, wd)] + [(wg.clone(), wu.clone(), wd.clone()) for _ in range(n - 1)]  # clone keeps strides
        wds = [t[2] for t in ws] if wd is wd_dense else [wd_dense] + [wd_dense.clone() for _ in range(n - 1)]
        dense = bench_graphed_sets(lambda i: swiglu_ffn_ref(x, ws[i][0], ws[i][1], wds[i]),
                                   min(n, sets_for(3 * F_ * D * 2)))
        ref = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, **kw)
        default = bench_graphed_sets(lambda i: tk.sparse_ffn_decode(x, *ws[i], idx, w, **kw), n)
        print(f"== decode T{T} ratio {args.ratio} ({k}/{NB} blocks, {n} weight copies, w_down {args.down_layout}), "
              f"graphed: dense "
              f"{dense * 1e3:.1f} us, default {default * 1e3:.1f} us ({dense / default:.2f}x dense)", flush=True)
        case = {"T": T, "weight_copies": n, "dense_ms": dense, "default_ms": default, "rows": [], "best": {}}
        for kern in args.kernels.split(","):
            rows = []
            for bn, bk, nw, st, *split in DECODE_FULL[kern] if args.full else DECODE_FOCUS[kern]:
                cfg = {kern: dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st,
                                  **({"splits": split[0]} if split else {}))}
                try:
                    err = rel(tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, config=cfg, **kw), ref)
                    if not err < 1e-2:
                        rows.append({"kernel": kern, "config": cfg, "error": f"differs from the default: {err:.2e}"})
                        continue
                    ms = bench_graphed_sets(lambda i: tk.sparse_ffn_decode(x, *ws[i], idx, w, config=cfg, **kw), n)
                    rows.append({"kernel": kern, "config": cfg, "ms": ms})
                except Exception as e:  # e.g. out of shared memory
                    rows.append({"kernel": kern, "config": cfg, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            case["rows"] += rows
            good = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            for r in good[:3]:
                print(f"   {kern} {r['config'][kern]}: {r['ms'] * 1e3:.1f} us", flush=True)
            if good:
                case["best"][kern] = good[0]["config"][kern]
        both = bench_graphed_sets(lambda i: tk.sparse_ffn_decode(x, *ws[i], idx, w, config=case["best"], **kw), n)
        case["combined_ms"] = both
        print(f"combined {case['best']}: {both * 1e3:.1f} us = {dense / both:.2f}x dense (graphed)", flush=True)
        result["cases"].append(case)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ratio", type=float, help="active ratio (default 0.3; 0.15 with --decode)")
    ap.add_argument("--full", action="store_true", help="the full grid per kernel (long)")
    ap.add_argument("--skip-bwd", action="store_true")
    ap.add_argument("--d-model", type=int, default=4096)
    ap.add_argument("--d-ff", type=int, default=14336)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    ap.add_argument("--decode", action="store_true", help="sweep the decode kernels (1 and 8 tokens) instead")
    ap.add_argument("--kernels", default="gate_up,down", help="with --decode: which kernels' configs to sweep")
    ap.add_argument("--down-layout", choices=("out-major", "neuron-major"), default="out-major",
                    help="with --decode: w_down as nn.Linear stores it ([d_model, d_ff]) or neuron-major (its transpose "
                         "stored, read through .t())")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.ratio is None:
        args.ratio = 0.15 if args.decode else 0.3  # serving runs at ~15 %, training at 30-50 %
    if args.decode:
        save_json(args.out, tune_decode(args))
        return
    T, D, F_, NB = args.tokens, args.d_model, args.d_ff, 64
    k = max(1, round(args.ratio * NB))
    torch.manual_seed(0)
    dev = args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    x = torch.randn(T, D, device=dev, dtype=dt)
    wg, wu = ((torch.randn(F_, D, device=dev) / D**0.5).to(dt) for _ in range(2))
    wd = (torch.randn(D, F_, device=dev) / F_**0.5).to(dt)
    idx = torch.rand(T, NB, device=dev).topk(k, dim=-1).indices.to(torch.int32)
    w = torch.rand(T, k, device=dev) + 0.1
    go = torch.randn(T, D, device=dev, dtype=dt)
    kw = dict(shared_blocks=0, n_blocks=NB)
    dense = bench(lambda: swiglu_ffn_ref(x, wg, wu, wd))
    print(f"== T{T} ratio {args.ratio} ({k}/{NB} blocks): dense SwiGLU forward {dense:.3f} ms", flush=True)
    ref, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    base_fwd = bench(lambda: tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, save_act=True, **kw))
    ref_b = None if args.skip_bwd else tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw)
    base_bwd = None if args.skip_bwd else bench(lambda: tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw))
    print(f"   default config: forward {base_fwd:.3f} ms" + ("" if args.skip_bwd else f", backward {base_bwd:.3f} ms"))
    result = {"T": T, "ratio": args.ratio, "k": k, "dense_fwd_ms": dense, "default_fwd_ms": base_fwd,
              "default_bwd_ms": base_bwd, "rows": []}

    def trial(kind, cfg):
        try:
            if kind == "fwd":
                out, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)
                err = rel(out, ref)
                fn = lambda: tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)  # noqa: E731
            else:
                got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
                err = max(rel(a, b) for a, b in zip(got, ref_b))
                fn = lambda: tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)  # noqa: E731
            if not err < 1e-2:
                return {"kind": kind, "config": cfg, "error": f"differs from the default config: {err:.2e}"}
            return {"kind": kind, "config": cfg, "ms": bench(fn)}
        except Exception as e:  # e.g. out of shared memory for this tile shape
            return {"kind": kind, "config": cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"}

    best_cfg = {"fwd": {}, "bwd": {}}
    for kind, kernels in (("fwd", ("gate_up", "down")), ("bwd", ("dact", "dx", "dw_gate_up", "dw_down"))):
        if kind == "bwd" and args.skip_bwd:
            continue
        for bm in (64, 128):
            r = trial(kind, {"block_m": bm})
            result["rows"].append(r)
            print(f"   {kind} block_m {bm}: {r.get('ms', r.get('error'))}", flush=True)
        ok = [r for r in result["rows"] if r["kind"] == kind and "ms" in r and list(r["config"]) == ["block_m"]]
        bm = min(ok, key=lambda r: r["ms"])["config"]["block_m"] if ok else None
        if bm:
            best_cfg[kind]["block_m"] = bm
        for kern in kernels:
            rows = []
            for bn, bk, nw, st in FULL if args.full else FOCUS:
                cfg = {**({"block_m": bm} if bm else {}),
                       kern: dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)}
                r = trial(kind, cfg)
                r["kernel"] = kern
                rows.append(r)
                result["rows"].append(r)
            good = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
            if good:
                best_cfg[kind][kern] = good[0]["config"][kern]
                print(f"   {kind} {kern}: best {good[0]['config'][kern]} {good[0]['ms']:.3f} ms "
                      f"(of {len(good)} timed, {len(rows) - len(good)} failed)", flush=True)
    final_fwd = trial("fwd", best_cfg["fwd"])
    print(f"combined forward config {best_cfg['fwd']}: {final_fwd.get('ms', final_fwd.get('error'))} ms "
          f"(default {base_fwd:.3f}, dense {dense:.3f})")
    result["best"] = best_cfg
    result["combined_fwd"] = final_fwd
    if not args.skip_bwd:
        final_bwd = trial("bwd", best_cfg["bwd"])
        print(f"combined backward config {best_cfg['bwd']}: {final_bwd.get('ms', final_bwd.get('error'))} ms "
              f"(default {base_bwd:.3f})")
        result["combined_bwd"] = final_bwd
    save_json(args.out, result)


if __name__ == "__main__":
    main()
