"""Gated sparse FFN: reference semantics, the registered ops (autograd, opcheck, fake tensors,
torch.compile, bad input) on both CPU paths (Triton under the interpreter, and torch), and the
GatedSparseFFN module. (Kernel-vs-reference numerics: tests/test_sparse_ffn_triton.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deepseek_kernels as dk
from deepseek_kernels.nn import GatedSparseFFN
from deepseek_kernels.reference.sparse_ffn import (
    gated_sparse_ffn_ref,
    n_active,
    route_ref,
    sparse_ffn_blocks_ref,
    swiglu_ffn_ref,
)
from deepseek_kernels.triton import sparse_ffn as tk

OPS = torch.ops.deepseek_kernels


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def make(T, D, F_, NB, S=0, dtype=torch.float32, router_scale=0.5):
    x = torch.randn(T, D, dtype=dtype)
    wr = (torch.randn(NB - S, D) * router_scale / D**0.5).to(dtype)
    wg = (torch.randn(F_, D) / D**0.5).to(dtype)
    wu = (torch.randn(F_, D) / D**0.5).to(dtype)
    wd = (torch.randn(D, F_) / F_**0.5).to(dtype)
    return x, wr, wg, wu, wd


@pytest.fixture
def torch_path(monkeypatch):
    """Module-logic tests that run many steps take the torch CPU path (the kernels under the
    interpreter are covered above and in test_sparse_ffn_triton.py; this keeps the suite fast)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """The op's two CPU paths: the Triton kernels under the interpreter, and the torch fallback."""
    if request.param == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    return request.param


# ---- reference semantics -----------------------------------------------------------------------------


def brute_force(x, wr, wg, wu, wd, *, ratio, S, gate, weighting, bias=None, threshold=None):
    """Token by token, straight from the definition (float64)."""
    x, wr, wg, wu, wd = (t.double() for t in (x, wr, wg, wu, wd))
    NB = wr.shape[0] + S
    bs = wg.shape[0] // NB
    k = n_active(ratio, NB) - S
    out = torch.zeros(x.shape[0], wd.shape[0], dtype=torch.float64)
    for t in range(x.shape[0]):
        logits = wr @ x[t]
        p = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, 0)
        sel = [(float(p[r]) + (float(bias[r]) if bias is not None else 0.0), r) for r in range(wr.shape[0])
               if threshold is None or p[r] > threshold]
        chosen = [r for _, r in sorted(sel, key=lambda s: (-s[0], s[1]))[:k]]
        total = sum(float(p[r]) for r in chosen)
        blocks = [(b, 1.0) for b in range(S)]
        blocks += [(S + r, (float(p[r]) / total) if weighting == "gate" else 1.0) for r in chosen]
        for b, w in blocks:
            f = slice(b * bs, (b + 1) * bs)
            h = F.silu(wg[f] @ x[t]) * (wu[f] @ x[t])
            out[t] += w * (wd[:, f] @ h)
    return out


