"""Where an eager int8 decode call spends its host time, on the GPU (issue 5).

    python benchmarks/diag_int8_route.py [--out FILE.json]

For M1 / M4 / M16 N14336 K4096 in one process: the path ``explain`` names, then microseconds per call
(wall time to finish and host time alone, see ``_tuning.per_call_us``) of ``dk.int8_linear`` and
``dk.int8_matmul`` as users call them, of the extension's ops called directly, of the Triton launches
directly, and of bf16 ``F.linear``; and the Python-side cost of each routing check alone. Then one
transformer block of the int8 suite's end-to-end stack at 1 token (bf16 and after ``quantize_model``): per
call of the block and of its modules, and a profiler table of the int8 block's CPU time by op.
"""

import argparse
import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _tuning import per_call_us  # noqa: E402

import deepseek_kernels as dk  # noqa: E402
from deepseek_kernels import _extension  # noqa: E402
from deepseek_kernels.ops._registry import eager_fast_path  # noqa: E402


im = importlib.import_module("deepseek_kernels.ops.int8_matmul")  # the module (the package re-exports a function)


def _triton_pair(x, w, ws):
    q, s = im._launch_quantize_per_token(x, None, direct=True)
    return im._int8_matmul_impl(q, w, s, ws, None, torch.bfloat16, direct=True, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--stack-only", action="store_true", help="only the 4-block stack's rows (_stack_rows)")
    ap.add_argument("--compiled", action="store_true",
                    help="with --stack-only: also both stacks under torch.compile(mode='reduce-overhead')")
    args = ap.parse_args()
    if args.stack_only:
        rows = [_stack_rows(args.compiled)]
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return
    ops = torch.ops.deepseek_kernels
    N, K = 14336, 4096
    w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    ws = torch.rand(N, device="cuda") * 1e-3
    wb = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    rows = []
    print(f"DSK_INT8_GEMV={os.environ.get('DSK_INT8_GEMV', '(unset)')} gemv_ready={im._gemv_ready(w)}")
    for M in (1, 4, 16):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        xq, xs = dk.quantize_per_token(x)
        fns = {
            "dk.int8_linear": lambda: dk.int8_linear(x, w, ws),
            "op int8_linear_gemv": lambda: ops.int8_linear_gemv.default(x, w, ws, None, None),
            "_C.int8_linear_eager": lambda: _extension._C.int8_linear_eager(x, w, ws, None, None),
            "triton quantize + matmul": lambda: _triton_pair(x, w, ws),
            "dk.int8_matmul": lambda: dk.int8_matmul(xq, w, xs, ws),
            "op int8_gemv": lambda: ops.int8_gemv.default(xq, w, xs, ws, None, torch.bfloat16),
            "_C.int8_gemv_eager": lambda: _extension._C.int8_gemv_eager(xq, w, xs, ws, None, torch.bfloat16),
            "triton matmul": lambda: im._int8_matmul_impl(xq, w, xs, ws, None, torch.bfloat16, direct=True,
                                                          check=False),
            "bf16 F.linear": lambda: torch.nn.functional.linear(x, wb),
            "check eager_fast_path": lambda: eager_fast_path(x, w, ws, None, None),
            "check _gemv_takes_linear": lambda: im._gemv_takes_linear(x, w, ws, None, None),
            "check is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        }
        row = {"M": M, "explain_linear": dk.explain("int8_linear", x, w, ws),
               "explain_matmul": dk.explain("int8_matmul", xq, w, xs, ws)}
        for name, fn in fns.items():
            row[name] = {"wall_us": per_call_us(fn, n=500), "host_us": per_call_us(fn, n=500, wait=False)}
        rows.append(row)
        print(f"M{M}: linear -> {row['explain_linear'][:60]} | matmul -> {row['explain_matmul'][:60]}")
        for name in fns:
            print(f"  {name:36s} wall {row[name]['wall_us']:7.1f} us  host {row[name]['host_us']:7.1f} us")
    rows.append(_block_rows())
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


def _block_rows() -> dict:
    """Host and wall time of one block of the e2e stack at 1 token, whole and by module (eager, no_grad)."""
    import copy

    from deepseek_kernels.bench.suites.int8_matmul import D_MODEL, _Block

    torch.manual_seed(0)
    ref = _Block().to("cuda", torch.bfloat16)
    q = copy.deepcopy(ref)
    dk.quantize_model(q)
    x = torch.randn(1, D_MODEL, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    fns = {"block bf16": lambda: ref(x), "block int8": lambda: q(x),
           "gate bf16 nn.Linear": lambda: ref.gate(x), "gate Int8Linear": lambda: q.gate(x),
           "o Int8Linear (sliced input)": lambda: q.o(q.qkv(x)[..., :D_MODEL]),
           "down Int8Linear": lambda: q.down(h), "silu * mul": lambda: torch.nn.functional.silu(h) * h}
    row = {"block": True}
    with torch.no_grad():
        for name, fn in fns.items():
            row[name] = {"wall_us": per_call_us(fn, n=100), "host_us": per_call_us(fn, n=100, wait=False)}
            print(f"  {name:36s} wall {row[name]['wall_us']:7.1f} us  host {row[name]['host_us']:7.1f} us")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                q(x)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
    print(table)
    row["profile"] = table
    return row


def _stack_rows(compiled: bool = False) -> dict:
    """The int8 suite's 4-block e2e stack at 1 token, eager, timed three ways in one process: a loop of calls
    (wall, host) and the suite's own timer (bursts between CUDA events, inputs rotating). Session 15: one block
    measured 124 us of wall time per call in the loop, but the suite's e2e row 240 us per block. ``compiled``:
    both stacks also under ``torch.compile(mode="reduce-overhead")`` (inductor + CUDA-graph trees, what a user gets
    from one line), by the suite's timer."""
    from deepseek_kernels.bench.harness import time_cuda
    from deepseek_kernels.bench.suites.int8_matmul import D_MODEL, _stacks

    ref, q, _ = _stacks()
    sets = [(torch.randn(1, D_MODEL, device="cuda", dtype=torch.bfloat16),) for _ in range(4)]
    row = {"stack": True}
    with torch.no_grad():
        for name, m in (("bf16", ref), ("int8", q)):
            x = sets[0][0]
            row[name] = {"loop_wall_us": per_call_us(lambda: m(x), n=200),
                         "loop_host_us": per_call_us(lambda: m(x), n=200, wait=False),
                         "harness_us": 1e3 * time_cuda(m, sets)["ms"]}
            print(f"  stack {name}: " + "  ".join(f"{k} {v:7.1f}" for k, v in row[name].items()), flush=True)
        if compiled:
            for name, m in (("bf16 compiled", ref), ("int8 compiled", q)):
                fn = torch.compile(m, mode="reduce-overhead", fullgraph=True, dynamic=False)
                for s_ in sets * 3:  # compile, record the CUDA graph, replay
                    fn(*s_)
                row[name] = {"harness_us": 1e3 * time_cuda(fn, sets)["ms"]}
                print(f"  stack {name}: harness_us {row[name]['harness_us']:7.1f}", flush=True)
    return row


if __name__ == "__main__":
    main()
