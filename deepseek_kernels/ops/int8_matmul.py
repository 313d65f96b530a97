"""W8A8 INT8 matmul ops: ``quantize_per_token``, ``int8_mm`` (raw int32) and ``int8_matmul``
(fused dequantize + bias epilogue).

``int8_mm`` / ``int8_matmul`` are ``torch.library.triton_op``s: on CUDA tensors (and on CPU under
the Triton interpreter, ``TRITON_INTERPRET=1``) they launch the Triton kernel of
``deepseek_kernels.triton.int8_matmul``; on CPU otherwise they run the reference.
``quantize_per_token`` runs a one-pass-per-row Triton kernel (bit-exact with the reference) on the
same devices. Plain eager calls on CUDA tensors skip the dispatcher and launch the same kernels
directly (``eager_fast_path``): at decode sizes the dispatcher costs more than the kernel.
Where the CUDA extension is built (sm_80+; ``DSK_INT8_GEMV=0`` switches it off), eager decode calls
(M <= 16 rows, K a multiple of 16, 16-byte aligned int8 rows) take the
CUDA extension's ``int8_gemv`` / ``int8_linear_gemv`` ops instead: the same arithmetic (the same bits)
launched from C++, because Triton's Python launcher costs more host time per call than a decode
GEMV takes on the GPU. While a CUDA graph captures, the Triton
kernels run instead (host time does not count in a replay, and the Triton GEMV streams the weights
faster: H200 session 14, 16.7 vs 17.5 us at M1 N14336 K4096; eager, the C++ op took 18.5 us per call
against 23.5 us or more for the Triton launch). Eager calls above 16 rows launch the Triton GEMM: the first
call of a problem key through Triton, which compiles it, the repeats from C++ (``int8_matmul_cubin_eager``: the
same compiled kernel, checked, allocated and launched in one pybind11 call; ``DSK_INT8_CUBIN=0`` keeps them on
Triton's launcher). ``explain`` says which path a call takes.
"""

import functools
import os
import re
import types

import torch

from deepseek_kernels import _extension
from deepseek_kernels.ops._registry import (
    TRITON_OP,
    define_triton_op,
    eager_fast_path,
    interpreting,
    pdl_enabled,
    register_explainer,
    triton_kernel,
)
from deepseek_kernels.triton._common import pdl_option
from deepseek_kernels.triton import _direct
from deepseek_kernels.triton._direct import DirectLaunch, aligned
from deepseek_kernels.reference.int8_matmul import int8_matmul_ref, int8_mm_ref, quantize_per_token_ref

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _use_triton(t: torch.Tensor) -> bool:
    if t.is_cuda:
        return True
    # The interpreter runs the kernel on CPU tensors (tests); torch.compile on CPU takes the reference.
    return interpreting() and not torch.compiler.is_compiling()


# ---- argument checks ---------------------------------------------------------------------------


def check_mm_args(name, a_q, b_q) -> None:
    for arg, t in (("a_q", a_q), ("b_q", b_q)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int8:
            raise ValueError(f"{name}: {arg} must be int8, got {t.dtype}; quantize first (quantize_per_token / Int8Linear.from_float)")
        if t.dim() != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {tuple(t.shape)}")
    if a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"{name}: K mismatch: a_q is {tuple(a_q.shape)} ([M, K]) and b_q is {tuple(b_q.shape)} ([N, K])")
    if a_q.device != b_q.device:
        raise ValueError(f"{name}: a_q and b_q must be on one device, got {a_q.device} and {b_q.device}")


