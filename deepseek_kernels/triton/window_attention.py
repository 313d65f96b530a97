"""Triton forward kernel for sliding-window attention (first path for issue 3; not yet exposed as
an op: the backward is still to come).

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
def _visit(acc, l_i, m_i, q, pos, offs_m, q_len, k_base, v_base, k_len, lo, hi,
           stride_kt, stride_vt, offs_d, d_mask, sm_scale, window, sinks,
           CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < k_len
        k = tl.load(k_base + offs_n[None, :].to(tl.int64) * stride_kt + offs_d[:, None],
                    mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k) * sm_scale
        j = offs_n[None, :]
        p_ = pos[:, None]
        if CAUSAL:
            vis = ((j > p_ - window) & (j <= p_)) | ((j < sinks) & (j <= p_))
        else:
            vis = (tl.abs(p_ - j) < window) | (j < sinks)
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
    q_start = tl.load(cu_q + b)
    q_len = tl.load(cu_q + b + 1) - q_start
    k_start = tl.load(cu_k + b)
    k_len = tl.load(cu_k + b + 1) - k_start
    m0 = pid_m * BLOCK_M
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < D
        m_mask = offs_m < q_len
        q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)
        pos = offs_m + (k_len - q_len)
        pos_lo = m0 + k_len - q_len
        pos_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1 + k_len - q_len
        win_lo = tl.maximum(pos_lo - window + 1, 0)
        if CAUSAL:
            hi = tl.minimum(pos_hi + 1, k_len)
        else:
            hi = tl.minimum(pos_hi + window, k_len)
        start = (win_lo // BLOCK_N) * BLOCK_N
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
    _window_attn_fwd_kernel[grid](
        qp, kp, vp, out, lse, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        scale, window, sinks, Hq, Hq // kp.shape[1], D,
        CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    if dense:
        return out.reshape(q.shape), lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse
