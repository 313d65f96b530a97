"""Triton W8A8 GEMM: int8 x int8 -> int32 accumulate, with the dequantize + bias epilogue fused.

``a [M, K]`` int8 (row-major or any strides), ``b [N, K]`` int8 (the nn.Linear weight layout),
per-row ``a_scale [M]``, per-column ``b_scale [N]``, optional ``bias [N]``; ``out [M, N]``. With
``APPLY_EPILOGUE=False`` the raw int32 accumulator is stored (``int8_mm``).
"""

import os

import triton
import triton.language as tl

from deepseek_kernels.triton._common import chain_start


@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of this program's output tile (see :func:`_grouped_tile`)."""
    return _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``pid`` in grouped order: GROUP_M row-tiles share each column
    of B while it is in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def _epilogue(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS: tl.constexpr):
    """``acc * a_scale * b_scale (+ bias)`` in fp32 (rounded once, by the caller's store)."""
    a_scale = tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
    out = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        out += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return out


@triton.jit
def _store_tile(acc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on,
                APPLY_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    if APPLY_EPILOGUE:
        out = _epilogue(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS)
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptrs, acc, mask=mask)


@triton.jit
def _int8_matmul_kernel(
    a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk, stride_om, stride_on,
    APPLY_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_MN: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False,
):
    """``EVEN_MN`` / ``EVEN_K``: M and N (resp. K) are multiples of the tile, so the main loop's
    loads need no masks (the launcher sets them). ``PDL``: a programmatic dependent launch
    (:func:`deepseek_kernels.triton._common.chain_start`). (An L2 prefetch of the weight rows' first
    bytes before the wait, which the C++ GEMV gains from, lost here: H200 session 20.)"""
    chain_start(PDL)
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_MN and EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0)
            b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    _store_tile(acc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on,
                APPLY_EPILOGUE, HAS_BIAS)


@triton.jit
def _int8_matmul_tma_kernel(
    a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, stride_om, stride_on,
    APPLY_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA_STORE: tl.constexpr,
):
    """:func:`_int8_matmul_kernel` with A and B tiles through TMA descriptors (Hopper+; experimental,
    ``benchmarks/tune_int8.py --tma`` A/Bs it): out-of-range rows and columns arrive as zeros, so
    the main loop has no masks. ``TMA_STORE``: the output leaves through a descriptor too."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    _tma_tile(a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, M, N, K, stride_om,
              stride_on, APPLY_EPILOGUE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TMA_STORE)


@triton.jit
def _tma_tile(a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, M, N, K, stride_om,
              stride_on, APPLY_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TMA_STORE: tl.constexpr):
    """Output tile (pid_m, pid_n) from TMA loads of A and B, then the epilogue. ``TMA_STORE``:
    ``out_ptr`` is a descriptor of the output too, and the tile leaves through it (the copy engine
    clips the ragged edges; the stores need no masks or per-thread addresses)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = a_desc.load([pid_m * BLOCK_M, k * BLOCK_K])
        b = b_desc.load([pid_n * BLOCK_N, k * BLOCK_K])
        acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    if TMA_STORE:
        if APPLY_EPILOGUE:
            out = _epilogue(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, HAS_BIAS)
            out_ptr.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out.to(out_ptr.dtype))
        else:
            out_ptr.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc)
    else:
        _store_tile(acc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on,
                    APPLY_EPILOGUE, HAS_BIAS)


@triton.jit
def _int8_matmul_tma_persistent_kernel(
    a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, stride_om, stride_on,
    APPLY_EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, TMA_STORE: tl.constexpr,
):
    """:func:`_int8_matmul_tma_kernel` as a persistent kernel (experimental; ``tune_int8.py --tma
    --persistent``): NUM_PROGRAMS programs (one per SM) walk the output tiles in grouped order, the
    tile loop flattened with the K loop so the next tile's loads overlap this tile's epilogue."""
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        _tma_tile(a_desc, b_desc, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, pid_m, pid_n, M, N, K, stride_om,
                  stride_on, APPLY_EPILOGUE, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, TMA_STORE)


