"""Decoding against the bounded hierarchical cache reproduces the full-sequence forward, and the
cache stays small."""

import pytest
import torch

from deepseek_kernels.hierarchical_decode import (
    HierarchicalKVCache,
    hierarchical_attention_decode,
    hierarchical_cache_size,
)
from deepseek_kernels.reference.hierarchical_attention import hierarchical_attention_ref


@pytest.mark.parametrize("window,block,sinks,levels,step,prompt", [
    (16, 16, 0, None, 1, 5),
    (32, 16, 3, None, 1, 40),
    (16, 16, 20, None, 3, 37),  # sinks spanning groups, 3 tokens a step
    (48, 16, 1, 1, 2, 64),  # fewer levels than needed
    (32, 32, 2, None, 5, 100),
    (16, 16, 0, 0, 1, 17),  # block-aligned sliding window
])
def test_decode_reproduces_the_full_forward(window, block, sinks, levels, step, prompt):
    B, S, Hq, Hkv, D = 2, 300, 4, 2, 16
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    full = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=levels, sinks=sinks)
    cache = HierarchicalKVCache(B, Hkv, D, window=window, block=block, levels=levels, max_seqlen=S, sinks=sinks,
                                max_step=step, dtype=torch.float32)
    sizes = {t.shape for t in cache.tensors()}
    cache.prefill(k[:, :prompt], v[:, :prompt])
    outs = []
    for t0 in range(prompt, S, step):
        t1 = min(t0 + step, S)
        cache.append(k[:, t0:t1], v[:, t0:t1])
        outs.append(hierarchical_attention_decode(q[:, t0:t1], cache))
    torch.testing.assert_close(torch.cat(outs, 1), full[:, prompt:], rtol=1e-5, atol=1e-5)
    assert {t.shape for t in cache.tensors()} == sizes  # nothing grows with the context


@pytest.mark.parametrize("nw", [1, 2, 3, 8])
def test_group_ring_holds_every_group_a_query_sees(nw):
    """The newest complete level-l group and the oldest one a query of block b sees are at most
    nw + 1 groups apart (the cache's ring size for one token a step)."""
    from deepseek_kernels.reference.hierarchical_attention import level_starts

    worst = 0
    for levels in (1, 2, 5):
        for b in range(600):
            s = level_starts(b, window=16 * nw, block=16, levels=levels)
            for l in range(1, levels + 1):
                if s[l - 1] >> l > s[l] >> l:  # the level has groups
                    newest = ((b + 1) >> l) - 1  # after the block's last token
                    worst = max(worst, newest - (s[l] >> l) + 1)
    assert worst == nw + 1 == HierarchicalKVCache(1, 1, 8, window=16 * nw, block=16, levels=1).group_slots


def test_rows_of_different_lengths():
    window, block, sinks, D = 16, 16, 2, 16
    lens = torch.tensor([70, 133])
    k, v = torch.randn(2, 133, 2, D), torch.randn(2, 133, 2, D)
    q = torch.randn(2, 1, 4, D)
    cache = HierarchicalKVCache(2, 2, D, window=window, block=block, max_seqlen=200, sinks=sinks, dtype=torch.float32)
    cache.prefill(k, v, lengths=lens)
    knew, vnew = torch.randn(2, 1, 2, D), torch.randn(2, 1, 2, D)
    cache.append(knew, vnew)
    out = hierarchical_attention_decode(q, cache)
    for b, L in enumerate(lens.tolist()):
        kk = torch.cat([k[b:b + 1, :L], knew[b:b + 1]], 1)
        vv = torch.cat([v[b:b + 1, :L], vnew[b:b + 1]], 1)
        qq = torch.cat([torch.randn(1, L, 4, D), q[b:b + 1]], 1)  # only the last query is compared
        ref = hierarchical_attention_ref(qq, kk, vv, window=window, block=block, levels=cache.levels, sinks=sinks)
        torch.testing.assert_close(out[b:b + 1], ref[:, -1:], rtol=1e-5, atol=1e-5)


def test_cache_is_at_least_90_percent_smaller_at_100k():
    r = hierarchical_cache_size(100_000, window=4096, block=64, sinks=4, num_kv_heads=8, head_dim=128)
    assert r["levels"] == 5 and r["reduction"] >= 0.90, r
    # O(window + (window / block) levels): doubling the context adds one level, not memory in proportion
    r2 = hierarchical_cache_size(200_000, window=4096, block=64, sinks=4, num_kv_heads=8, head_dim=128)
    assert r2["levels"] == 6 and r2["cache_bytes"] < 1.05 * r["cache_bytes"]


def test_bad_configuration():
    with pytest.raises(ValueError, match="max_seqlen"):
        HierarchicalKVCache(1, 1, 8, window=16, block=16)
    with pytest.raises(ValueError, match="window must be a positive multiple of block"):
        HierarchicalKVCache(1, 1, 8, window=24, block=16, levels=1)
    cache = HierarchicalKVCache(1, 1, 8, window=16, block=16, levels=1, dtype=torch.float32)
    cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="max_step"):
        hierarchical_attention_decode(torch.randn(1, 2, 1, 8), cache)
