"""Triton kernels for sliding-window attention, forward and backward (the GPU path of
``deepseek_kernels.window_attention``).

Semantics: ``deepseek_kernels/reference/attention.py`` (window, sinks, causal or symmetric window,
GQA, packed varlen, ends aligned when Sq != Sk, lse). Every layout is handled as packed varlen:
a dense ``[B, S, H, D]`` batch is ``[B*S, H, D]`` with ``cu_seqlens = arange(B + 1) * S``.

Work per program: one tile of BLOCK_M queries of one head (forward, dQ) or BLOCK_N keys of one
KV head (dK/dV). Only tiles that can hold a visible (query, key) pair are visited: the sink
tiles before the window, then the window, so the cost is O(S * (W + sinks)) rather than O(S^2).
Inside the window, the tiles where every pair is visible (all but the diagonal and the far edge
of the window) skip the mask arithmetic entirely (``MASKED=False``). Online softmax in fp32 in
the exp2 domain (FlashAttention-2 style); lse is returned in natural log.
"""

import os

import torch
import triton
import triton.language as tl

from deepseek_kernels.triton._common import f32

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _visible(pos, j, window, sinks, CAUSAL: tl.constexpr):
    if CAUSAL:
        return ((j > pos - window) & (j <= pos)) | ((j < sinks) & (j <= pos))
    else:
        return (tl.abs(pos - j) < window) | (j < sinks)


@triton.jit
def _pad_columns(offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Column offsets for unmasked head-dim loads: a padded head dim (BLOCK_D > HEAD_DIM) reads
    column 0 in its pad columns (finite values, cancelled by zeros in the other operand).
    Returns offs_d itself when there is no pad, so the compiler still sees contiguous columns
    and vectorizes the loads."""
    if BLOCK_D == HEAD_DIM:
        return offs_d
    else:
        return tl.where(offs_d < HEAD_DIM, offs_d, 0)


@triton.jit
def _seq_bounds(cu_q, cu_k, b):
    """Start and length of sequence b's queries and keys in the packed layout."""
    q_start = tl.load(cu_q + b)
    k_start = tl.load(cu_k + b)
    return q_start, tl.load(cu_q + b + 1) - q_start, k_start, tl.load(cu_k + b + 1) - k_start


@triton.jit
def _key_ranges(m0, q_len, k_len, window, sinks, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """Key tiles for the queries [m0, m0 + BLOCK_M), as four consecutive ranges of tile starts:
    sinks [0, a) masked, window edge [b, c) masked, interior [c, d) unmasked, diagonal [d, e)
    masked. Interior tiles hold only visible pairs for every query row of the tile."""
    off = k_len - q_len  # query i sits at key position i + off
    pos_lo = m0 + off
    pos_hi = tl.minimum(m0 + BLOCK_M, q_len) - 1 + off
    start = (tl.maximum(pos_lo - window + 1, 0) // BLOCK_N) * BLOCK_N
    sink_end = tl.minimum(tl.minimum(sinks, start), k_len)
    if CAUSAL:
        end = tl.minimum(pos_hi + 1, k_len)
        full_lo = tl.cdiv(tl.maximum(pos_hi - window + 1, 0), BLOCK_N) * BLOCK_N
        full_hi = ((pos_lo + 1) // BLOCK_N) * BLOCK_N
        full_hi = tl.where(pos_lo + 1 > 0, full_hi, 0)
        if full_hi <= full_lo:  # no interior tile: the whole window is masked
            full_lo = end
            full_hi = end
    else:
        end = tl.minimum(pos_hi + window, k_len)
        full_lo = end
        full_hi = end
    return sink_end, start, full_lo, full_hi, end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, pos, k_ptrs, v_ptrs, k_desc, v_desc, k_row0, kv_col, k_len, lo, hi,
               stride_kt, stride_vt, qk_scale, window, sinks, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
               BLOCK_N: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr):
    """Key tiles [lo, hi) of one query tile. ``USE_TMA``: K and V tiles come through tensor
    descriptors (rows ``k_row0 + start_n``, columns ``kv_col``); rows past the sequence then hold
    the next sequence's keys (or zeros past the tensor), which the mask hides from the scores and
    the ``where`` on V keeps out of the sum (so a NaN there cannot leak in)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            n_mask = offs_n < k_len
        if USE_TMA:
            k = tl.trans(k_desc.load([k_row0 + start_n, kv_col]))
        elif MASKED:
            k = tl.load(k_ptrs + tl.cast(start_n, tl.int64) * stride_kt, mask=n_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs + tl.cast(start_n, tl.int64) * stride_kt)
        s = tl.dot(q, k, input_precision=PREC) * qk_scale
        if MASKED:
            vis = _visible(pos[:, None], offs_n[None, :], window, sinks, CAUSAL) & n_mask[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if USE_TMA:
            v = v_desc.load([k_row0 + start_n, kv_col])
            if MASKED:
                v = tl.where(n_mask[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_ptrs + tl.cast(start_n, tl.int64) * stride_vt, mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs + tl.cast(start_n, tl.int64) * stride_vt)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_program(cu_q, cu_k, HQ, REP, BLOCK_M: tl.constexpr):
    """A (query tile, query head) program's head, KV head, its sequence's bounds and its first query row."""
    pid_bh = tl.program_id(1)
    b = pid_bh // HQ
    h = pid_bh % HQ
    q_start, q_len, k_start, k_len = _seq_bounds(cu_q, cu_k, b)
    return h, h // REP, q_start, q_len, k_start, k_len, tl.program_id(0) * BLOCK_M


@triton.jit
def _fwd_finish(acc, l_i, m_i, O, LSE, q_start, offs_m, offs_d, h, stride_ot, stride_oh, stride_lh, io_mask, m_mask):
    """out = acc / l and lse (natural log; -inf for a row that saw no key) stored for the tile's rows."""
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=io_mask)
    tl.store(LSE + h * stride_lh + q_start + offs_m, lse, mask=m_mask)


@triton.jit
def _window_attn_fwd_kernel(
    Q, K, V, O, LSE, cu_q, cu_k, K_DESC, V_DESC,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    qk_scale, window, sinks, HQ, REP,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, USE_TMA: tl.constexpr,
):
    qk_scale = f32(qk_scale)
    h, kvh, q_start, q_len, k_start, k_len, m0 = _query_program(cu_q, cu_k, HQ, REP, BLOCK_M)
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        if BLOCK_D == HEAD_DIM:
            io_mask = m_mask[:, None]
        else:
            io_mask = m_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        pos = offs_m + (k_len - q_len)
        offs_n = tl.arange(0, BLOCK_N)
        d_col = _pad_columns(offs_d, HEAD_DIM, BLOCK_D)  # pad columns read column 0 (their q is 0)
        k_ptrs = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_n[None, :] * stride_kt + d_col[:, None]
        v_ptrs = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_n[:, None] * stride_vt + d_col[None, :]
        sink_end, start, full_lo, full_hi, end = _key_ranges(m0, q_len, k_len, window, sinks, CAUSAL,
                                                             BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        kv_col = kvh * HEAD_DIM  # the descriptors view K and V as [T, Hkv * D]
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, pos, k_ptrs, v_ptrs, K_DESC, V_DESC, k_start, kv_col, k_len,
                                   0, sink_end, stride_kt, stride_vt,
                                   qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC, USE_TMA)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, pos, k_ptrs, v_ptrs, K_DESC, V_DESC, k_start, kv_col, k_len,
                                   start, full_lo, stride_kt, stride_vt,
                                   qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC, USE_TMA)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, pos, k_ptrs, v_ptrs, K_DESC, V_DESC, k_start, kv_col, k_len,
                                   full_lo, full_hi, stride_kt,
                                   stride_vt, qk_scale, window, sinks, CAUSAL, False, BLOCK_N, PREC, USE_TMA)
        acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, pos, k_ptrs, v_ptrs, K_DESC, V_DESC, k_start, kv_col, k_len,
                                   full_hi, end, stride_kt, stride_vt,
                                   qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC, USE_TMA)
        _fwd_finish(acc, l_i, m_i, O, LSE, q_start, offs_m, offs_d, h, stride_ot, stride_oh, stride_lh, io_mask, m_mask)


