"""Shared registration glue: the op library handle and the dispatch explanations.

Schemas are defined in C++ (csrc/bindings.cpp) when the extension is built; otherwise this
module defines the same schemas from Python so the ops exist (with CPU/reference kernels) on
every install. ``explain`` says which implementation a call takes and why.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from deepseek_kernels import _extension

NAMESPACE = "deepseek_kernels"
LIB = torch.library.Library(NAMESPACE, "FRAGMENT")

_EXPLAINERS: dict[str, Callable[..., str]] = {}
_DESCRIBERS: dict[str, Callable[[torch.device], str]] = {}


def define(name: str, schema: str) -> None:
    """Defines ``name(schema)`` unless the C++ extension already did."""
    if not _extension.available():
        LIB.define(f"{name}{schema}")


def op(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def register_explainer(name: str, fn: Callable[..., str], describe: Callable[[torch.device], str]) -> None:
    """``fn(*args, **kwargs)`` explains one call; ``describe(device)`` says which path the op takes
    on a device in general (for ``info()``)."""
    _EXPLAINERS[name] = fn
    _DESCRIBERS[name] = describe


def describe(name: str, device: torch.device) -> str:
    return _DESCRIBERS[name](device)


def explain(name: str, *args, **kwargs) -> str:
    """Which implementation ``deepseek_kernels.<name>(*args, **kwargs)`` runs here, and why.

    The answer starts with the path (``cuda:``, ``triton:`` or ``reference:``), then the reason."""
    if name not in _EXPLAINERS:
        raise ValueError(f"explain: unknown op {name!r}; known ops: {sorted(_EXPLAINERS)}")
    return _EXPLAINERS[name](*args, **kwargs)


def known_ops() -> list[str]:
    return sorted(_EXPLAINERS)


def triton_available() -> bool:
    """Whether Triton can compile for a GPU here (torch's own test; False on CPU-only machines)."""
    try:
        from torch.utils._triton import has_triton

        return has_triton()
    except ImportError:
        return False


def interpreting() -> bool:
    """Whether Triton kernels run under the interpreter (TRITON_INTERPRET=1, CPU tests)."""
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Triton path for CUDA tensors, and for CPU tensors under the interpreter."""
    return t.is_cuda or interpreting()


def define_triton_op(qualname: str):
    """Decorator for ops backed by Triton kernels. With a usable Triton (a GPU) this is
    ``torch.library.triton_op``, so torch.compile sees into the kernels; otherwise (CPU machines,
    the interpreter) a plain ``custom_op``, which needs an explicit fake impl (``register_fake``;
    check ``TRITON_OP`` before registering one) and keeps torch from warning at import."""
    if TRITON_OP:
        return torch.library.triton_op(qualname, mutates_args=())
    return torch.library.custom_op(qualname, mutates_args=())


TRITON_OP = triton_available()


def eager_fast_path(*tensors) -> bool:
    """Whether a public function may launch its kernel directly instead of going through the
    dispatcher (which costs tens of microseconds per call in Python, more than a decode-sized
    kernel). Only for plain eager calls on CUDA tensors: not while torch.compile/export traces,
    not under any torch function or dispatch mode (fake tensors, functionalization, proxies,
    user modes), not for tensor subclasses. Ops whose kernels have no autograd formula use it;
    the result is the same kernel, run the same way."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled():
        return False
    for t in tensors:  # a loop, not all(generator): ~1 us less per call, which decode calls feel
        if t is not None and (type(t) is not torch.Tensor or not t.is_cuda):
            return False
    return True


def triton_kernel(fn, direct: bool = False):
    """``fn`` ready to index with a grid: wrapped with ``torch.library.wrap_triton`` (traceable;
    what an op body launches), or the plain kernel when ``direct`` (the eager fast path: no
    higher-order-op dispatch)."""
    return fn if direct else torch.library.wrap_triton(fn)


_pdl: str | None = None  # "auto", "on" or "off"; None: read DSK_PDL on the next call
# The chains that launch programmatically under the default DSK_PDL=auto: those measured faster on the
# H200 (session 11, benchmarks/diag_pdl.py, graphed): int8_linear M1 19.0 -> 18.3 us, M16 20.1 -> 18.8 us,
# the 4-block int8 stack at 1 token 370.8 -> 353.3 us; the sparse FFN decode chain T1 30.9 -> 29.3 us, T8
# 99.5 -> 98.3 us once its kernels let the next one launch after their main loop (chain_trigger) rather than
# at their start (then T8 lost 91.4 -> 110.7 us: waiting programs held SMs the kernel before still needed).
# int8_matmul at decode sizes (session 20, benchmarks/diag_int8_prefetch.py, graphed N14336 K4096): the Triton
# kernel M1 / M16 17.1 / 17.3 -> 16.3 / 16.6 us; the C++ one (eager) with its L2 weight prefetch 18.5 / 20.2 ->
# 17.3 / 18.7 us.
AUTO_PDL_CHAINS = frozenset({"int8_linear", "int8_matmul", "sparse_decode"})
PDL_CHAINS = frozenset({"int8_linear", "int8_matmul", "sparse_decode"})


def pdl_enabled(x: torch.Tensor, chain: str) -> bool:
    """Whether an eager decode chain launches its kernels as programmatic dependent launches (Hopper's
    griddepcontrol: each kernel waits for the one before it at its start and lets the next one launch
    early, at its start (int8_linear) or after its main loop (sparse decode: ``_common.chain_trigger``),
    so the next kernel's programs are resident before this one ends: a launch gap hidden per kernel
    boundary). ``chain``: ``"int8_linear"`` (quantize -> GEMM), ``"int8_matmul"`` (a decode-sized
    GEMM, M <= 16, after whatever kernel came before; its weights start streaming before that one ends)
    or ``"sparse_decode"`` (router -> gate/up -> down). ``DSK_PDL``: ``auto`` (default: the chains in
    :data:`AUTO_PDL_CHAINS`, measured faster; today every chain), ``1`` (every chain), ``0`` (none); read
    once (:func:`refresh_pdl` rereads; :func:`programmatic_launches` overrides it in a block). Needs
    compute capability 9.0+ and a CUDA tensor. The same bits either way."""
    if chain not in PDL_CHAINS:
        raise ValueError(f"pdl_enabled: chain must be one of {sorted(PDL_CHAINS)}, got {chain!r}")
    setting = pdl_setting()
    if setting == "off" or (setting == "auto" and chain not in AUTO_PDL_CHAINS):
        return False
    return x.is_cuda and _capability_major(x.get_device()) >= 9


def pdl_setting() -> str:
    """``"auto"``, ``"on"`` or ``"off"`` (``DSK_PDL`` unset/``auto``, ``1``, ``0``, or
    :func:`programmatic_launches`), whatever the device: what ``info()`` reports. Off under the
    Triton interpreter."""
    global _pdl
    if _pdl is None:
        import os

        raw = os.environ.get("DSK_PDL", "auto").strip().lower()
        choices = {"auto": "auto", "": "auto", "1": "on", "0": "off"}
        if raw not in choices:
            raise ValueError(f"DSK_PDL must be auto, 1 or 0, got {raw!r}")
        _pdl = "off" if interpreting() else choices[raw]
    return _pdl


@functools.lru_cache(maxsize=None)
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def refresh_pdl() -> None:
    """Rereads ``DSK_PDL`` on the next call."""
    global _pdl
    _pdl = None


@contextlib.contextmanager
def programmatic_launches(on: bool):
    """Programmatic dependent launches on or off for every chain inside the block whatever ``DSK_PDL``
    says (tests and benchmarks compare both); the previous setting comes back after. A CUDA graph keeps
    what was on when it was captured."""
    global _pdl
    before = _pdl
    _pdl = "on" if on and not interpreting() else "off"
    try:
        yield
    finally:
        _pdl = before
