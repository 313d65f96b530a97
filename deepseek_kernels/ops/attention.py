"""Sliding-window attention op: ``deepseek_kernels.window_attention`` (forward + backward).

``deepseek_kernels::window_attention_fwd`` / ``window_attention_bwd`` run the Triton kernels of
``deepseek_kernels.triton.window_attention`` on CUDA tensors (and on CPU under the Triton
interpreter); on CPU otherwise, the reference (closed-form backward, ``window_attention_bwd_ref``). The exact
semantics are in ``deepseek_kernels/reference/attention.py``.
"""

import torch

from deepseek_kernels.ops._registry import TRITON_OP, define_triton_op, interpreting, register_explainer, use_triton
from deepseek_kernels.reference.attention import window_attention_bwd_ref, window_attention_ref

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_qkv(name: str, q, k, v, packed: bool) -> None:
    """The checks every attention op shares: tensors of one float dtype on one device, the dense
    ``[batch, seq, heads, head_dim]`` or packed ``[total, heads, head_dim]`` layout, k and v alike,
    one head dim in [1, MAX_HEAD_DIM], query heads a multiple of the key/value heads."""
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{name}: q, k, v must share one dtype among float16/bfloat16/float32, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    want = 3 if packed else 4
    layout = "[total, heads, head_dim] with cu_seqlens" if packed else "[batch, seq, heads, head_dim]"
    for arg, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name}: {arg} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{name}: head dims differ: q has {d}, k has {k.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"{name}: head_dim must be in [1, {MAX_HEAD_DIM}], got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"{name}: the query heads ({hq}) must be a multiple of the key/value heads ({hkv})")
    if not packed and q.shape[0] != k.shape[0]:
        raise ValueError(f"{name}: batch sizes differ: q has {q.shape[0]}, k has {k.shape[0]}")


def check_cu_seqlens(name: str, arg: str, cu, total: int, device) -> None:
    """``cu`` is a 1-D int32 ``[num_seqs + 1]`` tensor on ``device``; in eager mode also that it
    starts at 0, never decreases and ends at the packed length ``total``."""
    if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name}: {arg} must be a 1-D int32 tensor [num_seqs + 1], got {cu.dtype} {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: {arg} must be on {device}, got {cu.device}")
    if not torch.compiler.is_compiling():  # data-dependent: checked in eager only
        if int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()) or int(cu[-1]) != total:
            raise ValueError(f"{name}: {arg} must start at 0, never decrease and end at the packed length "
                             f"{total}, got {cu.tolist() if cu.numel() <= 16 else '...'}")


def check_args(q, k, v, window, sinks, cu_seqlens_q, cu_seqlens_k) -> None:
    name = "window_attention"
    packed = cu_seqlens_q is not None
    check_qkv(name, q, k, v, packed)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"{name}: window must be an int >= 1, got {window!r}")
    if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"{name}: sinks must be an int >= 0, got {sinks!r}")
    if (cu_seqlens_k is not None) and not packed:
        raise ValueError(f"{name}: cu_seqlens_k needs cu_seqlens_q")
    for arg, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if cu is not None:
            check_cu_seqlens(name, arg, cu, total, q.device)
    if packed and cu_seqlens_k is not None and cu_seqlens_k.numel() != cu_seqlens_q.numel():
        raise ValueError(f"{name}: cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")


def _max_len(cu):
    return int((cu[1:] - cu[:-1]).max()) if cu is not None and cu.numel() > 1 else None


def resolve_max_seqlen(name: str, arg: str, given, cu: torch.Tensor, cu_arg: str):
    """The longest sequence for a packed call: ``given`` if the caller passed one, else computed from
    ``cu``. The kernels size their grids by it, so in eager mode a ``given`` below the longest
    sequence (which would leave rows unwritten) is an error. Inside torch.compile the value is
    data-dependent: ``given`` is returned unchecked (None when not passed)."""
    if torch.compiler.is_compiling():
        return given
    longest = _max_len(cu)
    if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < longest):
        raise ValueError(f"{name}: {arg} must be an int >= the longest sequence in {cu_arg} ({longest}), "
                         f"got {given!r}; leave it None to have it computed")
    return longest if given is None else given


@define_triton_op("deepseek_kernels::window_attention_fwd")
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int, causal: bool,
            softmax_scale: float | None, cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
            max_seqlen_q: int | None, deterministic: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # `deterministic` only matters to the backward (saved for it by the autograd context)
    if use_triton(q):
        from deepseek_kernels.triton.window_attention import window_attention_fwd

        return window_attention_fwd(q, k, v, window=window, sinks=sinks, causal=causal, softmax_scale=softmax_scale,
                                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q)
    return torch.ops.deepseek_kernels.window_attention_fwd_ref(q, k, v, window, sinks, causal, softmax_scale,
                                                               cu_seqlens_q, cu_seqlens_k)


