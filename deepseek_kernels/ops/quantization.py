"""Blockwise INT8/FP8 quantization ops: registration, fake impls, autograd, public functions.

``deepseek_kernels::quantize_blockwise`` and ``deepseek_kernels::dequantize_blockwise`` run the
CUDA kernels of ``csrc/quantization`` on CUDA tensors and the reference
(``deepseek_kernels.reference.quantization``) on CPU tensors; ``explain`` says which. So do the
three ops of the DDP hook's pipeline: ``quantize_blockwise_into`` (quantize into a zero-padded
send buffer), ``dequantize_sum_blockwise`` (sum of W quantized shards in fp32, fixed order) and
``requantize_sum_blockwise`` (that sum re-quantized with error feedback, one kernel).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from deepseek_kernels import _extension
from deepseek_kernels.ops._registry import LIB, define, op, register_explainer
from deepseek_kernels.reference.quantization import (
    FORMAT_OF_DTYPE,
    FORMATS,
    dequantize_blockwise_ref,
    dequantize_sum_blockwise_ref,
    quantize_blockwise_into_ref,
    quantize_blockwise_ref,
    requantize_sum_blockwise_ref,
    stochastic_key,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED_LIMIT = 2**63

# Keep in sync with csrc/bindings.cpp (tests/test_build.py compares them when the extension is built).
QUANTIZE_SCHEMA = (
    "(Tensor x, str fmt, int block, bool stochastic, int seed, Tensor(a!)? error) -> (Tensor, Tensor)"
)
DEQUANTIZE_SCHEMA = "(Tensor q, Tensor scales, int block, ScalarType out_dtype) -> Tensor"

QUANTIZE_INTO_SCHEMA = (
    "(Tensor x, str fmt, int block, bool stochastic, int seed, Tensor(a!)? error, Tensor(b!) q_out, "
    "Tensor(c!) scales_out, Tensor? key=None) -> ()"
)
DEQUANTIZE_SUM_SCHEMA = "(Tensor q, Tensor scales, int block, bool average, ScalarType out_dtype) -> Tensor"
REQUANTIZE_SUM_SCHEMA = (
    "(Tensor q, Tensor scales, int block, bool average, bool stochastic, int seed, Tensor(a!)? error, "
    "Tensor? key=None) -> (Tensor, Tensor)"
)
SCHEMAS = {
    "quantize_blockwise": QUANTIZE_SCHEMA,
    "dequantize_blockwise": DEQUANTIZE_SCHEMA,
    "quantize_blockwise_into": QUANTIZE_INTO_SCHEMA,
    "dequantize_sum_blockwise": DEQUANTIZE_SUM_SCHEMA,
    "requantize_sum_blockwise": REQUANTIZE_SUM_SCHEMA,
}
for _name, _schema in SCHEMAS.items():
    define(_name, _schema)


# ---- argument checks (shared by the public functions and the Python kernels) ----------------


def _num_blocks(n, block):
    return (n + block - 1) // block


def check_block(name: str, block, n) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or block % 16:
        raise ValueError(f"{name}: block must be a positive multiple of 16, got {block!r}")
    limit = max(16, _num_blocks(n, 16) * 16)
    if block > limit:
        raise ValueError(
            f"{name}: block={block} is larger than the last dimension ({n}) allows: use a block of at "
            f"most {limit} (the last dimension rounded up to a multiple of 16), or flatten/pad the input"
        )


def _check_x_and_fmt(name, x, fmt) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"{name}: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16, got {x.dtype}")


def check_quantize_args(x, fmt, block, error) -> None:
    name = "quantize_blockwise"
    _check_x_and_fmt(name, x, fmt)
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got a 0-d tensor")
    check_block(name, block, x.shape[-1])
    _check_error(name, error, x.shape, x.device)


def _check_code_tensors(name, q, scales) -> None:
    for arg, t in (("q", q), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FORMAT_OF_DTYPE:
        raise ValueError(f"{name}: q must be int8, float8_e4m3fn or float8_e5m2, got {q.dtype}")


def _check_scales(name, q, scales, block) -> None:
    """block fits q's last dim; scales are float32 on q's device, one per block of every row."""
    check_block(name, block, q.shape[-1])
    if scales.dtype != torch.float32:
        raise ValueError(f"{name}: scales must be float32, got {scales.dtype}")
    if scales.device != q.device:
        raise ValueError(f"{name}: scales must be on the device of q ({q.device}), got {scales.device}")
    expected = (*q.shape[:-1], _num_blocks(q.shape[-1], block))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"{name}: scales must have shape {expected} for q of shape {tuple(q.shape)} and block={block}, "
            f"got {tuple(scales.shape)}"
        )


def check_dequantize_args(q, scales, block, out_dtype) -> None:
    name = "dequantize_blockwise"
    _check_code_tensors(name, q, scales)
    if q.dim() < 1:
        raise ValueError(f"{name}: q must have at least one dimension, got a 0-d tensor")
    _check_scales(name, q, scales, block)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def _check_error(name, error, shape, device, of="x") -> None:
    if error is None:
        return
    if not isinstance(error, torch.Tensor):
        raise TypeError(f"{name}: error must be a torch.Tensor or None, got {type(error).__name__}")
    if error.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: error must be float32, bfloat16 or float16, got {error.dtype}")
    if tuple(error.shape) != tuple(shape):
        raise ValueError(f"{name}: error must have the shape of {of} {tuple(shape)}, got {tuple(error.shape)}")
    if error.device != device:
        raise ValueError(f"{name}: error must be on the device of {of.split()[0]} ({device}), got {error.device}")
    if not error.is_contiguous():
        raise ValueError(f"{name}: error is updated in place and must be contiguous; pass error.contiguous()")


def check_key(name, key, device) -> None:
    """The optional device-resident stochastic-rounding key: int32 [1] on the data's device."""
    if key is None:
        return
    if not isinstance(key, torch.Tensor):
        raise TypeError(f"{name}: key must be a torch.Tensor or None, got {type(key).__name__}")
    if key.dtype != torch.int32 or key.numel() != 1:
        raise ValueError(f"{name}: key must be an int32 tensor of one element (see key_value()), got {key.dtype} "
                         f"{tuple(key.shape)}")
    if key.device != device:
        raise ValueError(f"{name}: key must be on the device of the data ({device}), got {key.device}")


