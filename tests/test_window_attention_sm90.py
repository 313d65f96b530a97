"""The Gluon Hopper window forward (``deepseek_kernels/triton/window_attention_sm90.py``): against the
float32 reference on an sm_90 GPU (skipped elsewhere), the op's dispatch to it, its backward through the
Triton kernels with the lse it returns, opcheck; on any machine, the error when it is forced on a call it
does not take. Its compile for sm_90 is checked without a GPU by tests/test_aot_compile.py."""

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.attention import window_attention_ref
from deepseek_kernels.triton import window_attention_sm90 as s9
from deepseek_kernels.triton.window_attention import window_attention_bwd, window_attention_fwd

from tolerances import REL_TOL, rel_error


def _sm90() -> bool:
    return s9.HAVE_GLUON and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


needs_sm90 = pytest.mark.skipif(not _sm90(), reason="needs an sm_90 GPU and Gluon")

CASES = [  # (B, S, Hq, Hkv, D, window, sinks): odd lengths, window 1 / wider than S, sinks, GQA 1 / 4 / 8
    (2, 1, 4, 4, 128, 16, 0), (2, 17, 4, 1, 128, 1, 0), (1, 300, 8, 2, 64, 17, 4), (2, 1000, 4, 4, 128, 128, 0),
    (1, 1000, 8, 1, 128, 1000, 4), (1, 4097, 4, 4, 128, 1000, 0), (1, 4097, 8, 2, 64, 5000, 4),
    (2, 555, 4, 4, 64, 129, 0), (1, 2048, 4, 4, 128, 4096, 130), (3, 384, 2, 2, 128, 255, 1),
]


def _case_id(c) -> str:
    return "B{}-S{}-H{}/{}-D{}-W{}-s{}".format(*c)


def _each_case_and_dtype(test):
    """Parametrize ``test`` over CASES x (bf16, fp16)."""
    test = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)(test)
    return pytest.mark.parametrize("case", CASES, ids=_case_id)(test)


def _qkv(B, S, Hq, Hkv, D, dtype, requires_grad=False):
    mk = lambda h: torch.randn(B, S, h, D, device="cuda", dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    return mk(Hq), mk(Hkv), mk(Hkv)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("pingpong", [True, False], ids=["pingpong", "free"])
@_each_case_and_dtype
def test_matches_reference(case, dtype, pingpong):
    B, S, Hq, Hkv, D, W, sinks = case
    q, k, v = _qkv(B, S, Hq, Hkv, D, dtype)
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, pingpong=pingpong)
    ref, ref_lse = window_attention_ref(q.float(), k.float(), v.float(), window=W, sinks=sinks, return_lse=True)
    assert out.shape == q.shape and lse.shape == (B, Hq, S)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_error(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-3)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("growing", [False, True], ids=["randn", "growing-logits"])
@_each_case_and_dtype
def test_conditional_rescale_and_reverse_order_match_reference(case, dtype, growing):
    """``rescale > 0`` (a row's max moves only when a tile's exceeds it by more than 2^rescale) and the
    reversed tile order: against the reference, and with keys scaled up along the sequence (the scores grow
    by far more than 2^8 over a window: some tiles move the max, others keep a stale one). The tile order
    changes nothing: bit for bit the forward order."""
    B, S, Hq, Hkv, D, W, sinks = case
    q, k, v = _qkv(B, S, Hq, Hkv, D, dtype)
    if growing:
        k = k * torch.linspace(1, 12, S, device="cuda", dtype=torch.float32).to(dtype)[None, :, None, None]
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, rescale=8.0, reverse=True)
    ref, ref_lse = window_attention_ref(q.float(), k.float(), v.float(), window=W, sinks=sinks, return_lse=True)
    assert not out.isnan().any() and not lse.isnan().any()
    assert rel_error(out, ref) < REL_TOL[dtype]
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-3)
    want, want_lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, rescale=8.0, reverse=False)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("case", CASES[::2] + [(3, 1500, 4, 2, 128, 700, 3)],
                         ids=_case_id)
def test_persistent_matches_one_tile_programs(case):
    """The persistent grid (each program over many tiles, the K/V ring and ping-pong turns running on across
    them) computes what one tile per program does, bit for bit."""
    B, S, Hq, Hkv, D, W, sinks = case
    q, k, v = _qkv(B, S, Hq, Hkv, D, torch.bfloat16)
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, persistent=True)
    want, want_lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks, persistent=False)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.gpu
@needs_sm90
def test_op_dispatches_to_the_hopper_forward(monkeypatch):
    q, k, v = _qkv(2, 700, 8, 2, 128, torch.bfloat16)
    direct, direct_lse = s9.window_attention_fwd_sm90(q, k, v, window=256, sinks=2)
    out, lse = dk.window_attention(q, k, v, window=256, sinks=2, return_lse=True)
    assert torch.equal(out, direct) and torch.equal(lse, direct_lse)
    # DSK_ATTN_SM90=0: the Triton forward, same function
    monkeypatch.setenv("DSK_ATTN_SM90", "0")
    tri, tri_lse = dk.window_attention(q, k, v, window=256, sinks=2, return_lse=True)
    assert rel_error(tri, out) < REL_TOL[torch.bfloat16]
    torch.testing.assert_close(tri_lse, lse, rtol=0, atol=1e-3)


