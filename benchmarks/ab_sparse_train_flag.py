"""A/B of one module-level switch of the sparse FFN's training kernels (``deepseek_kernels.triton.sparse_ffn`` or
``...sparse_ffn_sm90``) on the backward (:func:`sparse_ffn_bwd`, or the forward with ``--fwd``) at T8192, in
alternating rounds (A B B A ...), with a check that both settings give the same bits.

    python benchmarks/ab_sparse_train_flag.py sparse_ffn_sm90.DACT_PREFETCH_ACT [--values "False;True"] [--ratio 0.3]

bf16, d_model 4096, d_ff 14336, 64 blocks (the issue's shape); the routing from the real router.
"""

import argparse
import ast
import importlib
import statistics

import torch

from deepseek_kernels.reference.sparse_ffn import n_active
from deepseek_kernels.triton import sparse_ffn as tk

from _tuning import bench, save_json


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("flag", help="MODULE.NAME, MODULE one of sparse_ffn, sparse_ffn_sm90")
    ap.add_argument("--values", default="False;True", help="the two settings as Python literals, ';'-separated")
    ap.add_argument("--ratio", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--fwd", action="store_true", help="time the forward instead of the backward")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                    help="another switch held at VALUE (a Python literal) for both settings; repeatable")
    ap.add_argument("--out")
    args = ap.parse_args()
    held = []
    for item in args.set:
        target, eq, literal = item.partition("=")
        h_mod, _, h_name = target.strip().partition(".")
        h = importlib.import_module(f"deepseek_kernels.triton.{h_mod}")
        if not eq or not hasattr(h, h_name):
            raise SystemExit(f"--set {item!r}: expected MODULE.NAME=VALUE with NAME a switch of that module")
        held.append((h, h_name, ast.literal_eval(literal.strip())))
    mod_name, _, name = args.flag.partition(".")
    mod = importlib.import_module(f"deepseek_kernels.triton.{mod_name}")
    if not hasattr(mod, name):
        raise SystemExit(f"deepseek_kernels.triton.{mod_name} has no {name!r}")
    values = [ast.literal_eval(v.strip()) for v in args.values.split(";")]
    if len(values) != 2:
        raise SystemExit(f"--values: two settings, got {values}")
    T, D, F_, NB, dt = args.tokens, 4096, 14336, 64, torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, D, device="cuda", dtype=dt)
    wr = (torch.randn(NB, D, device="cuda") * D**-0.5).to(dt)
    wg, wu = ((torch.randn(F_, D, device="cuda") * D**-0.5).to(dt) for _ in range(2))
    wd = (torch.randn(D, F_, device="cuda") * F_**-0.5).to(dt)
    dout = torch.randn(T, D, device="cuda", dtype=dt)
    k = n_active(args.ratio, NB)
    idx, weights, _ = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate")
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, weights, shared_blocks=0, n_blocks=NB)

    def run():
        if args.fwd:
            return tk.sparse_ffn_fwd(x, wg, wu, wd, idx, weights, shared_blocks=0, n_blocks=NB)[:2]
        return tk.sparse_ffn_bwd(dout, x, wg, wu, wd, idx, weights, act, shared_blocks=0, n_blocks=NB)

    for h, h_name, v in held:
        setattr(h, h_name, v)
    before = getattr(mod, name)
    times = {repr(v): [] for v in values}
    outs = {}
    try:
        for r in range(args.rounds):
            for v in (values if r % 4 in (0, 3) else values[::-1]):
                setattr(mod, name, v)
                if repr(v) not in outs:
                    outs[repr(v)] = [t.clone() for t in run()]
                times[repr(v)].append(bench(run, rep=30))
    finally:
        setattr(mod, name, before)
    a, b = (outs[repr(v)] for v in values)
    same = all(torch.equal(p, q) for p, q in zip(a, b))
    rows = []
    for v in values:
        ts = times[repr(v)]
        rows.append(dict(flag=args.flag, value=repr(v), median_ms=statistics.median(ts), all_ms=ts))
        print(f"{args.flag} = {v!r:8s} {'fwd' if args.fwd else 'bwd'} median {statistics.median(ts):.3f} ms "
              f"({', '.join(f'{t:.3f}' for t in ts)})", flush=True)
    print(f"same bits: {same}", flush=True)
    save_json(args.out, dict(rows=rows, same_bits=same, ratio=args.ratio, tokens=T, held=args.set))


if __name__ == "__main__":
    main()
