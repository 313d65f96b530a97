"""Decoding hierarchical attention against a bounded cache: memory O(window + (window/block)·levels)
per sequence, however long the context.

``HierarchicalKVCache`` keeps, per sequence:

* the ``sinks`` first keys/values in fixed slots, and a ring of ``(nw + 1) * block + max_step - 1``
  exact keys/values (``nw = window // block``): the local window of every query of a step is in it;
* per level ``l = 1..levels``, a ring of the ``nw + 1 + ceil((max_step - 1) / (2 block))`` most recent
  *complete* groups (mean K, mean V in float32, the group index and its token count): from the
  newest complete group back to the oldest one a query sees, ``s_l(b) >> l``, there are at most
  ``nw + 1`` groups (checked for every block and level in the tests; ``nw`` is not enough), plus the
  groups completed by the other tokens of a multi-token step;
* per level, the running sums of the group being filled (the partial group), float32.

A group is pushed into its level's ring when its last token arrives; its mean is its sum over its
non-sink tokens divided by their count, exactly as the full-sequence op pools. Attention then
masks by position and group index, as the full-sequence op does (``deepseek_kernels.reference.
hierarchical_attention``), so decoding token by token reproduces the full forward.
``hierarchical_attention_decode`` is written with plain tensor ops (the reference path; a fused
decode kernel is still to come), and ``explain`` says so.
"""

from __future__ import annotations

import math

import torch

from deepseek_kernels.ops._registry import register_explainer
from deepseek_kernels.reference.hierarchical_attention import check_config, levels_needed


