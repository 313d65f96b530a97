"""Hierarchical attention op: ``deepseek_kernels.hierarchical_attention`` (forward + backward).

``deepseek_kernels::hierarchical_attention_fwd`` / ``hierarchical_attention_bwd`` run the Triton
kernels of ``deepseek_kernels.triton.hierarchical_attention`` on CUDA tensors (and on CPU under the
Triton interpreter); on CPU otherwise, the reference (closed-form backward). The exact semantics
are in ``deepseek_kernels/reference/hierarchical_attention.py``.
"""

import torch

from deepseek_kernels.ops._registry import TRITON_OP, define_triton_op, interpreting, register_explainer, use_triton
from deepseek_kernels.ops.attention import _fwd_fake, _grads_fake, check_cu_seqlens, check_qkv, resolve_max_seqlen
from deepseek_kernels.reference.hierarchical_attention import (
    check_config,
    hierarchical_attention_bwd_ref,
    hierarchical_attention_ref,
    levels_needed,
)

NAME = "hierarchical_attention"


def check_args(q, k, v, window, block, levels, sinks, cu_seqlens) -> None:
    packed = cu_seqlens is not None
    check_qkv(NAME, q, k, v, packed)
    if q.shape[:-2] != k.shape[:-2]:
        raise ValueError(f"{NAME}: q and k must hold the same tokens (self-attention), got {tuple(q.shape)} "
                         f"and {tuple(k.shape)}")
    check_config(window, block, levels, sinks, NAME)
    if packed:
        check_cu_seqlens(NAME, "cu_seqlens", cu_seqlens, q.shape[0], q.device)


