"""Sweep the launch shapes of the hierarchical attention kernels on this GPU, next to the
sliding-window op with the same window on the same inputs.

    python benchmarks/tune_hierarchical.py [--seqlen 32768] [--full] [--out results.json]
    python benchmarks/tune_hierarchical.py --decode [--seqlen 131072] [--out results.json]

bf16, H=32/32, D=128, W=4096, block=64, levels=None (the bench suite's shape). Forward: every
config's output is compared with the default config's (relative error < 1e-2, else reported, not
timed). Backward: the same for (dq, dk, dv), and each config is run twice and must give the same
bits (Triton 3.6 raced with pipelined loops at D=128: benchmarks/NOTES.md). The winners go into
``_blocks`` / the launch defaults in deepseek_kernels/triton/hierarchical_attention.py.

``--decode``: the decode attention kernel (one token, B=1, H32/8, D=128, W=4096, cache prefilled with
``--seqlen`` tokens) over its launch shape (block_n, num_warps, num_stages, num_splits), replayed from
a CUDA graph (GPU time), next to the window decode kernel on the same context; every config's output
is compared with the default's. Winners go into ``hierarchical_decode_attn``'s defaults.
"""

import argparse
import itertools

import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.hierarchical_attention import resolve_levels
from deepseek_kernels.triton.hierarchical_attention import hierarchical_attention_bwd, hierarchical_attention_fwd

from _tuning import bench, bench_graphed_sets, rel, save_json, sets_for  # benchmarks/ is on sys.path when a script in it runs


# (block_m, block_n, block_s, num_warps, num_stages)
FWD_FULL = [c for c in itertools.product((32, 64), (32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3))
            if not (c[0] == 32 and c[3] == 8)]
FWD_FOCUS = [(64, 64, 32, 4, 2), (64, 64, 32, 4, 3), (64, 32, 32, 4, 3), (64, 128, 32, 4, 2), (64, 64, 64, 4, 2),
             (64, 64, 32, 8, 2), (64, 128, 32, 8, 2), (32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (64, 64, 32, 4, 1)]
# backward, per kernel (the others at their defaults); H200, S=32k (2026-11-29, one setting for all
# three kernels then): 64x64 w4 st1 21.3 ms, st2 21.9, w8 or 128-wide tiles 31-48 ms
BWD_KEYS = {"dq": ("block_m", "block_n", "block_s", "num_warps", "num_stages"),
            "dkdv": ("block_m", "block_n", "num_warps", "num_stages"),
            "dsum": ("block_m", "block_s", "num_warps", "num_stages")}
# ptxas (scripts/aot_compile_check.py --usage, Triton 3.6, D=128): dq 64x64 spills at 4 warps, not at 8 warps
# with 2-3 stages; dkdv 64x64 spills at 4 and 8 warps, 32x64 / 16x64 at 8 warps and 32x32 do not; dsum with
# 64-wide summary tiles spills (16: 178 regs, none)
BWD_FOCUS = {
    "dq": [(64, 64, 32, 4, 1), (64, 64, 32, 4, 2), (64, 64, 32, 4, 3), (64, 64, 64, 4, 1), (64, 64, 32, 8, 2),
           (64, 64, 32, 8, 3), (64, 32, 32, 4, 3), (32, 64, 32, 4, 2)],
    "dkdv": [(64, 64, 4, 1), (64, 64, 4, 2), (32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2), (32, 32, 4, 2),
             (64, 32, 4, 2), (64, 64, 8, 2)],
    "dsum": [(64, 16, 4, 1), (64, 16, 4, 2), (64, 16, 8, 2), (64, 32, 4, 1), (64, 32, 4, 2), (64, 32, 8, 1),
             (64, 32, 8, 2), (32, 16, 4, 2), (32, 32, 4, 1)],
}
BWD_FULL = {
    "dq": [c for c in itertools.product((32, 64), (32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3))
           if not (c[0] == 32 and c[3] == 8)],
    "dkdv": [c for c in itertools.product((32, 64), (32, 64, 128), (4, 8), (1, 2, 3)) if not (c[0] == 32 and c[2] == 8)],
    "dsum": list(itertools.product((32, 64), (16, 32, 64), (4, 8), (1, 2, 3))),
}


# (block_n, num_warps, num_stages, num_splits; None = the default heuristic)
# ptxas at D=128 (Triton 3.6): 64/4 warps 250 regs (3 stages: 139 KiB shared, 2: 72 KiB); 32/4 warps
# 166 regs, 38 KiB at 2 stages; 64/8 warps 166 regs; 128 spills below 8 warps; 2 warps spill
DECODE_FOCUS = [(64, 4, 2, None), (64, 4, 3, None), (64, 4, 1, None), (32, 4, 2, None), (32, 4, 3, None),
                (64, 8, 2, None), (128, 8, 2, None), (32, 8, 2, None), (64, 4, 2, 16), (64, 4, 2, 66),
                (32, 4, 2, 66), (32, 4, 2, 132)]
DECODE_FULL = list(itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 3), (None, 16, 33, 66, 132)))


