"""Sweep the Triton W8A8 kernel's launch shapes on this GPU, next to cuBLAS bf16 on the same shape.

    python benchmarks/tune_int8.py [--shapes "1,14336,4096;16,4096,14336"] [--tma] [--pdl] [--out tune.json]

``--tma`` sweeps the experimental TMA-descriptor kernel (``_int8_matmul_tma_kernel``) instead, for
M > 16; ``--tma --persistent`` its persistent variant (one program per SM walking the tiles);
``--tma-store`` adds the TMA-store epilogue to either.

M <= 16 (decode GEMVs) is timed replayed from a CUDA graph, both sides, cycling through enough
copies of the weight to touch 2x the L2 cache (a 58 MB int8 weight otherwise half-hits the L2 left
by the previous replay: session 5 measured 16.8 us here against ~19 us in the bench harness, which
rotates its inputs); larger M eagerly (``triton.testing.do_bench``), or with ``--sustained S`` after S
seconds of back-to-back calls, in bursts, with the clock state recorded: the ranking at the GPU's
power-limited steady state, which large int8 GEMMs reach (benchmarks/NOTES.md, session 10).

Every config's output is compared with the int32-exact reference result first (a config that
computes something else is reported, not timed). The winners go into ``launch_config`` in
deepseek_kernels/triton/int8_matmul.py.
"""

import argparse
import itertools
import time

import torch
import triton
import triton.testing

from deepseek_kernels.bench.harness import clock_state, rest, time_cuda
from deepseek_kernels.triton._common import pdl_option
from deepseek_kernels.triton.int8_matmul import _int8_matmul_kernel

from _tuning import bench_graphed_sets, save_json, sets_for  # benchmarks/ is on sys.path when a script in it runs

SMALL = [dict(BLOCK_M=16, BLOCK_N=n, BLOCK_K=k, GROUP_M=1, num_warps=w, num_stages=s)
         for n, k, w, s in itertools.product((16, 32, 64), (256, 512, 1024), (2, 4, 8), (3, 4, 6))
         if not (n == 16 and w == 8) and not (k == 1024 and s == 6)]
LARGE = [dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
         for m, n, k, w, s in itertools.product((64, 128, 256), (128, 256), (128,), (4, 8), (3, 4))
         if m * n <= 128 * 256 and not (m * n >= 128 * 256 and w == 4)]


