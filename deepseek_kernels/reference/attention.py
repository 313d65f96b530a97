"""Sliding-window attention: the exact definition (test oracle and baseline for the kernels).

Layout as ``flash_attn_func``: ``q [B, Sq, Hq, D]``, ``k``/``v`` ``[B, Sk, Hkv, D]`` with ``Hq`` a
multiple of ``Hkv`` (GQA/MQA: query head ``h`` uses key/value head ``h // (Hq // Hkv)``). Packed
variable-length batches pass ``[T, H, D]`` tensors and ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32,
``[n + 1]``, starting at 0, non-decreasing); no attention crosses a sequence boundary.

Positions. Query ``i`` of a sequence with ``Sq`` queries and ``Sk`` keys sits at position
``p = i + Sk - Sq`` (the ends are aligned, as FlashAttention does for ``Sq != Sk``). Query ``i`` attends
key ``j`` iff

    causal=True:   p - window < j <= p     or   (j < sinks and j <= p)
    causal=False:  |p - j| < window        or   j < sinks

so ``window=1`` (causal) sees only its own position, and ``window >= Sk`` is full causal attention.
A query that sees no key (only possible when ``Sq > Sk``) outputs 0 and has ``lse = -inf``.

Math, in float32 (float64 for the tests' oracle): ``s = scale * q . k`` (``scale`` defaults to
``D ** -0.5``), ``lse = log(sum_j exp(s_j))`` over the visible keys (natural log), ``out = sum_j
exp(s_j - lse) v_j``, cast to the input dtype. ``lse`` is ``[B, Hq, Sq]`` (``[Hq, T]`` packed), float32.

This reference materializes the ``Sq x Sk`` scores: it is for checking, not for speed.
"""

import math

import torch


def window_mask(sq: int, sk: int, *, window: int, sinks: int = 0, causal: bool = True,
                device=None) -> torch.Tensor:
    """``[sq, sk]`` bool: True where query ``i`` may attend key ``j`` (see the module docstring)."""
    i = torch.arange(sq, device=device).unsqueeze(1)
    j = torch.arange(sk, device=device).unsqueeze(0)
    p = i + (sk - sq)
    if causal:
        return ((j > p - window) & (j <= p)) | ((j < sinks) & (j <= p))
    return ((p - j).abs() < window) | (j < sinks)


