"""The Triton sparse-FFN kernels against the reference (under the Triton interpreter on CPU, fp32/fp16
at small odd sizes, outputs landing in poisoned memory; marked-gpu cases on the H200)."""

from __future__ import annotations

import pytest
import torch

from deepseek_kernels.reference.sparse_ffn import gated_sparse_ffn_ref, route_ref, sparse_ffn_blocks_ref
from deepseek_kernels.triton import sparse_ffn as tk
from deepseek_kernels.triton._common import big_shared_memory
from pdl_utils import assert_pdl_gives_the_bits

# conftest.py: on a machine with a GPU (interpreter off) the unmarked tests run on CUDA
KERNEL_TESTS_ON_CUDA = True

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Every torch.empty in the launchers comes back full of NaN (ints: -12345), so an element a
    kernel fails to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int32, torch.int64):
            t.fill_(-12345)
        return t

    monkeypatch.setattr(torch, "empty", empty)


ROUTER_CASES = [
    # (T, D, n_routed, k, gate, weighting, bias, threshold)
    (1, 16, 8, 1, "sigmoid", "gate", False, None),
    (37, 40, 8, 3, "softmax", "gate", True, None),
    (19, 24, 7, 7, "sigmoid", "none", False, None),   # k = n_routed, n_routed not a power of two
    (33, 32, 64, 19, "sigmoid", "gate", True, None),  # DeepSeek-like: 64 blocks, ratio 0.3
    (33, 32, 64, 1, "softmax", "none", False, None),
    (21, 16, 12, 5, "sigmoid", "gate", False, 0.55),  # threshold: empty slots
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "T{}-D{}-NR{}-k{}-{}-{}-bias{}-thr{}".format(*c))
def test_router_kernel_matches_reference(case, dtype, poisoned):
    T, D, NR, k, gate, weighting, with_bias, threshold = case
    x = torch.randn(T, D).to(dtype)
    wr = (torch.randn(NR, D) * 2 / D**0.5).to(dtype)
    bias = torch.randn(NR) * 0.05 if with_bias else None
    idx, w, p = tk.sparse_ffn_route(x, wr, k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    ri, rw, rp = route_ref(x, wr, k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    assert torch.equal(idx, ri)
    assert (w - rw).abs().max() < 1e-6 and (p - rp).abs().max() < 1e-6
    if threshold is not None:
        assert (idx < 0).any() and torch.all(w[idx < 0] == 0)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("case", [c for c in ROUTER_CASES if c[1] >= 24], ids=lambda c: "T{}-D{}-NR{}-k{}".format(*c[:4]))
def test_router_split_logits_match_reference(case, splits, poisoned):
    """The few-token path: logits in d_model slices (uneven last slice at D40/splits 3), summed by the
    router kernel; same routing as the one-kernel path and the reference."""
    T, D, NR, k, gate, weighting, with_bias, threshold = case
    x = torch.randn(T, D)
    wr = torch.randn(NR, D) * 2 / D**0.5
    bias = torch.randn(NR) * 0.05 if with_bias else None
    kw = dict(k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold, block_d=16)
    idx, w, p = tk.sparse_ffn_route(x, wr, splits=splits, **kw)
    i1, w1, p1 = tk.sparse_ffn_route(x, wr, splits=1, **kw)
    ri, rw, rp = route_ref(x, wr, k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    assert torch.equal(idx, ri) and torch.equal(idx, i1)
    assert (w - rw).abs().max() < 1e-6 and (p - rp).abs().max() < 1e-6
    for bad in (0, tk.ROUTER_MAX_SPLITS + 1):
        with pytest.raises(ValueError, match="splits"):
            tk.sparse_ffn_route(x, wr, splits=bad, **kw)


@pytest.mark.parametrize("splits", [3, 7])
@pytest.mark.parametrize("case", [c for c in ROUTER_CASES if c[1] >= 24], ids=lambda c: "T{}-D{}-NR{}-k{}".format(*c[:4]))
def test_router_split_early_weight_tile_matches_reference(case, splits, poisoned, monkeypatch):
    """ROUTER_EARLY_W: each slice's router-weight tile loaded in one piece (before the PDL wait on a GPU), the slice
    one dot (uneven last slice, a tile wider than its slice): the routing of the loop over BLOCK_D tiles and of the
    reference; a slice wider than ROUTER_EARLY_W_MAX_D keeps the loop."""
    T, D, NR, k, gate, weighting, with_bias, threshold = case
    x = torch.randn(T, D)
    wr = torch.randn(NR, D) * 2 / D**0.5
    bias = torch.randn(NR) * 0.05 if with_bias else None
    kw = dict(k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold, block_d=16, splits=splits)
    monkeypatch.setattr(tk, "ROUTER_EARLY_W", False)
    loop = tk.sparse_ffn_route(x, wr, **kw)
    monkeypatch.setattr(tk, "ROUTER_EARLY_W", True)
    early = tk.sparse_ffn_route(x, wr, **kw)
    ri, rw, rp = route_ref(x, wr, k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    assert torch.equal(early[0], ri) and torch.equal(early[0], loop[0])
    assert (early[1] - rw).abs().max() < 1e-6 and (early[2] - rp).abs().max() < 1e-6
    monkeypatch.setattr(tk, "ROUTER_EARLY_W_MAX_D", 8)
    assert all(torch.equal(a, b) for a, b in zip(tk.sparse_ffn_route(x, wr, **kw), loop))


@pytest.mark.parametrize("select", ["rank", "sort"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", ROUTER_CASES, ids=lambda c: "T{}-D{}-NR{}-k{}-{}-{}-bias{}-thr{}".format(*c))
def test_router_rank_select_matches_reference(case, dtype, select, poisoned):
    """select="rank" (top-k by one compare-and-count, 2 tokens per program, logits from the split
    kernel even in one slice) and select="sort" (the same from one sort of (score, index) keys): the
    reference's idx, weights and probs, and the loop's idx."""
    T, D, NR, k, gate, weighting, with_bias, threshold = case
    x = torch.randn(T, D).to(dtype)
    wr = (torch.randn(NR, D) * 2 / D**0.5).to(dtype)
    bias = torch.randn(NR) * 0.05 if with_bias else None
    kw = dict(k=k, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    for splits in (1, 2):
        idx, w, p = tk.sparse_ffn_route(x, wr, select=select, splits=splits, block_d=16, **kw)
        ri, rw, rp = route_ref(x, wr, **kw)
        assert torch.equal(idx, ri)
        assert (w - rw).abs().max() < 1e-6 and (p - rp).abs().max() < 1e-6
    assert torch.equal(idx, tk.sparse_ffn_route(x, wr, select="loop", **kw)[0])
    assert torch.equal(idx, tk.sparse_ffn_route(x, wr, **kw)[0])  # "auto": either selection
    with pytest.raises(ValueError, match="select must be one of"):
        tk.sparse_ffn_route(x, wr, select="heap", **kw)


@pytest.mark.parametrize("select", ["rank", "sort"])
def test_router_rank_select_ties_and_nan_rows(select, poisoned):
    """Equal scores go to the lower block; a token whose logits are NaN gets the reference's routing
    (torch.sort puts NaN first and a NaN slot is empty), its neighbours are unaffected."""
    x = torch.randn(5, 16)
    wr = torch.zeros(10, 16)
    wr[7] = wr[3] = torch.randn(16)
    x[2, 4] = float("nan")
    kw = dict(k=4, gate="sigmoid", weighting="gate")
    idx, w, p = tk.sparse_ffn_route(x, wr, select=select, **kw)
    ri, rw, rp = route_ref(x, wr, **kw)
    assert torch.equal(idx, ri)
    ok = torch.arange(5) != 2
    assert (w[ok] - rw[ok]).abs().max() < 1e-6 and (p[ok] - rp[ok]).abs().max() < 1e-6
    assert (idx[2] == -1).all()
    # one NaN score among finite ones (a NaN in the selection bias): it sorts first, so slot 0 is empty
    bias = torch.zeros(10)
    bias[5] = float("nan")
    idx, _, _ = tk.sparse_ffn_route(x[ok], wr, select=select, bias=bias, **kw)
    ri, _, _ = route_ref(x[ok], wr, bias=bias, **kw)
    assert torch.equal(idx, ri) and (idx[:, 0] == -1).all() and (idx[:, 1:] >= 0).all()


@pytest.mark.parametrize("select", ["rank", "sort"])
def test_router_select_signed_zeros_infinities_and_nans(select, poisoned):
    """Scores set through the selection bias on zero logits (sigmoid gate 0.5 everywhere): many equal +0.0 scores
    (the lower index first), +inf and large finite scores lead, -inf never selects (an empty slot), NaN sorts
    first and leaves its slot empty, negative-signed NaN bits too. The reference's idx and weights."""
    NR, k = 12, 6
    x = torch.zeros(3, 16)
    wr = torch.zeros(NR, 16)
    nan_neg = torch.tensor([0xFFC00000], dtype=torch.int64).to(torch.int32).view(torch.float32)[0].item()
    biases = [
        [-0.5, -0.5, -0.5, -0.5, 0.0, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5],  # eleven scores of 0.5 - 0.5 = 0
        [float("-inf")] * 9 + [1.0, float("inf"), 2.0],  # only 3 selectable: 3 empty slots
        [0.1, float("nan"), -1.0, nan_neg, 3.0, float("-inf"), 0.2, 0.2, -0.0, 0.0, 1e30, -1e30],
    ]
    for b in biases:
        bias = torch.tensor(b, dtype=torch.float32)
        kw = dict(k=k, gate="sigmoid", weighting="gate", bias=bias)
        idx, w, _ = tk.sparse_ffn_route(x, wr, select=select, **kw)
        ri, rw, _ = route_ref(x, wr, **kw)
        assert torch.equal(idx, ri), (b, idx, ri)
        assert (w - rw).abs().max() < 1e-6


def test_router_kernel_ties_go_to_the_lower_index(poisoned):
    x = torch.randn(9, 16)
    wr = torch.zeros(10, 16)
    wr[7] = wr[3] = torch.randn(16)  # two identical rows: identical scores
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=4, gate="softmax", weighting="gate")
    ri, rw, _ = route_ref(x, wr, k=4, gate="softmax", weighting="gate")
    assert torch.equal(idx, ri)
    for row in idx.tolist():  # block 7 scores exactly like block 3, so it may only follow it
        assert 7 not in row or (3 in row and row.index(3) < row.index(7))


def test_grouping_covers_every_pair_once():
    T, KT, NB, bm = 23, 5, 9, 4
    blocks = torch.randint(0, NB, (T, KT), dtype=torch.int32)
    blocks[::3, -1] = -1  # empty slots
    g = tk.group_pairs(blocks, NB, bm)
    flat = blocks.reshape(-1).long()
    n_valid = int((flat >= 0).sum())
    assert int(g.offsets[-1]) == n_valid
    sorted_blocks = flat[g.order][:n_valid]
    assert torch.all(sorted_blocks[1:] >= sorted_blocks[:-1])
    assert torch.equal(g.sorted_tok.long(), g.order // KT)
    for b in range(NB):
        assert torch.all(sorted_blocks[int(g.offsets[b]):int(g.offsets[b + 1])] == b)
    valid = blocks >= 0
    assert torch.equal(g.order[g.inv[valid]], torch.nonzero(valid.reshape(-1)).squeeze(1))
    assert torch.all(g.inv[~valid] == -1)
    covered = torch.zeros(n_valid, dtype=torch.int64)
    for tb, ts in zip(g.tile_block.tolist(), g.tile_start.tolist()):
        if tb < NB:
            end = min(ts + bm, int(g.offsets[tb + 1]))
            covered[ts:end] += 1
    assert torch.all(covered == 1)


ROUTE_PAIRS_CASES = [
    # (T, k routed, n_blocks, shared, block_m, what)
    (23, 5, 9, 0, 4, "plain"),
    (1, 1, 8, 0, 16, "one pair"),
    (300, 19, 64, 0, 128, "the issue's 64 blocks, several chunks"),
    (1800, 19, 64, 0, 128, "over 1024 chunks (two scan steps)"),
    (37, 6, 12, 2, 8, "shared blocks"),
    (50, 3, 8, 0, 16, "empty and invalid ids"),
    (40, 4, 64, 0, 16, "all tokens in one block"),
    (17, 0, 8, 3, 4, "shared blocks only"),
    (0, 4, 8, 1, 16, "no tokens"),
    (9, 2, 300, 0, 16, "300 blocks (512 buckets)"),
]


@pytest.mark.parametrize("case", ROUTE_PAIRS_CASES, ids=lambda c: c[-1].replace(" ", "_"))
def test_route_pairs_kernels_equal_the_torch_grouping(case, poisoned):
    """route_pairs (three kernels) against full_routing + group_pairs (torch): every field bit for bit, the
    weights in flat and sorted order; the count / place programs' chunks split ties across them."""
    from deepseek_kernels.ops._registry import interpreting

    T, k, NB, S, bm, what = case
    gen = torch.Generator(device="cpu").manual_seed(T * 1000 + k)
    NR = NB - S
    dev = "cpu" if interpreting() else "cuda"  # CPU tensors under the interpreter, else the GPU's
    idx = torch.stack([torch.randperm(NR, generator=gen, device="cpu")[:k] for _ in range(T)]
                      or [torch.empty(0, k, device="cpu")])
    idx = idx.to(torch.int32).reshape(T, k).to(dev)
    w = torch.rand(T, k, generator=gen, device="cpu").to(dev)
    if what == "empty and invalid ids":
        idx[::3, -1] = -1
        idx[1::7, 0] = NR + 5  # past the routed blocks
        idx[2::11, 1] = -9  # below -1
    if what == "all tokens in one block":
        idx[:, 0] = 7
        idx[:, 1:] = -1
    g, w_full, w_sorted = tk.route_pairs(idx, w, S, NB, bm)
    blocks, w_ref = tk.full_routing(idx, w, S)
    ref = tk.group_pairs(blocks, NB, bm)
    for name in ("sorted_tok", "order", "inv", "offsets", "tile_block", "tile_start", "tile_count"):
        got, want = getattr(g, name), getattr(ref, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert torch.equal(w_full, w_ref)
    assert torch.equal(w_sorted, w_ref.reshape(-1)[ref.order])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grads", ["weights", "probs", "both"])
@pytest.mark.parametrize("gate", ["sigmoid", "softmax"])
def test_route_backward_kernel_matches_the_torch_form(gate, grads, dtype, monkeypatch):
    """The router's backward with dlogits from _route_bwd_kernel against the torch form it replaced: dx and the
    router weight's gradient, empty slots included, from the weights' gradient, the probs' (aux loss) or both."""
    from types import SimpleNamespace

    from deepseek_kernels.ops import sparse_ffn as ops_sf

    T, NR, k, D = 37, 12, 4, 16
    x = torch.randn(T, D).to(dtype)
    wr = torch.randn(NR, D).to(dtype)
    logits = x.float() @ wr.float().t()
    probs = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, -1)
    idx = torch.topk(probs, k).indices.to(torch.int32)
    idx[::5, -1] = -1  # empty slots
    chosen = probs.gather(1, idx.long().clamp_min(0)) * (idx >= 0)
    weights = chosen / chosen.sum(-1, keepdim=True)
    gw = torch.randn(T, k) if grads != "probs" else None
    gp = torch.randn(T, NR) if grads != "weights" else None
    ctx = SimpleNamespace(saved_tensors=(x, wr, idx, weights, probs), gate=gate, weighting="gate")
    assert ops_sf._use_triton(probs)  # the kernel path (the interpreter on CPU, CUDA on a GPU)
    got = ops_sf._route_backward(ctx, gw, gp, None)
    monkeypatch.setattr(ops_sf, "_use_triton", lambda t: False)
    want = ops_sf._route_backward(ctx, gw, gp, None)
    for a, b in zip(got[:2], want[:2]):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape
        assert rel(a, b) < (1e-5 if dtype == torch.float32 else 1e-2), (rel(a, b), grads)
        assert b.abs().max() > 0


FFN_CASES = [
    # (T, D, d_ff, n_blocks, shared, k, threshold-like empty slots, tiles)
    (1, 16, 64, 8, 0, 1, False, None),
    (17, 24, 64, 8, 0, 3, False, None),
    (29, 40, 120, 8, 2, 6, False, None),               # every block, 15-neuron blocks
    (100, 16, 128, 8, 1, 2, False, dict(block_m=16)),  # many row tiles per block
    (13, 32, 128, 64, 0, 19, False, None),             # 64 blocks of 2 neurons
    (11, 16, 96, 8, 1, 4, True, None),                 # empty slots
]


def ffn_id(c):
    return "T{}-D{}-F{}-NB{}-S{}-k{}-{}-{}".format(*c[:6], "empty" if c[6] else "full", "tiles16" if c[7] else "auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", FFN_CASES, ids=ffn_id)
def test_ffn_kernels_match_reference(case, dtype, poisoned):
    T, D, F_, NB, S, k, empty_slots, tiles = case
    x = torch.randn(T, D).to(dtype)
    wg, wu = ((torch.randn(F_, D) / D**0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(D, F_) / F_**0.5).to(dtype)
    scores = torch.rand(T, NB - S)
    idx = torch.sort(scores, dim=-1, descending=True).indices[:, :k].to(torch.int32)
    w = torch.rand(T, k) + 0.1
    if empty_slots:
        idx[::2, -2:] = -1
        w[::2, -2:] = 0
    out, act, g = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, **(tiles or {}))
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB,
                                shared_blocks=S)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]
    # the saved pre-activations, row by row in the grouped layout
    n_valid = int(g.offsets[-1])
    blocks, _ = tk.full_routing(idx, w, S)
    blk = blocks.reshape(-1)[g.order][:n_valid].long()
    tok = g.sorted_tok[:n_valid].long()
    BS = F_ // NB
    a_ref = (x.double() @ wg.double().t()).view(T, NB, BS)[tok, blk]
    u_ref = (x.double() @ wu.double().t()).view(T, NB, BS)[tok, blk]
    assert rel(act[:n_valid, 0], a_ref) < TOL[dtype] and rel(act[:n_valid, 1], u_ref) < TOL[dtype]


def _ffn_inputs(case, dtype):
    T, D, F_, NB, S, k, empty_slots, _ = case
    x = torch.randn(T, D).to(dtype)
    wg, wu = ((torch.randn(F_, D) / D**0.5).to(dtype) for _ in range(2))
    wd = (torch.randn(D, F_) / F_**0.5).to(dtype)
    idx = torch.sort(torch.rand(T, NB - S), dim=-1, descending=True).indices[:, :k].to(torch.int32)
    w = torch.rand(T, k) + 0.1
    if empty_slots:
        idx[::2, -2:] = -1
        w[::2, -2:] = 0
    return x, wg, wu, wd, idx, w


# one dtype per case keeps the interpreter time down; both dtypes are covered
BWD_CASES = [(FFN_CASES[1], torch.float32), (FFN_CASES[2], torch.float16), (FFN_CASES[3], torch.float32),
             (FFN_CASES[4], torch.float16), (FFN_CASES[5], torch.float32)]


@pytest.mark.parametrize("case,dtype", BWD_CASES, ids=lambda c: ffn_id(c) if isinstance(c, tuple) else str(c))
def test_backward_kernels_match_reference(case, dtype, poisoned):
    """dx, the three weight gradients and the routing-weight gradient against float64 autograd
    through the reference (the kernels take the forward's saved pre-activations)."""
    T, D, F_, NB, S, k, _, tiles = case
    x, wg, wu, wd, idx, w = _ffn_inputs(case, dtype)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, **(tiles or {}))
    go = torch.randn(T, D).to(dtype)
    got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, shared_blocks=S, n_blocks=NB, **(tiles or {}))
    refs = [t.double().requires_grad_(True) for t in (x, wg, wu, wd, w)]
    sparse_ffn_blocks_ref(*refs[:4], idx, refs[4], n_blocks=NB, shared_blocks=S).backward(go.double())
    for name, a, r in zip(("dx", "dW_gate", "dW_up", "dW_down", "dweights"), got, refs):
        assert a.shape == r.shape and torch.isfinite(a).all(), name
        assert rel(a, r.grad) < 4 * TOL[dtype], (name, rel(a, r.grad))
    assert got[0].dtype == dtype and got[4].dtype == torch.float32
    if case[6]:  # empty slots get no routing-weight gradient
        assert torch.all(got[4][idx < 0] == 0)


def test_large_batch_defaults_are_per_kernel():
    """The tuned T >= 4096 defaults carry per-kernel entries: they reach their kernels, the others
    keep the shared settings, and a scalar override still applies to every kernel."""
    bm, kc = tk.resolve_config(tk.launch_config(8192, 4096, 224), tk.FWD_KERNELS)
    assert bm == 128
    assert kc["gate_up"] == dict(block_n=128, block_k=64, num_warps=8, num_stages=3, cols_first=True, sm90=True)
    assert kc["down"] == dict(block_n=128, block_k=32, num_warps=4, num_stages=4, tma=True, sm90=True, programs=None,
                              programs_per_sm=2, cols_first=True)
    # the combine sums whole 4096-column token rows per program (session 35)
    assert kc["combine"] == dict(block_n=4096, block_k=64, num_warps=4, num_stages=None)
    bm, kc = tk.resolve_config(tk.launch_config(8192, 4096, 224), tk.FWD_KERNELS, num_warps=2,
                               config={"down": {"block_k": 32}})
    assert all(c["num_warps"] == 2 for c in kc.values()) and kc["down"]["block_k"] == 32
    bm, kc = tk.resolve_config(tk.bwd_launch_config(8192, 4096, 224), tk.BWD_KERNELS)
    assert bm == 128 and kc["dact"]["block_n"] == 128 and kc["dact"]["split_epilogue"] and kc["dact"]["cols_first"]
    assert kc["dact"]["full_block"] and kc["dact"]["block_k"] == 64 and kc["dact"]["num_stages"] == 3
    assert kc["dact"]["sm90"]
    assert kc["dx"] == dict(block_n=256, block_k=32, num_warps=8, num_stages=3, tma=True, sm90=True, programs=None,
                            programs_per_sm=1, cols_first=True)
    assert kc["dw_gate_up"]["d_group"] == 4 and kc["dw_down"]["d_group"] == 8
    assert kc["dw_gate_up"]["sm90"] and kc["dw_down"]["sm90"]
    assert kc["dw_gate_up"]["pieces"] and kc["dw_down"]["pieces"]  # session 33: the pieces forms by default
    # GPUs with less shared memory per SM than Hopper: the mid-size tiles at every batch size
    assert tk.launch_config(8192, 4096, 224, wide=False) == tk.launch_config(1000, 4096, 224)
    assert tk.bwd_launch_config(8192, 4096, 224, wide=False) == tk.bwd_launch_config(1000, 4096, 224)
    assert big_shared_memory(torch.device("cpu"))
    # below 4096 tokens: the shared first guess for every kernel
    bm, kc = tk.resolve_config(tk.launch_config(1000, 4096, 224), tk.FWD_KERNELS)
    assert bm == 64 and all(c["block_n"] == 64 and c["num_stages"] is None for c in kc.values())


def test_zero_tail_rows_kernel():
    """The rows of empty slots (sorted after the last block, written by no kernel) become zeros in dact and hw before
    the Gluon dW kernels read them as K rows; the blocks' rows stay as they were, and with no empty slot nothing
    is written."""
    from deepseek_kernels.ops._registry import interpreting

    dev = "cpu" if interpreting() else "cuda"
    P, BS, NB = 150, 24, 4
    for start in (97, P):
        dact = torch.randn(P, 2, BS, device=dev, dtype=torch.float16)
        dact[start:] = float("nan")
        hw = torch.randn(P, BS, device=dev, dtype=torch.float16)
        hw[start:] = float("inf")
        keep_d, keep_h = dact[:start].clone(), hw[:start].clone()
        offsets = torch.tensor([0, 10, 40, 60, start], device=dev, dtype=torch.int32)
        tk._zero_tail_rows_kernel[((P + 63) // 64,)](dact, hw, offsets, P, NB, BS, BLOCK_R=64, BLOCK_C=64)
        assert torch.equal(dact[:start], keep_d) and torch.equal(hw[:start], keep_h)
        assert (dact[start:] == 0).all() and (hw[start:] == 0).all()


def test_tma_kernels_decline_tracing_stand_ins():
    """While torch.compile traces the op its tensors are fake (no data pointer): the TMA checks decline (the
    plain kernels run) instead of raising; real tensors of the same shapes are accepted."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from deepseek_kernels.ops._registry import interpreting

    dev = "cpu" if interpreting() else "cuda"  # CPU tensors: under the interpreter (conftest); else the H200's

    def args():
        h = torch.empty(8, 224, dtype=torch.float16, device=dev)
        wd = torch.empty(64, 448, dtype=torch.float16, device=dev)
        dact = torch.empty(8, 2, 224, dtype=torch.float16, device=dev)
        wg = torch.empty(448, 64, dtype=torch.float16, device=dev)
        return (h, wd, 32), (dact, wg, wg.clone(), 32)

    real_down, real_dx = args()
    with FakeTensorMode():
        fake_down, fake_dx = args()
    assert tk._down_tma_ok(*real_down) and tk._dx_tma_ok(*real_dx)
    assert not tk._down_tma_ok(*fake_down) and not tk._dx_tma_ok(*fake_dx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_down_tma_kernel_matches_the_pointer_kernel(dtype, poisoned, monkeypatch):
    """down.tma (the T >= 4096 default on Hopper): the persistent TMA down projection gives the pointer
    kernel's forward; h rows of the next block (and unwritten rows past the last block: NaN here) only reach
    rows it does not store; a column tile past D and a K tile per 16 neurons; fewer programs than tiles (each
    walks several)."""
    T, D, F_, NB, S, k = 29, 40, 128, 8, 2, 3  # blocks of 16 neurons
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, True, None), dtype)
    kw = dict(shared_blocks=S, n_blocks=NB)
    want, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    cfg = {"block_m": 16, "down": dict(block_n=32, block_k=16, tma=True, programs=3)}
    h = torch.zeros(1, F_ // NB, dtype=dtype)
    assert tk._down_tma_ok(h, wd, 16) and not tk._down_tma_ok(h, wd, 32)  # 16 neurons: K tiles of 16 only
    assert not tk._down_tma_ok(h, wd.t().contiguous().t(), 16)  # neuron-major w_down: the pointer kernel
    launches = []
    real = tk._down_tma
    monkeypatch.setattr(tk, "_down_tma", lambda *a: (launches.append(1), real(*a)))
    got, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)
    assert launches == [1] and not got.isnan().any()
    assert rel(got, want) < TOL[dtype]
    # block_k 32 does not divide the 16-neuron blocks: the pointer kernel runs, the same result
    cfg["down"]["block_k"] = 32
    assert rel(tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)[0], want) < TOL[dtype]
    assert launches == [1]


def test_k_pieces():
    assert tk.k_pieces(224) == (128, 64, 32) and tk.k_pieces(112) == (64, 32, 16) and tk.k_pieces(48) == (32, 16, 0)
    assert tk.k_pieces(256) == (256, 0, 0)
    assert tk.k_pieces(240) is None and tk.k_pieces(24) is None and tk.k_pieces(0) is None  # 4 pieces; a piece of 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_dx_tma_kernel_matches_the_pointer_kernel(dtype, poisoned, monkeypatch):
    """dx.tma (the T >= 4096 default on Hopper): the persistent TMA dx kernel gives the pointer kernel's
    gradients (K tiles of 8 and 16 over 16-neuron blocks: da never reads du's columns; a column tile past D;
    3 programs)."""
    T, D, F_, NB, S, k = 29, 40, 128, 8, 2, 3
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, True, None), dtype)
    kw = dict(shared_blocks=S, n_blocks=NB)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    go = torch.randn(T, D).to(dtype)
    cfg = {"block_m": 16, "dx": dict(block_n=32, block_k=16)}
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
    launches = []
    real = tk._dx_tma
    monkeypatch.setattr(tk, "_dx_tma", lambda *a: (launches.append(1), real(*a)))
    from deepseek_kernels.ops._registry import interpreting

    bks = (8, 16) if interpreting() else (16,)  # a GPU's tensor-core dots need K tiles of 16 or more
    for bk in bks:
        cfg["dx"] = dict(block_n=32, block_k=bk, tma=True, programs=3)
        got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
        for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down", "dweights"), got, want):
            assert not a.isnan().any() and rel(a, b) < TOL[dtype], name
    assert launches == [1] * len(bks)
    # a K tile that does not divide the blocks: the pointer kernel
    cfg["dx"]["block_k"] = 32
    tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
    assert launches == [1] * len(bks)


def test_tile_orders_give_the_same_bits(poisoned):
    """cols_first (the column tiles of a row tile together) and d_group (the weight-gradient kernels walking a
    group of model-column tiles for every block) only reorder the programs: every output bit is the same.
    Model columns in 3 tiles and d_group 2: the last group has a program past D that stores nothing."""
    case = (29, 48, 120, 8, 2, 3, True, None)  # 15-neuron blocks: every tile masks
    T, D, F_, NB, S, k, _, _ = case
    x, wg, wu, wd, idx, w = _ffn_inputs(case, torch.float32)
    kw = dict(shared_blocks=S, n_blocks=NB)
    base = {"block_m": 16, "gate_up": dict(block_n=8), "down": dict(block_n=16)}
    out, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=base, **kw)
    cols = {"block_m": 16, "gate_up": dict(block_n=8, cols_first=True), "down": dict(block_n=16, cols_first=True)}
    out2, act2, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cols, **kw)
    assert torch.equal(out2, out)
    torch.testing.assert_close(act2, act, rtol=0, atol=0, equal_nan=True)  # empty slots' rows: never written
    go = torch.randn(T, D)
    bwd = {"block_m": 16, "dact": dict(block_n=8), "dx": dict(block_n=16), "dw_gate_up": dict(block_n=16),
           "dw_down": dict(block_n=16)}
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=bwd, **kw)
    ordered = {"block_m": 16, "dact": dict(block_n=8, cols_first=True), "dx": dict(block_n=16, cols_first=True),
               "dw_gate_up": dict(block_n=16, d_group=2), "dw_down": dict(block_n=16, d_group=2)}
    got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=ordered, **kw)
    for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down", "dweights"), got, want):
        assert torch.equal(a, b), name


def test_combine_tiles():
    """(tokens, columns) per combine program: whole rows up to 4096 columns, tokens filling 4096 outputs (<= 16);
    a config's block_n keeps its width."""
    assert tk.combine_tiles(4096) == (1, 4096) and tk.combine_tiles(7168) == (1, 4096)
    assert tk.combine_tiles(512) == (8, 512) and tk.combine_tiles(40) == (16, 64) and tk.combine_tiles(1) == (16, 16)
    assert tk.combine_tiles(4096, 64) == (16, 64) and tk.combine_tiles(100, 2048) == (2, 2048)
    _, kc = tk.resolve_config(tk.bwd_launch_config(8192, 7168, 256), tk.BWD_KERNELS)
    assert kc["combine"]["block_n"] == 4096 and kc["combine"]["num_warps"] == 4


@pytest.mark.parametrize("d", [40, 64])
@pytest.mark.parametrize("tiles", [(1, 64), (2, 32), (16, 64)], ids=lambda t: "{}x{}".format(*t))
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_kernel_at_every_tile_shape(d, tiles, weighted, poisoned):
    """The combine at one token per program (the large-batch tiles: whole rows), a few, and 16: the weighted
    (or plain) sum of each token's rows in fp32, an empty slot (-1) skipped, an invalid block id (-2) a NaN row,
    every output written (poisoned memory)."""
    import triton

    T, KT = 7, 3
    P = T * KT
    y = torch.randn(P, d)
    inv = torch.randperm(P).view(T, KT)
    inv[1, 2] = -1
    inv[4, 0] = -2
    w = torch.rand(T, KT)
    # on y's device: a bare torch.empty under the poisoned fixture came back on the CPU on the H200
    out = torch.empty(T, d, device=y.device)
    bt, bn = tiles
    tk._sparse_ffn_combine_kernel[(triton.cdiv(T, bt), triton.cdiv(d, bn))](
        y, inv, w, out, T, d, KT, out.stride(0), WEIGHTED=weighted, BLOCK_T=bt, BLOCK_N=bn)
    want = torch.zeros(T, d)
    for t in range(T):
        for j in range(KT):
            if inv[t, j] >= 0:
                want[t] += (w[t, j] if weighted else 1.0) * y[inv[t, j]]
    assert torch.isnan(out[4]).all()
    keep = torch.arange(T) != 4
    torch.testing.assert_close(out[keep], want[keep], rtol=1e-6, atol=1e-6)


def test_per_kernel_launch_configs_give_the_same_results(poisoned):
    """What the tuner writes: a different tile shape per kernel (and block_m) must not change the
    forward beyond rounding, nor the backward's gradients; unknown kernels or keys are errors."""
    case = (29, 40, 120, 8, 2, 6, False, None)  # 15-neuron blocks: every tile shape masks
    T, D, F_, NB, S, k, _, _ = case
    x, wg, wu, wd, idx, w = _ffn_inputs(case, torch.float32)
    kw = dict(shared_blocks=S, n_blocks=NB)
    out, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    fwd_cfg = {"block_m": 32, "gate_up": dict(block_n=32, block_k=16, num_stages=2),
               "down": dict(block_n=16, block_k=32, num_warps=2), "combine": dict(block_n=32)}
    out2, act2, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=fwd_cfg, **kw)
    assert rel(out2, out) < 1e-5
    go = torch.randn(T, D)
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw)
    bwd_cfg = {"block_m": 32, "dact": dict(block_n=32, block_k=16), "dx": dict(block_n=16, block_k=32),
               "dw_gate_up": dict(block_n=32, block_k=16, num_stages=1), "dw_down": dict(block_n=16, block_k=32)}
    got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=bwd_cfg, **kw)
    for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down", "dweights"), got, want):
        assert rel(a, b) < 1e-5, name
    # dact's epilogue in two column halves: the same da / du / w_p h elements (the same bits for every
    # gradient but dweights, whose per-row sum now adds two half sums)
    split = {**bwd_cfg, "dact": dict(block_n=32, block_k=16, split_epilogue=True)}
    got_split = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=split, **kw)
    for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down"), got_split, got):
        assert torch.equal(a, b), name
    assert rel(got_split[4], got[4]) < 1e-6
    with pytest.raises(ValueError, match="unknown kernel"):
        tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config={"gateup": {}}, **kw)
    with pytest.raises(ValueError, match="unknown key"):
        tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config={"dx": {"BLOCK_N": 16}}, **kw)


