"""Host side of the sparse FFN's training step (the suite's ``fwd+bwd`` rows, bf16, d_model 4096, d_ff 14336, 64
blocks): how long the CPU takes to enqueue one forward + backward (behind a GPU kept busy, so no launch waits on
the device) against the device time, whether anything synchronizes, and a cProfile of the enqueue.

    python benchmarks/diag_sparse_host.py [--ratios 0.15,0.3] [--tokens 8192] [--graphed | --breakdown] [--out F]
"""

import argparse
import cProfile
import io
import pstats
import time
import warnings

import torch

import deepseek_kernels as dk

from _tuning import bench, bench_graphed, save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.15,0.3")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--profile-top", type=int, default=40)
    ap.add_argument("--graphed", action="store_true",
                    help="only the device-bound times: eager vs CUDA-graph replays of ours and of the dense FFN")
    ap.add_argument("--breakdown", action="store_true",
                    help="only the host enqueue split: inside Triton launches (per kernel), inside TMA descriptor "
                         "building, and the rest (drivers, dispatch, autograd, allocation), no profiler")
    ap.add_argument("--out")
    args = ap.parse_args()
    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    ws = [(torch.randn(*s, device="cuda", dtype=dt) * s[1] ** -0.5).requires_grad_()
          for s in ((NB, D), (F_, D), (F_, D), (D, F_))]
    dout = torch.randn(T, D, device="cuda", dtype=dt)
    rows = []
    if args.graphed:
        graphed(x, ws, dout, [float(r) for r in args.ratios.split(",")], rows)
        save_json(args.out, rows)
        return
    if args.breakdown:
        breakdown(x, ws, dout, [float(r) for r in args.ratios.split(",")], rows)
        save_json(args.out, rows)
        return
    for ratio in (float(r) for r in args.ratios.split(",")):
        step = warm_step(x, ws, dout, ratio)
        gpu_ms = bench(step, rep=20)
        host = host_enqueue_ms(step)
        host_ms = sorted(host)[len(host) // 2]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode(0)
        syncs = [str(w.message)[:100] for w in caught if "synchroniz" in str(w.message)]
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        torch.cuda._sleep(400_000_000)
        prof.enable()
        for _ in range(3):
            step()
        prof.disable()
        torch.cuda.synchronize()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile_top)
        pstats.Stats(prof, stream=buf).sort_stats("cumtime").print_stats(args.profile_top)
        print(f"ratio {ratio}: device {gpu_ms:.3f} ms per fwd+bwd, host enqueue {host_ms:.3f} ms "
              f"(all: {', '.join(f'{h:.2f}' for h in host)}), synchronizing calls {len(syncs)}", flush=True)
        for s in syncs[:5]:
            print("   sync:", s)
        print("\n".join(ln.replace("/opt/torch/.venv/lib/python3.12/site-packages/", "") for ln in
                        buf.getvalue().splitlines() if ln.strip() and "Ordered" not in ln and "List red" not in ln),
              flush=True)
        # the same enqueue under torch.profiler's CPU view: aten ops and CUDA runtime / driver calls by self time
        torch.cuda._sleep(400_000_000)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            for _ in range(3):
                step()
        torch.cuda.synchronize()
        table = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_top, max_name_column_width=60)
        print(table, flush=True)
        rows.append(dict(ratio=ratio, cpu_table=table, T=T, device_ms=gpu_ms, host_ms=host_ms, host_all=host, syncs=syncs,
                         profile=buf.getvalue()))
    save_json(args.out, rows)


def warm_step(x, ws, dout, ratio: float):
    """One eager forward + backward of ours at ``ratio`` (gradients of x and every weight), run three times first
    (compiled, the allocator warm)."""
    def step():
        y = dk.gated_sparse_ffn(x, *ws, active_ratio=ratio)
        return torch.autograd.grad(y, (x, *ws), dout)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def host_enqueue_ms(step, n: int = 5) -> list:
    """Host time (ms) to enqueue ``step``, ``n`` times, each behind ~0.1 s of device work (so no launch waits on the
    device)."""
    out = []
    for _ in range(n):
        torch.cuda._sleep(200_000_000)
        t0 = time.perf_counter()
        step()
        out.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
    return out


