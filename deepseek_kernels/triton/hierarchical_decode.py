"""Triton kernels for decoding hierarchical attention against the bounded cache
(``deepseek_kernels.hierarchical_decode.HierarchicalKVCache``; its docstring gives the layout).

Cache tensors (all contiguous, allocated by the cache):
  exact  ``k, v [B, NS, Hkv, D]`` (``NS = sinks + ring``), ``positions [B, NS]`` int64 (-1 = empty)
  rings  ``sum_k, sum_v [B, L, M, Hkv, D]`` float32 means, ``group, count [B, L, M]`` int64
  partial groups ``acc_k, acc_v [B, L, Hkv, D]`` float32 sums, ``acc_n [B, L]`` int64
  ``seqlens [B]`` int64 (tokens seen before the call)

Kernels:
  _hier_cache_append_kernel  one launch per append: axis 1 picks the exact ring (0) or a level
      (1..L); axis 0 a token tile (ring) or a group of that level touched by the new tokens. Group
      ``g0 + r`` (``g0 = seqlens // G``) is summed from its new tokens (sinks weigh 0), plus the
      old partial sums when ``r == 0``; it is pushed into ring slot ``(g0 + r) % M`` when complete
      and among the ``M`` newest complete groups; program 0 also writes the new partial group
      (``g0 + r_w``, ``r_w = (seqlens + n) // G - g0``) so that reading and rewriting the partial
      sums never race between programs. Prefill of a long prompt sums only the groups it keeps.
  _hier_decode_kernel  one program per (split of the cache, kv head, row): all ``T x Hq/Hkv`` query
      rows of one kv head in one tile (GQA: each key tile is loaded once for the group), over
      the exact slots then the summary slots of all levels, one online softmax with the masks
      of the full-sequence op (positions and group indices; score ``+ ln(count)`` for summaries).
      With several splits it writes unnormalized partials (acc, max, sum) for
  _hier_decode_combine_kernel  one program per (row, step, query head): the log-sum-exp merge.
"""

import torch
import triton
import triton.language as tl

from deepseek_kernels.ops._registry import triton_kernel
from deepseek_kernels.triton._common import f32, launch_options, sm_count
from deepseek_kernels.triton.hierarchical_attention import _level_start, _softmax_step

# ---- append ------------------------------------------------------------------------------------------


@triton.jit
def _new_group_sum(K, V, k_row, v_row, stride_kt, stride_vt, lo, hi, sinks, p0, offs, o_mask,
                   BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr):
    """Sums of K, V (all heads: ``offs`` runs over heads x head dim) over the new tokens at
    positions [lo, hi) that are not sinks."""
    sk = tl.zeros((BLOCK_HD,), dtype=tl.float32)
    sv = tl.zeros((BLOCK_HD,), dtype=tl.float32)
    for j0 in range(lo, hi, BLOCK_T):
        pos = j0 + tl.arange(0, BLOCK_T)
        w = (pos < hi) & (pos >= sinks)
        t = (pos - p0).to(tl.int64)
        mask = w[:, None] & o_mask[None, :]
        xk = tl.load(K + k_row + t[:, None] * stride_kt + offs[None, :], mask=mask, other=0.0)
        xv = tl.load(V + v_row + t[:, None] * stride_vt + offs[None, :], mask=mask, other=0.0)
        sk += tl.sum(xk.to(tl.float32), 0)
        sv += tl.sum(xv.to(tl.float32), 0)
    return sk, sv