@pytest.mark.gpu
@needs_sm90
def test_backward_with_its_lse():
    """The backward (Triton kernels) reads the lse this forward returns: gradients match the reference's."""
    q, k, v = _qkv(1, 600, 4, 2, 64, torch.float16, requires_grad=True)
    do = torch.randn_like(q)
    dq, dk_, dv = torch.autograd.grad(dk.window_attention(q, k, v, window=100, sinks=3), (q, k, v), do)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(window_attention_ref(qr, kr, vr, window=100, sinks=3), (qr, kr, vr), do.float())
    for got, ref in zip((dq, dk_, dv), want):
        assert rel_error(got, ref) < 1e-2


@pytest.mark.gpu
@needs_sm90
def test_opcheck():
    q, k, v = _qkv(1, 200, 4, 4, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.deepseek_kernels.window_attention_fwd_sm90, (q, k, v, 64, 0, None))


def test_forcing_it_on_a_call_it_does_not_take_raises():
    q = torch.randn(1, 32, 2, 64, device="cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="sm90=True"):
        window_attention_fwd(q, q, q, window=8, causal=False, sm90=True)
    lse = torch.zeros(1, 2, 32, device=q.device)
    with pytest.raises(ValueError, match="sm90=True"):
        window_attention_bwd(q, q, q, q, q, lse, window=8, causal=False, sm90=True)
    with pytest.raises(ValueError, match="sm90=True"):
        window_attention_bwd(q, q, q, q, q, lse, window=8, deterministic=False, sm90=True)


def test_persistent_grid_is_the_default_only_for_short_windows():
    """The persistent forward grid won at W1024 and lost at W4096 on the H200 (session 27): the default picks it
    by the keys a query sees, the window or the whole sequence when that is shorter."""
    assert s9.PERSISTENT_MAX_WINDOW == 1024
    assert s9.use_persistent(1024, 131072) and s9.use_persistent(1, 8192) and s9.use_persistent(4096, 1000)
    assert not s9.use_persistent(1025, 8192) and not s9.use_persistent(4096, 32768)


@pytest.mark.gpu
@needs_sm90
def test_misaligned_base_takes_the_triton_forward():
    """A view whose base is not 16-byte aligned (TMA cannot describe it) still gives the right answer."""
    B, S, H, D = 1, 130, 2, 64
    flat = torch.randn(3 * B * S * H * D + 1, device="cuda", dtype=torch.bfloat16)
    q, k, v = (flat[1 + i * B * S * H * D:1 + (i + 1) * B * S * H * D].view(B, S, H, D) for i in range(3))
    assert not s9.aligned(q)
    out = dk.window_attention(q, k, v, window=40)
    ref = window_attention_ref(q.float(), k.float(), v.float(), window=40)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]


@pytest.mark.gpu
@needs_sm90
def test_compiled_fullgraph_uses_it():
    q, k, v = _qkv(2, 300, 4, 2, 128, torch.bfloat16)
    f = torch.compile(lambda q, k, v: dk.window_attention(q, k, v, window=64, sinks=2), fullgraph=True)
    out = f(q, k, v)
    direct, _ = s9.window_attention_fwd_sm90(q, k, v, window=64, sinks=2)
    assert torch.equal(out, direct)


BWD_CASES = [  # (B, S, Hq, Hkv, D, window, sinks)
    (2, 17, 4, 1, 128, 1, 0), (1, 300, 8, 2, 64, 17, 4), (2, 1000, 4, 4, 128, 128, 0), (1, 1000, 8, 1, 128, 1000, 4),
    (1, 4097, 4, 2, 128, 1000, 0), (2, 555, 4, 4, 64, 129, 0), (1, 700, 4, 4, 128, 4096, 130),
]


