"""Decoding token by token against the rolling cache reproduces the full-sequence forward."""

import pytest
import torch

import deepseek_kernels as dk
from deepseek_kernels.decode import RollingKVCache, window_attention_decode


@pytest.mark.parametrize("window,sinks,step", [(4, 0, 1), (5, 2, 1), (6, 3, 3), (64, 1, 2)])
def test_decode_reproduces_the_full_forward(window, sinks, step):
    torch.manual_seed(0)
    B, S, Hq, Hkv, D, prompt = 2, 29, 4, 2, 16, 11
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    full = dk.window_attention(q, k, v, window=window, sinks=sinks)
    cache = RollingKVCache(B, Hkv, D, window=window, sinks=sinks, max_step=step, dtype=torch.float32)
    cache.prefill(k[:, :prompt], v[:, :prompt])
    outs = []
    for t0 in range(prompt, S, step):
        t1 = min(t0 + step, S)
        cache.append(k[:, t0:t1], v[:, t0:t1])
        outs.append(window_attention_decode(q[:, t0:t1], cache))
    torch.testing.assert_close(torch.cat(outs, 1), full[:, prompt:], rtol=1e-5, atol=1e-5)
    # memory does not grow with the context
    assert cache.k.shape[1] == sinks + window + step - 1


def test_sequences_of_different_lengths_in_one_batch():
    torch.manual_seed(1)
    window, sinks, D = 5, 1, 16
    lens = torch.tensor([7, 13])
    k, v, q = torch.randn(2, 13, 2, D), torch.randn(2, 13, 2, D), torch.randn(2, 1, 2, D)
    cache = RollingKVCache(2, 2, D, window=window, sinks=sinks, dtype=torch.float32)
    cache.prefill(k, v, lengths=lens)
    knew, vnew = torch.randn(2, 1, 2, D), torch.randn(2, 1, 2, D)
    cache.append(knew, vnew)
    out = window_attention_decode(q, cache)
    for b, L in enumerate(lens.tolist()):
        kk = torch.cat([k[b:b + 1, :L], knew[b:b + 1]], 1)
        vv = torch.cat([v[b:b + 1, :L], vnew[b:b + 1]], 1)
        ref = dk.window_attention(q[b:b + 1], kk, vv, window=window, sinks=sinks)  # Sq=1 aligned to the end
        torch.testing.assert_close(out[b:b + 1], ref, rtol=1e-5, atol=1e-5)


def test_bad_configuration():
    with pytest.raises(ValueError, match="window"):
        RollingKVCache(1, 1, 8, window=0)
    cache = RollingKVCache(1, 1, 8, window=4, max_step=1, dtype=torch.float32)
    cache.append(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))
    with pytest.raises(ValueError, match="max_step"):
        window_attention_decode(torch.randn(1, 2, 1, 8), cache)