def check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype) -> None:
    name = "int8_matmul"
    check_mm_args(name, a_q, b_q)
    M, N = a_q.shape[0], b_q.shape[0]
    for arg, t, n, shapes in (("a_scale", a_scale, M, "[M, 1] or [M]"), ("b_scale", b_scale, N, "[N]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise ValueError(f"{name}: {arg} must be float32, got {t.dtype}")
        if t.numel() != n or t.dim() > 2 or (t.dim() == 2 and t.shape[1] != 1):
            raise ValueError(f"{name}: {arg} must have shape {shapes} with {'M' if n == M else 'N'}={n}, got {tuple(t.shape)}")
        if t.device != a_q.device:
            raise ValueError(f"{name}: {arg} must be on {a_q.device}, got {t.device}")
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"{name}: bias must have shape [N] = ({N},), got {tuple(bias.shape)}")
        if bias.device != a_q.device:
            raise ValueError(f"{name}: bias must be on {a_q.device}, got {bias.device}")
        if not bias.is_floating_point():
            raise ValueError(f"{name}: bias must be a floating-point tensor, got {bias.dtype}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{name}: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")


# ---- the C++ decode path ---------------------------------------------------------------------------

GEMV_MAX_M = 16  # the decode kernel's rows (one tensor-core MMA tile)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_GEMV_EXT: list = []  # [the extension module, or None where its decode paths are off]; tests clear it


def _linear_out_dtype(x: torch.Tensor) -> torch.dtype:
    """int8_linear's output dtype: x's for bf16 / fp16, else float32."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32


def _gemv_ext():
    """The CUDA extension module when its eager decode paths may serve calls (built, not switched off with
    ``DSK_INT8_GEMV=0``), else None. Read once (tests clear ``_GEMV_EXT``)."""
    if not _GEMV_EXT:
        ok = (os.environ.get("DSK_INT8_GEMV", "1") != "0" and _extension.available()
              and hasattr(_extension._C, "int8_linear_eager"))
        _GEMV_EXT.append(_extension._C if ok else None)
    return _GEMV_EXT[0]


def _gemv_ready(t: torch.Tensor) -> bool:
    """Whether the extension's decode kernels serve ``t``'s device: on (:func:`_gemv_ext`), a CUDA tensor, sm_80
    or newer (int8 mma.sync). Never for CPU tensors (the interpreter tests force the Triton path on them)."""
    return t.is_cuda and _gemv_ext() is not None and torch.cuda.get_device_capability(t.device)[0] >= 8


def _gemv_takes_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype) -> bool:
    """Whether an eager-eligible int8_matmul call (CUDA tensors) takes the C++ decode kernel: the extension's own
    predicate (the one ``int8_gemv_eager`` applies), so what explain says is what runs."""
    ext = _gemv_ext()
    return ext is not None and out_dtype in _FLOAT_DTYPES and ext.int8_gemv_eager_ok(a_q, b_q, a_scale, b_scale, bias,
                                                                                        out_dtype)


def _gemv_takes_linear(x, weight, weight_scale, bias, smooth) -> bool:
    """Whether an eager-eligible int8_linear call (CUDA tensors) takes the C++ decode kernels (``int8_linear_eager``'s
    predicate)."""
    ext = _gemv_ext()
    return ext is not None and ext.int8_linear_eager_ok(x, weight, weight_scale, bias, smooth)


# ---- the C++ launch of the compiled GEMM (eager calls above decode sizes) ---------------------------------------

_CUBIN_EXT: list = []  # [the extension module, or None where its cubin launcher is off]; tests clear it
_CUBIN_TRIED: dict = {}  # (device index, DirectLaunch key) -> registered with the C++ launcher (False: declined)
_CUBIN_MAX_KEYS = 4096  # past this both registries start over (shapes churn)
_DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}  # csrc/int8/triton_launch.h
_PTX_BYTES = {"u64": 8, "b64": 8, "s64": 8, "u32": 4, "b32": 4, "s32": 4}


def _cubin_ext():
    """The extension module when eager int8_matmul calls above 16 rows may repeat through its C++ launch of the
    compiled Triton GEMM (built with it, not switched off with ``DSK_INT8_CUBIN=0``), else None. Read once (tests
    clear ``_CUBIN_EXT``)."""
    if not _CUBIN_EXT:
        ok = (os.environ.get("DSK_INT8_CUBIN", "1") != "0" and _extension.available()
              and hasattr(_extension._C, "int8_matmul_cubin_eager"))
        _CUBIN_EXT.append(_extension._C if ok else None)
    return _CUBIN_EXT[0]


def cubin_params(ptx: str, name: str, ints: tuple) -> list[int] | None:
    """The parameter codes (csrc/int8/triton_launch.h) of the compiled GEMM ``name`` whose PTX is ``ptx``, launched
    with ``ints`` = (M, N, K, a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), N, 1) after its six
    pointers; None where the PTX entry's parameters are not the expected ones. Expected: the six pointers (64-bit),
    each integer Triton did not specialize away (Triton turns integers equal to 1 into constants) as 32 bits, or 64
    for values outside int32 (Triton's i32 / i64 rule), then at most two 64-bit pointers Triton appends (its global
    and profile scratch), which the C++ launch passes as null. Derived from the PTX rather than from a Triton
    version's conventions, so a Triton that lays the parameters out otherwise is declined, never misread."""
    m = re.search(r"\.entry\s+" + re.escape(name) + r"\s*\((.*?)\)", ptx, re.S)
    if m is None:
        return None
    sizes = [_PTX_BYTES.get(t) for t in re.findall(r"\.param\s+\.(\w+)", m.group(1))]
    codes, want = list(range(6)), [8] * 6
    for i, v in enumerate(ints):
        if v == 1:
            continue
        wide = not -2**31 <= v < 2**31
        codes.append((20 if wide else 10) + i)
        want.append(8 if wide else 4)
    extra = sizes[len(want):]
    if sizes[:len(want)] != want or len(extra) > 2 or any(b != 8 for b in extra):
        return None
    return codes + [30] * len(extra)


