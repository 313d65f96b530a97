"""Is a gathered sparse-FFN kernel waiting on DRAM for its gathered rows? The Gluon gate/up (x rows) and dact (dO
rows) kernels timed with the real grouping, with the row tiles in another order (the m-th tile of each of G
blocks together, so the tiles in flight share a token window and its rows stay in L2; the weights of G blocks
stay resident), and with every gathered row remapped into a 2 MB window of tokens (an L2-resident lower bound:
the same tiles, work and stores, only the A operand's reads change).

    python benchmarks/diag_sparse_gather_l2.py [--ratios 0.3,0.5] [--groups 8,16,32] [--out FILE.json]

bf16, T8192, d_model 4096, d_ff 14336, 64 blocks; the outputs of each reordered run are compared with the
block-major run's bit for bit (a row tile's work does not depend on when it runs).
"""

import argparse
import dataclasses

import torch
import triton

from deepseek_kernels.triton import sparse_ffn_sm90 as g9

from _tuning import interleaved_tiles, save_json, sparse_issue_inputs, sparse_routing


def reorder(g, group: int):
    """``g`` with its real row tiles in :func:`interleaved_tiles` order."""
    n = int(g.tile_count.item())
    perm = interleaved_tiles(g, group)
    tb, ts = g.tile_block.clone(), g.tile_start.clone()
    tb[:n], ts[:n] = g.tile_block[:n][perm], g.tile_start[:n][perm]
    return dataclasses.replace(g, tile_block=tb, tile_start=ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--groups", default="8,16,32")
    ap.add_argument("--out")
    args = ap.parse_args()
    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    BS = F_ // NB
    x, go, wg, wu, wd = sparse_issue_inputs(T, D, F_, dt)
    ms = lambda fn: triton.testing.do_bench(fn, warmup=10, rep=60)
    rows = []
    print(f"{'ratio':>5} {'kernel':<8} {'rows / order':<26} {'ms':>8} {'TF/s':>6}")
    for ratio in (float(r) for r in args.ratios.split(",")):
        k, _, _, g, _, w_sorted = sparse_routing(x, ratio, NB, g9.BLOCK_M)
        P = T * k
        hot = dataclasses.replace(g, sorted_tok=g.sorted_tok % 256)
        h = torch.empty(P, BS, device="cuda", dtype=dt)
        act = torch.randn(P, 2 * BS, device="cuda", dtype=dt)
        dact = torch.empty(P, 2 * BS, device="cuda", dtype=dt)
        hw = torch.empty(P, BS, device="cuda", dtype=dt)
        dwp = torch.empty(1, P, device="cuda", dtype=torch.float32)
        act_out = torch.empty_like(act)

        def gate_up(gr):
            g9.gate_up_sm90(x, wg, wu, h, act_out, gr, bs=BS, **g9.GATE_UP_CONFIG)
            return h, act_out

        def dact_k(gr):
            g9.dact_sm90(go, wd, act, w_sorted, dact, hw, dwp, gr, bs=BS, **g9.DACT_CONFIG)
            return dact, hw

        for kname, fn, flops in (("gate/up", gate_up, 4 * P * D * BS), ("dact", dact_k, 2 * P * D * BS)):
            ref = [t.clone() for t in fn(g)]
            variants = [("block-major", g)] + [(f"G{G} interleaved", reorder(g, G))
                                               for G in (int(s) for s in args.groups.split(","))]
            variants.append(("L2-resident rows (2 MB)", hot))
            for name, gr in variants:
                outs = fn(gr)
                if name != variants[-1][0]:
                    same = all(torch.equal(a, b) for a, b in zip(outs, ref))
                    assert same, f"{kname} {name}: outputs differ from the block-major run"
                t = ms(lambda: fn(gr))
                rows.append(dict(ratio=ratio, kernel=kname, variant=name, ms=t, tflops=flops / t / 1e9))
                print(f"{ratio:>5} {kname:<8} {name:<26} {t:8.3f} {flops / t / 1e9:6.0f}", flush=True)
        del h, act, dact, hw, dwp, act_out
        torch.cuda.empty_cache()
    if args.out:
        save_json(args.out, {"tokens": T, "rows": rows})


if __name__ == "__main__":
    main()