def tma_ok(a, b) -> bool:
    """Whether int8 operands ``a [M, K]``, ``b [N, K]`` allow TMA descriptors: row-major, 16-byte
    aligned rows and base, a GPU of compute capability 9+ (or the interpreter), Triton >= 3.4."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    import torch

    from deepseek_kernels.ops._registry import interpreting

    if not interpreting() and not (a.is_cuda and torch.cuda.get_device_capability(a.device)[0] >= 9):
        return False
    return all(t.stride(1) == 1 and t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (a, b))


def persistent_tma_config(M: int, N: int, K: int, out_dtype) -> dict | None:
    """The persistent TMA kernel's tile shape for large GEMMs with a 16-bit output, None where the
    plain kernel is used. H200, TMA vs plain in one process (benchmarks/diag_int8_tma.py; 128x256x128,
    8 warps, 4 stages, bf16 out): 8192^3 823/827 vs 927/897 us in session 5 (975 vs 939 in one session-6
    call: run-to-run spread of one kernel reaches ~10 %); M8192 N4096 K4096 223.5 vs 247.3 us and N14336
    K4096 803 vs 878 us (session 6); N4096 K14336 859 vs 823 us and 4096^3 118 vs 109 us (slower). Hence
    M >= 8192 with N >= 8192 (session 13: N4096 K4096 now takes the plain kernel's 128x128 one-warpgroup tile,
    0.207 vs 0.225 ms from rest; see :func:`launch_config`). A 32-bit output's epilogue tile does not fit next
    to 4 stages (320 KiB of shared memory). Only eager calls take it (``ops.int8_matmul``); inside
    torch.compile the plain kernel runs (the same int32 sums and epilogue: the same bits,
    tests/test_int8_matmul.py)."""
    import torch

    if os.environ.get("DSK_INT8_PERSISTENT", "1") == "0":  # tuning aid: the plain kernel everywhere
        return None
    if M >= 8192 and N >= 8192 and K >= 1024 and out_dtype in (torch.bfloat16, torch.float16):
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=4)
    return None


def tma_store_ok(out) -> bool:
    """Whether the output ``[M, N]`` allows a TMA store: row-major, 16-byte aligned rows and base."""
    return (out.stride(1) == 1 and (out.stride(0) * out.element_size()) % 16 == 0
            and out.data_ptr() % 16 == 0)


def launch_tma(a, b, out, a_scale, b_scale, bias, cfg: dict, apply_epilogue: bool = True,
               persistent_programs: int | None = None, tma_store: bool = False) -> None:
    """Runs :func:`_int8_matmul_tma_kernel`, or with ``persistent_programs`` (e.g. the SM count)
    :func:`_int8_matmul_tma_persistent_kernel` on that many programs (plain launches; the tuner and
    tests call them). ``tma_store``: the output tile leaves through a descriptor as well (an
    experiment: ``tune_int8.py --tma --tma-store``; needs :func:`tma_store_ok`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = a.shape
    N = b.shape[0]
    a_desc = TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
    b_desc = TensorDescriptor.from_tensor(b, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
    if tma_store and not tma_store_ok(out):
        raise ValueError(f"launch_tma: tma_store needs a row-major output with 16-byte aligned rows, got "
                         f"shape {tuple(out.shape)} strides {out.stride()} of {out.dtype}")
    dst = TensorDescriptor.from_tensor(out, [cfg["BLOCK_M"], cfg["BLOCK_N"]]) if tma_store else out
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    args = (a_desc, b_desc, dst, a_scale if a_scale is not None else out, b_scale if b_scale is not None else out,
            bias if bias is not None else out, M, N, K, out.stride(0), out.stride(1))
    flags = dict(APPLY_EPILOGUE=apply_epilogue, HAS_BIAS=bias is not None, TMA_STORE=tma_store, **cfg)
    if persistent_programs:
        programs = max(1, min(persistent_programs, tiles))
        _int8_matmul_tma_persistent_kernel[(programs,)](*args, NUM_PROGRAMS=programs, **flags)
    else:
        _int8_matmul_tma_kernel[(tiles,)](*args, **flags)


@triton.jit
def _round_half_even(y):
    """Round to nearest, ties to even, for |y| < 2^22 (exact: y - floor(y) has no rounding there)."""
    f = tl.floor(y)
    d = y - f
    odd = f - 2.0 * tl.floor(f * 0.5)  # 1.0 when f is odd
    return f + tl.where(d > 0.5, 1.0, tl.where(d == 0.5, odd, 0.0))


@triton.jit
def _load_scaled(x_row, smooth_ptr, offs, K, HAS_SMOOTH: tl.constexpr):
    mask = offs < K
    xs = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        xs = tl.math.div_rn(xs, tl.load(smooth_ptr + offs, mask=mask, other=1.0).to(tl.float32))
    return xs


@triton.jit
def _row_scale(amax, nan):
    """(scale, 1 / scale) of a row from its per-lane |x| maxima and NaN flags (NaN anywhere: NaN)."""
    row_amax = tl.where(tl.max(nan, 0) > 0, float("nan"), tl.max(amax, 0))  # tl.max drops NaN
    scale = tl.math.div_rn(row_amax, 127.0)
    return scale, tl.where(scale > 0, tl.math.div_rn(1.0, scale), 0.0)


@triton.jit
def _store_codes(q_row, xs, inv, offs, k_left):
    y = xs * inv
    bad = y != y
    y = _round_half_even(tl.minimum(tl.maximum(y, -127.0), 127.0))
    tl.store(q_row + offs, tl.where(bad, 0.0, y).to(tl.int8), mask=offs < k_left)


@triton.jit
def _quantize_per_token_kernel(x_ptr, smooth_ptr, q_ptr, scale_ptr, K, stride_xm, stride_qm,
                               HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """One program per row: amax of |x / smooth|, then the codes, with the reference's arithmetic
    (div_rn for the divisions, round half to even). A row that fits one tile (K <= BLOCK_K: the
    launcher's choice up to 16384) is read once and kept in registers; longer rows are read twice
    (the second read mostly hits L2). ``PDL``: a programmatic dependent launch
    (:func:`deepseek_kernels.triton._common.chain_start`): the GEMM after it can start at once."""
    chain_start(PDL)
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * stride_qm
    offs = tl.arange(0, BLOCK_K)
    if K <= BLOCK_K:
        xs = _load_scaled(x_row, smooth_ptr, offs, K, HAS_SMOOTH)
        scale, inv = _row_scale(tl.abs(xs), (xs != xs).to(tl.int32))
        tl.store(scale_ptr + row, scale)
        _store_codes(q_row, xs, inv, offs, K)
    else:
        amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
        nan = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            xs = _load_scaled(x_row + k0, smooth_ptr + k0, offs, K - k0, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.abs(xs))
            nan = nan | (xs != xs).to(tl.int32)
        scale, inv = _row_scale(amax, nan)
        tl.store(scale_ptr + row, scale)
        for k0 in range(0, K, BLOCK_K):
            xs = _load_scaled(x_row + k0, smooth_ptr + k0, offs, K - k0, HAS_SMOOTH)
            _store_codes(q_row + k0, xs, inv, offs, K - k0)


def launch_config(M: int, N: int, K: int) -> dict:
    """Tile shape by problem size, from benchmarks/tune_int8.py on the H200 (benchmarks/NOTES.md).

    Small M is a weight-streaming GEMV: narrow column tiles (many CTAs in flight) and deep K
    tiles; long K gets deeper K tiles and more stages. 16 < M <= 128 is not tuned yet."""
    if M <= 16:
        # 2 warps per 16x32 tile (session 8, tune_int8.py --shapes "1,14336,4096;16,14336,4096;1,4096,14336",
        # graphed): M16 N14336 K4096 17.11 us vs 17.36 with 4 warps; M1 N4096 K14336 17.00 vs 17.16 us
        if K >= 8192:
            return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=1024, GROUP_M=1, num_warps=2, num_stages=4)
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=1, num_warps=2, num_stages=3)
    if M <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4)
    if M <= 4096:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=3)
    override = os.environ.get("DSK_INT8_LARGE_TILE")  # tuning aid: "BLOCK_M,BLOCK_N,BLOCK_K,warps,stages"
    if override:
        try:
            bm, bn, bk, warps, stages = (int(v) for v in override.split(","))
        except ValueError:
            raise ValueError(f"DSK_INT8_LARGE_TILE must be five integers 'BLOCK_M,BLOCK_N,BLOCK_K,warps,stages', "
                             f"got {override!r}") from None
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    # one warpgroup per 128x128 tile (session 13, M8192, suite rows rested / sustained): N4096 K4096 0.207 / 0.236 ms
    # vs the persistent TMA kernel's 0.225 / 0.243; N4096 K14336 0.681 / 0.767 vs 128x256 w8's 0.755 / 0.852
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=3)