@pytest.mark.parametrize("bs", [48, 112])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_full_block_dact_matches_the_tiled_kernel(bs, dtype, poisoned):
    """dact.full_block (the T >= 4096 default): every neuron of a block in one program as power-of-2 accumulators
    (48 = 32 + 16, 112 = 64 + 32 + 16) gives the tiled kernel's gradients (dx, dW_gate / dW_up from the same
    da / du, dW_down from the same w_p h, dweights from one row of partial sums). Empty slots and shared blocks
    included."""
    T, D, NB, S, k = 29, 40, 8, 2, 3
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, NB * bs, NB, S, k, True, None), dtype)
    kw = dict(shared_blocks=S, n_blocks=NB)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    go = torch.randn(T, D).to(dtype)
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config={"block_m": 16, "dact": dict(block_n=16,
                                                                                                  block_k=16)}, **kw)
    cfg = {"block_m": 16, "dact": dict(block_n=16, block_k=16, full_block=True)}
    got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
    for name, a, b in zip(("dx", "dW_gate", "dW_up", "dW_down", "dweights"), got, want):
        assert not a.isnan().any() and rel(a, b) < TOL[dtype], name


def test_full_block_dact_falls_back_without_a_split(poisoned):
    """24-neuron blocks have no split into powers of 2 >= 16: full_block takes the tiled kernel (same bits)."""
    T, D, NB, S, k = 19, 24, 8, 0, 2
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, NB * 24, NB, S, k, False, None), torch.float32)
    kw = dict(shared_blocks=S, n_blocks=NB)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    go = torch.randn(T, D)
    tiled = {"block_m": 16, "dact": dict(block_n=16, block_k=16)}
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=tiled, **kw)
    full = {"block_m": 16, "dact": dict(block_n=16, block_k=16, full_block=True)}
    for a, b in zip(tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=full, **kw), want):
        assert torch.equal(a, b)


