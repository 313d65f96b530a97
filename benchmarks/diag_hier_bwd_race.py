"""Which hierarchical backward kernel gives different bits between identical calls when pipelined?

    python benchmarks/diag_hier_bwd_race.py [--reps 12] [--out results.json]

Session 5 (H200, Triton 3.6): with dq and dkdv at 2 stages (the S=32k sweep's winners, deterministic
there) tests/test_hierarchical_triton.py's S=777 W128 block=32 Hkv=1 D=128 case gave differing bits.
This runs each stage setting on the test's shapes ``--reps`` times and counts calls whose (dq, dk, dv)
differ from the first, then times the deterministic settings at S=131072 H32 W4096 next to
window_attention's backward.
"""

import argparse

import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.hierarchical_attention import resolve_levels
from deepseek_kernels.triton.hierarchical_attention import hierarchical_attention_bwd, hierarchical_attention_fwd

from _tuning import bench, save_json

# (S, window, block, sinks, Hkv) as in tests/test_hierarchical_triton.py::test_gpu_forward_backward
CASES = [(777, 128, 32, 1, 1), (1000, 256, 64, 0, 2), (4097, 512, 64, 4, 8)]
VARIANTS = {
    "all unpipelined": {"dq": {"num_stages": 1}, "dkdv": {"num_stages": 1}},
    "dq 2 stages": {"dq": {"num_stages": 2}, "dkdv": {"num_stages": 1}},
    "dkdv 2 stages": {"dq": {"num_stages": 1}, "dkdv": {"num_stages": 2}},
    "dq+dkdv 2 stages": {"dq": {"num_stages": 2}, "dkdv": {"num_stages": 2}},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.manual_seed(0)
    result = {"races": [], "timing": []}
    racy = set()
    for S, W, block, sinks, hkv in CASES:
        for dtype in (torch.bfloat16, torch.float16):
            q = torch.randn(1, S, 8, 128, device="cuda", dtype=dtype)
            k, v = (torch.randn(1, S, hkv, 128, device="cuda", dtype=dtype) for _ in range(2))
            do = torch.randn_like(q)
            kw = dict(window=W, block=block, levels=resolve_levels(None, S, window=W, block=block), sinks=sinks)
            out, lse = hierarchical_attention_fwd(q, k, v, **kw)
            for name, cfg in VARIANTS.items():
                first = hierarchical_attention_bwd(do, q, k, v, out, lse, config=cfg, **kw)
                diff = [sum(not torch.equal(a, b) for a, b in zip(first, hierarchical_attention_bwd(
                    do, q, k, v, out, lse, config=cfg, **kw))) for _ in range(args.reps)]
                bad = sum(d > 0 for d in diff)
                if bad:
                    racy.add(name)
                row = dict(S=S, window=W, block=block, hkv=hkv, dtype=str(dtype), variant=name, differing_calls=bad)
                result["races"].append(row)
                print(f"S{S} W{W} block{block} Hkv{hkv} {dtype}: {name:18s} {bad}/{args.reps} calls differ", flush=True)
    S, H, W, BLOCK = 131072, 32, 4096, 64
    q, k, v, do = (torch.randn(1, S, H, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    kw = dict(window=W, block=BLOCK, levels=resolve_levels(None, S, window=W, block=BLOCK), sinks=0)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    win = bench(lambda: torch.autograd.grad(dk.window_attention(qg, kg, vg, window=W), (qg, kg, vg), do), rep=10)
    fwd = bench(lambda: hierarchical_attention_fwd(q, k, v, **kw), rep=10)
    out, lse = hierarchical_attention_fwd(q, k, v, **kw)
    print(f"== S{S} H{H} W{W}: window fwd+bwd {win:.2f} ms, hierarchical fwd {fwd:.2f} ms")
    for name, cfg in VARIANTS.items():
        ms = bench(lambda: hierarchical_attention_bwd(do, q, k, v, out, lse, config=cfg, **kw), rep=10)
        result["timing"].append(dict(variant=name, bwd_ms=ms, fwd_ms=fwd, window_fwd_bwd_ms=win, racy=name in racy))
        print(f"  {name:18s} bwd {ms:7.2f} ms, fwd+bwd {fwd + ms:7.2f} ms = {(fwd + ms) / win:.2f}x window"
              + ("  (NOT deterministic above)" if name in racy else ""), flush=True)
    save_json(args.out, result)


if __name__ == "__main__":
    main()
