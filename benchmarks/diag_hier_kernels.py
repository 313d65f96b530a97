"""Per-kernel GPU time of one hierarchical attention forward + backward (torch.profiler), at several
sequence lengths, next to window_attention's: where the per-token cost grows with S.

    python benchmarks/diag_hier_kernels.py [--seqlens 8192,32768,131072,524288] [--out results.json]

bf16, B=1, H=32/32, D=128, W=4096, block 64, levels=None (the bench suite's scaling rows). Each
length: one warm-up step, then ``--steps`` profiled steps; a kernel's time is its summed device time
per step. The table prints microseconds per step and nanoseconds per token for every kernel.
"""

import argparse

import torch

import deepseek_kernels as dk

from _tuning import kernel_times, print_kernel_times, save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="8192,32768,131072,524288")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out")
    args = ap.parse_args()
    H, D, W, BLOCK = 32, 128, 4096, 64
    result = []
    for S in (int(s) for s in args.seqlens.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)

        def hier():
            torch.autograd.grad(dk.hierarchical_attention(q, k, v, window=W, block=BLOCK), (q, k, v), do)

        def window():
            torch.autograd.grad(dk.window_attention(q, k, v, window=W), (q, k, v), do)

        row = {"S": S, "hierarchical_us": kernel_times(hier, args.steps), "window_us": kernel_times(window, args.steps)}
        result.append(row)
        print(f"== S={S}: hierarchical {sum(row['hierarchical_us'].values()) / 1e3:.2f} ms, "
              f"window {sum(row['window_us'].values()) / 1e3:.2f} ms per fwd+bwd", flush=True)
        print_kernel_times(row["hierarchical_us"], per=S, unit="ns/token")
        del q, k, v, do
        torch.cuda.empty_cache()
    save_json(args.out, result)


if __name__ == "__main__":
    main()
