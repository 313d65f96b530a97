"""The sparse FFN's short-K grouped GEMMs alone (T8192, bf16, d_model 4096, d_ff 14336, 64 blocks, ratio 0.3): the
persistent Triton TMA kernel against the Gluon warp-specialized form (``sparse_ffn_sm90``) and its variants (ring
depth, tile width, products in flight, the epilogue's stores off) or, with ``--ar``, against the A-resident kernel
(``rows_gemm_ar_sm90``) at its settings and others, same inputs, do_bench.

    python benchmarks/diag_sparse_sm90.py [--ratio 0.3] [--gemms-only] [--ar] [--out results.json]

Session 37 (call 2) also timed the two-half kernel's stores in pieces of 128 / 64 columns through 2-6 staging
buffers per warpgroup (``--epilogues``, since removed with that code): no gain (benchmarks/NOTES.md).
"""

import argparse

import torch

from deepseek_kernels.reference.sparse_ffn import n_active
from deepseek_kernels.triton import sparse_ffn as tk
from deepseek_kernels.triton import sparse_ffn_sm90 as g9

from _tuning import bench, rel, save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--skip-gemms", action="store_true",
                    help="only the gathered kernels' rows (gate/up, dact, dW gate/up, dW down)")
    ap.add_argument("--sweep-dw", action="store_true",
                    help="also the dW kernels' ring shapes (DW_GATE_UP_CONFIG / DW_DOWN_CONFIG), whole backward")
    ap.add_argument("--gemms-only", action="store_true", help="only the short-K GEMMs' rows (down, dx)")
    ap.add_argument("--ar", action="store_true",
                    help="also the A-resident kernel (rows_gemm_ar_sm90) at its defaults and other unit / ring sizes")
    ap.add_argument("--out")
    args = ap.parse_args()
    # the two-half kernel's (block_n, ring stages, TMA store)
    variants = ((256, 6, True), (256, 6, False), (256, 5, True), (128, 10, True))
    if args.ar:
        variants = ((256, 6, True),)

    def ar_variants(dual: bool) -> tuple:
        base = g9.ar_config(BS, dual)
        more = ({"unit_cols": 8}, {"unit_cols": 32}) + (() if dual else ({"stages": 8, "o_bufs": 1},))
        return (base,) + tuple({**base, **m} for m in more)

    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    BS = F_ // NB
    torch.manual_seed(0)
    k = n_active(args.ratio, NB)
    idx = torch.rand(T, NB, device="cuda").topk(k, dim=-1).indices.to(torch.int32)
    blocks, _ = tk.full_routing(idx, torch.ones(T, k, device="cuda"), 0)
    g = tk.group_pairs(blocks, NB, 128)
    P = T * k
    h = torch.randn(P, BS, device="cuda", dtype=dt)
    act = torch.randn(P, 2 * BS, device="cuda", dtype=dt)
    wd = (torch.randn(D, F_, device="cuda") * F_**-0.5).to(dt)
    wg, wu = ((torch.randn(F_, D, device="cuda") * D**-0.5).to(dt) for _ in range(2))
    y = torch.empty(P, D, device="cuda", dtype=dt)
    rows = []
    for kind in () if args.skip_gemms else ("down", "dx"):
        flops = (2 if kind == "down" else 4) * P * D * BS
        a, w, w2, w_nk = (h, wd, None, True) if kind == "down" else (act, wg, wu, False)
        if kind == "down":
            cfg = dict(block_n=128, block_k=32, num_warps=4, num_stages=4, programs=None, programs_per_sm=2)
            def base():
                tk._down_tma(h, wd, y, g, cfg, "tf32")
        else:
            cfg = dict(block_n=256, block_k=32, num_warps=8, num_stages=3, programs=None, programs_per_sm=1)
            def base():
                tk._dx_tma(act.view(P, 2, BS), wg, wu, y, g, cfg, "tf32")
        base()
        ref = y.clone()
        ms = bench(base, rep=30)
        rows.append(dict(kind=kind, variant="triton tma", ms=ms, tflops=flops / ms / 1e9))
        print(f"{kind:5s} triton tma                 {ms:7.3f} ms {flops / ms / 1e9:6.0f} TF/s", flush=True)
        for v in variants + (ar_variants(kind == "dx") if args.ar else ()):
            if isinstance(v, dict):  # the A-resident kernel's settings
                name = "A-resident " + " ".join(f"{k[0]}{val}" for k, val in v.items() if k != "block_k")

                def fn(v=v):
                    g9.rows_gemm_ar_sm90(a, w, w2, y, g, bs=BS, w_nk=w_nk, **v)
            else:
                bn, st, tma_store = v
                name = f"gluon {bn} s{st}" + (" tma store" if tma_store else "")

                def fn(bn=bn, st=st, tma_store=tma_store):
                    g9.sorted_rows_gemm_sm90(a, w, w2, y, g, bs=BS, w_nk=w_nk, block_n=bn, block_k=32, stages=st,
                                             tma_store=tma_store)
            try:
                y.zero_()
                fn()
                err = rel(y, ref)
                ms = bench(fn, rep=30)
                row = dict(kind=kind, variant=name, ms=ms, tflops=flops / ms / 1e9, err=err)
            except Exception as e:
                row = dict(kind=kind, variant=name, error=str(e)[:120])
            rows.append(row)
            shown = (f"{row['ms']:7.3f} ms {row['tflops']:6.0f} TF/s err {row['err']:.1e}" if "ms" in row
                     else row["error"])
            print(f"{kind:5s} {row['variant']:26s} {shown}", flush=True)
    if args.gemms_only:
        save_json(args.out, rows)
        return
    # the forward's gate/up (gathered x rows): the Triton kernel at its tuned tiles vs the Gluon cp.async form
    # (gate_up.sm90), timed as the whole forward (the rest is the same)
    x = torch.randn(T, D, device="cuda", dtype=dt)
    for name, cfg in (("triton", {"gate_up": {"sm90": False}}), ("gluon cp.async", {"gate_up": {"sm90": True}})):
        def fn(cfg=cfg):
            return tk.sparse_ffn_fwd(x, wg, wu, wd, idx, torch.ones(T, k, device="cuda"), shared_blocks=0,
                                     n_blocks=NB, config=cfg)
        ms_all = bench(fn, rep=20)
        rows.append(dict(kind="fwd (gate/up variant)", variant=name, ms=ms_all))
        print(f"fwd   gate/up {name:18s} whole forward {ms_all:7.3f} ms", flush=True)
    # the backward's gathered kernels: the Triton kernels vs the Gluon cp.async forms (dact.sm90, then
    # dw_gate_up.sm90 and dw_down.sm90 added), timed as the whole backward, with the gradients compared
    w1 = torch.rand(T, k, device="cuda") + 0.5
    _, act_t, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w1, shared_blocks=0, n_blocks=NB)
    go = torch.randn(T, D, device="cuda", dtype=dt)
    outs = {}

    def bwd_cfg(dact, dw_gu, dw_dn):
        return {"dact": {"sm90": dact}, "dw_gate_up": {"sm90": dw_gu}, "dw_down": {"sm90": dw_dn}}

    for name, cfg in (("triton full block", bwd_cfg(False, False, False)),
                      ("gluon cp.async", bwd_cfg(True, False, False)),
                      ("gluon + gluon dW g/u", bwd_cfg(True, True, False)),
                      ("gluon + gluon dW both", bwd_cfg(True, True, True))):
        def fn(cfg=cfg):
            return tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w1, act_t, shared_blocks=0, n_blocks=NB, config=cfg)
        outs[name] = fn()
        ms_all = bench(fn, rep=20)
        err = max(rel(a, b) for a, b in zip(outs[name], outs["triton full block"]))
        rows.append(dict(kind="bwd (dact variant)", variant=name, ms=ms_all, err=err))
        print(f"bwd   dact {name:21s} whole backward {ms_all:7.3f} ms err {err:.1e}", flush=True)
    if args.sweep_dw:
        base_gu, base_dn = dict(g9.DW_GATE_UP_CONFIG), dict(g9.DW_DOWN_CONFIG)
        for gu, dn in ((dict(block_n=128, block_k=32, stages=8), dict(block_k=32, stages=8)),
                       (dict(block_n=128, block_k=64, stages=3), dict(block_k=64, stages=3)),
                       (dict(block_n=64, block_k=64, stages=5), None)):
            g9.DW_GATE_UP_CONFIG, g9.DW_DOWN_CONFIG = gu, dn or base_dn
            fn = lambda: tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w1, act_t, shared_blocks=0, n_blocks=NB)
            try:
                err = max(rel(a, b) for a, b in zip(fn(), outs["triton full block"]))
                ms_all = bench(fn, rep=20)
                rows.append(dict(kind="bwd (dW rings)", variant=f"{gu} / {dn}", ms=ms_all, err=err))
                print(f"bwd   dW rings {gu} / {dn}: whole backward {ms_all:7.3f} ms err {err:.1e}", flush=True)
            except Exception as e:
                print(f"bwd   dW rings {gu} / {dn}: {type(e).__name__}: {str(e)[:150]}", flush=True)
        g9.DW_GATE_UP_CONFIG, g9.DW_DOWN_CONFIG = base_gu, base_dn
    # the same backward's kernels one by one (torch.profiler), every Gluon kernel on
    from _tuning import kernel_times

    def bwd_all():
        tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w1, act_t, shared_blocks=0, n_blocks=NB,
                          config={"dw_gate_up": {"sm90": True}, "dw_down": {"sm90": True}})

    for kname, us in sorted(kernel_times(bwd_all).items(), key=lambda kv: -kv[1])[:8]:
        rows.append(dict(kind="bwd kernel", variant=kname[:60], us=us))
        print(f"bwd   kernel {kname[:60]:60s} {us:8.1f} us", flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
