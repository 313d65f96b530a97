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
    assert cache.k.shape[1] == sinks + window + step - 1 + 1  # + the discard slot


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


# ---- the Triton decode kernels against the plain-tensor definition -----------------------------------

from deepseek_kernels.decode import window_attention_decode_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _filled_cache(B, Hkv, D, window, sinks, step, lens, dtype):
    cache = RollingKVCache(B, Hkv, D, window=window, sinks=sinks, max_step=step, dtype=dtype, device=DEV)
    S = int(max(lens))
    cache.prefill(torch.randn(B, S, Hkv, D, device=DEV), torch.randn(B, S, Hkv, D, device=DEV),
                  lengths=torch.tensor(lens, device=DEV))
    return cache


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("splits", [1, 3, None])
def test_decode_kernel_matches_definition(rep, T, splits):
    from deepseek_kernels.triton.window_decode import window_decode

    torch.manual_seed(2)
    Hkv, D, window, sinks = 2, 16, 37, 3
    # rows: one shorter than the window (empty slots), one long enough to wrap the ring several times
    cache = _filled_cache(2, Hkv, D, window, sinks, T, [20, 150], torch.float32)
    cache.append(torch.randn(2, T, Hkv, D, device=DEV), torch.randn(2, T, Hkv, D, device=DEV))
    q = torch.randn(2, T, Hkv * rep, D, device=DEV)
    lengths = torch.full((2,), T, device=DEV, dtype=torch.int64)
    args = (q, cache.k, cache.v, cache.positions, cache.seqlens, lengths)
    got = window_decode(*args, window=window, sinks=sinks, scale=0.3, splits=splits)
    want = window_attention_decode_ref(*args, window, sinks, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decode_kernel_fp16_cache_and_padded_head_dim():
    from deepseek_kernels.triton.window_decode import window_decode

    torch.manual_seed(3)
    cache = _filled_cache(3, 1, 24, 16, 0, 2, [1, 9, 40], torch.float16)
    q = torch.randn(3, 2, 2, 24, device=DEV, dtype=torch.float16)
    lengths = torch.tensor([1, 2, 2], device=DEV)  # row 0 only has one new token this step
    args = (q, cache.k, cache.v, cache.positions, cache.seqlens, lengths)
    got = window_decode(*args, window=16, sinks=0, scale=24**-0.5, splits=2)
    want = window_attention_decode_ref(*args, 16, 0, 24**-0.5)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_decode_op_registration():
    cache = _filled_cache(1, 1, 16, 8, 1, 1, [12], torch.float32)
    q = torch.randn(1, 1, 2, 16, device=DEV)
    args = (q, cache.k, cache.v, cache.positions, cache.seqlens, torch.ones(1, dtype=torch.int64, device=DEV), 8, 1, 0.25)
    torch.library.opcheck(torch.ops.deepseek_kernels.window_attention_decode.default, args)
    from deepseek_kernels.ops._registry import interpreting

    want = "triton:" if (q.is_cuda or interpreting()) else "reference:"
    assert dk.explain("window_attention_decode", q).startswith(want)


def test_decode_with_strided_query_and_bad_lengths():
    cache = _filled_cache(2, 2, 16, 9, 1, 2, [30, 12], torch.float32)
    cache.append(torch.randn(2, 2, 2, 16, device=DEV), torch.randn(2, 2, 2, 16, device=DEV))
    q = torch.randn(2, 2, 16, 4, device=DEV).transpose(2, 3)  # [B, T, Hq=4, D=16], stride 4 along D
    assert q.stride(-1) != 1
    torch.testing.assert_close(window_attention_decode(q, cache), window_attention_decode(q.contiguous(), cache),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="lengths must lie in"):
        window_attention_decode(q, cache, lengths=torch.tensor([3, 1], device=DEV))
    with pytest.raises(ValueError, match=r"lengths must be an integer tensor of shape \[B\]"):
        window_attention_decode(q, cache, lengths=torch.tensor([1], device=DEV))
    with pytest.raises(ValueError, match="k and v must both be"):
        cache.append(torch.randn(2, 1, 3, 16, device=DEV), torch.randn(2, 1, 3, 16, device=DEV))


def test_decode_bad_input_is_a_clear_error():
    cache = RollingKVCache(1, 2, 16, window=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not fit the cache"):
        window_attention_decode(torch.randn(1, 1, 3, 16), cache)  # 3 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"\[B, T, Hq, D\]"):
        window_attention_decode(torch.randn(1, 3, 16), cache)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_decode_kernel_on_gpu_long_context(dtype):
    """A 4k window over a 20k-token context, GQA 32/8, D=128: kernel vs definition, and the fast
    eager path vs the registered op, and under torch.compile. float32 too (full-precision dots; twice the
    bytes per tile of the 16-bit cases)."""
    B, Hkv, D, window, sinks = 2, 8, 128, 4096, 4
    cache = _filled_cache(B, Hkv, D, window, sinks, 1, [20000, 5000], dtype)
    cache.append(torch.randn(B, 1, Hkv, D, device="cuda"), torch.randn(B, 1, Hkv, D, device="cuda"))
    q = torch.randn(B, 1, 32, D, device="cuda", dtype=dtype)
    out = window_attention_decode(q, cache)
    lengths = torch.ones(B, dtype=torch.int64, device="cuda")
    want = window_attention_decode_ref(q, cache.k, cache.v, cache.positions, cache.seqlens, lengths, window, sinks, D**-0.5)
    # relative error of the whole output: a window off by one key already gives ~1.9e-2 here
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    assert err < {torch.bfloat16: 8e-3, torch.float16: 2e-3, torch.float32: 1e-5}[dtype], err
    op = torch.ops.deepseek_kernels.window_attention_decode(q, cache.k, cache.v, cache.positions, cache.seqlens,
                                                            lengths, window, sinks, D**-0.5)
    assert torch.equal(op, out)
    compiled = torch.compile(lambda q: window_attention_decode(q, cache), fullgraph=True)
    assert torch.equal(compiled(q), out)


def test_decode_under_torch_compile_fullgraph():
    cache = _filled_cache(2, 2, 16, 6, 1, 1, [9, 20], torch.float32)
    cache.append(torch.randn(2, 1, 2, 16, device=DEV), torch.randn(2, 1, 2, 16, device=DEV))
    q = torch.randn(2, 1, 4, 16, device=DEV)
    compiled = torch.compile(lambda q: window_attention_decode(q, cache), fullgraph=True)
    torch.testing.assert_close(compiled(q), window_attention_decode(q, cache), rtol=1e-5, atol=1e-5)


def test_append_kernel_matches_the_torch_path(monkeypatch):
    """RollingKVCache.append's one-launch kernel (GPU, or the interpreter on CPU) and its torch
    fallback leave the same cache: a prefill longer than the ring, ragged lengths (one row with
    none), sinks, steps of several tokens, and k/v in another dtype than the cache."""
    from deepseek_kernels.ops._registry import interpreting

    if DEV == "cpu" and not interpreting():
        pytest.skip("the append kernel runs on CPU tensors only under TRITON_INTERPRET=1")
    torch.manual_seed(5)
    B, Hkv, D, window, sinks, step = 3, 2, 16, 9, 2, 4
    steps = [(torch.randn(B, 30, Hkv, D, device=DEV), torch.tensor([30, 0, 7], device=DEV))]
    for n in ([4, 1, 0], [2, 4, 3], [1, 1, 1]):
        steps.append((torch.randn(B, step, Hkv, D, device=DEV), torch.tensor(n, device=DEV)))
    caches = []
    for env in ("1", "0"):
        if DEV == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", env)
        cache = RollingKVCache(B, Hkv, D, window=window, sinks=sinks, max_step=step, dtype=torch.float16, device=DEV)
        for kv, n in steps:
            if DEV == "cuda" and env == "0":  # the torch path on a GPU: the same ops as on CPU
                monkeypatch.setattr("deepseek_kernels.decode._use_kernel", lambda q: False)
            cache.append(kv, kv * 2, lengths=n)
        caches.append(cache)
    a, b = caches
    for name in ("k", "v", "positions"):  # the torch path parks dropped tokens in the discard slot
        assert torch.equal(getattr(a, name)[:, :a.slots], getattr(b, name)[:, :b.slots]), name
    assert torch.equal(a.seqlens, b.seqlens) and (a.positions[:, a.slots] == -1).all()
    assert (a.k[:, a.slots] == 0).all()  # the kernel never writes the discard slot
    assert a.seqlens.tolist() == [37, 6, 11]