class HierarchicalKVCache:
    """Bounded decode cache for ``deepseek_kernels.hierarchical_attention`` (module docstring).

    ``levels=None`` needs ``max_seqlen`` (the longest context the cache will see) and picks the
    levels that cover it, so decoding matches the op with ``levels=None`` up to that length.
    Tensors: exact ``k``/``v`` ``[B, slots, Hkv, D]`` and ``positions [B, slots]`` (-1 = empty);
    summaries ``sum_k``/``sum_v`` ``[B, L, M, Hkv, D]`` float32 means, ``group [B, L, M]`` (-1 = empty),
    ``count [B, L, M]``; partial groups ``acc_k``/``acc_v`` ``[B, L, Hkv, D]``, ``acc_n [B, L]``.
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, window: int, block: int = 64,
                 levels: int | None = None, max_seqlen: int | None = None, sinks: int = 0, max_step: int = 1,
                 dtype=torch.bfloat16, device=None):
        check_config(window, block, levels, sinks, "HierarchicalKVCache")
        if levels is None:
            if max_seqlen is None or max_seqlen < 1:
                raise ValueError("HierarchicalKVCache: levels=None needs max_seqlen >= 1 (the longest context), "
                                 f"got {max_seqlen!r}")
            levels = levels_needed(max_seqlen, window=window, block=block)
        if max_step < 1:
            raise ValueError(f"HierarchicalKVCache: max_step must be >= 1, got {max_step}")
        self.window, self.block, self.levels, self.sinks, self.max_step = window, block, levels, sinks, max_step
        nw = window // block
        self.ring = (nw + 1) * block + max_step - 1
        self.group_slots = nw + 1 + math.ceil((max_step - 1) / (2 * block))
        B, H, D, L, M = batch, num_kv_heads, head_dim, levels, self.group_slots
        f32 = dict(dtype=torch.float32, device=device)
        self.k = torch.zeros(B, sinks + self.ring, H, D, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((B, sinks + self.ring), -1, dtype=torch.int64, device=device)
        self.sum_k = torch.zeros(B, L, M, H, D, **f32)
        self.sum_v = torch.zeros_like(self.sum_k)
        self.group = torch.full((B, L, M), -1, dtype=torch.int64, device=device)
        self.count = torch.zeros(B, L, M, dtype=torch.int64, device=device)
        self.acc_k = torch.zeros(B, L, H, D, **f32)
        self.acc_v = torch.zeros_like(self.acc_k)
        self.acc_n = torch.zeros(B, L, dtype=torch.int64, device=device)
        self.seqlens = torch.zeros(B, dtype=torch.int64, device=device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.positions, self.sum_k, self.sum_v, self.group, self.count,
                self.acc_k, self.acc_v, self.acc_n, self.seqlens]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.ring)

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Appends ``k, v [B, T, Hkv, D]`` (the first ``lengths[b]`` tokens of row b; default all T):
        the exact ring keeps what it can hold, every level pools the new tokens into its partial
        group and pushes the groups they complete."""
        B, T = k.shape[:2]
        lengths = torch.full((B,), T, dtype=torch.int64) if lengths is None else lengths.to(torch.int64).cpu()
        t = torch.arange(T, device=k.device).unsqueeze(0)
        lens_d = lengths.to(k.device).unsqueeze(1)
        pos = self.seqlens.unsqueeze(1) + t  # [B, T]
        keep = (t < lens_d) & ((pos < self.sinks) | (t >= lens_d - self.ring))
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        slot = self._slots(pos[b_idx, t_idx])
        self.k[b_idx, slot] = k[b_idx, t_idx].to(self.k.dtype)
        self.v[b_idx, slot] = v[b_idx, t_idx].to(self.v.dtype)
        self.positions[b_idx, slot] = pos[b_idx, t_idx]
        for b in range(B):
            n = int(lengths[b])
            if n:
                self._pool(b, int(self.seqlens[b]), k[b, :n].float(), v[b, :n].float())
        self.seqlens += lengths.to(self.seqlens.device)

    prefill = append  # a long prompt is an append that keeps only what the cache holds

    def _pool(self, b: int, p0: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Row b receives tokens at positions [p0, p0 + n)."""
        n, dev = k.shape[0], k.device
        pos = torch.arange(p0, p0 + n, device=dev)
        w = (pos >= self.sinks).to(torch.float32)
        for li in range(self.levels):
            size = self.block << (li + 1)
            g = pos // size
            rel = g - g[0]
            ng = int(rel[-1]) + 1
            sk = torch.zeros(ng, *k.shape[1:], device=dev).index_add_(0, rel, k * w[:, None, None])
            sv = torch.zeros(ng, *v.shape[1:], device=dev).index_add_(0, rel, v * w[:, None, None])
            cnt = torch.zeros(ng, dtype=torch.int64, device=dev).index_add_(0, rel, (pos >= self.sinks).long())
            # the first group continues the partial group (zero when p0 starts a group)
            sk[0] += self.acc_k[b, li]
            sv[0] += self.acc_v[b, li]
            cnt[0] += self.acc_n[b, li]
            complete = ng if (p0 + n) % size == 0 else ng - 1
            first = max(0, complete - self.group_slots)  # older complete groups would be overwritten
            for r in range(first, complete):
                gid = int(g[0]) + r
                s = gid % self.group_slots
                c = int(cnt[r])
                self.sum_k[b, li, s] = sk[r] / max(c, 1)
                self.sum_v[b, li, s] = sv[r] / max(c, 1)
                self.group[b, li, s] = gid
                self.count[b, li, s] = c
            if complete < ng:
                self.acc_k[b, li], self.acc_v[b, li], self.acc_n[b, li] = sk[-1], sv[-1], cnt[-1]
            else:
                self.acc_k[b, li].zero_()
                self.acc_v[b, li].zero_()
                self.acc_n[b, li] = 0


def _level_start(qb: torch.Tensor, l: int, nw: int, levels: int) -> torch.Tensor:
    a = 2 ** (l + 1) if l < levels else 2**l
    return torch.div((qb + 1 - nw * 2**l).clamp_min(0), a, rounding_mode="floor") * a


def hierarchical_attention_decode(q: torch.Tensor, cache: HierarchicalKVCache, *, softmax_scale: float | None = None,
                                  lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Hierarchical attention of the newest ``T`` tokens ``q [B, T, Hq, D]`` (already appended to
    ``cache``): query ``t`` of row b sits at ``p = seqlens[b] - lengths[b] + t`` and sees, as the
    full-sequence op does, the cached exact positions ``s_0 * block <= j <= p`` and ``j < sinks``,
    and the level-``l`` groups ``g`` with ``s_l <= g 2^l`` and ``(g + 1) 2^l <= s_{l-1}`` (score
    ``+ ln(count)``). Returns ``[B, T, Hq, D]``."""
    B, T, Hq, D = q.shape
    if T > cache.max_step:
        raise ValueError(f"hierarchical_attention_decode: {T} new tokens exceed the cache's max_step={cache.max_step}")
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    lengths = torch.full((B,), T, device=q.device, dtype=torch.int64) if lengths is None else lengths.to(torch.int64)
    nw, L, M = cache.window // cache.block, cache.levels, cache.group_slots
    rep = Hq // cache.k.shape[2]
    p = (cache.seqlens - lengths).unsqueeze(1) + torch.arange(T, device=q.device).unsqueeze(0)  # [B, T]
    qb = torch.div(p, cache.block, rounding_mode="floor")
    starts = [_level_start(qb, l, nw, L) for l in range(L + 1)]
    # exact slots
    j = cache.positions.unsqueeze(1)  # [B, 1, slots]
    pq = p.unsqueeze(2)
    vis_e = (j >= 0) & (j <= pq) & ((j >= (starts[0] * cache.block).unsqueeze(2)) | (j < cache.sinks))
    # summary slots, level by level: [B, T, L, M]
    g = cache.group.unsqueeze(1)  # [B, 1, L, M]
    lvl = torch.arange(1, L + 1, device=q.device).view(1, 1, L, 1)
    lo = torch.stack(starts[1:], -1).unsqueeze(-1) if L else g.new_zeros(B, T, 0, 1)  # s_l      [B, T, L, 1]
    hi = torch.stack(starts[:-1], -1).unsqueeze(-1) if L else g.new_zeros(B, T, 0, 1)  # s_{l-1}
    vis_s = (g >= 0) & (cache.count.unsqueeze(1) > 0) & ((g << lvl) >= lo) & (((g + 1) << lvl) <= hi)
    vis = torch.cat([vis_e, vis_s.flatten(2)], -1)  # [B, T, slots + L*M]
    keys = torch.cat([cache.k.float(), cache.sum_k.flatten(1, 2)], 1).repeat_interleave(rep, 2)  # [B, N, Hq, D]
    vals = torch.cat([cache.v.float(), cache.sum_v.flatten(1, 2)], 1).repeat_interleave(rep, 2)
    bias = torch.cat([torch.zeros_like(cache.positions, dtype=torch.float32),
                      cache.count.flatten(1).clamp_min(1).float().log()], 1)  # [B, N]
    s = torch.einsum("bthd,bnhd->bhtn", q.float(), keys) * scale + bias[:, None, None, :]
    s = s.masked_fill(~vis.unsqueeze(1), float("-inf"))
    w = torch.softmax(s, dim=-1)  # every query sees itself
    return torch.einsum("bhtn,bnhd->bthd", w, vals).to(q.dtype)


def hierarchical_cache_size(seqlen: int, *, window: int, block: int = 64, levels: int | None = None, sinks: int = 0,
                            num_kv_heads: int = 8, head_dim: int = 128, dtype=torch.bfloat16) -> dict:
    """Bytes of one sequence's :class:`HierarchicalKVCache` (allocated on the meta device, so the
    figure is the real layout's) against a full KV cache of ``seqlen`` tokens (K and V in ``dtype``)."""
    cache = HierarchicalKVCache(1, num_kv_heads, head_dim, window=window, block=block, levels=levels,
                                max_seqlen=seqlen, sinks=sinks, dtype=dtype, device="meta")
    full = 2 * seqlen * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()
    ours = cache.nbytes()
    return {"seqlen": seqlen, "window": window, "block": block, "levels": cache.levels, "sinks": sinks,
            "cache_bytes": ours, "full_kv_bytes": full, "reduction": 1.0 - ours / full}


register_explainer(
    "hierarchical_attention_decode",
    lambda q, *a, **k: "reference: deepseek_kernels.hierarchical_decode (plain tensor ops; no fused decode kernel yet)",
    lambda device: "reference: deepseek_kernels.hierarchical_decode (plain tensor ops; no fused decode kernel yet)",
)