def _register_cubin(kernel, a_q, b_q, out, bias, grid, launch_key) -> bool:
    """Registers the compiled GEMM ``kernel`` (launched by Triton for operands like these, the epilogue on, no
    programmatic launch; ``launch_key`` its DirectLaunch key) with the extension's C++ launcher; False where it does
    not qualify (then the key keeps Triton's launcher). Once per key and device: the answer is remembered."""
    ext = _cubin_ext()
    if len(_CUBIN_TRIED) >= _CUBIN_MAX_KEYS:
        _CUBIN_TRIED.clear()
        ext.int8_matmul_cubin_clear()
    _CUBIN_TRIED[(out.device.index, launch_key)] = ok = _register(ext, kernel, a_q, b_q, out, bias, grid)
    return ok


def _register(ext, kernel, a_q, b_q, out, bias, grid) -> bool:
    """:func:`_register_cubin`'s work: whether ``kernel`` qualifies (a plain one-CTA launch without scratch memory,
    loaded for the current device, a PTX parameter list :func:`cubin_params` reads) and, if so, its registration."""
    md = getattr(kernel, "metadata", None)
    if ext is None or md is None or out.dtype not in _DTYPE_CODES or not out.is_contiguous():
        return False
    if out.device.index != _direct._driver.active.get_current_device():  # Triton loaded it for the current device
        return False
    if bias is not None and bias.dtype not in _DTYPE_CODES:
        return False
    if (getattr(md, "num_ctas", 1) != 1 or getattr(md, "global_scratch_size", 0)
            or getattr(md, "profile_scratch_size", 0) or getattr(md, "launch_cooperative_grid", False)
            or getattr(md, "launch_pdl", False)
            or tuple(getattr(md, "cluster_dims", None) or (1, 1, 1)) != (1, 1, 1)):
        return False
    M, K = a_q.shape
    N = b_q.shape[0]
    ints = (M, N, K, a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), N, 1)
    try:
        ptx = kernel.asm["ptx"]
        name = getattr(kernel, "name", None) or md.name
    except (AttributeError, KeyError, TypeError):
        return False
    params = cubin_params(ptx, name, ints)
    if params is None:
        return False
    key = [*ints[:7], _DTYPE_CODES[out.dtype], -1 if bias is None else _DTYPE_CODES[bias.dtype]]
    ext.int8_matmul_cubin_register(out.device.index, key, int(kernel.function), grid[0], 32 * md.num_warps,
                                   md.shared, params)
    return True


# ---- ops -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, out_dtype: torch.dtype):
    """The launch plan of one problem shape (cached: eager decode calls repeat a few shapes, and
    building it costs microseconds of Python per call): the persistent TMA config or None, the plain
    kernel's grid, its constexpr parameters, and its launch options."""
    from deepseek_kernels.triton import int8_matmul as tk

    tma_cfg = tk.persistent_tma_config(M, N, K, out_dtype)
    cfg = dict(tk.launch_config(M, N, K))
    options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
    grid = (triton_cdiv(M, cfg["BLOCK_M"]) * triton_cdiv(N, cfg["BLOCK_N"]),)
    cfg.update(EVEN_MN=M % cfg["BLOCK_M"] == 0 and N % cfg["BLOCK_N"] == 0, EVEN_K=K % cfg["BLOCK_K"] == 0)
    ro = types.MappingProxyType  # cached: read-only
    return None if tma_cfg is None else ro(tma_cfg), grid, ro(cfg), ro(options)


_MATMUL_LAUNCH = None  # DirectLaunch of the plain kernel (created on first use: Triton imports lazily)