def key_value(seed: int) -> int:
    """The stochastic-rounding key of ``seed`` as the signed 32-bit value a ``key`` tensor holds
    (``key`` replaces the key the kernels derive from ``seed``; bit-identical results)."""
    k = stochastic_key(seed)
    return k - (1 << 32) if k >= 1 << 31 else k


def key_int(key):
    """The 32-bit key a ``key`` tensor holds (None for None): what the reference uses in its place."""
    return None if key is None else int(key.reshape(()).item()) & 0xFFFFFFFF


def check_sum_args(name, q, scales, block) -> None:
    """q [W, ..., N] codes and scales [W, ..., ceil(N / block)] of W quantized tensors."""
    _check_code_tensors(name, q, scales)
    if q.dim() < 2:
        raise ValueError(f"{name}: q must be [W, ..., N] (at least two dimensions), got shape {tuple(q.shape)}")
    if q.shape[0] < 1:
        raise ValueError(f"{name}: q must hold at least one tensor to sum (W >= 1), got shape {tuple(q.shape)}")
    _check_scales(name, q, scales, block)


def check_dequantize_sum_args(q, scales, block, out_dtype) -> None:
    check_sum_args("dequantize_sum_blockwise", q, scales, block)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_sum_blockwise: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


def check_requantize_sum_args(q, scales, block, error, key=None) -> None:
    name = "requantize_sum_blockwise"
    check_sum_args(name, q, scales, block)
    _check_error(name, error, q.shape[1:], q.device, of="q (one summand q[0])")
    check_key(name, key, q.device)


