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
On a GPU (and under the Triton interpreter) ``append`` is one Triton launch and
``hierarchical_attention_decode`` one fused split-cache kernel plus a merge
(``deepseek_kernels.triton.hierarchical_decode``); on the CPU both are batched tensor ops
(``hierarchical_attention_decode_ref`` is also the kernel's oracle). ``explain`` says which.
"""

from __future__ import annotations

import math

import torch

from deepseek_kernels.decode import _check_lengths
from deepseek_kernels.ops._registry import eager_fast_path, interpreting, register_explainer, use_triton
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
        group and pushes the groups they complete. One Triton launch on a GPU (and under the
        interpreter); batched tensor ops otherwise. Never synchronizes with the device."""
        for arg, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4 or t.shape[0] != self.k.shape[0] \
                    or t.shape[2:] != self.k.shape[2:]:
                raise ValueError(f"HierarchicalKVCache.append: {arg} must be [B={self.k.shape[0]}, T, "
                                 f"{self.k.shape[2]}, {self.k.shape[3]}], got {tuple(getattr(t, 'shape', ()))}")
            if t.device != self.k.device:
                raise ValueError(f"HierarchicalKVCache.append: {arg} is on {t.device}, the cache on {self.k.device}")
        if k.shape != v.shape:
            raise ValueError(f"HierarchicalKVCache.append: k and v differ in shape: {tuple(k.shape)} vs {tuple(v.shape)}")
        B, T = k.shape[:2]
        lengths = _check_lengths("HierarchicalKVCache.append", lengths, B, T, self.seqlens.device)
        if use_triton(k):
            from deepseek_kernels.triton.hierarchical_decode import hierarchical_cache_append

            hierarchical_cache_append(self, k, v, lengths.contiguous(), direct=eager_fast_path(k, v, lengths))
        else:
            self._append_exact(k, v, lengths)
            for li in range(self.levels):
                self._pool_level(li, k, v, lengths)
        self.seqlens += lengths

    prefill = append  # a long prompt is an append that keeps only what the cache holds

    def _append_exact(self, k, v, lengths) -> None:
        B, T = k.shape[:2]
        t = torch.arange(T, device=k.device).unsqueeze(0)
        lens = lengths.unsqueeze(1)
        pos = self.seqlens.unsqueeze(1) + t  # [B, T]
        keep = (t < lens) & ((pos < self.sinks) | (t >= lens - self.ring))
        b_idx, t_idx = keep.nonzero(as_tuple=True)
        slot = self._slots(pos[b_idx, t_idx])
        self.k[b_idx, slot] = k[b_idx, t_idx].to(self.k.dtype)
        self.v[b_idx, slot] = v[b_idx, t_idx].to(self.v.dtype)
        self.positions[b_idx, slot] = pos[b_idx, t_idx]

    def _pool_level(self, li: int, k, v, lengths) -> None:
        """Level ``li + 1`` for all rows at once. Row b's new tokens touch groups ``g0 + r``
        (``g0 = seqlens // G``, ``r < T // G + 2``); the first continues the partial group; groups
        ``r < r_w = (seqlens + n) // G - g0`` are complete, and ring slot ``s`` receives the newest
        complete group ``≡ s (mod M)`` if this call completed it."""
        B, T, H, D = k.shape
        M, size, dev = self.group_slots, self.block << (li + 1), k.device
        ng = T // size + 2
        t = torch.arange(T, device=dev).unsqueeze(0)
        pos = self.seqlens.unsqueeze(1) + t
        g0 = torch.div(self.seqlens, size, rounding_mode="floor")
        w = ((t < lengths.unsqueeze(1)) & (pos >= self.sinks)).double()  # [B, T]
        # group r spans new tokens [r G - off, (r + 1) G - off) (off = seqlens % G): differences of
        # float64 prefix sums (index_add_ is slow on the CPU; float64 keeps long prompts exact enough)
        r = torch.arange(ng, device=dev).unsqueeze(0)
        off = (self.seqlens - g0 * size).unsqueeze(1)
        lo, hi = (r * size - off).clamp(0, T), ((r + 1) * size - off).clamp(0, T)  # [B, ng]
        rows_ = torch.arange(B, device=dev).unsqueeze(1)
        zero = lambda x: torch.cat([x.new_zeros(x[:, :1].shape), x.cumsum(1)], 1)  # noqa: E731
        ck = zero(k.double() * w[:, :, None, None])
        cv = zero(v.double() * w[:, :, None, None])
        cw = zero(w)
        sk = (ck[rows_, hi] - ck[rows_, lo]).float()
        sv = (cv[rows_, hi] - cv[rows_, lo]).float()
        cnt = (cw[rows_, hi] - cw[rows_, lo]).round().long()
        sk[:, 0] += self.acc_k[:, li]
        sv[:, 0] += self.acc_v[:, li]
        cnt[:, 0] += self.acc_n[:, li]
        r_w = torch.div(self.seqlens + lengths, size, rounding_mode="floor") - g0  # [B]
        rows = torch.arange(B, device=dev)
        # the newest completed group in each ring slot, and whether this call completed it
        s = torch.arange(M, device=dev).unsqueeze(0)
        last = (g0 + r_w - 1).unsqueeze(1)
        gid = last - torch.remainder(last - s, M)  # [B, M]
        r = gid - g0.unsqueeze(1)
        push = r >= 0
        rc = r.clamp_min(0)
        c = cnt.gather(1, rc)
        inv = (1.0 / c.clamp_min(1).float())[:, :, None, None]
        pick = lambda x: x[rows.unsqueeze(1), rc] * inv  # noqa: E731
        keep = push[:, :, None, None]
        self.sum_k[:, li] = torch.where(keep, pick(sk), self.sum_k[:, li])
        self.sum_v[:, li] = torch.where(keep, pick(sv), self.sum_v[:, li])
        self.group[:, li] = torch.where(push, gid, self.group[:, li])
        self.count[:, li] = torch.where(push, c, self.count[:, li])
        self.acc_k[:, li] = sk[rows, r_w]
        self.acc_v[:, li] = sv[rows, r_w]
        self.acc_n[:, li] = cnt[rows, r_w]


def _level_start(qb: torch.Tensor, l: int, nw: int, levels: int) -> torch.Tensor:
    a = 2 ** (l + 1) if l < levels else 2**l
    return torch.div((qb + 1 - nw * 2**l).clamp_min(0), a, rounding_mode="floor") * a


def _check_decode(q: torch.Tensor, cache: HierarchicalKVCache) -> None:
    name = "hierarchical_attention_decode"
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{name}: q must be a [batch, new_tokens, heads, head_dim] tensor, got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    B, T, Hq, D = q.shape
    if T > cache.max_step:
        raise ValueError(f"{name}: {T} new tokens exceed the cache's max_step={cache.max_step}")
    _, _, Hkv, Dc = cache.k.shape
    if B != cache.k.shape[0] or D != Dc or Hq % Hkv:
        raise ValueError(f"{name}: q {tuple(q.shape)} does not fit the cache (batch {cache.k.shape[0]}, "
                         f"{Hkv} kv heads of dim {Dc}; query heads must be a multiple of the kv heads)")
    if q.device != cache.k.device:
        raise ValueError(f"{name}: q is on {q.device}, the cache on {cache.k.device}")


def hierarchical_attention_decode(q: torch.Tensor, cache: HierarchicalKVCache, *, softmax_scale: float | None = None,
                                  lengths: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """Hierarchical attention of the newest ``T`` tokens ``q [B, T, Hq, D]`` (already appended to
    ``cache``): query ``t`` of row b sits at ``p = seqlens[b] - lengths[b] + t`` and sees, as the
    full-sequence op does, the cached exact positions ``s_0 * block <= j <= p`` and ``j < sinks``,
    and the level-``l`` groups ``g`` with ``s_l <= g 2^l`` and ``(g + 1) 2^l <= s_{l-1}`` (score
    ``+ ln(count)``). Returns ``[B, T, Hq, D]``.

    On a GPU (and under the Triton interpreter) one fused kernel (``deepseek_kernels.triton.
    hierarchical_decode``), split over the cache into ``num_splits`` parts (default: about two
    programs per SM) and merged by log-sum-exp; otherwise :func:`hierarchical_attention_decode_ref`."""
    _check_decode(q, cache)
    B, T, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    lengths = _check_lengths("hierarchical_attention_decode", lengths, B, T, q.device)
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"hierarchical_attention_decode: num_splits must be None or an int >= 1, got {num_splits!r}")
    if use_triton(q):
        from deepseek_kernels.triton.hierarchical_decode import hierarchical_decode_attn

        return hierarchical_decode_attn(q, cache, lengths.contiguous(), softmax_scale=scale, num_splits=num_splits,
                                        direct=eager_fast_path(q, lengths))
    return hierarchical_attention_decode_ref(q, cache, softmax_scale=scale, lengths=lengths)


def hierarchical_attention_decode_ref(q: torch.Tensor, cache: HierarchicalKVCache, *,
                                      softmax_scale: float | None = None,
                                      lengths: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`hierarchical_attention_decode` in plain tensor ops (float32 math): the CPU path and
    the oracle of the decode kernel."""
    _check_decode(q, cache)
    B, T, Hq, D = q.shape
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


def _describe_decode(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"triton: deepseek_kernels.triton.hierarchical_decode on {device} (one append launch, one split "
                "attention launch + log-sum-exp merge; untuned)")
    if interpreting():
        return "triton: deepseek_kernels.triton.hierarchical_decode under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.hierarchical_decode (batched tensor ops; tensors on the CPU)"


register_explainer("hierarchical_attention_decode", lambda q, *a, **k: _describe_decode(q.device), _describe_decode)
