"""The Triton hierarchical attention kernels (pooling, forward, backward) against the reference:
under the Triton interpreter on CPU (fp32/fp16, small sizes) and, marked gpu, on a CUDA GPU."""

import pytest
import torch

from deepseek_kernels.reference.hierarchical_attention import (
    hierarchical_attention_bwd_ref,
    hierarchical_attention_ref,
    pool_ref,
    resolve_levels,
    summary_layout,
)
from deepseek_kernels.triton.hierarchical_attention import (
    bwd_launch_config,
    hierarchical_attention_bwd,
    hierarchical_attention_fwd,
    hierarchical_pool,
)
from tests.tolerances import REL_TOL, f32_tol, kernel_rel_tol, rel_error

# conftest.py: on a machine with a GPU (interpreter off) the unmarked tests run on CUDA
KERNEL_TESTS_ON_CUDA = True

CASES = [
    # (B, S, Hq, Hkv, D, window, block, sinks, levels)
    (1, 1, 2, 2, 16, 16, 16, 0, None),
    (1, 70, 2, 2, 16, 16, 16, 0, None),
    (2, 131, 4, 1, 16, 32, 16, 3, None),  # GQA 4, not a multiple of block
    (1, 150, 2, 1, 24, 16, 16, 0, 1),  # head dim padded, fewer levels than needed
    (1, 97, 2, 2, 16, 16, 16, 40, None),  # sinks spanning several groups
    (1, 100, 2, 2, 16, 48, 16, 2, 0),  # levels=0: block-aligned sliding window
    (1, 140, 2, 2, 16, 32, 32, 1, None),  # block 32, window = block
]


def case_id(c):
    return "B{}-S{}-H{}/{}-D{}-W{}-blk{}-sinks{}-L{}".format(*c)


def make(B, S, Hq, Hkv, D, dtype=torch.float32, device=None):
    return (torch.randn(B, S, Hq, D, device=device).to(dtype), torch.randn(B, S, Hkv, D, device=device).to(dtype),
            torch.randn(B, S, Hkv, D, device=device).to(dtype), torch.randn(B, S, Hq, D, device=device).to(dtype))


@pytest.mark.parametrize("block,sinks", [(16, 3), (16, 40), (32, 0)])
def test_pooling_matches_reference_per_sequence(block, sinks):
    """Sinks inside one group and spanning groups; head dim padded."""
    lens = [40, 0, 1, 97, 33, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T, levels = int(cu[-1]), 3
    k, v = torch.randn(T, 2, 8), torch.randn(T, 2, 8)
    sk, sv = hierarchical_pool(k, v, cu, block=block, levels=levels, sinks=sinks, max_seqlen=max(lens))
    checked = 0
    for n, L in enumerate(lens):
        a = int(cu[n])
        if L == 0:
            continue
        mk, _ = pool_ref(k[a:a + L], block=block, levels=levels, sinks=sinks)
        mv, _ = pool_ref(v[a:a + L], block=block, levels=levels, sinks=sinks)
        off = {l: sum(T // (block << m) + len(lens) for m in range(1, l)) for l in range(1, levels + 1)}
        for r, (l, g, _) in enumerate(summary_layout(L, block=block, levels=levels, sinks=sinks)):
            row = off[l] + a // (block << l) + n + g
            torch.testing.assert_close(sk[row], mk[r], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(sv[row], mv[r], rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked == sum(len(summary_layout(L, block=block, levels=levels)) for L in lens)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_matches_reference(case, dtype):
    B, S, Hq, Hkv, D, window, block, sinks, levels = case
    q, k, v, _ = make(B, S, Hq, Hkv, D, dtype)
    L = resolve_levels(levels, S, window=window, block=block)
    out, lse = hierarchical_attention_fwd(q, k, v, window=window, block=block, levels=L, sinks=sinks, block_n=16)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=levels, sinks=sinks,
                                              return_lse=True, compute_dtype=torch.float64)
    assert out.dtype == dtype and rel_error(out, ref) < kernel_rel_tol(dtype, q)
    assert (lse - ref_lse).abs().max() < (f32_tol(q, 1e-4, 1e-2) if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_reference(case):
    B, S, Hq, Hkv, D, window, block, sinks, levels = case
    q, k, v, do = make(B, S, Hq, Hkv, D)
    L = resolve_levels(levels, S, window=window, block=block)
    kw = dict(window=window, block=block, levels=L, sinks=sinks)
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=16, **kw)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, block_n=16, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3) or (g.double() - w).abs().max() < f32_tol(q, 1e-6), name


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] != 0] + [(1, 301, 2, 1, 16, 16, 16, 5, None)],
                         ids=case_id)
