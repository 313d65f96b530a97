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
    if not runs_on(archs, major, minor):
        return False, f"extension built for {archs}, GPU is sm_{major}{minor}: rebuild with TORCH_CUDA_ARCH_LIST including {major}.{minor}"
    return True, f"CUDA kernel (deepseek_kernels._C, built for {archs}) on sm_{major}{minor}"


def runs_on(arch_list: str, major: int, minor: int) -> bool:
    """Whether code built for ``arch_list`` (TORCH_CUDA_ARCH_LIST syntax) runs on sm_<major><minor>:
    a cubin for X.Y runs on X.Z with Z >= Y (an 'a' cubin only on exactly X.Y); PTX is JIT-compiled
    for any newer GPU."""
    for raw in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        a = raw.strip()
        if not a:
            continue
        ptx = a.endswith("+PTX")
        a = a.removesuffix("+PTX")
        exact = a.endswith("a")
        try:
            b_major, b_minor = (int(x) for x in a.removesuffix("a").split("."))
        except ValueError:
            continue
        if ptx and (b_major, b_minor) <= (major, minor):
            return True
        if exact and (b_major, b_minor) == (major, minor):
            return True
        if not exact and b_major == major and b_minor <= minor:
            return True
    return False
