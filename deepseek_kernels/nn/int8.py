"""``Int8Linear`` (W8A8 drop-in for ``nn.Linear``) and ``quantize_model`` (swap, with optional
SmoothQuant calibration)."""

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from deepseek_kernels.ops.int8_matmul import int8_linear
from deepseek_kernels.reference.int8_matmul import quantize_per_token_ref


class Int8Linear(nn.Module):
    """``y = x W^T + b`` with int8 weights (per-output-channel scales) and int8 activations
    quantized per token on the fly, int32 accumulation and a fused dequantize + bias epilogue.

    State dict: ``weight`` (int8 ``[out, in]``), ``weight_scale`` (fp32 ``[out]``), ``bias`` (if
    any) and ``smooth`` (fp32 ``[in]``, SmoothQuant factors divided out of the activations; absent
    without smoothing). Build one with :meth:`from_float`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, smooth: bool = False,
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, smooth: torch.Tensor | None = None) -> "Int8Linear":
        """Quantizes ``linear``'s weight per output channel (``scale = amax / 127``); with ``smooth``
        the weight's input channels are multiplied by it first (and activations divided)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear.from_float: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float()
        if smooth is not None:
            if smooth.shape != (linear.in_features,):
                raise ValueError(f"Int8Linear.from_float: smooth must have shape [in_features] = "
                                 f"({linear.in_features},), got {tuple(smooth.shape)}")
            smooth = smooth.detach().float().to(w.device)
            w = w * smooth.unsqueeze(0)
        q, scale = quantize_per_token_ref(w)
        m = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, smooth=smooth is not None,
                device=w.device, bias_dtype=linear.bias.dtype if linear.bias is not None else torch.float32)
        m.weight.copy_(q)
        m.weight_scale.copy_(scale.view(-1))
        if linear.bias is not None:
            m.bias.copy_(linear.bias.detach())
        if smooth is not None:
            m.smooth.copy_(smooth)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x, self.weight, self.weight_scale, bias=self.bias, smooth=self.smooth)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights=int8 per-channel, activations=int8 per-token{', smoothed' if self.smooth is not None else ''}")


@dataclass
class QuantizeReport:
    """What :func:`quantize_model` did."""

    swapped: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    smoothed: bool = False

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def __str__(self) -> str:
        mb = 2**20
        return (f"quantize_model: {len(self.swapped)} nn.Linear -> Int8Linear"
                f"{' (SmoothQuant-calibrated)' if self.smoothed else ''}, {len(self.skipped)} kept; "
                f"linear weights {self.bytes_before / mb:.2f} MiB -> {self.bytes_after / mb:.2f} MiB "
                f"(saved {self.bytes_saved / mb:.2f} MiB)")


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatch(name, p) or name == p or name.endswith("." + p) for p in patterns)


def _param_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


@torch.no_grad()
def _activation_absmax(model: nn.Module, linears: dict, calibration) -> dict:
    stats = {}
    hooks = []
    for name, mod in linears.items():
        def hook(_m, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            cur = x.abs().amax(0)
            stats[name] = cur if name not in stats else torch.maximum(stats[name], cur)
        hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for batch in calibration:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(batch, (tuple, list)):
                model(*batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


def quantize_model(model: nn.Module, *, include=None, exclude=("lm_head",), calibration=None,
                   alpha: float = 0.5) -> QuantizeReport:
    """Swaps the ``nn.Linear`` layers of ``model`` for :class:`Int8Linear` in place.

    Args:
        include: name patterns (``fnmatch``, or a suffix such as ``"mlp.up_proj"``) of the layers to
            swap; ``None`` means every ``nn.Linear``.
        exclude: name patterns to keep in floating point (default: ``lm_head``).
        calibration: optional iterable of inputs (a tensor, a tuple of positional args, or a dict
            of keyword args per batch). With it, SmoothQuant factors
            ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` are computed per input channel and
            folded in (weights times s, activations divided by s).
        alpha: SmoothQuant migration strength in [0, 1].
    Returns a :class:`QuantizeReport` (layers swapped, bytes saved).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"quantize_model: alpha must be in [0, 1], got {alpha}")
    report = QuantizeReport()
    linears = {}
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear:
            if (include is None or _matches(name, include)) and not _matches(name, exclude or ()):
                linears[name] = mod
            else:
                report.skipped.append(name)
    stats = _activation_absmax(model, linears, calibration) if calibration is not None else {}
    report.smoothed = bool(stats)
    for name, lin in linears.items():
        smooth = None
        if name in stats:
            act = stats[name].to(lin.weight.device)
            wmax = lin.weight.detach().float().abs().amax(0)
            smooth = (act.clamp_min(1e-5) ** alpha / wmax.clamp_min(1e-5) ** (1 - alpha)).clamp_min(1e-5)
            smooth = torch.where(act > 0, smooth, torch.ones_like(smooth))
        new = Int8Linear.from_float(lin, smooth=smooth)
        report.bytes_before += _param_bytes(lin)
        report.bytes_after += _param_bytes(new)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
        report.swapped.append(name)
    return report
