"""Helpers shared by the tuning scripts in benchmarks/."""

import json
import time

import torch
import triton.testing


def bench(fn, warmup: int = 5, rep: int = 50) -> float:
    """Median milliseconds of ``fn`` on a GPU (triton.testing.do_bench); without one (a smoke run
    under TRITON_INTERPRET=1) the wall-clock milliseconds of a single call."""
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep)


def per_call_us(fn, n=200, wait=True):
    """Microseconds per call: wall time to finish (``wait``), or the host time alone (the calls
    queued without waiting for the GPU: the launch cost)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    if wait:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def bench_graphed(fn, rep: int = 50) -> float:
    """Milliseconds of ``fn`` replayed from a CUDA graph (GPU time without the CPU launch cost:
    what a decode loop under torch.compile(mode="reduce-overhead") or a graphed runtime sees);
    without a GPU, the wall-clock milliseconds of a single call."""
    if not torch.cuda.is_available():
        return bench(fn)
    return triton.testing.do_bench_cudagraph(fn, rep=rep)


def sets_for(bytes_per_set: int, max_sets: int = 8) -> int:
    """How many copies of a call's inputs make cycling through them touch at least 2x the L2 cache
    (the bench harness's rule), so that a replayed call reads from HBM as in a real decode step
    rather than from the L2 copy the previous replay left (1 without a GPU)."""
    if not torch.cuda.is_available():
        return 1
    from deepseek_kernels.bench.harness import l2_bytes

    return min(max_sets, max(1, -(-2 * l2_bytes() // max(1, bytes_per_set))))


def bench_graphed_sets(fn, sets: int, rep: int = 50) -> float:
    """Milliseconds per call of ``fn(i)`` for i in range(sets), the calls replayed back to back from
    one CUDA graph (each on its own copy of the inputs: see :func:`sets_for`)."""
    if sets <= 1:
        return bench_graphed(lambda: fn(0), rep=rep)
    return bench_graphed(lambda: [fn(i) for i in range(sets)], rep=rep) / sets


def save_json(path: str | None, result) -> None:
    """Writes a tuner's result to ``path`` (--out), if given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def child_rows(script: str, env: dict, label: str, timeout: float) -> list[dict] | None:
    """Runs ``script --child`` with ``env`` (a tuning variant fixed per process) and returns the rows it printed
    as one ``RESULT <json>`` line; None, after printing the child's error, when it failed."""
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, os.path.abspath(script), "--child"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"{label}: failed (exit {proc.returncode})\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def variant_rows(script: str, env: dict, label: str, timeout: float, results: list, **tags) -> list[dict]:
    """:func:`child_rows` for one variant, recorded in ``results``: each row with ``tags``, or one error entry
    when the child failed. Returns the rows (empty on failure) for the caller to print."""
    rows = child_rows(script, env, label, timeout)
    if rows is None:
        results.append({**tags, "error": "the child failed (printed above)"})
        return []
    results.extend({**tags, **r} for r in rows)
    return rows


def decode_operands(M: int, N: int, K: int):
    """A decode GEMV's operands on the GPU: (sets, weights, weight_scale, x, x_q, x_scale) with ``sets`` int8 weight
    copies [N, K] (enough to defeat the L2 when cycled, :func:`sets_for`), fp32 scales [N], x [M, K] bf16 and its
    per-token quantization."""
    sets = sets_for(N * K)
    ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda") for _ in range(sets)]
    sw = torch.rand(N, device="cuda") * 1e-3
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    xq, xs = torch.ops.deepseek_kernels.quantize_per_token(x, None)
    return sets, ws, sw, x, xq, xs


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of ``a`` against ``b`` (Frobenius norms, float32)."""
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def kernel_times(step, steps: int = 3) -> dict:
    """{kernel name: device microseconds per call} of ``step()`` (torch.profiler, CUDA activity),
    after one warm-up call."""
    from collections import defaultdict

    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out = defaultdict(float)
    for ev in prof.key_averages():
        t = getattr(ev, "self_device_time_total", None)
        if t is None:
            t = getattr(ev, "self_cuda_time_total", 0.0)
        if t > 0:
            out[ev.key] += t / steps
    return dict(out)


def print_kernel_times(times: dict, per: float | None = None, unit: str = "") -> None:
    """One line per kernel, slowest first (``per``: also print us / per, labelled ``unit``)."""
    for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
        extra = f"  {1e3 * us / per:9.2f} {unit}" if per else ""
        print(f"   {name[:64]:64s} {us:10.1f} us{extra}")



def print_host_profile(fn, calls: int = 200, top: int = 18, width: int = 160) -> None:
    """cProfile of ``calls`` calls of ``fn()`` (the Python side of eager launches), top entries by
    own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    print("\n".join(line[:width] for line in buf.getvalue().splitlines()[:top + 27]))


def sparse_issue_inputs(tokens: int = 8192, d_model: int = 4096, d_ff: int = 14336, dtype=torch.bfloat16):
    """Issue 6's training shapes on the GPU (seed 0): ``(x, grad_out, w_gate, w_up, w_down)``, the weights scaled
    by 1 / sqrt(fan-in) (w_gate / w_up ``[d_ff, d_model]``, w_down ``[d_model, d_ff]``)."""
    torch.manual_seed(0)
    x = torch.randn(tokens, d_model, device="cuda", dtype=dtype)
    go = torch.randn(tokens, d_model, device="cuda", dtype=dtype)
    wg, wu = ((torch.randn(d_ff, d_model, device="cuda") * d_model**-0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(d_model, d_ff, device="cuda") * d_ff**-0.5).to(dtype)
    return x, go, wg, wu, wd


def sparse_routing(x: torch.Tensor, ratio: float, n_blocks: int = 64, block_m: int = 128):
    """The sparse FFN's real routing of ``x [T, D]`` at ``ratio`` (a random router scaled as a trained one,
    sigmoid gates, gate weighting): ``(k, idx, weights, grouping, w_full, w_sorted)``."""
    from deepseek_kernels.reference.sparse_ffn import n_active
    from deepseek_kernels.triton import sparse_ffn as tk

    k = n_active(ratio, n_blocks)
    D = x.shape[1]
    router = (torch.randn(n_blocks, D, device=x.device) * D**-0.5).to(x.dtype)
    idx, weights, _ = tk.sparse_ffn_route(x, router, k=k, gate="sigmoid", weighting="gate")
    return (k, idx, weights) + tuple(tk.route_pairs(idx, weights, 0, n_blocks, block_m))


def interleaved_tiles(grouping, group: int) -> torch.Tensor:
    """A permutation of the grouping's real row tiles: the m-th tile of each of ``group`` blocks together (the
    blocks of a group in order inside each wave), so the tiles in flight share a token window; 0: as grouped."""
    n = int(grouping.tile_count.item())
    if group == 0:
        return torch.arange(n, device=grouping.offsets.device)
    b = grouping.tile_block[:n].long()
    m = (grouping.tile_start[:n].long() - grouping.offsets[b].long()) // grouping.block_m
    return torch.argsort(((b // group) * 100000 + m) * 1000 + b)


def combine(y, inv, w_full, out, k: int, block_t: int = 16, block_n: int = 64, num_warps: int = 4) -> None:
    """The sparse FFN's weighted combine kernel over rows ``y`` at the given tiles (``out[t] = sum_j w[t, j]
    y[inv[t, j]]``)."""
    from deepseek_kernels.triton import sparse_ffn as tk

    T, D = out.shape
    tk._sparse_ffn_combine_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_n))](
        y, inv, w_full, out, T, D, k, out.stride(0), WEIGHTED=True, BLOCK_T=block_t, BLOCK_N=block_n,
        num_warps=num_warps)
