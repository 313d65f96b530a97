"""Triton kernels for sliding-window attention, forward and backward (the first path of
``deepseek_kernels.window_attention``; untuned).

Semantics: ``deepseek_kernels/reference/attention.py`` (window, sinks, causal or symmetric window,
GQA, packed varlen, ends aligned when Sq != Sk, lse). Every layout is handled as packed varlen:
a dense ``[B, S, H, D]`` batch is ``[B*S, H, D]`` with ``cu_seqlens = arange(B + 1) * S``.

Work per program: one block of BLOCK_M queries of one head. Only key blocks that can hold a
visible key are visited: the sink blocks before the window, then the window itself, so the cost
is O(S * (W + sinks)) rather than O(S^2). Online softmax in fp32 (FlashAttention-2 style).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _visible(pos, j, window, sinks, CAUSAL: tl.constexpr):
    if CAUSAL:
        return ((j > pos - window) & (j <= pos)) | ((j < sinks) & (j <= pos))
    else:
        return (tl.abs(pos - j) < window) | (j < sinks)


@triton.jit
def _seq_bounds(cu_q, cu_k, b):
    """Start and length of sequence b's queries and keys in the packed layout."""
    q_start = tl.load(cu_q + b)
    k_start = tl.load(cu_k + b)
    return q_start, tl.load(cu_q + b + 1) - q_start, k_start, tl.load(cu_k + b + 1) - k_start


