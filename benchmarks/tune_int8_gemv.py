"""The C++ decode GEMV's launch variants (csrc/int8/int8_gemv.cuh) against the Triton GEMV, on the GPU.

    python benchmarks/tune_int8_gemv.py [--out FILE.json]

The variant is fixed per process (DSK_INT8_GEMV_ROWS: weight rows per CTA; unset: the default rule),
so each runs in a child process of this script. Per shape each child
checks the op's bits against the Triton op, then times, replayed from CUDA graphs over enough copies
of the weights to defeat the L2: ``int8_gemv`` vs the Triton kernel (direct launch), and
``int8_linear_gemv`` (quantize + GEMV) vs the Triton pair; plus the eager (host-bound) call of each, through
the dispatcher (the ops), through the pybind11 entries (``_C.int8_gemv_eager`` / ``_C.int8_linear_eager``) and
through the public functions (``int8_matmul`` / ``int8_linear``). (Session 14's one-launch linear kernel for one
row lost here in session 15, 34.9 vs 20.7 us graphed, and was removed; so was the 8-row form, 23.9 vs 17.5 us.)
Prints one table; the parent needs no GPU work of its own.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tuning import save_json, variant_rows  # noqa: E402

SHAPES = [(1, 14336, 4096), (4, 14336, 4096), (16, 14336, 4096), (1, 4096, 14336), (4, 4096, 4096)]
VARIANTS = ["", "16", "32", "64"]


def child() -> None:
    import torch

    from _tuning import bench_graphed_sets, decode_operands, per_call_us

    import deepseek_kernels as dk
    from deepseek_kernels import _extension
    from deepseek_kernels.ops.int8_matmul import _gemv_ready, _int8_matmul_impl, _launch_quantize_per_token

    assert _gemv_ready(torch.empty(0, device="cuda")), "the extension's decode kernels are not available"
    ops = torch.ops.deepseek_kernels
    rows = []
    for M, N, K in SHAPES:
        sets, ws, sw, x, xq, xs = decode_operands(M, N, K)
        same = torch.equal(ops.int8_gemv(xq, ws[0], xs, sw, None, torch.bfloat16),
                           ops.int8_matmul(xq, ws[0], xs, sw, None, torch.bfloat16))
        same_lin = torch.equal(ops.int8_linear_gemv(x, ws[0], sw, None, None),
                               ops.int8_matmul(xq, ws[0], xs, sw, None, torch.bfloat16))

        def cpp(i):
            return ops.int8_gemv.default(xq, ws[i], xs, sw, None, torch.bfloat16)

        def tri(i):
            return _int8_matmul_impl(xq, ws[i], xs, sw, None, torch.bfloat16, direct=True, check=False)

        def cpp_lin(i):
            return ops.int8_linear_gemv.default(x, ws[i], sw, None, None)

        def tri_lin(i):
            q, s = _launch_quantize_per_token(x, None, direct=True)
            return _int8_matmul_impl(q, ws[i], s, sw, None, torch.bfloat16, direct=True, check=False)

        us = {name: 1e3 * bench_graphed_sets(fn, sets) for name, fn in
              (("gemv", cpp), ("triton", tri), ("linear", cpp_lin), ("triton_linear", tri_lin))}
        us.update({f"{name}_eager": per_call_us(lambda fn=fn: fn(0), n=300) for name, fn in
                   (("gemv", cpp), ("triton", tri), ("linear", cpp_lin), ("triton_linear", tri_lin))})
        C = _extension._C
        host = {"gemv_entry": lambda: C.int8_gemv_eager(xq, ws[0], xs, sw, None, torch.bfloat16),
                "gemv_public": lambda: dk.int8_matmul(xq, ws[0], xs, sw),
                "linear_entry": lambda: C.int8_linear_eager(x, ws[0], sw, None, None),
                "linear_public": lambda: dk.int8_linear(x, ws[0], sw)}
        us.update({f"{name}_eager": per_call_us(fn, n=300) for name, fn in host.items()})
        rows.append({"M": M, "N": N, "K": K, "same_bits": same, "same_bits_linear": same_lin,
                     "weight_gbps": N * K / us["gemv"] / 1e3, **us})
    print("RESULT " + json.dumps(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child()
        return
    results = []
    for rows in VARIANTS:
        env = {**os.environ, "DSK_INT8_GEMV": "1", "DSK_INT8_GEMV_ROWS": rows}
        label = f"rows={rows or 'auto'}"
        for r in variant_rows(__file__, env, label, 240, results, variant=label):
            print(f"{label:10s} M{r['M']:<3d} N{r['N']:<6d} K{r['K']:<6d} bits {'ok' if r['same_bits'] and r['same_bits_linear'] else 'DIFFER'}"
                  f"  graphed gemv {r['gemv']:6.1f} us vs triton {r['triton']:6.1f} ({r['triton'] / r['gemv']:.2f}x),"
                  f" linear {r['linear']:6.1f} vs {r['triton_linear']:6.1f}"
                  f" | eager gemv {r['gemv_eager']:6.1f} vs {r['triton_eager']:6.1f},"
                  f" linear {r['linear_eager']:6.1f} vs {r['triton_linear_eager']:6.1f}"
                  f" | entry / public gemv {r['gemv_entry_eager']:5.1f} / {r['gemv_public_eager']:5.1f},"
                  f" linear {r['linear_entry_eager']:5.1f} / {r['linear_public_eager']:5.1f}", flush=True)
    save_json(args.out, results)


if __name__ == "__main__":
    main()