@pytest.mark.parametrize("cfg", [
    dict(NB=8, S=0, ratio=0.3, gate="sigmoid", weighting="gate"),
    dict(NB=8, S=2, ratio=0.6, gate="softmax", weighting="none"),
    dict(NB=8, S=1, ratio=0.9, gate="sigmoid", weighting="gate", threshold=0.5),
    dict(NB=8, S=0, ratio=0.5, gate="softmax", weighting="gate", bias=True),
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_reference_matches_the_definition(cfg):
    cfg = dict(cfg)
    NB, S = cfg.pop("NB"), cfg.pop("S")
    x, wr, wg, wu, wd = make(11, 12, 8 * 4, NB, S, dtype=torch.float64, router_scale=3.0)
    bias = torch.randn(NB - S, dtype=torch.float64) * 0.1 if cfg.pop("bias", False) else None
    ratio = cfg.pop("ratio")
    want = brute_force(x, wr, wg, wu, wd, ratio=ratio, S=S, bias=bias, **cfg)
    got = gated_sparse_ffn_ref(x, wr, wg, wu, wd, active_ratio=ratio, shared_blocks=S, bias=bias, **cfg)
    assert rel(got, want) < 1e-12


def test_n_active():
    assert n_active(0.3, 64) == 19 and n_active(0.15, 64) == 10 and n_active(1.0, 64) == 64
    assert n_active(0.01, 8) == 1 and n_active(0.5625, 8) == 5  # 4.5 rounds half up


def test_ties_go_to_the_lower_block_and_bias_only_selects():
    x = torch.randn(5, 8)
    wr = torch.zeros(6, 8)  # every logit 0: all gates tie
    idx, w, p = route_ref(x, wr, k=3, gate="sigmoid", weighting="gate")
    assert idx.tolist() == [[0, 1, 2]] * 5
    assert torch.allclose(w, torch.full_like(w, 1 / 3))
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.2, 0.1])
    idx, w, _ = route_ref(x, wr, k=3, gate="sigmoid", weighting="gate", bias=bias)
    assert idx.tolist() == [[4, 5, 0]] * 5
    assert torch.allclose(w, torch.full_like(w, 1 / 3))  # the bias never weights the output


def test_threshold_leaves_empty_slots():
    x = torch.randn(7, 8)
    wr = torch.randn(6, 8)
    idx, w, p = route_ref(x, wr, k=4, gate="sigmoid", weighting="gate", threshold=0.6)
    above = (p > 0.6).sum(-1)
    assert torch.equal((idx >= 0).sum(-1), above.clamp_max(4))
    assert torch.all(w[idx < 0] == 0)
    has = above > 0
    assert torch.allclose(w[has].sum(-1), torch.ones(int(has.sum()), dtype=w.dtype))


# ---- the op ---------------------------------------------------------------------------------------------

CASES = [
    # (T, D, d_ff, n_blocks, shared, ratio, gate, weighting, threshold, bias)
    (17, 24, 64, 8, 0, 0.4, "sigmoid", "gate", None, False),
    (1, 16, 64, 8, 0, 0.125, "softmax", "gate", None, False),     # one token, k = 1
    (33, 40, 128, 8, 2, 1.0, "softmax", "gate", None, True),      # every block
    (13, 16, 96, 8, 1, 0.7, "sigmoid", "none", 0.5, False),       # threshold: empty slots
    (9, 32, 128, 64, 0, 0.3, "sigmoid", "gate", None, True),      # 64 blocks of 2 neurons
    (8, 16, 128, 64, 0, 1 / 64, "sigmoid", "none", None, False),  # 64 blocks, k = 1
]


def case_id(c):
    return "T{}-D{}-F{}-NB{}-S{}-r{:.3g}-{}-{}-thr{}-{}".format(*c[:9], "bias" if c[9] else "nobias")


