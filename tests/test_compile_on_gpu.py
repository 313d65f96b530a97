"""Every Triton-backed op under torch.compile on a GPU (fullgraph), forward and backward, against
the same op run eagerly. On CPU these ops take their reference paths under torch.compile, so only
a GPU exercises inductor's handling of the kernels (e.g. float arguments arrive as fp64 there)."""

import pytest
import torch

import deepseek_kernels as dk

pytestmark = pytest.mark.gpu


def _fwd_bwd(f, *inputs):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = f(*leaves)
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def _compare(f, *inputs, tol=2e-2):
    out_e, grads_e = _fwd_bwd(f, *inputs)
    out_c, grads_c = _fwd_bwd(torch.compile(f, fullgraph=True), *inputs)
    torch.testing.assert_close(out_c.float(), out_e.float(), rtol=tol, atol=tol)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)


def _qkv(S, hq, hkv, D=64, dtype=torch.bfloat16):
    return (torch.randn(2, S, h, D, device="cuda", dtype=dtype) for h in (hq, hkv, hkv))


def test_window_attention_compiled():
    _compare(lambda q, k, v: dk.window_attention(q, k, v, window=64, sinks=2), *_qkv(300, 4, 2))


def test_hierarchical_attention_compiled():
    _compare(lambda q, k, v: dk.hierarchical_attention(q, k, v, window=64, block=32, sinks=1), *_qkv(300, 4, 2))


def test_gated_sparse_ffn_compiled_with_threshold():
    T, D, F_, NB = 64, 128, 512, 16
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    wr = torch.randn(NB, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    wg, wu = (torch.randn(F_, D, device="cuda", dtype=torch.bfloat16) / D**0.5 for _ in range(2))
    wd = torch.randn(D, F_, device="cuda", dtype=torch.bfloat16) / F_**0.5
    _compare(lambda x, wr, wg, wu, wd: dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.5, threshold=0.4),
             x, wr, wg, wu, wd)


def test_gated_sparse_ffn_compiled_large_batch():
    """4100 tokens: the large-batch defaults (tile orders; the persistent TMA down / dx kernels eagerly, the
    plain kernels where torch.compile traces the op) against the eager op."""
    T, D, F_, NB = 4100, 256, 2048, 16
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    wr = torch.randn(NB, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    wg, wu = (torch.randn(F_, D, device="cuda", dtype=torch.bfloat16) / D**0.5 for _ in range(2))
    wd = torch.randn(D, F_, device="cuda", dtype=torch.bfloat16) / F_**0.5
    _compare(lambda x, wr, wg, wu, wd: dk.gated_sparse_ffn(x, wr, wg, wu, wd, active_ratio=0.3), x, wr, wg, wu, wd)


def test_decode_ops_compiled():
    from deepseek_kernels.decode import RollingKVCache
    from deepseek_kernels.hierarchical_decode import HierarchicalKVCache

    kw = dict(device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(1, 700, 2, 64, **kw), torch.randn(1, 700, 2, 64, **kw)
    q = torch.randn(1, 1, 4, 64, **kw)
    rc = RollingKVCache(1, 2, 64, window=128, max_step=1, **kw)
    hc = HierarchicalKVCache(1, 2, 64, window=128, block=32, max_seqlen=1024, **kw)
    rc.prefill(k, v)
    hc.prefill(k, v)
    for fn, cache in ((dk.window_attention_decode, rc), (dk.hierarchical_attention_decode, hc)):
        eager = fn(q, cache)
        compiled = torch.compile(lambda q, fn=fn, cache=cache: fn(q, cache), fullgraph=True)(q)
        torch.testing.assert_close(compiled.float(), eager.float(), rtol=1e-2, atol=1e-2)