@triton.jit
def _hier_cache_append_kernel(
    K, V, LENS, SEQLENS, CK, CV, POS, SK, SV, GRP, CNT, AK, AV, AN,
    stride_kb, stride_kt, stride_vb, stride_vt,
    HD, NS, M, L, block, sinks, ring,
    BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr,
):
    """``k, v [B, T, Hkv, D]`` with heads and head dim contiguous (``HD = Hkv * D`` per token):
    one program handles every kv head of a row, so the per-row counters have one writer."""
    pid_r = tl.program_id(0)
    lvl = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    p0 = tl.load(SEQLENS + b)
    n = tl.load(LENS + b)
    offs = tl.arange(0, BLOCK_HD)
    o_mask = offs < HD
    k_row = b * stride_kb
    v_row = b * stride_vb
    if lvl == 0:
        # exact slots: sinks keep theirs, the others go round the ring; only the last `ring`
        # new tokens can still be in it after the call
        t = pid_r * BLOCK_T + tl.arange(0, BLOCK_T)
        pos = p0 + t
        keep = (t < n) & ((pos < sinks) | (t >= n - ring))
        slot = tl.where(pos < sinks, pos, sinks + (pos - sinks) % ring)
        mask = keep[:, None] & o_mask[None, :]
        tt = t.to(tl.int64)
        xk = tl.load(K + k_row + tt[:, None] * stride_kt + offs[None, :], mask=mask, other=0.0)
        xv = tl.load(V + v_row + tt[:, None] * stride_vt + offs[None, :], mask=mask, other=0.0)
        dst = (b * NS + slot) * HD
        tl.store(CK + dst[:, None] + offs[None, :], xk.to(CK.dtype.element_ty), mask=mask)
        tl.store(CV + dst[:, None] + offs[None, :], xv.to(CV.dtype.element_ty), mask=mask)
        tl.store(POS + b * NS + slot, pos, mask=keep)
    else:
        li = lvl - 1
        size = block << lvl
        g0 = p0 // size
        r_w = (p0 + n) // size - g0  # groups completed by this call; g0 + r_w is the new partial one
        r = pid_r
        push = (r < r_w) & (r >= r_w - M)
        bl = b * L + li
        if push | ((r == 0) & (r_w == 0)):
            gid = g0 + r
            lo = tl.maximum(gid * size, p0)
            hi = tl.minimum(gid * size + size, p0 + n)
            sk, sv = _new_group_sum(K, V, k_row, v_row, stride_kt, stride_vt, lo, hi, sinks, p0, offs, o_mask,
                                    BLOCK_T, BLOCK_HD)
            # count in closed form: the group's non-sink positions up to hi
            c = tl.maximum(hi - tl.maximum(gid * size, sinks), 0)
            if r == 0:  # the first group continues the partial one
                sk += tl.load(AK + bl * HD + offs, mask=o_mask, other=0.0)
                sv += tl.load(AV + bl * HD + offs, mask=o_mask, other=0.0)
            if push:
                slot = bl * M + gid % M
                inv = 1.0 / tl.maximum(c, 1).to(tl.float32)
                tl.store(SK + slot * HD + offs, sk * inv, mask=o_mask)
                tl.store(SV + slot * HD + offs, sv * inv, mask=o_mask)
                tl.store(GRP + slot, gid)
                tl.store(CNT + slot, c)
            else:  # r == 0 == r_w: still partial
                tl.store(AK + bl * HD + offs, sk, mask=o_mask)
                tl.store(AV + bl * HD + offs, sv, mask=o_mask)
                tl.store(AN + bl, c)
        if (r == 0) & (r_w > 0):
            # program 0 read the old partial sums above, so it alone writes the new ones
            gid = g0 + r_w
            sk, sv = _new_group_sum(K, V, k_row, v_row, stride_kt, stride_vt, gid * size, p0 + n, sinks, p0, offs,
                                    o_mask, BLOCK_T, BLOCK_HD)
            tl.store(AK + bl * HD + offs, sk, mask=o_mask)
            tl.store(AV + bl * HD + offs, sv, mask=o_mask)
            tl.store(AN + bl, tl.maximum(p0 + n - tl.maximum(gid * size, sinks), 0))