def run_op_and_ref(case, dtype=torch.float32):
    T, D, F_, NB, S, ratio, gate, weighting, threshold, with_bias = case
    x, wr, wg, wu, wd = make(T, D, F_, NB, S, dtype=dtype, router_scale=3.0)
    bias = torch.randn(NB - S) * 0.05 if with_bias else None
    kw = dict(active_ratio=ratio, shared_blocks=S, gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    ours = [t.clone().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    out, routing = dk.gated_sparse_ffn(*ours, return_routing=True, **kw)
    go = torch.randn_like(out)
    aux = (routing.probs ** 2).sum() if routing.probs is not None else 0  # a loss on the probs (aux-loss path)
    ((out.float() * go.float()).sum() + aux).backward()
    refs = [t.detach().double().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    kw_ref = dict(kw, bias=None if bias is None else bias.double())
    ref = gated_sparse_ffn_ref(*refs, **kw_ref)
    NBk = n_active(ratio, NB) - S
    loss = (ref * go.double()).sum()
    if NBk > 0:
        _, _, p = route_ref(refs[0], refs[1], k=NBk, gate=gate, weighting=weighting, bias=kw_ref["bias"],
                            threshold=threshold)
        loss = loss + (p ** 2).sum()
    loss.backward()
    return out, ref, routing, ours, refs


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_and_gradients_match_reference(case, path):
    out, ref, routing, ours, refs = run_op_and_ref(case)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert rel(out, ref) < 1e-5
    for name, a, b in zip(("x", "router_weight", "w_gate", "w_up", "w_down"), ours, refs):
        assert a.grad is not None and a.grad.shape == a.shape, name
        assert rel(a.grad, b.grad) < 1e-4, (name, rel(a.grad, b.grad))


def test_a_loss_on_one_routing_output_alone(path):
    """The ops' unused outputs' gradients arrive as None (set_materialize_grads(False): no zeros of act's
    [P, 2, BS] shape written per step): a loss on the probs alone (the aux-loss path, the FFN output unused) and
    a loss on the output alone give the reference's gradients."""
    x, wr, wg, wu, wd = make(12, 16, 64, 8, router_scale=3.0)
    for on_probs in (True, False):
        ours = [t.clone().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
        out, routing = dk.gated_sparse_ffn(*ours, active_ratio=0.375, return_routing=True)
        ((routing.probs ** 2).sum() if on_probs else out.sum()).backward()
        refs = [t.detach().double().requires_grad_(True) for t in (x, wr, wg, wu, wd)]
        if on_probs:
            (route_ref(refs[0], refs[1], k=3)[2] ** 2).sum().backward()
        else:
            gated_sparse_ffn_ref(*refs, active_ratio=0.375).sum().backward()
        for name, a, b in zip(("x", "router_weight", "w_gate", "w_up", "w_down"), ours, refs):
            if b.grad is None:  # the FFN weights under the probs' loss
                assert a.grad is None or a.grad.abs().max() == 0, name
            else:
                assert rel(a.grad, b.grad) < 1e-4, (on_probs, name, rel(a.grad, b.grad))


def test_router_gets_gradient_only_through_gate_weighting():
    x, wr, wg, wu, wd = make(9, 16, 64, 8, router_scale=3.0)
    wr.requires_grad_(True)
    for weighting, expect in (("gate", True), ("none", False)):
        wr.grad = None
        dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.5, weighting=weighting).sum().backward()
        assert bool(wr.grad.abs().sum() > 0) is expect


def test_all_tokens_routed_to_one_block(path):
    T, D = 21, 16
    x = torch.randn(T, D)
    x[:, 0] = x[:, 0].abs() + 1
    _, wr, wg, wu, wd = make(T, D, 64, 8)
    wr = torch.zeros_like(wr)
    wr[5, 0] = 4.0  # block 5 wins for every token
    out, routing = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=1 / 8, return_routing=True)
    assert torch.all(routing.idx == 5)
    ref = gated_sparse_ffn_ref(x.double(), wr.double(), wg.double(), wu.double(), wd.double(), active_ratio=1 / 8)
    assert rel(out, ref) < 1e-5


def test_ties_through_the_op(path):
    x, wr, wg, wu, wd = make(10, 16, 64, 8)
    out, routing = dk.gated_sparse_ffn(x, torch.zeros_like(wr), wg, wu, wd, active_ratio=0.375, return_routing=True)
    assert routing.idx.tolist() == [[0, 1, 2]] * 10
    ref = gated_sparse_ffn_ref(x, torch.zeros_like(wr), wg, wu, wd, active_ratio=0.375)
    assert rel(out, ref) < 1e-5


def test_dense_equivalence_at_ratio_one(path):
    x, wr, wg, wu, wd = make(19, 24, 96, 8, S=2)
    out = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=1.0, shared_blocks=2, weighting="none")
    assert rel(out, swiglu_ffn_ref(x.double(), wg.double(), wu.double(), wd.double())) < 1e-6


def test_leading_dims_and_fp16(path):
    x, wr, wg, wu, wd = make(12, 16, 64, 8, dtype=torch.float16)
    out = dk.gated_sparse_ffn(x.view(3, 4, 16), wr, wg, wu, wd, active_ratio=0.5)
    ref = gated_sparse_ffn_ref(x.double(), wr.double(), wg.double(), wu.double(), wd.double(), active_ratio=0.5)
    assert out.shape == (3, 4, 16) and out.dtype == torch.float16
    assert rel(out.view(12, 16), ref) < 2e-3


def test_opcheck():
    x, wr, wg, wu, wd = make(7, 16, 64, 8, S=1)
    bias = torch.randn(7) * 0.01
    for t in (x, wr, wg, wu, wd):
        t.requires_grad_(True)
    torch.library.opcheck(OPS.sparse_ffn_route.default, (x, wr, bias, 3, "softmax", "gate", None))
    torch.library.opcheck(OPS.sparse_ffn_route.default, (x, wr, None, 2, "sigmoid", "none", 0.4))
    idx, w, _ = route_ref(x.detach(), wr.detach(), k=3, gate="sigmoid", weighting="gate")
    w = w.float().requires_grad_(True)
    torch.library.opcheck(OPS.sparse_ffn_blocks_fwd.default, (x, wg, wu, wd, idx, w, 1, 8, True))
    act = torch.randn(7 * 4, 2, 8)
    # the backward without a plan (it groups again) and with the forward op's plan
    plan = OPS.sparse_ffn_blocks_fwd(x.detach(), wg.detach(), wu.detach(), wd.detach(), idx, w.detach(), 1, 8,
                                     True)[2]
    for p, bm in ((plan.new_empty(0), 0), (plan, tk.fwd_block_m(x, wg, 8))):
        torch.library.opcheck(OPS.sparse_ffn_blocks_bwd.default,
                              (torch.randn(7, 16), x.detach(), wg.detach(), wu.detach(), wd.detach(), idx, w.detach(),
                               act, p, 1, 8, bm))


def test_the_backward_uses_the_forwards_grouping(monkeypatch):
    """A training step groups once (Triton path): the forward op packs route_pairs' result into its plan output and
    the backward op unpacks it instead of grouping again; its gradients are the regrouping backward's, bit for bit
    (shared blocks, an empty slot, 29 tokens)."""
    x, wr, wg, wu, wd = make(29, 16, 64, 8, S=1)
    idx, w, _ = route_ref(x, wr, k=3, gate="sigmoid", weighting="gate")
    idx = idx.clone()
    idx[5, 2] = -1
    w = torch.where(idx >= 0, w.float(), 0.0)
    out, act, plan = OPS.sparse_ffn_blocks_fwd(x, wg, wu, wd, idx, w, 1, 8, True)
    bm = tk.fwd_block_m(x, wg, 8)
    assert plan.dtype == torch.int32 and plan.numel() == tk.plan_numel(29, 4, 8, bm)
    g, w_full, w_sorted = tk.unpack_plan(plan, 29, 4, 8, bm)
    g2, w_full2, w_sorted2 = tk.route_pairs(idx, w, 1, 8, bm)
    for name in ("sorted_tok", "inv", "offsets", "tile_block", "tile_start", "tile_count"):
        assert torch.equal(getattr(g, name), getattr(g2, name)), name
    assert torch.equal(w_full, w_full2) and torch.equal(w_sorted, w_sorted2)
    go = torch.randn(29, 16)
    args = (go, x, wg, wu, wd, idx, w, act)
    regrouped = OPS.sparse_ffn_blocks_bwd(*args, plan.new_empty(0), 1, 8, 0)
    calls = []
    real = tk.route_pairs
    monkeypatch.setattr(tk, "route_pairs", lambda *a, **k: calls.append(1) or real(*a, **k))
    reused = OPS.sparse_ffn_blocks_bwd(*args, plan, 1, 8, bm)
    assert calls == []  # no second grouping
    for name, a, b in zip(("dx", "dw_gate", "dw_up", "dw_down", "dweights"), reused, regrouped):
        assert torch.equal(a, b), name
    # a plan grouped at another row tile is not used (the backward groups again)
    OPS.sparse_ffn_blocks_bwd(*args, tk.pack_plan(*tk.route_pairs(idx, w, 1, 8, 2 * bm)), 1, 8, 2 * bm)
    assert len(calls) == 2
    with pytest.raises(ValueError, match="grouping plan"):
        tk.unpack_plan(plan[:-1], 29, 4, 8, bm)


def test_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, wr, wg, wu, wd = (torch.empty(2, 5, 16), torch.empty(6, 16), torch.empty(64, 16), torch.empty(64, 16),
                             torch.empty(16, 64))
        out, r = dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.5, shared_blocks=2, return_routing=True)
        assert out.shape == (2, 5, 16) and r.idx.shape == (10, 2) and r.probs.shape == (10, 6)
        assert r.idx.dtype == torch.int32 and r.weights.dtype == torch.float32


