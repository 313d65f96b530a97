"""The window-attention forward against FlexAttention at each side's sustained clock (the H200's power cap).

    python benchmarks/diag_attn_sustained.py [--sustain 1.5] [--rounds 2] [--out diag_attn_sustained.json]

The suite times short interleaved rounds, so a row reads whatever clock the GPU holds then: S <= 32k rows finish
before the power limiter acts, S131072 rows do not (session 27: ours at ~1680 MHz there, FlexAttention at ~1950).
Here every side first runs back to back for ``--sustain`` seconds in every round (``harness.time_interleaved``'s
``sustain_s``), with a clock sampler around each timing, so each ratio is the steady state's. bf16, D128, causal,
the suite's W4096 forward shapes; useful FLOPs count only in-window pairs.
"""

import argparse

import torch

import deepseek_kernels as dk
from deepseek_kernels.bench.harness import ClockSampler, time_cuda, time_interleaved
from deepseek_kernels.bench.suites.attention import _flex
from deepseek_kernels.reference.attention import attended_pairs, flops

from _tuning import save_json

SHAPES = [(8192, 4, 4096, 32, 32), (32768, 1, 4096, 32, 32), (32768, 1, 4096, 32, 8), (131072, 1, 4096, 32, 32)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sustain", type=float, default=1.5, help="seconds of back-to-back calls before each timing")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    print(f"{'case':<24}{'ours ms':>9}{'flex ms':>9}{'ratio':>7}{'ours TF/s':>10}{'ours MHz':>9}{'flex MHz':>9}")
    for S, B, W, Hq, Hkv in SHAPES:
        torch.manual_seed(0)
        q = torch.randn(B, S, Hq, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, S, Hkv, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flex = _flex(W, 0, S, Hq, Hq != Hkv)
        ours = lambda q, k, v: dk.window_attention(q, k, v, window=W)  # noqa: E731
        err = ((ours(q, k, v).float() - flex(q, k, v).float()).norm() / flex(q, k, v).float().norm()).item()
        assert err < 2e-2, f"ours and FlexAttention disagree: relative error {err:.3e}"
        res = time_interleaved({"ours": ours, "flex": flex}, [(q, k, v)], reps=args.reps, rounds=args.rounds,
                               timer=time_cuda, sustain_s=args.sustain, sampler=ClockSampler)
        f = flops(B, Hq, 128, attended_pairs(S, S, window=W))
        mhz = {n: [c["sm_mhz_mean"] for c in res[n]["round_clocks"] if c] for n in res}
        row = {"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "rel_err_vs_flex": err, "sustain_s": args.sustain,
               "ours": res["ours"], "flex": res["flex"], "ratio": res["flex"]["ms"] / res["ours"]["ms"],
               "ours_tflops": f / res["ours"]["ms"] * 1e-9}
        rows.append(row)
        mean = lambda xs: round(sum(xs) / len(xs)) if xs else None  # noqa: E731
        print(f"{f'S{S} B{B} W{W} H{Hq}/{Hkv}':<24}{res['ours']['ms']:9.3f}{res['flex']['ms']:9.3f}"
              f"{row['ratio']:6.2f}x{row['ours_tflops']:10.0f}{mean(mhz['ours']) or 0:9}{mean(mhz['flex']) or 0:9}",
              flush=True)
        save_json(args.out, rows)


if __name__ == "__main__":
    main()
