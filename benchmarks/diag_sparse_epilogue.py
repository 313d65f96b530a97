"""What do the sparse-FFN kernels' epilogues cost? The Gluon dact and gate/up timed alone as they are and
with their epilogue's memory work replaced by row sums of the accumulators (no loads of act, no stores of
dact / hw / h / act: the main loop alone, a lower bound for any overlapped epilogue); the short-K GEMMs (down, dx)
as they are and with their tiles written to shared memory but never stored (``--kernels down,dx``).

    python benchmarks/diag_sparse_epilogue.py [--ratio 0.3] [--kernels dact,gate/up] [--out FILE.json]

Each variant runs in its own process (the stub replaces module globals before the first compile). bf16, T8192,
d_model 4096, d_ff 14336, 64 blocks, the real router's grouping. Session 36's runs (calls 4 and 7) also timed dact
with its epilogue in the consumers (0.667 / 0.685 ms, main loop 0.481 / 0.499; code at a1a939c) and as one
256-column product (0.767, main loop 0.546; code at 0ff6529); dact's epilogue partition read 0.622 ms in call 7.
"""

import argparse
import json
import subprocess
import sys

import torch
import triton

from _tuning import save_json, sparse_issue_inputs, sparse_routing

# (kernel, form, stub): dact (its epilogue in a fourth partition); gate/up's whole tiles as two products or one wide
# one (GATE_UP_WIDE)
# the short-K GEMMs (down, dx) at their default tiles and at 128-wide tiles (ring 10: a third more shared-memory
# fill bytes per FLOP from L2), their stub keeping the accumulator's store into shared memory but no TMA store
VARIANTS = [("dact", "epilogue partition", False), ("dact", "epilogue partition", True),
            ("gate/up", "two products", False), ("gate/up", "two products", True), ("gate/up", "wide", False),
            ("gate/up", "wide", True), ("down", "256 s6", False), ("down", "256 s6", True), ("down", "128 s10", False),
            ("down", "128 s10", True), ("dx", "256 s6", False), ("dx", "256 s6", True), ("dx", "128 s10", False),
            ("dx", "128 s10", True)]


def _stub_globals(g9):
    """Replace dact's epilogue chunk and the gate/up store by row sums of the accumulators (one store per row)."""
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def _dact_apply(g_smem, a, u, wp, DACT, HW, r0, hi, c0: gl.constexpr, BS: gl.constexpr):
        # (a, u, wp unused: their loads in _dact_load go dead)
        layout: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])
        return gl.sum(g_smem.load(layout).to(gl.float32), axis=1)

    @gluon.jit
    def _gate_up_store(acc_g, acc_u, H, ACT, rows, hi, c0, BS: gl.constexpr, SAVE_ACT: gl.constexpr,
                       out_layout: gl.constexpr):
        s = gl.convert_layout(gl.sum(acc_g + acc_u, axis=1), rows.type.layout)
        gl.store(H + rows.to(gl.int64) * BS + c0, s.to(H.dtype.element_ty), mask=rows < hi)

    @gluon.jit
    def _stage_store(piece, o_bufs, n, out_desc, r0, c0, O_BUFS, BASE):  # (gl only in annotations: not seen)
        o_bufs.index(BASE).store(piece)  # the tile into shared memory as before, no TMA store (nor its wait)
        return n + 1

    g9._dact_apply = _dact_apply
    g9._gate_up_store = _gate_up_store
    g9._stage_store = _stage_store


def run_one(kernel: str, form: str, stub: bool, ratio: float) -> dict:
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    if stub:
        _stub_globals(g9)
    g9.GATE_UP_WIDE = form == "wide" if kernel == "gate/up" else g9.GATE_UP_WIDE
    T, D, F_, NB, dt = 8192, 4096, 14336, 64, torch.bfloat16
    BS = F_ // NB
    x, go, wg, wu, wd = sparse_issue_inputs(T, D, F_, dt)
    k, _, _, g, _, w_sorted = sparse_routing(x, ratio, NB, g9.BLOCK_M)
    P = T * k
    if kernel == "dact":
        act = torch.randn(P, 2 * BS, device="cuda", dtype=dt)
        dact = torch.empty(P, 2 * BS, device="cuda", dtype=dt)
        hw = torch.empty(P, BS, device="cuda", dtype=dt)
        dwp = torch.empty(1, P, device="cuda", dtype=torch.float32)
        fn = lambda: g9.dact_sm90(go, wd, act, w_sorted, dact, hw, dwp, g, bs=BS, **g9.DACT_CONFIG)
        flops = 2 * P * D * BS
    elif kernel == "gate/up":
        h = torch.empty(P, BS, device="cuda", dtype=dt)
        act = torch.empty(P, 2 * BS, device="cuda", dtype=dt)
        fn = lambda: g9.gate_up_sm90(x, wg, wu, h, act, g, bs=BS, **g9.GATE_UP_CONFIG)
        flops = 4 * P * D * BS
    else:  # down / dx: [P, BS] x w_down^T, [P, 2 BS] x [w_gate; w_up]
        cfg = dict(g9.CONFIG) if form == "256 s6" else dict(block_n=128, block_k=32, stages=10)
        a = torch.randn(P, BS if kernel == "down" else 2 * BS, device="cuda", dtype=dt)
        y = torch.empty(P, D, device="cuda", dtype=dt)
        if kernel == "down":
            fn = lambda: g9.sorted_rows_gemm_sm90(a, wd, None, y, g, bs=BS, w_nk=True, **cfg)
        else:
            fn = lambda: g9.sorted_rows_gemm_sm90(a, wg, wu, y, g, bs=BS, w_nk=False, **cfg)
        flops = (2 if kernel == "down" else 4) * P * D * BS
    fn()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=20, rep=200)
    stubbed = "no TMA stores" if kernel in ("down", "dx") else "row sums only"
    return dict(kernel=kernel, form=form, epilogue=stubbed if stub else "full", ratio=ratio, ms=ms,
                tflops=flops / ms / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--kernels", default="dact,gate/up", help="which kernels' variants (comma-separated)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "i" runs VARIANTS[i] and prints its JSON row
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(*VARIANTS[int(args.one)], args.ratio)))
        return
    rows = []
    print(f"{'kernel':<8} {'form':<19} {'epilogue':<14} {'ms':>7} {'TF/s':>6}")
    for i in range(len(VARIANTS)):
        if VARIANTS[i][0] not in args.kernels.split(","):
            continue
        p = subprocess.run([sys.executable, __file__, "--one", str(i), "--ratio", str(args.ratio)],
                           capture_output=True, text=True)
        last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
        if p.returncode != 0 or not last.startswith("{"):
            print(f"variant {VARIANTS[i]} failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        r = json.loads(last)
        rows.append(r)
        print(f"{r['kernel']:<8} {r['form']:<19} {r['epilogue']:<14} {r['ms']:7.3f} {r['tflops']:6.0f}", flush=True)
    save_json(args.out, rows)


if __name__ == "__main__":
    main()