def test_torch_compile_fullgraph_forward_and_backward():
    x, wr, wg, wu, wd = make(13, 16, 64, 8, S=1, router_scale=3.0)
    params = [t.clone().requires_grad_(True) for t in (wr, wg, wu, wd)]

    def f(x, wr, wg, wu, wd):
        return dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.5, shared_blocks=1, gate="softmax")

    out_c = torch.compile(f, fullgraph=True)(x, *params)
    out_c.sum().backward()
    grads_c = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    out_e = f(x, *params)
    out_e.sum().backward()
    torch.testing.assert_close(out_c, out_e)
    for a, p in zip(grads_c, params):
        torch.testing.assert_close(a, p.grad)


def test_explain():
    x = torch.randn(3, 16)
    assert dk.explain("gated_sparse_ffn", x).split(":")[0] in ("triton", "reference")
    how = dk.explain("gated_sparse_ffn", x)
    assert ("backward: Triton" in how) if how.startswith("triton") else ("backward in torch" in how)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(active_ratio=0.0), "active_ratio must be a number in \\(0, 1\\]"),
    (dict(active_ratio=1.5), "active_ratio must be a number in \\(0, 1\\]"),
    (dict(active_ratio=True), "active_ratio"),
    (dict(wr=torch.randn(5, 16)), "d_ff \\(64\\) must be divisible by n_blocks \\(5"),
    (dict(wg=torch.randn(64, 16).double()), "dtype mismatch: w_gate"),
    (dict(x=torch.randn(4, 16).double()), "x must be float16, bfloat16 or float32"),
    (dict(wd=torch.randn(16, 32)), "w_down must be \\[d_model, d_ff\\]"),
    (dict(wu=torch.randn(32, 16)), "w_up must have w_gate's shape"),
    (dict(wr=torch.randn(8, 12)), "router_weight must be"),
    (dict(gate="relu"), "gate must be one of"),
    (dict(weighting="sum"), "weighting must be one of"),
    (dict(threshold=1.0), "threshold must be None or a number in \\[0, 1\\)"),
    (dict(bias=torch.zeros(3)), "bias must be a float32 tensor \\[n_routed\\]"),
    (dict(shared_blocks=-1), "shared_blocks must be an int >= 0"),
    (dict(shared_blocks=4, wr=torch.randn(4, 16), active_ratio=0.25), "fewer than the 4 shared blocks"),
])
def test_bad_input(kwargs, needle):
    args = dict(x=torch.randn(4, 16), wr=torch.randn(8, 16), wg=torch.randn(64, 16), wu=torch.randn(64, 16),
                wd=torch.randn(16, 64))
    args.update({n: kwargs.pop(n) for n in list(args) if n in kwargs})
    kwargs.setdefault("active_ratio", 0.5)
    with pytest.raises(ValueError, match=needle):
        dk.gated_sparse_ffn(args["x"], args["wr"], args["wg"], args["wu"], args["wd"], **kwargs)