def test_backward_is_deterministic_and_unused_blocks_get_zero_weight_grads(poisoned):
    T, D, F_, NB = 37, 16, 64, 8
    x, wg, wu, wd = torch.randn(T, D), torch.randn(F_, D) / 4, torch.randn(F_, D) / 4, torch.randn(D, F_) / 8
    idx = torch.randint(0, 5, (T, 2), dtype=torch.int32)  # blocks 5..7 unused
    idx[:, 1] = (idx[:, 0] + 1) % 5
    w = torch.rand(T, 2)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB)
    go = torch.randn(T, D)
    a = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, shared_blocks=0, n_blocks=NB)
    b = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, shared_blocks=0, n_blocks=NB)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert torch.all(a[1][5 * 8:] == 0) and torch.all(a[2][5 * 8:] == 0) and torch.all(a[3][:, 5 * 8:] == 0)


def test_invalid_block_ids_poison_only_their_tokens(poisoned):
    """The CUDA path skips the host-synchronising range check: an out-of-range id must not read or
    write memory, and its token's output (and dx) must be NaN, never a plausible value."""
    T, D, F_, NB = 9, 16, 64, 8
    x, wg, wu, wd = torch.randn(T, D), torch.randn(F_, D) / 4, torch.randn(F_, D) / 4, torch.randn(D, F_) / 8
    idx = torch.randint(0, NB - 2, (T, 2), dtype=torch.int32)  # routed ids 0..6 (7 routed blocks), +1 below
    idx[:, 1] = idx[:, 0] + 1
    w = torch.rand(T, 2)
    idx[2, 1], idx[5, 0] = NB - 1, -7  # shared_blocks=1: 7 routed blocks, so id 7 is out of range
    out, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=1, n_blocks=NB)
    bad = torch.zeros(T, dtype=torch.bool)
    bad[[2, 5]] = True
    assert torch.isnan(out[bad]).all() and torch.isfinite(out[~bad]).all()
    good = idx.clone()
    good[bad] = 0
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), good, w.double(), n_blocks=NB,
                                shared_blocks=1)
    assert rel(out[~bad], ref[~bad]) < 1e-5
    dx, *_, dweights = tk.sparse_ffn_bwd(torch.randn(T, D), x, wg, wu, wd, idx, w, act, shared_blocks=1, n_blocks=NB)
    assert torch.isnan(dx[bad]).all() and torch.isfinite(dx[~bad]).all() and torch.isfinite(dweights).all()