@pytest.mark.gpu
@needs_sm90
@pytest.mark.parametrize("variant", [{"deterministic": True}, {"deterministic": False}], ids=["two-kernels", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_backward_kernels_match_reference(case, dtype, variant):
    B, S, Hq, Hkv, D, W, sinks = case
    if not variant["deterministic"] and D not in s9.BWD_FUSED_CONFIG:
        pytest.skip(f"the one-kernel backward takes head dims {sorted(s9.BWD_FUSED_CONFIG)}")
    q, k, v = _qkv(B, S, Hq, Hkv, D, dtype)
    do = torch.randn_like(q)
    out, lse = s9.window_attention_fwd_sm90(q, k, v, window=W, sinks=sinks)
    grads = s9.window_attention_bwd_sm90(do, q, k, v, out, lse, window=W, sinks=sinks, **variant)
    qr, kr, vr = (t.float().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(window_attention_ref(qr, kr, vr, window=W, sinks=sinks), (qr, kr, vr), do.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want):
        assert got.shape == ref.shape and not got.isnan().any(), name
        if ref.abs().max() == 0:  # window 1: each query sees only its own key, dq = dk = 0 exactly
            assert got.abs().max() < 1e-2, name
        else:
            assert rel_error(got, ref) < tol, (name, rel_error(got, ref))


@pytest.mark.gpu
@needs_sm90
def test_op_backward_through_the_hopper_kernels(monkeypatch):
    monkeypatch.setenv("DSK_ATTN_SM90_BWD", "1")
    q, k, v = _qkv(2, 600, 8, 2, 128, torch.bfloat16, requires_grad=True)
    do = torch.randn_like(q)
    got = torch.autograd.grad(dk.window_attention(q, k, v, window=200, sinks=1, deterministic=True), (q, k, v), do)
    out, lse = s9.window_attention_fwd_sm90(q.detach(), k.detach(), v.detach(), window=200, sinks=1)
    direct = s9.window_attention_bwd_sm90(do, q.detach(), k.detach(), v.detach(), out, lse, window=200, sinks=1)
    for a, b in zip(got, direct):
        assert torch.equal(a, b)
    f = torch.compile(lambda q, k, v: dk.window_attention(q, k, v, window=200, sinks=1, deterministic=True),
                      fullgraph=True)
    compiled = torch.autograd.grad(f(q, k, v), (q, k, v), do)
    for a, b in zip(compiled, direct):
        assert torch.equal(a, b)


@pytest.mark.gpu
@needs_sm90
def test_op_fused_backward_is_the_default_for_deterministic_false(monkeypatch):
    """window_attention(deterministic=False) at head dims 128 and 64 runs the one-kernel Gluon backward (dQ by TMA
    reduce-adds): its gradients are the direct call's up to the order of the dQ additions, and match the
    deterministic ones; a head dim the Hopper kernels do not take (32) still works (the Triton atomic backward)."""
    monkeypatch.delenv("DSK_ATTN_SM90_FUSED", raising=False)
    for D in (128, 64, 32):
        q, k, v = _qkv(2, 700, 8, 2, D, torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        fast = torch.autograd.grad(dk.window_attention(q, k, v, window=300, sinks=2, deterministic=False), (q, k, v), do)
        exact = torch.autograd.grad(dk.window_attention(q, k, v, window=300, sinks=2, deterministic=True), (q, k, v),
                                    do)
        for name, a, b in zip(("dq", "dk", "dv"), fast, exact):
            assert rel_error(a, b.float()) < 1e-2, name
        if D in s9.BWD_FUSED_CONFIG:
            out, lse = s9.window_attention_fwd_sm90(q.detach(), k.detach(), v.detach(), window=300, sinks=2)
            direct = s9.window_attention_bwd_sm90(do, q.detach(), k.detach(), v.detach(), out, lse, window=300, sinks=2,
                                                  deterministic=False)
            torch.testing.assert_close(fast[0], direct[0], rtol=1e-2, atol=1e-2)  # dq: the additions' order varies
            assert torch.equal(fast[1], direct[1]) and torch.equal(fast[2], direct[2])  # dk, dv: no atomics


@pytest.mark.gpu
@needs_sm90
def test_op_default_backward_is_the_fused_kernel_where_it_applies(monkeypatch):
    """window_attention's default (deterministic=None) runs the one-kernel Gluon backward at head dims 128 and 64;
    with DSK_ATTN_SM90_FUSED=0 the deterministic two-kernel Gluon one, and at a head dim the Hopper kernels do not
    take (32) the Triton kernels (the Hopper backward's calls recorded)."""
    calls = []
    real = s9.window_attention_bwd_sm90

    def spy(*args, **kwargs):
        calls.append(kwargs.get("deterministic", True))
        return real(*args, **kwargs)

    monkeypatch.setattr(s9, "window_attention_bwd_sm90", spy)
    monkeypatch.delenv("DSK_ATTN_SM90_BWD", raising=False)
    for D, env, want in ((128, None, [False]), (64, None, [False]), (32, None, []), (128, "0", [True])):
        if env is None:
            monkeypatch.delenv("DSK_ATTN_SM90_FUSED", raising=False)
        else:
            monkeypatch.setenv("DSK_ATTN_SM90_FUSED", env)
        q, k, v = _qkv(1, 300, 4, 2, D, torch.bfloat16, requires_grad=True)
        do = torch.randn_like(q)
        want_grads = torch.autograd.grad(dk.window_attention(q, k, v, window=100, deterministic=True), (q, k, v), do)
        calls.clear()
        got = torch.autograd.grad(dk.window_attention(q, k, v, window=100), (q, k, v), do)
        assert calls == want, (D, env, calls)
        for name, a, b in zip(("dq", "dk", "dv"), got, want_grads):
            assert rel_error(a, b.float()) < 1e-2, (D, env, name)