def _launch(a_q, b_q, out, a_scale, b_scale, bias, apply_epilogue: bool, direct: bool = False,
            pdl: bool = False) -> None:
    """One GEMM launch. Eager (``direct``) large GEMMs on Hopper take the persistent TMA kernel;
    everything else, and every call inside torch.compile, the plain kernel (the same bits). Eager
    launches with 16-byte aligned operands repeat through :class:`DirectLaunch` (same kernel, less
    host time). ``pdl``: the plain kernel as a programmatic dependent launch of the kernel before it
    (see :func:`pdl_enabled`)."""
    global _MATMUL_LAUNCH
    from deepseek_kernels.triton import int8_matmul as tk

    M, K = a_q.shape
    N = b_q.shape[0]
    tma_cfg, grid, cfg, options = _plan(M, N, K, out.dtype)
    if direct and tma_cfg is not None and a_q.is_cuda and tk.tma_ok(a_q, b_q):
        from deepseek_kernels.triton._common import sm_count

        tk.launch_tma(a_q, b_q, out, a_scale, b_scale, bias, tma_cfg, apply_epilogue,
                      persistent_programs=sm_count(a_q.device))
        return
    dummy = out  # unused pointer arguments still need a tensor
    args = (a_q, b_q, out,
            a_scale if a_scale is not None else dummy,
            b_scale if b_scale is not None else dummy,
            bias if bias is not None else dummy,
            M, N, K,
            a_q.stride(0), a_q.stride(1), b_q.stride(0), b_q.stride(1), out.stride(0), out.stride(1))
    if direct and aligned(a_q, b_q, out, a_scale, b_scale, bias):
        if _MATMUL_LAUNCH is None:
            _MATMUL_LAUNCH = DirectLaunch(tk._int8_matmul_kernel)
        # what the compile specializes on beyond the shape (M, N, K -> cfg, grid): strides, dtypes, flags
        key = (M, N, K, args[9:], out.dtype, None if bias is None else bias.dtype, apply_epilogue, pdl)
        # eager repeats above decode sizes: from C++ once the compiled kernel is registered (public int8_matmul)
        cubin = apply_epilogue and not pdl and M > GEMV_MAX_M and _cubin_ext() is not None
        if _MATMUL_LAUNCH.launch_cached(key, grid, args):  # a repeat: no constexpr dict to build
            if cubin and (out.device.index, key) not in _CUBIN_TRIED:  # compiled while the C++ launch was off
                _register_cubin(_MATMUL_LAUNCH.kernel_for(key), a_q, b_q, out, bias, grid, key)
            return
        kernel = _MATMUL_LAUNCH(key, grid, args, dict(APPLY_EPILOGUE=apply_epilogue, HAS_BIAS=bias is not None, **cfg,
                                                      PDL=pdl), **options, **pdl_option(pdl))
        if cubin and kernel is not None:
            _register_cubin(kernel, a_q, b_q, out, bias, grid, key)
        return
    triton_kernel(tk._int8_matmul_kernel, direct)[grid](*args, APPLY_EPILOGUE=apply_epilogue, HAS_BIAS=bias is not None,
                                                       **cfg, PDL=pdl, **options, **pdl_option(pdl))


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@define_triton_op("deepseek_kernels::int8_mm")
def _int8_mm_op(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    check_mm_args("int8_mm", a_q, b_q)
    if not _use_triton(a_q):
        return int8_mm_ref(a_q, b_q)
    out = torch.empty(a_q.shape[0], b_q.shape[0], dtype=torch.int32, device=a_q.device)
    if out.numel():
        if a_q.shape[1] == 0:
            return out.zero_()
        _launch(a_q, b_q, out, None, None, None, apply_epilogue=False)
    return out


@define_triton_op("deepseek_kernels::int8_matmul")
def _int8_matmul_op(
    a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
    bias: torch.Tensor | None, out_dtype: torch.dtype,
) -> torch.Tensor:
    if not _use_triton(a_q):
        check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype)
        return int8_matmul_ref(a_q, b_q, a_scale, b_scale, bias, out_dtype)
    return _int8_matmul_impl(a_q, b_q, a_scale, b_scale, bias, out_dtype)


def _int8_matmul_impl(a_q, b_q, a_scale, b_scale, bias, out_dtype, direct: bool = False,
                      check: bool = True, pdl: bool = False) -> torch.Tensor:
    """Checks the arguments (unless a caller already has: ``check=False``) and launches the Triton
    kernel (the op's body, and the eager fast paths)."""
    if check:
        check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype)
    out = torch.empty(a_q.shape[0], b_q.shape[0], dtype=out_dtype, device=a_q.device)
    if out.numel():
        if a_q.shape[1] == 0:
            return int8_matmul_ref(a_q, b_q, a_scale, b_scale, bias, out_dtype)
        # the kernel reads scales and bias with unit stride ([M, 1] / [M] / [N] checked above)
        _launch(a_q, b_q, out, a_scale if a_scale.is_contiguous() else a_scale.contiguous(),
                b_scale if b_scale.is_contiguous() else b_scale.contiguous(),
                bias if bias is None or bias.is_contiguous() else bias.contiguous(), apply_epilogue=True,
                direct=direct, pdl=pdl)
    return out