DECODE_CASES = [
    # (T, D, d_ff, n_blocks, shared, k, empty slots, dtype)
    (1, 24, 64, 8, 0, 3, False, torch.float32),
    (7, 40, 120, 8, 2, 3, True, torch.float32),    # shared blocks, 15-neuron blocks, empty slots
    (16, 32, 128, 64, 0, 10, False, torch.float16),  # 64 blocks, ratio 0.15, the most decode tokens
    (3, 16, 128, 8, 1, 7, False, torch.float16),   # every block
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "T{}-D{}-F{}-NB{}-S{}-k{}-{}-{}".format(
    *c[:6], "empty" if c[6] else "full", str(c[7])))
def test_decode_kernels_match_reference(case, poisoned):
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB)
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB,
                                shared_blocks=S)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("config", [
    {"gate_up": {"block_n": 32, "block_k": 16, "num_stages": 2}},
    {"down": {"block_n": 16, "block_k": 64, "num_warps": 2}},
    {"gate_up": {"block_n": 64}, "down": {"block_k": 128, "num_stages": 4}},
], ids=["gate_up", "down", "both"])
def test_decode_launch_configs_agree(config, poisoned):
    """The tiles the decode tuner sweeps (block sizes smaller and larger than a 15-neuron block,
    D not a multiple of block_k) give the reference's result; unknown names are rejected."""
    x, wg, wu, wd, idx, w = _ffn_inputs((5, 40, 120, 8, 1, 3, False, None), torch.float32)
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=8,
                                shared_blocks=1)
    out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=1, n_blocks=8, config=config)
    assert rel(out, ref) < TOL[torch.float32]
    with pytest.raises(ValueError, match="unknown kernel"):
        tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=1, n_blocks=8, config={"combine": {}})
    with pytest.raises(ValueError, match="unknown key"):
        tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=1, n_blocks=8, config={"down": {"block_q": 8}})


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: "T{}-D{}-F{}-NB{}-S{}-k{}-{}-{}".format(
    *c[:6], "empty" if c[6] else "full", str(c[7])))
def test_decode_down_splits_match_reference(case, poisoned):
    """The down projection in slices (``down.splits``, the default from 3 tokens: fp32 partials per slice of the (used
    block, K tile) pairs, summed in slice order by a finish kernel): the reference's result for slice
    counts below, at and above the number of pairs (empty slices write zeros), run to run identical."""
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB,
                                shared_blocks=S)
    for splits in (2, 5, 16):
        cfg = {"down": {"splits": splits, "block_k": 16}}
        out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel(out, ref) < TOL[dtype]
        assert torch.equal(out, tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg))
    # the default: one slice up to 2 tokens, 2 slices from 3 on (H200, sessions 15-17)
    assert [tk.decode_launch_config(t, D, F_ // NB)["down"]["splits"] for t in (1, 2, 3, 16)] == [1, 1, 2, 2]
    for bad in (0, 17):
        with pytest.raises(ValueError, match=r"down splits must be in \[1, 16\]"):
            tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config={"down": {"splits": bad}})


@pytest.mark.parametrize("case", DECODE_CASES + [(2, 32, 384, 8, 1, 2, True, torch.float32)],
                         ids=lambda c: "T{}-D{}-F{}-NB{}-S{}-{}".format(*c[:5], str(c[7])))
def test_decode_down_blocks_by_mask_give_the_same_bits(case, poisoned, monkeypatch):
    """DECODE_DOWN_BY_MASK (each pair's block the lowest set bit of a mask of the used blocks): the bits of the
    reduction per pair, with one and several K tiles per block, with and without the early first tile, over 8 and
    64 blocks (the last block always used: bit 63 of the mask at 64)."""
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    if not (idx == NB - S - 1).any():
        idx[0, 0] = NB - S - 1
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB,
                                shared_blocks=S)
    for cfg in ({"down": {"splits": 1}}, {"down": {"splits": 1, "block_k": 16}}):
        for early in (True, False):
            monkeypatch.setattr(tk, "DECODE_DOWN_EARLY_W", early)
            monkeypatch.setattr(tk, "DECODE_DOWN_BY_MASK", False)
            plain = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
            monkeypatch.setattr(tk, "DECODE_DOWN_BY_MASK", True)
            out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
            assert torch.isfinite(out).all() and torch.equal(out, plain), (cfg, early)
            assert rel(out, ref) < TOL[dtype]


@pytest.mark.parametrize("case", DECODE_CASES[:3], ids=lambda c: "T{}-NB{}-S{}".format(c[0], c[3], c[4]))
def test_decode_masked_h_rows_give_the_same_bits(case, poisoned, monkeypatch):
    """The down projection skips the loads of h's padding rows (tokens >= T of the dot's 16; DECODE_MASK_H_ROWS):
    the bits of the kernel that loads all 16 rows, in one kernel and in slices."""
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    assert tk.DECODE_MASK_H_ROWS
    for cfg in ({"down": {"splits": 1}}, {"down": {"splits": 2, "block_k": 16}}):
        masked = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
        monkeypatch.setattr(tk, "DECODE_MASK_H_ROWS", False)
        full = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
        monkeypatch.setattr(tk, "DECODE_MASK_H_ROWS", True)
        assert torch.isfinite(masked).all() and torch.equal(masked, full)


