"""Gated sparse SwiGLU FFN op: ``deepseek_kernels.gated_sparse_ffn`` (forward + backward).

Two registered ops, composed by the public function (so autograd sums x's two gradients):

* ``deepseek_kernels::sparse_ffn_route(x, router_weight, bias, k, gate, weighting, threshold)``
  -> ``(weights fp32 [T, k], probs fp32 [T, n_routed], idx int32 [T, k])`` (float outputs first:
  opcheck's autograd test sums the outputs in order and cannot start from an integer one). Triton: the fused router
  kernel; CPU: ``route_ref``. Backward (closed form, torch): through the normalised gates and the
  probs to the logits, then ``dx = dlogits . W_r``, ``dW_r = dlogits^T . x``.
* ``deepseek_kernels::sparse_ffn_blocks_fwd(x, w_gate, w_up, w_down, idx, weights, shared_blocks,
  n_blocks, save_act)`` -> ``(out [T, D], act [P, 2, BS], plan int32)`` with ``act`` the gate/up
  pre-activations in the block-grouped layout and ``plan`` the grouping packed for the backward (with
  ``save_act``; else empty: ``sparse_ffn.pack_plan``). Triton: grouped gate/up GEMM with SwiGLU fused, grouped down GEMM, weighted
  combine; without ``save_act`` and for at most 16 tokens, the two decode kernels instead (gather
  GEMV over the used blocks' weight slices, combine fused into the down product). CPU: the dense products gathered into the grouped layout (a slow, exact fallback).
  Backward: ``deepseek_kernels::sparse_ffn_blocks_bwd`` (given the forward's plan, it does not group again).
  Triton: grouped GEMMs with the SwiGLU
  derivative fused (dx through w_down/w_gate/w_up, dW of each block's slices over its tokens, the
  routing-weight gradient), no host sync, deterministic. CPU: torch over the grouped layout (one
  matmul per block and projection, one host sync).

Exact semantics: ``deepseek_kernels/reference/sparse_ffn.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepseek_kernels.ops._registry import (
    TRITON_OP,
    define_triton_op,
    eager_fast_path,
    interpreting,
    pdl_enabled,
    register_explainer,
)
from deepseek_kernels.reference.sparse_ffn import GATES, WEIGHTINGS, n_active, route_ref, sparse_ffn_blocks_ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NAME = "gated_sparse_ffn"


def _check_routing_on_device() -> bool:
    """``DSK_CHECK_ROUTING=1``: range-check idx of CUDA tensors eagerly (one host sync per call)."""
    import os

    return os.environ.get("DSK_CHECK_ROUTING", "0") == "1"


def _use_triton(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return True
    # The interpreter runs the kernels on CPU tensors (tests); torch.compile on CPU takes the torch path.
    return interpreting() and not torch.compiler.is_compiling()


# ---- argument checks -------------------------------------------------------------------------------


def check_gate_weighting(name: str, gate, weighting) -> None:
    if gate not in GATES:
        raise ValueError(f"{name}: gate must be one of {GATES}, got {gate!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"{name}: weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def check_args(x, router_weight, w_gate, w_up, w_down, *, active_ratio, shared_blocks, gate, weighting, bias,
               threshold) -> None:
    name = NAME
    tensors = (("x", x), ("router_weight", router_weight), ("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down))
    for arg, t in tensors:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float16, bfloat16 or float32, got {x.dtype}")
    for arg, t in tensors[1:]:
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype mismatch: {arg} is {t.dtype} but x is {x.dtype}; all weights must "
                             f"have x's dtype")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} must be on {x.device} (x's device), got {t.device}")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must be [..., d_model], got a scalar")
    d_model, d_ff = x.shape[-1], w_gate.shape[0]
    if w_gate.shape != (d_ff, d_model):
        raise ValueError(f"{name}: w_gate must be [d_ff, d_model] with d_model={d_model}, got {tuple(w_gate.shape)}")
    if w_up.shape != w_gate.shape:
        raise ValueError(f"{name}: w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    if w_down.shape != (d_model, d_ff):
        raise ValueError(f"{name}: w_down must be [d_model, d_ff] = ({d_model}, {d_ff}), got {tuple(w_down.shape)}")
    if isinstance(shared_blocks, bool) or not isinstance(shared_blocks, int) or shared_blocks < 0:
        raise ValueError(f"{name}: shared_blocks must be an int >= 0, got {shared_blocks!r}")
    n_routed = router_weight.shape[0]
    if router_weight.shape[1] != d_model or n_routed < 1:
        raise ValueError(f"{name}: router_weight must be [n_routed >= 1, d_model] with d_model={d_model}, "
                         f"got {tuple(router_weight.shape)}")
    n_blocks = n_routed + shared_blocks
    if d_ff % n_blocks:
        raise ValueError(f"{name}: d_ff ({d_ff}) must be divisible by n_blocks ({n_blocks} = {n_routed} routed "
                         f"+ {shared_blocks} shared)")
    if isinstance(active_ratio, bool) or not isinstance(active_ratio, (int, float)) or not 0 < active_ratio <= 1:
        raise ValueError(f"{name}: active_ratio must be a number in (0, 1], got {active_ratio!r}")
    if n_active(active_ratio, n_blocks) < shared_blocks:
        raise ValueError(f"{name}: active_ratio={active_ratio} keeps {n_active(active_ratio, n_blocks)} of "
                         f"{n_blocks} blocks, fewer than the {shared_blocks} shared blocks")
    check_gate_weighting(name, gate, weighting)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold < 1):
        raise ValueError(f"{name}: threshold must be None or a number in [0, 1) (gate values lie in (0, 1)), "
                         f"got {threshold!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (n_routed,) or bias.dtype != torch.float32:
            raise ValueError(f"{name}: bias must be a float32 tensor [n_routed] = ({n_routed},), got "
                             f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}")
        if bias.device != x.device:
            raise ValueError(f"{name}: bias must be on {x.device}, got {bias.device}")


def check_route_op_args(x, router_weight, bias, k, gate, weighting) -> None:
    """The registered route op's own checks (it can be called straight through torch.ops)."""
    name = "sparse_ffn_route"
    if x.dim() != 2 or router_weight.dim() != 2 or router_weight.shape[1] != x.shape[1]:
        raise ValueError(f"{name}: x must be [T, d_model] and router_weight [n_routed, d_model], got "
                         f"{tuple(x.shape)} and {tuple(router_weight.shape)}")
    if x.dtype not in FLOAT_DTYPES or router_weight.dtype != x.dtype:
        raise ValueError(f"{name}: x and router_weight must share one dtype among float16/bfloat16/float32, "
                         f"got {x.dtype} and {router_weight.dtype}")
    if not 1 <= k <= router_weight.shape[0]:
        raise ValueError(f"{name}: k must be in [1, n_routed={router_weight.shape[0]}], got {k}")
    check_gate_weighting(name, gate, weighting)
    if bias is not None and (bias.shape != (router_weight.shape[0],) or bias.dtype != torch.float32):
        raise ValueError(f"{name}: bias must be float32 [n_routed], got {bias.dtype} {tuple(bias.shape)}")


