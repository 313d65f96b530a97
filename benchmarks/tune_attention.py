"""Sweep the launch shapes of the sliding-window attention kernels on this GPU.

    python benchmarks/tune_attention.py [--out results.json] [--quick]

For each shape (bf16, D=128, causal window) it times the forward kernel, the dK/dV kernel and
the dQ kernel over a grid of (BLOCK_M, BLOCK_N, num_warps, num_stages), checks every config's
output against the default config (a config that computes something else is reported, not
timed), and prints the best per kernel next to compiled FlexAttention on the same inputs.
The winners go into FWD_CONFIG / BWD_DKDV_CONFIG / BWD_DQ_CONFIG in
deepseek_kernels/triton/window_attention.py.
"""

import argparse
import itertools
import os

import torch
import triton.testing

from deepseek_kernels.reference.attention import attended_pairs, flops
from deepseek_kernels.triton import window_attention as wa

from _tuning import save_json  # benchmarks/ is on sys.path when a script in it runs

FWD = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (c[0] == 64 and c[2] == 8)]
DKDV = [c for c in itertools.product((32, 64, 128), (64, 128), (4, 8), (1, 2, 3)) if c[0] <= c[1]]
DQ = [c for c in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)) if c[1] <= c[0]]
# the warp-specialized forward (session 11): Triton 3.6 specializes its loop at 4 warps only; shared memory
# (AOT): 128x64 131 KB at 2 stages, 164 KB at 3; 128x128 197 KB at 2
WS_FWD = [(128, 64, 4, 2), (128, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 4, 2), (64, 128, 4, 2)]
# the neighbourhood of the winners of a full sweep on the H200 (default; --full sweeps the grids above)
FOCUS = {
    "fwd": [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3), (64, 128, 4, 2)],
    "dkdv": [(32, 128, 4, 1), (32, 128, 4, 2), (32, 128, 8, 1), (32, 128, 8, 2), (64, 128, 8, 1), (64, 128, 8, 2),
             (64, 64, 4, 2), (32, 64, 4, 2)],
    "fused": [(32, 128, 4, 1), (32, 128, 8, 1), (64, 128, 8, 1), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
    "dq": [(128, 32, 8, 1), (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
           (64, 32, 4, 2), (128, 32, 4, 2)],
}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=100)