@pytest.mark.parametrize("case", DECODE_CASES[:2] + [(2, 32, 96, 2, 0, 1, False, torch.float32)],
                         ids=lambda c: "T{}-NB{}-S{}-BS{}".format(c[0], c[3], c[4], c[2] // c[3]))
def test_decode_down_early_w_tiles_give_the_same_bits(case, poisoned, monkeypatch):
    """The one-kernel down projection with its first w_down tile loaded up front (DECODE_DOWN_EARLY_W, the PDL
    prefetch): the bits of the plain loop, with several K tiles per block (48 neurons in 16-wide tiles) and with a
    single pair (one used block of one K tile)."""
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    for cfg in ({"down": {"splits": 1}}, {"down": {"splits": 1, "block_k": 16}}):
        monkeypatch.setattr(tk, "DECODE_DOWN_EARLY_W", False)
        plain = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
        monkeypatch.setattr(tk, "DECODE_DOWN_EARLY_W", True)
        out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB, config=cfg)
        assert torch.isfinite(out).all() and torch.equal(out, plain), cfg
    # a single used block with a single K tile: one pair in all
    idx1 = torch.full_like(idx, -1)
    idx1[:, 0] = 1
    monkeypatch.setattr(tk, "DECODE_DOWN_EARLY_W", False)
    plain = tk.sparse_ffn_decode(x, wg, wu, wd, idx1, w, shared_blocks=0, n_blocks=NB, config={"down": {"splits": 1}})
    monkeypatch.setattr(tk, "DECODE_DOWN_EARLY_W", True)
    out = tk.sparse_ffn_decode(x, wg, wu, wd, idx1, w, shared_blocks=0, n_blocks=NB, config={"down": {"splits": 1}})
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx1, w.double(), n_blocks=NB)
    assert torch.equal(out, plain) and rel(out, ref) < TOL[dtype]


def test_decode_stages_fit_the_shared_memory():
    """The decode defaults cut their pipeline stages to a device's shared memory per program for the operand
    size (fp32: twice bf16's bytes); bf16 keeps the tuned stages; without a limit (off CUDA) nothing changes."""
    from deepseek_kernels.triton import _common

    h200 = 232448  # the H200's opt-in limit per block
    tuned = tk.decode_launch_config(1, 4096, 224)
    assert tk.decode_launch_config(1, 4096, 224, 2, h200) == tuned and tuned["gate_up"]["num_stages"] == 8
    fp32 = tk.decode_launch_config(1, 4096, 224, 4, h200)
    gu, dn = fp32["gate_up"], fp32["down"]
    assert gu["num_stages"] == h200 // ((16 + 2 * 32) * 128 * 4) == 5  # 8 stages would need 320 KB
    assert dn["num_stages"] == 4 and (16 + 32) * 256 * 4 * dn["num_stages"] <= h200
    assert _common.shared_memory_limit(torch.device("cpu")) is None
    assert tk.decode_launch_config(1, 4096, 224, 4, None) == tuned
    assert _common.fit_stages(3, 10**6, h200) == 1  # never below one stage


@pytest.mark.parametrize("case", DECODE_CASES[:3], ids=lambda c: "T{}-D{}-F{}-NB{}-S{}".format(*c[:5]))
def test_decode_reads_w_down_in_either_layout(case, poisoned):
    """The decode kernels take w_down [d_model, d_ff] by its strides: a neuron-major copy (the same values stored
    [d_ff, d_model], seen through .t(): each block's down slice one contiguous slab, what tune_sparse_ffn.py
    --down-layout neuron-major times) gives the same bits as nn.Linear's layout, in one kernel and in slices, with
    column tiles wider than d_model."""
    T, D, F_, NB, S, k, empty_slots, dtype = case
    x, wg, wu, wd, idx, w = _ffn_inputs((T, D, F_, NB, S, k, empty_slots, None), dtype)
    wd_nm = wd.t().contiguous().t()
    assert wd_nm.stride() == (1, D) and torch.equal(wd_nm, wd)
    kw = dict(shared_blocks=S, n_blocks=NB)
    for cfg in (None, {"down": {"block_n": 64, "block_k": 16}}, {"down": {"block_n": 32, "block_k": 32, "splits": 3}}):
        want = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, config=cfg, **kw)
        assert torch.equal(tk.sparse_ffn_decode(x, wg, wu, wd_nm, idx, w, config=cfg, **kw), want), cfg


def test_prefill_reads_w_down_in_either_layout(poisoned):
    """The prefill forward and backward kernels take w_down by its strides too (a module storing it neuron-major for
    serving would train and prefill unchanged): the same output and gradients, bit for bit."""
    x, wg, wu, wd, idx, w = _ffn_inputs((9, 32, 128, 8, 1, 3, True, None), torch.float32)
    wd_nm = wd.t().contiguous().t()
    kw = dict(shared_blocks=1, n_blocks=8)
    out, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, save_act=True, **kw)
    out_nm, act_nm, _ = tk.sparse_ffn_fwd(x, wg, wu, wd_nm, idx, w, save_act=True, **kw)
    assert torch.equal(out_nm, out)
    go = torch.randn_like(out)
    for a, b in zip(tk.sparse_ffn_bwd(go, x, wg, wu, wd_nm, idx, w, act_nm, **kw),
                    tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T,S,gate,weighting,extra,splits", [
    (1, 0, "sigmoid", "gate", None, 1),
    (2, 0, "sigmoid", "gate", None, 3),
    (1, 2, "softmax", "none", "bias", 2),
    (2, 1, "sigmoid", "gate", "threshold", 4),
])
def test_route_decode_fused_matches_route_then_decode(T, S, gate, weighting, extra, splits):
    """The router's selection fused into the gate/up kernel (sparse_ffn_route_decode): idx, weights,
    probs and the output are the bits of sparse_ffn_route (sort select, same slices) followed by
    sparse_ffn_decode, and the reference's result; shared blocks, softmax / sigmoid gates, bias and
    threshold (some tokens then take fewer blocks: empty slots) included."""
    D, NR, k = 48, 10, 3
    F_ = 14 * (NR + S)  # blocks of 14 neurons
    torch.manual_seed(T * 10 + S)
    x = torch.randn(T, D)
    wr = torch.randn(NR, D) / D**0.5
    wg, wu = torch.randn(F_, D) / 4, torch.randn(F_, D) / 4
    wd = torch.randn(D, F_) / 8
    kw = dict(k=k, gate=gate, weighting=weighting,
              bias=torch.randn(NR) * 0.1 if extra == "bias" else None,
              threshold=0.5 if extra == "threshold" else None)
    idx, w, p = tk.sparse_ffn_route(x, wr, select="sort", splits=splits, **kw)
    want = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NR + S)
    out, idx2, w2, p2 = tk.sparse_ffn_route_decode(x, wr, wg, wu, wd, shared_blocks=S, splits=splits, **kw)
    assert torch.equal(idx2, idx) and torch.equal(w2, w) and torch.equal(p2, p)
    assert torch.equal(out, want)
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(),
                                n_blocks=NR + S, shared_blocks=S)  # the selection itself: test_router_* above
    assert rel(out, ref) < 1e-5
    with pytest.raises(ValueError, match="1 to 2 tokens"):
        tk.sparse_ffn_route_decode(torch.randn(3, D), wr, wg, wu, wd, shared_blocks=S, **kw)


def test_decode_gate_up_split_is_rejected():
    """The gate/up split over d_model (removed in session 8: slower at every slice count on the
    H200) is no longer a config key: passing it is an unknown-key error, not silently ignored."""
    x, wg, wu, wd, idx, w = _ffn_inputs((1, 40, 120, 8, 1, 3, False, None), torch.float32)
    assert "split" not in tk.decode_launch_config(1, 40, 15)["gate_up"]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['split'\]"):
        tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=1, n_blocks=8, config={"gate_up": {"split": 2}})


def test_decode_reads_only_used_blocks_and_poisons_invalid_ids(poisoned):
    """Weight slices of unused blocks are never read (NaN there changes nothing); a bad id gives NaN."""
    T, D, F_, NB = 4, 16, 64, 8
    x, wg, wu, wd = torch.randn(T, D), torch.randn(F_, D) / 4, torch.randn(F_, D) / 4, torch.randn(D, F_) / 8
    idx = torch.tensor([[0, 2], [2, 4], [4, 0], [0, 2]], dtype=torch.int32)
    w = torch.rand(T, 2)
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB)
    for b in (1, 3, 5, 6, 7):
        f = slice(b * 8, (b + 1) * 8)
        wg[f], wu[f], wd[:, f] = float("nan"), float("nan"), float("nan")
    for splits in (1, 3):  # the one-kernel down projection and the split one with its finish kernel
        cfg = {"down": {"splits": splits}}
        out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB, config=cfg)
        assert rel(out, ref) < 1e-5
        bad = idx.clone()
        bad[1, 1] = NB
        out = tk.sparse_ffn_decode(x, wg, wu, wd, bad, w, shared_blocks=0, n_blocks=NB, config=cfg)
        assert torch.isnan(out[1]).all() and rel(out[[0, 2, 3]], ref[[0, 2, 3]]) < 1e-5
    with pytest.raises(ValueError, match="at most 16 tokens"):
        tk.sparse_ffn_decode(torch.randn(17, D), wg, wu, wd, torch.zeros(17, 2, dtype=torch.int32), torch.ones(17, 2),
                             shared_blocks=0, n_blocks=NB)


def test_all_tokens_in_one_block(poisoned):
    T, D, F_, NB = 45, 16, 64, 8
    x = torch.randn(T, D)
    wg, wu, wd = torch.randn(F_, D) / 4, torch.randn(F_, D) / 4, torch.randn(D, F_) / 8
    idx = torch.full((T, 1), 6, dtype=torch.int32)
    w = torch.ones(T, 1)
    out, _, g = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=NB, block_m=16)
    assert g.offsets.tolist() == [0] * 7 + [T, T]
    ref = sparse_ffn_blocks_ref(x.double(), wg.double(), wu.double(), wd.double(), idx, w.double(), n_blocks=NB)
    assert rel(out, ref) < 1e-5


# ---- GPU (H200) ---------------------------------------------------------------------------------------


def _gpu_inputs(T, D, F_, NR, dtype, S=0):
    dev = "cuda"
    x = torch.randn(T, D, device=dev, dtype=dtype)
    wr = (torch.randn(NR, D, device=dev) * 2 / D**0.5).to(dtype)
    wg = (torch.randn(F_, D, device=dev) / D**0.5).to(dtype)
    wu = (torch.randn(F_, D, device=dev) / D**0.5).to(dtype)
    wd = (torch.randn(D, F_, device=dev) / F_**0.5).to(dtype)
    return x, wr, wg, wu, wd


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 1000, 4097])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_on_gpu(T, dtype):
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(T, 512, 2048, 64, dtype)
    assert dk.explain("gated_sparse_ffn", x).startswith("triton:")
    for ratio in (0.15, 0.3, 1.0):
        out = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=ratio)
        ref = gated_sparse_ffn_ref(x.float(), wr.float(), wg.float(), wu.float(), wd.float(), active_ratio=ratio)
        assert rel(out, ref) < TOL[dtype], ratio


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_forward_backward_on_gpu(dtype):
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(777, 256, 1024, 62, dtype)
    ours = [t.clone().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    out = dk.gated_sparse_ffn(*ours, active_ratio=0.3, shared_blocks=2, gate="sigmoid", weighting="gate")
    go = torch.randn_like(out)
    out.backward(go)
    refs = [t.detach().float().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    gated_sparse_ffn_ref(*refs, active_ratio=0.3, shared_blocks=2).backward(go.float())
    for a, b in zip(ours, refs):
        assert rel(a.grad, b.grad) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [None, 7])
def test_down_tma_on_gpu(programs, monkeypatch):
    """down.tma on the GPU (bf16, 4097 tokens: the large-batch tiles; 224-neuron blocks in K tiles of 32):
    the pointer kernel's forward within bf16 rounding, run to run identical; the defaults take it."""
    x, wr, wg, wu, wd = _gpu_inputs(4097, 1024, 14336, 64, torch.bfloat16)
    k = round(0.3 * 64)
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate")
    kw = dict(shared_blocks=0, n_blocks=64)
    want, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config={"down": {"tma": False}}, **kw)
    cfg = {"down": dict(block_n=128, block_k=32, num_warps=8, num_stages=4, tma=True, sm90=False, programs=programs)}
    assert tk._down_tma_ok(torch.empty(1, 224, device="cuda", dtype=torch.bfloat16), wd, 32)
    calls = _count_tma_launches(monkeypatch, "_down_tma")
    got, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)
    assert calls == ["triton"] and rel(got, want) < 1e-2
    assert torch.equal(got, tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=cfg, **kw)[0])
    calls.clear()
    default, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    assert calls == [_default_tma_kernel()] and rel(default, want) < 1e-2


