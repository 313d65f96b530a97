"""Where the sparse FFN's training step spends its GPU time: forward + backward of ``gated_sparse_ffn`` at
T8192 (the issue's shape: bf16, d_model 4096, d_ff 14336, 64 blocks) per kernel (torch.profiler), each
grouped GEMM's useful TFLOP/s, next to the dense SwiGLU FFN's kernels (cuBLAS) in the same process.

    python benchmarks/diag_sparse_train.py [--ratios 0.3,0.5] [--tokens 8192] [--out results.json]
    python benchmarks/diag_sparse_train.py --sweep [--ratios 0.3]   # wide-tile configs of the short-K kernels
    ncu ... python benchmarks/diag_sparse_train.py --once --ratios 0.3   # one fwd+bwd: each kernel launched once

Useful FLOPs per kernel (P = tokens x active blocks, BS = d_ff / n_blocks): forward gate/up 4 P D BS, down
2 P D BS; backward dact (dO . w_down slice) 2 P D BS, dx 4 P D BS, dW gate/up 4 P D BS, dW down 2 P D BS.
"""

import argparse

import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.sparse_ffn import n_active, swiglu_ffn_ref

from _tuning import bench, kernel_times, save_json

# kernel-name fragment -> multiple of P * D * BS useful FLOPs (None: memory-bound, no FLOPs)
KERNELS = {"_sparse_ffn_gate_up_kernel": 4, "_sparse_ffn_down_kernel": 2, "_sparse_ffn_bwd_dact_kernel": 2,
           "_sparse_ffn_bwd_dx_kernel": 4, "_sparse_ffn_bwd_dw_gate_up_kernel": 4,
           "_sparse_ffn_bwd_dw_down_kernel": 2,
           # the persistent TMA kernel runs twice per step under one name: the forward's down (2) and dx (4)
           "_sorted_rows_tma_kernel": 6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true", help="time SWEEP's configs (forward / backward alone) instead")
    ap.add_argument("--sweep2", action="store_true", help="with --sweep: the second round (SWEEP2)")
    ap.add_argument("--sweep3", action="store_true", help="with --sweep: the third round (SWEEP3)")
    ap.add_argument("--sweep4", action="store_true", help="with --sweep: the fourth round (SWEEP4)")
    ap.add_argument("--sweep5", action="store_true", help="with --sweep: the fifth round (SWEEP5)")
    ap.add_argument("--sweep6", action="store_true", help="with --sweep: the sixth round (SWEEP6)")
    ap.add_argument("--sweep7", action="store_true", help="with --sweep: the seventh round (SWEEP7)")
    ap.add_argument("--sweep8", action="store_true", help="with --sweep: the eighth round (SWEEP8)")
    ap.add_argument("--sweep9", action="store_true", help="with --sweep: the ninth round (SWEEP9)")
    ap.add_argument("--once", action="store_true",
                    help="one fwd+bwd of the first ratio and nothing else (under ncu: every kernel launched once)")
    args = ap.parse_args()
    if args.sweep:
        save_json(args.out, sweep(args))
        return
    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    BS = F_ // NB
    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=dt, requires_grad=True)
    wr = (torch.randn(NB, D, device="cuda") * D**-0.5).to(dt).requires_grad_()
    wg, wu = ((torch.randn(F_, D, device="cuda") * D**-0.5).to(dt).requires_grad_() for _ in range(2))
    wd = (torch.randn(D, F_, device="cuda") * F_**-0.5).to(dt).requires_grad_()
    dout = torch.randn(T, D, device="cuda", dtype=dt)
    params = (x, wr, wg, wu, wd)
    if args.once:
        dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=float(args.ratios.split(",")[0])).backward(dout)
        torch.cuda.synchronize()
        return

    def dense_step():
        for p in params:
            p.grad = None
        swiglu_ffn_ref(x, wg, wu, wd).backward(dout)

    rows = []
    dense_ms = bench(dense_step, rep=20)
    dense_k = kernel_times(dense_step, steps=3)
    print(f"dense fwd+bwd {dense_ms:.3f} ms ({6 * T * D * F_ * 3 / dense_ms / 1e9:.0f} TF/s); its kernels:")
    for name, us in sorted(dense_k.items(), key=lambda kv: -kv[1])[:8]:
        print(f"   {name[:70]:70s} {us:9.1f} us")
    for ratio in (float(r) for r in args.ratios.split(",")):
        k = n_active(ratio, NB)
        P = T * k

        def step(ratio=ratio):
            for p in params:
                p.grad = None
            dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=ratio).backward(dout)

        ms = bench(step, rep=20)
        per = kernel_times(step, steps=3)
        print(f"ratio {ratio} (k {k}, P {P}): fwd+bwd {ms:.3f} ms vs dense {dense_ms:.3f} = {dense_ms / ms:.2f}x; "
              f"kernels {sum(per.values()) / 1e3:.3f} ms:")
        kern = {}
        for name, us in sorted(per.items(), key=lambda kv: -kv[1]):
            mult = next((m for frag, m in KERNELS.items() if frag in name), None)
            tf = mult * P * D * BS / us / 1e6 if mult else None
            kern[name] = dict(us=us, tflops=tf)
            print(f"   {name[:70]:70s} {us:9.1f} us" + (f"  {tf:6.0f} TF/s" if tf else ""))
        rows.append(dict(T=T, ratio=ratio, k=k, P=P, ms=ms, dense_ms=dense_ms, kernels=kern,
                         dense_kernels_us=dense_k))
    save_json(args.out, rows)


