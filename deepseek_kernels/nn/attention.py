"""``WindowedAttention``: a self-attention block (q/k/v/o projections, rotary embeddings) that runs
:func:`deepseek_kernels.window_attention`; its state-dict keys are those of a Llama/Mistral-style
attention block (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``), so it can replace one."""

import torch
from torch import nn

from deepseek_kernels.ops.attention import window_attention
from deepseek_kernels.ops.hierarchical_attention import hierarchical_attention


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding, rotate-half convention (Llama/Mistral): ``x [B, S, H, D]``,
    ``positions [B, S]`` or ``[S]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [..., S, D/2]
    ang = torch.cat([ang, ang], dim=-1)
    if ang.dim() == 2:
        ang = ang.unsqueeze(0)
    cos, sin = ang.cos().unsqueeze(2), ang.sin().unsqueeze(2)  # [B, S, 1, D]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class WindowedAttention(nn.Module):
    """Causal sliding-window self-attention with GQA, attention sinks and rotary embeddings.

    Args:
        hidden_size, num_heads, num_kv_heads (default num_heads), head_dim (default
        hidden_size // num_heads), window, sinks, rope_theta (None: no rotary), bias (projections).
        mode: ``"window"`` (token-exact sliding window, :func:`deepseek_kernels.window_attention`) or
        ``"hierarchical"`` (local window plus pooled far context,
        :func:`deepseek_kernels.hierarchical_attention` with ``block`` and ``levels``).
        deterministic: ``mode="window"`` backward: ``True`` bitwise reproducible, ``False`` dQ accumulated
        by atomics / TMA reduce-adds, ``None`` (default) the faster of the two for the call, see
        :func:`deepseek_kernels.window_attention`.
    ``forward(x [B, S, hidden], position_ids=None)`` -> ``[B, S, hidden]``.
    """

    def __init__(self, hidden_size: int, num_heads: int, *, window: int, num_kv_heads: int | None = None,
                 head_dim: int | None = None, sinks: int = 0, rope_theta: float | None = 10000.0, bias: bool = False,
                 mode: str = "window", block: int = 64, levels: int | None = None, deterministic: bool | None = None,
                 device=None, dtype=None):
        super().__init__()
        if mode not in ("window", "hierarchical"):
            raise ValueError(f"WindowedAttention: mode must be 'window' or 'hierarchical', got {mode!r}")
        if mode == "hierarchical":
            from deepseek_kernels.reference.hierarchical_attention import check_config

            check_config(window, block, levels, sinks, "WindowedAttention")
        self.mode, self.block, self.levels, self.deterministic = mode, block, levels, deterministic
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"WindowedAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        self.head_dim = head_dim or hidden_size // num_heads
        self.window, self.sinks, self.rope_theta = window, sinks, rope_theta
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, **kw)
        self.k_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.v_proj = nn.Linear(hidden_size, self.num_kv_heads * self.head_dim, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, **kw)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.q_proj.in_features
        if x.dim() != 3 or x.shape[-1] != hidden:
            raise ValueError(f"WindowedAttention: x must be [batch, seq, hidden={hidden}], got {tuple(x.shape)}")
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim)
        if self.rope_theta is not None:
            pos = torch.arange(S, device=x.device) if position_ids is None else position_ids
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        if self.mode == "hierarchical":
            out = hierarchical_attention(q, k, v, window=self.window, block=self.block, levels=self.levels,
                                         sinks=self.sinks)
        else:
            out = window_attention(q, k, v, window=self.window, sinks=self.sinks, deterministic=self.deterministic)
        return self.o_proj(out.reshape(B, S, self.num_heads * self.head_dim))

    def extra_repr(self) -> str:
        extra = f", mode=hierarchical, block={self.block}, levels={self.levels}" if self.mode == "hierarchical" else ""
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"window={self.window}, sinks={self.sinks}, rope_theta={self.rope_theta}{extra}")
