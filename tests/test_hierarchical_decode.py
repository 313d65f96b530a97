"""Decoding against the bounded hierarchical cache reproduces the full-sequence forward, and the
cache stays small."""

import pytest
import torch

import deepseek_kernels.hierarchical_decode as hd
from deepseek_kernels.hierarchical_decode import (
    HierarchicalKVCache,
    hierarchical_attention_decode,
    hierarchical_attention_decode_ref,
    hierarchical_cache_size,
)
from deepseek_kernels.reference.hierarchical_attention import hierarchical_attention_ref
from tests.tolerances import REL_TOL, f32_tol, kernel_rel_tol, rel_error

# conftest.py: on a machine with a GPU (interpreter off) the unmarked tests run on CUDA
KERNEL_TESTS_ON_CUDA = True


@pytest.fixture
def torch_path(monkeypatch):
    """The batched tensor-op path (what a CPU runs without the Triton interpreter)."""
    monkeypatch.setattr(hd, "use_triton", lambda t: False)


def _decode_all(q, k, v, cache, prompt, step, **kw):
    """Prefill ``prompt`` tokens, then append + attend ``step`` tokens at a time to the end."""
    S = q.shape[1]
    cache.prefill(k[:, :prompt], v[:, :prompt])
    outs = []
    for t0 in range(prompt, S, step):
        t1 = min(t0 + step, S)
        cache.append(k[:, t0:t1], v[:, t0:t1])
        outs.append(hierarchical_attention_decode(q[:, t0:t1], cache, **kw))
    return torch.cat(outs, 1)


@pytest.mark.parametrize("window,block,sinks,levels,step,prompt", [
    (16, 16, 0, None, 1, 5),
    (32, 16, 3, None, 1, 40),
    (16, 16, 20, None, 3, 37),  # sinks spanning groups, 3 tokens a step
    (48, 16, 1, 1, 2, 64),  # fewer levels than needed
    (32, 32, 2, None, 5, 100),
    (16, 16, 0, 0, 1, 17),  # block-aligned sliding window
])
def test_decode_reproduces_the_full_forward(window, block, sinks, levels, step, prompt, torch_path):
    B, S, Hq, Hkv, D = 2, 300, 4, 2, 16
    q, k, v = torch.randn(B, S, Hq, D), torch.randn(B, S, Hkv, D), torch.randn(B, S, Hkv, D)
    full = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=levels, sinks=sinks)
    cache = HierarchicalKVCache(B, Hkv, D, window=window, block=block, levels=levels, max_seqlen=S, sinks=sinks,
                                max_step=step, dtype=torch.float32)
    sizes = {t.shape for t in cache.tensors()}
    out = _decode_all(q, k, v, cache, prompt, step)
    torch.testing.assert_close(out, full[:, prompt:], rtol=1e-5, atol=1e-5)
    assert {t.shape for t in cache.tensors()} == sizes  # nothing grows with the context


# Triton kernels under the interpreter: a long prefill (one append launch that keeps only the last
# ring / M groups per level), then a few steps across group boundaries of every level.
TRITON_CASES = [
    # (S, window, block, sinks, levels, step, prompt, num_splits)
    (112, 16, 16, 3, None, 1, 100, 1),  # L=3; 100 > ring: the prefill drops old exact keys and groups
    (61, 16, 16, 20, None, 3, 37, 2),  # sinks spanning groups, 3 tokens a step, 2 splits + merge
    (80, 32, 16, 1, 1, 2, 64, 3),  # fewer levels than needed, 3 splits
    (45, 32, 32, 0, 0, 1, 33, 1),  # levels=0: block-aligned sliding window
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("S,window,block,sinks,levels,step,prompt,splits", TRITON_CASES,
                         ids=lambda c: str(c))
def test_triton_decode_reproduces_the_full_forward(S, window, block, sinks, levels, step, prompt, splits, dtype):
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, S, h, D).to(dtype) for h in (Hq, Hkv, Hkv))
    full = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=levels, sinks=sinks,
                                      compute_dtype=torch.float64)
    cache = HierarchicalKVCache(B, Hkv, D, window=window, block=block, levels=levels, max_seqlen=S, sinks=sinks,
                                max_step=step, dtype=dtype)
    assert "triton" in hd._describe_decode(q.device)
    out = _decode_all(q, k, v, cache, prompt, step, num_splits=splits)
    assert out.dtype == dtype
    assert rel_error(out, full[:, prompt:]) < kernel_rel_tol(dtype, q)


