"""Per-kernel GPU time of the quantized DDP hook's local work per 25 MiB fp32 bucket (torch.profiler):
which of the three kernels (quantize + error feedback into the send buffer, dequantize-sum-requantize,
dequantize) stays below copy speed, against the bytes each one must move.

    python benchmarks/diag_comm_kernels.py [--formats int8,fp8_e4m3] [--worlds 2,8] [--out results.json]
    python benchmarks/diag_comm_kernels.py --graph [--rounds 2]   # the graphed pipeline, timed two ways
    python benchmarks/diag_comm_kernels.py --once --formats int8 --worlds 8   # one call, for Nsight Compute

``--graph`` times the graphed pipeline as the comm_hook suite does (one graph per bucket, each replay a
graph launch: ``GraphReplay`` under ``time_cuda``) and with the buckets back to back in one graph
(``harness.time_cuda_graph``: the GPU time per bucket without a graph launch's head per bucket, what
a step's many buckets see), next to the profiler's sum of the three kernels.

Needs the CUDA extension (the hook's kernels are in csrc/). The bytes per kernel are the suite's
(``deepseek_kernels.bench.suites.comm_hook.fused_bytes``), split by hop.
"""

import argparse

import torch

from deepseek_kernels.bench import harness
from deepseek_kernels.bench.harness import measure_copy_bandwidth
from deepseek_kernels.bench.suites.comm_hook import BLOCK, BUCKET, GraphReplay, _inputs, fused_bytes, fused_pipeline
from deepseek_kernels.distributed import QuantizedGradState, _Plan

from _tuning import kernel_times, print_kernel_times, save_json


def hop_bytes(plan: _Plan) -> dict:
    """Minimum bytes of each kernel (the suite's fused_bytes, by term)."""
    L, P, S, B = plan.length, plan.padded, plan.shard, plan.block
    return {"quantize + EF (hop 1)": 13 * L + 4 * L // B + (P - L) + 4 * (P - L) // B,
            "sum + requantize (hop 2)": P + 4 * P // B + 13 * S + 4 * S // B,
            "dequantize": 5 * P + 4 * P // B}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="int8,fp8_e4m3")
    ap.add_argument("--worlds", default="2,8")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--graph", action="store_true", help="time the graphed pipeline two ways (see the docstring)")
    ap.add_argument("--rounds", type=int, default=2, help="--graph: rounds over the cases")
    ap.add_argument("--once", action="store_true", help="one warm-up and one timed-free call per case (for ncu)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.once:
        for fmt in args.formats.split(","):
            for world in (int(w) for w in args.worlds.split(",")):
                plan = _Plan.of(BUCKET, world, BLOCK)
                state = QuantizedGradState(fmt=fmt, block=BLOCK)
                inputs = _inputs(plan, fmt)
                for _ in range(2):
                    fused_pipeline(state, plan, *inputs)
                torch.cuda.synchronize()
        return
    if args.graph:
        return graph_rows(args)
    copy = measure_copy_bandwidth()
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s")
    rows = []
    for fmt in args.formats.split(","):
        for world in (int(w) for w in args.worlds.split(",")):
            plan = _Plan.of(BUCKET, world, BLOCK)
            state = QuantizedGradState(fmt=fmt, block=BLOCK)
            inputs = _inputs(plan, fmt)
            times = kernel_times(lambda: fused_pipeline(state, plan, *inputs), steps=args.steps)
            need = hop_bytes(plan)
            total_us = sum(times.values())
            print(f"== {fmt} W={world}: {total_us:.1f} us of kernels per bucket; minimum bytes per kernel "
                  + ", ".join(f"{k} {v / 1e6:.1f} MB ({1e6 * v / copy:.1f} us at copy speed)" for k, v in need.items()))
            print_kernel_times(times)
            rows.append({"fmt": fmt, "world": world, "kernel_us": times, "min_bytes": need,
                         "copy_bytes_per_s": copy, "kernels_total_us": total_us,
                         "pct_of_copy": 100 * sum(need.values()) / copy / (total_us * 1e-6)})
            print(f"   all kernels: {rows[-1]['pct_of_copy']:.1f} % of copy speed")
    save_json(args.out, rows)


def graph_rows(args):
    copy = measure_copy_bandwidth()
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s")
    rows = []
    for r in range(args.rounds):
        for fmt in args.formats.split(","):
            for world in (int(w) for w in args.worlds.split(",")):
                plan = _Plan.of(BUCKET, world, BLOCK)
                state = QuantizedGradState(fmt=fmt, block=BLOCK)
                sets = harness.rotated_inputs(lambda: _inputs(plan, fmt))
                fn = lambda *i: fused_pipeline(state, plan, *i)  # noqa: E731
                per_graph = harness.time_cuda(GraphReplay(fn), sets, reps=30)["ms"] * 1e3
                one_graph = harness.time_cuda_graph(fn, sets, reps=30)["ms"] * 1e3
                kernels = sum(kernel_times(lambda: fn(*sets[0]), steps=args.steps).values())
                b = fused_bytes(plan)
                pct = {k: 100 * b / (us * 1e-6) / copy for k, us in
                       (("per_graph", per_graph), ("one_graph", one_graph), ("kernels", kernels))}
                print(f"r{r} {fmt:9s} W={world}: a graph per bucket {per_graph:6.2f} us ({pct['per_graph']:5.1f} %), "
                      f"buckets in one graph {one_graph:6.2f} us ({pct['one_graph']:5.1f} %), "
                      f"kernels alone {kernels:6.2f} us ({pct['kernels']:5.1f} %) of copy", flush=True)
                rows.append({"round": r, "fmt": fmt, "world": world, "bytes": b, "copy_bytes_per_s": copy,
                             "graph_per_bucket_us": per_graph, "one_graph_us": one_graph, "kernels_us": kernels,
                             "pct_of_copy": pct})
                sets = None
                torch.cuda.empty_cache()
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
