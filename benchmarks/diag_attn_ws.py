"""Where the warp-specialized window forward (``window_attention_fwd(ws=True)``) stops on this GPU.

    python benchmarks/diag_attn_ws.py [--out diag_attn_ws.json] [--timeout 75]

Session 12: its first launch on the H200 (Triton 3.6, config (128, 64, 4, 2), S8192 B4 W4096 H32) neither
finished nor failed in 190 s. Each step here runs in a child process under a watchdog: the child arms
``faulthandler.dump_traceback_later`` a few seconds before the parent's timeout, so a step that hangs prints
the Python stack it hangs in (Triton's compiler or ptxas: a compile that never ends; ``synchronize``: a kernel
that never ends, e.g. producer and consumer warps disagreeing on the loop's trip count). Steps: a tiny shape
(one query tile) with 64- and 128-row tiles, then the full shape. The first call's launch returns after the
compile, so its time and the synchronize after it tell a long compile from a kernel that does not end; every
finished run is checked against the default forward and timed. Without a GPU (``TRITON_INTERPRET=1``) the
tiny steps run on the CPU as a smoke test of this script (``--steps tiny``).
"""

import argparse
import json
import os
import subprocess
import sys
import time

STEPS = [  # (name, (S, B, W, H), config)
    ("tiny 64x64", (128, 1, 64, 1), (64, 64, 4, 2)),
    ("tiny 128x64", (128, 1, 64, 1), (128, 64, 4, 2)),
    ("full 64x64", (8192, 4, 4096, 32), (64, 64, 4, 2)),
    ("full 128x64", (8192, 4, 4096, 32), (128, 64, 4, 2)),
    ("full 64x64 s3", (8192, 4, 4096, 32), (64, 64, 4, 3)),
]


def child(S: int, B: int, W: int, H: int, config: tuple, dump_after: float) -> dict:
    import faulthandler

    faulthandler.dump_traceback_later(dump_after, exit=True)
    os.environ["DSK_ATTN_WS"] = "1"
    import torch
    from _tuning import bench  # benchmarks/ is on sys.path when a script in it runs

    from deepseek_kernels.reference.attention import attended_pairs, flops
    from deepseek_kernels.triton import window_attention as wa

    D = 128
    torch.manual_seed(0)
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    q, k, v = (torch.randn(B, S, H, D, device=device, dtype=dtype) for _ in range(3))
    ref, ref_lse = wa.window_attention_fwd(q, k, v, window=W)
    sync()
    print("default forward ran; first ws launch (compile + run) ...", flush=True)
    t0 = time.perf_counter()
    out, lse = wa.window_attention_fwd(q, k, v, window=W, config=config, ws=True)
    t_launch = time.perf_counter() - t0
    print(f"ws launch returned after {t_launch:.1f} s (compile included); synchronizing ...", flush=True)
    sync()
    t_first = time.perf_counter() - t0
    err = (out.float() - ref.float()).abs().max().item()
    lse_err = (lse - ref_lse).abs().max().item()
    f = flops(B, H, D, attended_pairs(S, S, window=W))
    ms = bench(lambda: wa.window_attention_fwd(q, k, v, window=W, config=config, ws=True), warmup=10, rep=100)
    ref_ms = bench(lambda: wa.window_attention_fwd(q, k, v, window=W), warmup=10, rep=100)
    faulthandler.cancel_dump_traceback_later()
    return {"launch_s": t_launch, "first_call_s": t_first, "max_err": err, "lse_err": lse_err, "ms": ms,
            "tflops": f / ms * 1e-9, "default_ms": ref_ms, "default_tflops": f / ref_ms * 1e-9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--timeout", type=float, default=75.0, help="seconds per step")
    ap.add_argument("--steps", default="", help="run only the steps whose name contains this (e.g. tiny)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print("RESULT " + json.dumps(child(*spec["shape"], tuple(spec["config"]), args.timeout - 5)), flush=True)
        return
    rows = []
    for name, shape, config in (st for st in STEPS if args.steps in st[0]):
        cmd = [sys.executable, __file__, "--timeout", str(args.timeout),
               "--child", json.dumps({"shape": shape, "config": config})]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            text, status = proc.stdout + proc.stderr, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:  # its output can be bytes even with text=True
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else x for x in (e.stdout, e.stderr) if x)
            status = "killed at the timeout"
        result = next((json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")), None)
        row = {"step": name, "shape": shape, "config": config, "status": "ok" if result else status,
               "wall_s": round(time.perf_counter() - t0, 1), **(result or {})}
        if not result:
            row["log_tail"] = text[-3000:]
        rows.append(row)
        print(f"== {name} {shape} {config}: {row['status']} in {row['wall_s']} s", flush=True)
        if not result:
            print(row["log_tail"], flush=True)
    print(f"\n{'step':<16}{'status':<24}{'ws ms':>9}{'TF/s':>7}{'default':>9}{'TF/s':>7}{'max err':>10}")
    for r in rows:
        if "ms" in r:
            print(f"{r['step']:<16}{r['status']:<24}{r['ms']:>9.3f}{r['tflops']:>7.0f}{r['default_ms']:>9.3f}"
                  f"{r['default_tflops']:>7.0f}{r['max_err']:>10.2e}")
        else:
            print(f"{r['step']:<16}{r['status']:<24}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
        print(f"wrote {args.out}")
    if any(r["status"] != "ok" for r in rows):
        sys.exit(3)


if __name__ == "__main__":
    main()
