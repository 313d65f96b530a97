"""W8A8 INT8 matmul: the exact definitions (test oracle, CPU path, benchmark baseline).

Per-token activation quantization (``quantize_per_token``), for ``x`` of shape ``[M, K]``:

    x' = x / smooth                      (optional per-input-channel smoothing, SmoothQuant)
    scale[m] = max_k |x'[m, k]| / 127    (fp32; a zero row gets scale 0 and zero codes)
    x_q[m, k] = round_half_even(x'[m, k] * (1 / scale[m]))   clamped to [-127, 127]

INT8 matmul (``int8_matmul``) with ``a_q [M, K]``, ``b_q [N, K]`` (the ``nn.Linear`` weight layout),
``a_scale [M, 1]`` (or ``[M]``), ``b_scale [N]``:

    acc[m, n] = sum_k a_q[m, k] * b_q[n, k]          exact, in int32 (|acc| < 2^31 for K < 133k)
    out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n]   rounded once to out_dtype

The reference computes the epilogue in float64 and rounds once; the kernels compute it in fp32
(error ~1e-7 relative, far below one bf16/fp16 rounding step). ``int8_mm`` is the raw int32
accumulator (what must match the kernel exactly).
"""

import torch

QMAX = 127.0


def quantize_per_token_ref(x: torch.Tensor, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8 quantization of ``x [..., K]`` -> (``x_q`` int8, ``scale`` fp32 ``[..., 1]``).

    In fp32, every step correctly rounded: ``xs = x / smooth``, ``scale = amax(|xs|) / 127``,
    ``q = round_half_even(clamp(xs * (1 / scale), -127, 127))``; an all-zero row gets scale 0 and
    codes 0. A row holding NaN or Inf gets scale NaN or Inf (so ``isfinite(scale)`` flags it) and
    codes 0 where the product is NaN.
    """
    xf = x.float()
    if smooth is not None:
        xf = xf / smooth.float()
    amax = xf.abs().amax(-1, keepdim=True)
    scale = amax / torch.full_like(amax, QMAX)
    inv = torch.where(scale > 0, torch.reciprocal(scale), 0.0)
    q = torch.round((xf * inv).clamp(-QMAX, QMAX))
    q = torch.where(torch.isnan(q), 0.0, q).to(torch.int8)
    return q, scale


def int8_mm_ref(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """``a_q [M, K] @ b_q[N, K]^T`` accumulated exactly, as int32."""
    # |products| <= 127^2 and K < 2^19 keep every partial sum below 2^53: float64 is exact here.
    acc = a_q.double() @ b_q.double().t()
    return acc.to(torch.int32)


def int8_matmul_ref(
    a_q: torch.Tensor,
    b_q: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``(a_q @ b_q^T) * a_scale * b_scale + bias``, the epilogue in float64, rounded once."""
    out = int8_mm_ref(a_q, b_q).double() * a_scale.double().reshape(-1, 1) * b_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)