def test_bad_input_straight_through_torch_ops():
    x, wr, wg, wu, wd = make(4, 16, 64, 8)
    with pytest.raises(ValueError, match="k must be in"):
        OPS.sparse_ffn_route(x, wr, None, 9, "sigmoid", "gate", None)
    with pytest.raises(ValueError, match="gate must be one of"):
        OPS.sparse_ffn_route(x, wr, None, 2, "tanh", "gate", None)
    idx = torch.zeros(4, 2, dtype=torch.int32)
    w = torch.ones(4, 2)
    with pytest.raises(ValueError, match="must be divisible by n_blocks"):
        OPS.sparse_ffn_blocks_fwd(x, wg, wu, wd, idx, w, 0, 7, False)
    with pytest.raises(ValueError, match="idx entries must be routed block ids"):
        OPS.sparse_ffn_blocks_fwd(x, wg, wu, wd, idx + 8, w, 0, 8, False)
    with pytest.raises(ValueError, match="idx must be int32"):
        OPS.sparse_ffn_blocks_fwd(x, wg, wu, wd, idx.long(), w, 0, 8, False)
    with pytest.raises(ValueError, match="dtype mismatch: w_down"):
        OPS.sparse_ffn_blocks_fwd(x, wg, wu, wd.half(), idx, w, 0, 8, False)