@triton.jit
def _window_attn_fwd_ws_kernel(
    Q_DESC, O, LSE, cu_q, cu_k, K_DESC, V_DESC,
    stride_ot, stride_oh, stride_lh,
    qk_scale, window, sinks, HQ, REP,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PREC: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    """:func:`_window_attn_fwd_kernel` with K/V tiles through TMA descriptors and all key tiles of a query
    tile (sinks, then the window) in ONE loop, masked throughout, so Triton's warp specialization applies
    (a producer warp issuing the TMA loads, the consumer warpgroup doing the dots and the softmax). Triton
    3.6 specializes this loop at num_warps=4 (setmaxnreg in the PTX) when Q comes through a descriptor too;
    its pass fails on the four-loop kernel (sinks / edge / mask-free interior / diagonal), on one interior
    loop among other loops, and when Q is a pointer load (session 11, AOT compiles for sm_90). Rows of the
    Q tile past the sequence hold the next sequence's queries: computed, never stored. Experimental
    (``window_attention_fwd(ws=True)``) until timed."""
    qk_scale = f32(qk_scale)
    h, kvh, q_start, q_len, k_start, k_len, m0 = _query_program(cu_q, cu_k, HQ, REP, BLOCK_M)
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < q_len
        q = Q_DESC.load([q_start + m0, h * HEAD_DIM])
        pos = offs_m + (k_len - q_len)
        sink_end, start, _full_lo, _full_hi, end = _key_ranges(m0, q_len, k_len, window, sinks, CAUSAL,
                                                               BLOCK_M, BLOCK_N)
        n_sink = tl.cdiv(sink_end, BLOCK_N)  # sink tiles end at or before `start` (a multiple of BLOCK_N)
        n_tiles = n_sink + tl.cdiv(tl.maximum(end - start, 0), BLOCK_N)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        kv_col = kvh * HEAD_DIM
        offs_n0 = tl.arange(0, BLOCK_N)
        for i in tl.range(0, n_tiles, warp_specialize=WARP_SPECIALIZE):
            start_n = tl.where(i < n_sink, i * BLOCK_N, start + (i - n_sink) * BLOCK_N)
            offs_n = start_n + offs_n0
            n_mask = offs_n < k_len
            k = tl.trans(K_DESC.load([k_start + start_n, kv_col]))
            s = tl.dot(q, k, input_precision=PREC) * qk_scale
            vis = _visible(pos[:, None], offs_n[None, :], window, sinks, CAUSAL) & n_mask[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
            p = tl.exp2(s - m_use[:, None])
            alpha = tl.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            # rows past the sequence hold the next sequence's values: kept out of the sum (NaN included)
            v = tl.where(n_mask[:, None], V_DESC.load([k_start + start_n, kv_col]), 0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        _fwd_finish(acc, l_i, m_i, O, LSE, q_start, offs_m, offs_d, h, stride_ot, stride_oh, stride_lh, m_mask[:, None],
                    m_mask)


def _flatten(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Dense ``[B, S, H, D]`` or packed ``[T, H, D]`` inputs -> packed views + cu_seqlens + max lengths."""
    if cu_seqlens_q is None:
        B, Sq = q.shape[0], q.shape[1]
        Sk = k.shape[1]
        cu_q = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sq
        cu_k = torch.arange(B + 1, device=q.device, dtype=torch.int32) * Sk
        flat = lambda t, s: t.reshape(B * s, t.shape[2], t.shape[3])  # noqa: E731
        return flat(q, Sq), flat(k, Sk), flat(v, Sk), cu_q, cu_k, Sq, Sk
    cu_q = cu_seqlens_q
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    max_q = max_seqlen_q if max_seqlen_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
    max_k = max_seqlen_k if max_seqlen_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
    return q, k, v, cu_q, cu_k, max_q, max_k


def _precision(q) -> str:
    """fp32 inputs get full-precision dots (3xTF32 would lose ~1e-3); 16-bit inputs use the
    tensor cores as they are."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _unit_stride(*ts):
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in ts)


# Launch shapes (BLOCK_M, BLOCK_N, num_warps, num_stages), tuned on the H200 by
# benchmarks/tune_attention.py (bf16, D=128, S=8192, causal windows 1024 and 4096; see
# benchmarks/NOTES.md). The forward prefers small tiles for narrow windows (less wasted work on
# the diagonal and the window edge) and 128x64 once interior tiles dominate.
FWD_CONFIG = {64: (64, 64, 4, 3), 128: (64, 32, 4, 3)}
FWD_WIDE_CONFIG = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}  # window >= FWD_WIDE_WINDOW
FWD_WIDE_WINDOW = 2048
BWD_DKDV_CONFIG = {64: (64, 128, 8, 1), 128: (64, 128, 8, 1)}
BWD_DQ_CONFIG = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)}
BWD_FUSED_CONFIG = {64: (64, 128, 8, 1), 128: (64, 128, 8, 1)}  # dK/dV + atomic dQ: not yet tuned
SMALL_CONFIG = (64, 64, 4, 2)  # head dims other than 64/128, and the Triton interpreter
# The warp-specialized forward (experimental, ws=True): 4 warps (Triton 3.6 specializes at 4, not at 8).
# 64-row query tiles: Triton 3.8 splits a 128-row tile across consumer groups but not its TMA descriptor
# and fails to compile it (3.6, the H200's, compiles 128; the tuner tries both). AOT-compiled, not yet timed.
WS_FWD_CONFIG = (64, 64, 4, 2)
_TRITON_VERSION = tuple(int(x) for x in triton.__version__.split(".")[:2])


