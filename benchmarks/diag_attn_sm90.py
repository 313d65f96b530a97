"""The Gluon Hopper window forward (``window_attention_sm90``) on this GPU: correct, then timed.

    python benchmarks/diag_attn_sm90.py [--out diag_attn_sm90.json] [--timeout 240]
        [--steps check,time,check_bwd,time_bwd,tune_bwd,check_fused,time_fused]
        [--configs 128x128x2,128x64x3]

Each step runs in a child process under a watchdog (``faulthandler`` dumps the Python stack a few seconds
before the parent kills it), so a kernel that never ends (producer and consumers disagreeing on a barrier
phase) shows where it stopped instead of eating the call. Steps:

- ``check``: fresh random inputs, odd lengths (1, 17, 300, 1000, 4097), windows 1 / 17 / 128 / 1000 / longer
  than the sequence, sinks 0 / 4, GQA 1 / 4 / 8, head dims 64 / 128, bf16 and fp16, against the float32
  reference (output and lse), for the default forward and each variant (``FWD_VARIANTS``, ``FWD_CHECK_ONLY``);
- ``time``: S8192 B4, S32768 B1 and S131072 B1 at W1024 / W4096 (H32, and GQA 32/8; D128, and D64 at W4096):
  the Gluon forward and its variants (``FWD_VARIANTS``, each timed twice, the second pass in reverse order),
  the Triton forward (``sm90=False``) and FlexAttention (compiled, block mask) in the same process, TF/s of
  useful work;
- ``check_bwd``: the Gluon backward's dq / dk / dv against float32 autograd of the reference;
- ``time_bwd``: fwd + bwd through the op with the Gluon backward on and off, FlexAttention, and the two
  backwards alone (TF/s: 2.5x the forward's useful FLOPs);
- ``check_fused`` / ``time_fused``: the one-kernel backward (deterministic=False: dQ by TMA reduce-adds) checked,
  then timed next to the other backwards and, through the op, fwd + bwd next to FlexAttention (``--configs``:
  extra (BLOCK_N x BLOCK_M x STAGES) shapes of it);
- ``tune_bwd``: the Gluon backward's launch shapes and ping-pong at S8192 B4 W4096, next to the Triton backward.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CHECK_CASES = [  # (B, S, Hq, Hkv, D, W, sinks)
    (2, 1, 4, 4, 128, 16, 0), (2, 17, 4, 1, 128, 1, 0), (1, 300, 8, 2, 64, 17, 4), (2, 1000, 4, 4, 128, 128, 0),
    (1, 1000, 8, 1, 128, 1000, 4), (1, 4097, 4, 4, 128, 1000, 0), (1, 4097, 8, 2, 64, 5000, 4),
    (2, 555, 4, 4, 64, 129, 0), (1, 2048, 4, 4, 128, 4096, 130), (3, 384, 2, 2, 128, 255, 1),
]
TIME_CASES = [  # (S, B, W, Hq, Hkv[, D = 128])
    (8192, 4, 1024, 32, 32), (8192, 4, 4096, 32, 32), (32768, 1, 4096, 32, 32), (32768, 1, 4096, 32, 8),
    (32768, 1, 1024, 32, 32), (131072, 1, 1024, 32, 32), (131072, 1, 4096, 32, 32), (8192, 4, 4096, 32, 32, 64),
    (32768, 1, 4096, 32, 32, 64),
]
# forward variants (keyword arguments of window_attention_fwd_sm90) checked and timed next to the default
FWD_VARIANTS = [("sm90", {}), ("persistent", {"persistent": True})]
FWD_CHECK_ONLY = [("no-pingpong", {"pingpong": False}), ("every-tile rescale", {"rescale": 0.0}),
                  ("persistent forward order", {"persistent": True, "reverse": False})]


def child_check(configs) -> dict:
    import torch

    from deepseek_kernels.reference.attention import window_attention_ref
    from deepseek_kernels.triton import window_attention_sm90 as s9

    rows, worst = [], 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for B, S, Hq, Hkv, D, W, sinks in CHECK_CASES:
            q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
            ref, ref_lse = window_attention_ref(q.float(), k.float(), v.float(), window=W, sinks=sinks,
                                                return_lse=True)
            for name, kw in FWD_VARIANTS + FWD_CHECK_ONLY + [("x".join(map(str, c)), {"config": c})
                                                              for c in configs]:
                out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, **kw)
                torch.cuda.synchronize()
                err = ((out.float() - ref).norm() / ref.norm()).item()
                lse_err = (lse - ref_lse).abs().max().item()
                nan = bool(out.isnan().any()) or bool(lse.isnan().any())
                ok = err < 1e-2 and lse_err < 1e-2 and not nan
                worst = max(worst, err)
                rows.append({"case": [B, S, Hq, Hkv, D, W, sinks], "dtype": str(dtype), "variant": name,
                             "rel_err": err, "lse_err": lse_err, "nan": nan, "ok": ok})
                print(f"{str(dtype):<15}{str((B, S, Hq, Hkv, D, W, sinks)):<34}{name:<22} rel {err:.2e} "
                      f"lse {lse_err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return {"rows": rows, "worst_rel_err": worst, "all_ok": all(r["ok"] for r in rows)}


def child_time(configs) -> dict:
    import torch
    from _tuning import bench

    from deepseek_kernels.bench.suites.attention import _flex
    from deepseek_kernels.reference.attention import attended_pairs, flops
    from deepseek_kernels.triton import window_attention as wa
    from deepseek_kernels.triton import window_attention_sm90 as s9

    rows = []
    for S, B, W, Hq, Hkv, *rest in TIME_CASES:
        D = rest[0] if rest else 128
        torch.manual_seed(0)
        q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        f = flops(B, Hq, D, attended_pairs(S, S, window=W))
        flex = _flex(W, 0, S, Hq, Hq != Hkv)
        ref, _ = wa.window_attention_fwd(q, k, v, window=W, sm90=False)
        row = {"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D}
        for name, kw in FWD_VARIANTS + [("sm90 " + "x".join(map(str, c)), {"config": c}) for c in configs]:
            out, _ = s9.window_attention_fwd_sm90(q, k, v, window=W, **kw)
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = bench(lambda kw=kw: s9.window_attention_fwd_sm90(q, k, v, window=W, **kw), warmup=10, rep=100)
            row[name] = {"ms": ms, "tflops": f / ms * 1e-9, "rel_err_vs_triton": err}
        ms = bench(lambda: wa.window_attention_fwd(q, k, v, window=W, sm90=False), warmup=10, rep=100)
        row["triton"] = {"ms": ms, "tflops": f / ms * 1e-9}
        flex(q, k, v)
        ms = bench(lambda: flex(q, k, v), warmup=10, rep=100)
        row["flex"] = {"ms": ms, "tflops": f / ms * 1e-9}
        # the variants once more after the others, in reverse order (drift check)
        for name, kw in FWD_VARIANTS[::-1]:
            ms = bench(lambda kw=kw: s9.window_attention_fwd_sm90(q, k, v, window=W, **kw), warmup=10, rep=100)
            row[name + " again"] = {"ms": ms, "tflops": f / ms * 1e-9}
        rows.append(row)
        _print_row(row)
    return {"rows": rows}


BWD_CHECK = [  # (B, S, Hq, Hkv, D, W, sinks)
    (2, 17, 4, 1, 128, 1, 0), (1, 300, 8, 2, 64, 17, 4), (2, 1000, 4, 4, 128, 128, 0), (1, 1000, 8, 1, 128, 1000, 4),
    (1, 4097, 4, 2, 128, 1000, 0), (2, 555, 4, 4, 64, 129, 0), (1, 700, 4, 4, 128, 4096, 130),
]
BWD_TIME = [(8192, 4, 1024, 32, 32), (8192, 4, 4096, 32, 32), (32768, 1, 4096, 32, 8)]
FUSED_TIME = [(S, B, W, Hq, Hkv, 128) for S, B, W, Hq, Hkv in BWD_TIME] + [(8192, 4, 4096, 32, 32, 64)]


def child_check_fused(configs) -> dict:
    """:func:`child_check_bwd` for the one-kernel backward (deterministic=False, head dim 128)."""
    return child_check_bwd(configs, deterministic=False)


def child_check_bwd(configs, deterministic=True) -> dict:
    """The Gluon backward against float32 autograd of the reference (dq, dk, dv), bf16 and fp16."""
    import torch

    from deepseek_kernels.reference.attention import window_attention_ref
    from deepseek_kernels.triton import window_attention_sm90 as s9

    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        for B, S, Hq, Hkv, D, W, sinks in BWD_CHECK:
            if not deterministic and D not in s9.BWD_FUSED_CONFIG:
                continue
            q = torch.randn(B, S, Hq, D, device="cuda", dtype=dtype)
            k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
            do = torch.randn_like(q)
            out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks)
            grads = s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, sinks=sinks,
                                                 deterministic=deterministic)
            torch.cuda.synchronize()
            qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
            want = torch.autograd.grad(window_attention_ref(qr, kr, vr, window=W, sinks=sinks), (qr, kr, vr),
                                       do.float())
            errs = [((g.float() - w).norm() / w.norm()).item() for g, w in zip(grads, want)]
            abs_errs = [(g.float() - w).abs().max().item() for g, w in zip(grads, want)]
            tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
            # window 1: dq = dk = 0 exactly in the reference (each query sees only its own key), so relative
            # errors are meaningless there; the absolute error is the check
            ok = all(e < tol or a < 1e-2 for e, a in zip(errs, abs_errs)) and not any(bool(g.isnan().any()) for g in grads)
            rows.append({"case": [B, S, Hq, Hkv, D, W, sinks], "dtype": str(dtype), "rel_err": errs, "ok": ok})
            print(f"bwd {str(dtype):<15}{str((B, S, Hq, Hkv, D, W, sinks)):<34} dq {errs[0]:.2e} dk {errs[1]:.2e} "
                  f"dv {errs[2]:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return {"rows": rows, "all_ok": all(r["ok"] for r in rows)}


def _timing_inputs(S, B, W, Hq, Hkv, D):
    """Seeded bf16 q, k, v (requiring grad), dO, and the forward's useful FLOPs of one timing shape."""
    import torch

    from deepseek_kernels.reference.attention import attended_pairs, flops

    torch.manual_seed(0)
    mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v = mk(Hq), mk(Hkv), mk(Hkv)
    return q, k, v, torch.randn_like(q), flops(B, Hq, D, attended_pairs(S, S, window=W))


