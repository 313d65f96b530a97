"""The hierarchical attention definition: coverage (every past key seen exactly once, no
look-ahead), per-query cost, the reduction to block-aligned sliding windows, and the reference's
forward/backward against independent per-query computations."""

import math

import pytest
import torch

from deepseek_kernels.reference.attention import window_attention_ref
from deepseek_kernels.reference.hierarchical_attention import (
    check_config,
    exact_keys,
    group_count,
    hierarchical_attention_bwd_ref,
    hierarchical_attention_ref,
    level_starts,
    levels_needed,
    seen_per_query,
    visible_summaries,
)

# (S, window, block, sinks)
COVERAGE = [
    (1, 16, 16, 0), (17, 16, 16, 0), (100, 16, 16, 3), (257, 32, 16, 0), (1000, 48, 16, 5),
    (1000, 64, 16, 0), (4097, 128, 32, 4), (3000, 16, 16, 40), (2048, 256, 64, 0), (5000, 192, 64, 1),
    (700, 16, 16, 700),
]


def covered(i, *, S, window, block, levels, sinks):
    """The keys query i sees, as a list with one entry per time a key is counted."""
    keys = exact_keys(i, window=window, block=block, levels=levels, seqlen=S, sinks=sinks)
    for l, g in visible_summaries(i // block, window=window, block=block, levels=levels, seqlen=S, sinks=sinks):
        size = block << l
        keys += [j for j in range(g * size, (g + 1) * size) if j >= sinks]
    return keys


@pytest.mark.parametrize("S,window,block,sinks", COVERAGE, ids=lambda c: str(c))
def test_every_past_key_is_seen_exactly_once(S, window, block, sinks):
    for b in range(-(-S // block)):
        for i in sorted({b * block, min((b + 1) * block, S) - 1}):
            keys = covered(i, S=S, window=window, block=block, levels=None, sinks=sinks)
            assert sorted(keys) == list(range(i + 1)), (b, i)
        # no look-ahead: summaries hold only keys strictly older than the block's first query
        for l, g in visible_summaries(b, window=window, block=block, levels=None, seqlen=S, sinks=sinks):
            assert (g + 1) * (block << l) <= b * block
            assert (g + 1) * (block << l) <= S  # complete groups only


@pytest.mark.parametrize("S,window,block,sinks", COVERAGE[:8], ids=lambda c: str(c))
@pytest.mark.parametrize("levels", [0, 1, 2])
def test_finite_levels_see_a_suffix_once(S, window, block, sinks, levels):
    for b in range(-(-S // block)):
        s = level_starts(b, window=window, block=block, levels=levels)
        i = min((b + 1) * block, S) - 1
        keys = covered(i, S=S, window=window, block=block, levels=levels, sinks=sinks)
        want = sorted(set(range(min(sinks, i + 1))) | set(range(s[-1] * block, i + 1)))
        assert sorted(keys) == want


@pytest.mark.parametrize("S,window,block,sinks", COVERAGE, ids=lambda c: str(c))
def test_cost_per_query(S, window, block, sinks):
    """At most (nw + 1) blocks + sinks exact keys and nw // 2 + 2 summaries per level, with
    ceil(log2(S / window)) levels: O(window + (window / block) log2(S / window))."""
    nw = window // block
    L = levels_needed(S, window=window, block=block)
    assert L == max(0, math.ceil(math.log2(math.ceil(S / block) / nw)))
    exact, summaries = seen_per_query(S, window=window, block=block, levels=None, sinks=sinks)
    assert exact <= (nw + 1) * block + sinks
    assert summaries <= (nw // 2 + 2) * L
    for b in range(-(-S // block)):
        per_level = {}
        for l, _ in visible_summaries(b, window=window, block=block, levels=None, seqlen=S, sinks=sinks):
            per_level[l] = per_level.get(l, 0) + 1
        assert max(per_level.values(), default=0) <= nw // 2 + 2


def test_cost_grows_with_log_length():
    """Doubling S past the window adds one level, not more work per query."""
    window, block = 256, 64
    counts = [sum(seen_per_query(S, window=window, block=block, levels=None)) for S in (1024, 2048, 4096, 8192)]
    steps = [b - a for a, b in zip(counts, counts[1:])]
    assert all(0 < d <= window // block // 2 + 2 for d in steps), counts


def naive(q, k, v, *, window, block, levels, sinks, scale):
    """Per-query oracle built from the enumerators (float64): one sequence [S, H, D], Hq == Hkv."""
    S = q.shape[0]
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], S, dtype=q.dtype)
    for i in range(S):
        keys = exact_keys(i, window=window, block=block, levels=levels, seqlen=S, sinks=sinks)
        kk, vv, bias = [k[keys]], [v[keys]], [torch.zeros(len(keys), dtype=q.dtype)]
        for l, g in visible_summaries(i // block, window=window, block=block, levels=levels, seqlen=S, sinks=sinks):
            size = block << l
            toks = [j for j in range(g * size, (g + 1) * size) if j >= sinks]
            kk.append(k[toks].mean(0, keepdim=True))
            vv.append(v[toks].mean(0, keepdim=True))
            bias.append(torch.tensor([math.log(group_count(l, g, block=block, seqlen=S, sinks=sinks))], dtype=q.dtype))
        kk, vv, bias = torch.cat(kk), torch.cat(vv), torch.cat(bias)
        s = torch.einsum("hd,khd->hk", q[i], kk) * scale + bias
        lse[:, i] = torch.logsumexp(s, -1)
        out[i] = torch.einsum("hk,khd->hd", torch.softmax(s, -1), vv)
    return out, lse


@pytest.mark.parametrize("S,window,block,sinks,levels", [
    (70, 16, 16, 0, None), (130, 32, 16, 3, None), (97, 16, 16, 20, 1), (200, 48, 16, 2, None), (150, 16, 16, 0, 2),
])
def test_reference_matches_the_per_query_definition(S, window, block, sinks, levels):
    q, k, v = (torch.randn(S, 2, 8, dtype=torch.float64) for _ in range(3))
    out, lse = hierarchical_attention_ref(q[None], k[None], v[None], window=window, block=block, levels=levels,
                                          sinks=sinks, return_lse=True, compute_dtype=torch.float64)
    want, want_lse = naive(q, k, v, window=window, block=block, levels=levels, sinks=sinks, scale=8**-0.5)
    torch.testing.assert_close(out[0], want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse[0].double(), want_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("S,window,block", [(100, 32, 16), (129, 16, 16), (300, 64, 32)])
def test_levels_zero_is_block_aligned_sliding_window(S, window, block):
    """levels=0: the queries of block b attend causally to blocks [b - nw + 1, b], i.e. the window
    reference on that slice of keys (ends aligned, window covering the slice)."""
    q, k, v = torch.randn(1, S, 4, 16), torch.randn(1, S, 2, 16), torch.randn(1, S, 2, 16)
    out = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=0, sinks=0)
    for b in range(-(-S // block)):
        q0, q1 = b * block, min((b + 1) * block, S)
        k0 = max(0, (b + 1 - window // block) * block)
        want = window_attention_ref(q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], window=window)
        torch.testing.assert_close(out[:, q0:q1], want, rtol=1e-5, atol=1e-5)


def test_short_sequences_are_full_causal_attention():
    q, k, v = torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 16), torch.randn(2, 50, 4, 16)
    out = hierarchical_attention_ref(q, k, v, window=64, block=16, sinks=3)
    torch.testing.assert_close(out, window_attention_ref(q, k, v, window=50), rtol=1e-5, atol=1e-5)


def test_more_levels_than_needed_change_nothing():
    q, k, v = torch.randn(1, 230, 2, 16), torch.randn(1, 230, 1, 16), torch.randn(1, 230, 1, 16)
    L = levels_needed(230, window=32, block=16)
    a = hierarchical_attention_ref(q, k, v, window=32, block=16, sinks=2)
    for levels in (L, L + 3):
        torch.testing.assert_close(hierarchical_attention_ref(q, k, v, window=32, block=16, levels=levels, sinks=2), a)
    assert not torch.allclose(hierarchical_attention_ref(q, k, v, window=32, block=16, levels=L - 1, sinks=2), a)


def test_varlen_is_per_sequence():
    lens = [40, 0, 1, 97, 33]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16)
    out, lse = hierarchical_attention_ref(q, k, v, window=16, block=16, sinks=2, cu_seqlens=cu, return_lse=True)
    for n in range(len(lens)):
        a, e = int(cu[n]), int(cu[n + 1])
        if e > a:
            # levels=None follows the longest sequence; more levels than a sequence needs change nothing
            o, l = hierarchical_attention_ref(q[None, a:e], k[None, a:e], v[None, a:e], window=16, block=16, sinks=2,
                                              return_lse=True)
            torch.testing.assert_close(out[a:e], o[0])
            torch.testing.assert_close(lse[:, a:e], l[0])


@pytest.mark.parametrize("sinks,levels,cu", [(0, None, None), (3, None, None), (2, 1, None), (1, None, [0, 37, 37, 90])])
def test_closed_form_backward_matches_autograd(sinks, levels, cu):
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    shape = (90,) if cu is not None else (2, 75)
    q = torch.randn(*shape, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(*shape, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(*shape, 2, 8, dtype=torch.float64, requires_grad=True)
    kw = dict(window=16, block=16, levels=levels, sinks=sinks, cu_seqlens=cu, softmax_scale=0.3)
    out = hierarchical_attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    do = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v), do)
    got = hierarchical_attention_bwd_ref(do, q.detach(), k.detach(), v.detach(), compute_dtype=torch.float64, **kw)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(window=48, block=32), "window must be a positive multiple of block"),
    (dict(window=0, block=16), "window must be"),
    (dict(window=64, block=24), "block must be a power of two >= 16"),
    (dict(window=64, block=8), "block must be a power of two >= 16"),
    (dict(window=64, block=16, levels=-1), "levels must be"),
    (dict(window=64, block=16, sinks=-2), "sinks must be"),
])
def test_bad_configuration(kwargs, needle):
    kwargs.setdefault("levels", None)
    kwargs.setdefault("sinks", 0)
    with pytest.raises(ValueError, match=needle):
        check_config(kwargs["window"], kwargs["block"], kwargs["levels"], kwargs["sinks"])