def _tma_ok(k: torch.Tensor, v: torch.Tensor, D: int, block_d: int, *more: torch.Tensor) -> bool:
    """TMA descriptors over ``[T, H * D]`` views of k, v (and ``more``, e.g. q): heads and head dim
    contiguous, no head-dim pad, 16-byte aligned base and row stride, a GPU of compute capability 9+
    (or the interpreter)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401  (Triton >= 3.4)
    except ImportError:
        return False
    from deepseek_kernels.ops._registry import interpreting

    if not interpreting() and not (k.is_cuda and torch.cuda.get_device_capability(k.device)[0] >= 9):
        return False
    return D == block_d and all(
        t.stride(2) == 1 and t.stride(1) == D and (t.stride(0) * t.element_size()) % 16 == 0
        and t.data_ptr() % 16 == 0 for t in (k, v, *more))


def _config(table: dict, block_d: int, dtype: torch.dtype, override):
    if override is not None:
        return override
    if block_d > 128:
        return (64, 32, 4, 1)
    return SMALL_CONFIG if dtype == torch.float32 else table.get(block_d, SMALL_CONFIG)


def window_attention_fwd(q, k, v, *, window: int, sinks: int = 0, causal: bool = True,
                         softmax_scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                         max_seqlen_q: int | None = None, config: tuple | None = None, tma: bool | None = None,
                         ws: bool | None = None, sm90: bool | None = None):
    """Forward pass. Dense ``q [B, Sq, Hq, D]`` / ``k, v [B, Sk, Hkv, D]`` or packed ``[T, H, D]``
    with ``cu_seqlens_*``. Returns ``(out, lse)``: out like q, lse ``[B, Hq, Sq]`` (dense) or
    ``[Hq, T]`` (packed), float32. ``config = (BLOCK_M, BLOCK_N, num_warps, num_stages)``
    overrides the tuned launch shape. ``tma``: load K and V tiles through TMA tensor descriptors
    (Hopper+; experimental, off by default until measured: ``benchmarks/tune_attention.py --tma``);
    ignored where the layout does not allow it (see :func:`_tma_ok`). ``ws``: the warp-specialized
    one-loop kernel (:func:`_window_attn_fwd_ws_kernel`; TMA layouts only, experimental: its default
    launch shape is WS_FWD_CONFIG, ``config`` overrides it; 4 warps for the specialization). ``sm90``: the
    Gluon Hopper forward (``window_attention_sm90``), by default (None) for every call it supports on an
    sm_90 GPU unless ``config``, ``tma`` or ``ws`` ask for the Triton kernel or ``DSK_ATTN_SM90=0`` is set;
    False never, True always (a ValueError where it does not apply)."""
    if sm90 or (sm90 is None and config is None and not tma and not ws and os.environ.get("DSK_ATTN_SM90") != "0"):
        from deepseek_kernels.triton import window_attention_sm90

        if window_attention_sm90.supported(q, k, v, causal=causal, cu_seqlens_q=cu_seqlens_q,
                                           cu_seqlens_k=cu_seqlens_k):
            return torch.ops.deepseek_kernels.window_attention_fwd_sm90(q, k, v, window, sinks, softmax_scale)
        if sm90:
            raise ValueError("window_attention_fwd(sm90=True): the Hopper forward takes causal calls on the dense "
                             "layout with Sq == Sk, head dim 64 or 128, bf16/fp16, on an sm_90 GPU with Gluon "
                             "(Triton >= 3.6); this call is not one (see window_attention_sm90.supported)")
    dense = cu_seqlens_q is None
    qp, kp, vp, cu_q, cu_k, max_q, _ = _flatten(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, None)
    qp, kp, vp = _unit_stride(qp, kp, vp)
    T, Hq, D = qp.shape
    B = cu_q.numel() - 1
    out = torch.empty_like(qp)
    lse = torch.empty(Hq, T, device=q.device, dtype=torch.float32)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    block_d = max(16, triton.next_power_of_2(D))
    table = FWD_WIDE_CONFIG if window >= FWD_WIDE_WINDOW else FWD_CONFIG
    block_m, block_n, warps, stages = _config(table, block_d, q.dtype, config)
    grid = (triton.cdiv(max(max_q, 1), block_m), B * Hq)
    use_tma = bool(tma or ws) and _tma_ok(kp, vp, D, block_d)
    use_ws = bool(ws) and use_tma and _tma_ok(kp, vp, D, block_d, qp)
    if use_ws:
        from deepseek_kernels.ops._registry import interpreting

        if not interpreting() and os.environ.get("DSK_ATTN_WS") != "1":
            raise RuntimeError(
                "window_attention_fwd(ws=True) is experimental: on the H200 (Triton 3.6, sessions 12-13) its 128-row "
                "tiles deadlock on the GPU and its 64-row tiles run 2.7x slower than the default forward; use the "
                "default forward, or set DSK_ATTN_WS=1 to run it anyway (benchmarks/diag_attn_ws.py runs it under a "
                "watchdog)")
        block_m, block_n, warps, stages = config or WS_FWD_CONFIG
        if block_m > 64 and _TRITON_VERSION >= (3, 8):
            raise ValueError(f"window_attention_fwd(ws=True): a {block_m}-row query tile does not compile with "
                             f"Triton {triton.__version__}'s warp specialization (it splits the tile but not its TMA "
                             f"descriptor); use config=(64, ...) or Triton 3.6")
        grid = (triton.cdiv(max(max_q, 1), block_m), B * Hq)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        Tk, Hkv = kp.shape[0], kp.shape[1]
        k_desc = TensorDescriptor.from_tensor(kp.view(Tk, Hkv * D), [block_n, D])
        v_desc = TensorDescriptor.from_tensor(vp.view(Tk, Hkv * D), [block_n, D])
    else:
        k_desc, v_desc = kp, vp  # unused
    if use_ws:
        q_desc = TensorDescriptor.from_tensor(qp.view(T, Hq * D), [block_m, D])
        torch.library.wrap_triton(_window_attn_fwd_ws_kernel)[grid](
            q_desc, out, lse, cu_q, cu_k, k_desc, v_desc,
            out.stride(0), out.stride(1), lse.stride(0),
            scale * LOG2E, window, sinks, Hq, Hq // kp.shape[1],
            HEAD_DIM=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, PREC=_precision(q),
            WARP_SPECIALIZE=not interpreting(), num_warps=warps, num_stages=stages,
        )
    else:
        torch.library.wrap_triton(_window_attn_fwd_kernel)[grid](
            qp, kp, vp, out, lse, cu_q, cu_k, k_desc, v_desc,
            qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
            out.stride(0), out.stride(1), lse.stride(0),
            scale * LOG2E, window, sinks, Hq, Hq // kp.shape[1],
            HEAD_DIM=D, CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PREC=_precision(q),
            USE_TMA=use_tma, num_warps=warps, num_stages=stages,
        )
    if dense:
        B, Sq = q.shape[0], q.shape[1]
        return out.reshape(q.shape), lse.reshape(Hq, B, Sq).transpose(0, 1)
    return out, lse


# ---- backward ---------------------------------------------------------------------------------------
#
# FlashAttention-2 style, in two kernels so no atomics are needed (deterministic):
#   _window_attn_bwd_dq:   one program per (query tile, query head); computes delta for its rows
#       (stored), then visits the same key tiles as the forward pass, accumulating dQ.
#   _window_attn_bwd_dkdv: one program per (key tile, kv head), launched second; loops over the
#       query tiles that can see those keys, for every query head of the GQA group, accumulating
#       dK and dV.
# With P = exp(s - lse), delta_i = sum_d dO_i O_i:  dV = P^T dO,  dS = P (dO V^T - delta),
# dQ = scale dS K,  dK = scale dS^T Q. The dK/dV kernel works on transposed tiles (keys x queries)
# so that every product is a plain tl.dot of loaded tiles.


@triton.jit
def _query_ranges(n0, q_len, k_len, window, sinks, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Query tiles that see any of the keys [n0, n0 + BLOCK_N): masked [a, b), interior [b, c)
    (every pair visible), masked [c, d)."""
    off = k_len - q_len
    n_hi = tl.minimum(n0 + BLOCK_N, k_len) - 1
    if n0 < sinks:  # sink keys are seen by every later query
        if CAUSAL:
            i_lo = tl.maximum(n0 - off, 0)
        else:
            i_lo = 0
        i_hi = q_len
    elif CAUSAL:
        i_lo = tl.maximum(n0 - off, 0)
        i_hi = tl.minimum(tl.maximum(n_hi + window - off, 0), q_len)
    else:
        i_lo = tl.maximum(n0 - window + 1 - off, 0)
        i_hi = tl.minimum(tl.maximum(n_hi + window - off, 0), q_len)
    i_start = (i_lo // BLOCK_M) * BLOCK_M
    full_lo = i_hi
    full_hi = i_hi
    if CAUSAL:
        if n0 >= sinks:
            lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M
            hi = (tl.maximum(n0 + window - off, 0) // BLOCK_M) * BLOCK_M
            hi = tl.minimum(hi, tl.cdiv(q_len, BLOCK_M) * BLOCK_M)
            if lo < hi:
                full_lo = lo
                full_hi = hi
    return i_start, full_lo, full_hi, i_hi


@triton.jit
def _dkdv_tiles(dk, dv, k, v, offs_n, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, q_len, k_len, lo, hi,
                stride_qt, stride_dot, stride_dqt, qk_scale, sm_scale, window, sinks, off, d_ok,
                CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_M: tl.constexpr,
                PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + offs_m0
        m_mask = offs_m < q_len
        qT = tl.load(qT_ptrs + tl.cast(m0, tl.int64) * stride_qt, mask=m_mask[None, :], other=0.0)
        do = tl.load(do_ptrs + tl.cast(m0, tl.int64) * stride_dot, mask=m_mask[:, None], other=0.0)
        lse2 = tl.load(lse_ptr + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + offs_m, mask=m_mask, other=0.0)
        sT = tl.dot(k, qT, input_precision=PREC) * qk_scale
        pT = tl.exp2(sT - lse2[None, :])
        if MASKED:
            vis = _visible((offs_m + off)[None, :], offs_n[:, None], window, sinks, CAUSAL)
            vis = vis & m_mask[None, :] & (offs_n < k_len)[:, None]
            pT = tl.where(vis, pT, 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
        if ATOMIC_DQ:  # this tile's share of dQ = scale * dS K, added into the fp32 accumulator
            dq = tl.dot(tl.trans(dsT.to(k.dtype)), k, input_precision=PREC) * sm_scale
            tl.atomic_add(dq_ptrs + tl.cast(m0, tl.int64) * stride_dqt, dq, mask=m_mask[:, None] & d_ok[None, :],
                          sem="relaxed")
    return dk, dv


@triton.jit
def _window_attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh, stride_dqt, stride_dqh,
    sm_scale, qk_scale, window, sinks, HKV, REP,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr, ATOMIC_DQ: tl.constexpr,
):
    sm_scale = f32(sm_scale)
    qk_scale = f32(qk_scale)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    kvh = pid_bh % HKV
    q_start, q_len, k_start, k_len = _seq_bounds(cu_q, cu_k, b)
    n0 = pid_n * BLOCK_N
    if n0 < k_len:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        offs_m = tl.arange(0, BLOCK_M)
        d_ok = offs_d < HEAD_DIM
        kv_mask = (offs_n < k_len)[:, None] & d_ok[None, :]
        k = tl.load(K + (k_start + offs_n)[:, None].to(tl.int64) * stride_kt + kvh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + (k_start + offs_n)[:, None].to(tl.int64) * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        off = k_len - q_len  # query i sits at key position i + off
        i_start, full_lo, full_hi, i_hi = _query_ranges(n0, q_len, k_len, window, sinks, CAUSAL, BLOCK_M, BLOCK_N)
        d_col = _pad_columns(offs_d, HEAD_DIM, BLOCK_D)  # pad columns read column 0 (k, v pads are 0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for r in range(0, REP):
            h = kvh * REP + r
            qT_ptrs = Q + q_start.to(tl.int64) * stride_qt + h * stride_qh + offs_m[None, :] * stride_qt + d_col[:, None]
            do_ptrs = DO + q_start.to(tl.int64) * stride_dot + h * stride_doh + offs_m[:, None] * stride_dot + d_col[None, :]
            lse_ptr = LSE + h * stride_lh + q_start
            delta_ptr = DELTA + h * stride_lh + q_start
            dq_ptrs = DQ_ACC + q_start.to(tl.int64) * stride_dqt + h * stride_dqh + offs_m[:, None] * stride_dqt \
                + offs_d[None, :]
            dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, q_len, k_len,
                                 i_start, full_lo, stride_qt, stride_dot, stride_dqt, qk_scale, sm_scale, window,
                                 sinks, off, d_ok, CAUSAL, True, BLOCK_M, PREC, ATOMIC_DQ)
            dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, q_len, k_len,
                                 full_lo, full_hi, stride_qt, stride_dot, stride_dqt, qk_scale, sm_scale, window,
                                 sinks, off, d_ok, CAUSAL, False, BLOCK_M, PREC, ATOMIC_DQ)
            dk, dv = _dkdv_tiles(dk, dv, k, v, offs_n, qT_ptrs, do_ptrs, lse_ptr, delta_ptr, dq_ptrs, q_len, k_len,
                                 full_hi, i_hi, stride_qt, stride_dot, stride_dqt, qk_scale, sm_scale, window,
                                 sinks, off, d_ok, CAUSAL, True, BLOCK_M, PREC, ATOMIC_DQ)
        dk = dk * sm_scale
        tl.store(DK + (k_start + offs_n)[:, None].to(tl.int64) * stride_dkt + kvh * stride_dkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (k_start + offs_n)[:, None].to(tl.int64) * stride_dvt + kvh * stride_dvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, T, stride_ot, stride_oh, stride_dot, stride_doh, stride_lh,
                      HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] O[t, h, d] (fp32), for the atomic-dQ backward."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_t < T)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(O + rows * stride_ot + h * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + rows * stride_dot + h * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    tl.store(DELTA + h * stride_lh + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_t < T)


@triton.jit
def _fused_prep_kernel(O, DO, LSE, DQ_ACC, LSE_ROWS, DELTA_ROWS, S, S_PAD, NB, HQ,
                       stride_ob, stride_os, stride_oh, stride_dob, stride_dos, stride_doh,
                       stride_lb, stride_lh, stride_ls, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Everything the one-kernel Hopper backward needs before it runs, in one pass over (batch, head, rows):
    delta = rowsum(dO * O) and the forward's lse into zero-padded ``[HQ * NB, S_PAD]`` rows (row h * NB + b;
    columns S .. S_PAD - 1 get 0), and the fp32 dQ accumulator ``[NB, S, HQ, HEAD_DIM]`` (contiguous) zeroed."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HQ).to(tl.int64)
    h = pid_bh % HQ
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, HEAD_DIM)
    in_seq = offs_t < S
    rows = offs_t[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + rows * stride_os + h * stride_oh + offs_d[None, :], mask=in_seq[:, None],
                other=0.0)
    do = tl.load(DO + b * stride_dob + rows * stride_dos + h * stride_doh + offs_d[None, :], mask=in_seq[:, None],
                 other=0.0)
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_t.to(tl.int64) * stride_ls, mask=in_seq, other=0.0)
    out_row = (h * NB + b) * S_PAD
    in_pad = offs_t < S_PAD
    tl.store(DELTA_ROWS + out_row + offs_t, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=in_pad)
    tl.store(LSE_ROWS + out_row + offs_t, lse, mask=in_pad)
    zero = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    tl.store(DQ_ACC + ((b * S + rows) * HQ + h) * HEAD_DIM + offs_d[None, :], zero, mask=in_seq[:, None])