def _attend(q, k, v, mask, scale, compute_dtype):
    """One sequence: q [Sq, Hq, D], k/v [Sk, Hkv, D] -> out [Sq, Hq, D], lse [Hq, Sq]."""
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    qf, kf, vf = (t.to(compute_dtype).transpose(0, 1) for t in (q, k, v))  # [H, S, D]
    kf, vf = kf.repeat_interleave(rep, 0), vf.repeat_interleave(rep, 0)
    s = (qf @ kf.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows without a visible key
    p = torch.exp(s - lse.unsqueeze(-1).masked_fill(torch.isinf(lse).unsqueeze(-1), 0.0))
    p = p.masked_fill(~mask, 0.0)
    out = (p @ vf).transpose(0, 1)
    return out, lse.float()


def window_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, sinks: int = 0, causal: bool = True,
    softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, return_lse: bool = False, compute_dtype: torch.dtype = torch.float32,
):
    """Reference sliding-window attention (module docstring). Returns ``out`` (dtype of ``q``), or
    ``(out, lse)`` with ``return_lse``."""
    d = q.shape[-1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    if cu_seqlens_q is None:
        outs, lses = [], []
        mask = window_mask(q.shape[1], k.shape[1], window=window, sinks=sinks, causal=causal, device=q.device)
        for b in range(q.shape[0]):
            o, l = _attend(q[b], k[b], v[b], mask, scale, compute_dtype)
            outs.append(o)
            lses.append(l)
        out, lse = torch.stack(outs).to(q.dtype), torch.stack(lses)
    else:
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        out = torch.zeros_like(q)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
        for n in range(len(cu_seqlens_q) - 1):
            q0, q1 = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
            k0, k1 = int(cu_k[n]), int(cu_k[n + 1])
            if q1 == q0:
                continue
            mask = window_mask(q1 - q0, k1 - k0, window=window, sinks=sinks, causal=causal, device=q.device)
            o, l = _attend(q[q0:q1], k[k0:k1], v[k0:k1], mask, scale, compute_dtype)
            out[q0:q1] = o.to(q.dtype)
            lse[:, q0:q1] = l
    return (out, lse) if return_lse else out


def _attend_bwd(do, q, k, v, mask, scale, compute_dtype):
    """One sequence: gradients of _attend. do/q [Sq, Hq, D], k/v [Sk, Hkv, D]."""
    hq, hkv = q.shape[1], k.shape[1]
    rep = hq // hkv
    qf, kf, vf, dof = (t.to(compute_dtype).transpose(0, 1) for t in (q, k, v, do))  # [H, S, D]
    kr, vr = kf.repeat_interleave(rep, 0), vf.repeat_interleave(rep, 0)
    s = (qf @ kr.transpose(1, 2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0)).masked_fill(~mask, 0.0)
    out = p @ vr
    delta = (dof * out).sum(-1, keepdim=True)
    dv = p.transpose(1, 2) @ dof
    ds = p * (dof @ vr.transpose(1, 2) - delta)
    dq = (ds @ kr) * scale
    dk = (ds.transpose(1, 2) @ qf) * scale
    fold = lambda t: t.reshape(hkv, rep, *t.shape[1:]).sum(1)  # noqa: E731  (GQA: sum the group)
    return dq.transpose(0, 1), fold(dk).transpose(0, 1), fold(dv).transpose(0, 1)


def window_attention_bwd_ref(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, sinks: int = 0,
    causal: bool = True, softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
):
    """Closed-form gradients ``(dq, dk, dv)`` of :func:`window_attention_ref` (no autograd needed):
    with ``P = softmax`` over visible keys and ``delta_i = dO_i . O_i``: ``dV = P^T dO``,
    ``dS = P * (dO V^T - delta)``, ``dQ = scale dS K``, ``dK = scale dS^T Q`` (GQA groups summed)."""
    d = q.shape[-1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    if cu_seqlens_q is None:
        mask = window_mask(q.shape[1], k.shape[1], window=window, sinks=sinks, causal=causal, device=q.device)
        for b in range(q.shape[0]):
            g = _attend_bwd(grad_out[b], q[b], k[b], v[b], mask, scale, compute_dtype)
            dq[b], dk[b], dv[b] = (t.to(q.dtype) for t in g)
    else:
        cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
        for n in range(len(cu_seqlens_q) - 1):
            q0, q1 = int(cu_seqlens_q[n]), int(cu_seqlens_q[n + 1])
            k0, k1 = int(cu_k[n]), int(cu_k[n + 1])
            if q1 == q0 or k1 == k0:
                continue
            mask = window_mask(q1 - q0, k1 - k0, window=window, sinks=sinks, causal=causal, device=q.device)
            g = _attend_bwd(grad_out[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], mask, scale, compute_dtype)
            dq[q0:q1], dk[k0:k1], dv[k0:k1] = (t.to(q.dtype) for t in g)
    return dq, dk, dv


def attended_pairs(sq: int, sk: int, *, window: int, sinks: int = 0, causal: bool = True) -> int:
    """Number of (query, key) pairs the mask admits: the useful work for FLOP counts."""
    if causal and sinks == 0 and sq == sk:
        w = min(window, sk)
        return w * sk - w * (w - 1) // 2
    return int(window_mask(sq, sk, window=window, sinks=sinks, causal=causal).sum())


def flops(batch: int, heads: int, head_dim: int, pairs: int, backward: bool = False) -> int:
    """Attention FLOPs as the project counts them: 4·B·H·D·pairs forward, 3.5x that for fwd+bwd."""
    f = 4 * batch * heads * head_dim * pairs
    return int(math.ceil(f * 3.5)) if backward else f
