"""The registered window_attention op: autograd, opcheck, fake tensors, torch.compile, bad input.
(Kernel-vs-reference numerics: tests/test_window_attention_triton.py.)"""

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.attention import window_attention_ref

OPS = torch.ops.deepseek_kernels


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_forward_backward_through_the_op():
    q = torch.randn(2, 21, 4, 16, requires_grad=True)
    k = torch.randn(2, 21, 2, 16, requires_grad=True)
    v = torch.randn(2, 21, 2, 16, requires_grad=True)
    out, lse = dk.window_attention(q, k, v, window=5, sinks=2, return_lse=True)
    assert not lse.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = window_attention_ref(qr, kr, vr, window=5, sinks=2, compute_dtype=torch.float64)
    ref.backward(g.double())
    assert rel(out, ref) < 1e-5
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert rel(got, want) < 1e-4


def test_opcheck_and_fake():
    q, k, v = torch.randn(1, 9, 2, 16), torch.randn(1, 9, 1, 16), torch.randn(1, 9, 1, 16)
    torch.library.opcheck(OPS.window_attention_fwd.default, (q, k, v, 3, 1, True, None, None, None, None))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    qp, kp, vp = q[0], k[0], v[0]
    torch.library.opcheck(OPS.window_attention_fwd.default, (qp, kp, vp, 3, 0, False, 0.3, cu, cu, 5),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, lse = dk.window_attention(torch.empty(2, 7, 4, 8), torch.empty(2, 7, 2, 8), torch.empty(2, 7, 2, 8),
                                       window=2, return_lse=True)
        assert out.shape == (2, 7, 4, 8) and lse.shape == (2, 4, 7) and lse.dtype == torch.float32


def test_reference_path_stays_opaque_where_the_ops_are_triton_ops():
    """On a machine with a GPU the attention ops are triton_ops, whose bodies fake tensors and torch.compile trace;
    CPU tensors without the interpreter take the reference, whose loop over cu_seqlens reads their values. It runs
    behind opaque ops of its own, so packed CPU calls pass opcheck (fake tensors, AOT dynamic) and compile with
    fullgraph (session 18's device-generic run on the H200 failed here). Simulated in a fresh process: triton_op
    registration forced, interpreter off."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    code = textwrap.dedent("""
        import torch.utils._triton as tt
        tt.has_triton = lambda: True  # register the ops as on a GPU machine
        import torch
        import deepseek_kernels as dk
        from deepseek_kernels.ops._registry import TRITON_OP, use_triton
        ops = torch.ops.deepseek_kernels
        q, k, v = torch.randn(40, 2, 16), torch.randn(40, 1, 16), torch.randn(40, 1, 16)
        assert TRITON_OP and not use_triton(q)
        cu = torch.tensor([0, 17, 40], dtype=torch.int32)
        torch.library.opcheck(ops.window_attention_fwd.default, (q, k, v, 3, 0, False, 0.3, cu, cu, 23))
        torch.library.opcheck(ops.hierarchical_attention_fwd.default, (q, k, v, 16, 16, 1, 0, 0.3, cu, 23))
        win = lambda q, k, v: dk.window_attention(q, k, v, window=3, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                                  max_seqlen_q=23, max_seqlen_k=23)
        torch.testing.assert_close(torch.compile(win, fullgraph=True)(q, k, v), win(q, k, v))
        hier = lambda q, k, v: dk.hierarchical_attention(q, k, v, window=16, block=16, cu_seqlens=cu, max_seqlen=23)
        torch.testing.assert_close(torch.compile(hier, fullgraph=True)(q, k, v), hier(q, k, v))
        print("opaque reference ok")
    """)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(root)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert r.returncode == 0 and "opaque reference ok" in r.stdout, r.stderr[-3000:]


def test_torch_compile_fullgraph():
    q, k, v = torch.randn(1, 13, 2, 16), torch.randn(1, 13, 2, 16), torch.randn(1, 13, 2, 16)
    f = lambda q, k, v: dk.window_attention(q, k, v, window=4, sinks=1)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_explain():
    q = torch.randn(1, 4, 2, 16)
    assert dk.explain("window_attention", q).split(":")[0] in ("triton", "reference")


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window=0), "window must be"),
    (dict(window=2, sinks=-1), "sinks must be"),
    (dict(window=2, k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), "multiple of the key/value heads"),
    (dict(window=2, k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)), "head dims differ"),
    (dict(window=2, k=torch.randn(1, 7, 2, 16)), "one shape"),
    (dict(window=2, q=torch.randn(1, 8, 2, 300), k=torch.randn(1, 8, 2, 300), v=torch.randn(1, 8, 2, 300)), "head_dim"),
    (dict(window=2, v=torch.randn(1, 8, 2, 16).double()), "dtype"),
    (dict(window=2, q=torch.randn(8, 2, 16)), r"\[batch, seq, heads, head_dim\]"),
])
def test_bad_input(kwargs, needle):
    args = dict(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update({n: kwargs.pop(n) for n in ("q", "k", "v") if n in kwargs})
    with pytest.raises(ValueError, match=needle):
        dk.window_attention(args["q"], args["k"], args["v"], **kwargs)


def test_bad_cu_seqlens():
    q = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="int32"):
        dk.window_attention(q, q, q, window=2, cu_seqlens_q=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="never decrease"):
        dk.window_attention(q, q, q, window=2, cu_seqlens_q=torch.tensor([0, 6, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="end at the packed length"):
        dk.window_attention(q, q, q, window=2, cu_seqlens_q=torch.tensor([0, 4, 8], dtype=torch.int32))


def test_max_seqlen_below_the_longest_sequence_is_an_error():
    """The kernels size their grids by max_seqlen: too small would leave output rows unwritten."""
    q = torch.randn(200, 2, 16)
    cu = torch.tensor([0, 5, 200], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen_q must be an int >= the longest sequence in cu_seqlens_q \(195\)"):
        dk.window_attention(q, q, q, window=4, cu_seqlens_q=cu, max_seqlen_q=64)
    with pytest.raises(ValueError, match=r"max_seqlen_k .* \(195\)"):
        dk.window_attention(q, q, q, window=4, cu_seqlens_q=cu, max_seqlen_k=100)
    with pytest.raises(ValueError, match="max_seqlen_q"):
        dk.window_attention(q, q, q, window=4, cu_seqlens_q=cu, max_seqlen_q=195.0)
    # the exact value, a larger one, or None: the same output
    want = dk.window_attention(q, q, q, window=4, cu_seqlens_q=cu)
    for m in (195, 300):
        torch.testing.assert_close(dk.window_attention(q, q, q, window=4, cu_seqlens_q=cu, max_seqlen_q=m), want)


def test_atomic_dq_backward_through_the_op():
    """deterministic=False (one kernel, dQ by atomics) gives the same gradients as deterministic=True."""
    torch.manual_seed(4)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(2, 37, h, 16, device=dev, requires_grad=True) for h in (4, 2, 2))
    do = torch.randn(2, 37, 4, 16, device=dev)
    g_det = torch.autograd.grad(dk.window_attention(q, k, v, window=9, sinks=2, deterministic=True), (q, k, v), do)
    g_atomic = torch.autograd.grad(dk.window_attention(q, k, v, window=9, sinks=2, deterministic=False), (q, k, v), do)
    for a, b in zip(g_det, g_atomic):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_deterministic_backward_is_bitwise_reproducible_on_gpu():
    q, k, v = (torch.randn(1, 3000, h, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for h in (8, 2, 2))
    do = torch.randn(1, 3000, 8, 128, device="cuda", dtype=torch.bfloat16)
    runs = [torch.autograd.grad(dk.window_attention(q, k, v, window=700, deterministic=True), (q, k, v), do)
            for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)



def test_default_backward_is_the_deterministic_one_where_the_fused_kernel_does_not_apply():
    """deterministic=None (the default) takes the one-kernel Gluon backward only where it applies (sm_90, bf16 /
    fp16, head dim 128, ...: tests/test_window_attention_sm90.py); elsewhere (here fp32, head dim 16, on any
    device) it is the deterministic backward, bit for bit."""
    from deepseek_kernels.triton import window_attention_sm90 as s9

    torch.manual_seed(5)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 40, h, 16, device=dev, requires_grad=True) for h in (4, 2, 2))
    assert 16 not in s9.BWD_FUSED_CONFIG and not s9.supported(q, k, v, causal=True, cu_seqlens_q=None,
                                                               cu_seqlens_k=None)
    do = torch.randn(1, 40, 4, 16, device=dev)
    a = torch.autograd.grad(dk.window_attention(q, k, v, window=7), (q, k, v), do)
    b = torch.autograd.grad(dk.window_attention(q, k, v, window=7, deterministic=True), (q, k, v), do)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