def test_summary_tiles_packed_across_levels(case):
    """Forward and dQ with summary tiles spanning level boundaries (16-wide: most tiles straddle one)
    give the reference's results."""
    B, S, Hq, Hkv, D, window, block, sinks, levels = case
    q, k, v, do = make(B, S, Hq, Hkv, D)
    kw = dict(window=window, block=block, levels=resolve_levels(levels, S, window=window, block=block), sinks=sinks)
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=16, block_s=16, **kw)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, return_lse=True, compute_dtype=torch.float64, **kw)
    assert rel_error(out, ref) < f32_tol(q, 1e-5) and (lse - ref_lse).abs().max() < f32_tol(q, 1e-4, 1e-2)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, block_n=16, config={"dq": {"block_s": 16}},
                                     **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3) or (g.double() - w).abs().max() < f32_tol(q, 1e-6), name


def test_summary_tiles_packed_across_levels_varlen():
    lens = [37, 0, 1, 200, 16]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v, do = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16), torch.randn(T, 4, 16)
    kw = dict(window=16, block=16, levels=resolve_levels(None, max(lens), window=16, block=16), sinks=2,
              cu_seqlens=cu, max_seqlen=max(lens))
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=16, block_s=16, **kw)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, return_lse=True, compute_dtype=torch.float64,
                                              **{k_: v_ for k_, v_ in kw.items() if k_ != "max_seqlen"})
    assert rel_error(out, ref) < f32_tol(q, 1e-5) and (lse - ref_lse).abs().max() < f32_tol(q, 1e-4, 1e-2)
    dq = hierarchical_attention_bwd(do, q, k, v, out, lse, block_n=16, config={"dq": {"block_s": 16}},
                                    **kw)[0]
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **{k_: v_ for k_, v_ in kw.items() if k_ != "max_seqlen"})[0]
    assert rel_error(dq, want) < f32_tol(q, 1e-5, 5e-3)


@pytest.mark.parametrize("block_n", [32, 64])
def test_key_tiles_wider_than_a_block(block_n):
    """Key tiles that straddle the local window's start (and the sinks) are visited once."""
    q, k, v, do = make(1, 150, 2, 1, 16)
    kw = dict(window=32, block=16, levels=2, sinks=19)
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=block_n, **kw)
    ref = hierarchical_attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    assert rel_error(out, ref) < f32_tol(q, 1e-5)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, block_n=block_n, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for g, w in zip(got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3)


@pytest.mark.parametrize("config", [
    {"dq": {"block_m": 16, "block_n": 32, "block_s": 16}, "dkdv": {"block_m": 16, "block_n": 16},
     "dsum": {"block_m": 16, "block_s": 32}},
    {"dsum": {"block_s": 64}, "dq": {"block_s": 32}},
    {"dsum": {"chunk": 1}},                    # every level's scan split into 1-block chunks, summed after
    {"dsum": {"chunk": 3, "block_s": 32}},     # uneven last chunk
    {"dsum": {"chunk": 0}},                    # never split
    {"dkdv": {"bcast": False}},                # pooling backward gathered per key at every level
    {"dkdv": {"bcast": True}},                 # (the default) 64-key tiles: level 1 per key, level >= 2 broadcast
    {"dkdv": {"block_n": 16, "block_m": 16}},  # every level broadcast
], ids=["small-tiles", "wide-summary-tiles", "dsum-chunk1", "dsum-chunk3", "dsum-unsplit", "dkdv-per-key",
        "dkdv-bcast", "dkdv-bcast-narrow"])
def test_backward_per_kernel_configs(config):
    """The per-kernel launch settings the tuner sweeps (tiles narrower and wider than a block, summary
    tiles spanning several levels' groups) give the reference's gradients; bad names are rejected."""
    q, k, v, do = make(2, 131, 4, 1, 16)
    kw = dict(window=32, block=16, levels=resolve_levels(None, 131, window=32, block=16), sinks=3)
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=16, **kw)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, config=config, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3), name
    with pytest.raises(ValueError, match="unknown kernel"):
        hierarchical_attention_bwd(do, q, k, v, out, lse, config={"dx": {}}, **kw)
    with pytest.raises(ValueError, match="unknown key"):
        hierarchical_attention_bwd(do, q, k, v, out, lse, config={"dsum": {"block_n": 16}}, **kw)
    with pytest.raises(ValueError, match="chunk must be"):
        hierarchical_attention_bwd(do, q, k, v, out, lse, config={"dsum": {"chunk": -1}}, **kw)
    with pytest.raises(ValueError, match="must divide block=16"):
        hierarchical_attention_bwd(do, q, k, v, out, lse, config={"dkdv": {"block_m": 32}}, **kw)


