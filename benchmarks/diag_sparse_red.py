"""How fast the H200 can sum the sparse FFN's row outputs into the token rows by fp32 reductions in L2 (red / atom
.add.v4.f32), against writing them as bf16 rows and combining them afterwards (today's y + combine).

    python benchmarks/diag_sparse_red.py [--tokens 8192] [--ratios 0.3,0.5] [--out FILE.json]

Every program stands for one output tile of the down projection (128 block-sorted rows x 256 columns of the real
router's grouping) and synthesises its values (no operand reads), so a row shows the store or reduction traffic
alone. Cases:
- store bf16 rows: the tile into y [P, D] (what the down GEMM's epilogue writes today), plus the combine kernel
  that reads y back at the library's tiles (the two together are what a fused reduction would replace; session
  35's call 1 ran the 16 x 64 tiles of before);
- atomic v4 / red v4: the tile added into an fp32 [T, D] accumulator at its rows' tokens (Triton's relaxed
  ``atomic_add``, 4-wide; a Gluon ``red.global.add.v4.f32`` by inline assembly), with the row tiles in the
  grouping's order (block-major: every block sweeps all tokens) or interleaved in groups of G blocks (the m-th tile
  of each of G blocks together, so the tiles in flight cover a narrow token window and their reductions hit L2);
- the accumulator's fp32 -> bf16 conversion, which a fused path adds.
Each reduced result is checked against ``index_add_`` of the same values.
"""

import argparse

import torch
import triton
import triton.language as tl

from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import combine, interleaved_tiles, save_json, sparse_routing

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True
except ImportError:  # pragma: no cover
    HAVE_GLUON = False

BM, BN = 128, 256


