"""Hierarchical attention: the exact definition (test oracle, CPU path and benchmark baseline).

Causal self-attention in which every query sees its local window token by token, and all older
context through pooled block summaries whose size doubles with distance, in one softmax.

Layout as ``flash_attn_func``: ``q [B, S, Hq, D]``, ``k``/``v`` ``[B, S, Hkv, D]`` (``Hq`` a multiple
of ``Hkv``; query head ``h`` uses key/value head ``h // (Hq // Hkv)``), or packed ``[T, H, D]``
with ``cu_seqlens`` (int32 ``[n + 1]``); positions restart at 0 in every sequence and nothing
(no key, no summary) crosses a sequence boundary. Queries and keys are the same tokens.

Definition. Parameters: ``block`` (a power of two >= 16), ``window`` (a multiple of ``block``;
``nw = window // block`` blocks), ``levels`` (``L``, an int >= 0, or None), ``sinks`` (>= 0).
Work in *block units*: token ``j`` lies in block ``j // block``; the query at position ``i`` lies in
query block ``b = i // block``. For ``l = 0..L`` define the level starts of query block ``b``

    A_l = 2^(l+1) if l < L else 2^l                (alignment: level l+1 groups must tile below s_l)
    s_l(b) = max(0, floor((b + 1 - nw * 2^l) / A_l) * A_l)
    s_{-1}(b) = b + 1

The query at position ``i`` (block ``b``) sees, in one softmax:

* exact keys (score ``scale * q_i . k_j``): the *local window* ``s_0(b) * block <= j <= i``, plus the
  *sinks* ``j < sinks`` (``j <= i``). With ``L = 0`` the local window is the query's own block and
  the ``nw - 1`` blocks before it (block-aligned sliding-window attention); with ``L >= 1`` it is
  those blocks plus, for every other query block, one more block so that the summaries below it
  are aligned (``nw`` or ``nw + 1`` blocks).
* summaries (level ``l = 1..L``): the aligned groups ``g`` of ``G_l = block * 2^l`` tokens,
  ``j in [g G_l, (g + 1) G_l)``, with ``s_l(b) <= g 2^l`` and ``(g + 1) 2^l <= s_{l-1}(b)``, i.e. the
  groups tiling blocks ``[s_l(b), s_{l-1}(b))``. A summary is the mean of ``k`` and the mean of ``v``
  over its ``c`` tokens that are not sinks (``j >= sinks``); its score is
  ``scale * q_i . mean_k + ln(c)``, so a summary carries the softmax weight of ``c`` tokens that all
  had the key ``mean_k`` (a group with ``c = 0``, made only of sinks, is skipped).

Properties (tested in tests/test_hierarchical_reference.py):

* no look-ahead: every summary key lies in blocks ``< s_0(b) <= b``, so is strictly older than every
  query of the block; every summary the forward uses is complete (its tokens all exist);
* with ``L = None`` (enough levels: the smallest ``L`` with ``nw * 2^L >= ceil(S / block)``, which
  makes ``s_L = 0`` for every query) every key ``j <= i`` is seen exactly once, exactly or inside one
  summary; any larger ``L`` gives the same result. With a smaller ``L`` keys before
  ``s_L(b) * block`` (other than sinks) are not seen;
* each level holds at most ``nw // 2 + 2`` groups per query, so a query sees at most
  ``(nw + 1) * block + sinks`` exact keys and ``(nw // 2 + 2) * L`` summaries, with
  ``L = ceil(log2(S / window))``: O(window + (window / block) * log2(S / window)).

Math in ``compute_dtype`` (float32; float64 for the tests' oracle): ``lse = log sum exp(score)``
over everything seen (natural log), ``out = sum softmax * v`` (summaries contribute
``softmax * mean_v``), cast to the input dtype. ``lse`` is ``[B, Hq, S]`` (``[Hq, T]`` packed),
float32. Every query sees at least itself, so ``lse`` is finite.

This reference materializes the scores of each sequence: it is for checking, not for speed.
"""

from __future__ import annotations

import math

import torch

# ---- the index rules ---------------------------------------------------------------------------


def levels_needed(seqlen: int, *, window: int, block: int) -> int:
    """Smallest ``L`` with ``(window // block) * 2^L >= ceil(seqlen / block)``: enough levels that
    the summaries reach the first token of a ``seqlen``-token sequence from every query."""
    nw, nb = window // block, -(-seqlen // block)
    L = 0
    while nw << L < nb:
        L += 1
    return L


