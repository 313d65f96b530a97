"""Triton kernels for hierarchical attention: pooling, forward, backward (the first path of
``deepseek_kernels.hierarchical_attention``; untuned).

Semantics: ``deepseek_kernels/reference/hierarchical_attention.py`` (level starts ``s_l(b)``, exact
local window + sinks, count-weighted summaries with ``+ ln(count)``). Every layout is handled as
packed varlen: a dense ``[B, S, H, D]`` batch is ``[B*S, H, D]`` with ``cu_seqlens = arange(B+1)*S``.

Summary storage. The summaries of all sequences and levels live in one float32 tensor
``[R, Hkv, D]`` for K and one for V. Level ``l`` (group size ``G = block * 2^l``) starts at row
``off_l = sum_{l' < l} (T // G_l' + n)`` (``T`` packed tokens, ``n`` sequences) and sequence ``i``'s
group ``g`` is row ``off_l + cu[i] // G + i + g``: closed form, no prefix sums, and the rows of two
sequences never overlap (``ceil(len_i / G) <= cu[i+1] // G - cu[i] // G + 1``). Summaries are kept in
float32 so pooling a level from the one below does not round at every level; the attention
kernels cast them to the input dtype for the tensor-core dots, as they do the keys.

Kernels:
  _hier_pool_kernel      one level from the level below (level 1 from the keys): count-weighted
                         means, per sequence (never across a boundary). One launch per level.
  _hier_attn_fwd_kernel  one program per (query tile, head): sinks and the local window exactly,
                         then the summaries of each level, in one online softmax; writes lse.
  _hier_bwd_dq           dQ over the same keys and summaries as the forward.
  _hier_bwd_dsum         one program per (tile of summaries of one level, kv head): d(mean K) and
                         d(mean V), looping over the query blocks that see them (GQA summed in-kernel).
  _hier_bwd_dkdv         one program per (key tile, kv head): dK, dV of the exact keys, then the
                         pooling backward fused as an epilogue (the gradient of a mean is its
                         gradient / count, broadcast to the group's non-sink tokens).
No atomics anywhere: the backward is deterministic.
The forward and dq walk the summaries in tiles that run across level boundaries (each level shows
a query block ~nw/2 + 2 groups, 34 at nw = 64: level by level, tiles of 32 ran two per level, the
second nearly empty). H200, S=524288 H32 W4096 (session 8): fwd -0.7 %, dq -3.7 % against level by
level (removed; fwd +2.9 % at S=8192).
"""

import torch
import triton
import triton.language as tl

from deepseek_kernels.triton._common import f32, launch_options, resolve_launch
from deepseek_kernels.triton.window_attention import launch_delta

# ---- index rules (the reference's, in block units) ----------------------------------------------------


