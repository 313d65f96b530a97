"""Gated sparse SwiGLU FFN (routed neuron blocks): the exact definition.

Weights use the Llama MLP layout: ``w_gate, w_up [d_ff, d_model]``, ``w_down [d_model, d_ff]``.
The ``d_ff`` neurons are split into ``n_blocks`` contiguous blocks of ``bs = d_ff / n_blocks``;
block ``b`` owns neurons ``[b*bs, (b+1)*bs)`` of all three weights. Blocks ``0 .. S-1``
(``S = shared_blocks``) are shared (always active, weight 1); blocks ``S .. n_blocks-1`` are
routed: the router ``router_weight [n_routed, d_model]`` (``n_routed = n_blocks - S``) scores them.

Routing, per token ``t`` (``x [T, d_model]``), in float32 (float64 for float64 inputs):

    logits[t, r] = x[t] . router_weight[r]                         r in [0, n_routed)
    p[t, r]      = sigmoid(logits[t, r])        gate="sigmoid"
                 = softmax_r(logits[t, :])[r]    gate="softmax"  (over the routed blocks)
    sel[t, r]    = p[t, r] + bias[r]             (bias: selection only, never weights the output)
                 = -inf where p[t, r] <= threshold  (threshold mode)
    chosen       = the k routed blocks with the largest sel, ties going to the lower block index;
                   slots whose sel is -inf (threshold mode) are empty: idx = -1, weight 0
    weight       = p[t, r] / sum_{chosen r'} p[t, r']   weighting="gate" (0 if nothing chosen)
                 = 1                                    weighting="none"

``k = n_active(active_ratio, n_blocks) - S`` where ``n_active(r, n) = max(1, floor(r*n + 1/2))``
counts the shared blocks too, so ``active_ratio`` is the fraction of all blocks a token runs.

FFN, with ``m[t, b]`` = 1 for shared blocks, the routing weight for chosen routed blocks, else 0:

    h[t, f]  = silu(x[t] . w_gate[f]) * (x[t] . w_up[f])
    out[t]   = sum_f m[t, f // bs] * h[t, f] * w_down[:, f]

With ``weighting="none"`` and every block active this is exactly the dense SwiGLU FFN. The reference
below computes the dense ``h`` and masks it (slow, readable); the kernels only compute chosen blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GATES = ("sigmoid", "softmax")
WEIGHTINGS = ("gate", "none")


def n_active(active_ratio: float, n_blocks: int) -> int:
    """Blocks a token runs (shared included): ``max(1, floor(active_ratio * n_blocks + 1/2))``."""
    return max(1, int(math.floor(active_ratio * n_blocks + 0.5)))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def route_ref(x: torch.Tensor, router_weight: torch.Tensor, *, k: int, gate: str = "sigmoid",
              weighting: str = "gate", bias: torch.Tensor | None = None,
              threshold: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k routing of ``x [T, d_model]`` over ``router_weight [n_routed, d_model]``.

    Returns ``idx`` int32 ``[T, k]`` (routed block index in ``[0, n_routed)``, ``-1`` for an empty
    slot, in decreasing ``sel`` order), ``weights [T, k]`` and ``probs [T, n_routed]`` (the gate
    values ``p``), both float32 (float64 for float64 x). Differentiable in x and router_weight
    through ``weights`` and ``probs``.
    """
    cd = _compute_dtype(x)
    logits = x.to(cd) @ router_weight.to(cd).t()
    probs = torch.sigmoid(logits) if gate == "sigmoid" else torch.softmax(logits, dim=-1)
    sel = probs.detach()
    if bias is not None:
        sel = sel + bias.to(cd)
    if threshold is not None:
        sel = sel.masked_fill(probs.detach() <= threshold, float("-inf"))
    sorted_sel, order = torch.sort(sel, dim=-1, descending=True, stable=True)  # stable: ties -> lower index
    valid = sorted_sel[:, :k] > float("-inf")
    idx = torch.where(valid, order[:, :k], -1)
    chosen_p = probs.gather(1, idx.clamp_min(0)) * valid
    if weighting == "gate":
        total = chosen_p.sum(-1, keepdim=True)
        weights = chosen_p / torch.where(total > 0, total, torch.ones_like(total))
    else:
        weights = valid.to(cd)
    return idx.to(torch.int32), weights, probs


def block_mask_ref(idx: torch.Tensor, weights: torch.Tensor, *, n_blocks: int, shared_blocks: int) -> torch.Tensor:
    """``m [T, n_blocks]``: 1 for shared blocks, the routing weight for chosen routed blocks, else 0."""
    T = idx.shape[0]
    m = weights.new_zeros(T, n_blocks)
    m[:, :shared_blocks] = 1
    valid = idx >= 0
    target = (idx.long() + shared_blocks).clamp_min(0)
    return m.scatter_add(1, target, torch.where(valid, weights, torch.zeros_like(weights)))


def sparse_ffn_blocks_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                          w_down: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, *, n_blocks: int,
                          shared_blocks: int = 0) -> torch.Tensor:
    """The FFN part for a given routing (``idx``/``weights`` as :func:`route_ref` returns them):
    dense SwiGLU with the block mask, in float32 (float64 for float64 x), returned in x's dtype."""
    cd = _compute_dtype(x)
    d_ff = w_gate.shape[0]
    xf = x.to(cd)
    h = F.silu(xf @ w_gate.to(cd).t()) * (xf @ w_up.to(cd).t())
    m = block_mask_ref(idx, weights.to(cd), n_blocks=n_blocks, shared_blocks=shared_blocks)
    h = h * m.repeat_interleave(d_ff // n_blocks, dim=1)
    return (h @ w_down.to(cd).t()).to(x.dtype)


def gated_sparse_ffn_ref(x: torch.Tensor, router_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                         w_down: torch.Tensor, *, active_ratio: float, shared_blocks: int = 0, gate: str = "sigmoid",
                         weighting: str = "gate", bias: torch.Tensor | None = None,
                         threshold: float | None = None) -> torch.Tensor:
    """The whole layer: :func:`route_ref` then :func:`sparse_ffn_blocks_ref`; ``x [..., d_model]``."""
    lead, d = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d)
    n_blocks = router_weight.shape[0] + shared_blocks
    k = n_active(active_ratio, n_blocks) - shared_blocks
    if k > 0:
        idx, weights, _ = route_ref(x2, router_weight, k=k, gate=gate, weighting=weighting, bias=bias,
                                    threshold=threshold)
    else:
        idx = torch.empty(x2.shape[0], 0, dtype=torch.int32, device=x.device)
        weights = torch.empty(x2.shape[0], 0, dtype=_compute_dtype(x), device=x.device)
    out = sparse_ffn_blocks_ref(x2, w_gate, w_up, w_down, idx, weights, n_blocks=n_blocks, shared_blocks=shared_blocks)
    return out.reshape(*lead, w_down.shape[0])


def swiglu_ffn_ref(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The dense SwiGLU FFN ``(silu(x Wg^T) * (x Wu^T)) Wd^T`` in x's dtype (the benchmark baseline)."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def flops(tokens: int, d_model: int, d_ff: int, active_blocks: float, n_blocks: int, n_routed: int = 0,
          backward: bool = False) -> int:
    """Useful FLOPs: ``6 * T * d_model * d_ff * active/n_blocks`` for the three projections of the
    active blocks, plus ``2 * T * d_model * n_routed`` for the router; x3 with the backward."""
    f = 6 * tokens * d_model * d_ff * active_blocks / n_blocks + 2 * tokens * d_model * n_routed
    return int(f * 3) if backward else int(f)