def check_block_weights(x, w_gate, w_up, w_down, shared_blocks, n_blocks, name: str = "sparse_ffn_blocks_fwd"):
    """x [T, d_model] and the FFN weights: dtypes, [d_ff, d_model] / [d_model, d_ff] shapes, n_blocks | d_ff."""
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [T, d_model], got {tuple(x.shape)}")
    T, D = x.shape
    for arg, t in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name}: dtype mismatch: {arg} is {t.dtype} but x is {x.dtype}")
    if n_blocks < 1 or w_gate.dim() != 2 or w_gate.shape[0] % n_blocks:
        raise ValueError(f"{name}: d_ff ({w_gate.shape[0] if w_gate.dim() else '?'}) must be divisible by "
                         f"n_blocks ({n_blocks})")
    F_ = w_gate.shape[0]
    if w_gate.shape != (F_, D) or w_up.shape != (F_, D) or w_down.shape != (D, F_):
        raise ValueError(f"{name}: expected w_gate, w_up [d_ff, d_model] and w_down [d_model, d_ff] with "
                         f"d_model={D}, got {tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}")
    if not 0 <= shared_blocks <= n_blocks:
        raise ValueError(f"{name}: shared_blocks must be in [0, n_blocks={n_blocks}], got {shared_blocks}")