def test_backward_default_tiles_at_many_levels():
    """From 6 levels on the default dsum tiles are 32 summaries wide (fewer q/dO re-reads: S=524288 on
    the H200), 16 below; the default backward at 6 levels still gives the reference's gradients."""
    assert bwd_launch_config(64, 4096, 128, levels=5)["dsum"]["block_s"] == 16
    assert bwd_launch_config(64, 4096, 128, levels=6)["dsum"]["block_s"] == 32
    q, k, v, do = make(1, 700, 2, 1, 16)
    kw = dict(window=16, block=16, levels=resolve_levels(None, 700, window=16, block=16), sinks=1)
    assert kw["levels"] == 6
    out, lse = hierarchical_attention_fwd(q, k, v, block_n=16, **kw)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3), name


def test_varlen_forward_and_backward():
    lens = [37, 0, 1, 120, 16]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v, do = torch.randn(T, 4, 16), torch.randn(T, 2, 16), torch.randn(T, 2, 16), torch.randn(T, 4, 16)
    kw = dict(window=16, block=16, levels=resolve_levels(None, max(lens), window=16, block=16), sinks=2)
    out, lse = hierarchical_attention_fwd(q, k, v, cu_seqlens=cu, max_seqlen=max(lens), block_n=16, **kw)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, cu_seqlens=cu, return_lse=True, compute_dtype=torch.float64,
                                              **kw)
    assert rel_error(out, ref) < f32_tol(q, 1e-5) and (lse - ref_lse).abs().max() < f32_tol(q, 1e-4, 1e-2)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, cu_seqlens=cu, max_seqlen=max(lens), block_n=16, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), cu_seqlens=cu,
                                          compute_dtype=torch.float64, **kw)
    for g, w in zip(got, want):
        assert rel_error(g, w) < f32_tol(q, 1e-5, 5e-3)


def test_strided_inputs():
    base = torch.randn(1, 90, 3, 2, 16)
    q, k, v = base[:, :, 0], base[:, :, 1], base[:, :, 2]  # last dim contiguous, heads strided
    out, _ = hierarchical_attention_fwd(q, k, v, window=16, block=16, levels=3, sinks=1, block_n=16)
    ref = hierarchical_attention_ref(q, k, v, window=16, block=16, levels=3, sinks=1, compute_dtype=torch.float64)
    assert rel_error(out, ref) < f32_tol(q, 1e-5)


# ---- on a GPU -------------------------------------------------------------------------------------------


def _poisoned(fn, *args, **kwargs):
    """Runs fn after filling the allocator's free memory with NaN, so an unwritten output shows up."""
    junk = torch.full((64 * 2**20,), float("nan"), device="cuda")
    del junk
    return fn(*args, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128, 80])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("S,window,block,sinks,hkv", [(1000, 256, 64, 0, 2), (4097, 512, 64, 4, 8), (777, 128, 32, 1, 1)])