# ---- the module ------------------------------------------------------------------------------------------


class LlamaMLP(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("shared", [0, 2])
def test_module_at_ratio_one_is_the_dense_ffn(shared, path):
    m = GatedSparseFFN(24, 96, n_blocks=8, active_ratio=1.0, shared_blocks=shared, weighting="none")
    mlp = LlamaMLP(24, 96)
    m.load_state_dict({**mlp.state_dict(), "router.weight": m.router.weight, "selection_bias": m.selection_bias})
    x = torch.randn(2, 9, 24)
    torch.testing.assert_close(m(x), mlp(x), rtol=1e-5, atol=1e-6)
    assert float(m.activation_ratio) == 1.0


def test_module_state_dict_keys_and_ratio_knobs():
    m = GatedSparseFFN(16, 64, n_blocks=8, active_ratio=0.5)
    assert set(m.state_dict()) == {"gate_proj.weight", "up_proj.weight", "down_proj.weight", "router.weight",
                                   "selection_bias"}
    x = torch.randn(30, 16)
    m(x)
    assert float(m.activation_ratio) == 0.5 and m.k == 4
    m.set_active_ratio(0.25)
    m(x)
    assert float(m.activation_ratio) == 0.25
    torch.testing.assert_close(m.last_load.sum(), torch.tensor(2.0))  # 2 routed slots per token
    m.set_threshold(0.99)  # sigmoid gates of small logits stay below: most slots empty
    m(x)
    assert float(m.activation_ratio) < 0.25
    m.set_threshold(0.0, max_ratio=0.5)
    m(x)
    assert float(m.activation_ratio) == 0.5  # every gate exceeds 0: capped at the ratio
    for bad in (0, 1.2, -0.1):
        with pytest.raises(ValueError, match="ratio must be a number in"):
            m.set_active_ratio(bad)
    with pytest.raises(ValueError, match="threshold must be None or a number"):
        m.set_threshold(1.0)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(d_ff=60), "d_ff \\(60\\) must be divisible by n_blocks \\(8\\)"),
    (dict(shared_blocks=8), "shared_blocks must be an int in"),
    (dict(gate="tanh"), "gate must be one of"),
    (dict(balance="loss"), "balance must be one of"),
    (dict(active_ratio=0.0), "ratio must be a number in"),
])
def test_module_bad_arguments(kwargs, needle):
    args = dict(d_model=16, d_ff=64, n_blocks=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        GatedSparseFFN(args.pop("d_model"), args.pop("d_ff"), **args)


def test_bias_balancing_moves_load_toward_underused_blocks(torch_path):
    torch.manual_seed(1)
    m = GatedSparseFFN(16, 64, n_blocks=8, active_ratio=0.25, balance="bias", bias_update_rate=0.05)
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0, 0] = m.router.weight[1, 0] = 5.0  # blocks 0 and 1 take every token
    x = torch.randn(64, 16)
    x[:, 0] = x[:, 0].abs() + 0.5
    m.train()
    m(x)
    before = m.last_load.clone()
    assert before[0] == 1 and before[1] == 1
    with pytest.raises(RuntimeError, match="balance='bias'"):
        GatedSparseFFN(16, 64, n_blocks=8, balance="aux").update_bias()
    m.update_bias()
    assert m.load.sum() == 0  # the counter restarts after each update
    assert m.selection_bias[0] < 0 and m.selection_bias[1] < 0 and m.selection_bias[2] > 0  # against the load
    recent = torch.zeros(8)
    for step in range(60):
        m(x)
        if step >= 44:
            recent += m.last_load
        m.update_bias()
    recent /= 16
    assert (recent.max() - recent.min()) < 0.5 * (before.max() - before.min())
    out, r = dk.gated_sparse_ffn(x, m.router.weight, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight,
                                 active_ratio=0.25, bias=m.selection_bias, return_routing=True)
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(64))  # the bias only selects