def check_quantize_into_args(x, fmt, block, error, q_out, scales_out, key=None) -> None:
    name = "quantize_blockwise_into"
    _check_x_and_fmt(name, x, fmt)
    if x.dim() != 1:
        raise ValueError(f"{name}: x must be 1-d [N], got shape {tuple(x.shape)}")
    for arg, t in (("q_out", q_out), ("scales_out", scales_out)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    code = FORMATS[fmt].dtype
    if q_out.dtype != code:
        raise ValueError(f"{name}: q_out must hold {fmt} codes ({code}), got {q_out.dtype}")
    if q_out.dim() != 1 or not q_out.is_contiguous():
        raise ValueError(f"{name}: q_out must be a contiguous 1-d buffer, got shape {tuple(q_out.shape)}")
    if q_out.shape[0] < x.shape[0]:
        raise ValueError(f"{name}: q_out must hold at least the {x.shape[0]} codes of x, got {q_out.shape[0]}")
    check_block(name, block, q_out.shape[0])
    nb_out = _num_blocks(q_out.shape[0], block)
    if scales_out.dtype != torch.float32 or scales_out.dim() != 1 or not scales_out.is_contiguous() \
            or scales_out.shape[0] != nb_out:
        raise ValueError(
            f"{name}: scales_out must be a contiguous float32 [{nb_out}] buffer (ceil(q_out.numel() / block)), "
            f"got {scales_out.dtype} {tuple(scales_out.shape)}"
        )
    for t in (q_out, scales_out):
        if t.device != x.device:
            raise ValueError(f"{name}: q_out and scales_out must be on the device of x ({x.device}), got {t.device}")
    _check_error(name, error, x.shape, x.device)
    check_key(name, key, x.device)


# ---- kernels registered from Python: the reference, for CPU (and CUDA without the extension) --


def _quantize_reference_kernel(x, fmt, block, stochastic, seed, error):
    check_quantize_args(x, fmt, block, error)
    q, scales = quantize_blockwise_ref(x, fmt, block, stochastic=stochastic, seed=seed, error=error)
    return q, scales


def _dequantize_reference_kernel(q, scales, block, out_dtype):
    check_dequantize_args(q, scales, block, out_dtype)
    return dequantize_blockwise_ref(q, scales, block, out_dtype)


def _quantize_into_reference_kernel(x, fmt, block, stochastic, seed, error, q_out, scales_out, key=None):
    check_quantize_into_args(x, fmt, block, error, q_out, scales_out, key)
    quantize_blockwise_into_ref(x, fmt, block, q_out, scales_out, stochastic=stochastic, seed=seed, error=error,
                                key=key_int(key))


def _dequantize_sum_reference_kernel(q, scales, block, average, out_dtype):
    check_dequantize_sum_args(q, scales, block, out_dtype)
    return dequantize_sum_blockwise_ref(q, scales, block, average=average, out_dtype=out_dtype)


def _requantize_sum_reference_kernel(q, scales, block, average, stochastic, seed, error, key=None):
    check_requantize_sum_args(q, scales, block, error, key)
    return requantize_sum_blockwise_ref(q, scales, block, average=average, stochastic=stochastic, seed=seed,
                                        error=error, key=key_int(key))


_REFERENCE_KERNELS = {
    "quantize_blockwise": _quantize_reference_kernel,
    "dequantize_blockwise": _dequantize_reference_kernel,
    "quantize_blockwise_into": _quantize_into_reference_kernel,
    "dequantize_sum_blockwise": _dequantize_sum_reference_kernel,
    "requantize_sum_blockwise": _requantize_sum_reference_kernel,
}
for _name, _kernel in _REFERENCE_KERNELS.items():
    LIB.impl(_name, _kernel, "CPU")

if not _extension.available():
    _warned = False

    def _warn_reference_on_cuda():
        global _warned
        if not _warned:
            _warned = True
            warnings.warn(
                "deepseek_kernels: the CUDA extension is not available "
                f"({_extension.LOAD_ERROR or 'not built'}); blockwise quantization on CUDA tensors runs "
                "the slow PyTorch reference. Reinstall with a CUDA toolkit (DSK_BUILD_CUDA=1) for the kernels.",
                stacklevel=3,
            )

    def _cuda_fallback(kernel):
        def run(*args):
            _warn_reference_on_cuda()
            return kernel(*args)

        return run

    for _name, _kernel in _REFERENCE_KERNELS.items():
        LIB.impl(_name, _cuda_fallback(_kernel), "CUDA")


# ---- fake (meta) impls ------------------------------------------------------------------------


@torch.library.register_fake("deepseek_kernels::quantize_blockwise")
def _quantize_fake(x, fmt, block, stochastic, seed, error):
    check_quantize_args(x, fmt, block, error)
    q = x.new_empty(x.shape, dtype=FORMATS[fmt].dtype)
    scales = x.new_empty((*x.shape[:-1], _num_blocks(x.shape[-1], block)), dtype=torch.float32)
    return q, scales


@torch.library.register_fake("deepseek_kernels::dequantize_blockwise")
def _dequantize_fake(q, scales, block, out_dtype):
    check_dequantize_args(q, scales, block, out_dtype)
    return q.new_empty(q.shape, dtype=out_dtype)


@torch.library.register_fake("deepseek_kernels::quantize_blockwise_into")
def _quantize_into_fake(x, fmt, block, stochastic, seed, error, q_out, scales_out, key=None):
    check_quantize_into_args(x, fmt, block, error, q_out, scales_out, key)


@torch.library.register_fake("deepseek_kernels::dequantize_sum_blockwise")
def _dequantize_sum_fake(q, scales, block, average, out_dtype):
    check_dequantize_sum_args(q, scales, block, out_dtype)
    return q.new_empty(q.shape[1:], dtype=out_dtype)


@torch.library.register_fake("deepseek_kernels::requantize_sum_blockwise")
def _requantize_sum_fake(q, scales, block, average, stochastic, seed, error, key=None):
    check_requantize_sum_args(q, scales, block, error, key)
    return q.new_empty(q.shape[1:]), scales.new_empty(scales.shape[1:])


# ---- autograd: dequantize is differentiable in the scales (q is integer / fp8 codes) ------------


def _dequantize_setup_context(ctx, inputs, output):
    q, _scales, block, _out_dtype = inputs
    ctx.save_for_backward(q)
    ctx.block = block


def _dequantize_backward(ctx, grad_out):
    (q,) = ctx.saved_tensors
    n, block = q.shape[-1], ctx.block
    nb = _num_blocks(n, block)
    g = F.pad(grad_out.float() * q.float(), (0, nb * block - n))
    grad_scales = g.reshape(*q.shape[:-1], nb, block).sum(-1)
    return None, grad_scales, None, None


torch.library.register_autograd(
    "deepseek_kernels::dequantize_blockwise", _dequantize_backward, setup_context=_dequantize_setup_context
)


# ---- public functions ---------------------------------------------------------------------------


def quantize_blockwise(
    x: torch.Tensor,
    fmt: str = "int8",
    block: int = 128,
    *,
    stochastic: bool = False,
    seed: int | None = None,
    error: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric blockwise quantization of ``x`` along its last dimension.

    Args:
        x: ``[..., N]`` float32, float16 or bfloat16, any strides.
        fmt: ``"int8"`` (qmax 127), ``"fp8_e4m3"`` (448) or ``"fp8_e5m2"`` (57344).
        block: elements per block, a positive multiple of 16; the last block of a row may be
            shorter. At most ``N`` rounded up to a multiple of 16.
        stochastic: unbiased stochastic rounding instead of round-to-nearest-even.
        seed: seed of the stochastic-rounding stream (reproducible; ``None`` draws one from
            torch's default generator, so ``torch.manual_seed`` controls it). Pass it explicitly
            under ``torch.compile(fullgraph=True)``.
        error: optional error-feedback residual, same shape as ``x``, float32/bfloat16/float16,
            contiguous. ``x + error`` is quantized and ``error`` is overwritten in place with the
            new residual ``(x + error) - dequantize(q)``.

    Returns:
        ``(q, scales)``: ``q`` of the shape of ``x`` (int8 / float8_e4m3fn / float8_e5m2) and
        ``scales`` float32 ``[..., ceil(N / block)]`` with ``scale = amax / qmax``. A block with a
        non-finite value gets ``scale = NaN`` and zero codes: ``torch.isfinite(scales).all()`` is
        the found-inf check. Exact math: ``deepseek_kernels.reference.quantization``.
    """
    check_quantize_args(x, fmt, block, error)
    seed = _resolve_seed("quantize_blockwise", stochastic, seed)
    return op("quantize_blockwise")(x, fmt, block, bool(stochastic), seed, error)


def dequantize_blockwise(
    q: torch.Tensor, scales: torch.Tensor, block: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`'s scaling: ``(q * scale).to(out_dtype)`` per block.

    The format is read off ``q.dtype``; ``block`` must be the one used to quantize. Differentiable
    with respect to ``scales``.
    """
    check_dequantize_args(q, scales, block, out_dtype)
    return op("dequantize_blockwise")(q, scales, block, out_dtype)


def _resolve_seed(name, stochastic, seed) -> int:
    if not stochastic:
        return 0
    if seed is None:
        seed = int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}: seed must be an int in [0, 2**63), got {seed!r}")
    return seed


def quantize_blockwise_into(
    x: torch.Tensor,
    fmt: str,
    block: int,
    q_out: torch.Tensor,
    scales_out: torch.Tensor,
    *,
    stochastic: bool = False,
    seed: int | None = None,
    error: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> None:
    """:func:`quantize_blockwise` of a 1-d ``x`` ``[N]`` written into zero-padded buffers.

    ``q_out`` (``[M]``, ``M >= N``, the code dtype of ``fmt``, contiguous) gets the codes of ``x``
    in its first ``N`` elements and zeros after; ``scales_out`` (float32 ``[ceil(M / block)]``) gets
    the ``ceil(N / block)`` scales and zeros after: the quantization of ``x`` zero-padded to ``M``
    elements, without the pad copies (the DDP hook's send buffers). ``error`` (``[N]``) is updated
    in place as by :func:`quantize_blockwise`. Exact math: ``quantize_blockwise_into_ref``.

    ``key``: an int32 ``[1]`` tensor on ``x``'s device holding the stochastic-rounding key
    (:func:`key_value` of a seed); the kernel reads it when it runs, instead of the key derived
    from ``seed`` when it is launched, so a CUDA graph can replay the launch with a new key.
    """
    check_quantize_into_args(x, fmt, block, error, q_out, scales_out, key)
    seed = _resolve_seed("quantize_blockwise_into", stochastic, seed)
    op("quantize_blockwise_into")(x, fmt, block, bool(stochastic), seed, error, q_out, scales_out, key)


def dequantize_sum_blockwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    block: int = 128,
    *,
    average: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Sum (or mean, ``average=True``) of ``W`` blockwise-quantized tensors: ``q`` ``[W, ..., N]``,
    ``scales`` ``[W, ..., ceil(N / block)]`` -> ``[..., N]`` in ``out_dtype``.

    One kernel: each element is dequantized and summed in fp32 in ascending ``w`` (deterministic:
    the same bits on every rank and every run), then divided by ``W`` when averaging. Exact math:
    ``deepseek_kernels.reference.quantization.dequantize_sum_blockwise_ref``.
    """
    check_dequantize_sum_args(q, scales, block, out_dtype)
    return op("dequantize_sum_blockwise")(q, scales, block, bool(average), out_dtype)


def requantize_sum_blockwise(
    q: torch.Tensor,
    scales: torch.Tensor,
    block: int = 128,
    *,
    average: bool = False,
    stochastic: bool = False,
    seed: int | None = None,
    error: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`dequantize_sum_blockwise` re-quantized in ``q``'s format and ``block``, in one kernel
    (the fp32 sum never goes to memory): exactly ``quantize_blockwise(dequantize_sum_blockwise(q,
    scales, block, average=average), fmt_of(q), block, stochastic=..., seed=..., error=...)``.

    Returns ``(codes [..., N], scales [..., ceil(N / block)])``; ``error`` (``[..., N]``) is the
    error-feedback residual of the re-quantization, updated in place. This is the DDP hook's
    reduce step: the W received copies of a rank's shard in, that shard's mean out, quantized.
    ``key``: as in :func:`quantize_blockwise_into`.
    """
    check_requantize_sum_args(q, scales, block, error, key)
    seed = _resolve_seed("requantize_sum_blockwise", stochastic, seed)
    return op("requantize_sum_blockwise")(q, scales, block, bool(average), bool(stochastic), seed, error, key)


# ---- explain ------------------------------------------------------------------------------------


def _cuda_path(t: torch.Tensor, wide: bool) -> str:
    ok, why = _extension.cuda_kernel_status(t.device)
    if not ok:
        return f"reference: deepseek_kernels.reference.quantization on {t.device} ({why})"
    width = "16-byte vector loads" if wide else "scalar loads (last dim or strides not 16-byte aligned)"
    return f"cuda: {why}, {width}"


def _explain_quantize(x, fmt="int8", block=128, *, stochastic=False, seed=None, error=None):
    check_quantize_args(x, fmt, block, error)
    if x.device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization.quantize_blockwise_ref (x is on the CPU)"
    vec = 16 // x.element_size()
    wide = x.shape[-1] % vec == 0 and x.stride(-1) == 1 and x.data_ptr() % 16 == 0
    return _cuda_path(x, wide)


def _explain_dequantize(q, scales, block=128, out_dtype=torch.float32):
    check_dequantize_args(q, scales, block, out_dtype)
    if q.device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization.dequantize_blockwise_ref (q is on the CPU)"
    vec = 16 // torch.empty((), dtype=out_dtype).element_size()
    return _cuda_path(q, q.shape[-1] % vec == 0)


def _describe(device: torch.device) -> str:
    if device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization (CPU)"
    ok, why = _extension.cuda_kernel_status(device)
    return f"cuda: {why}" if ok else f"reference: {why}"


def _explain_quantize_into(x, fmt, block, q_out, scales_out, *, stochastic=False, seed=None, error=None):
    check_quantize_into_args(x, fmt, block, error, q_out, scales_out)
    if x.device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization.quantize_blockwise_into_ref (x is on the CPU)"
    vec = 16 // x.element_size()
    wide = x.shape[0] % vec == 0 and x.data_ptr() % 16 == 0 and q_out.data_ptr() % 16 == 0
    return _cuda_path(x, wide)


def _explain_dequantize_sum(q, scales, block=128, *, average=False, out_dtype=torch.float32):
    check_dequantize_sum_args(q, scales, block, out_dtype)
    if q.device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization.dequantize_sum_blockwise_ref (q is on the CPU)"
    vec = 16 // torch.empty((), dtype=out_dtype).element_size()
    return _cuda_path(q, q.shape[-1] % vec == 0)


def _explain_requantize_sum(q, scales, block=128, *, average=False, stochastic=False, seed=None, error=None):
    check_requantize_sum_args(q, scales, block, error)
    if q.device.type == "cpu":
        return "reference: deepseek_kernels.reference.quantization.requantize_sum_blockwise_ref (q is on the CPU)"
    return _cuda_path(q, q.shape[-1] % 16 == 0 and (error is None or error.data_ptr() % 16 == 0))


register_explainer("quantize_blockwise", _explain_quantize, _describe)
register_explainer("dequantize_blockwise", _explain_dequantize, _describe)
register_explainer("quantize_blockwise_into", _explain_quantize_into, _describe)
register_explainer("dequantize_sum_blockwise", _explain_dequantize_sum, _describe)
register_explainer("requantize_sum_blockwise", _explain_requantize_sum, _describe)
