"""Blockwise quantization: the exact definition (test oracle, CPU path, benchmark baseline).

A tensor ``x`` of shape ``[..., N]`` is cut along its last dimension into ``nb = ceil(N / block)``
contiguous blocks of ``block`` elements; the last block of a row may be shorter. Per block, in
fp32 and with every operation rounded once (IEEE round-to-nearest-even), the CUDA kernel computes
exactly the same numbers:

    y     = x + error                       (error feedback; y = x without it)
    amax  = max |y| over the block
    scale = amax / qmax                     qmax: int8 127, fp8_e4m3 448, fp8_e5m2 57344
    scale = 0           if scale < 2^-126   (an all-zero block, or one so small that its scale
                                             would be subnormal, gets zero codes and scale 0, no NaN)
    inv   = 1 / scale   if scale > 0 else 0
    v     = clamp(y * inv, -qmax, qmax)
    q     = round(v)                        int8: half-to-even; fp8: torch's RNE cast of v
                                            (saturation is done by the clamp before the cast)

Stochastic rounding replaces ``round``: with ``u = uniform(seed, i)`` (24 random bits, a hash of
the seed and the element's logical index ``i = row * N + col``), int8 takes
``floor(v) + [u < v - floor(v)]``; fp8 rounds ``|v|`` between its two neighbouring fp8 values
``lo <= |v| <= hi`` up with probability ``(|v| - lo) / (hi - lo)`` (tested as the exact comparison
``u * (hi - lo) < |v| - lo``) and keeps the sign. Both are unbiased: E[q * scale] = y.

Non-finite input: a block holding any NaN or Inf in ``y`` gets ``scale = NaN`` and zero codes, so
the problem is reported (``torch.isfinite(scales).all()`` is the found-inf flag, and dequantizing
the block yields NaN) instead of being hidden; its error-feedback residual is left unchanged.

Error feedback: with ``error`` given, ``error`` is overwritten in place with
``y - q * scale`` (computed in fp32, rounded once to ``error.dtype``).

Dequantization: ``out = (q * scale).to(out_dtype)`` with ``q`` decoded exactly to fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class QuantFormat:
    name: str
    dtype: torch.dtype  # dtype of the codes
    qmax: float


FORMATS = {
    "int8": QuantFormat("int8", torch.int8, 127.0),
    "fp8_e4m3": QuantFormat("fp8_e4m3", torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": QuantFormat("fp8_e5m2", torch.float8_e5m2, 57344.0),
}
FORMAT_OF_DTYPE = {f.dtype: f for f in FORMATS.values()}

_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 tensors holding uint32 values, without int64 overflow."""
    c_lo, c_hi = c & 0xFFFF, c >> 16
    return (a * c_lo + (((a * c_hi) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding uint32 values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _mix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stochastic_key(seed: int) -> int:
    """32-bit key of the stochastic-rounding stream for a 64-bit seed."""
    seed &= (1 << 64) - 1
    return _mix32_int((seed & _M32) ^ _mix32_int((seed >> 32) ^ 0x9E3779B9))


def uniform_for_indices(seed: int, index: torch.Tensor, key: int | None = None) -> torch.Tensor:
    """The uniform [0, 1) fp32 number used to round element ``index`` (int64 logical index).
    ``key`` (a 32-bit stream key) replaces ``stochastic_key(seed)`` when given."""
    key = stochastic_key(seed) if key is None else key & _M32
    lo, hi = index & _M32, index >> 32
    h = _mix32((_mix32(lo ^ key) + hi) & _M32)
    return (h >> 8).to(torch.float32) * 2.0**-24


def _round_nearest(v: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    if fmt.dtype == torch.int8:
        return torch.round(v).to(torch.int8)
    return v.to(fmt.dtype)


def _round_stochastic(v: torch.Tensor, u: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    if fmt.dtype == torch.int8:
        lo = torch.floor(v)
        return (lo + (u < v - lo).to(torch.float32)).to(torch.int8)
    mag = v.abs()
    c_bits = mag.to(fmt.dtype).view(torch.uint8).to(torch.int16)
    cf = mag.to(fmt.dtype).to(torch.float32)
    lo_bits = torch.where(cf > mag, c_bits - 1, c_bits)
    hi_bits = torch.where(cf < mag, c_bits + 1, c_bits)
    decode = lambda b: b.to(torch.uint8).view(fmt.dtype).to(torch.float32)  # noqa: E731
    lo, hi = decode(lo_bits), decode(hi_bits)
    bits = torch.where(u * (hi - lo) < mag - lo, hi_bits, lo_bits)
    bits = torch.where(torch.signbit(v), bits | 0x80, bits)
    return bits.to(torch.uint8).view(fmt.dtype)


def quantize_blockwise_ref(
    x: torch.Tensor,
    fmt: str = "int8",
    block: int = 128,
    *,
    stochastic: bool = False,
    seed: int = 0,
    error: torch.Tensor | None = None,
    key: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference blockwise quantization (see the module docstring for the exact math).

    x: ``[..., N]`` float32/float16/bfloat16. Returns ``q`` (``[..., N]``, int8 or float8) and
    ``scales`` (``[..., ceil(N / block)]``, float32). Updates ``error`` in place when given.
    ``key``: the 32-bit stochastic-rounding stream key, replacing ``stochastic_key(seed)``.
    """
    spec = FORMATS[fmt]
    n = x.shape[-1]
    nb = math.ceil(n / block)
    lead = x.shape[:-1]
    y = x.float()
    if error is not None:
        y = y + error.float()
    yb = F.pad(y, (0, nb * block - n)).reshape(*lead, nb, block)
    finite = torch.isfinite(yb).all(-1)
    amax = yb.abs().amax(-1)
    # A tensor divisor keeps this a true IEEE division (a Python-scalar divisor may become a
    # multiplication by its reciprocal, which rounds differently).
    scale = amax / torch.full_like(amax, spec.qmax)
    scale = torch.where(scale >= torch.finfo(torch.float32).tiny, scale, 0.0)
    scale = torch.where(finite, scale, float("nan"))
    inv = torch.where(scale > 0, torch.reciprocal(scale), 0.0)
    v = (yb * inv.unsqueeze(-1)).clamp(-spec.qmax, spec.qmax)
    if stochastic:
        index = torch.arange(y.numel(), device=x.device, dtype=torch.int64).reshape(y.shape)
        u = F.pad(uniform_for_indices(seed, index, key), (0, nb * block - n))
        codes = _round_stochastic(v, u.reshape(v.shape), spec)
    else:
        codes = _round_nearest(v, spec)
    bits = codes.view(torch.uint8) if spec.dtype != torch.int8 else codes
    bits = torch.where(finite.unsqueeze(-1), bits, torch.zeros((), dtype=bits.dtype, device=bits.device))
    codes = bits.view(spec.dtype) if spec.dtype != torch.int8 else bits
    q = codes.reshape(*lead, nb * block)[..., :n].contiguous()
    if error is not None:
        deq = q.float() * _expand_scales(scale, block, n)
        keep = _expand_scales(finite, block, n)
        error.copy_(torch.where(keep, y - deq, error.float()))
    return q, scale


def _expand_scales(s: torch.Tensor, block: int, n: int) -> torch.Tensor:
    return s.repeat_interleave(block, dim=-1)[..., :n]


def dequantize_blockwise_ref(
    q: torch.Tensor, scales: torch.Tensor, block: int = 128, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Reference dequantization: ``(q * scale).to(out_dtype)`` per block of the last dim."""
    return (q.float() * _expand_scales(scales, block, q.shape[-1])).to(out_dtype)


# ---- reductions over quantized shards (the DDP hook's reduce step) -------------------------------


def dequantize_sum_blockwise_ref(
    q: torch.Tensor,
    scales: torch.Tensor,
    block: int = 128,
    *,
    average: bool = False,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reference sum of ``W`` blockwise-quantized tensors, in fp32, in a fixed order.

    ``q``: ``[W, ..., N]`` codes (int8 / float8), ``scales``: ``[W, ..., ceil(N / block)]`` fp32;
    row ``w`` is one quantized tensor (one rank's shard in the DDP hook). With ``d_w = q[w] * scale``
    (decoded exactly, one fp32 rounding per product), every op rounded once (IEEE RNE, no FMA)::

        acc = d_0;  acc = acc + d_w  for w = 1 .. W-1   (ascending w: deterministic)
        acc = acc / W                                    (only with average; a true division)
        out = acc.to(out_dtype)                          shape [..., N]

    A NaN scale (a non-finite block) makes that block NaN in the sum.
    """
    world = q.shape[0]
    acc = dequantize_blockwise_ref(q[0], scales[0], block)
    for w in range(1, world):
        acc = acc + dequantize_blockwise_ref(q[w], scales[w], block)
    if average:
        acc = acc / torch.full_like(acc, float(world))  # tensor divisor: IEEE division (see above)
    return acc.to(out_dtype)


def requantize_sum_blockwise_ref(
    q: torch.Tensor,
    scales: torch.Tensor,
    block: int = 128,
    *,
    average: bool = False,
    stochastic: bool = False,
    seed: int = 0,
    error: torch.Tensor | None = None,
    key: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fused reduce + re-quantize: exactly ::

        quantize_blockwise_ref(dequantize_sum_blockwise_ref(q, scales, block, average=average),
                               fmt_of(q), block, stochastic=stochastic, seed=seed, error=error)

    The codes come back in ``q``'s format, shape ``[..., N]`` (``q.shape[1:]``), with scales
    ``[..., ceil(N / block)]``; ``error`` (``[..., N]``) is the error-feedback residual of the
    re-quantization, updated in place; stochastic indices are the logical indices of the sum.
    """
    fmt = FORMAT_OF_DTYPE[q.dtype].name
    total = dequantize_sum_blockwise_ref(q, scales, block, average=average)
    return quantize_blockwise_ref(total, fmt, block, stochastic=stochastic, seed=seed, error=error, key=key)


def quantize_blockwise_into_ref(
    x: torch.Tensor,
    fmt: str,
    block: int,
    q_out: torch.Tensor,
    scales_out: torch.Tensor,
    *,
    stochastic: bool = False,
    seed: int = 0,
    error: torch.Tensor | None = None,
    key: int | None = None,
) -> None:
    """Reference quantization of a 1-d ``x`` ``[N]`` into zero-padded buffers.

    ``q_out`` ``[M]`` (``M >= N``, codes of ``fmt``) and ``scales_out`` ``[ceil(M / block)]`` fp32
    receive ``quantize_blockwise_ref(x, fmt, block, ...)`` in their first ``N`` / ``ceil(N / block)``
    elements and zeros (bit pattern 0) after them: the codes and scales of ``x`` zero-padded to
    ``M`` elements, as if the padding had been quantized with it (an all-zero tail adds nothing
    to any block's amax). ``error`` (``[N]``) is updated in place as by ``quantize_blockwise_ref``.
    """
    n = x.shape[0]
    q, s = quantize_blockwise_ref(x, fmt, block, stochastic=stochastic, seed=seed, error=error, key=key)
    q_bits = q_out.view(torch.uint8) if q_out.dtype != torch.int8 else q_out
    q_bits[:n] = q.view(torch.uint8) if q.dtype != torch.int8 else q
    q_bits[n:] = 0
    scales_out[: s.numel()] = s
    scales_out[s.numel():] = 0