def test_triton_append_equals_the_tensor_path(monkeypatch):
    """The append kernel leaves the cache bit-identical to the batched tensor ops: rows of
    different lengths (one empty), a prefill longer than the ring and than M groups of a level."""
    B, Hkv, D = 3, 2, 8
    kw = dict(window=16, block=16, levels=3, sinks=5, max_step=4, dtype=torch.float32)
    ours, theirs = HierarchicalKVCache(B, Hkv, D, **kw), HierarchicalKVCache(B, Hkv, D, **kw)
    steps = [(torch.tensor([150, 0, 37]), 150), (torch.tensor([1, 4, 3]), 4), (torch.tensor([0, 2, 4]), 4)]
    for lens, T in steps:
        k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
        ours.append(k, v, lengths=lens)
        with monkeypatch.context() as m:
            m.setattr(hd, "use_triton", lambda t: False)
            theirs.append(k, v, lengths=lens)
    names = "k v positions sum_k sum_v group count acc_k acc_v acc_n seqlens".split()
    for name, a, b in zip(names, ours.tensors(), theirs.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    q = torch.randn(B, 4, 4, D)
    torch.testing.assert_close(hierarchical_attention_decode(q, ours, lengths=torch.tensor([0, 2, 4]), num_splits=2),
                               hierarchical_attention_decode_ref(q, theirs, lengths=torch.tensor([0, 2, 4])),
                               rtol=f32_tol(q, 1e-5), atol=f32_tol(q, 1e-5))


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


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_rows_of_different_lengths(path, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(hd, "use_triton", lambda t: False)
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
        torch.testing.assert_close(out[b:b + 1], ref[:, -1:], rtol=f32_tol(q, 1e-5), atol=f32_tol(q, 1e-5))


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


# ---- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("D,Hq,Hkv,sinks,step", [(128, 32, 8, 4, 1), (64, 8, 8, 0, 4), (128, 16, 2, 1, 3)],
                         ids=lambda x: str(x))
def test_gpu_decode_reproduces_the_full_forward(dtype, D, Hq, Hkv, sinks, step):
    """The decode kernels at D=64/128 (float32: TF32 dots, twice the bytes per tile) reproduce the full forward."""
    B, S, W, block, prompt = 2, 3000, 256, 64, 2800  # 5 levels; 200 steps cross groups of every level
    q, k, v = (torch.randn(B, S, h, D, device="cuda", dtype=dtype) for h in (Hq, Hkv, Hkv))
    full = hierarchical_attention_ref(q, k, v, window=W, block=block, sinks=sinks)
    cache = HierarchicalKVCache(B, Hkv, D, window=W, block=block, max_seqlen=S, sinks=sinks, max_step=step,
                                dtype=dtype, device="cuda")
    out = _decode_all(q, k, v, cache, prompt, step)
    assert rel_error(out, full[:, prompt:]) < kernel_rel_tol(dtype, q)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_decode_at_128k_matches_the_tensor_path(dtype):
    """The bench shape (W=4096, block=64, GQA 32/8, D=128) at 128k context: a one-launch prefill,
    then one step; the kernel (any number of splits) against the batched tensor ops."""
    B, S, Hq, Hkv, D = 2, 131072, 32, 8, 128
    kw = dict(window=4096, block=64, max_seqlen=2 * S, sinks=4, dtype=dtype, device="cuda")
    k, v = (torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
    ours, theirs = HierarchicalKVCache(B, Hkv, D, **kw), HierarchicalKVCache(B, Hkv, D, **kw)
    ours.prefill(k, v, lengths=torch.tensor([S, S - 1000], device="cuda"))
    theirs.prefill(k, v, lengths=torch.tensor([S, S - 1000], device="cuda"))  # CUDA: also the kernel
    kn, vn = (torch.randn(B, 1, Hkv, D, device="cuda", dtype=dtype) for _ in range(2))
    ours.append(kn, vn)
    theirs.append(kn, vn)
    q = torch.randn(B, 1, Hq, D, device="cuda", dtype=dtype)
    want = hierarchical_attention_decode_ref(q, theirs)
    for splits in (None, 1, 7):
        torch.full((64 * 2**20,), float("nan"), device="cuda")  # the allocator hands NaN-filled memory out
        got = hierarchical_attention_decode(q, ours, num_splits=splits)
        assert torch.isfinite(got).all() and rel_error(got, want) < REL_TOL[dtype], splits
    assert torch.equal(hierarchical_attention_decode(q, ours), hierarchical_attention_decode(q, ours))


@pytest.mark.gpu
def test_gpu_append_kernel_equals_the_tensor_path(monkeypatch):
    """Prefill of 20k tokens (more groups than the rings hold at the low levels), then steps of
    1..4 tokens with rows of different lengths: the cache state is the tensor path's."""
    B, Hkv, D = 3, 8, 128
    kw = dict(window=1024, block=64, levels=5, sinks=4, max_step=4, dtype=torch.bfloat16, device="cuda")
    ours, theirs = HierarchicalKVCache(B, Hkv, D, **kw), HierarchicalKVCache(B, Hkv, D, **kw)
    steps = [(torch.tensor([20000, 12345, 0]), 20000)] + [(torch.randint(0, 5, (B,)), 4) for _ in range(50)]
    for lens, T in steps:
        k, v = (torch.randn(B, T, Hkv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        ours.append(k, v, lengths=lens.cuda())
        with monkeypatch.context() as m:
            m.setattr(hd, "use_triton", lambda t: False)
            theirs.append(k, v, lengths=lens.cuda())
    for a, b in zip(ours.tensors(), theirs.tensors()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_append_and_decode_bad_input_are_clear_errors():
    cache = HierarchicalKVCache(1, 2, 16, window=32, block=16, levels=1, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"k must be \[B=1, T, 2, 16\]"):
        cache.append(torch.randn(2, 3, 2, 32), torch.randn(2, 3, 2, 32))
    with pytest.raises(ValueError, match="k and v differ"):
        cache.append(torch.randn(1, 3, 2, 16), torch.randn(1, 4, 2, 16))
    with pytest.raises(ValueError, match="lengths must lie in"):
        cache.append(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16), lengths=torch.tensor([10]))
    assert int(cache.seqlens[0]) == 0  # nothing was written
    cache.append(torch.randn(1, 3, 2, 16), torch.randn(1, 3, 2, 16))
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="num_splits"):
        hierarchical_attention_decode(q, cache, num_splits=-1)
    with pytest.raises(ValueError, match="lengths must lie in"):
        hierarchical_attention_decode(q, cache, lengths=torch.tensor([2]))


def test_packed_max_seqlen_below_the_longest_sequence_is_an_error():
    import deepseek_kernels as dk

    cu = torch.tensor([0, 40, 140], dtype=torch.int32)
    q, k, v = torch.randn(140, 2, 16), torch.randn(140, 2, 16), torch.randn(140, 2, 16)
    with pytest.raises(ValueError, match="max_seqlen"):
        dk.hierarchical_attention(q, k, v, window=32, block=16, cu_seqlens=cu, max_seqlen=40)
    out = dk.hierarchical_attention(q, k, v, window=32, block=16, cu_seqlens=cu, max_seqlen=100)
    assert torch.isfinite(out).all()