def breakdown(x, ws, dout, ratios, rows, steps: int = 5):
    """Host enqueue time of one eager fwd+bwd step (the GPU kept busy ahead of it, so nothing waits on the device)
    split without a profiler: the time inside Triton's launcher (``JITFunction.run``: argument binding,
    specialization, the driver call; per kernel), inside the sm_90 kernels' TMA descriptor building
    (``sparse_ffn_sm90._desc``), and the rest (the Python drivers, torch dispatch, autograd, allocation)."""
    import collections

    import triton.runtime.jit as tjit

    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    launch_s = collections.Counter()
    launches = collections.Counter()
    desc_s = [0.0]
    orig_run, orig_desc = tjit.JITFunction.run, g9._desc

    def timed_run(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig_run(self, *a, **k)
        finally:
            name = getattr(self, "__name__", None) or getattr(getattr(self, "fn", None), "__name__", "?")
            launch_s[name] += time.perf_counter() - t0
            launches[name] += 1

    def timed_desc(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_desc(*a, **k)
        finally:
            desc_s[0] += time.perf_counter() - t0

    for ratio in ratios:
        step = warm_step(x, ws, dout, ratio)
        launch_s.clear()
        launches.clear()
        desc_s[0] = 0.0
        tjit.JITFunction.run, g9._desc = timed_run, timed_desc
        try:
            totals = host_enqueue_ms(step, steps)
        finally:
            tjit.JITFunction.run, g9._desc = orig_run, orig_desc
        total_ms = sum(totals) / steps
        in_launch = 1e3 * sum(launch_s.values()) / steps
        in_desc = 1e3 * desc_s[0] / steps  # (descriptors are built outside the launcher: not part of in_launch)
        per_kernel = {k: dict(ms=1e3 * v / steps, calls=launches[k] / steps) for k, v in launch_s.most_common()}
        rows.append(dict(ratio=ratio, host_ms=total_ms, launch_ms=in_launch, desc_ms=in_desc,
                         rest_ms=total_ms - in_launch - in_desc, launches=sum(launches.values()) / steps,
                         per_kernel=per_kernel, steps_ms=totals))
        print(f"ratio {ratio}: host {total_ms:.3f} ms per step ({', '.join(f'{t:.2f}' for t in totals)}): "
              f"Triton launches {in_launch:.3f} ms ({sum(launches.values()) / steps:.0f}), descriptors "
              f"{in_desc:.3f} ms, the rest {total_ms - in_launch - in_desc:.3f} ms", flush=True)
        for k, v in list(per_kernel.items())[:12]:
            print(f"   {k:48s} {v['ms']:.3f} ms over {v['calls']:.0f} launches", flush=True)


def graphed(x, ws, dout, ratios, rows):
    """fwd+bwd eager and as CUDA-graph replays (no host cost: the device-bound time), ours per ratio and the dense
    SwiGLU FFN (cuBLAS) on the same weights."""
    import torch.nn.functional as F

    wr, wg, wu, wd = ws

    def dense():
        y = F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        return torch.autograd.grad(y, (x, wg, wu, wd), dout)

    cases = [("dense", dense)] + [(f"ratio {r}", lambda r=r: torch.autograd.grad(
        dk.gated_sparse_ffn(x, *ws, active_ratio=r), (x, *ws), dout)) for r in ratios]
    for name, fn in cases:
        for _ in range(3):
            fn()
        eager = bench(fn, rep=50)
        try:
            replay = bench_graphed(fn, rep=50)
        except Exception as e:  # a host sync inside the step cannot be captured
            print(f"{name}: no graph ({type(e).__name__}: {str(e)[:200]})", flush=True)
            replay = float("nan")
        rows.append(dict(case=name, eager_ms=eager, graphed_ms=replay))
        print(f"{name:10s} fwd+bwd eager {eager:7.3f} ms, graph replay {replay:7.3f} ms", flush=True)
    d_e, d_g = rows[-len(cases)]["eager_ms"], rows[-len(cases)]["graphed_ms"]
    for row in rows[-len(cases) + 1:]:
        print(f"{row['case']:10s} vs dense: eager {d_e / row['eager_ms']:.2f}x, graphed {d_g / row['graphed_ms']:.2f}x")


if __name__ == "__main__":
    main()