def check_blocks_op_args(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks) -> None:
    name = "sparse_ffn_blocks_fwd"
    check_block_weights(x, w_gate, w_up, w_down, shared_blocks, n_blocks, name)
    T = x.shape[0]
    if idx.dtype != torch.int32 or idx.dim() != 2 or idx.shape[0] != T or weights.shape != idx.shape:
        raise ValueError(f"{name}: idx must be int32 [T, k] with T={T} and weights [T, k], got {idx.dtype} "
                         f"{tuple(idx.shape)} and {tuple(weights.shape)}")
    if weights.dtype != torch.float32:
        raise ValueError(f"{name}: weights must be float32, got {weights.dtype}")
    # Data check of the ids, in eager on plain tensors only (fake/functional tensors while tracing have
    # no data), and on CUDA only with DSK_CHECK_ROUTING=1: there it would cost a host sync per call.
    # Unchecked, an invalid id never touches memory: the kernels drop it from every block and give its
    # token a NaN output row (and NaN dx), see ``group_pairs``. The public function's idx is valid by
    # construction.
    if (not torch.compiler.is_compiling() and type(idx) is torch.Tensor and idx.numel()
            and (not idx.is_cuda or _check_routing_on_device())):
        if int(idx.max()) >= n_blocks - shared_blocks or int(idx.min()) < -1:
            raise ValueError(f"{name}: idx entries must be routed block ids in [0, {n_blocks - shared_blocks}) "
                             f"or -1 (empty slot)")


# ---- torch implementations over the grouped layout (CPU forward, every backward) ----------------------


def _grouping(idx, weights, shared_blocks, n_blocks, block_m=16):
    from deepseek_kernels.triton.sparse_ffn import full_routing, group_pairs

    blocks, w_full = full_routing(idx, weights, shared_blocks)
    return blocks, w_full, group_pairs(blocks, n_blocks, block_m)


def _blocks_fwd_torch(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks, save_act):
    """Traceable CPU fallback: the reference output, the dense pre-activations gathered into the grouped layout
    for ``act``, and the grouping packed as the Triton path packs it (its backward groups on its own, but the
    plan's shape must not depend on the path: a graph compiled on the torch path runs the op on the Triton one
    under the interpreter)."""
    from deepseek_kernels.triton.sparse_ffn import fwd_block_m, pack_plan

    out = sparse_ffn_blocks_ref(x, w_gate, w_up, w_down, idx, weights, n_blocks=n_blocks, shared_blocks=shared_blocks)
    BS = w_gate.shape[0] // n_blocks
    if not save_act:
        return out, x.new_empty(0, 2, BS), x.new_empty(0, dtype=torch.int32)
    T = x.shape[0]
    blocks, w_full, g = _grouping(idx, weights, shared_blocks, n_blocks, fwd_block_m(x, w_gate, n_blocks))
    xf = x.float()
    a = (xf @ w_gate.float().t()).to(x.dtype).view(T, n_blocks, BS)
    u = (xf @ w_up.float().t()).to(x.dtype).view(T, n_blocks, BS)
    blk = blocks.reshape(-1)[g.order].long().clamp(0, n_blocks - 1)  # empty slots sort last: unused rows
    tok = g.sorted_tok.long()
    return out, torch.stack([a[tok, blk], u[tok, blk]], dim=1), pack_plan(g, w_full, w_full.reshape(-1)[g.order])


