"""Blockwise INT8/FP8 quantization ops: registration, fake impls, autograd, public functions.

``deepseek_kernels::quantize_blockwise`` and ``deepseek_kernels::dequantize_blockwise`` run the
CUDA kernels of ``csrc/quantization`` on CUDA tensors and the reference
(``deepseek_kernels.reference.quantization``) on CPU tensors; ``explain`` says which.
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
    quantize_blockwise_ref,
)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEED_LIMIT = 2**63

# Keep in sync with csrc/bindings.cpp (tests/test_build.py compares them when the extension is built).
QUANTIZE_SCHEMA = (
    "(Tensor x, str fmt, int block, bool stochastic, int seed, Tensor(a!)? error) -> (Tensor, Tensor)"
)
DEQUANTIZE_SCHEMA = "(Tensor q, Tensor scales, int block, ScalarType out_dtype) -> Tensor"

define("quantize_blockwise", QUANTIZE_SCHEMA)
define("dequantize_blockwise", DEQUANTIZE_SCHEMA)


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


def check_quantize_args(x, fmt, block, error) -> None:
    name = "quantize_blockwise"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: x must be a torch.Tensor, got {type(x).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"{name}: fmt must be one of {tuple(FORMATS)}, got {fmt!r}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name}: x must have at least one dimension, got a 0-d tensor")
    check_block(name, block, x.shape[-1])
    if error is not None:
        if not isinstance(error, torch.Tensor):
            raise TypeError(f"{name}: error must be a torch.Tensor or None, got {type(error).__name__}")
        if error.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}: error must be float32, bfloat16 or float16, got {error.dtype}")
        if error.shape != x.shape:
            raise ValueError(f"{name}: error must have the shape of x {tuple(x.shape)}, got {tuple(error.shape)}")
        if error.device != x.device:
            raise ValueError(f"{name}: error must be on the device of x ({x.device}), got {error.device}")
        if not error.is_contiguous():
            raise ValueError(f"{name}: error is updated in place and must be contiguous; pass error.contiguous()")


def check_dequantize_args(q, scales, block, out_dtype) -> None:
    name = "dequantize_blockwise"
    for arg, t in (("q", q), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if q.dtype not in FORMAT_OF_DTYPE:
        raise ValueError(f"{name}: q must be int8, float8_e4m3fn or float8_e5m2, got {q.dtype}")
    if q.dim() < 1:
        raise ValueError(f"{name}: q must have at least one dimension, got a 0-d tensor")
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
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float32, float16 or bfloat16, got {out_dtype}")


# ---- kernels registered from Python: the reference, for CPU (and CUDA without the extension) --


def _quantize_reference_kernel(x, fmt, block, stochastic, seed, error):
    check_quantize_args(x, fmt, block, error)
    q, scales = quantize_blockwise_ref(x, fmt, block, stochastic=stochastic, seed=seed, error=error)
    return q, scales


def _dequantize_reference_kernel(q, scales, block, out_dtype):
    check_dequantize_args(q, scales, block, out_dtype)
    return dequantize_blockwise_ref(q, scales, block, out_dtype)


LIB.impl("quantize_blockwise", _quantize_reference_kernel, "CPU")
LIB.impl("dequantize_blockwise", _dequantize_reference_kernel, "CPU")

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

    def _quantize_cuda_fallback(x, fmt, block, stochastic, seed, error):
        _warn_reference_on_cuda()
        return _quantize_reference_kernel(x, fmt, block, stochastic, seed, error)

    def _dequantize_cuda_fallback(q, scales, block, out_dtype):
        _warn_reference_on_cuda()
        return _dequantize_reference_kernel(q, scales, block, out_dtype)

    LIB.impl("quantize_blockwise", _quantize_cuda_fallback, "CUDA")
    LIB.impl("dequantize_blockwise", _dequantize_cuda_fallback, "CUDA")


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
    if stochastic:
        if seed is None:
            seed = int(torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64).item())
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"quantize_blockwise: seed must be an int in [0, 2**63), got {seed!r}")
    else:
        seed = 0
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


register_explainer("quantize_blockwise", _explain_quantize, _describe)
register_explainer("dequantize_blockwise", _explain_dequantize, _describe)