# Session 16: the per-kernel profile put the backward's dx (K = 2 x 224, 64x64 tiles: ~32 FLOP per byte of L2
# traffic, ~18 GB per step) at 203 TF/s and the forward's down (K = 224) at 247: wider tiles, a 128-row M tile
# for the backward (block_m is shared by dact and dx: the grouping's row tiles), and dact over all 224 neurons in
# one 256-wide tile (the gathered dO rows read once instead of twice).
SWEEP = {
    "bwd": [{}, {"block_m": 128}] + [
        {"block_m": bm, kern: dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)}
        for bm, kern, bn, bk, nw, st in (
            (64, "dx", 128, 32, 4, 4), (64, "dx", 256, 32, 8, 3), (64, "dx", 128, 32, 8, 4),
            (128, "dx", 128, 32, 8, 4), (128, "dx", 128, 64, 8, 3), (128, "dx", 256, 32, 8, 3),
            (128, "dx", 256, 32, 8, 4), (128, "dx", 256, 64, 8, 2),
            (64, "dact", 256, 64, 8, 3), (64, "dact", 256, 32, 8, 4), (128, "dact", 256, 64, 8, 3),
            (128, "dact", 128, 64, 8, 4))],
    "fwd": [{}] + [{"down": dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)}
                   for bn, bk, nw, st in ((256, 32, 8, 3), (256, 32, 8, 4), (256, 64, 8, 3), (128, 32, 8, 4),
                                          (128, 32, 4, 4), (128, 128, 8, 2))],
}


# The second round around the first round's winners (block_m 128 + dx 256x32 w8 st4: backward 7.36 -> 5.88 ms;
# down 128x32 w8 st4: forward 2.96 -> 2.88 ms): dact and the two weight-gradient kernels with that base.
_DX = dict(block_n=256, block_k=32, num_warps=8, num_stages=4)
SWEEP2 = {
    "bwd": [{"block_m": 128, "dx": _DX}] + [
        {"block_m": 128, "dx": _DX, kern: dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)}
        for kern, bn, bk, nw, st in (
            ("dx", 256, 16, 8, 6), ("dx", 256, 32, 8, 3),
            ("dact", 128, 64, 8, 4), ("dact", 128, 32, 8, 4), ("dact", 128, 64, 8, 3), ("dact", 64, 64, 4, 4),
            ("dw_gate_up", 128, 64, 8, 4), ("dw_gate_up", 128, 32, 8, 4), ("dw_gate_up", 64, 128, 4, 3),
            ("dw_gate_up", 128, 128, 8, 2),
            ("dw_down", 128, 128, 8, 3), ("dw_down", 128, 32, 8, 4), ("dw_down", 128, 64, 8, 4),
            ("dw_down", 64, 64, 4, 4))],
    "fwd": [{}] + [{"down": dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st)}
                   for bn, bk, nw, st in ((128, 32, 8, 4), (128, 32, 8, 5), (128, 16, 8, 8), (128, 32, 8, 3))],
}


# The third round: dact's epilogue in two column halves (its one-piece epilogue spills ~1.8 KB per thread).
_DACT = dict(block_n=128, block_k=128, num_warps=8, num_stages=3)
SWEEP3 = {
    "bwd": [{}, {"dact": dict(_DACT, split_epilogue=True)},
            {"dact": dict(_DACT, num_stages=4, block_k=64, split_epilogue=True)},
            {"dact": dict(_DACT, num_stages=2, split_epilogue=True)}, {}],
    "fwd": [],
}