def _blocks_bwd_torch(grad_out, x, w_gate, w_up, w_down, idx, weights, act, shared_blocks, n_blocks):
    """Backward over the grouped layout, one block at a time (matmuls in x's dtype, fp32 accumulate;
    the SwiGLU derivative in fp32). With ``g = grad_out[t] . w_down[:, block]`` per pair:
    ``dweight = g . h``, ``dh = weight * g``, ``da = dh * u * silu'(a)``, ``du = dh * silu(a)``,
    ``dW_down[:, block] += (weight * grad_out[t])^T h``, ``dW_gate[block] += da^T x[t]``,
    ``dW_up[block] += du^T x[t]``, ``dx[t] += da . W_gate[block] + du . W_up[block]``."""
    T, D = x.shape
    dt = x.dtype
    BS = w_gate.shape[0] // n_blocks
    blocks, w_full, g = _grouping(idx, weights, shared_blocks, n_blocks)
    KT = blocks.shape[1]
    P = T * KT
    offs = g.offsets.tolist()  # host sync: this backward loops over the blocks on the host
    tok = g.sorted_tok.long()
    w_sorted = w_full.reshape(-1)[g.order]
    grad_out = grad_out.to(dt)
    dx_rows = x.new_empty(P, D)
    dweight_sorted = torch.zeros(P, dtype=torch.float32, device=x.device)
    dwg, dwu, dwd = torch.zeros_like(w_gate), torch.zeros_like(w_up), torch.zeros_like(w_down)
    for b in range(n_blocks):
        lo, hi = offs[b], offs[b + 1]
        if lo == hi:
            continue
        f = slice(b * BS, (b + 1) * BS)
        t = tok[lo:hi]
        xs, go = x[t], grad_out[t]
        a, u = act[lo:hi, 0].float(), act[lo:hi, 1].float()
        s = torch.sigmoid(a)
        silu = a * s
        h = silu * u
        gp = (go @ w_down[:, f]).float()
        dweight_sorted[lo:hi] = (gp * h).sum(-1)
        w = w_sorted[lo:hi, None]
        dh = gp * w
        da = (dh * u * s * (1 + a * (1 - s))).to(dt)
        du = (dh * silu).to(dt)
        dwd[:, f] = (go.float() * w).to(dt).t() @ h.to(dt)
        dwg[f] = da.t() @ xs
        dwu[f] = du.t() @ xs
        dx_rows[lo:hi] = da @ w_gate[f] + du @ w_up[f]
    valid = g.inv >= 0
    pos = g.inv.clamp_min(0)
    dx = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for j in range(KT):  # a gather per slot: deterministic, no atomics
        dx += torch.where(valid[:, j, None], dx_rows[pos[:, j]].float(), 0.0)
    dweights = torch.where(valid, dweight_sorted[pos], 0.0)[:, shared_blocks:]
    return dx.to(dt), dwg, dwu, dwd, dweights.to(weights.dtype).contiguous()


# ---- ops -----------------------------------------------------------------------------------------


def _eager_decode(x2: torch.Tensor, *tensors) -> bool:
    """Whether gated_sparse_ffn may launch the decode kernels directly (few tokens, CUDA, plain
    eager call: see ``ops._registry.eager_fast_path``)."""
    from deepseek_kernels.triton.sparse_ffn import DECODE_MAX_TOKENS

    return 0 < x2.shape[0] <= DECODE_MAX_TOKENS and eager_fast_path(x2, *tensors)