def hierarchical_cache_append(cache, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                              num_warps: int = 4, direct: bool = False) -> None:
    """Writes the first ``lengths[b]`` tokens of ``k, v [B, T, Hkv, D]`` into ``cache`` (exact ring,
    level rings, partial groups) in one launch; ``cache.seqlens`` is left for the caller to advance.
    ``direct``: launch the plain kernel (eager calls; see ``ops._registry.eager_fast_path``)."""
    B, T, Hkv, D = k.shape
    k, v = (t if t.stride(3) == 1 and t.stride(2) == D else t.contiguous() for t in (k, v))
    L = cache.levels
    block_hd = triton.next_power_of_2(Hkv * D)
    block_t = max(1, min(64, 8192 // block_hd, triton.next_power_of_2(T)))
    groups = T // (2 * cache.block) + 2 if L else 0  # level 1 has the most groups a call can touch
    grid = (max(triton.cdiv(T, block_t), groups, 1), L + 1, B)
    triton_kernel(_hier_cache_append_kernel, direct)[grid](
        k, v, lengths, cache.seqlens, cache.k, cache.v, cache.positions, cache.sum_k, cache.sum_v,
        cache.group, cache.count, cache.acc_k, cache.acc_v, cache.acc_n,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        Hkv * D, cache.k.shape[1], cache.group_slots, L, cache.block, cache.sinks, cache.ring,
        BLOCK_T=block_t, BLOCK_HD=block_hd, num_warps=num_warps,
    )


# ---- attention -----------------------------------------------------------------------------------------


@triton.jit
def _hier_decode_kernel(
    Q, CK, CV, POS, SK, SV, GRP, CNT, SEQLENS, LENS, O, OPART, MPART, LPART,
    stride_qb, stride_qt, stride_qh, stride_ob, stride_ot, stride_oh,
    sm_scale, T, HQ, HKV, REP, D, NS, M, L, nw, block, sinks, tiles_per_split, NSPLIT,
    SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``r < T * REP`` of the tile are (step ``r // REP``, query head ``kvh * REP + r % REP``)."""
    qk_scale = f32(sm_scale) * 1.4426950408889634  # base 2: exp2 in the online softmax
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = pid_bh % HKV
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < T * REP
    t = rows // REP
    hh = kvh * REP + rows % REP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_mask = row_ok[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + t[:, None].to(tl.int64) * stride_qt + hh[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)
    p = tl.load(SEQLENS + b) - tl.load(LENS + b) + t  # position of each row's query
    qb = p // block
    local_lo = _level_start(qb, 0, nw, L) * block
    n_exact = tl.cdiv(NS, BLOCK_N)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_exact + tl.cdiv(L * M, BLOCK_N))
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    kv_row = b * NS * HKV + kvh
    for i in range(tile_lo, tl.minimum(tile_hi, n_exact)):
        offs_n = i * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < NS
        pos = tl.load(POS + b * NS + offs_n, mask=n_ok, other=-1)
        src = (kv_row + offs_n.to(tl.int64) * HKV) * D
        k = tl.load(CK + src[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_mask[:, None], other=0.0)
        v = tl.load(CV + src[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_mask[None, :], other=0.0)
        s = tl.dot(q, k.to(q.dtype)) * qk_scale
        vis = (pos[None, :] >= 0) & (pos[None, :] <= p[:, None]) & (
            (pos[None, :] >= local_lo[:, None]) | (pos[None, :] < sinks))
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, tl.where(vis, s, float("-inf")), v.to(q.dtype), True)
    # summary slots of all levels as one index j = (level - 1) * M + slot ([B, L, M] is contiguous)
    for i in range(tl.maximum(tile_lo, n_exact), tile_hi):
        offs_j = (i - n_exact) * BLOCK_N + tl.arange(0, BLOCK_N)
        j_ok = offs_j < L * M
        lvl = tl.minimum(offs_j // M, L - 1) + 1  # lanes past the last level: a valid shift, masked below
        slot = b * L * M + offs_j
        g = tl.load(GRP + slot, mask=j_ok, other=-1)
        c = tl.load(CNT + slot, mask=j_ok, other=0)
        s_l = _level_start(qb[:, None], lvl[None, :], nw, L)
        s_prev = _level_start(qb[:, None], lvl[None, :] - 1, nw, L)
        vis = (g[None, :] >= 0) & (c[None, :] > 0) & ((g[None, :] << lvl[None, :]) >= s_l) & (
            ((g[None, :] + 1) << lvl[None, :]) <= s_prev)
        src = (slot.to(tl.int64) * HKV + kvh) * D
        kb = tl.load(SK + src[None, :] + offs_d[:, None], mask=j_ok[None, :] & d_mask[:, None], other=0.0)
        vb = tl.load(SV + src[:, None] + offs_d[None, :], mask=j_ok[:, None] & d_mask[None, :], other=0.0)
        # summaries enter the dots in the input dtype, as in the full-sequence forward
        s = tl.dot(q, kb.to(q.dtype)) * qk_scale + tl.log2(tl.maximum(c, 1).to(tl.float32))[None, :]
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, tl.where(vis, s, float("-inf")), vb.to(q.dtype), True)
    if SPLIT:
        part = ((b * T + t) * HQ + hh) * NSPLIT + pid_s
        tl.store(OPART + part[:, None] * D + offs_d[None, :], acc, mask=q_mask)
        tl.store(MPART + part, m_i, mask=row_ok)
        tl.store(LPART + part, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(O + b * stride_ob + t[:, None].to(tl.int64) * stride_ot + hh[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=q_mask)


@triton.jit
def _hier_decode_combine_kernel(
    OPART, MPART, LPART, O, stride_ob, stride_ot, stride_oh, T, HQ, D, NSPLIT,
    BLOCK_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # (b * T + t) * HQ + h
    hh = row % HQ
    t = (row // HQ) % T
    b = row // (HQ * T)
    offs_s = tl.arange(0, BLOCK_SPLIT)
    s_ok = offs_s < NSPLIT
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    m = tl.load(MPART + row * NSPLIT + offs_s, mask=s_ok, other=float("-inf"))
    l = tl.load(LPART + row * NSPLIT + offs_s, mask=s_ok, other=0.0)
    acc = tl.load(OPART + (row * NSPLIT + offs_s)[:, None] * D + offs_d[None, :],
                  mask=s_ok[:, None] & d_mask[None, :], other=0.0)
    m_max = tl.max(m, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)  # a split that saw nothing has m = -inf
    w = tl.exp2(m - m_safe)  # the partial maxima are in base 2
    denom = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(O + b * stride_ob + t * stride_ot + hh * stride_oh + offs_d, out.to(O.dtype.element_ty), mask=d_mask)


def decode_splits(batch: int, kv_heads: int, tiles: int, device: torch.device) -> int:
    """Splits of the cache so that about four programs run per SM (one without a GPU). On the H200
    (tune_hierarchical.py --decode, 131072 cached tokens, B1 H32/8, 32-key tiles, graphed): 66 splits
    per kv head (4 programs per SM) 18.0 us; 33 (2 per SM) 24.3 us; 132 (8 per SM) 20.4 us."""
    if device.type != "cuda":
        return 1
    return max(1, min(tiles, triton.cdiv(4 * sm_count(device), batch * kv_heads)))


def hierarchical_decode_attn(q: torch.Tensor, cache, lengths: torch.Tensor, *, softmax_scale: float,
                             num_splits: int | None = None, block_n: int = 32, num_warps: int = 4,
                             num_stages: int = 2, direct: bool = False) -> torch.Tensor:
    """Attention of ``q [B, T, Hq, D]`` (the newest ``T`` tokens of each row, already appended)
    over ``cache``. Returns ``[B, T, Hq, D]`` like ``q``. ``num_splits``, ``block_n``, ``num_warps``,
    ``num_stages``: the launch shape, tuned on the H200 (``benchmarks/tune_hierarchical.py --decode``:
    32-key tiles, 4 warps, 2 stages and ``decode_splits`` ran 18.0 us at 131072 cached tokens against
    26.7 us for the earlier 64-key tiles with half the splits; 64-key tiles with 3 stages 33.2 us)."""
    B, T, Hq, D = q.shape
    Hkv = cache.k.shape[2]
    rep = Hq // Hkv
    q = q if q.stride(-1) == 1 else q.contiguous()
    ns, M, L = cache.k.shape[1], cache.group_slots, cache.levels
    tiles = triton.cdiv(ns, block_n) + triton.cdiv(L * M, block_n)
    nsplit = num_splits or decode_splits(B, Hkv, tiles, q.device)
    per_split = triton.cdiv(tiles, nsplit)
    nsplit = triton.cdiv(tiles, per_split)
    out = torch.empty_like(q)
    if nsplit > 1:
        opart = torch.empty(B, T, Hq, nsplit, D, device=q.device, dtype=torch.float32)
        mpart = torch.empty(B, T, Hq, nsplit, device=q.device, dtype=torch.float32)
        lpart = torch.empty_like(mpart)
    else:
        opart = mpart = lpart = out  # not touched
    block_d = max(16, triton.next_power_of_2(D))
    triton_kernel(_hier_decode_kernel, direct)[(nsplit, B * Hkv)](
        q, cache.k, cache.v, cache.positions, cache.sum_k, cache.sum_v, cache.group, cache.count,
        cache.seqlens, lengths, out, opart, mpart, lpart,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        softmax_scale, T, Hq, Hkv, rep, D, ns, M, L, cache.window // cache.block, cache.block, cache.sinks,
        per_split, nsplit,
        SPLIT=nsplit > 1, BLOCK_M=max(16, triton.next_power_of_2(T * rep)), BLOCK_N=block_n, BLOCK_D=block_d,
        **launch_options({"num_warps": num_warps, "num_stages": num_stages}),
    )
    if nsplit > 1:
        triton_kernel(_hier_decode_combine_kernel, direct)[(B * T * Hq,)](
            opart, mpart, lpart, out, out.stride(0), out.stride(1), out.stride(2), T, Hq, D, nsplit,
            BLOCK_SPLIT=max(2, triton.next_power_of_2(nsplit)), BLOCK_D=block_d, num_warps=4,
        )
    return out
