"""Decoding against a rolling KV cache: memory stays O(sinks + window) however long the context.

``RollingKVCache`` keeps, per sequence, the first ``sinks`` keys/values in fixed slots and the
most recent ones in a ring of ``window + max_step - 1`` slots (``max_step`` = the most new tokens
decoded in one call, so every query of a step still finds its whole window). Each slot remembers
the absolute position it holds, so attention masks by position, exactly as the full-sequence op
does. ``window_attention_decode`` runs the Triton decode kernels of
``deepseek_kernels.triton.window_decode`` on CUDA tensors (and under the Triton interpreter), the
plain-tensor reference otherwise; ``explain`` says which.
"""

import torch

from deepseek_kernels.ops._registry import (
    TRITON_OP,
    define_triton_op,
    eager_fast_path,
    interpreting,
    register_explainer,
)


def _check_lengths(name: str, lengths, B: int, T: int, device) -> torch.Tensor:
    """``lengths`` (new tokens per row) as int64 ``[B]`` on ``device``; ``None`` means all ``T``.
    Shape, dtype and device are checked; the values (``0 <= lengths <= T``) only in eager mode,
    where reading them back is allowed (one host sync)."""
    if lengths is None:
        return torch.full((B,), T, device=device, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (B,) or lengths.is_floating_point():
        raise ValueError(f"{name}: lengths must be an integer tensor of shape [B] = [{B}], got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    lengths = lengths.to(device=device, dtype=torch.int64)
    capturing = lengths.is_cuda and torch.cuda.is_current_stream_capturing()
    if not torch.compiler.is_compiling() and not capturing:
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"{name}: lengths must lie in [0, T={T}], got {lengths.tolist()}")
    return lengths


class RollingKVCache:
    """Per-sequence cache of ``sinks`` fixed slots plus a ring of ``window + max_step - 1`` slots.

    ``k``/``v`` are ``[B, slots, Hkv, D]``; ``positions`` ``[B, slots]`` (-1 = empty);
    ``seqlens`` ``[B]`` counts the tokens each sequence has seen. One more slot per row, the last,
    stays empty (position -1): appends send the tokens the cache does not keep there, so an
    append is a single scatter with no host synchronisation (it can be captured in a CUDA graph).
    """

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *, window: int, sinks: int = 0,
                 max_step: int = 16, dtype=torch.bfloat16, device=None):
        if window < 1 or sinks < 0 or max_step < 1:
            raise ValueError(f"RollingKVCache: need window >= 1, sinks >= 0, max_step >= 1; got {window}, {sinks}, {max_step}")
        self.window, self.sinks, self.max_step = window, sinks, max_step
        self.ring = window + max_step - 1
        self.slots = sinks + self.ring  # slots that hold tokens; index `slots` is the discard slot
        self.k = torch.zeros(batch, self.slots + 1, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.positions = torch.full((batch, self.slots + 1), -1, dtype=torch.int64, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int64, device=device)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions, self.seqlens))

    def _slots(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.where(pos < self.sinks, pos, self.sinks + (pos - self.sinks) % self.ring)

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Appends ``k, v [B, T, Hkv, D]`` (the first ``lengths[b]`` tokens of row b; default all T).
        Only the tokens the cache keeps are stored (sinks and the last ``ring`` positions)."""
        B, T = k.shape[:2]
        if k.shape != v.shape or B != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"RollingKVCache.append: k and v must both be [B={self.k.shape[0]}, T, "
                             f"{self.k.shape[2]}, {self.k.shape[3]}], got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.device != self.k.device:
            raise ValueError(f"RollingKVCache.append: k is on {k.device}, the cache on {self.k.device}")
        lengths = _check_lengths("RollingKVCache.append", lengths, B, T, k.device)
        if _use_kernel(k) and B and T:
            from deepseek_kernels.triton.window_decode import rolling_cache_append

            rolling_cache_append(self, k, v, lengths.contiguous(), direct=eager_fast_path(k, v, lengths))
            self.seqlens += lengths
            return
        t = torch.arange(T, device=k.device).unsqueeze(0)
        pos = self.seqlens.unsqueeze(1) + t  # [B, T]
        keep = (t < lengths.unsqueeze(1)) & ((pos < self.sinks) | (t >= lengths.unsqueeze(1) - self.ring))
        slot = torch.where(keep, self._slots(pos), self.slots)  # the rest goes to the discard slot
        rows = torch.arange(B, device=k.device).unsqueeze(1).expand(B, T)
        self.k.index_put_((rows, slot), k.to(self.k.dtype))
        self.v.index_put_((rows, slot), v.to(self.v.dtype))
        self.positions.index_put_((rows, slot), torch.where(keep, pos, -1))
        self.seqlens += lengths

    prefill = append  # filling from a long prompt is an append that keeps only what fits


def _use_kernel(q: torch.Tensor) -> bool:
    return q.is_cuda or (interpreting() and not torch.compiler.is_compiling())


def window_attention_decode_ref(q, k_cache, v_cache, positions, seqlens, lengths, window, sinks, scale):
    """The decode step in plain tensor ops (float32 math): the definition the kernel is checked against."""
    B, T, Hq, D = q.shape
    rep = Hq // k_cache.shape[2]
    p = (seqlens - lengths).unsqueeze(1) + torch.arange(T, device=q.device).unsqueeze(0)  # [B, T]
    j = positions.unsqueeze(1)  # [B, 1, slots]
    pq = p.unsqueeze(2)
    vis = (j >= 0) & (j <= pq) & ((j > pq - window) | (j < sinks))  # [B, T, slots]
    k = k_cache.float().repeat_interleave(rep, 2)  # [B, slots, Hq, D]
    v = v_cache.float().repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q.float(), k) * scale
    s = s.masked_fill(~vis.unsqueeze(1), float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)  # rows without a visible key give 0
    return torch.einsum("bhts,bshd->bthd", w, v).to(q.dtype)


@define_triton_op("deepseek_kernels::window_attention_decode")
def _decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
               seqlens: torch.Tensor, lengths: torch.Tensor, window: int, sinks: int, scale: float) -> torch.Tensor:
    if not _use_kernel(q):
        return window_attention_decode_ref(q, k_cache, v_cache, positions, seqlens, lengths, window, sinks, scale)
    from deepseek_kernels.triton.window_decode import window_decode

    return window_decode(q, k_cache, v_cache, positions, seqlens, lengths, window=window, sinks=sinks, scale=scale)


if not TRITON_OP:

    @_decode_op.register_fake
    def _(q, k_cache, v_cache, positions, seqlens, lengths, window, sinks, scale):
        return torch.empty_like(q)


def window_attention_decode(q: torch.Tensor, cache: RollingKVCache, *, softmax_scale: float | None = None,
                            lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of the newest ``T`` tokens ``q [B, T, Hq, D]`` (already appended to ``cache``)
    over the cache: query ``t`` of row b sits at ``seqlens[b] - lengths[b] + t`` and sees the cached
    positions ``p - window < j <= p`` and ``j < sinks``. Returns ``[B, T, Hq, D]``."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"window_attention_decode: q must be [B, T, Hq, D], got {getattr(q, 'shape', type(q))}")
    B, T, Hq, D = q.shape
    if T > cache.max_step:
        raise ValueError(f"window_attention_decode: {T} new tokens exceed the cache's max_step={cache.max_step}")
    if B != cache.k.shape[0] or D != cache.k.shape[3] or Hq % cache.k.shape[2]:
        raise ValueError(f"window_attention_decode: q {tuple(q.shape)} does not fit the cache "
                         f"(batch {cache.k.shape[0]}, {cache.k.shape[2]} KV heads, head dim {cache.k.shape[3]}): "
                         "need the same batch and head dim, and Hq a multiple of the KV heads")
    if q.device != cache.k.device:
        raise ValueError(f"window_attention_decode: q is on {q.device}, the cache on {cache.k.device}")
    scale = D**-0.5 if softmax_scale is None else float(softmax_scale)
    lengths = _check_lengths("window_attention_decode", lengths, B, T, q.device)
    args = (q, cache.k, cache.v, cache.positions, cache.seqlens, lengths, cache.window, cache.sinks, scale)
    if eager_fast_path(*args[:6]) and not q.requires_grad:
        from deepseek_kernels.triton.window_decode import window_decode

        return window_decode(*args[:6], window=cache.window, sinks=cache.sinks, scale=scale, direct=True)
    return torch.ops.deepseek_kernels.window_attention_decode(*args)


def _describe_decode(device: torch.device) -> str:
    if device.type == "cuda":
        return f"triton: deepseek_kernels.triton.window_decode on {device} (split over cache slots + combine)"
    if interpreting():
        return "triton: deepseek_kernels.triton.window_decode under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.decode.window_attention_decode_ref (tensors on the CPU)"


register_explainer("window_attention_decode", lambda q, *a, **k: _describe_decode(q.device), _describe_decode)