def test_aux_loss_is_exposed_and_trains_the_router():
    m = GatedSparseFFN(16, 64, n_blocks=8, active_ratio=0.25, balance="aux", weighting="none")
    x = torch.randn(40, 16)
    m.train()
    m(x).sum().backward()
    assert m.router.weight.grad is None or m.router.weight.grad.abs().sum() == 0  # "none": none via the output
    m(x)
    assert m.aux_loss is not None and m.aux_loss.ndim == 0 and m.aux_loss > 0
    m.aux_loss.backward()
    assert m.router.weight.grad.abs().sum() > 0
    m.eval()
    m(x)
    assert m.aux_loss is None


def test_from_dense_fits_a_router_and_reports_the_error_curve(torch_path):
    torch.manual_seed(0)
    d, f, nb = 24, 192, 12
    mlp = LlamaMLP(d, f)
    with torch.no_grad():  # blocks whose importance depends on the input: block b fires on feature b % d
        for b in range(nb):
            mlp.gate_proj.weight[b * 16:(b + 1) * 16] *= 0.2
            mlp.gate_proj.weight[b * 16:(b + 1) * 16, b] = 3.0
    cal = [torch.randn(64, d) for _ in range(4)]
    m = GatedSparseFFN.from_dense(mlp, n_blocks=nb, calibration=cal, active_ratio=0.25)
    assert m.weighting == "none" and m.balance is None
    for attr in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(getattr(m, attr).weight, getattr(mlp, attr).weight)
    rows = m.conversion_report.rows
    assert [r["ratio"] for r in rows] == [1.0, 0.5, 0.3, 0.15]
    assert rows[0]["rel_error"] < 1e-6
    errs = [r["rel_error"] for r in rows]
    assert errs == sorted(errs)  # error grows as the ratio falls
    assert all(r["oracle_rel_error"] <= r["rel_error"] + 1e-6 for r in rows)
    held_out = [torch.randn(128, d)]
    fitted = m.error_report(held_out, ratios=(0.3,)).rows[0]["rel_error"]
    with torch.no_grad():
        m.router.weight.copy_(torch.randn_like(m.router.weight))
    random = m.error_report(held_out, ratios=(0.3,)).rows[0]["rel_error"]
    assert fitted < 0.8 * random
    assert "ratio" in str(m.conversion_report) and m.active_ratio == 0.25
    with pytest.raises(TypeError, match="gate_proj must be an nn.Linear"):
        GatedSparseFFN.from_dense(nn.Linear(4, 4), n_blocks=2, calibration=cal)


