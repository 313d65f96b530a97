"""Per-kernel GPU time of one hierarchical attention forward + backward (torch.profiler), at several
sequence lengths, next to window_attention's: where the per-token cost grows with S.

    python benchmarks/diag_hier_kernels.py [--seqlens 8192,32768,131072,524288] [--variants] [--out results.json]

bf16, B=1, H=32/32, D=128, W=4096, block 64, levels=None (the bench suite's scaling rows). Each
length: one warm-up step, then ``--steps`` profiled steps; a kernel's time is its summed device time
per step. The table prints microseconds per step and nanoseconds per token for every kernel.
"""

import argparse

import torch

import deepseek_kernels as dk

from deepseek_kernels.triton import hierarchical_attention as ha

from _tuning import kernel_times, print_kernel_times, save_json

# module defaults of deepseek_kernels.triton.hierarchical_attention and the values --variants profiles them
# with (session 8 kept the packed summary tiles and the broadcast pooling backward and removed the
# level-by-level tiles and the pool-per-group kernel: benchmarks/NOTES.md)
VARIANTS = {"BCAST_POOL_GRAD": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", default="8192,32768,131072,524288")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", action="store_true",
                    help="also profile with the non-default settings of VARIANTS (the per-key pooling backward) "
                         "in the same process")
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
        if args.variants:
            saved = {name: getattr(ha, name) for name in VARIANTS}
            try:
                for name, value in VARIANTS.items():
                    setattr(ha, name, value)
                row["variants_us"] = kernel_times(hier, args.steps)
            finally:
                for name, value in saved.items():
                    setattr(ha, name, value)
            print(f"   with {VARIANTS}: {sum(row['variants_us'].values()) / 1e3:.2f} ms", flush=True)
            print_kernel_times(row["variants_us"], per=S, unit="ns/token")
        del q, k, v, do
        torch.cuda.empty_cache()
    save_json(args.out, result)


if __name__ == "__main__":
    main()