def _sm90_case(T, monkeypatch, launcher: str, bs: int = 224):
    """The Gluon kernels' GPU tests' setup (skipped off sm_90): T tokens routed at ratio 0.3 over 64 blocks of
    ``bs`` neurons (d_model 1024), ``sparse_ffn_sm90.<launcher>`` counted into ``calls``, and every bf16 ``torch.empty``
    filled with NaN, so an output element no kernel writes shows. Returns (module, calls, (x, w_gate, w_up,
    w_down, idx, weights))."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    if torch.cuda.get_device_capability() != (9, 0) or not g9.HAVE_GLUON:
        pytest.skip("the Gluon kernels are for sm_90")
    x, wr, wg, wu, wd = _gpu_inputs(T, 1024, 64 * bs, 64, torch.bfloat16)
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=round(0.3 * 64), gate="sigmoid", weighting="gate")
    calls = []
    orig = getattr(g9, launcher)
    monkeypatch.setattr(g9, launcher, lambda *a, **k: calls.append(1) or orig(*a, **k))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: real_empty(*a, **k).fill_(float("nan"))
                        if k.get("dtype") == torch.bfloat16 else real_empty(*a, **k))
    return g9, calls, (x, wg, wu, wd, idx, w)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["down", "dx"])
@pytest.mark.parametrize("T", [4097, 300])
def test_sorted_rows_gemm_sm90_on_gpu(kernel, T, monkeypatch):
    """The Gluon forms of the down projection and dx (``sm90``, the T >= 4096 defaults on sm_90): the pointer
    kernels' results within bf16 rounding, every output row written (outputs start as NaN), run to run identical;
    at 4097 tokens through the defaults, at 300 (blocks of a few rows: row tiles mostly past their block's end)
    with 128-row tiles asked for. The two-half kernel (``sorted_rows_gemm_sm90``) and the A-resident one
    (``rows_gemm_ar_sm90``) give the same bits, the latter also at units of 7 column tiles (d_model 1024: 8 tiles
    of 128, so a unit of one tile, where the second warpgroup has none) and with a 2-slot ring; the former also
    at 128-wide tiles with a deeper ring (10 slots)."""
    g9, calls, (x, wg, wu, wd, idx, w) = _sm90_case(T, monkeypatch, "short_k_gemm_sm90")
    kw = dict(shared_blocks=0, n_blocks=64)
    cfg = {"block_m": 128, kernel: dict(block_k=32, tma=True, sm90=True)} if T < 4096 else {}
    plain = {kernel: {"tma": False}}
    go = torch.randn_like(x)

    act = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config={"block_m": 128}, **kw)[1]

    def run(config):
        if kernel == "down":
            return tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=config, **kw)[0]
        return tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=config, **kw)[0]

    want = run(plain)
    n0 = len(calls)
    got = run(cfg)
    assert len(calls) == n0 + 1 and not got.isnan().any() and rel(got, want) < 1e-2
    assert torch.equal(got, run(cfg))
    flag, ar_name = ("A_RESIDENT_DX", "AR_DX_CONFIG") if kernel == "dx" else ("A_RESIDENT_DOWN", "AR_DOWN_CONFIG")
    monkeypatch.setattr(g9, flag, False)  # the two-half kernel
    two_half = run(cfg)
    assert not two_half.isnan().any() and torch.equal(two_half, got)
    monkeypatch.setattr(g9, "CONFIG", dict(block_n=128, block_k=32, stages=10))
    narrow = run(cfg)
    assert not narrow.isnan().any() and rel(narrow, want) < 1e-2
    monkeypatch.setattr(g9, flag, True)  # the A-resident kernel
    base = dict(getattr(g9, ar_name))
    for change in ({}, {"unit_cols": 7}, {"stages": 2, "o_bufs": 1}):
        monkeypatch.setattr(g9, ar_name, {**base, **change})
        ar = run(cfg)
        assert not ar.isnan().any() and torch.equal(ar, got), f"the A-resident kernel {change} changed the bits"


# (tokens, block size, the tail pieces on): 224-neuron blocks' last column tile as 64 + 32 (gate/up; dact's second
# part likewise) or padded to 128; 192: one piece of 64; 176: 32 + 16
_TAIL_CASES = [(4097, 224, True), (300, 224, True), (4097, 224, False), (4097, 192, True), (300, 176, True)]
_TAIL_IDS = ["4097", "300", "4097-padded", "4097-bs192", "300-bs176"]


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["wide", "wide-narrow-pieces", "two-products"])
@pytest.mark.parametrize(("T", "bs", "tail"), _TAIL_CASES, ids=_TAIL_IDS)
def test_gate_up_sm90_on_gpu(T, bs, tail, form, monkeypatch):
    """The gathered Gluon gate/up (``gate_up.sm90``, the T >= 4096 default on sm_90 since session 31): h and the
    saved pre-activations of the Triton kernel within bf16 rounding, every row and neuron written (outputs start
    as NaN), run to run identical, with and without saving act; 300 tokens: most row tiles end past their
    block. A block's last column tile as pieces of its real neurons (``TAIL_PIECES``, session 33) or padded;
    whole tiles as one product over the merged gate / up weight tiles (``GATE_UP_WIDE``, session 36) or two; with
    the merged tiles, the pieces as one product each over their gate and up rows side by side
    (``GATE_UP_MERGED_PIECES``, session 38) or four narrow ones; the items in either program order
    (``GATE_UP_ROTATE``) and K steps of 32 (the gathers' layout narrower: no thread copies another's elements)
    give the same bits."""
    g9, calls, (x, wg, wu, wd, idx, w) = _sm90_case(T, monkeypatch, "gate_up_sm90", bs)
    monkeypatch.setattr(g9, "TAIL_PIECES", tail)
    monkeypatch.setattr(g9, "GATE_UP_WIDE", form != "two-products")
    monkeypatch.setattr(g9, "GATE_UP_MERGED_PIECES", form == "wide")
    assert (g9.tail_pieces(bs % 128) != (0, 0)) == tail
    kw = dict(shared_blocks=0, n_blocks=64)
    plain = {"block_m": 128, "gate_up": {"sm90": False}}
    gluon = {"block_m": 128, "gate_up": {"sm90": True}}
    want, want_act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=plain, **kw)
    got, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=gluon, **kw)
    assert calls == [1] and not got.isnan().any() and not act.isnan().any()
    assert rel(got, want) < 1e-2 and rel(act, want_act) < 1e-2
    again, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=gluon, **kw)
    assert torch.equal(got, again)
    no_act, _, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=gluon, save_act=False, **kw)
    assert torch.equal(no_act, got) and len(calls) == 3
    # the programs' items in the other order (GATE_UP_ROTATE, session 38), and K steps of 32 in 8 slots (the same
    # products in the same order): each item is computed as before
    for name, value in (("GATE_UP_ROTATE", not g9.GATE_UP_ROTATE),
                        ("GATE_UP_CONFIG", {**g9.GATE_UP_CONFIG, "block_k": 32, "stages": 8})):
        with monkeypatch.context() as m:
            m.setattr(g9, name, value)
            n0 = len(calls)
            other, other_act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config=gluon, **kw)
        assert len(calls) == n0 + 1 and torch.equal(other, got) and torch.equal(other_act, act), name


@pytest.mark.gpu
@pytest.mark.parametrize(("T", "bs", "tail"), _TAIL_CASES, ids=_TAIL_IDS)
def test_dact_sm90_on_gpu(T, bs, tail, monkeypatch):
    """The gathered Gluon dact (``dact.sm90``, session 31): every gradient (dx, dW gate/up/down, dweights) of the
    backward with the Triton full-block dact within bf16 rounding, dact and hw written for every row and neuron
    (they start as NaN and feed dx and the dW kernels), run to run identical; 300 tokens: most row tiles end past
    their block. Gate weights not 1, so a w_p mix-up shows. The block's second part as pieces or padded; the
    epilogue in its own partition from g staged in shared memory (session 36), its loads issued a part ahead
    (``DACT_EPI_PREFETCH``, session 38) or where used; K steps of 64 in 3 slots (session 38's) or 32 in 7 (session
    39's), the pieces' weights in boxes of their own (``DACT_SPLIT_BOXES``): the same bits."""
    g9, calls, (x, wg, wu, wd, idx, w) = _sm90_case(T, monkeypatch, "dact_sm90", bs)
    monkeypatch.setattr(g9, "TAIL_PIECES", tail)
    assert (g9.tail_pieces(bs - 128) != (0, 0)) == tail
    kw = dict(shared_blocks=0, n_blocks=64)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config={"block_m": 128}, **kw)
    go = torch.randn_like(x)
    args = (go, x, wg, wu, wd, idx, w, act)
    got = _bwd_gluon_vs_plain(args, kw, calls, "dact", plain={"sm90": False, "full_block": True})
    base = dict(g9.DACT_CONFIG)
    # (module settings, same bits?): the epilogue's loads where used; the other K step (the same products in the
    # same order: the same bits); the pieces' weights in boxes of their own, at either K step; the second part
    # padded for dact alone (within bf16 rounding of the pieces)
    other_k = {**base, "block_k": 64, "stages": 3} if base["block_k"] == 32 else {**base, "block_k": 32, "stages": 7}
    variants = [({"DACT_EPI_PREFETCH": not g9.DACT_EPI_PREFETCH}, True),
                ({"DACT_CONFIG": other_k}, True)]
    if tail:
        variants += [({"DACT_SPLIT_BOXES": not g9.DACT_SPLIT_BOXES}, True),
                     ({"DACT_SPLIT_BOXES": not g9.DACT_SPLIT_BOXES, "DACT_CONFIG": other_k}, True),
                     ({"DACT_TAIL_PIECES": False}, False)]
    for settings, same_bits in variants:
        with monkeypatch.context() as m:
            for name, value in settings.items():
                m.setattr(g9, name, value)
            n0 = len(calls)
            other = tk.sparse_ffn_bwd(*args, config={"block_m": 128, "dact": {"sm90": True}}, **kw)
        assert len(calls) == n0 + 1 and not any(t.isnan().any() for t in other), settings
        if same_bits:
            assert all(torch.equal(a, b) for a, b in zip(other, got)), settings
        else:
            assert all(rel(a, b) < 1e-2 for a, b in zip(other, got)), settings


def test_descriptor_layouts_cached():
    """The Gluon kernels' TMA descriptors take the default NVMMA layout of their box (cached per box and dtype:
    host time per training step), for bf16 and fp16, whatever the tensor."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    if not g9.HAVE_GLUON:
        pytest.skip("needs Triton's Gluon")
    gl = g9.gl
    for dt, gdt in ((torch.bfloat16, gl.bfloat16), (torch.float16, gl.float16)):
        for block in ([64, 128], [32, 256], [128, 64]):
            t = torch.empty(512, 1024, dtype=dt)
            d = g9._desc(t, block)
            assert d.layout == gl.NVMMASharedLayout.get_default_for(block, gdt)
            assert list(d.block_shape) == block and d.base is t and list(d.strides) == [1024, 1]
    assert g9._desc(torch.empty(64, 64, dtype=torch.float16), [64, 64]).layout.element_bitwidth == 16


def test_a_resident_settings():
    """The A-resident kernel's settings: the defaults where A fits beside them (224-neuron blocks: down with 8 ring
    slots per warpgroup, dx with 5, as the AOT check compiles them within sm_90's 227 KB), fewer slots where A is
    larger, none where the block is not whole K steps or A leaves no room for 2 slots."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    down, dx = g9.ar_config(224, False), g9.ar_config(224, True)
    assert down == g9.AR_DOWN_CONFIG and dx == g9.AR_DX_CONFIG
    assert g9.ar_smem_bytes(224, False, 128, 32, 8, 1) == 221184  # (the AOT check: 221824 B with the barriers)
    assert g9.ar_config(256, True)["stages"] == 4 and g9.ar_config(320, True)["stages"] == 2
    assert g9.ar_config(352, True) is None and g9.ar_config(176, False) is None
    for bs in range(32, 1025, 32):
        for dual in (False, True):
            c = g9.ar_config(bs, dual)
            assert c is None or g9.ar_smem_bytes(bs, dual, c["block_n"], c["block_k"], c["stages"],
                                                 c["o_bufs"]) + 1024 <= g9.SMEM_LIMIT


def test_dact_ring_fits():
    """dact's ring depth fits shared memory beside g's staging: 7 slots of K 32 at 224-neuron blocks as pieces
    (229816 B compiled) or split boxes (215512 B), 6 where the second part is padded (213384 B: g's staging holds
    128 + 128 + 16 columns) or a 256-neuron block; K 64 keeps its 3; never fewer than 2."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    assert g9.dact_stages(128, 32, 7, 64, 32, False) == 7 and g9.dact_stages(128, 32, 7, 64, 32, True) == 7
    assert g9.dact_stages(128, 32, 7, 0, 0, False) == 6 and g9.dact_stages(128, 32, 7, 128, 0, False) == 6
    assert g9.dact_stages(128, 64, 3, 64, 32, False) == 3 and g9.dact_stages(128, 64, 9, 0, 0, False) == 3
    assert g9.dact_stages(128, 256, 7, 0, 0, False) == 2
    c = g9.DACT_CONFIG
    assert g9.dact_stages(c["block_n"], c["block_k"], c["stages"], 64, 32, False) == c["stages"]


def test_dw_pieces_ring_fits():
    """The dW pieces kernel's ring depth fits shared memory: dW gate/up at 224-neuron blocks could keep 5 slots
    (229472 B compiled), dW down's 5 would not (233568 B: more scratch for its store), wider blocks get fewer; the
    defaults fit as they are."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    assert g9.dw_pieces_stages(224, 64, 5, transposed=True) == 5 and g9.dw_pieces_stages(224, 64, 5, False) == 4
    assert g9.dw_pieces_stages(256, 64, 5, True) == 4 and g9.dw_pieces_stages(176, 64, 4, False) == 4
    assert g9.dw_pieces_stages(224, 64, g9.DW_PIECES_CONFIG["stages"], False) == g9.DW_PIECES_CONFIG["stages"]
    assert g9.dw_pieces_stages(224, 64, g9.DW_PIECES_GU_CONFIG["stages"], True) == g9.DW_PIECES_GU_CONFIG["stages"]


def test_tail_pieces(monkeypatch):
    """The tail widths the Gluon gate/up and dact kernels take (their GPU tests run each kind)."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    monkeypatch.setattr(g9, "TAIL_PIECES", True)
    assert g9.tail_pieces(96) == (64, 32) and g9.tail_pieces(64) == (64, 0) and g9.tail_pieces(48) == (32, 16)
    assert g9.tail_pieces(128) == (128, 0)
    # three pieces, a piece under 16, nothing, or more than a tile: the padded tile
    assert g9.tail_pieces(112) == (0, 0) and g9.tail_pieces(72) == (0, 0) and g9.tail_pieces(0) == (0, 0)
    assert g9.tail_pieces(-32) == (0, 0) and g9.tail_pieces(160) == (0, 0)
    # gate/up: pieces only where a block spans more than one 128-column tile
    assert g9.gate_up_pieces(224, 128) == (64, 32) and g9.gate_up_pieces(176, 128) == (32, 16)
    assert g9.gate_up_pieces(96, 128) == (0, 0) and g9.gate_up_pieces(32, 128) == (0, 0)
    assert g9.gate_up_pieces(256, 128) == (0, 0)
    monkeypatch.setattr(g9, "TAIL_PIECES", False)
    assert g9.tail_pieces(96) == (0, 0) and g9.gate_up_pieces(224, 128) == (0, 0)


def _bwd_gluon_vs_plain(args, kw, calls, kernel: str, plain: dict, gluon_cfg: dict | None = None):
    """The backward with ``kernel``'s Gluon form (``{"sm90": True}`` or ``gluon_cfg``) against its ``plain``
    settings (128-row tiles both): the Gluon launcher (counted into ``calls``) runs once, every gradient (dx, dW
    gate/up/down, dweights) written (no NaN from the poisoned outputs) and within bf16 rounding, run to run
    identical. Returns the Gluon run's gradients."""
    want = tk.sparse_ffn_bwd(*args, config={"block_m": 128, kernel: plain}, **kw)
    assert calls == []
    gluon = {"block_m": 128, kernel: gluon_cfg or {"sm90": True}}
    got = tk.sparse_ffn_bwd(*args, config=gluon, **kw)
    assert calls == [1]
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down", "dweights"), got, want):
        assert not a.isnan().any(), name
        assert rel(a, b) < 1e-2, (name, rel(a, b))
    again = tk.sparse_ffn_bwd(*args, config=gluon, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["4097", "300", "empty_blocks", "empty_slots"])
@pytest.mark.parametrize("kernel", ["dw_gate_up", "dw_down"])
@pytest.mark.parametrize("pieces", [False, True], ids=["two_tiles", "pieces"])
def test_dw_sm90_on_gpu(kernel, case, pieces, monkeypatch):
    """The gathered Gluon dW kernels (``dw_gate_up.sm90``, ``dw_down.sm90``, session 31; with ``pieces``, session
    32's form with the neurons on N as 128 + 64 + 32, the default since session 33): every gradient of the backward with the Triton dW kernel
    within bf16 rounding, every element written (the outputs start as NaN), run to run identical; 300 tokens:
    blocks of ~90 rows (K steps mostly past the block's end); empty_blocks: every token routed to blocks 0-18, so
    45 blocks have no rows and their weight gradients must be zeros; empty_slots: a third of the tokens with 5
    empty slots (as the threshold mode leaves them), whose sorted rows after the last block no kernel writes (NaN
    here, from the NaN-filled torch.empty) while the last block's final K step reads them."""
    T = 300 if case == "300" else 4097
    # the other dW kernel as its two-tile form, so that only ``kernel`` can launch the pieces kernel counted here
    monkeypatch.setattr(tk, "DW_PIECES", False)
    g9, calls, (x, wg, wu, wd, idx, w) = _sm90_case(T, monkeypatch, "dw_pieces_sm90" if pieces else f"{kernel}_sm90")
    if case == "empty_blocks":
        idx = torch.arange(idx.shape[1], device="cuda", dtype=idx.dtype).expand_as(idx).contiguous()
    if case == "empty_slots":
        idx = idx.clone()
        idx[::3, -5:] = -1
        w = torch.where(idx >= 0, w, 0.0)
    kw = dict(shared_blocks=0, n_blocks=64)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, config={"block_m": 128}, **kw)
    go = torch.randn_like(x)
    got = _bwd_gluon_vs_plain((go, x, wg, wu, wd, idx, w, act), kw, calls, kernel, plain={"sm90": False},
                              gluon_cfg={"sm90": True, "pieces": pieces})
    if case == "empty_blocks":
        used = idx.shape[1] * (wg.shape[0] // 64)  # neurons of blocks 0-18
        for dw in (got[1], got[2], got[3].t()):
            assert dw[used:].abs().max() == 0 and dw[:used].abs().max() > 0


@pytest.mark.gpu
def test_dx_tma_on_gpu(monkeypatch):
    """dx.tma on the GPU (bf16, 4097 tokens, 224-neuron blocks in K tiles of 32): the pointer kernel's
    gradients within bf16 rounding, run to run identical."""
    x, wr, wg, wu, wd = _gpu_inputs(4097, 1024, 14336, 64, torch.bfloat16)
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=round(0.3 * 64), gate="sigmoid", weighting="gate")
    kw = dict(shared_blocks=0, n_blocks=64)
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, **kw)
    go = torch.randn_like(x)
    want = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config={"dx": {"tma": False}}, **kw)
    cfg = {"dx": dict(block_n=256, block_k=32, num_warps=8, num_stages=3, tma=True, sm90=False)}
    calls = _count_tma_launches(monkeypatch, "_dx_tma")
    got = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)
    assert calls == ["triton"] and rel(got[0], want[0]) < 1e-2
    assert torch.equal(got[0], tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, config=cfg, **kw)[0])
    calls.clear()
    default = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, **kw)
    assert calls == [_default_tma_kernel()] and all(rel(a, b) < 1e-2 for a, b in zip(default, want))


