"""The registered hierarchical_attention op: autograd, opcheck, fake tensors, torch.compile, the
reference CPU path, bad input. (Kernel-vs-reference numerics: tests/test_hierarchical_triton.py.)"""

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.reference.hierarchical_attention import hierarchical_attention_ref
from tests.tolerances import rel_error

OPS = torch.ops.deepseek_kernels


def test_forward_backward_through_the_op():
    q = torch.randn(2, 45, 4, 16, requires_grad=True)
    k = torch.randn(2, 45, 2, 16, requires_grad=True)
    v = torch.randn(2, 45, 2, 16, requires_grad=True)
    out, lse = dk.hierarchical_attention(q, k, v, window=16, block=16, sinks=2, return_lse=True)
    assert not lse.requires_grad and lse.shape == (2, 4, 45)
    g = torch.randn_like(out)
    out.backward(g)
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = hierarchical_attention_ref(qr, kr, vr, window=16, block=16, sinks=2, compute_dtype=torch.float64)
    ref.backward(g.double())
    assert rel_error(out, ref) < 1e-5
    for got, want in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        assert rel_error(got, want) < 1e-5


def test_reference_path_on_cpu(monkeypatch):
    """Without the interpreter, CPU tensors take the reference (forward and closed-form backward)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 40, 2, 16, requires_grad=True) for _ in range(3))
    assert dk.explain("hierarchical_attention", q).startswith("reference:")
    out = dk.hierarchical_attention(q, k, v, window=16, block=16, sinks=1)
    out.sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    hierarchical_attention_ref(qr, kr, vr, window=16, block=16, sinks=1).sum().backward()
    torch.testing.assert_close(out, hierarchical_attention_ref(q, k, v, window=16, block=16, sinks=1))
    for a, b in ((q, qr), (k, kr), (v, vr)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_varlen_matches_dense_rows():
    lens = [33, 1, 50]
    cu = torch.tensor([0, 33, 34, 84], dtype=torch.int32)
    q, k, v = torch.randn(84, 2, 16), torch.randn(84, 1, 16), torch.randn(84, 1, 16)
    out = dk.hierarchical_attention(q, k, v, window=16, block=16, cu_seqlens=cu)
    for n, L in enumerate(lens):
        a = int(cu[n])
        dense = dk.hierarchical_attention(q[None, a:a + L], k[None, a:a + L], v[None, a:a + L], window=16, block=16)
        torch.testing.assert_close(out[a:a + L], dense[0], rtol=1e-5, atol=1e-5)


def test_opcheck_and_fake():
    q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 1, 16), torch.randn(1, 40, 1, 16)
    torch.library.opcheck(OPS.hierarchical_attention_fwd.default, (q, k, v, 16, 16, 2, 1, None, None, None))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    torch.library.opcheck(OPS.hierarchical_attention_fwd.default, (q[0], k[0], v[0], 16, 16, 1, 0, 0.3, cu, 23),
                          test_utils=("test_schema", "test_faketensor"))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, lse = dk.hierarchical_attention(torch.empty(2, 70, 4, 64), torch.empty(2, 70, 2, 64),
                                             torch.empty(2, 70, 2, 64), window=64, block=16, return_lse=True)
        assert out.shape == (2, 70, 4, 64) and lse.shape == (2, 4, 70) and lse.dtype == torch.float32


def test_torch_compile_fullgraph():
    q, k, v = torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16), torch.randn(1, 40, 2, 16)
    f = lambda q, k, v: dk.hierarchical_attention(q, k, v, window=16, block=16, sinks=1)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(q, k, v), f(q, k, v))


def test_explain_and_info():
    q = torch.randn(1, 4, 2, 16)
    assert dk.explain("hierarchical_attention", q).split(":")[0] in ("triton", "reference")
    from deepseek_kernels.info import collect

    assert "hierarchical_attention" in collect()["op_paths"]


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window=48, block=32), "window must be a positive multiple of block=32"),
    (dict(window=64, block=24), "block must be a power of two >= 16"),
    (dict(window=64, block=16, levels=-1), "levels must be None or an int >= 0"),
    (dict(window=64, block=16, sinks=-1), "sinks must be"),
    (dict(window=64, k=torch.randn(1, 8, 3, 16), v=torch.randn(1, 8, 3, 16)), "multiple of the key/value heads"),
    (dict(window=64, k=torch.randn(1, 7, 2, 16), v=torch.randn(1, 7, 2, 16)), "same tokens"),
    (dict(window=64, k=torch.randn(1, 8, 2, 8), v=torch.randn(1, 8, 2, 8)), "head dims differ"),
    (dict(window=64, v=torch.randn(1, 8, 2, 16).double()), "dtype"),
    (dict(window=64, q=torch.randn(8, 2, 16)), r"\[batch, seq, heads, head_dim\]"),
])
def test_bad_input(kwargs, needle):
    args = dict(q=torch.randn(1, 8, 2, 16), k=torch.randn(1, 8, 2, 16), v=torch.randn(1, 8, 2, 16))
    args.update({n: kwargs.pop(n) for n in ("q", "k", "v") if n in kwargs})
    with pytest.raises(ValueError, match=needle):
        dk.hierarchical_attention(args["q"], args["k"], args["v"], **kwargs)


def test_bad_cu_seqlens():
    q = torch.randn(9, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D int32"):
        dk.hierarchical_attention(q, q, q, window=16, block=16, cu_seqlens=torch.tensor([0, 4, 9]))
    with pytest.raises(ValueError, match="never decrease"):
        dk.hierarchical_attention(q, q, q, window=16, block=16, cu_seqlens=torch.tensor([0, 6, 4, 9], dtype=torch.int32))
    cu = torch.tensor([0, 2, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"max_seqlen must be an int >= the longest sequence in cu_seqlens \(7\)"):
        dk.hierarchical_attention(q, q, q, window=16, block=16, cu_seqlens=cu, max_seqlen=4)