def test_gpu_forward_backward(D, dtype, S, window, block, sinks, hkv):
    q, k, v, do = make(1, S, 8, hkv, D, dtype, "cuda")
    L = resolve_levels(None, S, window=window, block=block)
    kw = dict(window=window, block=block, levels=L, sinks=sinks)
    out, lse = _poisoned(hierarchical_attention_fwd, q, k, v, **kw)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, return_lse=True, **kw)
    assert rel_error(out, ref) < REL_TOL[dtype] and (lse - ref_lse).abs().max() < 2e-2
    got = _poisoned(hierarchical_attention_bwd, do, q, k, v, out, lse, **kw)
    want = hierarchical_attention_bwd_ref(do, q, k, v, **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < 2 * REL_TOL[dtype], name
    # deterministic: no atomics, and no compiler race (4 warps at D=128 gave differing dK on Triton 3.6)
    for _ in range(4):
        again = hierarchical_attention_bwd(do, q, k, v, out, lse, **kw)
        assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
@pytest.mark.parametrize("S,window,block,sinks,hkv", [(4097, 512, 64, 4, 8), (777, 128, 32, 1, 1)])
def test_gpu_pooling_backward_per_key(S, window, block, sinks, hkv):
    """The non-default pooling backward on the GPU (``dkdv.bcast`` False: gathered per key at every
    level): reference results, and the same bits on every call."""
    q, k, v, do = make(1, S, 8, hkv, 128, torch.bfloat16, "cuda")
    kw = dict(window=window, block=block, levels=resolve_levels(None, S, window=window, block=block), sinks=sinks)
    out, lse = hierarchical_attention_fwd(q, k, v, **kw)
    ref, ref_lse = hierarchical_attention_ref(q, k, v, return_lse=True, **kw)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16] and (lse - ref_lse).abs().max() < 2e-2
    variants = {"dkdv": {"bcast": False}}
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, config=variants, **kw)
    want = hierarchical_attention_bwd_ref(do, q, k, v, **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < 2 * REL_TOL[torch.bfloat16], name
    again = hierarchical_attention_bwd(do, q, k, v, out, lse, config=variants, **kw)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.gpu
def test_gpu_fp32_at_the_default_tiles():
    """float32 inputs at D=128 with the defaults tuned for bf16 (twice the bytes per tile in shared memory): the
    kernels must launch, and match the reference within the documented TF32 tolerance."""
    q, k, v, do = make(1, 2048, 8, 2, 128, torch.float32, "cuda")
    kw = dict(window=512, block=64, levels=resolve_levels(None, 2048, window=512, block=64), sinks=4)
    out, lse = hierarchical_attention_fwd(q, k, v, **kw)
    ref = hierarchical_attention_ref(q, k, v, compute_dtype=torch.float64, **kw)
    assert rel_error(out, ref) < f32_tol(q, 1e-5)
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, **kw)
    want = hierarchical_attention_bwd_ref(do.double(), q.double(), k.double(), v.double(), compute_dtype=torch.float64,
                                          **kw)
    for name, g, w in zip("q k v".split(), got, want):
        assert rel_error(g, w) < 2 * f32_tol(q, 1e-5), name


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    lens = [3000, 0, 1, 64, 1500, 129]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    T = int(cu[-1])
    mk = lambda h: torch.randn(T, h, 128, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    q, k, v, do = mk(16), mk(4), mk(4), mk(16)
    kw = dict(window=256, block=64, levels=resolve_levels(None, max(lens), window=256, block=64), sinks=4)
    out, lse = hierarchical_attention_fwd(q, k, v, cu_seqlens=cu, max_seqlen=max(lens), **kw)
    ref = hierarchical_attention_ref(q, k, v, cu_seqlens=cu, **kw)
    assert rel_error(out, ref) < REL_TOL[torch.bfloat16]
    got = hierarchical_attention_bwd(do, q, k, v, out, lse, cu_seqlens=cu, max_seqlen=max(lens), **kw)
    want = hierarchical_attention_bwd_ref(do, q, k, v, cu_seqlens=cu, **kw)
    for g, w in zip(got, want):
        assert rel_error(g, w) < 2 * REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("nw,levels", [(1, 3), (2, 1), (3, 4), (8, 2), (64, 3)])
def test_dsum_scans_exactly_the_query_blocks_that_see_its_groups(nw, levels):
    """The summary-gradient kernel's query range for a tile of groups spans the union of the blocks
    that see any of them (one block less at either end misses a gradient, one more is waste), and
    inside it the kernel skips exactly the blocks that see none (gaps when nw is small)."""
    from deepseek_kernels.reference.hierarchical_attention import level_starts
    from deepseek_kernels.triton.hierarchical_attention import dsum_query_blocks

    nb = 4 * nw << levels  # every level's groups seen in full
    starts = [level_starts(b, window=16 * nw, block=16, levels=levels) for b in range(nb)]
    for level in range(1, levels + 1):
        ng = nb >> level
        seen = [[] for _ in range(ng)]
        for b in range(nb):  # block b sees the level's groups g with s_l <= g 2^l and (g + 1) 2^l <= s_{l-1}
            for g in range(starts[b][level] >> level, starts[b][level - 1] >> level):
                seen[g].append(b)
        for tile in (1, 4, 16):
            for g0 in range(0, ng - tile, tile):
                blocks = sorted({b for g in range(g0, g0 + tile) for b in seen[g]})
                if not blocks or blocks[-1] == nb - 1:  # the last groups: clipped at the sequence end
                    continue
                lo, hi = dsum_query_blocks(g0, g0 + tile - 1, level=level, nw=nw, levels=levels)
                assert (lo, hi) == (blocks[0], blocks[-1]), (level, g0, tile)
                # inside, the kernel's skip test: block b's run of groups [s_l >> l, s_{l-1} >> l) meets the tile
                runs = [max(starts[b][level] >> level, g0) < min(starts[b][level - 1] >> level, g0 + tile)
                        for b in range(lo, hi + 1)]
                assert runs == [b in blocks for b in range(lo, hi + 1)], (level, g0, tile)
                if nw == 1 and tile == 16:
                    assert not all(runs)  # gaps exist, so the skip matters