def _count_tma_launches(monkeypatch, triton_launcher: str) -> list:
    """Records which persistent kernel each launch takes: "triton" (``triton_launcher`` of sparse_ffn) or "gluon"
    (``sparse_ffn_sm90.short_k_gemm_sm90``: either Gluon kernel)."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    calls = []
    orig_t, orig_g = getattr(tk, triton_launcher), g9.short_k_gemm_sm90
    monkeypatch.setattr(tk, triton_launcher, lambda *a: calls.append("triton") or orig_t(*a))
    monkeypatch.setattr(g9, "short_k_gemm_sm90", lambda *a, **k: calls.append("gluon") or orig_g(*a, **k))
    return calls


def _default_tma_kernel() -> str:
    """The large-batch default's persistent kernel on this GPU: the Gluon one on sm_90 (where Gluon exists)."""
    from deepseek_kernels.triton import sparse_ffn_sm90 as g9

    return "gluon" if g9.HAVE_GLUON and torch.cuda.get_device_capability() == (9, 0) else "triton"


@pytest.mark.gpu
def test_fp32_on_gpu_is_not_tf32():
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(300, 256, 1024, 64, torch.float32)
    out = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.3)
    ref = gated_sparse_ffn_ref(x.double(), wr.double(), wg.double(), wu.double(), wd.double(), active_ratio=0.3)
    assert rel(out, ref) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 8, 4097])
