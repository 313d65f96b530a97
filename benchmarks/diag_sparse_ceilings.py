"""Memory ceilings of the sparse FFN's row traffic on this GPU: how fast it can write, copy and sum the [P, D]
row buffers (y, dx_rows) that the down / dx GEMMs write and the combine reads, next to the combine kernel itself.

    python benchmarks/diag_sparse_ceilings.py [--tokens 8192] [--ratios 0.3,0.5] [--sweep] [--out FILE.json]

bf16, d_model 4096, 64 blocks of d_ff 14336; P = tokens x active blocks. Rows of the table:
- write: ``y.fill_`` of [P, D] (the down GEMM's output traffic alone);
- copy: [P, D] -> [P, D] (read + write);
- token-major sum: ``y.view(T, k, D).sum(1)`` (the combine's reads if a token's rows were adjacent);
- combine: the library's combine kernel (its tiles: ``combine_tiles``) over the real router's grouping (rows in
  block order);
- combine, token-major rows: the same kernel with each token's k rows adjacent (what a down GEMM storing its rows
  at their token's slots would leave).
``--sweep``: the combine kernel's tile shapes (tokens x columns per program, warps) over both row orders.
"""

import argparse

import torch
import triton

from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import combine, save_json, sparse_routing


def _ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=50)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    T, D, NB, dt = args.tokens, 4096, 64, torch.bfloat16
    torch.manual_seed(0)
    rows = []
    print(f"{'ratio':>5} {'case':<44} {'ms':>8} {'GB moved':>9} {'TB/s':>6}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        x = torch.randn(T, D, device="cuda", dtype=dt)
        k, _, _, g, w_full, _ = sparse_routing(x, ratio, NB)
        P = T * k
        y = torch.randn(P, D, device="cuda", dtype=dt)
        y2 = torch.empty_like(y)
        nbytes = y.numel() * y.element_size()
        out = torch.empty(T, D, device="cuda", dtype=dt)
        inv_tm = torch.arange(P, device="cuda", dtype=g.inv.dtype).view(T, k)
        lib = tk.combine_tiles(D)  # the library's tiles (tokens, columns)
        cases = [("write (fill)", lambda: y2.fill_(1.0), nbytes),
                 ("copy", lambda: y2.copy_(y), 2 * nbytes),
                 ("token-major sum", lambda: torch.sum(y.view(T, k, D), 1, out=out), nbytes + out.numel() * 2),
                 ("combine kernel", lambda: combine(y, g.inv, w_full, out, k, *lib), nbytes + out.numel() * 2),
                 ("combine, token-major rows", lambda: combine(y, inv_tm, w_full, out, k, *lib),
                  nbytes + out.numel() * 2)]
        if args.sweep:
            for bt, bn, nw in ((16, 64, 4), (16, 128, 4), (8, 256, 4), (8, 512, 4), (4, 512, 4), (4, 1024, 4),
                               (2, 1024, 4), (2, 2048, 8), (1, 2048, 4), (1, 4096, 4), (1, 4096, 8)):
                for order, inv in (("rows by block", g.inv), ("token-major rows", inv_tm)):
                    cases.append((f"combine {bt}x{bn} w{nw}, {order}",
                                  lambda bt=bt, bn=bn, nw=nw, inv=inv: combine(y, inv, w_full, out, k, bt, bn, nw),
                                  nbytes + out.numel() * 2))
        for name, fn, moved in cases:
            ms = _ms(fn)
            rows.append(dict(ratio=ratio, k=k, P=P, case=name, ms=ms, bytes=moved, tb_s=moved / ms / 1e9))
            print(f"{ratio:>5} {name:<44} {ms:8.3f} {moved / 1e9:9.2f} {moved / ms / 1e9:6.2f}")
        del y, y2
        torch.cuda.empty_cache()
    if args.out:
        save_json(args.out, {"tokens": T, "d_model": D, "rows": rows})


if __name__ == "__main__":
    main()