@triton.jit
def _tile(ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, BM: tl.constexpr, BN: tl.constexpr):
    """This program's output tile: its sorted rows, the block's end, its columns and synthesised fp32 values."""
    n_col = D // BN
    t = tl.load(ORDER + tl.program_id(0) // n_col)
    b = tl.load(TILE_BLOCK + t)
    rows = tl.load(TILE_START + t) + tl.arange(0, BM)
    cols = (tl.program_id(0) % n_col) * BN + tl.arange(0, BN)
    v = rows[:, None].to(tl.float32) * 1e-3 + cols[None, :].to(tl.float32) * 1e-4
    return rows, tl.load(OFFSETS + b + 1), cols, v


@triton.jit
def _store_kernel(Y, ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, BM: tl.constexpr, BN: tl.constexpr):
    rows, hi, cols, v = _tile(ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, BM, BN)
    tl.store(Y + rows.to(tl.int64)[:, None] * D + cols[None, :], v.to(Y.dtype.element_ty), mask=(rows < hi)[:, None])


@triton.jit
def _atomic_kernel(ACC, SORTED_TOK, ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, T, BM: tl.constexpr,
                   BN: tl.constexpr):
    rows, hi, cols, v = _tile(ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, BM, BN)
    tok = tl.load(SORTED_TOK + rows, mask=rows < hi, other=T)  # row T of ACC takes the padding rows
    tl.atomic_add(ACC + tok.to(tl.int64)[:, None] * D + cols[None, :], v, sem="relaxed")


if HAVE_GLUON:
    @gluon.jit
    def _red_kernel(ACC, SORTED_TOK, ORDER, TILE_BLOCK, TILE_START, OFFSETS, D, T, BM: gl.constexpr,
                    BN: gl.constexpr):
        L: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [4, 1], [1, 0])  # 4 adjacent columns per thread
        n_col = D // BN
        t = gl.load(ORDER + gl.program_id(0) // n_col)
        c = gl.program_id(0) % n_col
        b = gl.load(TILE_BLOCK + t)
        start = gl.load(TILE_START + t)
        hi = gl.load(OFFSETS + b + 1)
        rows = start + gl.arange(0, BM, layout=gl.SliceLayout(1, L))
        tok = gl.load(SORTED_TOK + rows, mask=rows < hi, other=T)
        cols = c * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, L))
        v = gl.expand_dims(rows.to(gl.float32) * 1e-3, 1) + gl.expand_dims(cols.to(gl.float32) * 1e-4, 0)
        ptrs = ACC + gl.expand_dims(tok.to(gl.int64) * D, 1) + gl.expand_dims(cols, 0)
        gl.inline_asm_elementwise(
            "red.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;\n\t"
            "mov.b32 $2, 0;\n\tmov.b32 $3, 0;",
            "=r,=r,=r,=r,l,l,l,l,f,f,f,f", [ptrs.to(gl.int64, bitcast=True), v], dtype=gl.int32, is_pure=False,
            pack=4)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--groups", default="0,4,8,16,64")
    ap.add_argument("--out")
    args = ap.parse_args()
    T, D, NB, dt = args.tokens, 4096, 64, torch.bfloat16
    torch.manual_seed(0)
    print("L2 bytes:", torch.cuda.get_device_properties(0).L2_cache_size)
    ms = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)
    rows = []
    print(f"{'ratio':>5} {'case':<28} {'ms':>8} {'payload GB':>10} {'TB/s':>6}")

    def row(ratio, name, t, payload):
        rows.append(dict(ratio=ratio, case=name, ms=t, payload_bytes=payload, tb_s=payload / t / 1e9))
        print(f"{ratio:>5} {name:<28} {t:8.3f} {payload / 1e9:10.2f} {payload / t / 1e9:6.2f}", flush=True)

    for ratio in (float(r) for r in args.ratios.split(",")):
        x = torch.randn(T, D, device="cuda", dtype=dt)
        k, _, _, g, w_full, _ = sparse_routing(x, ratio, NB, BM)
        P = T * k
        n_tiles = int(g.tile_count.item())
        grid = (n_tiles * (D // BN),)
        y = torch.empty(P, D, device="cuda", dtype=dt)
        out = torch.empty(T, D, device="cuda", dtype=dt)
        acc = torch.zeros(T + 1, D, device="cuda", dtype=torch.float32)
        order0 = interleaved_tiles(g, 0).to(torch.int32)
        row(ratio, "store bf16 rows", ms(lambda: _store_kernel[grid](y, order0, g.tile_block, g.tile_start, g.offsets,
                                                                      D, BM=BM, BN=BN, num_warps=4)), P * D * 2)
        row(ratio, "combine (reads y)", ms(lambda: combine(y, g.inv, w_full, out, k, *tk.combine_tiles(D))),
            P * D * 2 + T * D * 2)
        row(ratio, "acc fp32 -> bf16", ms(lambda: out.copy_(acc[:T])), T * D * 6)
        row(ratio, "acc zero", ms(lambda: acc.zero_()), (T + 1) * D * 4)
        # the reference sum of the synthesised values, to check each reduced result
        r_ = torch.arange(P, device="cuda", dtype=torch.float32)[:, None] * 1e-3
        c_ = torch.arange(D, device="cuda", dtype=torch.float32)[None, :] * 1e-4
        ref = torch.zeros(T, D, device="cuda").index_add_(0, g.sorted_tok[:P].long(), r_ + c_)
        del r_, c_
        kernels = [("atomic v4", _atomic_kernel)] + ([("red v4", _red_kernel)] if HAVE_GLUON else [])
        for name, kern in kernels:
            for group in (int(s) for s in args.groups.split(",")):
                order = interleaved_tiles(g, group).to(torch.int32)
                launch = lambda: kern[grid](acc, g.sorted_tok, order, g.tile_block, g.tile_start, g.offsets, D, T,
                                             BM=BM, BN=BN, num_warps=4)
                acc.zero_()
                launch()
                err = (acc[:T] - ref).abs().max().item() / ref.abs().max().item()
                assert err < 1e-5, f"{name} group {group}: relative error {err}"
                row(ratio, f"{name} G{group or 'none'}", ms(launch), P * D * 4)
        del y, acc, ref
        torch.cuda.empty_cache()
    if args.out:
        save_json(args.out, {"tokens": T, "d_model": D, "rows": rows})


if __name__ == "__main__":
    main()