# The fourth round (prepared in session 16, not yet run): the forward's down projection and the backward's dx as
# persistent TMA kernels (down.tma / dx.tma; K tiles of 32 divide the 224-neuron blocks), one or two programs per SM.
SWEEP4 = {
    "bwd": [{}] + [{"dx": dict(block_n=bn, block_k=32, num_warps=8, num_stages=st, tma=True)}
                   for bn, st in ((256, 3), (256, 4), (128, 4))] + [{}],
    "fwd": [{}] + [{"down": dict(block_n=bn, block_k=32, num_warps=nw, num_stages=st, tma=True, programs=pr)}
                   for bn, nw, st, pr in ((128, 8, 4, None), (128, 8, 3, None), (256, 8, 3, None), (128, 4, 4, None),
                                          (128, 8, 4, 264), (128, 4, 3, 264))] + [{}],
}


# The fifth round (prepared in session 16, not yet run): tile orders. The 2-D grids run the row tiles of one
# column tile together, so every column tile re-reads the row tiles' A operand from HBM (down: h 32 times,
# ~2.2 GB a step; dx: dact 16 times; gate/up and dact: the gathered rows twice); the weight-gradient grids stream
# every block's activations once per model-column tile (dW gate/up: dact 32 times, ~4.5 GB). cols_first and
# d_group reorder the programs (same bits) so those operands are read once (or once per group) while the shared
# operand stays in L2.
_COLS = {"cols_first": True}
SWEEP5 = {
    "fwd": [{}, {"gate_up": _COLS}, {"down": _COLS}, {"gate_up": _COLS, "down": _COLS}, {}],
    "bwd": [{}, {"dact": _COLS}, {"dx": _COLS}] + [{kern: {"d_group": g}} for kern in ("dw_gate_up", "dw_down")
                                                   for g in (4, 8, 16)]
           + [{"dact": _COLS, "dx": _COLS, "dw_gate_up": {"d_group": 8}, "dw_down": {"d_group": 8}}, {}],
}


# The sixth round (session 17), around the fourth and fifth rounds' winners at T8192: forward gate/up cols_first
# (3.04 -> 2.83 ms at ratio 0.3) and the persistent TMA down on 264 programs (2.87 -> 2.41); backward dx
# cols_first (-0.2 ms), dW gate/up d_group 4-8 (-0.2), all four orders together 5.71 -> 5.28 (0.3) and 9.56 ->
# 8.70 (0.5) although dact cols_first alone lost; dx.tma 256x32 st3 -0.14.
def _tma(bn, nw, st, pr):
    return dict(block_n=bn, block_k=32, num_warps=nw, num_stages=st, tma=True, programs=pr)


_DWG = {"dw_gate_up": {"d_group": 4}, "dw_down": {"d_group": 8}}
SWEEP6 = {
    "fwd": [{}, {"gate_up": _COLS}] + [{"gate_up": _COLS, "down": _tma(*c)} for c in (
        (128, 4, 3, 264), (128, 4, 4, 264), (128, 8, 4, 264), (128, 4, 3, 396), (128, 4, 3, 528), (256, 8, 3, 132),
        (256, 8, 3, 264))] + [{"down": _tma(128, 4, 3, 264)}, {}],
    "bwd": [{}, {"dx": _COLS, **_DWG}, {"dact": _COLS, "dx": _COLS, **_DWG},
            {"dact": _COLS, "dx": _COLS, "dw_gate_up": {"d_group": 8}, "dw_down": {"d_group": 8}},
            {"dact": _COLS, "dx": _COLS, "dw_gate_up": {"d_group": 2}, "dw_down": {"d_group": 8}}]
           + [{"dact": _COLS, "dx": _tma(256, 8, 3, pr), **_DWG} for pr in (None, 264)]
           + [{"dx": _tma(256, 8, 3, None), **_DWG}, {}],
}


# The seventh round (session 17) on the new defaults: the weight-gradient kernels' tiles in d_group order (dW
# gate/up 1707 us = 335 TF/s, the largest kernel after the TMA pair), dact's, and the gate/up forward's K tile.
def _t(bn, bk, nw, st, d_group=None, **kw):
    return dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=st, **kw, **({"d_group": d_group} if d_group else {}))


SWEEP7 = {
    "fwd": [{}] + [{"gate_up": _t(*c, cols_first=True)} for c in ((128, 64, 8, 4), (128, 32, 8, 5), (64, 64, 4, 4))]
           + [{}],
    "bwd": [{}] + [{"dw_gate_up": _t(*c)} for c in (
        (128, 64, 8, 4, 4), (128, 64, 8, 3, 4), (128, 128, 8, 3, 2), (128, 128, 8, 3, 16), (64, 128, 4, 3, 8))]
           + [{"dw_down": _t(*c)} for c in ((128, 128, 8, 3, 8), (128, 64, 8, 4, 8), (128, 64, 8, 3, 16),
                                            (128, 32, 8, 5, 8))]
           + [{"dact": _t(*c, split_epilogue=True, cols_first=True)} for c in ((128, 64, 8, 4), (128, 128, 8, 2))]
           + [{}],
}


