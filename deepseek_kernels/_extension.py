"""Loads the compiled extension ``deepseek_kernels._C`` (if it was built) and remembers why not."""

from __future__ import annotations

import importlib

import torch  # loads libtorch/libc10, which the extension links against

_C = None
LOAD_ERROR: str | None = None

try:
    _C = importlib.import_module("deepseek_kernels._C")
except ImportError as exc:  # not built (DSK_BUILD_CUDA=0, no toolkit) or built for another torch
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when the CUDA extension is importable (its ops are then registered)."""
    return _C is not None


def build_info() -> dict:
    """How the extension was built (architectures, CUDA and torch versions), or why it is absent."""
    if _C is None:
        return {"built": False, "reason": LOAD_ERROR or "not built"}
    return {"built": True, **dict(_C.build_info())}


def cuda_kernel_status(device: "torch.device") -> tuple[bool, str]:  # noqa: F821
    """Whether the extension's kernels can run on ``device``; the reason either way."""
    if _C is None:
        return False, f"CUDA extension not available ({LOAD_ERROR or 'not built'})"
    if device.type != "cuda":
        return False, f"tensor is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    archs = build_info().get("cuda_arch_list", "")
    built = {a.strip().replace("+PTX", "") for a in archs.replace(",", ";").split(";") if a.strip()}
    have = {f"{major}.{minor}", f"{major}.{minor}a"}
    if not built & have and not any(a.endswith("+PTX") for a in archs.split(";")):
        return False, f"extension built for {archs}, GPU is sm_{major}{minor}"
    return True, f"CUDA kernel (deepseek_kernels._C, built for {archs}) on sm_{major}{minor}"
