"""Triton decode kernels for sliding-window attention against a ``RollingKVCache``.

One program per (sequence, KV head, split of the cache slots): the ``T·REP`` query rows of the
step (every new token x every query head of the GQA group) form one tile, so each cached key and
value is read once per KV head. The slots are split across programs (flash-decoding) so a small
batch still fills the GPU; a second kernel merges the splits' partial softmax states. Visibility
is by the absolute position each slot holds (``positions``, -1 = empty): query at position ``p``
sees ``p - window < j <= p`` and ``j < sinks``.
"""

import torch
import triton
import triton.language as tl

from deepseek_kernels.ops._registry import triton_kernel
from deepseek_kernels.triton._common import f32

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    Q, K, V, POS, SEQLENS, LENGTHS, O_PART, ML_PART,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_pb, T, HKV, REP, SLOTS, SLOTS_PER_SPLIT, qk_scale, window, sinks,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    qk_scale = f32(qk_scale)  # torch.compile passes Python floats as fp64
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    nsplit = tl.num_programs(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    offs_m = tl.arange(0, BLOCK_M)  # row m = t * REP + r
    t = offs_m // REP
    h = kvh * REP + offs_m % REP
    m_ok = offs_m < T * REP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + t[:, None] * stride_qt + h[:, None] * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    first = tl.load(SEQLENS + b) - tl.load(LENGTHS + b)
    p = first + t  # absolute position of each query row
    lo = split * SLOTS_PER_SPLIT
    hi = tl.minimum(lo + SLOTS_PER_SPLIT, SLOTS)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < hi
        j = tl.load(POS + b.to(tl.int64) * stride_pb + offs_n, mask=n_ok, other=-1)
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_ks + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=PREC) * qk_scale
        jj = j[None, :]
        pp = p[:, None]
        vis = (jj >= 0) & (jj <= pp) & ((jj > pp - window) | (jj < sinks)) & m_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        pr = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(pr, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vs + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    # partial state of this split, indexed [b, t, h, split]
    row = ((b * T + t).to(tl.int64) * (HKV * REP) + h) * nsplit + split
    tl.store(O_PART + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=m_ok[:, None])
    tl.store(ML_PART + row * 2, m_i, mask=m_ok)
    tl.store(ML_PART + row * 2 + 1, l_i, mask=m_ok)


@triton.jit
def _decode_combine_kernel(O_PART, ML_PART, OUT, stride_ob, stride_ot, stride_oh, T, HQ, NSPLIT,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per (b, t, h): merges the splits' (m, l, acc) into the normalised output."""
    pid = tl.program_id(0)
    h = pid % HQ
    t = (pid // HQ) % T
    b = pid // (HQ * T)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NSPLIT
    base = pid.to(tl.int64) * NSPLIT
    m = tl.load(ML_PART + (base + offs_s) * 2, mask=s_ok, other=float("-inf"))
    l = tl.load(ML_PART + (base + offs_s) * 2 + 1, mask=s_ok, other=0.0)
    m_all = tl.max(m, 0)
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.where(s_ok & (m > float("-inf")), tl.exp2(m - m_use), 0.0)
    l_all = tl.sum(l * w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(O_PART + (base + offs_s)[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l_all > 0, l_all, 1.0)
    tl.store(OUT + b.to(tl.int64) * stride_ob + t * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def window_decode(q, k_cache, v_cache, positions, seqlens, lengths, *, window: int, sinks: int, scale: float,
                  splits: int | None = None, direct: bool = False):
    """``q [B, T, Hq, D]`` against the cache tensors -> ``[B, T, Hq, D]`` (see the module docstring)."""
    B, T, Hq, D = q.shape
    slots, Hkv = k_cache.shape[1], k_cache.shape[2]
    rep = Hq // Hkv
    block_d = max(16, triton.next_power_of_2(D))
    block_m = max(16, triton.next_power_of_2(T * rep))
    block_n = 64 if block_m <= 64 else 32
    if splits is None:  # enough programs for ~2 waves on a large GPU, at least 2 key tiles each
        splits = max(1, min(triton.cdiv(slots, 2 * block_n), triton.cdiv(264, B * Hkv)))
    per_split = triton.cdiv(triton.cdiv(slots, splits), block_n) * block_n
    splits = triton.cdiv(slots, per_split)
    o_part = torch.empty(B * T * Hq * splits, block_d, device=q.device, dtype=torch.float32)
    ml_part = torch.empty(B * T * Hq * splits, 2, device=q.device, dtype=torch.float32)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.dtype != k_cache.dtype:  # the dots take the cache's dtype; the output keeps q's
        q = q.to(k_cache.dtype)
    if q.stride(-1) != 1:  # the kernel reads head-dim columns contiguously
        q = q.contiguous()
    triton_kernel(_decode_split_kernel, direct)[(B * Hkv, splits)](
        q, k_cache, v_cache, positions, seqlens, lengths, o_part, ml_part,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), positions.stride(0),
        T, Hkv, rep, slots, per_split, scale * LOG2E, window, sinks,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        PREC="ieee" if k_cache.dtype == torch.float32 else "tf32", num_warps=4, num_stages=2,
    )
    triton_kernel(_decode_combine_kernel, direct)[(B * T * Hq,)](
        o_part, ml_part, out, out.stride(0), out.stride(1), out.stride(2), T, Hq, splits,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4,
    )
    return out


@triton.jit
def _rolling_append_kernel(K, V, LENGTHS, SEQLENS, CK, CV, POS,
                           stride_kb, stride_kt, stride_vb, stride_vt, stride_cb, stride_cs, stride_pb,
                           T, HD, sinks, ring, BLOCK_T: tl.constexpr, BLOCK_HD: tl.constexpr):
    """Program (token tile, row b): token t of the step sits at position seqlens[b] + t; it is kept
    iff t < lengths[b] and (a sink, or among the last ``ring`` new tokens), in slot ``pos`` (sinks)
    or ``sinks + (pos - sinks) % ring``. Kept tokens have distinct slots; the rest are not written."""
    b = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.load(LENGTHS + b)
    pos = tl.load(SEQLENS + b) + t
    keep = (t < n) & ((pos < sinks) | (t >= n - ring))
    slot = tl.where(pos < sinks, pos, sinks + (pos - sinks) % ring)
    slot = tl.where(keep, slot, 0).to(tl.int64)
    t64 = t.to(tl.int64)
    for h0 in range(0, HD, BLOCK_HD):
        offs = h0 + tl.arange(0, BLOCK_HD)
        m = keep[:, None] & (offs[None, :] < HD)
        dst = b * stride_cb + slot[:, None] * stride_cs + offs[None, :]
        kv = tl.load(K + b * stride_kb + t64[:, None] * stride_kt + offs[None, :], mask=m)
        tl.store(CK + dst, kv.to(CK.dtype.element_ty), mask=m)
        kv = tl.load(V + b * stride_vb + t64[:, None] * stride_vt + offs[None, :], mask=m)
        tl.store(CV + dst, kv.to(CV.dtype.element_ty), mask=m)
    tl.store(POS + b * stride_pb + slot, pos, mask=keep)


def rolling_cache_append(cache, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, direct: bool = False) -> None:
    """Writes the kept tokens of ``k, v [B, T, Hkv, D]`` into ``cache`` (a ``RollingKVCache``) in one
    launch; ``cache.seqlens`` is left for the caller to advance (programs of a row read it)."""
    B, T, Hkv, D = k.shape
    k, v = (t if t.stride(3) == 1 and t.stride(2) == D else t.contiguous() for t in (k, v))
    HD = Hkv * D
    block_hd = min(triton.next_power_of_2(HD), 2048)
    block_t = max(1, min(64, 8192 // block_hd, triton.next_power_of_2(T)))
    triton_kernel(_rolling_append_kernel, direct)[(triton.cdiv(T, block_t), B)](
        k, v, lengths, cache.seqlens, cache.k, cache.v, cache.positions,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cache.k.stride(0), cache.k.stride(1),
        cache.positions.stride(0), T, HD, cache.sinks, cache.ring,
        BLOCK_T=block_t, BLOCK_HD=block_hd, num_warps=4,
    )