def tune_decode(args):
    from deepseek_kernels.decode import RollingKVCache
    from deepseek_kernels.hierarchical_decode import HierarchicalKVCache
    from deepseek_kernels.triton.hierarchical_decode import hierarchical_decode_attn

    S, W, Hq, Hkv, D, BLOCK, dev = args.seqlen, args.window, 32, 8, 128, 64, args.device
    dt = torch.bfloat16 if dev == "cuda" else torch.float16
    torch.manual_seed(0)
    k, v = (torch.randn(1, S, Hkv, D, device=dev, dtype=dt) for _ in range(2))
    hc = HierarchicalKVCache(1, Hkv, D, window=W, block=BLOCK, max_seqlen=2 * S, dtype=dt, device=dev)
    hc.prefill(k, v)
    # several prefilled caches, cycled per replay: one cache's window + summaries (~18 MB) would
    # otherwise stay in the L2 between replays (the bench harness rotates its inputs too)
    per_set = hc.nbytes()
    n = sets_for(per_set)
    hcs = [hc]
    for _ in range(n - 1):
        hcs.append(HierarchicalKVCache(1, Hkv, D, window=W, block=BLOCK, max_seqlen=2 * S, dtype=dt, device=dev))
        hcs[-1].prefill(k, v)
    rcs = []
    for _ in range(n):
        rcs.append(RollingKVCache(1, Hkv, D, window=W, max_step=1, dtype=dt, device=dev))
        rcs[-1].prefill(k, v)
    del k, v
    q = torch.randn(1, 1, Hq, D, device=dev, dtype=dt)
    ones = torch.ones(1, dtype=torch.int64, device=dev)
    win = bench_graphed_sets(lambda i: dk.window_attention_decode(q, rcs[i]), n)
    scale = D**-0.5
    ref = hierarchical_decode_attn(q, hc, ones, softmax_scale=scale)
    default = bench_graphed_sets(lambda i: hierarchical_decode_attn(q, hcs[i], ones, softmax_scale=scale), n)
    print(f"== decode @ {S} W{W} H{Hq}/{Hkv} ({hc.levels} levels, {n} caches cycled), graphed: window decode "
          f"{win * 1e3:.1f} us, hierarchical default {default * 1e3:.1f} us ({default / win:.2f}x window)", flush=True)
    result = {"S": S, "W": W, "caches": n, "window_ms": win, "default_ms": default, "rows": []}
    for bn, nw, st, ns in DECODE_FULL if args.full else DECODE_FOCUS:
        cfg = dict(block_n=bn, num_warps=nw, num_stages=st, num_splits=ns)
        try:
            err = rel(hierarchical_decode_attn(q, hc, ones, softmax_scale=scale, **cfg), ref)
            if not err < 1e-2:
                result["rows"].append({**cfg, "error": f"differs from the default config: {err:.2e}"})
                continue
            ms = bench_graphed_sets(lambda i: hierarchical_decode_attn(q, hcs[i], ones, softmax_scale=scale, **cfg), n)
        except Exception as e:  # e.g. out of shared memory
            result["rows"].append({**cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        result["rows"].append({**cfg, "ms": ms, "vs_window": ms / win})
        print(f"  block_n {bn} w{nw} st{st} splits {ns}: {ms * 1e3:6.1f} us ({ms / win:.2f}x window)", flush=True)
    best = min((r for r in result["rows"] if "ms" in r), key=lambda r: r["ms"], default=None)
    if best:
        print(f"best decode: {best}")
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, help="tokens (default 32768; the cached context with --decode: 131072)")
    ap.add_argument("--full", action="store_true", help="sweep the full grids (long: one compile per config)")
    ap.add_argument("--skip-bwd", action="store_true")
    ap.add_argument("--skip-fwd", action="store_true", help="time only the window op and the backward sweep")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    ap.add_argument("--decode", action="store_true", help="sweep the decode attention kernel instead")
    ap.add_argument("--bcast", action="store_true",
                    help="every dkdv config with the per-key and the broadcast pooling backward")
    ap.add_argument("--kernels", default=",".join(BWD_KEYS),
                    help="backward sweep: which kernels (comma list of dq, dkdv, dsum; the others at their defaults)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.seqlen is None:
        args.seqlen = 131072 if args.decode else 32768  # decode: the bench suite's context
    if args.decode:
        save_json(args.out, tune_decode(args))
        return
    S, H, D, W, BLOCK = args.seqlen, args.heads, 128, args.window, 64
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(1, S, H, D, device=args.device,
                               dtype=torch.bfloat16 if args.device == "cuda" else torch.float16) for _ in range(4))
    kw = dict(window=W, block=BLOCK, levels=resolve_levels(None, S, window=W, block=BLOCK), sinks=0)
    win_fwd = bench(lambda: dk.window_attention(q, k, v, window=W))
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    win_fb = bench(lambda: torch.autograd.grad(dk.window_attention(qg, kg, vg, window=W), (qg, kg, vg), do))
    print(f"== S{S} H{H} D{D} W{W} block{BLOCK}: window_attention fwd {win_fwd:.3f} ms, fwd+bwd {win_fb:.3f} ms")
    ref, lse = hierarchical_attention_fwd(q, k, v, **kw)
    result = {"S": S, "H": H, "D": D, "W": W, "block": BLOCK, "window_fwd_ms": win_fwd,
              "window_fwd_bwd_ms": win_fb, "fwd": [], "bwd": []}
    fwd_grid = [] if args.skip_fwd else FWD_FULL if args.full else FWD_FOCUS
    for bm, bn, bs, w, st in fwd_grid:
        cfg = dict(block_m=bm, block_n=bn, block_s=bs, num_warps=w, num_stages=st)
        try:
            out, _ = hierarchical_attention_fwd(q, k, v, **kw, **cfg)
            err = rel(out, ref)
            if not err < 1e-2:
                result["fwd"].append({**cfg, "error": f"differs from the default config: {err:.2e}"})
                continue
            ms = bench(lambda: hierarchical_attention_fwd(q, k, v, **kw, **cfg))
        except Exception as e:  # a shape the compiler rejects (e.g. out of shared memory)
            result["fwd"].append({**cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        result["fwd"].append({**cfg, "ms": ms, "vs_window": ms / win_fwd})
        print(f"  fwd {bm}x{bn} s{bs} w{w} st{st}: {ms:7.3f} ms ({ms / win_fwd:.2f}x window)", flush=True)
    best_bwd = {}
    if not args.skip_bwd:
        want = hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw)
        base_bwd = bench(lambda: hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw))
        print(f"  bwd default: {base_bwd:7.3f} ms", flush=True)
        result["bwd_default_ms"] = base_bwd
        kernels = args.kernels.split(",")
        unknown = set(kernels) - set(BWD_KEYS)
        if unknown:
            raise SystemExit(f"--kernels: unknown {sorted(unknown)}; expected a comma list of {', '.join(BWD_KEYS)}")
        for kern, keys in BWD_KEYS.items():
            if kern not in kernels:
                continue
            rows = []
            grid = BWD_FULL[kern] if args.full else BWD_FOCUS[kern]
            if kern == "dkdv" and args.bcast:
                keys, grid = keys + ("bcast",), [vals + (p,) for vals in grid for p in (False, True)]
            for values in grid:
                cfg = {kern: dict(zip(keys, values))}
                row = {"kernel": kern, "config": cfg[kern]}
                try:
                    got = hierarchical_attention_bwd(do, q, k, v, ref, lse, config=cfg, **kw)
                    again = hierarchical_attention_bwd(do, q, k, v, ref, lse, config=cfg, **kw)
                    errs = [rel(g, t) for g, t in zip(got, want)]
                    if not all(e < 1e-2 for e in errs):
                        row["error"] = f"differs from the default config: {errs}"
                    elif not all(torch.equal(a, b) for a, b in zip(got, again)):
                        row["error"] = "not deterministic (two calls differ)"
                    else:
                        row["ms"] = bench(lambda: hierarchical_attention_bwd(do, q, k, v, ref, lse, config=cfg, **kw))
                except Exception as e:  # e.g. out of shared memory
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                rows.append(row)
                print(f"  bwd {kern} {cfg[kern]}: " + (f"{row['ms']:7.3f} ms" if "ms" in row else row["error"]),
                      flush=True)
            result["bwd"] += rows
            good = [r for r in rows if "ms" in r]
            if good:
                best_bwd[kern] = min(good, key=lambda r: r["ms"])["config"]
        combined = bench(lambda: hierarchical_attention_bwd(do, q, k, v, ref, lse, config=best_bwd, **kw))
        result["bwd_best"] = {"config": best_bwd, "ms": combined}
        print(f"best bwd per kernel {best_bwd}: {combined:.3f} ms (default {base_bwd:.3f})")
    best_f = min((r for r in result["fwd"] if "ms" in r), key=lambda r: r["ms"], default=None)
    if best_f:
        print(f"best fwd: {best_f}")
    if best_f and best_bwd:
        fb = best_f["ms"] + result["bwd_best"]["ms"]
        print(f"best fwd + bwd {fb:.3f} ms = {fb / win_fb:.2f}x window fwd+bwd "
              "(the op's fwd+bwd also pools twice and computes delta)")
    save_json(args.out, result)


if __name__ == "__main__":
    main()