@triton.jit
def _level_start(b, l, nw, levels):
    """s_l(b) = max(0, floor((b + 1 - nw 2^l) / A_l) A_l), A_l = 2^(l+1) below the top level, 2^l at it."""
    a = tl.where(l < levels, 2 << l, 1 << l)
    x = tl.maximum(b + 1 - (nw << l), 0)
    return (x // a) * a


@triton.jit
def _group_count(g, l, block, seqlen, sinks):
    """Tokens of level-l group g that exist and are not sinks."""
    size = block << l
    return tl.maximum(tl.minimum((g + 1) * size, seqlen) - tl.maximum(g * size, sinks), 0)


@triton.jit
def _seq(cu, n):
    start = tl.load(cu + n)
    return start, tl.load(cu + n + 1) - start


@triton.jit
def _visible_summaries(b, nw, levels):
    """How many summaries (all levels) query block b sees: level l gives groups [s_l >> l, s_{l-1} >> l)."""
    total = b * 0
    s_prev = _level_start(b, 0, nw, levels)
    for l in range(1, levels + 1):
        s_l = _level_start(b, l, nw, levels)
        total += (s_prev >> l) - (s_l >> l)
        s_prev = s_l
    return total


@triton.jit
def _packed_summaries(v, b, nw, levels, block, seqlen, sinks, start, n, T, NSEQ):
    """Rows, token counts and validity of the summaries at virtual indices ``v`` (int32 [S]): the
    summaries query block b sees, level 1 first, ascending group within a level, numbered
    consecutively across levels. A tile of them spans level boundaries, so each level's ~nw/2 + 2
    groups do not each round up to whole tiles (2 tiles of 32 per level at nw = 64 when unpacked)."""
    rows = tl.zeros(v.shape, dtype=tl.int64)
    cnt = tl.zeros(v.shape, dtype=tl.int32)
    ok = v < 0  # all False (v >= 0)
    pre = b * 0
    s_prev = _level_start(b, 0, nw, levels)
    loff = start * 0
    for l in range(1, levels + 1):
        size = block << l
        s_l = _level_start(b, l, nw, levels)
        g_lo = s_l >> l
        c = (s_prev >> l) - g_lo
        in_l = (v >= pre) & (v < pre + c)
        g = g_lo + v - pre
        cnt_l = _group_count(g, l, block, seqlen, sinks)
        rows = tl.where(in_l, (loff + start // size + n + g).to(tl.int64), rows)
        cnt = tl.where(in_l, cnt_l, cnt)
        ok = ok | (in_l & (cnt_l > 0))
        pre += c
        loff += T // size + NSEQ
        s_prev = s_l
    return rows, cnt, ok


# ---- pooling ----------------------------------------------------------------------------------------


@triton.jit
def _hier_pool_kernel(
    SRC_K, SRC_V, DST_K, DST_V, cu,
    stride_skt, stride_skh, stride_svt, stride_svh, stride_dt, stride_dh,
    src_off, dst_off, level, block, sinks, HKV, HEAD_DIM: tl.constexpr,
    FROM_KEYS: tl.constexpr, FAN: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Level ``level`` means of K and V for BLOCK_G groups of one sequence and kv head, from the
    ``FAN`` children of each group: tokens (level 1, FAN = 2 * block, sinks weigh 0) or two level
    ``level - 1`` rows weighted by their counts."""
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = pid_bh // HKV
    h = pid_bh % HKV
    start, seqlen = _seq(cu, n)
    size = block << level
    n_groups = tl.cdiv(seqlen, size)
    g0 = pid_g * BLOCK_G
    if g0 < n_groups:
        g = g0 + tl.arange(0, BLOCK_G)
        g_mask = g < n_groups
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        acc_k = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        acc_v = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        wsum = tl.zeros((BLOCK_G,), dtype=tl.float32)
        for f in range(FAN):
            if FROM_KEYS:
                pos = g * FAN + f
                w = ((pos >= sinks) & (pos < seqlen) & g_mask).to(tl.float32)
                row = (start + pos).to(tl.int64)
            else:
                child = 2 * g + f
                w = tl.where(g_mask, _group_count(child, level - 1, block, seqlen, sinks), 0).to(tl.float32)
                row = (src_off + start // (size // 2) + n + child).to(tl.int64)
            mask = (w > 0)[:, None] & d_mask[None, :]
            xk = tl.load(SRC_K + row[:, None] * stride_skt + h * stride_skh + offs_d[None, :], mask=mask, other=0.0)
            xv = tl.load(SRC_V + row[:, None] * stride_svt + h * stride_svh + offs_d[None, :], mask=mask, other=0.0)
            acc_k += w[:, None] * xk.to(tl.float32)
            acc_v += w[:, None] * xv.to(tl.float32)
            wsum += w
        inv = 1.0 / tl.maximum(wsum, 1.0)  # a group of sinks only stays 0 (and is never attended)
        dst = (dst_off + start // size + n + g).to(tl.int64)
        out_mask = g_mask[:, None] & d_mask[None, :]
        tl.store(DST_K + dst[:, None] * stride_dt + h * stride_dh + offs_d[None, :], acc_k * inv[:, None], mask=out_mask)
        tl.store(DST_V + dst[:, None] * stride_dt + h * stride_dh + offs_d[None, :], acc_v * inv[:, None], mask=out_mask)


def summary_rows(total: int, nseq: int, *, block: int, levels: int) -> int:
    """Rows of the summary tensor for ``total`` packed tokens in ``nseq`` sequences."""
    return sum(total // (block << l) + nseq for l in range(1, levels + 1))


def _packed(q, k, v, cu_seqlens, max_seqlen):
    """Packed views and cu_seqlens of dense or packed inputs: (qp, kp, vp, cu, nseq, max_len, dense)."""
    if cu_seqlens is None:
        B, S = q.shape[:2]
        cu = torch.arange(B + 1, device=q.device, dtype=torch.int32) * S
        flat = lambda t: t.reshape(B * S, t.shape[2], t.shape[3])  # noqa: E731
        return flat(q), flat(k), flat(v), cu, B, S, True
    max_len = max_seqlen if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return q, k, v, cu_seqlens, cu_seqlens.numel() - 1, max_len, False


def hierarchical_pool(k, v, cu_seqlens, *, block: int, levels: int, sinks: int, max_seqlen: int,
                      block_g: int = 16, num_warps: int = 4):
    """Summaries of packed ``k, v [T, Hkv, D]``: ``(mean_k, mean_v)`` float32 ``[R, Hkv, D]`` in the
    row layout of the module docstring (levels 1..levels, each pooled from the one below)."""
    T, Hkv, D = k.shape
    nseq = cu_seqlens.numel() - 1
    R = summary_rows(T, nseq, block=block, levels=levels)
    sk = torch.empty(R, Hkv, D, device=k.device, dtype=torch.float32)
    sv = torch.empty_like(sk)
    block_d = max(16, triton.next_power_of_2(D))
    off = prev = 0
    for l in range(1, levels + 1):
        size = block << l
        grid = (triton.cdiv(triton.cdiv(max(max_seqlen, 1), size), block_g), nseq * Hkv)
        src_k, src_v, fan = (k, v, 2 * block) if l == 1 else (sk, sv, 2)
        torch.library.wrap_triton(_hier_pool_kernel)[grid](
            src_k, src_v, sk, sv, cu_seqlens,
            src_k.stride(0), src_k.stride(1), src_v.stride(0), src_v.stride(1), sk.stride(0), sk.stride(1),
            prev, off, l, block, sinks, Hkv, D,
            FROM_KEYS=l == 1, FAN=fan, BLOCK_G=block_g, BLOCK_D=block_d, num_warps=num_warps,
        )
        prev, off = off, off + T // size + nseq
    return sk, sv


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v, BASE2: tl.constexpr):
    """One online-softmax update with scores s [M, N] (-inf = not seen) and values v [N, D];
    ``BASE2``: the scores are already multiplied by log2(e) (exp2 instead of exp)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    if BASE2:
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
    else:
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _load_tile(ptr, row_ok, d_mask, MASKED: tl.constexpr, EVEN_D: tl.constexpr, ROWS_LAST: tl.constexpr):
    """A [rows, D] tile (``ROWS_LAST``: [D, rows]) of q/k/v-like data: rows past the sequence
    (``row_ok`` False) and head-dim padding read as 0; no mask at all for interior tiles
    (``MASKED`` False) with an unpadded head dim."""
    if EVEN_D and not MASKED:
        x = tl.load(ptr)
    elif ROWS_LAST:
        mask = d_mask[:, None]
        if MASKED:
            mask = mask & row_ok[None, :]
        x = tl.load(ptr, mask=mask, other=0.0)
    else:
        mask = d_mask[None, :]
        if MASKED:
            mask = mask & row_ok[:, None]
        x = tl.load(ptr, mask=mask, other=0.0)
    return x


@triton.jit
def _exact_fwd(acc, l_i, m_i, q, offs_m, k_tile, v_tile, seqlen, lo_tile, hi, local_lo,
               stride_kt, stride_vt, d_mask, qk_scale, sinks, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """Exact keys in [lo_tile, hi): seen iff j <= i and (j >= local_lo or j < sinks). ``k_tile``
    ([D, N]) and ``v_tile`` ([N, D]) point at keys 0..BLOCK_N-1; a tile moves them by a scalar.
    Unmasked (MASKED False) only for interior tiles, whose every key is visible to every query."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo_tile, hi, BLOCK_N):
        k_ptr = k_tile + tl.cast(start_n, tl.int64) * stride_kt
        v_ptr = v_tile + tl.cast(start_n, tl.int64) * stride_vt
        offs_n = start_n + offs_n0
        n_mask = offs_n < seqlen
        k = _load_tile(k_ptr, n_mask, d_mask, MASKED, EVEN_D, True)
        s = tl.dot(q, k) * qk_scale
        if MASKED:
            vis = (offs_n[None, :] <= offs_m[:, None]) & n_mask[None, :] & (
                (offs_n[None, :] >= local_lo) | (offs_n[None, :] < sinks))
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))  # every key visible: finite
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, n_mask, d_mask, MASKED, EVEN_D, False)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _summary_fwd(acc, l_i, m_i, q, SK, SV, rows, cnt, ok, kvh, stride_st, stride_sh, offs_d, d_mask, qk_scale):
    """One online-softmax step over a tile of summaries (``rows``, their token counts, validity): a
    group of c tokens scores + log2(c) (base 2)."""
    kb = tl.load(SK + rows[None, :] * stride_st + kvh * stride_sh + offs_d[:, None],
                 mask=ok[None, :] & d_mask[:, None], other=0.0).to(q.dtype)
    vb = tl.load(SV + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :],
                 mask=ok[:, None] & d_mask[None, :], other=0.0).to(q.dtype)
    s = tl.dot(q, kb) * qk_scale + tl.log2(tl.maximum(cnt, 1).to(tl.float32))[None, :]
    return _softmax_step(acc, l_i, m_i, tl.where(ok[None, :], s, float("-inf")), vb, True)


@triton.jit
def _hier_attn_fwd_kernel(
    Q, K, V, SK, SV, O, LSE, cu,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
    stride_ot, stride_oh, stride_lh,
    qk_scale, nw, levels, block, sinks, T, NSEQ, HQ, REP, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out/lse for BLOCK_M queries (inside one query block, BLOCK_M divides block) of one head:
    sinks + local window exactly, then level 1..levels summaries, one online softmax (base 2:
    ``qk_scale`` = softmax scale * log2(e); lse is stored in natural log). Summary tiles run across
    level boundaries (:func:`_packed_summaries`)."""
    qk_scale = f32(qk_scale)
    LOG2E: tl.constexpr = 1.4426950408889634
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // REP
    start, seqlen = _seq(cu, n)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < seqlen
        q = tl.load(Q + (start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        b = m0 // block
        s0 = _level_start(b, 0, nw, levels)
        local_lo = s0 * block
        offs_n0 = tl.arange(0, BLOCK_N)
        k_tile = K + start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_n0[None, :] * stride_kt + offs_d[:, None]
        v_tile = V + start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_n0[:, None] * stride_vt + offs_d[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        hi = tl.minimum(m0 + BLOCK_M, seqlen)
        # key tiles (all BLOCK_N-aligned, none visited twice): [0, min(sinks, lo_tile)) for the sinks;
        # the local window [lo_tile, hi) as a masked edge [lo_tile, int_lo), unmasked interior tiles
        # [int_lo, int_hi) (at or after local_lo, ending at or before the tile's first query), and
        # the masked diagonal [int_hi, hi)
        lo_tile = (local_lo // BLOCK_N) * BLOCK_N
        int_lo = tl.cdiv(local_lo, BLOCK_N) * BLOCK_N
        int_hi = tl.maximum(((m0 + 1) // BLOCK_N) * BLOCK_N, int_lo)
        acc, l_i, m_i = _exact_fwd(acc, l_i, m_i, q, offs_m, k_tile, v_tile, seqlen, 0, tl.minimum(sinks, lo_tile),
                                   local_lo, stride_kt, stride_vt, d_mask, qk_scale, sinks, BLOCK_N,
                                   True, EVEN_D)
        acc, l_i, m_i = _exact_fwd(acc, l_i, m_i, q, offs_m, k_tile, v_tile, seqlen, lo_tile, tl.minimum(int_lo, hi),
                                   local_lo, stride_kt, stride_vt, d_mask, qk_scale, sinks, BLOCK_N,
                                   True, EVEN_D)
        acc, l_i, m_i = _exact_fwd(acc, l_i, m_i, q, offs_m, k_tile, v_tile, seqlen, int_lo, int_hi,
                                   local_lo, stride_kt, stride_vt, d_mask, qk_scale, sinks, BLOCK_N,
                                   False, EVEN_D)
        acc, l_i, m_i = _exact_fwd(acc, l_i, m_i, q, offs_m, k_tile, v_tile, seqlen, int_hi, hi,
                                   local_lo, stride_kt, stride_vt, d_mask, qk_scale, sinks, BLOCK_N,
                                   True, EVEN_D)
        # summaries: level l tiles blocks [s_l, s_{l-1}); a group of c tokens scores + ln(c)
        offs_s = tl.arange(0, BLOCK_S)
        # summary tiles run across level boundaries (each level shows a query block ~nw/2 + 2 groups)
        for v0 in range(0, _visible_summaries(b, nw, levels), BLOCK_S):
            rows, cnt, ok = _packed_summaries(v0 + offs_s, b, nw, levels, block, seqlen, sinks, start, n, T, NSEQ)
            acc, l_i, m_i = _summary_fwd(acc, l_i, m_i, q, SK, SV, rows, cnt, ok, kvh, stride_st, stride_sh,
                                         offs_d, d_mask, qk_scale)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # every valid query sees itself: l_i > 0
        lse = (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) / LOG2E
        tl.store(O + (start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(LSE + h * stride_lh + start + offs_m, lse, mask=m_mask)


# Whether dkdv's pooling backward adds one broadcast [D] row per level whose groups span the key tile
# (``dkdv.bcast``, the default) instead of a per-key gather. H200, fwd+bwd H32/32 W4096 D128
# (benchmarks/diag_hier_kernels.py --variants, session 8): dkdv -1.8 % at S=8192, -3.0 % at 131072,
# -7.8 % at 524288.
BCAST_POOL_GRAD = True


def _blocks(block: int, block_m: int | None, block_n: int | None):
    bm = min(block, 64) if block_m is None else block_m
    bn = 64 if block_n is None else block_n
    if block % bm:
        raise ValueError(f"hierarchical attention: block_m={bm} must divide block={block}")
    return bm, bn


def hierarchical_attention_fwd(q, k, v, *, window: int, block: int, levels: int, sinks: int = 0,
                               softmax_scale: float | None = None, cu_seqlens=None, max_seqlen: int | None = None,
                               block_m: int | None = None, block_n: int | None = None, block_s: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None):
    """Forward pass (``levels`` already resolved to an int). Dense ``[B, S, H, D]`` or packed
    ``[T, H, D]`` with ``cu_seqlens``. Returns ``(out, lse)``: out like q, lse ``[B, Hq, S]`` (dense)
    or ``[Hq, T]`` (packed), float32."""
    qp, kp, vp, cu, nseq, max_len, dense = _packed(q, k, v, cu_seqlens, max_seqlen)
    qp, kp, vp = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp))
    T, Hq, D = qp.shape
    Hkv = kp.shape[1]
    sk, sv = hierarchical_pool(kp, vp, cu, block=block, levels=levels, sinks=sinks, max_seqlen=max_len)
    out = torch.empty_like(qp)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    bm, bn = _blocks(block, block_m, block_n)
    nw = window // block
    # Tuned on the H200 (benchmarks/tune_hierarchical.py, D=128 W=4096, S=32k and 131k): 64x64 tiles,
    # summary tiles of at most 32, 4 warps, 3 stages (summary tiles of 64 with 3 stages ran 2x slower:
    # 48.5 vs 24.3 ms at S=131072 H32 -- register pressure -- and 4 stages run out of shared memory).
    bs = block_s or max(16, min(32, triton.next_power_of_2(nw // 2 + 2)))
    launch = dict(num_warps=num_warps or 4, num_stages=num_stages or 3)
    grid = (triton.cdiv(max(max_len, 1), bm), nseq * Hq)
    torch.library.wrap_triton(_hier_attn_fwd_kernel)[grid](
        qp, kp, vp, sk, sv, out, lse, cu,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), sk.stride(0), sk.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale * 1.4426950408889634, nw, levels, block, sinks, T, nseq, Hq, Hq // Hkv, D,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_S=bs, BLOCK_D=max(16, triton.next_power_of_2(D)),
        **launch,
    )
    if dense:
        B, S = q.shape[:2]
        return out.reshape(q.shape), lse.reshape(Hq, B, S).transpose(0, 1)
    return out, lse


# ---- backward ---------------------------------------------------------------------------------------
#
# With P = exp(score - lse) over exact keys and summaries, delta_i = dO_i . O_i:
#   dV = P^T dO,  dS = P (dO V^T - delta),  dQ = scale dS K,  dK = scale dS^T Q
# for exact keys and summaries alike; then d(mean) / count is added to each non-sink token of a group.
# Order: dsum (all levels) -> dkdv (exact keys + the pooling backward) ; dq is independent.


@triton.jit
def _exact_dq(dq, q, do, lse2, delta, offs_m, k_base, v_base, seqlen, lo_tile, hi, local_lo,
              stride_kt, stride_vt, offs_d, d_mask, qk_scale, sinks, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """dQ (unscaled) over the exact keys in [lo_tile, hi), base 2 (``lse2`` = lse * log2(e)).
    Unmasked only for interior tiles (every key visible to every query row)."""
    for start_n in range(lo_tile, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k_ptr = k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :]
        v_ptr = v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :]
        n_mask = offs_n < seqlen
        k = _load_tile(k_ptr, n_mask, d_mask, MASKED, EVEN_D, False)
        v = _load_tile(v_ptr, n_mask, d_mask, MASKED, EVEN_D, False)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASKED:
            vis = (offs_n[None, :] <= offs_m[:, None]) & n_mask[None, :] & (
                (offs_n[None, :] >= local_lo) | (offs_n[None, :] < sinks))
            p = tl.where(vis, p, 0.0)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _summary_dq(dq, q, do, lse2, delta, SK, SV, rows, cnt, ok, kvh, stride_st, stride_sh, offs_d, d_mask, qk_scale):
    """dQ (unscaled) from one tile of summaries (``rows``, their token counts, validity), base 2."""
    smask = ok[:, None] & d_mask[None, :]
    kb = tl.load(SK + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask, other=0.0).to(q.dtype)
    vb = tl.load(SV + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask, other=0.0).to(q.dtype)
    s = tl.dot(q, tl.trans(kb)) * qk_scale + tl.log2(tl.maximum(cnt, 1).to(tl.float32))[None, :]
    p = tl.where(ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
    ds = p * (tl.dot(do, tl.trans(vb)) - delta[:, None])
    return dq + tl.dot(ds.to(q.dtype), kb)


@triton.jit
def _hier_bwd_dq(
    Q, K, V, SK, SV, DO, LSE, DELTA, DQ, cu,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_st, stride_sh,
    stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lh,
    sm_scale, nw, levels, block, sinks, T, NSEQ, HQ, REP, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of BLOCK_M queries of one head over the forward's keys and summaries (summary tiles
    across level boundaries, as in the forward)."""
    sm_scale = f32(sm_scale)
    LOG2E: tl.constexpr = 1.4426950408889634
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // REP
    start, seqlen = _seq(cu, n)
    m0 = pid_m * BLOCK_M
    if m0 < seqlen:
        qk_scale = sm_scale * LOG2E
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        m_mask = offs_m < seqlen
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + (start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (start + offs_m)[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + h * stride_lh + start + offs_m, mask=m_mask, other=0.0) * LOG2E
        delta = tl.load(DELTA + h * stride_lh + start + offs_m, mask=m_mask, other=0.0)
        b = m0 // block
        s0 = _level_start(b, 0, nw, levels)
        local_lo = s0 * block
        k_base = K + start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_base = V + start.to(tl.int64) * stride_vt + kvh * stride_vh
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        hi = tl.minimum(m0 + BLOCK_M, seqlen)
        # the forward's key tiles: sinks, masked edge, unmasked interior, masked diagonal
        lo_tile = (local_lo // BLOCK_N) * BLOCK_N
        int_lo = tl.cdiv(local_lo, BLOCK_N) * BLOCK_N
        int_hi = tl.maximum(((m0 + 1) // BLOCK_N) * BLOCK_N, int_lo)
        dq = _exact_dq(dq, q, do, lse2, delta, offs_m, k_base, v_base, seqlen, 0, tl.minimum(sinks, lo_tile),
                       local_lo, stride_kt, stride_vt, offs_d, d_mask, qk_scale, sinks, BLOCK_N, True, EVEN_D)
        dq = _exact_dq(dq, q, do, lse2, delta, offs_m, k_base, v_base, seqlen, lo_tile, tl.minimum(int_lo, hi),
                       local_lo, stride_kt, stride_vt, offs_d, d_mask, qk_scale, sinks, BLOCK_N, True, EVEN_D)
        dq = _exact_dq(dq, q, do, lse2, delta, offs_m, k_base, v_base, seqlen, int_lo, int_hi,
                       local_lo, stride_kt, stride_vt, offs_d, d_mask, qk_scale, sinks, BLOCK_N, False, EVEN_D)
        dq = _exact_dq(dq, q, do, lse2, delta, offs_m, k_base, v_base, seqlen, int_hi, hi,
                       local_lo, stride_kt, stride_vt, offs_d, d_mask, qk_scale, sinks, BLOCK_N, True, EVEN_D)
        offs_s = tl.arange(0, BLOCK_S)
        for v0 in range(0, _visible_summaries(b, nw, levels), BLOCK_S):
            rows, cnt, ok = _packed_summaries(v0 + offs_s, b, nw, levels, block, seqlen, sinks, start, n, T, NSEQ)
            dq = _summary_dq(dq, q, do, lse2, delta, SK, SV, rows, cnt, ok, kvh, stride_st, stride_sh, offs_d,
                             d_mask, qk_scale)
        tl.store(DQ + (start + offs_m)[:, None].to(tl.int64) * stride_dqt + h * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _hier_bwd_dsum(
    Q, SK, SV, DO, LSE, DELTA, DSK, DSV, cu,
    stride_qt, stride_qh, stride_st, stride_sh, stride_ost, stride_osh, stride_dot, stride_doh, stride_lh,
    sm_scale, nw, levels, level, loff, out_loff, split_rows, chunk, block, sinks, HKV, REP,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """d(mean K), d(mean V) (float32) of BLOCK_S consecutive level-``level`` groups of one sequence
    and kv head. Group g is seen by query blocks [(g+1) 2^l + nw 2^(l-1) - 1,
    floor(g 2^l / A) A + A + nw 2^l - 2] (tests/test_hierarchical_reference.py checks the rule).
    ``chunk`` > 0 splits that scan: program_id(2) = c takes query blocks [b_lo + c chunk, b_lo +
    (c+1) chunk) and writes its partial sums to rows ``out_loff + c split_rows + ...`` of DSK/DSV (a
    scratch the launcher sums over c); 0: one program scans all and writes rows ``out_loff + ...``.
    The top levels' bands are ~2^l times longer than level 1's while they have 2^l times fewer
    groups, so unsplit they ran as a few programs with long serial loops (the dsum share of the
    backward grew 6.7x per token from S=8k to 512k)."""
    sm_scale = f32(sm_scale)
    pid_g = tl.program_id(0)
    pid_bh = tl.program_id(1)
    split = tl.program_id(2)
    n = pid_bh // HKV
    kvh = pid_bh % HKV
    start, seqlen = _seq(cu, n)
    size = block << level
    n_groups = tl.cdiv(seqlen, size)
    g0 = pid_g * BLOCK_S
    if g0 < n_groups:
        g = g0 + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        cnt = _group_count(g, level, block, seqlen, sinks)
        ok = (g < n_groups) & (cnt > 0)
        rows = (loff + start // size + n + g).to(tl.int64)
        smask = ok[:, None] & d_mask[None, :]
        kb = tl.load(SK + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask, other=0.0)
        vb = tl.load(SV + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask, other=0.0)
        kb = kb.to(Q.dtype.element_ty)
        vb = vb.to(Q.dtype.element_ty)
        bias = tl.log(tl.maximum(cnt, 1).to(tl.float32))
        g_last = tl.minimum(g0 + BLOCK_S, n_groups) - 1
        # exactly the query blocks that see some group of the tile (dsum_query_blocks mirrors this)
        a = tl.where(level < levels, 2 << level, 1 << level)
        b_lo = ((g0 + 1) << level) + (nw << (level - 1)) - 1
        b_hi = ((g_last << level) // a) * a + a + (nw << level) - 2
        m_hi = tl.minimum((b_hi + 1) * block, seqlen)
        if chunk > 0:
            b_lo = b_lo + split * chunk
            m_hi = tl.minimum(m_hi, (b_lo + chunk) * block)
        dks = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        dvs = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
        for r in range(0, REP):
            h = kvh * REP + r
            for m0 in range(b_lo * block, m_hi, BLOCK_M):
                # the query tile lies in one block, which sees the groups [s_l >> l, s_{l-1} >> l):
                # skip it when that run misses the tile (the groups' ranges leave gaps when nw is small)
                b_q = m0 // block
                g_from = tl.maximum(_level_start(b_q, level, nw, levels) >> level, g0)
                g_to = tl.minimum(_level_start(b_q, level - 1, nw, levels) >> level, g_last + 1)
                if g_from < g_to:
                    offs_m = m0 + tl.arange(0, BLOCK_M)
                    m_mask = offs_m < seqlen
                    q_mask = m_mask[:, None] & d_mask[None, :]
                    q = tl.load(Q + (start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                                mask=q_mask, other=0.0)
                    do = tl.load(DO + (start + offs_m)[:, None].to(tl.int64) * stride_dot + h * stride_doh
                                 + offs_d[None, :], mask=q_mask, other=0.0)
                    lse = tl.load(LSE + h * stride_lh + start + offs_m, mask=m_mask, other=0.0)
                    delta = tl.load(DELTA + h * stride_lh + start + offs_m, mask=m_mask, other=0.0)
                    bq = offs_m // block
                    s_l = _level_start(bq, level, nw, levels)
                    s_prev = _level_start(bq, level - 1, nw, levels)
                    vis = ((g[None, :] << level) >= s_l[:, None]) & (((g[None, :] + 1) << level) <= s_prev[:, None])
                    vis = vis & ok[None, :] & m_mask[:, None]
                    s = tl.dot(q, tl.trans(kb)) * sm_scale + bias[None, :]
                    p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
                    dvs += tl.dot(tl.trans(p.to(do.dtype)), do)
                    ds = p * (tl.dot(do, tl.trans(vb)) - delta[:, None])
                    dks += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out_mask = (g < n_groups)[:, None] & d_mask[None, :]
        orows = (out_loff + split * split_rows + start // size + n + g).to(tl.int64)
        o_off = orows[:, None] * stride_ost + kvh * stride_osh + offs_d[None, :]
        tl.store(DSK + o_off, dks * sm_scale, mask=out_mask)
        tl.store(DSV + o_off, dvs, mask=out_mask)


def dsum_query_blocks(g0: int, g_last: int, *, level: int, nw: int, levels: int) -> tuple[int, int]:
    """``(b_lo, b_hi)``: the query blocks ``_hier_bwd_dsum`` scans for the level-``level`` groups
    ``g0..g_last`` (before clipping at the sequence end); the same formulas as the kernel.
    The ends of the union of the groups' ranges (each contiguous, sliding by ``2^level`` blocks per
    group; tests check both ends are exact); inside, the kernel skips the blocks whose run of
    visible groups ``[s_l >> l, s_{l-1} >> l)`` misses the tile (gaps appear for small ``nw``: the
    scan was up to 7x the useful pairs at nw = 4). What a tile of ``BLOCK_S`` groups still computes
    in vain is inside the band: each group is seen by about ``nw 2^(level-1)`` blocks, the tile
    scans ``(BLOCK_S - 1) 2^level`` more, i.e. ``1 + (BLOCK_S - 1) / (nw / 2 + 1)`` times the
    useful (query, group) pairs (1.45x at nw = 64, BLOCK_S = 16, the smallest tl.dot tile)."""
    a = 2 << level if level < levels else 1 << level
    return ((g0 + 1) << level) + (nw << (level - 1)) - 1, ((g_last << level) // a) * a + a + (nw << level) - 2


@triton.jit
def _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, d_mask, n_mask, lo, hi,
                seqlen, sinks, nw, levels, block, qk_scale, stride_qt, stride_dot,
                BLOCK_M: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """dK (unscaled), dV of one key tile from the query tiles in [lo, hi) of one head, base 2.
    Unmasked only for interior query tiles (every query sees every key of the tile)."""
    LOG2E: tl.constexpr = 1.4426950408889634
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q_ptr = q_base + offs_m[:, None].to(tl.int64) * stride_qt + offs_d[None, :]
        do_ptr = do_base + offs_m[:, None].to(tl.int64) * stride_dot + offs_d[None, :]
        m_mask = offs_m < seqlen
        q = _load_tile(q_ptr, m_mask, d_mask, MASKED, EVEN_D, False)
        do = _load_tile(do_ptr, m_mask, d_mask, MASKED, EVEN_D, False)
        if MASKED:
            lse2 = tl.load(lse_base + offs_m, mask=m_mask, other=0.0) * LOG2E
            delta = tl.load(delta_base + offs_m, mask=m_mask, other=0.0)
        else:
            lse2 = tl.load(lse_base + offs_m) * LOG2E
            delta = tl.load(delta_base + offs_m)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASKED:
            local_lo = _level_start(offs_m // block, 0, nw, levels) * block
            vis = (offs_n[None, :] <= offs_m[:, None]) & (
                (offs_n[None, :] >= local_lo[:, None]) | (offs_n[None, :] < sinks))
            vis = vis & m_mask[:, None] & n_mask[None, :]
            p = tl.where(vis, p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    return dk, dv


@triton.jit
def _pool_bwd_per_key(dk, dv, DSK, DSV, offs_n, n_mask, offs_d, d_mask, l, loff, start, n, kvh, block, seqlen, sinks,
                      stride_st, stride_sh):
    """The pooling backward of level l for each key of the tile: d(mean) / count of its group, for
    the non-sink keys of groups that have tokens."""
    size = block << l
    g = offs_n // size
    cnt = _group_count(g, l, block, seqlen, sinks)
    ok = n_mask & (offs_n >= sinks) & (cnt > 0)
    rows = (loff + start // size + n + g).to(tl.int64)
    smask = ok[:, None] & d_mask[None, :]
    inv = 1.0 / tl.maximum(cnt, 1).to(tl.float32)
    dk += tl.load(DSK + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask,
                  other=0.0) * inv[:, None]
    dv += tl.load(DSV + rows[:, None] * stride_st + kvh * stride_sh + offs_d[None, :], mask=smask,
                  other=0.0) * inv[:, None]
    return dk, dv


@triton.jit
def _hier_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DSK, DSV, DK, DV, cu,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_st, stride_sh, stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    sm_scale, nw, levels, block, sinks, T, NSEQ, HKV, REP, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BCAST: tl.constexpr,
):
    """dK, dV of BLOCK_N exact keys of one kv head (GQA heads summed in-kernel), then the pooling
    backward (``BCAST``: levels whose groups span the tile add one broadcast row each)."""
    sm_scale = f32(sm_scale)
    LOG2E: tl.constexpr = 1.4426950408889634
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n = pid_bh // HKV
    kvh = pid_bh % HKV
    start, seqlen = _seq(cu, n)
    n0 = pid_n * BLOCK_N
    if n0 < seqlen:
        qk_scale = sm_scale * LOG2E
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        n_mask = offs_n < seqlen
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + (start + offs_n)[:, None].to(tl.int64) * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (start + offs_n)[:, None].to(tl.int64) * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        # key block kb is local to query blocks [kb, kb + nw] at most (s_0(b) >= b - nw); sinks to all later ones
        kb_last = (tl.minimum(n0 + BLOCK_N, seqlen) - 1) // block
        if n0 < sinks:
            i_hi = seqlen
        else:
            i_hi = tl.minimum((kb_last + nw + 1) * block, seqlen)
        # query tiles [m_lo, i_hi): masked, then unmasked interior tiles [q_lo, q_int) (every query
        # >= the tile's last key, local_lo <= n0 for every query block, no query past the end), then
        # masked. local_lo(b) = s_0(b) * block <= n0 iff b <= (c // a + 1) a + nw - 2, c = n0 // block,
        # a = 2 (1 without levels); tiles with sink keys stay masked (they mix two visibility rules).
        m_lo = (n0 // BLOCK_M) * BLOCK_M
        a = tl.where(levels > 0, 2, 1)
        b_max = ((n0 // block) // a + 1) * a + nw - 2
        q_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
        q_int = tl.maximum(tl.minimum((b_max + 1) * block, (seqlen // BLOCK_M) * BLOCK_M), q_lo)
        if n0 < sinks:
            q_lo = i_hi
            q_int = i_hi
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for r in range(0, REP):
            h = kvh * REP + r
            q_base = Q + start.to(tl.int64) * stride_qt + h * stride_qh
            do_base = DO + start.to(tl.int64) * stride_dot + h * stride_doh
            lse_base = LSE + h * stride_lh + start
            delta_base = DELTA + h * stride_lh + start
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, d_mask, n_mask,
                                 m_lo, tl.minimum(q_lo, i_hi), seqlen, sinks, nw, levels, block, qk_scale,
                                 stride_qt, stride_dot, BLOCK_M, True, EVEN_D)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, d_mask, n_mask,
                                 q_lo, q_int, seqlen, sinks, nw, levels, block, qk_scale,
                                 stride_qt, stride_dot, BLOCK_M, False, EVEN_D)
            dk, dv = _dkdv_range(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, offs_d, d_mask, n_mask,
                                 tl.maximum(q_int, m_lo), i_hi, seqlen, sinks, nw, levels, block, qk_scale,
                                 stride_qt, stride_dot, BLOCK_M, True, EVEN_D)
        dk = dk * sm_scale
        # pooling backward: each non-sink token gets d(mean) / count of its group at every level
        loff = start * 0  # a loop-carried int32, never a constexpr
        if BCAST:
            # Levels whose groups are at least a key tile wide (powers of two, aligned: the tile lies in
            # one group) give every non-sink key the same d(mean) / count: summed once as [D] vectors and
            # broadcast after the loop (the per-key gather reads one repeated row BLOCK_N times per level)
            row_k = tl.zeros((BLOCK_D,), dtype=tl.float32)
            row_v = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for l in range(1, levels + 1):
                size = block << l
                if size >= BLOCK_N:
                    g1 = n0 // size
                    cnt1 = _group_count(g1, l, block, seqlen, sinks)
                    row = (loff + start // size + n + g1).to(tl.int64)
                    inv1 = 1.0 / tl.maximum(cnt1, 1).to(tl.float32)
                    row_k += tl.load(DSK + row * stride_st + kvh * stride_sh + offs_d, mask=d_mask & (cnt1 > 0),
                                     other=0.0) * inv1
                    row_v += tl.load(DSV + row * stride_st + kvh * stride_sh + offs_d, mask=d_mask & (cnt1 > 0),
                                     other=0.0) * inv1
                else:
                    dk, dv = _pool_bwd_per_key(dk, dv, DSK, DSV, offs_n, n_mask, offs_d, d_mask, l, loff, start, n,
                                               kvh, block, seqlen, sinks, stride_st, stride_sh)
                loff += T // (block << l) + NSEQ
            keys = (n_mask & (offs_n >= sinks))[:, None]
            dk += tl.where(keys, row_k[None, :], 0.0)
            dv += tl.where(keys, row_v[None, :], 0.0)
        else:
            for l in range(1, levels + 1):
                dk, dv = _pool_bwd_per_key(dk, dv, DSK, DSV, offs_n, n_mask, offs_d, d_mask, l, loff, start, n, kvh,
                                           block, seqlen, sinks, stride_st, stride_sh)
                loff += T // (block << l) + NSEQ
        tl.store(DK + (start + offs_n)[:, None].to(tl.int64) * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (start + offs_n)[:, None].to(tl.int64) * stride_dvt + kvh * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


BWD_KERNELS = ("dq", "dkdv", "dsum")


def bwd_launch_config(block: int, window: int, head_dim: int, levels: int = 1) -> dict:
    """Per-kernel launch settings of the backward (``dq``: query tiles over keys and summaries;
    ``dkdv``: key tiles over queries; ``dsum``: summary tiles over queries). ``block_m`` must divide
    ``block``. Tuned on the H200 at D=128 (benchmarks/tune_hierarchical.py; 64x64, 4 warps)."""
    bm = min(block, 64)
    nw = window // block
    # Triton 3.6 on the H200 gives bitwise-different dK/dV between identical calls when the dkdv
    # kernel is software-pipelined (2 stages): every call differed at D=128, block 32 (block_m 32),
    # none at block 64 (benchmarks/diag_hier_bwd_race.py; a compiler race in loops with
    # data-dependent bounds, cf. triton-lang/triton#9871). dkdv therefore stays unpipelined at D=128;
    # dq with 2 stages was deterministic on every shape and is faster: S=131072 H32 W4096 backward
    # 82.8 ms against 90.1 ms all unpipelined (dkdv at 2 stages as well: 78.8 ms, not deterministic).
    # tests/test_hierarchical_triton.py repeats the call and compares bits.
    wide = max(16, triton.next_power_of_2(head_dim)) >= 128
    # dsum's summary tiles: each tile re-reads q and dO for every query block in its band, ~2.3 times
    # per level, while a wider tile computes more (query, group) pairs in vain (69 % useful at 16, 51 % at
    # 32). With many levels the reads win: H200, bwd H32/32 W4096 D128 (tune_hierarchical.py --kernels
    # dsum, session 9): S=524288 (7 levels) 333.1 ms at 32 vs 346.5 at 16; S=32768 (3 levels) 20.13 vs 19.97.
    dsum_block_s = 32 if levels >= 6 else 16
    return {
        "dq": dict(block_m=bm, block_n=64, block_s=max(16, min(32, triton.next_power_of_2(nw // 2 + 2))),
                   num_warps=4, num_stages=2 if wide else None),
        "dkdv": dict(block_m=bm, block_n=64, num_warps=4, num_stages=1 if wide else None, bcast=BCAST_POOL_GRAD),
        "dsum": dict(block_m=bm, block_s=dsum_block_s, num_warps=4, num_stages=1 if wide else None, chunk=None),
    }


def dsum_chunk(level: int, *, nw: int, levels: int, block_s: int) -> int:
    """Query blocks per dsum program at ``level`` (0: unsplit): a level whose band of query blocks
    per summary tile is more than twice level 1's is split into level-1-sized chunks, so every level
    runs about as many programs of about the same length (the partial sums cost one extra
    [splits, rows, Hkv, D] fp32 pass per split level). H200, fwd+bwd H32/32 W4096 (diag_hier_kernels):
    dsum 12.5 -> 9.3 ms at S=131072, 68.1 -> 53.3 ms at S=524288; unchanged at 8192 (one level)."""
    def band(l):
        lo, hi = dsum_query_blocks(0, block_s - 1, level=l, nw=nw, levels=levels)
        return hi - lo + 1

    base = band(1)
    return base if band(level) > 2 * base else 0


def hierarchical_attention_bwd(do, q, k, v, out, lse, *, window: int, block: int, levels: int, sinks: int = 0,
                               softmax_scale: float | None = None, cu_seqlens=None, max_seqlen: int | None = None,
                               block_m: int | None = None, block_n: int | None = None, block_s: int | None = None,
                               num_warps: int | None = None, num_stages: int | None = None,
                               config: dict | None = None):
    """Gradients ``(dq, dk, dv)`` of :func:`hierarchical_attention_fwd` given ``do`` and its
    ``out``/``lse``. The summaries are pooled again (cheaper than keeping them); d(summaries) is a
    float32 ``[R, Hkv, D]`` pair. Deterministic: no atomics, GQA heads summed in-kernel.
    Launch settings: :func:`bwd_launch_config`, then the scalar overrides (every kernel that has
    the setting), then ``config`` per kernel (e.g. ``{"dq": {"num_stages": 3}}``)."""
    qp, kp, vp, cu, nseq, max_len, dense = _packed(q, k, v, cu_seqlens, max_seqlen)
    T, Hq, D = qp.shape
    Hkv = kp.shape[1]
    if dense:
        B, S = q.shape[:2]
        dop, op_ = do.reshape(T, Hq, D), out.reshape(T, Hq, D)
        lsep = lse.transpose(0, 1).reshape(Hq, T)
    else:
        dop, op_, lsep = do, out, lse
    qp, kp, vp, dop, op_ = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp, dop, op_))
    lsep = lsep.contiguous()
    # delta = rowsum(dO * O), [Hq, T] fp32, in one pass over O and dO (the eager expression it replaces
    # wrote and re-read four fp32 [T, Hq, D] temporaries: ~8x the bytes)
    delta = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    launch_delta(op_, dop, delta)
    sk, sv = hierarchical_pool(kp, vp, cu, block=block, levels=levels, sinks=sinks, max_seqlen=max_len)
    dsk, dsv = torch.empty_like(sk), torch.empty_like(sv)
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    nw = window // block
    block_d = max(16, triton.next_power_of_2(D))
    kc = resolve_launch("hierarchical attention backward", bwd_launch_config(block, window, D, levels), config,
                        block_m=block_m, block_n=block_n, block_s=block_s, num_warps=num_warps, num_stages=num_stages)
    for name, c in kc.items():
        if block % c["block_m"]:
            raise ValueError(f"hierarchical attention backward ({name}): block_m={c['block_m']} must divide "
                             f"block={block}")
    cq, ckv, cs = kc["dq"], kc["dkdv"], kc["dsum"]
    if cs["chunk"] is not None and cs["chunk"] < 0:
        raise ValueError(f"hierarchical attention backward (dsum): chunk must be None (auto), 0 (unsplit) or "
                         f"a number of query blocks, got {cs['chunk']}")
    loff = 0
    for l in range(1, levels + 1):
        size = block << l
        groups = triton.cdiv(max(max_len, 1), size)
        rows = T // size + nseq
        chunk = dsum_chunk(l, nw=nw, levels=levels, block_s=cs["block_s"]) if cs["chunk"] is None else cs["chunk"]
        lo, hi = dsum_query_blocks(0, cs["block_s"] - 1, level=l, nw=nw, levels=levels)
        splits = triton.cdiv(hi - lo + 1, chunk) if chunk > 0 else 1
        if splits > 1:  # partial sums per chunk of query blocks, then summed (deterministic)
            out_k = torch.empty(splits * rows, Hkv, D, device=q.device, dtype=torch.float32)
            out_v = torch.empty_like(out_k)
        else:
            out_k, out_v = dsk, dsv
        torch.library.wrap_triton(_hier_bwd_dsum)[(triton.cdiv(groups, cs["block_s"]), nseq * Hkv, splits)](
            qp, sk, sv, dop, lsep, delta, out_k, out_v, cu,
            qp.stride(0), qp.stride(1), sk.stride(0), sk.stride(1), out_k.stride(0), out_k.stride(1),
            dop.stride(0), dop.stride(1), lsep.stride(0),
            scale, nw, levels, l, loff, loff if splits == 1 else 0, rows, chunk if splits > 1 else 0,
            block, sinks, Hkv, Hq // Hkv, D,
            BLOCK_M=cs["block_m"], BLOCK_S=cs["block_s"], BLOCK_D=block_d, **launch_options(cs),
        )
        if splits > 1:
            torch.sum(out_k.view(splits, rows, Hkv, D), 0, out=dsk[loff:loff + rows])
            torch.sum(out_v.view(splits, rows, Hkv, D), 0, out=dsv[loff:loff + rows])
        loff += rows
    torch.library.wrap_triton(_hier_bwd_dkdv)[(triton.cdiv(max(max_len, 1), ckv["block_n"]), nseq * Hkv)](
        qp, kp, vp, dop, lsep, delta, dsk, dsv, dk, dv, cu,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        dop.stride(0), dop.stride(1), dsk.stride(0), dsk.stride(1), dk.stride(0), dk.stride(1),
        dv.stride(0), dv.stride(1), lsep.stride(0),
        scale, nw, levels, block, sinks, T, nseq, Hkv, Hq // Hkv, D,
        BLOCK_M=ckv["block_m"], BLOCK_N=ckv["block_n"], BLOCK_D=block_d, BCAST=bool(ckv["bcast"]),
        **launch_options(ckv),
    )
    torch.library.wrap_triton(_hier_bwd_dq)[(triton.cdiv(max(max_len, 1), cq["block_m"]), nseq * Hq)](
        qp, kp, vp, sk, sv, dop, lsep, delta, dq, cu,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1), sk.stride(0), sk.stride(1),
        dop.stride(0), dop.stride(1), dq.stride(0), dq.stride(1), lsep.stride(0),
        scale, nw, levels, block, sinks, T, nseq, Hq, Hq // Hkv, D,
        BLOCK_M=cq["block_m"], BLOCK_N=cq["block_n"], BLOCK_S=cq["block_s"], BLOCK_D=block_d,
        **launch_options(cq),
    )
    if dense:
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    return dq, dk, dv