if not TRITON_OP:

    @_int8_mm_op.register_fake
    def _(a_q, b_q):
        check_mm_args("int8_mm", a_q, b_q)
        return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=torch.int32)

    @_int8_matmul_op.register_fake
    def _(a_q, b_q, a_scale, b_scale, bias, out_dtype):
        check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype)
        return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)


if _extension.available() and hasattr(torch.ops.deepseek_kernels, "int8_gemv"):  # the C++ decode ops

    @torch.library.register_fake("deepseek_kernels::int8_gemv")
    def _(a_q, b_q, a_scale, b_scale, bias, out_dtype, pdl=False):
        check_matmul_args(a_q, b_q, a_scale, b_scale, bias, out_dtype)
        return a_q.new_empty((a_q.shape[0], b_q.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("deepseek_kernels::int8_linear_gemv")
    def _(x, weight, weight_scale, bias, smooth, pdl=False):
        _check_linear_args(x, weight, weight_scale, bias, smooth)
        return x.new_empty((x.shape[0], weight.shape[0]), dtype=_linear_out_dtype(x))


QUANTIZE_MAX_BLOCK_K = 16384  # the widest row tile of the per-token quantize kernel (16 warps)
_QUANTIZE_LAUNCH = None  # DirectLaunch of the quantize kernel (created on first use)


@functools.lru_cache(maxsize=1024)
def quantize_launch(K: int) -> types.MappingProxyType:
    """``BLOCK_K`` and ``num_warps`` of the per-token quantize kernel for rows of ``K`` (cached, so
    read-only): rows up to QUANTIZE_MAX_BLOCK_K in one tile (read once, kept in registers: 32 values
    per lane at most), longer rows in tiles of that size (read twice)."""
    block_k = min(QUANTIZE_MAX_BLOCK_K, max(16, 1 << (K - 1).bit_length()))
    return types.MappingProxyType(dict(BLOCK_K=block_k, num_warps=min(16, max(4, block_k // 512))))


def _launch_quantize_per_token(x2: torch.Tensor, smooth: torch.Tensor | None, direct: bool = False,
                               pdl: bool = False):
    """x2 [M, K] with unit stride along K -> (codes [M, K] int8, scales [M, 1] fp32). ``pdl``: a
    programmatic dependent launch (:func:`pdl_enabled`)."""
    from deepseek_kernels.triton.int8_matmul import _quantize_per_token_kernel

    global _QUANTIZE_LAUNCH
    M, K = x2.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x2.device)
    scale = torch.empty((M, 1), dtype=torch.float32, device=x2.device)
    if M and K:
        args = (x2, smooth if smooth is not None else x2, q, scale, K, x2.stride(0), K)
        cached = direct and aligned(x2, smooth, q, scale)
        if cached:
            if _QUANTIZE_LAUNCH is None:
                _QUANTIZE_LAUNCH = DirectLaunch(_quantize_per_token_kernel)
            key = (K, x2.stride(0), x2.dtype, None if smooth is None else smooth.dtype, pdl)
            if _QUANTIZE_LAUNCH.launch_cached(key, (M,), args):  # a repeat: no constexpr dict to build
                return q, scale
        launch = quantize_launch(K)
        constexprs = dict(HAS_SMOOTH=smooth is not None, BLOCK_K=launch["BLOCK_K"], PDL=pdl)
        options = {"num_warps": launch["num_warps"], **pdl_option(pdl)}
        if cached:
            _QUANTIZE_LAUNCH(key, (M,), args, constexprs, **options)
        else:
            triton_kernel(_quantize_per_token_kernel, direct)[(M,)](*args, **constexprs, **options)
    elif M:
        scale.zero_()  # an empty row: amax 0
    return q, scale


def _quantize_per_token_impl(x: torch.Tensor, smooth: torch.Tensor | None,
                             direct: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if smooth is not None and smooth.stride(-1) != 1:
        smooth = smooth.contiguous()
    q, scale = _launch_quantize_per_token(x2, smooth, direct)
    return q.reshape(x.shape), scale.reshape(*x.shape[:-1], 1)


@define_triton_op("deepseek_kernels::quantize_per_token")
def _quantize_per_token_op(x: torch.Tensor, smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not _use_triton(x):
        return quantize_per_token_ref(x, smooth)
    return _quantize_per_token_impl(x, smooth)


if not TRITON_OP:

    @_quantize_per_token_op.register_fake
    def _(x, smooth):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


# ---- public functions ------------------------------------------------------------------------------


def quantize_per_token(x: torch.Tensor, *, smooth: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8 quantization: ``x [..., K]`` -> (``x_q`` int8 ``[..., K]``,
    ``x_scale`` fp32 ``[..., 1]``), ``scale = amax / 127`` per row. ``smooth [K]`` (SmoothQuant) is
    divided in first. Exact math: ``deepseek_kernels.reference.int8_matmul``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize_per_token: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1:
        raise ValueError("quantize_per_token: x must have at least one dimension")
    if smooth is not None and (smooth.shape != (x.shape[-1],) or smooth.device != x.device):
        raise ValueError(f"quantize_per_token: smooth must have shape [K] = ({x.shape[-1]},) on {x.device}, "
                         f"got {tuple(smooth.shape)} on {smooth.device}")
    if eager_fast_path(x, smooth) and not x.requires_grad:
        return _quantize_per_token_impl(x, smooth, direct=True)
    return torch.ops.deepseek_kernels.quantize_per_token(x, smooth)


def int8_mm(a_q: torch.Tensor, b_q: torch.Tensor) -> torch.Tensor:
    """The exact int32 product ``a_q [M, K] @ b_q[N, K]^T`` (any M >= 1, odd K and N)."""
    return torch.ops.deepseek_kernels.int8_mm(a_q, b_q)


def int8_matmul(
    a_q: torch.Tensor, b_q: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, *,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """W8A8 matmul with the epilogue fused: ``(a_q @ b_q^T) * a_scale * b_scale + bias``.

    ``a_q [..., K]`` int8 (leading dims flattened), ``b_q [N, K]`` int8 (nn.Linear weight layout),
    ``a_scale [..., 1]`` fp32 per row, ``b_scale [N]`` fp32 per output channel, ``bias [N]``.
    Returns ``[..., N]`` in ``out_dtype`` (bf16, fp16 or fp32).
    """
    if isinstance(a_q, torch.Tensor) and a_q.dim() > 2:
        lead = a_q.shape[:-1]
        out = int8_matmul(a_q.reshape(-1, a_q.shape[-1]), b_q, a_scale.reshape(-1, 1), b_scale, bias=bias,
                          out_dtype=out_dtype)
        return out.reshape(*lead, out.shape[-1])
    operands = isinstance(a_q, torch.Tensor) and isinstance(b_q, torch.Tensor)
    if operands and eager_fast_path(a_q, b_q, a_scale, b_scale, bias):
        # decode sizes: a programmatic dependent launch (its weights start streaming before the kernel before
        # ends), checked and launched by one C++ call (larger M skips that pybind11 call: it would decline)
        if a_q.dim() == 2 and a_q.shape[0] <= GEMV_MAX_M:
            pdl = pdl_enabled(a_q, "int8_matmul")
            ext = _gemv_ext()
            if ext is not None and out_dtype in _FLOAT_DTYPES:
                out = ext.int8_gemv_eager(a_q, b_q, a_scale, b_scale, bias, out_dtype, pdl)
                if out is not None:
                    return out
            return _int8_matmul_impl(a_q, b_q, a_scale, b_scale, bias, out_dtype, direct=True, pdl=pdl)
        # larger M: the compiled Triton GEMM launched from C++ once its key is registered (None before, or where
        # the operands do not qualify); Triton's launcher stays where a launch hook (a profiler) wants to see it
        ext = _cubin_ext()
        if ext is not None and out_dtype in _FLOAT_DTYPES and _direct.enabled() and _direct.hooks_quiet():
            out = ext.int8_matmul_cubin_eager(a_q, b_q, a_scale, b_scale, bias, out_dtype)
            if out is not None:
                return out
        return _int8_matmul_impl(a_q, b_q, a_scale, b_scale, bias, out_dtype, direct=True)
    return torch.ops.deepseek_kernels.int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype)


def _check_linear_args(x, weight, weight_scale, bias, smooth) -> None:
    name = "int8_linear"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"{name}: x must be a floating-point tensor [..., K], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"{name}: weight must be int8 [N, K] (Int8Linear.from_float quantizes one), got "
                         f"{getattr(weight, 'dtype', type(weight).__name__)} {tuple(getattr(weight, 'shape', ()))}")
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"{name}: K mismatch: x is {tuple(x.shape)} ([..., K]) and weight is {tuple(weight.shape)} ([N, K])")
    for arg, t, n, dtypes in (("weight_scale", weight_scale, N, (torch.float32,)), ("bias", bias, N, None),
                              ("smooth", smooth, K, None)):
        if t is None and arg != "weight_scale":
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (n,) or not t.is_floating_point() or (
                dtypes is not None and t.dtype not in dtypes):
            want = "float32" if dtypes else "floating-point"
            raise ValueError(f"{name}: {arg} must be a {want} tensor of shape [{'N' if n == N else 'K'}] = ({n},), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{name}: {arg} must be on {x.device} like x, got {t.device}")
    if weight.device != x.device:
        raise ValueError(f"{name}: weight must be on {x.device} like x, got {weight.device}")


def _linear_direct(x2: torch.Tensor, weight, weight_scale, bias, smooth, out_dtype) -> torch.Tensor:
    """Checked operands, ``x2 [M, K]`` on CUDA: the per-token quantize and the GEMM launched directly (no
    dispatcher; a programmatic dependent launch chain on sm_90, :func:`pdl_enabled`)."""
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if smooth is not None and smooth.stride(-1) != 1:
        smooth = smooth.contiguous()
    pdl = pdl_enabled(x2, "int8_linear")
    x_q, x_scale = _launch_quantize_per_token(x2, smooth, direct=True, pdl=pdl)
    return _int8_matmul_impl(x_q, weight, x_scale, weight_scale, bias, out_dtype, direct=True, check=False, pdl=pdl)


@torch.library.custom_op("deepseek_kernels::int8_linear", mutates_args=())
def _int8_linear_op(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                    smooth: torch.Tensor | None) -> torch.Tensor:
    """``int8_linear`` of ``x [M, K]`` as one op: what the dispatcher and torch.compile run. A plain custom op on
    purpose, opaque to inductor: inductor (torch 2.11) launches the kernels it traces from a triton_op without
    their launch options, so a compiled quantize -> GEMM pair loses its programmatic dependent launch (H200
    session 19: the 4-block stack at 1 token compiled took 369 us either way, graphed eager 352). On CUDA the
    extension's decode kernels (eager, M <= 16) or the same two Triton launches as the eager path; elsewhere the
    ``quantize_per_token`` and ``int8_matmul`` ops (the interpreter's kernels or the reference)."""
    _check_linear_op_args(x, weight, weight_scale, bias, smooth)
    out_dtype = _linear_out_dtype(x)
    if not x.is_cuda:
        x_q, x_scale = torch.ops.deepseek_kernels.quantize_per_token(x, smooth)
        return torch.ops.deepseek_kernels.int8_matmul(x_q, weight, x_scale, weight_scale, bias, out_dtype)
    ext = _gemv_ext()
    if ext is not None:
        # None: not a decode call, or capturing
        out = ext.int8_linear_eager(x, weight, weight_scale, bias, smooth, pdl_enabled(x, "int8_linear"))
        if out is not None:
            return out
    return _linear_direct(x, weight, weight_scale, bias, smooth, out_dtype)


def _check_linear_op_args(x, weight, weight_scale, bias, smooth) -> None:
    _check_linear_args(x, weight, weight_scale, bias, smooth)
    if x.dim() != 2:
        raise ValueError(f"int8_linear: the op takes x as [M, K] (the function flattens leading dims), got {tuple(x.shape)}")


@_int8_linear_op.register_fake
def _(x, weight, weight_scale, bias, smooth):
    _check_linear_op_args(x, weight, weight_scale, bias, smooth)
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=_linear_out_dtype(x))


def _int8_linear_setup_context(ctx, inputs, output):
    x, weight, weight_scale, bias, smooth = inputs
    ctx.save_for_backward(weight, weight_scale, smooth)
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _int8_linear_backward(ctx, grad):
    """Gradients through the frozen int8 weight, for training layers around quantized ones (adapters, the
    layers before): the per-token activation quantization passes gradients straight through (its rounding
    has no useful derivative), so ``dx = (dy @ (W * weight_scale)) / smooth``, with the weight dequantized in
    dy's dtype (int8 codes are exact there); ``dbias = sum(dy)``. The weight, its scales and ``smooth`` get
    none (int8 weights are not trained)."""
    weight, weight_scale, smooth = ctx.saved_tensors
    dx = dbias = None
    if ctx.needs_input_grad[0]:
        w = weight.to(grad.dtype) * weight_scale.to(grad.dtype)[:, None]
        dx = grad @ w
        if smooth is not None:
            dx = dx / smooth.to(dx.dtype)
        dx = dx.to(ctx.x_dtype)
    if ctx.needs_input_grad[3]:
        dbias = grad.sum(0).to(ctx.bias_dtype)
    return dx, None, None, dbias, None


_int8_linear_op.register_autograd(_int8_linear_backward, setup_context=_int8_linear_setup_context)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                bias: torch.Tensor | None = None, smooth: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` with ``W`` int8 ``[N, K]`` (per-channel ``weight_scale [N]`` fp32) and ``x``
    ``[..., K]`` quantized per token on the fly (``smooth [K]`` divided in first): exactly
    ``int8_matmul(*quantize_per_token(x, smooth=smooth), ...)``. Output in x's dtype for bf16/fp16,
    else float32. (Kernels fusing both steps for M <= 16, in Triton and in CUDA C++, measured slower than
    the two launches on the H200: 2x under a CUDA graph, and 34.9 vs 20.7 us for one row: benchmarks/NOTES.md.)
    Where the extension is built (unless ``DSK_INT8_GEMV=0``), eager decode calls on CUDA take its
    ``int8_linear_eager``: the same two steps (``int8_linear_gemv``'s kernels), checked and launched by one
    call into C++. Everything else (torch.compile, modes, autograd) goes through the ``int8_linear`` op.
    Differentiable in ``x`` (and ``bias``) with the quantization passed straight through: see
    :func:`_int8_linear_backward`."""
    fast = eager_fast_path(x, weight, weight_scale, bias, smooth)
    if fast:
        ext = _gemv_ext()
        if ext is not None:
            out = ext.int8_linear_eager(x, weight, weight_scale, bias, smooth, pdl_enabled(x, "int8_linear"))
            if out is not None:
                return out
    _check_linear_args(x, weight, weight_scale, bias, smooth)
    lead, K, N = x.shape[:-1], x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, K)
    if fast and not x2.requires_grad:  # x2 is a view of x: the same answer as for x
        # a plain eager call on a GPU: the same two kernels, launched directly after the one check
        # above (the op would check and dispatch again: ~20 us of CPU on the H200's host, more than a
        # decode-sized kernel takes)
        return _linear_direct(x2, weight, weight_scale, bias, smooth, _linear_out_dtype(x)).reshape(*lead, N)
    return torch.ops.deepseek_kernels.int8_linear(x2, weight, weight_scale, bias, smooth).reshape(*lead, N)


def _describe_matmul(device: torch.device) -> str:
    if device.type == "cuda":
        repeats = "; eager repeats above 16 rows launch the compiled kernel from C++" if _cubin_ext() else ""
        return (f"triton: deepseek_kernels.triton.int8_matmul on {device} (validated on the H200; launch shapes tuned for "
                f"M<=16 and M>128{repeats})")
    if interpreting():
        return "triton: deepseek_kernels.triton.int8_matmul under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.reference.int8_matmul (tensors on the CPU)"


def _explain_matmul(a_q, b_q, a_scale=None, b_scale=None, *args, bias=None, **kwargs):
    if (b_scale is not None and eager_fast_path(a_q, b_q, a_scale, b_scale, bias)
            and _gemv_takes_matmul(a_q, b_q, a_scale, b_scale, bias, kwargs.get("out_dtype", torch.bfloat16))):
        return f"cuda: deepseek_kernels._C int8_gemv on {a_q.device} (the decode kernel, M <= {GEMV_MAX_M}, launched from C++)"
    return _describe_matmul(a_q.device)


def _describe_quantize_per_token(device: torch.device) -> str:
    if device.type == "cuda":
        return f"triton: deepseek_kernels.triton.int8_matmul._quantize_per_token_kernel on {device} (one program per row)"
    if interpreting():
        return "triton: _quantize_per_token_kernel under the Triton interpreter (TRITON_INTERPRET=1)"
    return "reference: deepseek_kernels.reference.int8_matmul.quantize_per_token_ref (tensors on the CPU)"


register_explainer("int8_matmul", _explain_matmul, _describe_matmul)
register_explainer("int8_mm", _explain_matmul, _describe_matmul)
register_explainer("quantize_per_token", lambda x, **kw: _describe_quantize_per_token(x.device),
                   _describe_quantize_per_token)


def _describe_linear(device: torch.device) -> str:
    if device.type == "cuda" or interpreting():
        where = f"on {device}" if device.type == "cuda" else "under the Triton interpreter (TRITON_INTERPRET=1)"
        return f"triton: quantize_per_token + int8_matmul {where} (two launches)"
    return "reference: quantize_per_token + int8_matmul references (tensors on the CPU)"


def _explain_linear(x, weight, weight_scale=None, *args, bias=None, smooth=None, **kwargs):
    if (weight_scale is not None and eager_fast_path(x, weight, weight_scale, bias, smooth)
            and _gemv_takes_linear(x, weight, weight_scale, bias, smooth)):
        return (f"cuda: deepseek_kernels._C int8_linear_gemv on {x.device} (quantize + decode GEMV, M <= {GEMV_MAX_M}, "
                "two kernels launched from C++)")
    return _describe_linear(x.device)


register_explainer("int8_linear", _explain_linear, _describe_linear)