@define_triton_op("deepseek_kernels::window_attention_bwd")
def _bwd_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, window: int, sinks: int, causal: bool, softmax_scale: float | None,
            cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int | None,
            max_seqlen_k: int | None,
            deterministic: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if use_triton(q):
        from deepseek_kernels.triton.window_attention import window_attention_bwd

        return window_attention_bwd(grad_out, q, k, v, out, lse, window=window, sinks=sinks, causal=causal,
                                    softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                                    max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, deterministic=deterministic)
    return torch.ops.deepseek_kernels.window_attention_bwd_ref(grad_out, q, k, v, window, sinks, causal, softmax_scale,
                                                               cu_seqlens_q, cu_seqlens_k)


# The reference (the CPU path without the interpreter) as opaque ops of their own. On a machine with a GPU the
# ops above are triton_ops, whose bodies fake-tensor propagation and torch.compile trace; the reference's loop
# over sequences reads cu_seqlens' values (data-dependent: tracing a packed CPU call failed, session 18's
# device-generic run). Behind these ops tracing sees only their fake impls, and compiled graphs call them whole.
@torch.library.custom_op("deepseek_kernels::window_attention_fwd_ref", mutates_args=())
def _fwd_ref_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int, causal: bool,
                softmax_scale: float | None, cu_seqlens_q: torch.Tensor | None,
                cu_seqlens_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = window_attention_ref(q, k, v, window=window, sinks=sinks, causal=causal, softmax_scale=softmax_scale,
                                    cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, return_lse=True)
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("deepseek_kernels::window_attention_bwd_ref", mutates_args=())
def _bwd_ref_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                causal: bool, softmax_scale: float | None, cu_seqlens_q: torch.Tensor | None,
                cu_seqlens_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = window_attention_bwd_ref(grad_out, q, k, v, window=window, sinks=sinks, causal=causal,
                                          softmax_scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                          cu_seqlens_k=cu_seqlens_k)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


# The Gluon Hopper forward (deepseek_kernels/triton/window_attention_sm90.py) as an opaque op: the
# window_attention_fwd triton_op's body calls it for the calls it supports on an sm_90 GPU. torch.compile traces
# the triton_op's body (its Triton launches through wrap_triton) and keeps this op whole: inductor does not
# take Gluon kernels as user-defined Triton kernels.
@torch.library.custom_op("deepseek_kernels::window_attention_fwd_sm90", mutates_args=())
def _fwd_sm90_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                 softmax_scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    from deepseek_kernels.triton import window_attention_sm90

    if not window_attention_sm90.aligned(q, k, v):  # TMA needs 16-byte aligned bases: the Triton forward, same function
        from deepseek_kernels.triton.window_attention import window_attention_fwd

        out, lse = window_attention_fwd(q, k, v, window=window, sinks=sinks, softmax_scale=softmax_scale, sm90=False)
        return out.contiguous(), lse
    return window_attention_sm90.window_attention_fwd_sm90(q, k, v, window=window, sinks=sinks,
                                                           softmax_scale=softmax_scale)


@_fwd_sm90_op.register_fake
def _(q, k, v, window, sinks, softmax_scale):
    B, S, Hq, D = q.shape  # lse: a [B, Hq, S] view of a [Hq, B * S] buffer, as the kernel returns it
    lse = q.new_empty((Hq, B * S), dtype=torch.float32).view(Hq, B, S).transpose(0, 1)
    return q.new_empty((B, S, Hq, D)), lse


@torch.library.custom_op("deepseek_kernels::window_attention_bwd_sm90", mutates_args=())
def _bwd_sm90_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 lse: torch.Tensor, window: int, sinks: int, softmax_scale: float | None,
                 deterministic: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from deepseek_kernels.triton import window_attention_sm90

    if not window_attention_sm90.aligned(q, k, v):  # TMA needs 16-byte aligned bases: the Triton backward
        from deepseek_kernels.triton.window_attention import window_attention_bwd

        dq, dk, dv = window_attention_bwd(grad_out, q, k, v, out, lse, window=window, sinks=sinks,
                                          softmax_scale=softmax_scale, deterministic=deterministic, sm90=False)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()
    return window_attention_sm90.window_attention_bwd_sm90(grad_out, q, k, v, out, lse, window=window, sinks=sinks,
                                                           softmax_scale=softmax_scale, deterministic=deterministic)


@_bwd_sm90_op.register_fake
def _(grad_out, q, k, v, out, lse, window, sinks, softmax_scale, deterministic=True):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fwd_fake(q, cu_seqlens_q):
    """(out, lse) of the forward: lse [B, Hq, S] dense, [Hq, total] packed."""
    if cu_seqlens_q is None:
        lse = q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)
    else:
        lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    return torch.empty_like(q), lse


@_fwd_ref_op.register_fake
def _(q, k, v, window, sinks, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k):
    return _fwd_fake(q, cu_seqlens_q)


