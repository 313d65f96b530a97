"""Decode int8 GEMV as a programmatic dependent launch that prefetches its weights into L2 before it waits,
against the same kernels without (issue 5's "80 % of copy bandwidth on the weight bytes"), on the GPU.

    python benchmarks/diag_int8_prefetch.py [--out FILE.json] [--settings off,0,1024]

Each setting runs in a child process (``DSK_PDL`` / ``DSK_INT8_PREFETCH`` are read once per process):
``off`` = no programmatic launches (``DSK_PDL=0``), a number = programmatic launches with that many bytes of
each weight row prefetched (0: the launch alone). Per shape each child checks that the public ops give the
bits of the Triton op launched plainly, then times, replayed from CUDA graphs over enough weight copies to
defeat the L2: ``int8_matmul`` (the Triton kernel: what a captured call runs; it never prefetches: that lost
in session 20), the C++ ``int8_gemv`` op,
``int8_linear`` (Triton quantize + GEMM) and the C++ ``int8_linear_gemv``; and eager, the public
``int8_matmul`` / ``int8_linear`` (the C++ entries). Also the ceilings: the device-to-device copy bandwidth
(1 GiB) and a pure read of the same weight bytes (``torch.sum`` of them viewed as int32, graphed the same
way: a poor ceiling, 15 % of copy in session 20), as % of copy. Prints one table. The C++ kernel's own
switch ``DSK_INT8_GEMV_ROWS`` passes through from the environment to the children.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tuning import save_json, variant_rows  # noqa: E402

# the last: an lm_head-sized GEMV, whose grid takes several waves (the early trigger's untested case)
SHAPES = [(1, 14336, 4096), (4, 14336, 4096), (16, 14336, 4096), (1, 4096, 14336), (1, 128256, 4096)]
DEFAULT_SETTINGS = "off,0,512,1024,2048,4096"


def child() -> None:
    import torch

    from _tuning import bench_graphed_sets, decode_operands, per_call_us

    import deepseek_kernels as dk
    from deepseek_kernels.bench.harness import measure_copy_bandwidth
    from deepseek_kernels import _extension
    from deepseek_kernels.ops._registry import pdl_enabled, programmatic_launches

    ops = torch.ops.deepseek_kernels
    dev = torch.empty(0, device="cuda")
    pdl = pdl_enabled(dev, "int8_matmul")
    copy = measure_copy_bandwidth()
    rows = []
    for M, N, K in SHAPES:
        sets, ws, sw, x, xq, xs = decode_operands(M, N, K)
        with programmatic_launches(False):
            want = ops.int8_matmul(xq, ws[0], xs, sw, None, torch.bfloat16)  # the Triton kernel, plain launch
        checks = {
            "matmul_eager": dk.int8_matmul(xq, ws[0], xs, sw),
            "gemv_op": ops.int8_gemv(xq, ws[0], xs, sw, None, torch.bfloat16, pdl),
            "linear_eager": dk.int8_linear(x, ws[0], sw),
            "linear_op": ops.int8_linear_gemv(x, ws[0], sw, None, None, pdl),
        }
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            captured = dk.int8_matmul(xq, ws[0], xs, sw)
        g.replay()
        checks["matmul_graphed"] = captured
        bad = [k for k, v in checks.items() if not torch.equal(v, want)]

        fns = {
            "matmul": lambda i: dk.int8_matmul(xq, ws[i], xs, sw),
            "gemv": lambda i: ops.int8_gemv.default(xq, ws[i], xs, sw, None, torch.bfloat16, pdl),
            "linear": lambda i: dk.int8_linear(x, ws[i], sw),
            "linear_cpp": lambda i: ops.int8_linear_gemv.default(x, ws[i], sw, None, None, pdl),
            "read": lambda i: ws[i].view(torch.int32).sum(),
        }
        us = {name: 1e3 * bench_graphed_sets(fn, sets) for name, fn in fns.items()}
        us["matmul_eager"] = per_call_us(lambda: [dk.int8_matmul(xq, w, xs, sw) for w in ws], n=60) / sets
        us["linear_eager"] = per_call_us(lambda: [dk.int8_linear(x, w, sw) for w in ws], n=60) / sets
        pct = {f"{k}_pct_copy": 100 * N * K / (v * 1e-6) / copy for k, v in us.items()}
        rows.append({"M": M, "N": N, "K": K, "sets": sets, "bits_differ": bad, "pdl": pdl,
                     "prefetch": _extension._C.int8_gemv_prefetch_bytes() if pdl else 0, "copy_tbps": copy / 1e12, **us, **pct})
    print("RESULT " + json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help=f"comma-separated: off (no programmatic launches) or prefetch bytes (default {DEFAULT_SETTINGS})")
    ap.add_argument("--rounds", type=int, default=1, help="run the settings this many times, alternating")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return
    results = []
    for rnd in range(args.rounds):
        for setting in args.settings.split(","):
            env = {**os.environ, "DSK_INT8_GEMV": "1"}
            if setting == "off":
                env["DSK_PDL"] = "0"
            else:
                env.update(DSK_PDL="1", DSK_INT8_PREFETCH=setting)
            label = "no PDL" if setting == "off" else f"PDL+{setting}"
            for r in variant_rows(__file__, env, label, 300, results, setting=label, round=rnd):
                bits = "ok" if not r["bits_differ"] else "DIFFER " + ",".join(r["bits_differ"])
                print(f"{label:9s} r{rnd} M{r['M']:<3d} N{r['N']:<6d} K{r['K']:<6d} bits {bits:4s} copy {r['copy_tbps']:.2f} TB/s"
                      f" | graphed us (% copy): matmul {r['matmul']:5.1f} ({r['matmul_pct_copy']:4.1f})"
                      f" gemv {r['gemv']:5.1f} ({r['gemv_pct_copy']:4.1f})"
                      f" linear {r['linear']:5.1f} ({r['linear_pct_copy']:4.1f})"
                      f" linear_cpp {r['linear_cpp']:5.1f} ({r['linear_cpp_pct_copy']:4.1f})"
                      f" read {r['read']:5.1f} ({r['read_pct_copy']:4.1f})"
                      f" | eager matmul {r['matmul_eager']:5.1f} linear {r['linear_eager']:5.1f}", flush=True)
    save_json(args.out, results)


if __name__ == "__main__":
    main()
