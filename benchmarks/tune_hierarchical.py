"""Sweep the launch shapes of the hierarchical attention kernels on this GPU, next to the
sliding-window op with the same window on the same inputs.

    python benchmarks/tune_hierarchical.py [--seqlen 32768] [--full] [--out results.json]

bf16, H=32/32, D=128, W=4096, block=64, levels=None (the bench suite's shape). Forward: every
config's output is compared with the default config's (relative error < 1e-2, else reported, not
timed). Backward: the same for (dq, dk, dv), and each config is run twice and must give the same
bits (Triton 3.6 raced with pipelined loops at D=128: benchmarks/NOTES.md). The winners go into
``_blocks`` / the launch defaults in deepseek_kernels/triton/hierarchical_attention.py.
"""

import argparse
import itertools
import json

import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.hierarchical_attention import resolve_levels
from deepseek_kernels.triton.hierarchical_attention import hierarchical_attention_bwd, hierarchical_attention_fwd

from _tuning import bench, rel  # benchmarks/ is on sys.path when a script in it runs


# (block_m, block_n, block_s, num_warps, num_stages)
FWD_FULL = [c for c in itertools.product((32, 64), (32, 64, 128), (16, 32, 64), (4, 8), (1, 2, 3))
            if not (c[0] == 32 and c[3] == 8)]
FWD_FOCUS = [(64, 64, 32, 4, 2), (64, 64, 32, 4, 3), (64, 32, 32, 4, 3), (64, 128, 32, 4, 2), (64, 64, 64, 4, 2),
             (64, 64, 32, 8, 2), (64, 128, 32, 8, 2), (32, 64, 32, 4, 2), (64, 64, 16, 4, 2), (64, 64, 32, 4, 1)]
# (block_m, block_n, block_s (the dQ kernel's summary tile), num_warps, num_stages)
BWD_FULL = [c for c in itertools.product((32, 64), (32, 64, 128), (32, 64), (4, 8), (1, 2))
            if not (c[0] == 32 and c[3] == 8)]
# H200, S=32k (2026-11-29): 64x64 w4 st1 21.3 ms, st2 21.9, w8 or 128-wide tiles 31-48 ms; block_s was 64 then
BWD_FOCUS = [(64, 64, 32, 4, 1), (64, 64, 64, 4, 1), (64, 64, 32, 4, 2), (64, 64, 16, 4, 1), (64, 32, 32, 4, 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlen", type=int, default=32768)
    ap.add_argument("--full", action="store_true", help="sweep the full grids (long: one compile per config)")
    ap.add_argument("--skip-bwd", action="store_true")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run under TRITON_INTERPRET=1 (tiny sizes)")
    ap.add_argument("--out")
    args = ap.parse_args()
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
    for bm, bn, bs, w, st in FWD_FULL if args.full else FWD_FOCUS:
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
    if not args.skip_bwd:
        want = hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw)
        for bm, bn, bs, w, st in BWD_FULL if args.full else BWD_FOCUS:
            cfg = dict(block_m=bm, block_n=bn, block_s=bs, num_warps=w, num_stages=st)
            try:
                got = hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw, **cfg)
                again = hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw, **cfg)
                errs = [rel(g, t) for g, t in zip(got, want)]
                if not all(e < 1e-2 for e in errs):
                    result["bwd"].append({**cfg, "error": f"differs from the default config: {errs}"})
                    continue
                if not all(torch.equal(a, b) for a, b in zip(got, again)):
                    result["bwd"].append({**cfg, "error": "not deterministic (two calls differ)"})
                    print(f"  bwd {bm}x{bn} s{bs} w{w} st{st}: NOT deterministic", flush=True)
                    continue
                ms = bench(lambda: hierarchical_attention_bwd(do, q, k, v, ref, lse, **kw, **cfg))
            except Exception as e:
                result["bwd"].append({**cfg, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
                continue
            result["bwd"].append({**cfg, "ms": ms})
            print(f"  bwd {bm}x{bn} s{bs} w{w} st{st}: {ms:7.3f} ms", flush=True)
    best_f = min((r for r in result["fwd"] if "ms" in r), key=lambda r: r["ms"], default=None)
    best_b = min((r for r in result["bwd"] if "ms" in r), key=lambda r: r["ms"], default=None)
    if best_f:
        print(f"best fwd: {best_f}")
    if best_b:
        fb = best_f["ms"] + best_b["ms"] if best_f else float("nan")
        print(f"best bwd: {best_b}; best fwd + bwd {fb:.3f} ms = {fb / win_fb:.2f}x window fwd+bwd "
              "(the op's fwd+bwd also pools twice and computes delta)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