def test_grouped_mm_benchmark_baseline_computes_the_same_layer():
    """The bench suite's torch._grouped_mm baseline is the same routed layer (and differentiable), so
    timing it against the op is a fair comparison."""
    from deepseek_kernels.bench.suites.sparse_ffn import grouped_mm_ffn

    x, wr, wg, wu, wd = make(37, 32, 128, 8, router_scale=3.0)
    ts = [t.requires_grad_(True) for t in (x, wr, wg, wu, wd)]
    out = grouped_mm_ffn(*ts, ratio=0.375)
    ref = gated_sparse_ffn_ref(*[t.detach().double() for t in ts], active_ratio=0.375)
    assert rel(out, ref) < 1e-5
    grads = torch.autograd.grad(out, ts, torch.randn_like(out))
    assert all(g.shape == t.shape and torch.isfinite(g).all() for g, t in zip(grads, ts))


def test_eager_decode_fast_path_gives_the_ops_bits(monkeypatch):
    """gated_sparse_ffn's direct-launch decode path (taken on a GPU for <= 16 tokens without grad;
    forced here under the interpreter) returns the registered ops' output and routing, bit for bit."""
    from deepseek_kernels.ops import sparse_ffn as ops_sparse
    from deepseek_kernels.ops._registry import interpreting

    if not interpreting():
        pytest.skip("the kernels run on CPU tensors only under TRITON_INTERPRET=1")
    x, wr, wg, wu, wd = make(5, 32, 128, 16, S=2, dtype=torch.float16)
    bias = torch.randn(14) * 0.1
    kw = dict(active_ratio=0.3, shared_blocks=2, gate="softmax", weighting="gate", bias=bias, return_routing=True)
    with torch.no_grad():
        want, want_r = dk.gated_sparse_ffn(x, wr, wg, wu, wd, **kw)
        calls = []
        real = ops_sparse._eager_decode
        monkeypatch.setattr(ops_sparse, "_eager_decode", lambda *a: calls.append(1) or real(*a) or True)
        got, got_r = dk.gated_sparse_ffn(x, wr, wg, wu, wd, **kw)
    assert calls and torch.equal(got, want)
    assert torch.equal(got_r.idx, want_r.idx) and torch.equal(got_r.weights, want_r.weights)



def test_bf16_router_backward_matches_the_fp32_math_to_bf16_rounding():
    """In bf16 the router's backward runs bf16 GEMMs (fp32 accumulation) like a bf16 nn.Linear would, instead of
    casting x to fp32: on the same saved tensors its x and router-weight gradients equal the fp32 math's up to
    bf16 rounding."""
    from types import SimpleNamespace

    from deepseek_kernels.ops.sparse_ffn import _route_backward
    from deepseek_kernels.reference.sparse_ffn import route_ref

    g = torch.Generator().manual_seed(3)
    T, D, NR, k = 37, 64, 16, 4
    x = torch.randn(T, D, generator=g).bfloat16()
    wr = (torch.randn(NR, D, generator=g) / D**0.5).bfloat16()
    idx, weights, probs = route_ref(x, wr, k=k)
    gw = torch.randn(T, k, generator=g)
    for gate in ("sigmoid", "softmax"):
        ctx = SimpleNamespace(saved_tensors=(x, wr, idx, weights.float(), probs.float()), weighting="gate", gate=gate)
        dx, dwr, *_ = _route_backward(ctx, gw, None, None)
        assert dx.dtype == dwr.dtype == torch.bfloat16
        ctx32 = SimpleNamespace(saved_tensors=(x.float(), wr.float(), idx, weights.float(), probs.float()),
                                weighting="gate", gate=gate)
        dx32, dwr32, *_ = _route_backward(ctx32, gw, None, None)  # fp32 inputs: the fp32 math
        for a, b in ((dx, dx32), (dwr, dwr32)):
            assert ((a.float() - b).norm() / b.norm()).item() < 1e-2