def sweep(name, configs, run, ref, useful_flops):
    rows = []
    for cfg in configs:
        try:
            got = run(cfg)
            torch.cuda.synchronize()
        except Exception as e:  # out of shared memory / registers for this shape
            rows.append({"kernel": name, "config": cfg, "error": type(e).__name__})
            continue
        errs = [((g.float() - r.float()).norm() / r.float().norm()).item() for g, r in zip(got, ref)]
        if max(errs) > 1e-2:
            rows.append({"kernel": name, "config": cfg, "error": f"wrong result (rel {max(errs):.2e})"})
            continue
        ms = bench(lambda: run(cfg))
        rows.append({"kernel": name, "config": cfg, "ms": ms, "tflops": useful_flops / ms * 1e-9})
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    for r in ok[:5]:
        print(f"  {name:5s} {str(r['config']):22s} {r['ms']:8.3f} ms  {r['tflops']:6.0f} TF/s")
    bad = [r for r in rows if "error" in r]
    if bad:
        print(f"  {name}: {len(bad)} configs failed: " + ", ".join(f"{r['config']}: {r['error']}" for r in bad[:6]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--full", action="store_true", help="sweep the whole grids, not the focus lists")
    ap.add_argument("--shapes", default="8192,4,1024,32,32;8192,4,4096,32,32")
    ap.add_argument("--tma", action="store_true", help="also time the forward with TMA descriptor loads (fwd-tma)")
    ap.add_argument("--ws", action="store_true",
                    help="also time the warp-specialized one-loop forward (fwd-ws, 4 warps: window_attention_fwd(ws=True))")
    ap.add_argument("--fwd-only", action="store_true", help="skip the backward kernels")
    args = ap.parse_args()
    if args.ws:  # window_attention_fwd(ws=True) refuses to run on a GPU without it (it hung in session 12)
        os.environ.setdefault("DSK_ATTN_WS", "1")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from deepseek_kernels.bench.harness import compiled_baseline

    flex = compiled_baseline(flex_attention)
    results = []
    top = {}  # after the first shape, later shapes only re-time each kernel's 4 best configs
    for spec in args.shapes.split(";"):
        S, B, W, Hq, Hkv = map(int, spec.split(","))
        D = 128
        torch.manual_seed(0)
        q = torch.randn(B, S, Hq, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        do = torch.randn_like(q)
        pairs = attended_pairs(S, S, window=W)
        f_fwd, f_bwd = flops(B, Hq, D, pairs), flops(B, Hq, D, pairs, backward=True) - flops(B, Hq, D, pairs)
        print(f"== S{S} B{B} W{W} H{Hq}/{Hkv} D{D}")
        mask = create_block_mask(lambda b, h, qi, ki: (ki <= qi) & (qi - ki < W), None, None, S, S, device="cuda")
        qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
        fl_fwd = bench(lambda: flex(qt, kt, vt, block_mask=mask, enable_gqa=Hq != Hkv))
        fo = flex(qt, kt, vt, block_mask=mask, enable_gqa=Hq != Hkv)
        fl_bwd = bench(lambda: torch.autograd.grad(fo, (qt, kt, vt), do.transpose(1, 2), retain_graph=True))
        print(f"  FlexAttention fwd {fl_fwd:.3f} ms ({f_fwd / fl_fwd * 1e-9:.0f} TF/s), "
              f"bwd {fl_bwd:.3f} ms ({f_bwd / fl_bwd * 1e-9:.0f} TF/s)")
        out, lse = wa.window_attention_fwd(q, k, v, window=W)
        pick = lambda name, full: top.get(name, full[:6] if args.quick else full if args.full else FOCUS[name])  # noqa: E731
        rows = sweep("fwd", pick("fwd", FWD),
                     lambda c: wa.window_attention_fwd(q, k, v, window=W, config=c), (out, lse), f_fwd)
        if args.tma:
            rows += sweep("fwd-tma", pick("fwd", FWD),
                          lambda c: wa.window_attention_fwd(q, k, v, window=W, config=c, tma=True), (out, lse), f_fwd)
        if args.ws:
            rows += sweep("fwd-ws", WS_FWD,
                          lambda c: wa.window_attention_fwd(q, k, v, window=W, config=c, ws=True), (out, lse), f_fwd)
        if args.fwd_only:
            results.append({"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D, "flex_fwd_ms": fl_fwd,
                            "flex_bwd_ms": fl_bwd, "rows": rows})
            for name in ("fwd",):
                top.setdefault(name, [r["config"] for r in sorted(
                    (r for r in rows if r["kernel"] == name and "ms" in r), key=lambda r: r["ms"])[:4]])
            continue
        ref = wa.window_attention_bwd(do, q, k, v, out, lse, window=W)
        # each backward kernel timed alone, on inputs prepared once (delta included)
        prep = wa._bwd_inputs(do, q, k, v, out, lse, None, None, None, None)
        qp, kp, vp, op_, dop, lsep, delta, cu_q, cu_k, max_q, max_k = prep
        dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
        common = dict(window=W, sinks=0, causal=True, scale=D**-0.5)

        def run_dkdv(c):
            wa._launch_dkdv(qp, kp, vp, dop, lsep, delta, cu_q, cu_k, max_k, dk, dv, config=c, **common)
            return dk.view_as(k), dv.view_as(v)

        def run_dq(c):
            wa._launch_dq(qp, kp, vp, op_, dop, lsep, delta, cu_q, cu_k, max_q, dq, config=c, **common)
            return (dq.view_as(q),)

        rows += sweep("dq", pick("dq", DQ), run_dq, ref[:1], 1.5 * f_fwd)  # 3 matmuls (+ delta)
        rows += sweep("dkdv", pick("dkdv", DKDV), run_dkdv, ref[1:], 2 * f_fwd)  # 4 matmuls (reads delta)

        def run_fused(c):  # the deterministic=False backward: delta kernel + dK/dV with atomic dQ
            dq_acc = torch.zeros(qp.shape, device=qp.device, dtype=torch.float32)
            wa.launch_delta(op_, dop, delta)
            wa._launch_dkdv(qp, kp, vp, dop, lsep, delta, cu_q, cu_k, max_k, dk, dv, config=c, dq_acc=dq_acc, **common)
            return dq_acc.view_as(q), dk.view_as(k), dv.view_as(v)

        rows += sweep("fused", pick("fused", DKDV), run_fused, ref, 2.5 * f_fwd)  # 5 matmuls, whole backward
        for name in ("fwd", "dkdv", "dq", "fused"):
            top.setdefault(name, [r["config"] for r in sorted((r for r in rows if r["kernel"] == name and "ms" in r),
                                                               key=lambda r: r["ms"])[:4]])
        results.append({"S": S, "B": B, "W": W, "Hq": Hq, "Hkv": Hkv, "D": D, "flex_fwd_ms": fl_fwd,
                        "flex_bwd_ms": fl_bwd, "rows": rows})
    save_json(args.out, results)


if __name__ == "__main__":
    main()