def _grads_fake(grad_out, q, k, v, *args):
    """(dq, dk, dv) of a backward op (the ops' and the reference ops' arguments start alike)."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_bwd_ref_op.register_fake(_grads_fake)


if not TRITON_OP:

    @_fwd_op.register_fake
    def _(q, k, v, window, sinks, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, deterministic=None):
        return _fwd_fake(q, cu_seqlens_q)

    _bwd_op.register_fake(_grads_fake)


def _setup_context(ctx, inputs, output):
    q, k, v, window, sinks, causal, softmax_scale, cu_q, cu_k, max_q, deterministic = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.params = (window, sinks, causal, softmax_scale, max_q, deterministic)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    window, sinks, causal, softmax_scale, max_q, deterministic = ctx.params
    max_k = None if cu_k is None else _max_len(cu_k)
    dq, dk, dv = torch.ops.deepseek_kernels.window_attention_bwd(
        grad_out.contiguous(), q, k, v, out, lse, window, sinks, causal, softmax_scale, cu_q, cu_k, max_q, max_k,
        deterministic)
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd("deepseek_kernels::window_attention_fwd", _backward, setup_context=_setup_context)


def window_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window: int, sinks: int = 0, causal: bool = True,
    softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None, max_seqlen_k: int | None = None,
    return_lse: bool = False, deterministic: bool | None = None,
):
    """Token-exact sliding-window attention (FlashAttention layout), differentiable in q, k, v.

    ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (``Hq`` a multiple of ``Hkv``), or packed
    ``[total, H, D]`` with ``cu_seqlens_q`` / ``cu_seqlens_k`` (int32, ``[n + 1]``). Causal: query at
    position ``p`` (ends aligned when ``Sq != Sk``) attends key ``j`` iff ``p - window < j <= p`` or
    ``j < sinks`` (and ``j <= p``); ``causal=False``: ``|p - j| < window`` or ``j < sinks``.
    Returns ``out`` like ``q``, and with ``return_lse`` also the natural-log log-sum-exp, float32,
    ``[B, Hq, Sq]`` (``[Hq, total]`` packed; not differentiable). Exact definition:
    ``deepseek_kernels.reference.attention``.

    ``deterministic`` (backward only): ``True`` gives bit-identical gradients run to run (two kernels, no
    atomics); ``False`` lets one kernel accumulate dQ in fp32 (fewer matmuls; dQ's last bits vary between runs):
    on the H200 (head dims 64 and 128) the Gluon kernel of ``window_attention_sm90`` adds each tile's dQ by a TMA
    reduce-add (the backward ~1.5x faster than the deterministic one), else the Triton kernel with atomics.
    ``None`` (default) picks the faster one for the call: that Gluon kernel where it applies (sm_90, the causal
    dense calls the Hopper forward takes: head dims 64 and 128), else the deterministic kernels (the Triton atomics
    measured slower than them on the H200). Pass ``True`` where training must be bitwise reproducible.
    """
    check_args(q, k, v, window, sinks, cu_seqlens_q, cu_seqlens_k)
    if cu_seqlens_q is not None:
        name = "window_attention"
        max_seqlen_q = resolve_max_seqlen(name, "max_seqlen_q", max_seqlen_q, cu_seqlens_q, "cu_seqlens_q")
        if max_seqlen_k is not None:  # only checked: the backward takes the key lengths from cu_seqlens_k
            cu_k, cu_k_arg = ((cu_seqlens_q, "cu_seqlens_q") if cu_seqlens_k is None
                              else (cu_seqlens_k, "cu_seqlens_k"))
            resolve_max_seqlen(name, "max_seqlen_k", max_seqlen_k, cu_k, cu_k_arg)
    out, lse = torch.ops.deepseek_kernels.window_attention_fwd(
        q, k, v, window, sinks, causal, softmax_scale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
        None if deterministic is None else bool(deterministic))
    return (out, lse) if return_lse else out


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return (f"triton: deepseek_kernels.triton.window_attention on {device} (fwd + bwd; launch shapes tuned on "
                f"the H200 for D=128); on sm_90 the causal dense forward with D 64/128 in bf16/fp16 runs the Gluon "
                f"kernel of deepseek_kernels.triton.window_attention_sm90 (DSK_ATTN_SM90=0 turns it off), and its "
                f"default backward (deterministic=None) the one-kernel Gluon backward with dQ by TMA reduce-adds "
                f"(deterministic=True or DSK_ATTN_SM90_FUSED=0: two deterministic Gluon kernels; DSK_ATTN_SM90_BWD=0: "
                f"the Triton ones)")
    if interpreting():
        return "triton: deepseek_kernels.triton.window_attention under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.reference.attention (tensors on the CPU)"


def _explain(q, *args, **kwargs):
    return _describe(q.device)


register_explainer("window_attention", _explain, _describe)