def test_fp32_at_the_bf16_tuned_tile_sizes_on_gpu(T):
    """fp32 where the defaults were tuned for bf16: the decode (1-2 tokens: 8 gate/up stages, 280 KB of shared
    memory in fp32; session 18's device-generic run hit OutOfResources there) and the large-batch forward +
    backward (dact's 197 KB bf16 tiles) must fit the H200 and match the fp64 reference."""
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(T, 256, 2048, 64, torch.float32)
    args = [t.double() for t in (x, wr, wg, wu, wd)]
    if T <= tk.DECODE_MAX_TOKENS:
        with torch.no_grad():
            assert dk.explain("gated_sparse_ffn", x).startswith("triton")
            out = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)
        assert rel(out, gated_sparse_ffn_ref(*args, active_ratio=0.15)) < 1e-5
        return
    ts = [t.requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    out = dk.gated_sparse_ffn(*ts, active_ratio=0.3)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, ts, go)
    refs = [t.detach().requires_grad_(True) for t in args]
    ref = gated_sparse_ffn_ref(*refs, active_ratio=0.3)
    want = torch.autograd.grad(ref, refs, go.double())
    assert rel(out, ref) < 1e-5
    for name, g, r in zip(("x", "router", "w_gate", "w_up", "w_down"), grads, want):
        assert rel(g, r) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 300])
def test_router_split_path_on_gpu(T):
    """Few tokens take the split-logits path on the H200 (asserted); its gates match the fp32 reference
    and it picks the top-k gates (checked on the reference's gates, so a near-tie flipped by the
    different fp32 summation order cannot fail it), with the loop and the rank selection alike."""
    x, wr, *_ = _gpu_inputs(T, 4096, 64, 64, torch.float32)
    assert tk.router_splits(T, 4096, x.device) > 1
    k = 10
    _, _, rp = route_ref(x, wr, k=k, gate="sigmoid", weighting="gate")
    loop = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select="loop")
    rank = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select="rank")
    by_sort = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate", select="sort")
    for idx, w, p in (loop, rank, by_sort):
        assert (p - rp).abs().max() < 1e-5
        picked = rp.gather(1, idx.long())
        assert (picked - rp.topk(k, dim=1).values).abs().max() < 1e-5
        assert torch.allclose(w, picked / picked.sum(1, keepdim=True), atol=1e-5)
    # the same logits (same split kernel and slices when the split counts agree): the same choice
    # (the normalised weights of rank and sort may differ in the last bit: their sums are reduced in other orders)
    assert torch.equal(loop[0], rank[0]) and torch.equal(rank[0], by_sort[0])
    assert (rank[1] - by_sort[1]).abs().max() < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_decode_down_splits_on_gpu(T):
    """The split down projection at the issue's shapes in bf16: close to the fp32 reference,
    run to run identical, and capturable in a CUDA graph."""
    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    k = round(0.15 * 64)
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=k, gate="sigmoid", weighting="gate")
    ref = sparse_ffn_blocks_ref(x.float(), wg.float(), wu.float(), wd.float(), idx, w, n_blocks=64)
    for splits in (2, 4, 8):
        cfg = {"down": {"splits": splits}}
        out = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=64, config=cfg)
        assert rel(out, ref) < TOL[torch.bfloat16]
        assert torch.equal(out, tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=64, config=cfg))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        graphed = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=64, config=cfg)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed, out)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2, 8])
def test_decode_masked_h_rows_on_gpu(T, monkeypatch):
    """DECODE_MASK_H_ROWS at the issue's shapes in bf16 (one down kernel up to 2 tokens, slices from 3): the bits
    of the down kernels that load all 16 h rows, and close to the fp32 reference."""
    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    idx, w, _ = tk.sparse_ffn_route(x, wr, k=round(0.15 * 64), gate="sigmoid", weighting="gate")
    masked = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=64)
    monkeypatch.setattr(tk, "DECODE_MASK_H_ROWS", False)
    full = tk.sparse_ffn_decode(x, wg, wu, wd, idx, w, shared_blocks=0, n_blocks=64)
    assert torch.equal(masked, full)
    ref = sparse_ffn_blocks_ref(x.float(), wg.float(), wu.float(), wd.float(), idx, w, n_blocks=64)
    assert rel(masked, ref) < TOL[torch.bfloat16]


FLAGS_UNDER_PDL = ("ROUTER_EARLY_W", "ROUTER_EARLY_TRIGGER", "DECODE_DOWN_EARLY_W", "DECODE_DOWN_BY_MASK")


@pytest.mark.gpu
@pytest.mark.parametrize("flag", FLAGS_UNDER_PDL)
@pytest.mark.parametrize("T", [1, 2, 8])
def test_decode_chain_variants_under_pdl_on_gpu(T, flag, monkeypatch):
    """Each decode-chain switch with programmatic dependent launches: ROUTER_EARLY_W (the router-weight tile loads
    before the split kernel's wait, x after it), ROUTER_EARLY_TRIGGER (both router kernels let the next kernel
    launch as they start), DECODE_DOWN_EARLY_W (the first w_down tile loads while gate/up still runs; h only after
    the wait), DECODE_DOWN_BY_MASK (the down kernel's blocks from a bit mask). Thirty back-to-back decode calls on
    fresh inputs, eager and graphed, give the bits of plain launches with all of them off (an input read before
    the kernel before had written it would differ)."""
    import deepseek_kernels as dk
    from deepseek_kernels.ops._registry import programmatic_launches

    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    xs = [torch.randn_like(x) for _ in range(30)]

    def run(x):
        with torch.no_grad():
            return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)

    for name in FLAGS_UNDER_PDL:
        monkeypatch.setattr(tk, name, False)
    with programmatic_launches(False):
        want = [run(v) for v in xs]
    monkeypatch.setattr(tk, flag, True)
    assert_pdl_gives_the_bits(run, xs, want)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8])
def test_decode_programmatic_dependent_launch_on_gpu(T):
    """DSK_PDL=1: router, gate/up and down (and the finish kernel at 8 tokens) each wait for the kernel
    before them and let the next one launch early. Thirty back-to-back decode calls on fresh inputs,
    eager and replayed from a CUDA graph, give the bits of the ordinary launches (a kernel that read
    its input too early would see the previous call's)."""
    import deepseek_kernels as dk
    from deepseek_kernels.ops._registry import pdl_enabled, programmatic_launches

    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    xs = [torch.randn_like(x) for _ in range(30)]

    def run(x):
        with torch.no_grad():
            return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)

    with programmatic_launches(False):
        want = [run(v) for v in xs]
    with programmatic_launches(True):
        assert pdl_enabled(x, "sparse_decode")
    assert_pdl_gives_the_bits(run, xs, want)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 16])
def test_decode_on_gpu(T):
    """The decode path (no grad, <= 16 tokens) in bf16 at the issue's shapes, against the fp32 reference."""
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    with torch.no_grad():
        out = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)
    ref = gated_sparse_ffn_ref(x.float(), wr.float(), wg.float(), wu.float(), wd.float(), active_ratio=0.15)
    assert rel(out, ref) < TOL[torch.bfloat16]
    # the eager call launched the kernels directly; the registered ops give the same bits
    k = round(0.15 * 64)
    weights, _, idx = torch.ops.deepseek_kernels.sparse_ffn_route(x, wr, None, k, "sigmoid", "gate", None)
    op_out, _, _ = torch.ops.deepseek_kernels.sparse_ffn_blocks_fwd(x, wg, wu, wd, idx, weights, 0, 64, False)
    assert torch.equal(out, op_out)
    # and the decode step can be captured in a CUDA graph (no host sync) and replayed
    g = torch.cuda.CUDAGraph()
    with torch.no_grad():
        dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)  # warm-up outside the capture
        with torch.cuda.graph(g):
            graphed = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.15)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(graphed, out)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 2])
def test_decode_fused_route_on_gpu(T, monkeypatch):
    """The router's selection fused into the gate/up kernel (FUSED_ROUTE_TOKENS): at the issue's shapes,
    thirty fresh inputs give the bits of the unfused path (output and routing), eager and graphed."""
    import deepseek_kernels as dk

    x, wr, wg, wu, wd = _gpu_inputs(T, 4096, 14336, 64, torch.bfloat16)
    xs = [torch.randn_like(x) for _ in range(30)]

    def run(v):
        with torch.no_grad():
            return dk.gated_sparse_ffn(v, wr, wg, wu, wd, active_ratio=0.15, return_routing=True)

    monkeypatch.setattr(tk, "FUSED_ROUTE_TOKENS", ())
    want = [run(v) for v in xs]
    monkeypatch.setattr(tk, "FUSED_ROUTE_TOKENS", (1, 2))
    for v, (out, r) in zip(xs, want):
        got, rg = run(v)
        assert torch.equal(got, out) and torch.equal(rg.idx, r.idx) and torch.equal(rg.weights, r.weights)
    static_x = xs[0].clone()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out, _ = run(static_x)
    for v, (out, _) in zip(xs, want):
        static_x.copy_(v)
        g.replay()
        assert torch.equal(static_out, out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_kernels_on_gpu_deterministic(dtype):
    """Prefill-sized backward (large tiles) vs float32 autograd through the reference, run twice bit-equal."""
    T, D, F_, NB, S, k = 4097, 512, 2048, 64, 2, 17
    x, wr, wg, wu, wd = _gpu_inputs(T, D, F_, NB - S, dtype)
    idx = torch.sort(torch.rand(T, NB - S, device="cuda"), dim=-1, descending=True).indices[:, :k].to(torch.int32)
    w = torch.rand(T, k, device="cuda") + 0.1
    _, act, _ = tk.sparse_ffn_fwd(x, wg, wu, wd, idx, w, shared_blocks=S, n_blocks=NB)
    go = torch.randn(T, D, device="cuda", dtype=dtype)
    a = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, shared_blocks=S, n_blocks=NB)
    b = tk.sparse_ffn_bwd(go, x, wg, wu, wd, idx, w, act, shared_blocks=S, n_blocks=NB)
    refs = [t.float().requires_grad_(True) for t in (x, wg, wu, wd, w)]
    sparse_ffn_blocks_ref(*refs[:4], idx, refs[4], n_blocks=NB, shared_blocks=S).backward(go.float())
    for u, v, r in zip(a, b, refs):
        assert torch.equal(u, v)
        assert rel(u, r.grad) < 2e-2


def test_strided_bias_and_weights_through_the_ops():
    """Views with other strides compute the same thing (the router's bias and the gate/up weights
    are read with assumed strides by the kernels; the launchers must normalise them)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    T, D, n_blocks, BS, k = 13, 32, 8, 16, 3
    x = torch.randn(T, D, device=dev)
    router = torch.randn(n_blocks, D, device=dev)
    bias = torch.randn(2 * n_blocks, device=dev)[::2]  # stride 2
    assert bias.stride(0) == 2
    ops = torch.ops.deepseek_kernels
    a = ops.sparse_ffn_route(x, router, bias, k, "sigmoid", "gate", None)
    b = ops.sparse_ffn_route(x, router, bias.contiguous(), k, "sigmoid", "gate", None)
    for got, want in zip(a, b):
        assert torch.equal(got, want)
    w_gate = torch.randn(n_blocks * BS, D, device=dev) / D**0.5
    w_up = (torch.randn(D, n_blocks * BS, device=dev) / D**0.5).t()  # column-major
    w_down = torch.randn(D, n_blocks * BS, device=dev) / (n_blocks * BS) ** 0.5
    weights, _, idx = b
    got = ops.sparse_ffn_blocks_fwd(x, w_gate, w_up, w_down, idx, weights, 0, n_blocks, True)
    want = ops.sparse_ffn_blocks_fwd(x, w_gate, w_up.contiguous(), w_down, idx, weights, 0, n_blocks, True)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
