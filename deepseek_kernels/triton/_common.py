"""Small Triton helpers shared by the kernels."""

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@triton.jit
def f32(x):
    """A float kernel argument as fp32. Triton types Python floats as fp32 when it launches a kernel
    itself, but torch.compile (inductor) passes them as fp64, which would turn the softmax state
    fp64 (a compile error for loop-carried values, slow math otherwise)."""
    return (tl.zeros((), tl.float32) + x).to(tl.float32)


@triton.jit
def chain_start(PDL: tl.constexpr):
    """With ``PDL`` (a programmatic dependent launch, :func:`pdl_option`): wait for the kernel before
    this one in the stream (and its memory), then let the next one launch (its programs become
    resident while this kernel runs and wait in turn). Without, nothing. Call it first in a kernel."""
    chain_wait(PDL)
    chain_trigger(PDL)


@triton.jit
def chain_wait(PDL: tl.constexpr):
    """With ``PDL``: wait for the kernel before this one in the stream (and its memory); the next kernel
    launches when every program of this one has called :func:`chain_trigger` or exited. For kernels of
    more than one wave, whose waiting dependents would hold SM slots their later programs need."""
    if PDL:
        gdc_wait()


@triton.jit
def chain_trigger(PDL: tl.constexpr):
    """With ``PDL``: this program's part of the work is in flight; the next kernel may launch (call it
    after the main loop, before the epilogue's stores)."""
    if PDL:
        gdc_launch_dependents()


def pdl_option(pdl: bool) -> dict:
    """The launch option of a programmatic dependent launch (only when on: the compile is unchanged otherwise)."""
    return {"launch_pdl": True} if pdl else {}


@functools.lru_cache(maxsize=None)
def _props_of(index: int):
    import torch

    return torch.cuda.get_device_properties(index)


def _props(device):
    """A CUDA ``device``'s properties (cached: the query is not free, and launchers ask on every call)."""
    import torch

    return _props_of(device.index if device.index is not None else torch.cuda.current_device())


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA ``device``."""
    return _props(device).multi_processor_count


def big_shared_memory(device) -> bool:
    """Whether a ``device``'s SMs hold ~200 KB of shared memory or more (Hopper's 228 KB; A100's 164 KB do
    not): the tile shapes tuned on the H200 that need it stay off elsewhere. True off CUDA (the interpreter
    has no limit)."""
    import torch

    if torch.device(device).type != "cuda":
        return True
    return _props(device).shared_memory_per_multiprocessor >= 200 * 1024


def shared_memory_limit(device) -> int | None:
    """Shared memory one program may use on a CUDA ``device`` (the opt-in limit per block: 232448 B on the
    H200); None off CUDA (the interpreter has no limit)."""
    return _props(device).shared_memory_per_block_optin if device.type == "cuda" else None


def fit_stages(stages: int, stage_bytes: int, limit: int | None) -> int:
    """The most software-pipeline stages, at most ``stages``, whose ``stage_bytes`` of shared memory each fit in
    ``limit`` bytes (:func:`shared_memory_limit`; ``stages * stage_bytes``: Triton keeps ``stages - 1`` buffers
    in flight plus room for its epilogue). ``limit`` None: unchanged. Tiles tuned for 2-byte operands need this
    for fp32 ones (twice the bytes)."""
    if limit is None:
        return stages
    return max(1, min(stages, limit // max(1, stage_bytes)))


def tracing_stand_in(t) -> bool:
    """Whether ``t`` is a stand-in torch.compile traces with (a fake or functional tensor: what a
    ``triton_op``'s body sees while dynamo and inductor trace it). Such a tensor has no data pointer, so
    a launcher that needs one (a host-side TMA descriptor, an alignment check) takes its plain path."""
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, FunctionalTensor) or is_fake(t)


def plain_eager(*tensors) -> bool:
    """Whether an op body runs on real tensors outside torch.compile's tracing: then its Triton kernels may launch
    directly (``ops._registry.triton_kernel(fn, direct=True)``), without ``wrap_triton``'s higher-order-op
    dispatch, which costs host time per launch in eager."""
    return not torch.compiler.is_compiling() and not any(tracing_stand_in(t) for t in tensors)


def resolve_launch(what: str, defaults: dict, config: dict | None = None, **scalars) -> dict:
    """Per-kernel launch settings: ``defaults`` (kernel name -> its settings dict), then each
    non-None scalar override (e.g. ``num_warps=8``) for every kernel that has that setting, then
    ``config``'s per-kernel entries (``{"dq": {"num_stages": 2}}``: what the tuners write).
    Unknown kernel names or settings raise a ValueError naming ``what``."""
    config = config or {}
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise ValueError(f"{what} launch config: unknown kernel(s) {unknown}; known: {list(defaults)}")
    out = {}
    for name, settings in defaults.items():
        c = dict(settings)
        c.update({k: v for k, v in scalars.items() if v is not None and k in c})
        bad = sorted(set(config.get(name, {})) - set(c))
        if bad:
            raise ValueError(f"{what} launch config for {name}: unknown key(s) {bad}; known: {sorted(c)}")
        c.update(config.get(name, {}))
        out[name] = c
    return out


def launch_options(c: dict) -> dict:
    """Triton launch options (num_warps, and num_stages unless None: Triton's default) of a
    resolved per-kernel setting."""
    opts = {"num_warps": c["num_warps"]}
    if c.get("num_stages") is not None:
        opts["num_stages"] = c["num_stages"]
    return opts