def _time_into(row, name, fn, flop):
    """``fn`` run once (compile), then timed into ``row[name]`` (ms and TF/s of ``flop`` useful FLOPs)."""
    from _tuning import bench

    fn()
    ms = bench(fn, warmup=5, rep=30)
    row[name] = {"ms": ms, "tflops": flop / ms * 1e-9}


def _print_row(row):
    print(f"S{row['S']} B{row['B']} W{row['W']} H{row['Hq']}/{row['Hkv']} D{row.get('D', 128)}: " + ", ".join(
        f"{k} {v['ms']:.3f} ms {v['tflops']:.0f} TF/s" for k, v in row.items() if isinstance(v, dict)), flush=True)


def child_time_bwd(configs) -> dict:
    """fwd + bwd through the op (autograd), Gluon backward on / off, and FlexAttention; the two backwards alone."""
    import torch

    import deepseek_kernels as dk
    from deepseek_kernels.bench.suites.attention import _flex
    from deepseek_kernels.triton import window_attention as wa
    from deepseek_kernels.triton import window_attention_sm90 as s9

    rows = []
    D = 128
    for S, B, W, Hq, Hkv in BWD_TIME:
        q, k, v, do, f_fwd = _timing_inputs(S, B, W, Hq, Hkv, D)
        f = f_fwd * 3.5
        flex = _flex(W, 0, S, Hq, Hq != Hkv)
        row = {"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv}

        def fwd_bwd(sm90_bwd):
            os.environ["DSK_ATTN_SM90_BWD"] = sm90_bwd
            return lambda: torch.autograd.grad(dk.window_attention(q, k, v, window=W), (q, k, v), do)

        for name, fn in (("fwd+bwd gluon bwd", fwd_bwd("1")), ("fwd+bwd triton bwd", fwd_bwd("0")),
                         ("fwd+bwd flex", lambda: torch.autograd.grad(flex(q, k, v), (q, k, v), do))):
            _time_into(row, name, fn, f)
        out, lse = s9.window_attention_fwd_sm90(q.detach(), k.detach(), v.detach(), window=W)
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        for name, fn in (("bwd gluon", lambda: s9.window_attention_bwd_sm90(do, qd, kd, vd, out, lse, window=W)),
                         ("bwd triton", lambda: wa.window_attention_bwd(do, qd, kd, vd, out, lse, window=W, sm90=False))):
            _time_into(row, name, fn, f - f_fwd)
        rows.append(row)
        _print_row(row)
    return {"rows": rows}


def child_time_fused(configs) -> dict:
    """The backwards alone (the one-kernel Gluon, the two-kernel Gluon, the Triton deterministic and atomic ones)
    and fwd + bwd through the op with deterministic=False / True next to FlexAttention (TF/s: 2.5x / 3.5x the
    forward's useful FLOPs)."""
    import torch

    import deepseek_kernels as dk
    from deepseek_kernels.bench.suites.attention import _flex
    from deepseek_kernels.triton import window_attention as wa
    from deepseek_kernels.triton import window_attention_sm90 as s9

    rows = []
    extra = [("fused " + "x".join(map(str, c)), {"config_fused": c, "deterministic": False}) for c in configs]
    for S, B, W, Hq, Hkv, D in FUSED_TIME:
        q, k, v, do, f_fwd = _timing_inputs(S, B, W, Hq, Hkv, D)
        row = {"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D}
        qd, kd, vd = q.detach(), k.detach(), v.detach()
        out, lse = s9.window_attention_fwd_sm90(qd, kd, vd, window=W)
        for name, kw in [("bwd gluon fused", {"deterministic": False}), ("bwd gluon 2 kernels", {})] + extra:
            try:
                _time_into(row, name, lambda kw=kw: s9.window_attention_bwd_sm90(do, qd, kd, vd, out, lse, window=W,
                                                                                 **kw), 2.5 * f_fwd)
                if "config_fused" in kw:  # against the default shape's gradients
                    got = s9.window_attention_bwd_sm90(do, qd, kd, vd, out, lse, window=W, **kw)
                    want = s9.window_attention_bwd_sm90(do, qd, kd, vd, out, lse, window=W, deterministic=False)
                    row[name]["rel_err"] = [((g.float() - w.float()).norm() / w.float().norm()).item()
                                            for g, w in zip(got, want)]
            except Exception as e:  # an extra shape that does not compile or fit this head dim: reported
                row[name + " error"] = f"{type(e).__name__}: {str(e)[:160]}"
        for name, det in (("bwd triton", True), ("bwd triton atomic", False)):
            _time_into(row, name, lambda det=det: wa.window_attention_bwd(
                do, qd, kd, vd, out, lse, window=W, sm90=False, deterministic=det), 2.5 * f_fwd)
        flex = _flex(W, 0, S, Hq, Hq != Hkv)
        for name, det in (("fwd+bwd op nondet", False), ("fwd+bwd op det", True)):
            _time_into(row, name, lambda det=det: torch.autograd.grad(
                dk.window_attention(q, k, v, window=W, deterministic=det), (q, k, v), do), 3.5 * f_fwd)
        _time_into(row, "fwd+bwd flex", lambda: torch.autograd.grad(flex(q, k, v), (q, k, v), do), 3.5 * f_fwd)
        rows.append(row)
        _print_row(row)
    return {"rows": rows}


def child_tune_bwd(configs) -> dict:
    """The Gluon backward's launch shapes at S8192 B4 W4096 H32 D128 (the whole backward timed; one kernel's
    shape varied at a time, so differences are that kernel's), ping-pong on / off, the Triton backward."""
    import torch
    from _tuning import bench

    from deepseek_kernels.reference.attention import attended_pairs, flops
    from deepseek_kernels.triton import window_attention as wa
    from deepseek_kernels.triton import window_attention_sm90 as s9

    S, B, W, H, D = 8192, 4, 4096, 32, 128
    q, k, v, do = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W)
    f = flops(B, H, D, attended_pairs(S, S, window=W)) * 2.5
    variants = [("default", {}), ("no pingpong", {"pingpong": False}),
                ("dq 128x128x2", {"config_dq": (128, 128, 2)}), ("dq 128x64x3", {"config_dq": (128, 64, 3)}),
                ("dkdv 128x64x3 (spills)", {"config_dkdv": (128, 64, 3)}), ("dkdv 128x32x3", {"config_dkdv": (128, 32, 3)}),
                ("dkdv 128x16x6", {"config_dkdv": (128, 16, 6)})]
    rows = {}
    for name, kw in variants:
        try:
            ms = bench(lambda kw=kw: s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, **kw), warmup=5,
                       rep=30)
            rows[name] = {"ms": ms, "tflops": f / ms * 1e-9}
        except Exception as e:  # a shape that does not compile or fit: reported, the others still run
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        print(name, rows[name], flush=True)
    ms = bench(lambda: wa.window_attention_bwd(do, q, k, v, out, lse, window=W, sm90=False), warmup=5, rep=30)
    rows["triton"] = {"ms": ms, "tflops": f / ms * 1e-9}
    print("triton", rows["triton"], flush=True)
    return {"rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per step")
    ap.add_argument("--steps", default="check,time")
    ap.add_argument("--configs", default="", help="extra (BLOCK_M x BLOCK_N x STAGES) launch shapes to time")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    configs = [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",") if c]
    if args.child:
        import faulthandler

        faulthandler.dump_traceback_later(args.timeout - 5, exit=True)
        fn = {"check": child_check, "time": child_time, "check_bwd": child_check_bwd, "time_bwd": child_time_bwd,
              "tune_bwd": child_tune_bwd, "check_fused": child_check_fused, "time_fused": child_time_fused}[args.child]
        print("RESULT " + json.dumps(fn(configs)), flush=True)
        return
    results, failed = {}, False
    for step in args.steps.split(","):
        cmd = [sys.executable, __file__, "--timeout", str(args.timeout), "--configs", args.configs, "--child", step]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            text, status = proc.stdout + proc.stderr, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x)
            status = "killed at the timeout"
        result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
        print(f"== {step}: {'ok' if result else status} in {time.perf_counter() - t0:.1f} s", flush=True)
        print("\n".join(ln for ln in text.splitlines() if not ln.startswith("RESULT "))[-6000:], flush=True)
        results[step] = result or {"status": status, "log_tail": text[-3000:]}
        failed |= result is None or (step.startswith("check") and not result["all_ok"])
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)
        print(f"wrote {args.out}")
    if failed:
        sys.exit(3)


if __name__ == "__main__":
    main()
