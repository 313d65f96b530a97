"""The sliding-window attention reference pins down the op's semantics (issue 3): checked against
SDPA where they coincide and against a brute-force definition of the visibility rule."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_kernels.reference.attention import (
    attended_pairs,
    window_attention_bwd_ref,
    window_attention_ref,
    window_mask,
)

F64 = torch.float64


def brute_mask(sq, sk, window, sinks, causal):
    m = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        p = i + sk - sq
        for j in range(sk):
            if causal:
                m[i, j] = (p - window < j <= p) or (j < sinks and j <= p)
            else:
                m[i, j] = abs(p - j) < window or j < sinks
    return m


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 17), (5, 17), (17, 5), (33, 40)])
@pytest.mark.parametrize("window", [1, 3, 16, 100])
@pytest.mark.parametrize("sinks", [0, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_matches_the_rule(sq, sk, window, sinks, causal):
    m = window_mask(sq, sk, window=window, sinks=sinks, causal=causal)
    assert torch.equal(m, brute_mask(sq, sk, window, sinks, causal))
    if causal and sinks == 0 and sq == sk:
        assert attended_pairs(sq, sk, window=window) == int(m.sum())


def sdpa(q, k, v, causal):
    rep = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (4, 1)])
def test_full_window_is_plain_attention(causal, hq, hkv):
    q, k, v = torch.randn(2, 19, hq, 16, dtype=F64), torch.randn(2, 19, hkv, 16, dtype=F64), torch.randn(2, 19, hkv, 16, dtype=F64)
    out = window_attention_ref(q, k, v, window=19, causal=causal, compute_dtype=F64)
    torch.testing.assert_close(out, sdpa(q, k, v, causal))


def test_window_one_sees_only_itself_and_sinks_stay_visible():
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=F64) for _ in range(3))
    torch.testing.assert_close(window_attention_ref(q, k, v, window=1, compute_dtype=F64), v)
    out, lse = window_attention_ref(q, k, v, window=2, sinks=3, return_lse=True, compute_dtype=F64)
    i = 10  # sees sinks 0, 1, 2 and the window 9, 10
    keys = [0, 1, 2, 9, 10]
    s = torch.einsum("hd,khd->hk", q[0, i], k[0, keys]) * 8**-0.5
    torch.testing.assert_close(lse[0, :, i].double(), torch.logsumexp(s, -1))
    torch.testing.assert_close(out[0, i], torch.einsum("hk,khd->hd", torch.softmax(s, -1), v[0, keys]))


def test_more_queries_than_keys_gives_zero_and_minus_inf():
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8)
    out, lse = window_attention_ref(q, k, v, window=3, return_lse=True)
    # query i sits at position i - 2: the first two see no key
    assert (out[0, :2] == 0).all() and torch.isinf(lse[0, :, :2]).all() and torch.isfinite(lse[0, :, 2:]).all()


def test_varlen_equals_per_sequence():
    lens = [5, 0, 1, 17, 9]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    out, lse = window_attention_ref(q, k, v, window=4, sinks=1, cu_seqlens_q=cu, cu_seqlens_k=cu, return_lse=True)
    for n, L in enumerate(lens):
        if L == 0:
            continue
        a, b = int(cu[n]), int(cu[n + 1])
        o, l = window_attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], window=4, sinks=1, return_lse=True)
        torch.testing.assert_close(out[a:b], o[0])
        torch.testing.assert_close(lse[:, a:b], l[0])


@pytest.mark.parametrize("causal", [True, False])
def test_closed_form_backward_equals_autograd(causal):
    q, k, v = torch.randn(2, 15, 4, 8, dtype=F64), torch.randn(2, 12, 2, 8, dtype=F64), torch.randn(2, 12, 2, 8, dtype=F64)
    do = torch.randn(2, 15, 4, 8, dtype=F64)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    window_attention_ref(qr, kr, vr, window=3, sinks=2, causal=causal, compute_dtype=F64).backward(do)
    dq, dk, dv = window_attention_bwd_ref(do, q, k, v, window=3, sinks=2, causal=causal, compute_dtype=F64)
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        torch.testing.assert_close(got, want)