def resolve_levels(levels: int | None, seqlen: int, *, window: int, block: int) -> int:
    """``levels``, or for ``None`` the number that covers a ``seqlen``-token sequence."""
    return levels_needed(seqlen, window=window, block=block) if levels is None else levels


def level_starts(qblock: int, *, window: int, block: int, levels: int) -> list[int]:
    """``[s_0, ..., s_L]`` of query block ``qblock`` in block units (module docstring)."""
    nw = window // block
    starts = []
    for l in range(levels + 1):
        a = 2 ** (l + 1) if l < levels else 2**l
        starts.append(max(0, ((qblock + 1 - nw * 2**l) // a) * a))
    return starts


def group_count(level: int, group: int, *, block: int, seqlen: int, sinks: int) -> int:
    """Number of tokens a level-``level`` group stands for: its tokens that exist and are not sinks."""
    size = block << level
    return max(0, min((group + 1) * size, seqlen) - max(group * size, sinks))


def visible_summaries(qblock: int, *, window: int, block: int, levels: int | None, seqlen: int,
                      sinks: int = 0) -> list[tuple[int, int]]:
    """The summaries the queries of block ``qblock`` see: ``[(level, group), ...]`` from the finest
    level to the coarsest, each group in increasing order (groups made only of sinks left out)."""
    L = resolve_levels(levels, seqlen, window=window, block=block)
    s = level_starts(qblock, window=window, block=block, levels=L)
    out = []
    for l in range(1, L + 1):
        for g in range(s[l] >> l, s[l - 1] >> l):
            if group_count(l, g, block=block, seqlen=seqlen, sinks=sinks) > 0:
                out.append((l, g))
    return out


def exact_keys(i: int, *, window: int, block: int, levels: int | None, seqlen: int, sinks: int = 0) -> list[int]:
    """The keys query ``i`` sees exactly: the sinks, then its local window."""
    L = resolve_levels(levels, seqlen, window=window, block=block)
    lo = level_starts(i // block, window=window, block=block, levels=L)[0] * block
    return [j for j in range(min(sinks, lo, i + 1))] + list(range(lo, i + 1))


def check_config(window, block, levels, sinks, name: str = "hierarchical_attention") -> None:
    """Raises ``ValueError`` naming the argument for an invalid configuration."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 16 or block & (block - 1):
        raise ValueError(f"{name}: block must be a power of two >= 16, got {block!r}")
    if isinstance(window, bool) or not isinstance(window, int) or window < block or window % block:
        raise ValueError(f"{name}: window must be a positive multiple of block={block}, got {window!r}")
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or levels < 0):
        raise ValueError(f"{name}: levels must be None or an int >= 0, got {levels!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"{name}: sinks must be an int >= 0, got {sinks!r}")


# ---- masks and summaries of one sequence ---------------------------------------------------------


def exact_mask(seqlen: int, *, window: int, block: int, levels: int, sinks: int = 0, device=None) -> torch.Tensor:
    """``[S, S]`` bool: query ``i`` sees key ``j`` exactly."""
    i = torch.arange(seqlen, device=device)
    lo = torch.tensor([level_starts(b, window=window, block=block, levels=levels)[0] * block
                       for b in range(-(-seqlen // block))], device=device, dtype=torch.long)[i // block]
    j = i.unsqueeze(0)
    i = i.unsqueeze(1)
    return (j <= i) & ((j >= lo.unsqueeze(1)) | (j < sinks))


def summary_layout(seqlen: int, *, block: int, levels: int, sinks: int = 0) -> list[tuple[int, int, int]]:
    """All groups of a sequence, level by level: ``[(level, group, count), ...]`` (row order of
    :func:`pool_ref` and :func:`summary_mask`)."""
    out = []
    for l in range(1, levels + 1):
        for g in range(-(-seqlen // (block << l))):
            out.append((l, g, group_count(l, g, block=block, seqlen=seqlen, sinks=sinks)))
    return out


def pool_ref(k: torch.Tensor, *, block: int, levels: int, sinks: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summaries of one sequence ``k [S, H, D]``: ``(means [R, H, D], counts [R])`` over the groups of
    :func:`summary_layout` (mean over the non-sink tokens of each group; 0 where ``count == 0``)."""
    rows, counts = [], []
    for l, g, c in summary_layout(k.shape[0], block=block, levels=levels, sinks=sinks):
        size = block << l
        lo, hi = max(g * size, sinks), min((g + 1) * size, k.shape[0])
        rows.append(k[lo:hi].mean(0) if c > 0 else torch.zeros_like(k[0]))
        counts.append(c)
    if not rows:
        return k.new_zeros((0, *k.shape[1:])), torch.zeros(0, dtype=torch.long, device=k.device)
    return torch.stack(rows), torch.tensor(counts, device=k.device)


def summary_mask(seqlen: int, *, window: int, block: int, levels: int, sinks: int = 0, device=None) -> torch.Tensor:
    """``[S, R]`` bool: query ``i`` sees summary row ``r`` of :func:`summary_layout`."""
    layout = summary_layout(seqlen, block=block, levels=levels, sinks=sinks)
    index = {(l, g): r for r, (l, g, _) in enumerate(layout)}
    nb = -(-seqlen // block)
    per_block = torch.zeros(nb, len(layout), dtype=torch.bool)
    for b in range(nb):
        for lg in visible_summaries(b, window=window, block=block, levels=levels, seqlen=seqlen, sinks=sinks):
            per_block[b, index[lg]] = True
    return per_block[torch.arange(seqlen) // block].to(device)


def _unpool(d_means: torch.Tensor, seqlen: int, *, block: int, levels: int, sinks: int) -> torch.Tensor:
    """Backward of :func:`pool_ref`: the gradient of a mean is its gradient / count broadcast to
    the group's non-sink tokens. ``d_means [R, H, D]`` -> ``[S, H, D]``."""
    out = d_means.new_zeros((seqlen, *d_means.shape[1:]))
    for r, (l, g, c) in enumerate(summary_layout(seqlen, block=block, levels=levels, sinks=sinks)):
        if c > 0:
            size = block << l
            out[max(g * size, sinks):min((g + 1) * size, seqlen)] += d_means[r] / c
    return out


# ---- forward and backward ----------------------------------------------------------------------------


def _one(q, k, v, do, *, window, block, levels, sinks, scale, compute_dtype):
    """One sequence: q [S, Hq, D], k/v [S, Hkv, D] -> out, lse (and dq, dk, dv when do is given)."""
    S, hq, _ = q.shape
    hkv = k.shape[1]
    rep = hq // hkv
    qf, kf, vf = (t.to(compute_dtype) for t in (q, k, v))
    mk, cnt = pool_ref(kf, block=block, levels=levels, sinks=sinks)
    mv, _ = pool_ref(vf, block=block, levels=levels, sinks=sinks)
    keys = torch.cat([kf, mk]).transpose(0, 1).repeat_interleave(rep, 0)  # [Hq, S + R, D]
    vals = torch.cat([vf, mv]).transpose(0, 1).repeat_interleave(rep, 0)
    mask = torch.cat([exact_mask(S, window=window, block=block, levels=levels, sinks=sinks, device=q.device),
                      summary_mask(S, window=window, block=block, levels=levels, sinks=sinks, device=q.device)], 1)
    bias = torch.cat([torch.zeros(S, dtype=compute_dtype, device=q.device),
                      cnt.clamp_min(1).to(compute_dtype).log()])
    qh = qf.transpose(0, 1)  # [Hq, S, D]
    s = (qh @ keys.transpose(1, 2)) * scale + bias
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)  # finite: every query sees itself
    p = torch.exp(s - lse.unsqueeze(-1))
    out = (p @ vals).transpose(0, 1)
    if do is None:
        return out, lse.float()
    dof = do.to(compute_dtype).transpose(0, 1)
    delta = (dof * out.transpose(0, 1)).sum(-1, keepdim=True)
    dvals = p.transpose(1, 2) @ dof  # [Hq, S + R, D]
    ds = p * (dof @ vals.transpose(1, 2) - delta)
    dq = (ds @ keys) * scale
    dkeys = (ds.transpose(1, 2) @ qh) * scale
    fold = lambda t: t.reshape(hkv, rep, *t.shape[1:]).sum(1).transpose(0, 1)  # noqa: E731  ([S + R, Hkv, D])
    dkeys, dvals = fold(dkeys), fold(dvals)
    dk = dkeys[:S] + _unpool(dkeys[S:], S, block=block, levels=levels, sinks=sinks)
    dv = dvals[:S] + _unpool(dvals[S:], S, block=block, levels=levels, sinks=sinks)
    return dq.transpose(0, 1), dk, dv


def _sequences(q, cu_seqlens):
    if cu_seqlens is None:
        return [(b, None) for b in range(q.shape[0])]
    return [(None, (int(cu_seqlens[n]), int(cu_seqlens[n + 1]))) for n in range(len(cu_seqlens) - 1)]


def _max_len(q, cu_seqlens):
    if cu_seqlens is None:
        return q.shape[1]
    return max([int(cu_seqlens[n + 1] - cu_seqlens[n]) for n in range(len(cu_seqlens) - 1)] + [0])


def hierarchical_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, block: int = 64, levels: int | None = None,
    sinks: int = 0, softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False, compute_dtype: torch.dtype = torch.float32,
):
    """Reference hierarchical attention (module docstring). Returns ``out`` (dtype of ``q``), or
    ``(out, lse)`` with ``return_lse``."""
    check_config(window, block, levels, sinks, "hierarchical_attention_ref")
    L = resolve_levels(levels, _max_len(q, cu_seqlens), window=window, block=block)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    kw = dict(window=window, block=block, levels=L, sinks=sinks, scale=scale, compute_dtype=compute_dtype)
    if cu_seqlens is None:
        outs, lses = zip(*[_one(q[b], k[b], v[b], None, **kw) for b in range(q.shape[0])]) if q.shape[0] else ((), ())
        out = torch.stack(outs).to(q.dtype) if outs else torch.empty_like(q)
        lse = torch.stack(lses) if lses else q.new_empty((0, q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        out = torch.zeros_like(q)
        lse = torch.zeros((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
        for _, (a, e) in _sequences(q, cu_seqlens):
            if e > a:
                o, l = _one(q[a:e], k[a:e], v[a:e], None, **kw)
                out[a:e], lse[:, a:e] = o.to(q.dtype), l
    return (out, lse) if return_lse else out


def hierarchical_attention_bwd_ref(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, block: int = 64,
    levels: int | None = None, sinks: int = 0, softmax_scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32,
):
    """Closed-form gradients ``(dq, dk, dv)`` of :func:`hierarchical_attention_ref`: attention over
    exact keys and summaries (``dV = P^T dO``, ``dS = P (dO V^T - delta)``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``, GQA groups summed), then each summary's gradient divided by its count
    and added to every non-sink token of its group (the gradient of a mean)."""
    check_config(window, block, levels, sinks, "hierarchical_attention_bwd_ref")
    L = resolve_levels(levels, _max_len(q, cu_seqlens), window=window, block=block)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    kw = dict(window=window, block=block, levels=L, sinks=sinks, scale=scale, compute_dtype=compute_dtype)
    dq, dk, dv = (torch.zeros_like(t) for t in (q, k, v))
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            g = _one(q[b], k[b], v[b], grad_out[b], **kw)
            dq[b], dk[b], dv[b] = (t.to(q.dtype) for t in g)
    else:
        for _, (a, e) in _sequences(q, cu_seqlens):
            if e > a:
                g = _one(q[a:e], k[a:e], v[a:e], grad_out[a:e], **kw)
                dq[a:e], dk[a:e], dv[a:e] = (t.to(q.dtype) for t in g)
    return dq, dk, dv


def seen_per_query(seqlen: int, *, window: int, block: int, levels: int | None, sinks: int = 0) -> tuple[int, int]:
    """The most exact keys and the most summaries any query of a ``seqlen``-token sequence sees."""
    L = resolve_levels(levels, seqlen, window=window, block=block)
    exact = summaries = 0
    for b in range(-(-seqlen // block)):
        i = min((b + 1) * block, seqlen) - 1
        exact = max(exact, len(exact_keys(i, window=window, block=block, levels=L, seqlen=seqlen, sinks=sinks)))
        summaries = max(summaries, len(visible_summaries(b, window=window, block=block, levels=L, seqlen=seqlen,
                                                         sinks=sinks)))
    return exact, summaries


def attended_pairs(seqlen: int, *, window: int, block: int, levels: int | None, sinks: int = 0) -> int:
    """(query, key-or-summary) pairs of one sequence: the useful work for FLOP counts."""
    L = resolve_levels(levels, seqlen, window=window, block=block)
    total = 0
    for b in range(-(-seqlen // block)):
        lo = level_starts(b, window=window, block=block, levels=L)[0] * block
        q0, q1 = b * block, min((b + 1) * block, seqlen)
        n = q1 - q0
        total += n * (q0 - lo) + n * (n + 1) // 2 + n * min(sinks, lo)
        total += n * len(visible_summaries(b, window=window, block=block, levels=L, seqlen=seqlen, sinks=sinks))
    return total


def flops(batch: int, heads: int, head_dim: int, pairs: int, backward: bool = False) -> int:
    """4·B·H·D·pairs forward, 3.5x that for forward + backward (as for window attention)."""
    f = 4 * batch * heads * head_dim * pairs
    return int(math.ceil(f * 3.5)) if backward else f