def launch_fused_prep(out, do, lse, s_pad: int):
    """``(dq_acc, lse_rows, delta_rows)`` for :func:`window_attention_sm90.window_attention_bwd_sm90`'s one-kernel
    backward, by :func:`_fused_prep_kernel`: ``out``, ``do`` ``[B, S, Hq, D]`` (unit stride in D, D a power of 2),
    ``lse`` ``[B, Hq, S]`` (any strides)."""
    B, S, Hq, D = out.shape
    dq_acc = torch.empty(B, S, Hq, D, device=out.device, dtype=torch.float32)
    lse_rows = torch.empty(Hq * B, s_pad, device=out.device, dtype=torch.float32)
    delta_rows = torch.empty_like(lse_rows)
    block_t = max(1, min(64, 8192 // D))
    torch.library.wrap_triton(_fused_prep_kernel)[(triton.cdiv(s_pad, block_t), B * Hq)](
        out, do, lse, dq_acc, lse_rows, delta_rows, S, s_pad, B, Hq,
        out.stride(0), out.stride(1), out.stride(2), do.stride(0), do.stride(1), do.stride(2),
        lse.stride(0), lse.stride(1), lse.stride(2), HEAD_DIM=D, BLOCK_T=block_t, num_warps=4,
    )
    return dq_acc, lse_rows, delta_rows


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, pos, kT_ptrs, vT_ptrs, k_len, lo, hi, stride_kt, stride_vt,
              qk_scale, window, sinks, CAUSAL: tl.constexpr, MASKED: tl.constexpr, BLOCK_N: tl.constexpr,
               PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if MASKED:
            n_mask = offs_n < k_len
            kT = tl.load(kT_ptrs + tl.cast(start_n, tl.int64) * stride_kt, mask=n_mask[None, :], other=0.0)
            vT = tl.load(vT_ptrs + tl.cast(start_n, tl.int64) * stride_vt, mask=n_mask[None, :], other=0.0)
        else:
            kT = tl.load(kT_ptrs + tl.cast(start_n, tl.int64) * stride_kt)
            vT = tl.load(vT_ptrs + tl.cast(start_n, tl.int64) * stride_vt)
        s = tl.dot(q, kT, input_precision=PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(pos[:, None], offs_n[None, :], window, sinks, CAUSAL) & n_mask[None, :]
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
    return dq


@triton.jit
def _window_attn_bwd_dq(
    Q, K, V, O, DO, LSE, DELTA, DQ, cu_q, cu_k,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    sm_scale, qk_scale, window, sinks, HQ, REP,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    sm_scale = f32(sm_scale)
    qk_scale = f32(qk_scale)
    h, kvh, q_start, q_len, k_start, k_len, m0 = _query_program(cu_q, cu_k, HQ, REP, BLOCK_M)
    if m0 < q_len:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_ok = offs_d < HEAD_DIM
        io_mask = m_mask[:, None] & d_ok[None, :]
        q = tl.load(Q + (q_start + offs_m)[:, None].to(tl.int64) * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        do = tl.load(DO + (q_start + offs_m)[:, None].to(tl.int64) * stride_dot + h * stride_doh + offs_d[None, :],
                     mask=io_mask, other=0.0)
        lse = tl.load(LSE + h * stride_lh + q_start + offs_m, mask=m_mask, other=0.0)
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # rows that see nothing: p = 0
        # delta_i = sum_d dO_i O_i, computed here and stored for the dK/dV kernel (launched after)
        o = tl.load(O + (q_start + offs_m)[:, None].to(tl.int64) * stride_ot + h * stride_oh + offs_d[None, :],
                    mask=io_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + h * stride_lh + q_start + offs_m, delta, mask=m_mask)
        pos = offs_m + (k_len - q_len)
        d_col = _pad_columns(offs_d, HEAD_DIM, BLOCK_D)  # pad rows read column 0 (q, do pads are 0)
        offs_n = tl.arange(0, BLOCK_N)
        kT_ptrs = K + k_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_n[None, :] * stride_kt + d_col[:, None]
        vT_ptrs = V + k_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_n[None, :] * stride_vt + d_col[:, None]
        sink_end, start, full_lo, full_hi, end = _key_ranges(m0, q_len, k_len, window, sinks, CAUSAL,
                                                             BLOCK_M, BLOCK_N)
        dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        dq = _dq_tiles(dq, q, do, lse2, delta, pos, kT_ptrs, vT_ptrs, k_len, 0, sink_end, stride_kt, stride_vt,
                       qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC)
        dq = _dq_tiles(dq, q, do, lse2, delta, pos, kT_ptrs, vT_ptrs, k_len, start, full_lo, stride_kt, stride_vt,
                       qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC)
        dq = _dq_tiles(dq, q, do, lse2, delta, pos, kT_ptrs, vT_ptrs, k_len, full_lo, full_hi, stride_kt, stride_vt,
                       qk_scale, window, sinks, CAUSAL, False, BLOCK_N, PREC)
        dq = _dq_tiles(dq, q, do, lse2, delta, pos, kT_ptrs, vT_ptrs, k_len, full_hi, end, stride_kt, stride_vt,
                       qk_scale, window, sinks, CAUSAL, True, BLOCK_N, PREC)
        tl.store(DQ + (q_start + offs_m)[:, None].to(tl.int64) * stride_dqt + h * stride_dqh + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=io_mask)


def _bwd_inputs(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """Packed views, cu_seqlens, max lengths, and the buffer for delta = rowsum(dO * O) ([Hq, T], fp32)."""
    qp, kp, vp, cu_q, cu_k, max_q, max_k = _flatten(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    T, Hq, _ = qp.shape
    if cu_seqlens_q is None:
        dop, op_ = do.reshape(qp.shape), out.reshape(qp.shape)
        lsep = lse.transpose(0, 1).reshape(Hq, T)
    else:
        dop, op_, lsep = do, out, lse
    qp, kp, vp, op_, dop = _unit_stride(qp, kp, vp, op_, dop)
    delta = torch.empty(Hq, T, device=q.device, dtype=torch.float32)  # written by the dQ kernel
    return qp, kp, vp, op_, dop, lsep.contiguous(), delta, cu_q, cu_k, max_q, max_k


def _launch_dkdv(qp, kp, vp, dop, lsep, delta, cu_q, cu_k, max_k, dk, dv, *, window, sinks, causal, scale, config,
                 dq_acc=None):
    """dK, dV; with ``dq_acc`` ([T, Hq, D] fp32, zeroed) also dQ, added tile by tile with atomics."""
    B, (T, Hq, D), Hkv = cu_q.numel() - 1, qp.shape, kp.shape[1]
    block_d = max(16, triton.next_power_of_2(D))
    table = BWD_FUSED_CONFIG if dq_acc is not None else BWD_DKDV_CONFIG
    bm, bn, warps, stages = _config(table, block_d, qp.dtype, config)
    atomic = dq_acc is not None
    dq_acc = dq_acc if atomic else dk  # unused pointer when not atomic
    torch.library.wrap_triton(_window_attn_bwd_dkdv)[(triton.cdiv(max(max_k, 1), bn), B * Hkv)](
        qp, kp, vp, dop, lsep, delta, dk, dv, dq_acc, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        dop.stride(0), dop.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lsep.stride(0),
        dq_acc.stride(0), dq_acc.stride(1),
        scale, scale * LOG2E, window, sinks, Hkv, Hq // Hkv,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=_precision(qp),
        ATOMIC_DQ=atomic, num_warps=warps, num_stages=stages,
    )


def launch_delta(op_, dop, delta):
    """delta [Hq, T] fp32 = rowsum(dO * O) of packed ``op_``, ``dop`` [T, Hq, D] (unit stride in D)."""
    T, Hq, D = op_.shape
    block_d = max(16, triton.next_power_of_2(D))
    block_t = max(1, min(64, 8192 // block_d))
    torch.library.wrap_triton(_bwd_delta_kernel)[(triton.cdiv(max(T, 1), block_t), Hq)](
        op_, dop, delta, T, op_.stride(0), op_.stride(1), dop.stride(0), dop.stride(1), delta.stride(0),
        HEAD_DIM=D, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )


def _launch_dq(qp, kp, vp, op_, dop, lsep, delta, cu_q, cu_k, max_q, dq, *, window, sinks, causal, scale, config):
    """dQ, and delta (written for _launch_dkdv, which must run after it)."""
    B, (T, Hq, D), Hkv = cu_q.numel() - 1, qp.shape, kp.shape[1]
    block_d = max(16, triton.next_power_of_2(D))
    bm, bn, warps, stages = _config(BWD_DQ_CONFIG, block_d, qp.dtype, config)
    torch.library.wrap_triton(_window_attn_bwd_dq)[(triton.cdiv(max(max_q, 1), bm), B * Hq)](
        qp, kp, vp, op_, dop, lsep, delta, dq, cu_q, cu_k,
        qp.stride(0), qp.stride(1), kp.stride(0), kp.stride(1), vp.stride(0), vp.stride(1),
        op_.stride(0), op_.stride(1), dop.stride(0), dop.stride(1), dq.stride(0), dq.stride(1), lsep.stride(0),
        scale, scale * LOG2E, window, sinks, Hq, Hq // Hkv,
        HEAD_DIM=D, CAUSAL=causal, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, PREC=_precision(qp),
        num_warps=warps, num_stages=stages,
    )


# The Gluon Hopper backward (window_attention_sm90.window_attention_bwd_sm90) for the deterministic backward of the
# calls the Hopper forward takes; DSK_ATTN_SM90_BWD=1 / 0 overrides this default. H200, session 26 (diag time_fused,
# three runs, the whole backward): S8192 B4 W4096 12.15-12.34 ms vs 12.53-12.72 for the Triton kernels, S32768 GQA
# 15.07-15.17 vs 15.34-15.56, W1024 4.60-4.67 vs 4.66-4.70, D64 7.31-7.32 vs 7.96-7.99: on by default since.
SM90_BWD_DEFAULT = True
# Its one-kernel form (dQ by TMA reduce-adds) for deterministic=False (head dims 64, 128); DSK_ATTN_SM90_FUSED=1 / 0
# overrides this default.
SM90_FUSED_DEFAULT = True


def _env_on(var: str, default: bool) -> bool:
    return os.environ.get(var, "1" if default else "0") == "1"


def window_attention_bwd(do, q, k, v, out, lse, *, window: int, sinks: int = 0, causal: bool = True,
                         softmax_scale: float | None = None, cu_seqlens_q=None, cu_seqlens_k=None,
                         max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
                         config_dkdv: tuple | None = None, config_dq: tuple | None = None,
                         deterministic: bool | None = True, sm90: bool | None = None):
    """Gradients ``(dq, dk, dv)`` of :func:`window_attention_fwd` given ``do`` and its ``out``/``lse``.

    ``deterministic=True``: two kernels, no atomics (GQA heads summed inside the dK/dV program;
    dQ by its own kernel, which recomputes S and dP: 7 matmuls per tile pair). ``False``: one
    kernel computes dK, dV and adds each tile's dQ into an fp32 accumulator with atomics (5
    matmuls; the order of the additions, hence the last bits of dQ, varies between runs). ``None``: ``False`` where
    the one-kernel Gluon backward takes the call, else ``True`` (the faster of the two on the H200). ``sm90``: the
    Gluon Hopper backward for the calls the Hopper forward takes, deterministic (two kernels) or not (one kernel, dQ
    by TMA reduce-adds; head dims in ``BWD_FUSED_CONFIG``) (None: by ``SM90_BWD_DEFAULT`` / ``DSK_ATTN_SM90_BWD`` and
    ``SM90_FUSED_DEFAULT`` / ``DSK_ATTN_SM90_FUSED``, unless a ``config_*`` asks for the Triton kernels; True: a
    ValueError where it does not apply)."""
    from deepseek_kernels.triton import window_attention_sm90

    forced = sm90 is True
    if sm90 is None and (config_dkdv is not None or config_dq is not None):
        sm90 = False  # a launch shape asks for the Triton kernels
    # one check per call: the Hopper kernels take it (either form), the one-kernel form takes it
    hopper = sm90 is not False and window_attention_sm90.supported(q, k, v, causal=causal, cu_seqlens_q=cu_seqlens_q,
                                                                   cu_seqlens_k=cu_seqlens_k)
    fused = hopper and q.shape[-1] in window_attention_sm90.BWD_FUSED_CONFIG
    if deterministic is None:
        deterministic = not (fused and config_dkdv is None and config_dq is None
                             and _env_on("DSK_ATTN_SM90_FUSED", SM90_FUSED_DEFAULT))
    if sm90 is None:
        sm90 = _env_on("DSK_ATTN_SM90_BWD", SM90_BWD_DEFAULT) if deterministic else \
            _env_on("DSK_ATTN_SM90_FUSED", SM90_FUSED_DEFAULT)
    if sm90:
        if hopper and (deterministic or fused):
            return torch.ops.deepseek_kernels.window_attention_bwd_sm90(do, q, k, v, out, lse, window, sinks,
                                                                        softmax_scale, deterministic)
        if forced:
            raise ValueError("window_attention_bwd(sm90=True): the Hopper backward takes the calls the Hopper forward "
                             "takes (causal, dense, Sq == Sk, head dim 64 or 128, bf16/fp16, sm_90), with "
                             "deterministic=False those of BWD_FUSED_CONFIG's head dims; this call is not one")
    qp, kp, vp, op_, dop, lsep, delta, cu_q, cu_k, max_q, max_k = _bwd_inputs(
        do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    dk, dv = torch.empty_like(kp), torch.empty_like(vp)
    common = dict(window=window, sinks=sinks, causal=causal, scale=scale)
    if deterministic:
        dq = torch.empty_like(qp)
        _launch_dq(qp, kp, vp, op_, dop, lsep, delta, cu_q, cu_k, max_q, dq, config=config_dq, **common)
        _launch_dkdv(qp, kp, vp, dop, lsep, delta, cu_q, cu_k, max_k, dk, dv, config=config_dkdv, **common)
    else:
        dq_acc = torch.zeros(qp.shape, device=qp.device, dtype=torch.float32)
        launch_delta(op_, dop, delta)
        _launch_dkdv(qp, kp, vp, dop, lsep, delta, cu_q, cu_k, max_k, dk, dv, config=config_dkdv, dq_acc=dq_acc,
                     **common)
        dq = dq_acc.to(qp.dtype)
    if cu_seqlens_q is None:
        return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
    return dq, dk, dv