# The eighth round (session 30). Measured in call 2 (T8192 ratio 0.3) and dropped: the forward's down projection with
# the row tile's h loaded once per (row tile, column group) in K pieces 128 + 64 + 32 (one 8-warp program per SM,
# 160-205 KB of shared memory): 2.47-2.84 ms vs the TMA kernel's 2.33 (2 programs per SM overlap one's stores with
# the other's products; this loop could not); dW down over a block's 224 neurons in one program: 5.20-5.81 vs
# 5.22-5.30 ms (removed); the combine's column tiles (128-512 wide): within the forward's drift. Kept: dact over
# whole blocks (dact.full_block, now the default): 5.19-5.22 vs 5.27-5.37 ms at 0.3, 8.44-8.51 vs 8.59-8.74 at 0.5.
def _cb(bn, nw):
    return {"combine": dict(block_n=bn, num_warps=nw)}


_DA_TILED = {"dact": {"full_block": False}}
SWEEP8 = {
    "fwd": [{}] + [_cb(bn, nw) for bn, nw in ((128, 4), (256, 4), (256, 8), (512, 8))] + [{}],
    "bwd": [{}, _DA_TILED, {"dact": _t(128, 64, 8, 4, full_block=True)}, _DA_TILED, {}],
}


# The ninth round (session 30): the down projection and dx as the Gluon warp-specialized kernel (sparse_ffn_sm90.py,
# its tiles in sparse_ffn_sm90.CONFIG; benchmarks/diag_sparse_sm90.py times its variants) against the Triton TMA
# kernel, in the whole forward / backward.
_NO_G9 = {"down": {"sm90": False}}
SWEEP9 = {"fwd": [{}, _NO_G9, {}, _NO_G9], "bwd": [{}, {"dx": {"sm90": False}}, {}, {"dx": {"sm90": False}}]}


def sweep(args):
    """Forward and backward of the Triton path alone (``tk.sparse_ffn_fwd`` / ``tk.sparse_ffn_bwd``) per SWEEP
    config, each checked against the default config's results first (relative error < 1e-2)."""
    from deepseek_kernels.triton import sparse_ffn as tk

    from _tuning import rel

    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=dt)
    wg, wu = ((torch.randn(F_, D, device="cuda") * D**-0.5).to(dt) for _ in range(2))
    wd = (torch.randn(D, F_, device="cuda") * F_**-0.5).to(dt)
    go = torch.randn(T, D, device="cuda", dtype=dt)
    rows = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        k = n_active(ratio, NB)
        idx = torch.rand(T, NB, device="cuda").topk(k, dim=-1).indices.to(torch.int32)
        w = torch.rand(T, k, device="cuda") + 0.1
        kw = dict(shared_blocks=0, n_blocks=NB)
        ref, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
        ref_b = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw)
        rounds = ((args.sweep9, SWEEP9), (args.sweep8, SWEEP8), (args.sweep7, SWEEP7), (args.sweep6, SWEEP6),
                  (args.sweep5, SWEEP5), (args.sweep4, SWEEP4), (args.sweep3, SWEEP3), (args.sweep2, SWEEP2))
        sets = next((cfgs for on, cfgs in rounds if on), SWEEP)
        for kind, configs in sets.items():
            for cfg in configs:
                try:
                    if kind == "fwd":
                        def fn(cfg=cfg):
                            return tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)
                        err = rel(fn()[0], ref)
                    else:
                        def fn(cfg=cfg):
                            return tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
                        err = max(rel(a, b) for a, b in zip(fn(), ref_b))
                    row = dict(ratio=ratio, kind=kind, config=cfg, err=err)
                    if err < 1e-2:
                        row["ms"] = bench(fn, rep=30)
                except Exception as e:  # e.g. out of shared memory
                    row = dict(ratio=ratio, kind=kind, config=cfg, error=f"{type(e).__name__}: {str(e)[:100]}")
                rows.append(row)
                print(f"ratio {ratio} {kind} {cfg}: " + (f"{row['ms']:.3f} ms" if "ms" in row else
                                                        row.get("error", f"error {row.get('err'):.2e}")), flush=True)
    return rows


if __name__ == "__main__":
    main()