@define_triton_op("deepseek_kernels::sparse_ffn_route")
def _route_op(x: torch.Tensor, router_weight: torch.Tensor, bias: torch.Tensor | None, k: int, gate: str,
              weighting: str, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_route_op_args(x, router_weight, bias, k, gate, weighting)
    if _use_triton(x):
        from deepseek_kernels.triton._common import plain_eager
        from deepseek_kernels.triton.sparse_ffn import sparse_ffn_route

        idx, weights, probs = sparse_ffn_route(x, router_weight, k=k, gate=gate, weighting=weighting, bias=bias,
                                               threshold=threshold, direct=plain_eager(x))
        return weights, probs, idx
    idx, weights, probs = route_ref(x, router_weight, k=k, gate=gate, weighting=weighting, bias=bias,
                                    threshold=threshold)
    return weights.float().contiguous(), probs.float().contiguous(), idx


@define_triton_op("deepseek_kernels::sparse_ffn_blocks_fwd")
def _blocks_fwd_op(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   idx: torch.Tensor, weights: torch.Tensor, shared_blocks: int, n_blocks: int,
                   save_act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_blocks_op_args(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks)
    if _use_triton(x):
        from deepseek_kernels.triton._common import plain_eager
        from deepseek_kernels.triton.sparse_ffn import (
            DECODE_MAX_TOKENS,
            fwd_block_m,
            pack_plan,
            route_pairs,
            sparse_ffn_decode,
            sparse_ffn_fwd,
        )

        if not save_act and x.shape[0] <= DECODE_MAX_TOKENS:  # decode: read only the used blocks' slices
            out = sparse_ffn_decode(x, w_gate, w_up, w_down, idx, weights, shared_blocks=shared_blocks,
                                    n_blocks=n_blocks)
            return out, x.new_empty(0, 2, w_gate.shape[0] // n_blocks), x.new_empty(0, dtype=torch.int32)
        # training: the grouping is made here and packed for the backward op, which then need not group again
        routed = route_pairs(idx, weights, shared_blocks, n_blocks, fwd_block_m(x, w_gate, n_blocks),
                             plain_eager(x)) if save_act else None
        out, act, _ = sparse_ffn_fwd(x, w_gate, w_up, w_down, idx, weights, shared_blocks=shared_blocks,
                                     n_blocks=n_blocks, save_act=save_act, routed=routed)
        return out, act, (pack_plan(*routed) if save_act else x.new_empty(0, dtype=torch.int32))
    return _blocks_fwd_torch(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks, save_act)


# An opaque custom op (never traced): the CPU fallback loops over blocks on the host (data-dependent
# sizes); the Triton path is sync-free and runs as one extern call under torch.compile.
@torch.library.custom_op("deepseek_kernels::sparse_ffn_blocks_bwd", mutates_args=())
def _blocks_bwd_op(grad_out: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, act: torch.Tensor,
                   plan: torch.Tensor, shared_blocks: int, n_blocks: int, plan_block_m: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``plan``: the forward op's packed grouping (grouped at ``plan_block_m``), or empty: group again."""
    if _use_triton(x):
        from deepseek_kernels.triton.sparse_ffn import sparse_ffn_bwd, unpack_plan

        routed = None
        if plan.numel():
            routed = unpack_plan(plan, x.shape[0], shared_blocks + idx.shape[1], n_blocks, plan_block_m)
        dx, dwg, dwu, dwd, dweights = sparse_ffn_bwd(grad_out, x, w_gate, w_up, w_down, idx, weights, act,
                                                     shared_blocks=shared_blocks, n_blocks=n_blocks, routed=routed)
        return dx, dwg, dwu, dwd, dweights.to(weights.dtype)
    return _blocks_bwd_torch(grad_out, x, w_gate, w_up, w_down, idx, weights, act, shared_blocks, n_blocks)


@_blocks_bwd_op.register_fake
def _(grad_out, x, w_gate, w_up, w_down, idx, weights, act, plan, shared_blocks, n_blocks, plan_block_m):
    return (torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(w_up), torch.empty_like(w_down),
            torch.empty_like(weights))


if not TRITON_OP:

    @_route_op.register_fake
    def _(x, router_weight, bias, k, gate, weighting, threshold):
        check_route_op_args(x, router_weight, bias, k, gate, weighting)
        T = x.shape[0]
        return (x.new_empty((T, k), dtype=torch.float32), x.new_empty((T, router_weight.shape[0]), dtype=torch.float32),
                x.new_empty((T, k), dtype=torch.int32))

    @_blocks_fwd_op.register_fake
    def _(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks, save_act):
        check_blocks_op_args(x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks)
        T, KT = x.shape[0], shared_blocks + idx.shape[1]
        P = T * KT if save_act else 0
        n_plan = 0
        if save_act:
            from deepseek_kernels.triton.sparse_ffn import fwd_block_m, plan_numel

            n_plan = plan_numel(T, KT, n_blocks, fwd_block_m(x, w_gate, n_blocks))
        return (torch.empty_like(x), x.new_empty((P, 2, w_gate.shape[0] // n_blocks)),
                x.new_empty(n_plan, dtype=torch.int32))


def _route_setup_context(ctx, inputs, output):
    x, router_weight, bias, k, gate, weighting, threshold = inputs
    weights, probs, idx = output
    ctx.save_for_backward(x, router_weight, idx, weights, probs)
    ctx.gate, ctx.weighting = gate, weighting
    ctx.mark_non_differentiable(idx)
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as a tensor of zeros


def _route_backward(ctx, grad_weights, grad_probs, _grad_idx):
    from deepseek_kernels.triton._common import plain_eager

    if grad_weights is None and grad_probs is None:
        return None, None, None, None, None, None, None
    x, router_weight, idx, weights, probs = ctx.saved_tensors
    bf16 = x.dtype == torch.bfloat16 and router_weight.dtype == torch.bfloat16
    if _use_triton(probs) and plain_eager(probs):
        # dlogits in one kernel (the torch form below is ~15 small launches: host time in eager); while
        # torch.compile traces this backward, the torch form, which inductor fuses itself
        from deepseek_kernels.triton.sparse_ffn import route_backward_logits

        dlogits = route_backward_logits(probs, idx, weights, grad_weights if ctx.weighting == "gate" else None,
                                        grad_probs, ctx.gate, torch.bfloat16 if bf16 else torch.float32,
                                        direct=True)
        return _router_input_grads(dlogits, x, router_weight, bf16)
    dp = torch.zeros_like(probs) if grad_probs is None else grad_probs.float().clone()
    if grad_weights is not None and ctx.weighting == "gate":
        # weights_j = p_j / S over the chosen (valid) slots: dp_j += (dw_j - sum_i dw_i w_i) / S
        valid = idx >= 0
        chosen_p = probs.gather(1, idx.long().clamp_min(0)) * valid
        total = chosen_p.sum(-1, keepdim=True)
        inv_total = torch.where(total > 0, 1.0 / torch.where(total > 0, total, 1.0), 0.0)
        dw = grad_weights.float()
        d_chosen = (dw - (dw * weights).sum(-1, keepdim=True)) * inv_total * valid
        dp = dp.scatter_add(1, idx.long().clamp_min(0), d_chosen)
    if ctx.gate == "sigmoid":
        dlogits = dp * probs * (1 - probs)
    else:
        dlogits = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    return _router_input_grads(dlogits.to(torch.bfloat16) if bf16 else dlogits, x, router_weight, bf16)


def _router_input_grads(dlogits, x, router_weight, bf16: bool):
    """(dx, d router_weight, None x 5) from the router's dlogits [T, NR] (bf16 when ``bf16``, else fp32)."""
    if bf16:
        # what a bf16 nn.Linear router's backward does: bf16 operands, fp32 accumulation, results in bf16 (as
        # before); no fp32 copy of x ([T, d_model]) and no fp32 GEMMs (H200, T8192: ~0.33 ms of the 9.2 ms step,
        # session 16's diag_sparse_train profile: the copy ~0.1 ms, two fp32 GEMMs ~0.23 ms)
        return dlogits @ router_weight, dlogits.t() @ x, None, None, None, None, None
    dx = (dlogits @ router_weight.float()).to(x.dtype)
    dwr = (dlogits.t() @ x.float()).to(router_weight.dtype)
    return dx, dwr, None, None, None, None, None


def _blocks_setup_context(ctx, inputs, output):
    x, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks, save_act = inputs
    _, act, plan = output
    ctx.save_for_backward(x, w_gate, w_up, w_down, idx, weights, act, plan)
    ctx.shared_blocks, ctx.n_blocks, ctx.save_act = shared_blocks, n_blocks, save_act
    ctx.plan_block_m = 0
    if plan.numel():  # the row tile the forward grouped with (the plan's tile table depends on it)
        from deepseek_kernels.triton.sparse_ffn import fwd_block_m

        ctx.plan_block_m = fwd_block_m(x, w_gate, n_blocks)
    ctx.mark_non_differentiable(act, plan)
    # act's gradient (never used) arrives as None rather than as zeros of act's shape: [P, 2, BS], written every
    # step (H200, T8192 ratio 0.3: a 139 MB fill, ~42 us of the training step's profile, session 32)
    ctx.set_materialize_grads(False)


def _blocks_backward(ctx, grad_out, _grad_act, _grad_plan):
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None
    x, w_gate, w_up, w_down, idx, weights, act, plan = ctx.saved_tensors
    if not ctx.save_act:
        raise RuntimeError(f"{NAME}: backward needs the activations, but the forward ran with save_act=False")
    dx, dwg, dwu, dwd, dweights = torch.ops.deepseek_kernels.sparse_ffn_blocks_bwd(
        grad_out.contiguous(), x, w_gate, w_up, w_down, idx, weights, act, plan, ctx.shared_blocks, ctx.n_blocks,
        ctx.plan_block_m)
    return dx, dwg, dwu, dwd, None, dweights, None, None, None


torch.library.register_autograd("deepseek_kernels::sparse_ffn_route", _route_backward,
                                setup_context=_route_setup_context)
torch.library.register_autograd("deepseek_kernels::sparse_ffn_blocks_fwd", _blocks_backward,
                                setup_context=_blocks_setup_context)


# ---- public function -------------------------------------------------------------------------------


@dataclass
class SparseRouting:
    """What the router chose for each token (``return_routing=True``).

    ``idx`` int32 ``[T, k]`` routed block ids in ``[0, n_routed)`` (-1: empty slot, threshold mode),
    ``weights`` fp32 ``[T, k]`` (differentiable), ``probs`` fp32 ``[T, n_routed]`` gate values
    (differentiable: the aux loss uses them), ``k`` routed slots per token, ``shared_blocks``."""

    idx: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None
    k: int
    shared_blocks: int


def gated_sparse_ffn(
    x: torch.Tensor, router_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, *,
    active_ratio: float, shared_blocks: int = 0, gate: str = "sigmoid", weighting: str = "gate",
    bias: torch.Tensor | None = None, threshold: float | None = None, return_routing: bool = False,
):
    """Routed neuron-block SwiGLU FFN, differentiable in x, router_weight and the three FFN weights.

    ``x [..., d_model]``; ``router_weight [n_routed, d_model]``; Llama layout ``w_gate, w_up
    [d_ff, d_model]``, ``w_down [d_model, d_ff]``; ``n_blocks = n_routed + shared_blocks`` must divide
    ``d_ff``. Each token runs ``n_active(active_ratio, n_blocks)`` blocks: the shared ones (blocks
    ``0..shared_blocks-1``) and the top routed ones by ``gate(x . router_weight^T) + bias`` (bias:
    selection only; ``threshold``: only blocks whose gate exceeds it, at most that many). Chosen blocks
    are scaled by their gate normalised over the chosen blocks (``weighting="gate"``) or by 1
    (``"none"``). Returns ``out [..., d_model]`` (and a :class:`SparseRouting` with ``return_routing``).
    Forward, backward and decode are deterministic (no atomics: the same inputs give the same bits).
    Exact definition: ``deepseek_kernels.reference.sparse_ffn``.
    """
    check_args(x, router_weight, w_gate, w_up, w_down, active_ratio=active_ratio, shared_blocks=shared_blocks,
               gate=gate, weighting=weighting, bias=bias, threshold=threshold)
    lead, d_model = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, d_model)
    n_blocks = router_weight.shape[0] + shared_blocks
    k = n_active(active_ratio, n_blocks) - shared_blocks
    threshold = None if threshold is None else float(threshold)
    if w_up.stride() != w_gate.stride():  # the gate/up kernel walks both with one set of strides
        w_gate, w_up = w_gate.contiguous(), w_up.contiguous()
    save_act = torch.is_grad_enabled() and any(
        t.requires_grad for t in (x, router_weight, w_gate, w_up, w_down))
    if not save_act and k > 0 and _eager_decode(x2, router_weight, w_gate, w_up, w_down, bias):
        # decode in a plain eager call: the router and the two decode kernels launched directly
        # (the dispatcher costs more than these kernels); the same kernels the ops run
        from deepseek_kernels.triton import sparse_ffn as tk

        check_route_op_args(x2, router_weight, bias, k, gate, weighting)
        pdl = pdl_enabled(x2, "sparse_decode")
        if x2.shape[0] in tk.FUSED_ROUTE_TOKENS and x2.shape[0] <= tk.FUSED_ROUTE_BLOCK_TS:
            # the router's selection inside the gate/up kernel: one launch fewer, the same bits
            check_block_weights(x2, w_gate, w_up, w_down, shared_blocks, n_blocks)
            out, idx, weights, probs = tk.sparse_ffn_route_decode(
                x2, router_weight, w_gate, w_up, w_down, k=k, gate=gate, weighting=weighting,
                shared_blocks=shared_blocks, bias=bias, threshold=threshold, direct=True, pdl=pdl)
            out = out.reshape(*lead, d_model)
            return (out, SparseRouting(idx, weights, probs, k, shared_blocks)) if return_routing else out
        idx, weights, probs = tk.sparse_ffn_route(x2, router_weight, k=k, gate=gate, weighting=weighting, bias=bias,
                                                  threshold=threshold, direct=True, pdl=pdl)
        check_blocks_op_args(x2, w_gate, w_up, w_down, idx, weights, shared_blocks, n_blocks)
        out = tk.sparse_ffn_decode(x2, w_gate, w_up, w_down, idx, weights, shared_blocks=shared_blocks,
                                   n_blocks=n_blocks, direct=True, pdl=pdl).reshape(*lead, d_model)
        return (out, SparseRouting(idx, weights, probs, k, shared_blocks)) if return_routing else out
    if k > 0:
        weights, probs, idx = torch.ops.deepseek_kernels.sparse_ffn_route(x2, router_weight, bias, k, gate, weighting,
                                                                          threshold)
    else:
        idx = x2.new_empty((x2.shape[0], 0), dtype=torch.int32)
        weights = x2.new_empty((x2.shape[0], 0), dtype=torch.float32)
        probs = None
    out, _, _ = torch.ops.deepseek_kernels.sparse_ffn_blocks_fwd(x2, w_gate, w_up, w_down, idx, weights,
                                                                shared_blocks, n_blocks, save_act)
    out = out.reshape(*lead, d_model)
    if return_routing:
        return out, SparseRouting(idx, weights, probs, k, shared_blocks)
    return out


def _describe(device: torch.device) -> str:
    bwd = ("backward: Triton grouped GEMMs (SwiGLU derivative fused, per-block dW, deterministic, no host "
           "sync)")
    if device.type == "cuda":
        return (f"triton: deepseek_kernels.triton.sparse_ffn on {device} (fused router, grouped gate/up GEMM + "
                f"SwiGLU, grouped down GEMM, weighted combine; without grad and <= 16 tokens the decode kernels "
                f"read only the used blocks' weight slices; untuned); {bwd}")
    if interpreting():
        return f"triton: deepseek_kernels.triton.sparse_ffn under the Triton interpreter (TRITON_INTERPRET=1); {bwd}"
    return ("reference: deepseek_kernels.reference.sparse_ffn (tensors on the CPU: dense masked FFN); backward "
            "in torch over the grouped layout (one matmul per block)")


def _explain(x, *args, **kwargs):
    return _describe(x.device)


register_explainer(NAME, _explain, _describe)