@triton.jit
def _key_blocks(m0, q_len, k_len, window, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For queries [m0, m0 + BLOCK_M): the first window key block (aligned) and the end of the
    window; the sink blocks before it are [0, min(sinks, start))."""
    pos_lo = m0 + k_len - q_len
    pos_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1 + k_len - q_len
    win_lo = tl.maximum(pos_lo - window + 1, 0)
    if CAUSAL:
        hi = tl.minimum(pos_hi + 1, k_len)
    else:
        hi = tl.minimum(pos_hi + window, k_len)
    return (win_lo // BLOCK_N) * BLOCK_N, hi


@triton.jit
def _visit(acc, l_i, m_i, q, pos, offs_m, q_len, k_base, v_base, k_len, lo, hi,
           stride_kt, stride_vt, offs_d, d_mask, sm_scale, window, sinks,
           CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k) * sm_scale
        vis = _visible(pos[:, None], offs_n[None, :], window, sinks, CAUSAL)
        vis = vis & n_mask[None, :] & (offs_m < q_len)[:, None]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _window_attn_fwd_kernel(
    Q, K, V, O, LSE, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    sm_scale, window, sinks, HQ, REP, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // REP
    q_start, q_len, k_start, k_len = _seq_bounds(cu_q, cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < q_len
        q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        pos = offs_m + (k_len - q_len)
        start, hi = _key_blocks(m0, q_len, k_len, window, CAUSAL, BLOCK_M, BLOCK_N)
        k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        # sink blocks that lie before the window, then the window
        acc, l_i, m_i = _visit(acc, l_i, m_i, q, pos, offs_m, q_len, k_base, v_base, k_len,
                               0, tl.minimum(tl.minimum(sinks, start), k_len), stride_kt, stride_vt,
                               offs_d, d_mask, sm_scale, window, sinks, CAUSAL, BLOCK_N)
        acc, l_i, m_i = _visit(acc, l_i, m_i, q, pos, offs_m, q_len, k_base, v_base, k_len,
                               start, hi, stride_kt, stride_vt,
                               offs_d, d_mask, sm_scale, window, sinks, CAUSAL, BLOCK_N)
        seen = l_i > 0
        out = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(O + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=m_mask)


def window_attention_fwd(q, k, v, *, window: int, sinks: int = 0, causal: bool = True,
                         softmax_scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                         max_seqlen_q: int | None = None, block_m: int = 64, block_n: int = 64, num_warps: int = 4):
    """Forward pass. Dense ``q [B, Sq, Hq, D]`` / ``k, v [B, Sk, Hkv, D]`` or packed ``[T, H, D]``
    with ``cu_seqlens_*``. Returns ``(out, lse)``: out like q, lse ``[B, Hq, Sq]`` (dense) or
    ``[Hq, T]`` (packed), float32."""
    dense = cu_seqlens_q is None
    if dense:
        B, Sq, Hq, D = q.shape
        Sk = k.shape[1]
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sq
        cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sk
        qp, kp, vp = q.reshape(B * Sq, Hq, D), k.reshape(B * Sk, -1, D), v.reshape(B * Sk, -1, D)
        max_q = Sq
    else:
        cu_q = cu_seqlens_q
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        B = cu_q.numel() - 1
        qp, kp, vp = q, k, v
        Hq, D = q.shape[1], q.shape[2]
        max_q = max_seqlen_q if max_seqlen_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
    qp, kp, vp = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp))
    out = torch.empty_like(qp)
    lse = torch.empty(Hq, qp.shape[0], device=q.device, dtype=torch.float32)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    block_d = max(16, triton.next_power_of_2(D))
    grid = (triton.cdiv(max(max_q, 1), block_m), B * Hq)
    torch.library.wrap_triton(_window_attn_fwd_kernel)[grid](
        qp, kp, vp, out, lse, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale, window, sinks, Hq, Hq // kp.shape[1], D,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if dense:
        return out.reshape(q.shape), lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse


# ---- backward ---------------------------------------------------------------------------------------
#
# FlashAttention-2 style, in two kernels so no atomics are needed (deterministic):
#   _window_attn_bwd_dkdv: one program per (key block, kv head); loops over the query blocks that
#       can see those keys, for every query head of the GQA group, accumulating dK and dV.
#   _window_attn_bwd_dq:   one program per (query block, query head); loops over the same key
#       blocks as the forward pass, accumulating dQ.
# With P = exp(s - lse), delta_i = sum_d dO_i O_i:  dV = P^T dO,  dS = P (dO V^T - delta),
# dQ = scale dS K,  dK = scale dS^T Q.


@triton.jit
def _window_attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    sm_scale, window, sinks, HKV, REP, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    q_start, q_len, k_start, k_len = _seq_bounds(cu_q, cu_k, b)
    n0 = pid_n * BLOCK_N
    if n0 < k_len:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        n_mask = offs_n < k_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K + (k_start + offs_n)[:, None].to(tl.int64) * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (k_start + offs_n)[:, None].to(tl.int64) * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        off = k_len - q_len  # query i sits at position i + off
        n_hi = tl.minimum(n0 + BLOCK_N, k_len) - 1
        if n0 < sinks:  # sink keys are seen by every later query
            i_lo = tl.maximum(n0 - off, 0)
            i_hi = q_len
        elif CAUSAL:
            i_lo = tl.maximum(n0 - off, 0)
            i_hi = tl.minimum(n_hi + window - 1 - off + 1, q_len)
        else:
            i_lo = tl.maximum(n0 - window + 1 - off, 0)
            i_hi = tl.minimum(n_hi + window - 1 - off + 1, q_len)
        i_start = (i_lo // BLOCK_M) * BLOCK_M
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for r in range(0, REP):
            h = kvh * REP + r
            for m0 in range(i_start, i_hi, BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                m_mask = offs_m < q_len
                q_mask = m_mask[:, None] & d_mask[None, :]
                q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                            mask=q_mask, other=0.0)
                do = tl.load(DO + (q_start + offs_m)[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=m_mask, other=0.0)
                delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=m_mask, other=0.0)
                s = tl.dot(q, tl.trans(k)) * sm_scale
                vis = _visible((offs_m + off)[:, None], offs_n[None, :], window, sinks, CAUSAL)
                vis = vis & m_mask[:, None] & n_mask[None, :]
                p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
                dv += tl.dot(tl.trans(p.to(do.dtype)), do)
                dp = tl.dot(do, tl.trans(v))
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dk = dk * sm_scale
        tl.store(DK + (k_start + offs_n)[:, None].to(tl.int64) * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (k_start + offs_n)[:, None].to(tl.int64) * stride_dvt + kvh * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_visit(dq, q, do, lse, delta, pos, offs_m, q_len, k_base, v_base, k_len, lo, hi,
              stride_kt, stride_vt, offs_d, d_mask, sm_scale, window, sinks,
              CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        vis = _visible(pos[:, None], offs_n[None, :], window, sinks, CAUSAL)
        vis = vis & n_mask[None, :] & (offs_m < q_len)[:, None]
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    return dq


@triton.jit
def _window_attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    sm_scale, window, sinks, HQ, REP, D,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kvh = h // REP
    q_start, q_len, k_start, k_len = _seq_bounds(cu_q, cu_k, b)
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < q_len
        q_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        do = tl.load(DO + (q_start + offs_m)[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=m_mask, other=0.0)
        delta = tl.load(DELTA + h * stride_lh + q_start + offs_m, mask=m_mask, other=0.0)
        pos = offs_m + (k_len - q_len)
        start, hi = _key_blocks(m0, q_len, k_len, window, CAUSAL, BLOCK_M, BLOCK_N)
        k_base = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh
        v_base = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dq = _dq_visit(dq, q, do, lse, delta, pos, offs_m, q_len, k_base, v_base, k_len,
                       0, tl.minimum(tl.minimum(sinks, start), k_len), stride_kt, stride_vt, offs_d, d_mask,
                       sm_scale, window, sinks, CAUSAL, BLOCK_N)
        dq = _dq_visit(dq, q, do, lse, delta, pos, offs_m, q_len, k_base, v_base, k_len,
                       start, hi, stride_kt, stride_vt, offs_d, d_mask, sm_scale, window, sinks, CAUSAL, BLOCK_N)
        tl.store(DQ + (q_start + offs_m)[:, None].to(tl.int64) * stride_dqt + h * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def window_attention_bwd(do, q, k, v, out, lse, *, window: int, sinks: int = 0, causal: bool = True,
                         softmax_scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                         max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                         block_m: int = 64, block_n: int = 64, num_warps: int = 4):
    """Gradients ``(dq, dk, dv)`` of :func:`window_attention_fwd` given ``do`` and its ``out``/``lse``.
    Deterministic (no atomics): GQA heads are summed inside the dK/dV program."""
    dense = cu_seqlens_q is None
    if dense:
        B, Sq, Hq, D = q.shape
        Sk = k.shape[1]
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sq
        cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sk
        flat = lambda t, s: t.reshape(B * s, t.shape[2], D)  # noqa: E731
        qp, kp, vp, dop, op_ = flat(q, Sq), flat(k, Sk), flat(v, Sk), flat(do, Sq), flat(out, Sq)
        lsep = lse.transpose(0, 1).reshape(Hq, B * Sq)
        max_q, max_k = Sq, Sk
    else:
        cu_q = cu_seqlens_q
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        B = cu_q.numel() - 1
        qp, kp, vp, dop, op_, lsep = q, k, v, do, out, lse
        Hq, D = q.shape[1], q.shape[2]
        max_q = max_seqlen_q if max_seqlen_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = max_seqlen_k if max_seqlen_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
    qp, kp, vp, dop = (t if t.stride(-1) == 1 else t.contiguous() for t in (qp, kp, vp, dop))
    lsep = lsep.contiguous()
    delta = (op_.float() * dop.float()).sum(-1).transpose(0, 1).contiguous()  # [Hq, T]
    Hkv = kp.shape[1]
    dq, dk, dv = torch.empty_like(qp), torch.empty_like(kp), torch.empty_like(vp)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    block_d = max(16, triton.next_power_of_2(D))
    common = dict(CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps)
    torch.library.wrap_triton(_window_attn_bwd_dkdv)[(triton.cdiv(max(max_k, 1), block_n), B * Hkv)](
        qp, kp, vp, dop, lsep, delta, dk, dv, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        dop.stride(0), dop.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lsep.stride(0),
        scale, window, sinks, Hkv, Hq // Hkv, D, **common,
    )
    torch.library.wrap_triton(_window_attn_bwd_dq)[(triton.cdiv(max(max_q, 1), block_m), B * Hq)](
        qp, kp, vp, dop, lsep, delta, dq, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        dop.stride(0), dop.stride(1), dq.stride(0), dq.stride(1), lsep.stride(0),
        scale, window, sinks, Hq, Hq // Hkv, D, **common,
    )
    if dense:
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    return dq, dk, dv