def run_for(fn, seconds: float) -> None:
    """Calls ``fn`` back to back for ``seconds`` of wall time (synchronizing every 50 calls)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(50):
            fn()
        torch.cuda.synchronize()


def run(a, b, a_s, b_s, out, cfg, pdl=False):
    """One launch of the plain kernel with ``cfg``; ``pdl``: as a programmatic dependent launch of the call before
    (how ``int8_matmul`` launches decode sizes on Hopper since session 20)."""
    M, K = a.shape
    N = b.shape[0]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    even = dict(EVEN_MN=M % cfg["BLOCK_M"] == 0 and N % cfg["BLOCK_N"] == 0, EVEN_K=K % cfg["BLOCK_K"] == 0)
    _int8_matmul_kernel[grid](a, b, out, a_s, b_s, a_s, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                              out.stride(0), out.stride(1), APPLY_EPILOGUE=True, HAS_BIAS=False, **even, **cfg,
                              PDL=pdl, **pdl_option(pdl))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1,14336,4096;16,14336,4096;16,4096,14336;2048,4096,4096")
    ap.add_argument("--tma", action="store_true", help="sweep the TMA-descriptor kernel (M > 16)")
    ap.add_argument("--persistent", action="store_true", help="with --tma: the persistent TMA kernel")
    ap.add_argument("--tma-store", action="store_true",
                    help="with --tma: the output tile leaves through a TMA descriptor too (3 stages max at 128x256)")
    ap.add_argument("--sustained", type=float, default=0.0, metavar="SECONDS",
                    help="M > 16: run each config (and cuBLAS) back to back this long before timing it, in bursts "
                         "(the GPU at its power-limited steady state: session 10's 8192^3 int8 GEMM lost 20 %% to "
                         "the H200's 700 W cap, cuBLAS bf16 less); the clock state after each timing is recorded")
    ap.add_argument("--rested", type=float, default=0.0, metavar="SECONDS",
                    help="M > 16: let the GPU idle this long before each config (and cuBLAS), then time ~5 ms of calls "
                         "(the speed from a rested GPU: session 12's 8192^3 int8 GEMM ran 0.84 ms for its first ~15 ms "
                         "of load and 1.02 ms right after other heavy work)")
    ap.add_argument("--pdl", action="store_true",
                    help="M <= 16: every call a programmatic dependent launch of the one before (int8_matmul's decode "
                         "launches on Hopper; the graphed calls then overlap their ramp and tail)")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.sustained > 0 and args.rested > 0:
        ap.error("--sustained and --rested exclude each other")
    results = []
    for spec in args.shapes.split(";"):
        M, N, K = map(int, spec.split(","))
        a = torch.randint(-127, 128, (M, K), device="cuda", dtype=torch.int8)
        b = torch.randint(-127, 128, (N, K), device="cuda", dtype=torch.int8)
        a_s, b_s = torch.rand(M, device="cuda") / 100, torch.rand(N, device="cuda") / 100
        xb, wb = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        n_sets = sets_for(N * K) if M <= 16 else 1
        b_sets = [b] + [b.clone() for _ in range(n_sets - 1)]
        wb_sets = [wb] + [wb.clone() for _ in range(sets_for(2 * N * K) - 1)] if M <= 16 else [wb]
        if args.tma:
            from deepseek_kernels.triton.int8_matmul import launch_tma, tma_ok

            if not tma_ok(a, b):
                raise SystemExit(f"M{M} N{N} K{K}: these operands do not allow TMA descriptors")
            sms = torch.cuda.get_device_properties(0).multi_processor_count if args.persistent else None
            call = lambda out, cfg, i=0: launch_tma(a, b_sets[i], out, a_s, b_s, None, cfg,  # noqa: E731
                                                    persistent_programs=sms, tma_store=args.tma_store) or out
        else:
            pdl = args.pdl and M <= 16
            call = lambda out, cfg, i=0: run(a, b_sets[i], a_s, b_s, out, cfg, pdl)  # noqa: E731
        ref = ((a.double() @ b.double().T) * a_s.double()[:, None] * b_s.double()[None, :]).to(torch.bfloat16)
        sustained = args.sustained > 0 and M > 16
        rested = args.rested > 0 and M > 16

        def timed(fn):  # ms per call: do_bench, or bursts of calls after a sustained run / a rest
            if rested:
                rest(args.rested)
                return time_cuda(lambda: fn(), [()], warmup=2, reps=10)["ms"], clock_state()
            if not sustained:
                return triton.testing.do_bench(fn, warmup=20, rep=100), None
            run_for(fn, args.sustained)
            return time_cuda(lambda: fn(), [()], reps=30)["ms"], clock_state()

        if M <= 16:
            base, base_clock = bench_graphed_sets(lambda i: xb @ wb_sets[i].T, len(wb_sets), rep=100), None
        else:
            base, base_clock = timed(lambda: xb @ wb.T)
        print(f"== M{M} N{N} K{K}: cuBLAS bf16 {base * 1e3:.1f} us"
              + (f" (weights cycled over {n_sets} int8 / {len(wb_sets)} bf16 copies)" if M <= 16 else ""))
        rows = []
        for cfg in SMALL if M <= 16 else LARGE:
            out = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
            try:
                call(out, cfg)
                torch.cuda.synchronize()
            except Exception as e:
                rows.append({"config": cfg, "error": type(e).__name__})
                continue
            if not torch.equal(out, ref):
                err = ((out.float() - ref.float()).abs().max()).item()
                if err > 1e-2 * ref.float().abs().max().item():
                    rows.append({"config": cfg, "error": f"wrong result ({err:.2e})"})
                    continue
            clock = None
            if M <= 16:  # a ~20 us GEMV: time it replayed from a CUDA graph, not behind ~15 us of launch CPU
                ms = bench_graphed_sets(lambda i: call(out, cfg, i), n_sets, rep=100)
            else:
                ms, clock = timed(lambda: call(out, cfg))
            rows.append({"config": cfg, "ms": ms, "vs_bf16": base / ms, **({"clock": clock} if clock else {})})
        ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
        for r in ok[:4]:
            c = r["config"]
            clock = r.get("clock") or {}
            print(f"  {c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}: "
                  f"{r['ms'] * 1e3:7.1f} us  {r['vs_bf16']:.2f}x bf16"
                  + (f"  (then {clock.get('sm_mhz')} MHz, {clock.get('power_w')} W {'+'.join(clock.get('limits', []))})"
                     if clock else ""))
        bad = [r for r in rows if "error" in r]
        if bad:
            print(f"  {len(bad)} configs failed, e.g. {bad[0]}")
        results.append({"M": M, "N": N, "K": K, "cublas_bf16_ms": base, "weight_copies": n_sets, "rows": rows,
                        **({"sustained_s": args.sustained} if sustained else {}),
                        **({"rested_s": args.rested} if rested else {}),
                        **({"cublas_clock": base_clock} if base_clock else {})})
    save_json(args.out, results)


if __name__ == "__main__":
    main()