@define_triton_op("deepseek_kernels::hierarchical_attention_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int, levels: int, sinks: int,
            softmax_scale: float | None, cu_seqlens: torch.Tensor | None,
            max_seqlen: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if type(q) is torch.Tensor:  # a direct torch.ops call with real data: same checks as the public function
        check_args(q, k, v, window, block, levels, sinks, cu_seqlens)
    if use_triton(q):
        from deepseek_kernels.triton.hierarchical_attention import hierarchical_attention_fwd

        return hierarchical_attention_fwd(q, k, v, window=window, block=block, levels=levels, sinks=sinks,
                                          softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
    return torch.ops.deepseek_kernels.hierarchical_attention_fwd_ref(q, k, v, window, block, levels, sinks,
                                                                     softmax_scale, cu_seqlens)


@define_triton_op("deepseek_kernels::hierarchical_attention_bwd")
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, window: int, block: int, levels: int, sinks: int, softmax_scale: float | None,
            cu_seqlens: torch.Tensor | None,
            max_seqlen: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from deepseek_kernels.triton.hierarchical_attention import hierarchical_attention_bwd

        return hierarchical_attention_bwd(grad_out, q, k, v, out, lse, window=window, block=block, levels=levels,
                                          sinks=sinks, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens,
                                          max_seqlen=max_seqlen)
    return torch.ops.deepseek_kernels.hierarchical_attention_bwd_ref(grad_out, q, k, v, window, block, levels, sinks,
                                                                     softmax_scale, cu_seqlens)


# The reference (the CPU path without the interpreter) as opaque ops, as ops/attention.py does for the window
# ops: tracing a triton_op body must not run the reference's data-dependent loop over cu_seqlens.
@torch.library.custom_op("deepseek_kernels::hierarchical_attention_fwd_ref", mutates_args=())
def _fwd_ref_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int, levels: int, sinks: int,
                softmax_scale: float | None, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = hierarchical_attention_ref(q, k, v, window=window, block=block, levels=levels, sinks=sinks,
                                          softmax_scale=softmax_scale, cu_seqlens=cu_seqlens, return_lse=True)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("deepseek_kernels::hierarchical_attention_bwd_ref", mutates_args=())
def _bwd_ref_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, block: int,
                levels: int, sinks: int, softmax_scale: float | None,
                cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = hierarchical_attention_bwd_ref(grad_out, q, k, v, window=window, block=block, levels=levels,
                                                sinks=sinks, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fwd_ref_op.register_fake
def _(q, k, v, window, block, levels, sinks, softmax_scale, cu_seqlens):
    return _fwd_fake(q, cu_seqlens)


_bwd_ref_op.register_fake(_grads_fake)


if not TRITON_OP:

    @_fwd_op.register_fake
    def _(q, k, v, window, block, levels, sinks, softmax_scale, cu_seqlens, max_seqlen):
        return _fwd_fake(q, cu_seqlens)

    _bwd_op.register_fake(_grads_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, window, block, levels, sinks, softmax_scale, cu, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu)
    ctx.params = (window, block, levels, sinks, softmax_scale, max_seqlen)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu = ctx.saved_tensors
    window, block, levels, sinks, softmax_scale, max_seqlen = ctx.params
    dq, dk, dv = torch.ops.deepseek_kernels.hierarchical_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, window, block, levels, sinks, softmax_scale, cu, max_seqlen)
    return dq, dk, dv, None, None, None, None, None, None, None


torch.library.register_autograd("deepseek_kernels::hierarchical_attention_fwd", _backward,
                                setup_context=_setup_context)


def hierarchical_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, block: int = 64, levels: int | None = None,
    sinks: int = 0, softmax_scale: float | None = None, cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None, return_lse: bool = False,
):
    """Causal hierarchical attention: local window exactly, older context as pooled summaries.

    ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]`` (``Hq`` a multiple of ``Hkv``), or packed
    ``[total, H, D]`` with ``cu_seqlens`` (int32 ``[n + 1]``; ``max_seqlen`` its longest sequence).
    Queries are taken in blocks of ``block`` tokens (a power of two >= 16). The query at position
    ``i`` of block ``b = i // block`` sees exactly the keys ``s_0(b) * block <= j <= i`` (its block and
    the ``window // block - 1`` blocks before it, plus one block when needed to align the summaries)
    and the sinks ``j < sinks``; every older key is inside exactly one summary: the mean of K and V
    over an aligned group of ``block * 2^l`` tokens (``l = 1..levels``, sinks left out of the means),
    scored ``scale * q . mean_k + ln(count)``; exact keys and summaries share one softmax.
    ``levels=None`` covers every sequence whole (O(window + (window / block) log2(S / window)) per
    query); ``levels=0`` is block-aligned sliding-window attention; in between, keys older than
    the top level are not seen. Level starts ``s_l(b)`` and all index ranges:
    ``deepseek_kernels.reference.hierarchical_attention``.

    Precision: bf16/fp16 are the supported fast dtypes; float32 inputs are accepted, but on a GPU the
    kernels' dots run in TF32 (about 1e-3 relative error; the CPU path is exact float32).

    Returns ``out`` like ``q``; with ``return_lse`` also the natural-log log-sum-exp, float32,
    ``[B, Hq, S]`` (``[Hq, total]`` packed; not differentiable). Differentiable in q, k, v
    (gradients flow through the summaries back into k and v).
    """
    check_args(q, k, v, window, block, levels, sinks, cu_seqlens)
    if cu_seqlens is not None:
        max_seqlen = resolve_max_seqlen(NAME, "max_seqlen", max_seqlen, cu_seqlens, "cu_seqlens")
        if max_seqlen is None:
            # compiled without one: the packed length bounds it (same result: levels beyond those
            # needed change nothing, grid programs past a sequence's end exit)
            max_seqlen = q.shape[0]
    longest = q.shape[1] if cu_seqlens is None else max_seqlen
    if levels is None:
        levels = levels_needed(longest, window=window, block=block)
    out, lse = torch.ops.deepseek_kernels.hierarchical_attention_fwd(
        q, k, v, window, block, levels, sinks, softmax_scale, cu_seqlens, max_seqlen)
    return (out, lse) if return_lse else out


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"triton: deepseek_kernels.triton.hierarchical_attention on {device} (untuned; fwd + bwd; "
                "float32 inputs use TF32 dots, ~1e-3 relative)")
    if interpreting():
        return "triton: deepseek_kernels.triton.hierarchical_attention under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.reference.hierarchical_attention (tensors on the CPU)"


def _explain(q, *args, **kwargs):
    return _describe(q.device)


register_explainer(NAME, _explain, _describe)
