"""Triton kernels for the gated sparse SwiGLU FFN (forward, backward, decode; untuned).

Semantics: ``deepseek_kernels/reference/sparse_ffn.py``. Shapes: ``x [T, D]`` (D = d_model),
``w_gate, w_up [F, D]``, ``w_down [D, F]`` (F = d_ff = n_blocks * BS), router ``[NR, D]``.

Pipeline (one call of :func:`sparse_ffn_fwd`):

1. ``_sparse_ffn_router_kernel``: logits = x . router^T (fp32 accumulate), sigmoid/softmax, the
   selection bias and threshold, top-k by k rounds of arg-max (ties to the lower index, as the
   reference's stable sort), normalised gates. One program owns BLOCK_T tokens and all NR blocks.
   Few tokens (decode): ``_sparse_ffn_router_split_kernel`` first computes the logits in d_model
   slices on many SMs, and the router kernel sums them (fixed order) instead of the GEMM.
2. Grouping (:func:`route_pairs`: a stable counting sort in three kernels, no host sync; the torch
   form :func:`full_routing` + :func:`group_pairs` gives the same bits and serves the CPU path):
   every (token, block) pair, shared blocks included, is sorted by block; ``offsets`` delimit the
   blocks' row ranges and a tile table maps program ids to (block, first row). The grid is the
   static upper bound ``cdiv(P, BLOCK_M) + n_blocks`` tiles; programs past the last tile exit at
   once. (The torch form's ~50 small launches per grouping made the training step host-bound on
   the H200, session 32.)
3. ``_sparse_ffn_gate_up_kernel``: grouped GEMM over the active blocks, x rows gathered by token
   id (no permuted copy of x), gate and up accumulated side by side, SwiGLU in the epilogue;
   writes ``h [P, BS]`` and, for the backward, the pre-activations ``act [P, 2, BS]``.
4. ``_sparse_ffn_down_kernel``: grouped GEMM ``y[p] = h[p] . w_down[:, block]^T`` -> ``[P, D]``.
5. ``_sparse_ffn_combine_kernel``: ``out[t] = sum_j weight[t, j] * y[inv[t, j]]`` in fp32, a
   gather (deterministic, no atomics); empty slots (``inv = -1``) are skipped. (Steps 4 and 5 fused
   with fp32 atomics, so that y never reaches memory, measured 1.5x slower on the H200 in session 18:
   3.59 against 2.39 ms for the T8192 forward at ratio 0.3; removed.)

Backward: the kernels after :func:`sparse_ffn_fwd` (B1-B4, deterministic). Decode (<= 16 tokens,
inference): :func:`sparse_ffn_decode`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from deepseek_kernels.ops._registry import triton_kernel
from deepseek_kernels.triton._common import (big_shared_memory, chain_trigger, chain_wait, f32, fit_stages,
                                              launch_options, pdl_option, plain_eager, resolve_launch,
                                              shared_memory_limit)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs are meant to be exact-ish (tests, fp32 training): no TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---- 1. router -----------------------------------------------------------------------------------


@triton.jit
def _router_logits(X, WR, T, D, NR, d_lo, d_hi, stride_xt, stride_xd, stride_wn, stride_wd, offs_t, offs_n,
                   DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_NR: tl.constexpr):
    """fp32 x[offs_t, d_lo:d_hi] . router[offs_n, d_lo:d_hi]^T."""
    t_mask = offs_t < T
    n_mask = offs_n < NR
    acc = tl.zeros((BLOCK_T, BLOCK_NR), dtype=tl.float32)
    for d0 in range(d_lo, d_hi, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_hi
        xt = _router_x_tile(X, stride_xt, stride_xd, offs_t, offs_d, t_mask, d_mask)
        acc = tl.dot(xt, _router_w_tile(WR, stride_wn, stride_wd, offs_n, offs_d, n_mask, d_mask), acc,
                     input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _router_w_tile(WR, stride_wn, stride_wd, offs_n, offs_d, n_mask, d_mask):
    """router[offs_n, offs_d]^T as [len(offs_d), len(offs_n)], zeros outside the masks."""
    return tl.load(WR + offs_n[None, :] * stride_wn + offs_d[:, None] * stride_wd,
                   mask=d_mask[:, None] & n_mask[None, :], other=0.0)


@triton.jit
def _router_x_tile(X, stride_xt, stride_xd, offs_t, offs_d, t_mask, d_mask):
    """x[offs_t, offs_d], zeros outside the masks."""
    return tl.load(X + offs_t[:, None].to(tl.int64) * stride_xt + offs_d[None, :] * stride_xd,
                   mask=t_mask[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _sparse_ffn_router_split_kernel(
    X, WR, PART, T, D, NR, d_per_split,
    stride_xt, stride_xd, stride_wn, stride_wd,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NR: tl.constexpr,
    BLOCK_NRS: tl.constexpr,
    PDL: tl.constexpr = False, EARLY_W: tl.constexpr = False, EARLY_TRIGGER: tl.constexpr = False,
):
    """Few tokens: the logits GEMM split over d_model slices (program_id(1)) and router rows
    (program_id(2), BLOCK_NRS rows each), so the router weight streams through many SMs (one program
    walking all of it is a chain of dependent loads). PART[s, t, n] = fp32 partial logits of slice s;
    the router kernel sums the slices in order.

    ``EARLY_W`` (the launcher checks that a slice is one BLOCK_D tile): the slice's router-weight tile is loaded
    before the programmatic-dependent-launch wait (a weight: nothing before this kernel writes it), x after it,
    then one dot over the slice. ``EARLY_TRIGGER``: the next kernel may launch at once (see :data:`ROUTER_EARLY_TRIGGER`)."""
    if EARLY_TRIGGER:
        chain_trigger(PDL)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(2) * BLOCK_NRS + tl.arange(0, BLOCK_NRS)
    s = tl.program_id(1)
    d_lo = s * d_per_split
    d_hi = tl.minimum(d_lo + d_per_split, D)
    if EARLY_W:
        offs_d = d_lo + tl.arange(0, BLOCK_D)
        d_mask = offs_d < d_hi
        w = _router_w_tile(WR, stride_wn, stride_wd, offs_n, offs_d, offs_n < NR, d_mask)
        chain_wait(PDL)
        acc = tl.dot(_router_x_tile(X, stride_xt, stride_xd, offs_t, offs_d, offs_t < T, d_mask), w,
                     input_precision=DOT_PRECISION)
    else:
        chain_wait(PDL)
        acc = _router_logits(X, WR, T, D, NR, d_lo, d_hi, stride_xt, stride_xd, stride_wn, stride_wd, offs_t,
                             offs_n, DOT_PRECISION, BLOCK_T, BLOCK_D, BLOCK_NRS)
    if not EARLY_TRIGGER:
        chain_trigger(PDL)
    tl.store(PART + (s * T + offs_t[:, None]).to(tl.int64) * BLOCK_NR + offs_n[None, :], acc,
             mask=offs_t[:, None] < T)


@triton.jit
def _select_topk_by_rank(p, sel, offs_n, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Top-k by rank, without the k-step loop of max / argmin / mask reductions: ``rank[t, n]`` =
    how many entries sort before ``n`` (larger ``sel``, or equal at a lower index; NaN before all,
    as torch.sort descending puts it), one [T, NR, NR] compare-and-count; slot ``j`` then takes the
    entry of rank ``j < K`` if its ``sel`` is above -inf (NaN is not). The reference's result for every
    input, NaN scores included (tested); the tile is T x NR x NR, so the launcher keeps T small
    (2 tokens per program)."""
    nan = sel != sel
    s_m = sel[:, :, None]
    s_n = sel[:, None, :]
    nan_m = nan[:, :, None]
    nan_n = nan[:, None, :]
    greater = (nan_m & ~nan_n) | (~nan_m & ~nan_n & (s_m > s_n))
    equal = (nan_m & nan_n) | (s_m == s_n)
    lower = (offs_n[:, None] < offs_n[None, :])[None, :, :]
    rank = tl.sum((greater | (equal & lower)).to(tl.int32), 1)  # [T, NR]: entries m before n
    valid = sel > float("-inf")
    cols = tl.arange(0, BLOCK_K)
    hit = (rank[:, None, :] == cols[None, :, None]) & valid[:, None, :] & (cols < K)[None, :, None]  # [T, BLOCK_K, NR]
    found = tl.sum(hit.to(tl.int32), 2) > 0
    idx = tl.where(found, tl.sum(tl.where(hit, offs_n[None, None, :], 0), 2), -1)
    g = tl.sum(tl.where(hit, p[:, None, :], 0.0), 2)
    return idx, g


@triton.jit
def _select_topk_by_sort(p, sel, offs_n, K: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_K: tl.constexpr):
    """The same top-k as :func:`_select_topk_by_rank` through one ``tl.topk`` of int64 keys: the high word orders
    the scores (fp32 bits made monotone as int32; -0.0 counted as +0.0, every NaN as the largest key, as
    torch.sort descending puts NaN first), the low word ``BLOCK_NR - 1 - n`` breaks ties towards the lower index.
    A slot is empty (-1) where its entry is NaN or -inf, or past K. Sorting the BLOCK_NR keys of a token is a
    bitonic network within the token's lanes instead of a [T, NR, NR] compare-and-count."""
    s = tl.where(sel == 0.0, 0.0, sel)  # -0.0 -> +0.0: equal scores tie on the index
    bits = s.to(tl.int32, bitcast=True)
    hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    hi = tl.where(sel != sel, 0x7FFFFFFF, hi)
    key = (hi.to(tl.int64) << 32) | (BLOCK_NR - 1 - offs_n)[None, :].to(tl.int64)
    top = tl.topk(key, BLOCK_K, dim=1)  # [T, BLOCK_K], largest first
    top_hi = (top >> 32).to(tl.int32)
    n = BLOCK_NR - 1 - (top & 0xFFFFFFFF).to(tl.int32)
    cols = tl.arange(0, BLOCK_K)
    # -inf maps to 0xFF800000 ^ 0x7FFFFFFF = -2139095041; NaN to 0x7FFFFFFF
    valid = (top_hi > -2139095041) & (top_hi != 0x7FFFFFFF) & (cols < K)[None, :]
    idx = tl.where(valid, n, -1)
    g = tl.where(valid, tl.gather(p, tl.where(valid, n, 0), 1), 0.0)
    return idx, g


@triton.jit
def _sum_partial_logits(PART, T, offs_t, offs_n, SPLITS: tl.constexpr, BLOCK_T: tl.constexpr,
                        BLOCK_NR: tl.constexpr):
    """The logits of tokens offs_t: the SPLITS partial slices of the split kernel summed in slice order
    (loads unrolled and independent; deterministic)."""
    acc = tl.zeros((BLOCK_T, BLOCK_NR), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(PART + (s * T + offs_t[:, None]).to(tl.int64) * BLOCK_NR + offs_n[None, :],
                       mask=(offs_t < T)[:, None], other=0.0)
    return acc


@triton.jit
def _route_tile(acc, BIAS, NR, threshold, offs_n, K: tl.constexpr, SOFTMAX: tl.constexpr,
                NORMALISE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_THRESHOLD: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_K: tl.constexpr, SELECT: tl.constexpr):
    """Logits [BLOCK_T, BLOCK_NR] -> (probs, idx int32 [BLOCK_T, BLOCK_K] (-1: empty slot), weights):
    the gate (softmax or sigmoid), the selection score (+ bias, threshold), the top-K (SELECT: 0 K rounds
    of arg-max, 1 by rank, 2 by sorting keys; lowest index first among equals in each) and the weights
    (gate normalised over the chosen blocks, or 1)."""
    n_mask = offs_n < NR
    if SOFTMAX:
        logits = tl.where(n_mask[None, :], acc, float("-inf"))
        e = tl.exp(logits - tl.max(logits, 1)[:, None])
        p = e / tl.sum(e, 1)[:, None]
    else:
        p = tl.sigmoid(acc)
    p = tl.where(n_mask[None, :], p, 0.0)
    sel = p
    if HAS_BIAS:
        sel = sel + tl.load(BIAS + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_THRESHOLD:
        sel = tl.where(p > threshold, sel, float("-inf"))
    sel = tl.where(n_mask[None, :], sel, float("-inf"))

    cols = tl.arange(0, BLOCK_K)
    if SELECT == 1:
        idx, g = _select_topk_by_rank(p, sel, offs_n, K, BLOCK_K)
    elif SELECT == 2:
        idx, g = _select_topk_by_sort(p, sel, offs_n, K, BLOCK_NR, BLOCK_K)
    else:
        idx = tl.full((BLOCK_T, BLOCK_K), -1, dtype=tl.int32)
        g = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        for j in range(K):
            best = tl.max(sel, 1)
            # the lowest index among the maxima: the reference's stable descending sort
            pick = tl.min(tl.where(sel == best[:, None], offs_n[None, :], BLOCK_NR), 1)
            valid = best > float("-inf")
            hit = offs_n[None, :] == pick[:, None]
            gp = tl.sum(tl.where(hit, p, 0.0), 1)
            idx = tl.where(cols[None, :] == j, tl.where(valid, pick, -1)[:, None], idx)
            g = tl.where(cols[None, :] == j, tl.where(valid, gp, 0.0)[:, None], g)
            sel = tl.where(hit, float("-inf"), sel)
    if NORMALISE:
        total = tl.sum(g, 1)
        w_out = g / tl.where(total > 0, total, 1.0)[:, None]
    else:
        w_out = tl.where(idx >= 0, 1.0, 0.0)
    return p, idx, w_out


@triton.jit
def _store_route(IDX, WOUT, PROBS, p, idx, w_out, T, NR, offs_t, offs_n, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Stores probs [T, NR], idx and weights [T, K] of tokens offs_t."""
    t_mask = offs_t < T
    tl.store(PROBS + offs_t[:, None].to(tl.int64) * NR + offs_n[None, :], p,
             mask=t_mask[:, None] & (offs_n < NR)[None, :])
    cols = tl.arange(0, BLOCK_K)
    out_off = offs_t[:, None].to(tl.int64) * K + cols[None, :]
    out_mask = t_mask[:, None] & (cols[None, :] < K)
    tl.store(IDX + out_off, idx, mask=out_mask)
    tl.store(WOUT + out_off, w_out, mask=out_mask)


@triton.jit
def _sparse_ffn_router_kernel(
    X, WR, BIAS, IDX, WOUT, PROBS, PART,
    T, D, NR, threshold,
    stride_xt, stride_xd, stride_wn, stride_wd,
    K: tl.constexpr, SOFTMAX: tl.constexpr, NORMALISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_K: tl.constexpr,
    SELECT: tl.constexpr,
    PDL: tl.constexpr = False, EARLY_TRIGGER: tl.constexpr = False,
):
    """x [T, D], router [NR, D] -> idx int32 [T, K], weights fp32 [T, K], probs fp32 [T, NR].
    ``SPLITS`` > 0: the logits are the sum of the SPLITS partial slices in PART (split kernel),
    loaded unrolled (independent loads, summed in slice order: deterministic); 0: computed here.
    ``SELECT``: 0 K rounds of reductions, 1 the top-k by rank (:func:`_select_topk_by_rank`: it needs the
    logits from PART, its [BLOCK_T, NR, NR] tile wants few tokens), 2 by sorting (:func:`_select_topk_by_sort`).
    ``EARLY_TRIGGER``: the next kernel may launch at once (see :data:`ROUTER_EARLY_TRIGGER`)."""
    if EARLY_TRIGGER:
        chain_trigger(PDL)
    chain_wait(PDL)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_NR)
    if SPLITS > 0:
        acc = _sum_partial_logits(PART, T, offs_t, offs_n, SPLITS, BLOCK_T, BLOCK_NR)
    else:
        acc = _router_logits(X, WR, T, D, NR, 0, D, stride_xt, stride_xd, stride_wn, stride_wd, offs_t, offs_n,
                             DOT_PRECISION, BLOCK_T, BLOCK_D, BLOCK_NR)
    if not EARLY_TRIGGER:
        chain_trigger(PDL)
    p, idx, w_out = _route_tile(acc, BIAS, NR, f32(threshold), offs_n, K, SOFTMAX, NORMALISE, HAS_BIAS,
                                HAS_THRESHOLD, BLOCK_T, BLOCK_NR, BLOCK_K, SELECT)
    _store_route(IDX, WOUT, PROBS, p, idx, w_out, T, NR, offs_t, offs_n, K, BLOCK_K)


ROUTER_MAX_SPLITS = 16


def router_splits(T: int, D: int, device: torch.device, block_t: int = 32, block_d: int = 64) -> int:
    """How many d_model slices the router logits are split into: 1 (one kernel) unless the token
    tiles leave most SMs idle (decode, small prefill); then up to ROUTER_MAX_SPLITS slices (each
    program of the split kernel also takes only 16 router rows), at most one per BLOCK_D columns."""
    if device.type != "cuda":
        return 1
    from deepseek_kernels.triton._common import sm_count

    t_tiles = triton.cdiv(T, block_t)
    if 4 * t_tiles >= sm_count(device):
        return 1
    return max(1, min(triton.cdiv(D, block_d), ROUTER_MAX_SPLITS, triton.cdiv(sm_count(device), t_tiles)))


# With programmatic dependent launches, the split kernel loads its slice's router-weight tile before its wait, so
# the load overlaps the tail of the kernel before it (as the decode's down kernel does with its first w_down
# tile), where a slice is at most ROUTER_EARLY_W_MAX_D columns (one tile of 16 router rows; up to 256 tokens at
# d_model 4096 the logits split 16 ways: 256). Without PDL the slice is still one tile. Same bits. H200, session 29
# (benchmarks/ab_sparse_decode_flag.py, graphed op, 6 alternating rounds): 1 token 24.9 / 24.9 / 24.9 / 26.0 /
# 25.9 / 26.0 us vs 25.4 / 25.5 / 25.5 / 25.5 / 26.4 / 26.4 (faster in 5 of 6 rounds; the readings of both jump
# ~1 us together mid-run), 2 tokens 38.5-38.6 vs 38.8-39.0 in every round.
ROUTER_EARLY_W = True
ROUTER_EARLY_W_MAX_D = 256
# With programmatic dependent launches and at most ROUTER_EARLY_TRIGGER_MAX_T tokens (grids far smaller than the
# GPU: 64 split programs, 1-8 selecting ones), both router kernels let the next kernel launch as they start
# instead of after their loads: its programs take free SMs and wait there (griddepcontrol.wait still waits for this
# kernel's end and its stores), so its launch latency overlaps this kernel. Same bits (PDL ordering only). H200,
# session 29 (benchmarks/ab_sparse_decode_flag.py, graphed op, 6 alternating rounds): 2 tokens 37.3-37.4 vs
# 37.7-37.8 us in every round; 1 token a tie (25.1 / 25.1 / 25.1 / 25.8 / 25.8 / 25.8 vs 25.0 / 25.1 / 25.1 /
# 25.1 / 26.1 / 26.2: both jump ~1 us mid-run, at different rounds).
ROUTER_EARLY_TRIGGER = True
ROUTER_EARLY_TRIGGER_MAX_T = 16
ROUTER_SELECT = ("auto", "loop", "rank", "sort")
_SELECT_CODE = {"loop": 0, "rank": 1, "sort": 2}  # the router kernel's SELECT
# "auto" takes a whole-token selection (SMALL_T_SELECT) up to this many tokens. H200, session 10
# (diag_sparse_decode.py, router only, 64 blocks, 15 % active): T=1 6.4 us rank vs 8.2 loop (16 splits), T=8 6.6
# vs 9.0; larger T not timed yet.
RANK_SELECT_MAX_T = 16
# What "auto" takes up to RANK_SELECT_MAX_T tokens: "rank" or "sort" (the same blocks in the same slots; the
# normalised weights can differ in the last bit: their sum is reduced in another order). H200, session 23
# (benchmarks/diag_router_select.py, graphed, split kernel included): router T1 / T2 / T8 4.3 / 4.3 / 4.4 us
# sorting vs 6.1-6.4 / 6.4-6.5 / 6.6 by rank; the decode op T1 26.1-26.9 vs 28.3 us, T8 81.5-82.0 vs 83.6-84.3.
SMALL_T_SELECT = "sort"


def _router_early_trigger(T: int) -> bool:
    """Whether the router kernels of a T-token call trigger their dependents' launch as they start."""
    return ROUTER_EARLY_TRIGGER and T <= ROUTER_EARLY_TRIGGER_MAX_T


def _router_partial_logits(x, router_weight, splits: int, d_per_split: int, block_d: int, block_nr: int,
                           direct: bool, pdl: bool) -> torch.Tensor:
    """Launches the split kernel: fp32 partial logits ``[splits, T, block_nr]`` of d_model slices."""
    T, D = x.shape
    split_block_t = 16  # the split kernel's token tile (its tl.dot wants >= 16 rows)
    part = torch.empty(splits, T, block_nr, dtype=torch.float32, device=x.device)
    early = ROUTER_EARLY_W and d_per_split <= ROUTER_EARLY_W_MAX_D  # without PDL: the slice as one tile
    if early:
        block_d = max(16, triton.next_power_of_2(d_per_split))  # the slice in one tile
    triton_kernel(_sparse_ffn_router_split_kernel, direct)[(triton.cdiv(T, split_block_t), splits, block_nr // 16)](
        x, router_weight, part, T, D, router_weight.shape[0], d_per_split,
        x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1),
        DOT_PRECISION=_dot_precision(x.dtype), BLOCK_T=split_block_t, BLOCK_D=block_d, BLOCK_NR=block_nr,
        BLOCK_NRS=16, PDL=pdl, EARLY_W=early, EARLY_TRIGGER=_router_early_trigger(T), num_warps=4,
        **pdl_option(pdl),
    )
    return part


def _split_plan(T: int, D: int, device: torch.device, block_t: int, block_d: int, splits: int | None):
    """(splits, d_per_split) of the router logits: slices of whole BLOCK_D tiles, recounted so that none is empty."""
    splits = router_splits(T, D, device, block_t, block_d) if splits is None else int(splits)
    if not 1 <= splits <= ROUTER_MAX_SPLITS:
        raise ValueError(f"sparse_ffn_route: splits must be in [1, {ROUTER_MAX_SPLITS}], got {splits}")
    d_per_split = triton.cdiv(triton.cdiv(D, splits), block_d) * block_d
    return triton.cdiv(D, d_per_split), d_per_split


def sparse_ffn_route(x: torch.Tensor, router_weight: torch.Tensor, *, k: int, gate: str, weighting: str,
                     bias: torch.Tensor | None = None, threshold: float | None = None,
                     block_t: int | None = None, block_d: int = 64, num_warps: int | None = None,
                     direct: bool = False, splits: int | None = None, select: str = "auto", pdl: bool = False):
    """Launcher of the fused router. Returns ``(idx int32 [T, k], weights fp32 [T, k], probs fp32 [T, NR])``.
    ``splits``: d_model slices of the logits GEMM (None: :func:`router_splits`; > 1 adds one launch,
    at most ROUTER_MAX_SPLITS). ``block_t`` / ``num_warps``: the token tile and warps of the router
    kernel (None: 32 for one kernel, 16 after a split, where the kernel only selects; 4 warps: on the
    H200 at one token the split path took 8.2 us with 4 selecting warps, 15.9 us with 1, and the one
    kernel path 26.2 us, benchmarks/diag_sparse_decode.py). ``select="rank"``: the top-k by rank
    (one compare-and-count instead of k rounds of reductions; the logits always go through the
    split kernel then, and the selecting kernel takes 2 tokens per program); ``"loop"``: k rounds of
    arg-max; ``"sort"``: the same top-k from one bitonic sort of (score, index) keys per token (``tl.topk``);
    ``"auto"``: SMALL_T_SELECT (sort) up to RANK_SELECT_MAX_T tokens (where it was timed faster), else loop.
    ``pdl``: programmatic dependent launches (Hopper; ``deepseek_kernels.ops._registry.pdl_enabled``)."""
    if select not in ROUTER_SELECT:
        raise ValueError(f"sparse_ffn_route: select must be one of {ROUTER_SELECT}, got {select!r}")
    T, D = x.shape
    NR = router_weight.shape[0]
    if bias is not None and bias.stride(0) != 1:  # the kernel reads the bias contiguously
        bias = bias.contiguous()
    idx = torch.empty(T, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=x.device)
    probs = torch.empty(T, NR, dtype=torch.float32, device=x.device)
    if T == 0:
        return idx, weights, probs
    splits, d_per_split = _split_plan(T, D, x.device, block_t or 32, block_d, splits)
    if select == "auto":
        select = SMALL_T_SELECT if T <= RANK_SELECT_MAX_T else "loop"
    whole_token = select in ("rank", "sort")  # a token's scores compared at once: 2 tokens per program
    use_part = splits > 1 or whole_token  # the logits from the split kernel (one slice is fine)
    block_t = block_t or (2 if whole_token else 16 if use_part else 32)
    num_warps = num_warps or 4
    block_nr = max(16, triton.next_power_of_2(NR))
    prec = _dot_precision(x.dtype)
    grid = (triton.cdiv(T, block_t),)
    part = probs
    if use_part:
        part = _router_partial_logits(x, router_weight, splits, d_per_split, block_d, block_nr, direct, pdl)
    triton_kernel(_sparse_ffn_router_kernel, direct)[grid](
        x, router_weight, bias if bias is not None else probs, idx, weights, probs, part,
        T, D, NR, float(threshold) if threshold is not None else 0.0,
        x.stride(0), x.stride(1), router_weight.stride(0), router_weight.stride(1),
        K=k, SOFTMAX=gate == "softmax", NORMALISE=weighting == "gate", HAS_BIAS=bias is not None,
        HAS_THRESHOLD=threshold is not None, SPLITS=splits if use_part else 0, DOT_PRECISION=prec,
        BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_NR=block_nr,
        BLOCK_K=max(2, triton.next_power_of_2(k)), SELECT=_SELECT_CODE[select], PDL=pdl,
        EARLY_TRIGGER=_router_early_trigger(T), num_warps=num_warps, **pdl_option(pdl),
    )
    return idx, weights, probs


@triton.jit
def _route_bwd_kernel(PROBS, IDX, WTS, GW, GP, DL, T, NR, K, HAS_GW: tl.constexpr, HAS_GP: tl.constexpr,
                      SOFTMAX: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_NR: tl.constexpr):
    """The router's dlogits [T, NR] from the gate values ``probs`` and the gradients of the normalised weights
    (``GW``, weighting "gate") and of ``probs`` (``GP``, e.g. an aux loss): with S the sum of the chosen slots'
    probs, dp = GP + scatter over the chosen blocks of (dw_j - sum_i dw_i w_i) / S, then the gate's derivative
    (sigmoid: dp p (1 - p); softmax: p (dp - sum dp p)). One program per BLOCK_T tokens, all NR blocks."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cs = tl.arange(0, BLOCK_NR)
    t_ok = ts < T
    rows = ts.to(tl.int64)
    m = t_ok[:, None] & (cs < NR)[None, :]
    tile = rows[:, None] * NR + cs[None, :]
    p = tl.load(PROBS + tile, mask=m, other=0.0)
    if HAS_GP:
        dp = tl.load(GP + tile, mask=m, other=0.0).to(tl.float32)
    else:
        dp = tl.zeros((BLOCK_T, BLOCK_NR), dtype=tl.float32)
    if HAS_GW:
        total = tl.zeros((BLOCK_T,), dtype=tl.float32)
        dot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for j in range(K):
            c = tl.load(IDX + rows * K + j, mask=t_ok, other=-1)
            total += tl.load(PROBS + rows * NR + c, mask=t_ok & (c >= 0), other=0.0)
            dot += (tl.load(GW + rows * K + j, mask=t_ok, other=0.0).to(tl.float32)
                    * tl.load(WTS + rows * K + j, mask=t_ok, other=0.0))
        inv_total = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
        for j in range(K):
            c = tl.load(IDX + rows * K + j, mask=t_ok, other=-1)  # -1: an empty slot, no block
            d = (tl.load(GW + rows * K + j, mask=t_ok, other=0.0).to(tl.float32) - dot) * inv_total
            dp += tl.where(cs[None, :] == c[:, None], d[:, None], 0.0)
    if SOFTMAX:
        dl = p * (dp - tl.sum(dp * p, 1)[:, None])
    else:
        dl = dp * p * (1.0 - p)
    tl.store(DL + tile, dl.to(DL.dtype.element_ty), mask=m)


def route_backward_logits(probs: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                          grad_weights: torch.Tensor | None, grad_probs: torch.Tensor | None, gate: str,
                          out_dtype: torch.dtype, direct: bool = False) -> torch.Tensor:
    """The router's dlogits ``[T, NR]`` in ``out_dtype`` in one kernel (the torch form in
    ``ops.sparse_ffn._route_backward`` is ~15 small launches). ``grad_weights``: None unless weighting "gate"."""
    T, NR = probs.shape
    K = idx.shape[1]
    probs = probs.contiguous()
    dl = torch.empty(T, NR, dtype=out_dtype, device=probs.device)
    if T == 0:
        return dl
    gw = None if grad_weights is None or K == 0 else grad_weights.contiguous()
    gp = None if grad_probs is None else grad_probs.contiguous()
    block_nr = triton.next_power_of_2(NR)
    block_t = max(1, min(64, 4096 // block_nr))
    triton_kernel(_route_bwd_kernel, direct)[(triton.cdiv(T, block_t),)](
        probs, idx.contiguous(), weights.contiguous(), probs if gw is None else gw, probs if gp is None else gp, dl,
        T, NR, K, HAS_GW=gw is not None, HAS_GP=gp is not None, SOFTMAX=gate == "softmax", BLOCK_T=block_t,
        BLOCK_NR=block_nr)
    return dl


# ---- 2. grouping ---------------------------------------------------------------------------------


@dataclass
class Grouping:
    """(token, block) pairs sorted by block. ``P = T * KT`` pairs (KT = shared + routed slots)."""

    sorted_tok: torch.Tensor   # int32 [P]: token of each sorted row
    order: torch.Tensor        # int64 [P]: flat pair index (t * KT + j) of each sorted row
    inv: torch.Tensor          # int64 [T, KT]: sorted row of pair (t, j), -1 for an empty slot, -2 for an invalid block id
    offsets: torch.Tensor      # int32 [n_blocks + 1]: rows of block b are [offsets[b], offsets[b+1])
    tile_block: torch.Tensor   # int32 [n_tiles]: block of each BLOCK_M row tile (n_blocks: no tile)
    tile_start: torch.Tensor   # int32 [n_tiles]: first row of each tile
    tile_count: torch.Tensor   # int64 [1]: how many of the n_tiles are real (the rest have tile_block n_blocks)
    block_m: int


def full_routing(idx: torch.Tensor, weights: torch.Tensor, shared_blocks: int):
    """Routed ``idx/weights [T, k]`` -> all blocks a token runs ``[T, shared + k]`` (block ids in
    ``[0, n_blocks)``, -1 empty; an invalid id stays out of that range: ids < -1 become -2, ids
    >= n_routed land >= n_blocks), weights float32 (1 for shared blocks)."""
    T = idx.shape[0]
    shared = torch.arange(shared_blocks, device=idx.device, dtype=torch.int32).expand(T, shared_blocks)
    routed = torch.where(idx >= 0, idx + shared_blocks, torch.where(idx == -1, -1, -2)).to(torch.int32)
    blocks = torch.cat([shared, routed], dim=1)
    w = torch.cat([weights.new_ones(T, shared_blocks), weights], dim=1).float()
    return blocks, w


def group_pairs(blocks: torch.Tensor, n_blocks: int, block_m: int) -> Grouping:
    """Sorts the (token, block) pairs of ``blocks [T, KT]`` by block; sync-free torch index ops.

    Ids outside ``[0, n_blocks)`` other than -1 (empty slot) are invalid: they join no block (no
    kernel reads or writes memory for them) and their ``inv`` is -2, which the combine kernel turns
    into a NaN output row for the token, so bad routing never yields a plausible-looking result
    (this replaces a host-synchronising range check on CUDA)."""
    T, KT = blocks.shape
    P = T * KT
    dev = blocks.device
    flat = blocks.reshape(-1).long()
    in_range = (flat >= 0) & (flat < n_blocks)
    key = torch.where(in_range, flat, n_blocks)  # empty slots sort last, into no block
    order = torch.argsort(key, stable=True)
    sorted_tok = torch.div(order, max(KT, 1), rounding_mode="floor").to(torch.int32)
    # offsets by binary search over the sorted keys (not bincount: its output size is data-dependent,
    # which torch.compile cannot trace)
    offsets = torch.searchsorted(key[order], torch.arange(n_blocks + 1, device=dev))
    counts = offsets[1:] - offsets[:-1]
    pos = torch.empty(P, dtype=torch.int64, device=dev)
    pos[order] = torch.arange(P, device=dev)
    inv = torch.where(in_range, pos, torch.where(flat == -1, -1, -2)).reshape(T, KT)
    tiles = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
    tile_end = torch.cumsum(tiles, 0)
    n_tiles = -(-P // block_m) + n_blocks  # static upper bound of sum(tiles)
    t_ids = torch.arange(n_tiles, device=dev)
    tile_block = torch.searchsorted(tile_end, t_ids, right=True)
    b = tile_block.clamp_max(n_blocks - 1)
    first_tile = tile_end[b] - tiles[b]
    tile_start = offsets[b] + (t_ids - first_tile) * block_m
    return Grouping(sorted_tok, order, inv, offsets.to(torch.int32), tile_block.to(torch.int32),
                    tile_start.to(torch.int32), tile_end[-1:], block_m)  # tile_count: a view, no extra launch


# ---- 2b. the same grouping in three kernels (the CUDA / interpreter path) -----------------------------------
#
# group_pairs' torch form is ~40 small launches (argsort's passes, searchsorted, index ops), each a dispatcher
# round trip, plus full_routing's ~8, and a training step groups twice (the backward recomputes the grouping):
# ~90 launches of host time for ~0.1 ms of device work per grouping. ``route_pairs`` gives the same Grouping
# bit for bit, plus the pairs' weights in flat and sorted order, by a stable counting sort over NBP buckets
# (the blocks, then bucket NB for the empty / invalid slots; buckets past those hold the last chunk's padding),
# in chunks of CHUNK consecutive pairs, every step a parallel grid:
#   count: program c counts its chunk's pairs per bucket (a one-hot [CHUNK, NBP] tile summed over pairs);
#   scan:  program b runs the exclusive prefix sum of bucket b's counts over the chunks (in place: each
#          chunk's first position within the bucket) and writes the bucket's total;
#   place: program c gives each of its pairs its position, the bucket's offset (the exclusive prefix sum of
#          the totals) + its chunk's base + how many earlier pairs of the chunk share the bucket (a cumulative
#          sum over the one-hot tile: the sort stays stable), and writes order, sorted_tok, inv, w_full,
#          w_sorted; the last programs write offsets and the row-tile table from the totals.
# Session 32's first form (1024-pair chunks looped in 32-pair steps, one program for the scan and the tile
# table) cost 0.57 ms of device time per training step on the H200 (two groupings: count 141, scan 111, place
# 316 us): its few programs waited on their own dependent steps.

GROUP_TILE = 4096  # elements of a program's one-hot [CHUNK, NBP] tile: CHUNK = GROUP_TILE // NBP pairs
GROUP_MAX_BUCKETS = 1024  # n_blocks + 2 above this: the torch form
GROUP_SCAN_CHUNKS = 1024  # chunks per step of a bucket's prefix sum


@triton.jit
def _pair_keys(IDX, WTS, p, T, K, NB, SHARED: tl.constexpr, PAD: tl.constexpr):
    """For flat pairs ``p = t * KT + j`` (KT = SHARED + K, as full_routing lays them out): the bucket (the block,
    NB for an empty or invalid slot, PAD past the T * KT pairs), the inv code of a slot outside every block (-1
    empty, -2 invalid id), the weight (1 for a shared block), the token, whether p is a pair."""
    KT = SHARED + K
    live = p < T * KT
    t = p // KT
    j = p - t * KT
    routed = live & (j >= SHARED)
    r_off = t.to(tl.int64) * K + (j - SHARED)
    v = tl.load(IDX + r_off, mask=routed, other=0)
    w = tl.load(WTS + r_off, mask=routed, other=1.0).to(tl.float32)
    in_range = (j < SHARED) | ((v >= 0) & (v < NB - SHARED))
    blk = tl.where(j < SHARED, j, v + SHARED)
    key = tl.where(live, tl.where(in_range, blk, NB), PAD)
    code = tl.where(v == -1, -1, -2)
    return key, code, w, t, live


@triton.jit
def _group_count_kernel(IDX, WTS, HIST, T, K, NB, SHARED: tl.constexpr, NBP: tl.constexpr, CHUNK: tl.constexpr):
    """HIST[c, b]: how many pairs of chunk c fall in bucket b."""
    c = tl.program_id(0)
    key, _, _, _, _ = _pair_keys(IDX, WTS, c * CHUNK + tl.arange(0, CHUNK), T, K, NB, SHARED, NBP - 1)
    buckets = tl.arange(0, NBP)
    tl.store(HIST + c * NBP + buckets, tl.sum((key[:, None] == buckets[None, :]).to(tl.int32), 0))


@triton.jit
def _group_scan_kernel(HIST, TOTAL, n_chunks, NBP: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program b: HIST[:, b] -> its exclusive prefix sum over the chunks (in place), TOTAL[b] its sum."""
    b = tl.program_id(0)
    run = tl.sum(tl.zeros([BLOCK_C], dtype=tl.int32), 0)
    for c0 in range(0, n_chunks, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        ptr = HIST + cs.to(tl.int64) * NBP + b
        h = tl.load(ptr, mask=cs < n_chunks, other=0)
        tl.store(ptr, run + tl.cumsum(h, 0) - h, mask=cs < n_chunks)
        run += tl.sum(h, 0)
    tl.store(TOTAL + b, run)


@triton.jit
def _group_place_kernel(IDX, WTS, BASE, TOTAL, ORDER, SORTED_TOK, INV, W_FULL, W_SORTED, OFFSETS, TILE_BLOCK,
                        TILE_START, TILE_COUNT, T, K, NB, n_chunks, n_tiles, SHARED: tl.constexpr,
                        NBP: tl.constexpr, CHUNK: tl.constexpr, BLOCK_M: tl.constexpr):
    """Programs below n_chunks: every pair of their chunk at its sorted position (see above). The others: the
    offsets (the first) and CHUNK row tiles each of the tile table, with group_pairs' values (a tile's block is
    searchsorted(tile_end, t, right=True), its start offsets[b] + (t - b's first tile) * BLOCK_M, b clamped)."""
    c = tl.program_id(0)
    buckets = tl.arange(0, NBP)
    total = tl.load(TOTAL + buckets)
    first = tl.cumsum(total, 0) - total  # each bucket's first sorted position
    if c < n_chunks:
        p = c * CHUNK + tl.arange(0, CHUNK)
        key, code, w, t, live = _pair_keys(IDX, WTS, p, T, K, NB, SHARED, NBP - 1)
        hot = (key[:, None] == buckets[None, :]).to(tl.int32)
        start = first + tl.load(BASE + c * NBP + buckets)
        pos = tl.sum(hot * (start[None, :] + tl.cumsum(hot, 0) - 1), 1)
        tl.store(ORDER + pos, p.to(tl.int64), mask=live)
        tl.store(SORTED_TOK + pos, t, mask=live)
        tl.store(W_SORTED + pos, w, mask=live)
        tl.store(INV + p, tl.where(key < NB, pos, code).to(tl.int64), mask=live)
        tl.store(W_FULL + p, w, mask=live)
    else:
        is_blk = buckets < NB
        tiles = tl.where(is_blk, (total + BLOCK_M - 1) // BLOCK_M, 0)
        tile_end = tl.cumsum(tiles, 0)
        first_tile = tile_end - tiles
        if c == n_chunks:
            tl.store(OFFSETS + buckets, first, mask=buckets <= NB)
            tl.store(TILE_COUNT, tl.sum(tiles, 0).to(tl.int64))
        ts = (c - n_chunks) * CHUNK + tl.arange(0, CHUNK)
        tb = tl.sum(((tile_end[None, :] <= ts[:, None]) & is_blk[None, :]).to(tl.int32), 1)
        sel = buckets[None, :] == tl.minimum(tb, NB - 1)[:, None]
        ft = tl.sum(tl.where(sel, first_tile[None, :], 0), 1)
        off = tl.sum(tl.where(sel, first[None, :], 0), 1)
        tl.store(TILE_BLOCK + ts, tb, mask=ts < n_tiles)
        tl.store(TILE_START + ts, off + (ts - ft) * BLOCK_M, mask=ts < n_tiles)


def route_pairs(idx: torch.Tensor, weights: torch.Tensor, shared_blocks: int, n_blocks: int, block_m: int,
                direct: bool = False):
    """``full_routing`` + ``group_pairs`` in three kernels: ``(grouping, w_full [T, KT], w_sorted [P])`` (fp32
    weights in flat and sorted order), the torch forms' values bit for bit. ``direct``: plain launches (an
    opaque op's body), else through ``wrap_triton`` (traceable)."""
    T, K = idx.shape
    KT = shared_blocks + K
    P = T * KT
    nbp = triton.next_power_of_2(n_blocks + 2)
    if nbp > GROUP_MAX_BUCKETS or P >= 2**31 - GROUP_TILE:
        blocks, w_full = full_routing(idx, weights, shared_blocks)
        g = group_pairs(blocks, n_blocks, block_m)
        return g, w_full, w_full.reshape(-1)[g.order]
    dev = idx.device
    idx, weights = idx.contiguous(), weights.contiguous()
    chunk = GROUP_TILE // nbp
    n_chunks = triton.cdiv(P, chunk)
    n_tiles = -(-P // block_m) + n_blocks
    hist = torch.empty(max(n_chunks, 1), nbp, dtype=torch.int32, device=dev)
    total = torch.zeros(nbp, dtype=torch.int32, device=dev) if n_chunks == 0 else torch.empty(
        nbp, dtype=torch.int32, device=dev)
    order = torch.empty(P, dtype=torch.int64, device=dev)
    sorted_tok = torch.empty(P, dtype=torch.int32, device=dev)
    inv = torch.empty(T, KT, dtype=torch.int64, device=dev)
    w_full = torch.empty(T, KT, dtype=torch.float32, device=dev)
    w_sorted = torch.empty(P, dtype=torch.float32, device=dev)
    offsets = torch.empty(n_blocks + 1, dtype=torch.int32, device=dev)
    tile_block = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    tile_start = torch.empty(n_tiles, dtype=torch.int32, device=dev)
    tile_count = torch.empty(1, dtype=torch.int64, device=dev)
    if n_chunks:
        triton_kernel(_group_count_kernel, direct)[(n_chunks,)](
            idx, weights, hist, T, K, n_blocks, SHARED=shared_blocks, NBP=nbp, CHUNK=chunk)
        triton_kernel(_group_scan_kernel, direct)[(nbp,)](hist, total, n_chunks, NBP=nbp, BLOCK_C=GROUP_SCAN_CHUNKS)
    triton_kernel(_group_place_kernel, direct)[(n_chunks + triton.cdiv(n_tiles, chunk),)](
        idx, weights, hist, total, order, sorted_tok, inv, w_full, w_sorted, offsets, tile_block, tile_start,
        tile_count, T, K, n_blocks, n_chunks, n_tiles, SHARED=shared_blocks, NBP=nbp, CHUNK=chunk, BLOCK_M=block_m)
    return (Grouping(sorted_tok, order, inv, offsets, tile_block, tile_start, tile_count, block_m), w_full,
            w_sorted)


# ---- 2c. the forward's grouping kept for the backward ----------------------------------------------------
#
# A training step would group twice (the backward's sparse_ffn_bwd recomputes the forward's grouping from idx: on
# the H200 at T8192 ratio 0.3, ~0.09 ms of device time and a dozen launches and allocations per grouping). The op
# layer instead packs the forward's route_pairs result into one int32 tensor, the "plan", which autograd saves
# for the backward op: inv (int64 [T, KT]) and tile_count (int64 [1]) first (8-byte aligned), then w_full and
# w_sorted (fp32 bits), sorted_tok, offsets, tile_block and tile_start. Its size follows from the shapes and the
# forward's block_m alone (:func:`plan_numel`), so fake tensors know it; the backward uses it only when its own
# block_m is the forward's.


def plan_numel(T: int, KT: int, n_blocks: int, block_m: int) -> int:
    """int32 elements of a grouping plan (see above) for ``T`` tokens of ``KT`` slots at row tiles of ``block_m``."""
    P = T * KT
    n_tiles = -(-P // block_m) + n_blocks
    return 2 * P + 2 + 3 * P + (n_blocks + 1) + 2 * n_tiles


def pack_plan(grouping: Grouping, w_full: torch.Tensor, w_sorted: torch.Tensor) -> torch.Tensor:
    """``route_pairs``' result as one int32 tensor (one copy of a few MB; see above)."""
    i32 = torch.int32
    g = grouping
    parts = (g.inv.reshape(-1).view(i32), g.tile_count.reshape(-1).view(i32), w_full.reshape(-1).view(i32),
             w_sorted.reshape(-1).view(i32), g.sorted_tok.to(i32), g.offsets.to(i32), g.tile_block.to(i32),
             g.tile_start.to(i32))
    return torch.cat(parts)


def unpack_plan(plan: torch.Tensor, T: int, KT: int, n_blocks: int, block_m: int):
    """``(grouping, w_full, w_sorted)`` as views of a plan made by :func:`pack_plan` (``grouping.order`` None: only
    the torch form of the grouping has it)."""
    P = T * KT
    n_tiles = -(-P // block_m) + n_blocks
    if plan.dtype != torch.int32 or plan.dim() != 1 or plan.numel() != plan_numel(T, KT, n_blocks, block_m):
        raise ValueError(f"grouping plan: expected int32 [{plan_numel(T, KT, n_blocks, block_m)}] for T={T}, "
                         f"KT={KT}, n_blocks={n_blocks}, block_m={block_m}; got {plan.dtype} {list(plan.shape)}")
    inv, tile_count, w_full, w_sorted, sorted_tok, offsets, tile_block, tile_start = torch.split(
        plan, [2 * P, 2, P, P, P, n_blocks + 1, n_tiles, n_tiles])
    g = Grouping(sorted_tok, None, inv.view(torch.int64).view(T, KT), offsets, tile_block, tile_start,
                 tile_count.view(torch.int64), block_m)
    return g, w_full.view(torch.float32).view(T, KT), w_sorted.view(torch.float32)


def fwd_block_m(x: torch.Tensor, w_gate: torch.Tensor, n_blocks: int) -> int:
    """The row tile :func:`sparse_ffn_fwd` groups with by default (its launch config's block_m)."""
    T, D = x.shape
    return launch_config(T, D, w_gate.shape[0] // n_blocks, wide=_wide_tiles(x))["block_m"]


# ---- 3. gate/up grouped GEMM + SwiGLU --------------------------------------------------------------


@triton.jit
def _gate_up_dots(X, WG, WU, rows, row_mask, neurons, n_mask, D, stride_xt, stride_xd, stride_wf, stride_wd,
                  DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 (x[rows] . w_gate[neurons]^T, x[rows] . w_up[neurons]^T) over d_model in BLOCK_K steps; rows
    outside ``row_mask`` read zeros."""
    f = neurons.to(tl.int64)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        a = tl.load(X + rows[:, None] * stride_xt + offs_k[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_off = f[None, :] * stride_wf + offs_k[:, None] * stride_wd
        w_mask = k_mask[:, None] & n_mask[None, :]
        acc_g = tl.dot(a, tl.load(WG + w_off, mask=w_mask, other=0.0), acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(a, tl.load(WU + w_off, mask=w_mask, other=0.0), acc_u, input_precision=DOT_PRECISION)
    return acc_g, acc_u


@triton.jit
def _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M: tl.constexpr):
    """Sorted rows of row tile ``pid_m`` (of block ``b < n_blocks``) and which of them belong to b."""
    rows = tl.load(TILE_START + pid_m) + tl.arange(0, BLOCK_M)
    return rows, rows < tl.load(OFFSETS + b + 1)


@triton.jit
def _tile_ids(n_col, COLS_FIRST: tl.constexpr):
    """(row tile, column tile) of this program. The 2-D grid runs the row tiles of one column tile together
    (program_id(0) is the row tile); ``COLS_FIRST`` (a 1-D grid of n_tiles * n_col programs) runs the column
    tiles of one row tile together instead, so the row tile's A operand is read from HBM once rather than
    once per column tile (session 16's reading: the down projection re-read h 32 times, dx dact 16 times)."""
    if COLS_FIRST:
        pid = tl.program_id(0)
        return pid // n_col, pid % n_col
    return tl.program_id(0), tl.program_id(1)


@triton.jit
def _dw_tile_ids(NB, n_n, n_d, D_GROUP: tl.constexpr):
    """(block, neuron tile, model-column tile) of a weight-gradient program. ``D_GROUP`` == 0: the 3-D grid
    (block fastest: every block's activations stream once per model-column tile); > 0: a 1-D grid walking
    D_GROUP model-column tiles for every block and neuron tile before the next D_GROUP, so a block's
    activation slice is read once per group while the group's x / dO columns stay in L2."""
    if D_GROUP == 0:
        return tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pid = tl.program_id(0)
    per_group = NB * n_n * D_GROUP
    g = pid // per_group
    r = pid - g * per_group
    b = r // (n_n * D_GROUP)
    r = r - b * (n_n * D_GROUP)
    return b, r // D_GROUP, g * D_GROUP + r % D_GROUP


def _grid(n_tiles: int, n_col: int, cols_first: bool) -> tuple:
    return (n_tiles * n_col,) if cols_first else (n_tiles, n_col)


def _dw_grid(n_blocks: int, n_n: int, n_d: int, d_group: int) -> tuple:
    return (n_blocks * n_n * triton.cdiv(n_d, d_group) * d_group,) if d_group else (n_blocks, n_n, n_d)


@triton.jit
def _sparse_ffn_gate_up_kernel(
    X, WG, WU, H, ACT, SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS,
    D, BS, NB,
    stride_xt, stride_xd, stride_wf, stride_wd,
    SAVE_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, COLS_FIRST: tl.constexpr = False,
):
    """For the rows of one block b: a = x[tok] . w_gate[b*BS + n]^T, u likewise with w_up,
    h = silu(a) * u -> H [P, BS] (and a, u -> ACT [P, 2, BS]). ``COLS_FIRST``: :func:`_tile_ids`."""
    pid_m, pid_n = _tile_ids(tl.cdiv(BS, BLOCK_N), COLS_FIRST)
    b = tl.load(TILE_BLOCK + pid_m)
    if b < NB:
        rows, r_mask = _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M)
        tok = tl.load(SORTED_TOK + rows, mask=r_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < BS
        acc_g, acc_u = _gate_up_dots(X, WG, WU, tok, r_mask, b * BS + offs_n, n_mask, D, stride_xt, stride_xd,
                                     stride_wf, stride_wd, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        h = acc_g * tl.sigmoid(acc_g) * acc_u
        out_mask = r_mask[:, None] & n_mask[None, :]
        rows64 = rows.to(tl.int64)
        tl.store(H + rows64[:, None] * BS + offs_n[None, :], h.to(H.dtype.element_ty), mask=out_mask)
        if SAVE_ACT:
            act = ACT + rows64[:, None] * (2 * BS) + offs_n[None, :]
            tl.store(act, acc_g.to(ACT.dtype.element_ty), mask=out_mask)
            tl.store(act + BS, acc_u.to(ACT.dtype.element_ty), mask=out_mask)


# ---- 4. down grouped GEMM ---------------------------------------------------------------------------


@triton.jit
def _sparse_ffn_down_kernel(
    H, WD, Y, TILE_BLOCK, TILE_START, OFFSETS,
    D, BS, NB,
    stride_wd, stride_wf,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COLS_FIRST: tl.constexpr = False,
):
    """For the rows of one block b: y[p, n] = sum_k h[p, k] * w_down[n, b*BS + k] -> Y [P, D].
    ``COLS_FIRST``: :func:`_tile_ids`."""
    pid_m, pid_n = _tile_ids(tl.cdiv(D, BLOCK_N), COLS_FIRST)
    b = tl.load(TILE_BLOCK + pid_m)
    if b < NB:
        rows, r_mask = _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M)
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, BS, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < BS
            a = tl.load(H + rows64[:, None] * BS + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(WD + offs_n[None, :].to(tl.int64) * stride_wd + (b * BS + offs_k)[:, None] * stride_wf,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        tl.store(Y + rows64[:, None] * D + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def _sorted_rows_tma_kernel(
    a_desc, w_desc, w2_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT,
    D, BS,
    W_NK: tl.constexpr, DUAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
):
    """A grouped GEMM over the sorted rows as a persistent kernel with TMA loads (Hopper+; session 16; the
    T >= 4096 default since session 17): OUT[rows of block b, :D] = A[rows, :BS] . W_b (+ A[rows, BS:2 BS] . W2_b
    with ``DUAL``). The forward's down projection (``down.tma``: A = h, W = w_down [D, F] read as [n, k] tiles,
    ``W_NK``) and the backward's dx (``dx.tma``: A = dact viewed [P, 2 BS], W / W2 = w_gate / w_up [F, D] read as
    [k, n] tiles, ``DUAL``). K is only BS (224), so a plain tile's pipeline barely fills before its epilogue:
    NUM_PROGRAMS programs walk the real (row tile, column tile) pairs, a row tile's column tiles consecutively (its
    A rows and the block's weights stay in L2), the tile loop flattened with the K loop so the next tile's loads
    overlap this tile's stores. A rows past the block's end (the next block's, or past P: zeros) are computed and
    not stored; BS is a multiple of BLOCK_K (the launcher checks), so no K tile reaches into the next block's
    weights or, with DUAL, from the first half of A into the second."""
    n_col = tl.cdiv(D, BLOCK_N)
    total = tl.load(TILE_COUNT).to(tl.int32) * n_col
    for t in tl.range(tl.program_id(0), total, NUM_PROGRAMS, flatten=True):
        pid_m = t // n_col
        pid_n = t - pid_m * n_col
        b = tl.load(TILE_BLOCK + pid_m)
        start = tl.load(TILE_START + pid_m)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, BS, BLOCK_K):
            a = a_desc.load([start, k0])
            if W_NK:
                acc = tl.dot(a, tl.trans(w_desc.load([pid_n * BLOCK_N, b * BS + k0])), acc,
                             input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(a, w_desc.load([b * BS + k0, pid_n * BLOCK_N]), acc, input_precision=DOT_PRECISION)
            if DUAL:
                a2 = a_desc.load([start, BS + k0])
                acc = tl.dot(a2, w2_desc.load([b * BS + k0, pid_n * BLOCK_N]), acc, input_precision=DOT_PRECISION)
        rows = start + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = (rows < tl.load(OFFSETS + b + 1))[:, None] & (offs_n < D)[None, :]
        tl.store(OUT + rows.to(tl.int64)[:, None] * D + offs_n[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def k_pieces(bs: int) -> tuple | None:
    """``bs`` as at most three powers of 2, each >= 16, largest first, padded with zeros (224 -> (128, 64, 32)):
    the accumulator widths of :func:`_sparse_ffn_bwd_dact_full_kernel`, so a block's 224 neurons take no padded
    MMA columns. None if ``bs`` has no such split."""
    bits = [1 << i for i in range(bs.bit_length() - 1, -1, -1) if bs >> i & 1]
    if not bits or len(bits) > 3 or bits[-1] < 16:
        return None
    return tuple(bits + [0] * (3 - len(bits)))


def _tma_gemm_ok(x: torch.Tensor, block_size: int, block_k: int, row_strides, tensors) -> bool:
    """Whether a persistent TMA kernel of the grouped GEMMs can run on ``x``'s device: Hopper+ (or the
    interpreter), Triton's host-side descriptors, not while torch.compile traces (descriptors through
    wrap_triton are untried; nor while its fake or functional tensors pass through the op: no data pointer),
    the block size a multiple of the K tile (no K tile crosses into the next block), every descriptor's row
    stride (elements, ``row_strides``) and base (``tensors``) 16-byte aligned."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    from deepseek_kernels.ops._registry import interpreting
    from deepseek_kernels.triton._common import tracing_stand_in

    if torch.compiler.is_compiling() or any(tracing_stand_in(t) for t in (x, *tensors)):
        return False
    if not interpreting() and not (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return False
    es = x.element_size()
    return (block_size % block_k == 0 and all((r * es) % 16 == 0 for r in row_strides)
            and all(t.data_ptr() % 16 == 0 for t in tensors))


def _programs(x: torch.Tensor, cfg: dict) -> int:
    """A persistent kernel's program count: ``cfg["programs"]`` if set, else ``cfg["programs_per_sm"]`` per SM
    (4 programs under the interpreter)."""
    from deepseek_kernels.triton._common import sm_count

    if cfg["programs"]:
        return int(cfg["programs"])
    return int(cfg["programs_per_sm"]) * sm_count(x.device) if x.is_cuda else 4


def _sm90_ok(a: torch.Tensor, w: torch.Tensor, block_m: int) -> bool:
    """Whether the Gluon form (``sparse_ffn_sm90``, ``down.sm90`` / ``dx.sm90``) of a persistent TMA kernel can
    run, besides the TMA layout checks (:func:`_tma_gemm_ok` at its K step): an sm_90 GPU, 2-byte operands, the
    128-row tiles."""
    from deepseek_kernels.triton import sparse_ffn_sm90

    return sparse_ffn_sm90.supported(a, w, block_m)


def _gate_up_sm90_ok(x, w_gate, w_up, block_m: int, bs: int) -> bool:
    """Whether the gathered Gluon gate/up (``gate_up.sm90``) can run: as :func:`_sm90_ok`, outside torch.compile's
    tracing (no data pointers there), and the layouts of ``sparse_ffn_sm90.gate_up_layout_ok``."""
    from deepseek_kernels.triton import sparse_ffn_sm90

    return (_not_tracing(x, w_gate, w_up) and sparse_ffn_sm90.supported(x, w_gate, block_m)
            and sparse_ffn_sm90.gate_up_layout_ok(x, w_gate, w_up, bs))


def _dact_sm90_ok(grad_out, w_down, act, block_m: int, bs: int) -> bool:
    """Whether the gathered Gluon dact (``dact.sm90``) can run: as :func:`_gate_up_sm90_ok`, with the layouts of
    ``sparse_ffn_sm90.dact_layout_ok``."""
    from deepseek_kernels.triton import sparse_ffn_sm90

    return (_not_tracing(grad_out, w_down, act) and sparse_ffn_sm90.supported(grad_out, w_down, block_m)
            and sparse_ffn_sm90.dact_layout_ok(grad_out, w_down, act, bs, sparse_ffn_sm90.DACT_CONFIG["block_n"]))


def _dw_gate_up_sm90_ok(dact, x, dwg, dwu, block_m: int) -> bool:
    """Whether the gathered Gluon dW gate/up (``dw_gate_up.sm90``) can run: as :func:`_gate_up_sm90_ok`, with the
    layouts of ``sparse_ffn_sm90.dw_gate_up_layout_ok``."""
    from deepseek_kernels.triton import sparse_ffn_sm90

    return (_not_tracing(dact, x, dwg) and sparse_ffn_sm90.supported(x, dwg, block_m)
            and sparse_ffn_sm90.dw_gate_up_layout_ok(dact, x, dwg, dwu))


def _dw_down_sm90_ok(grad_out, hw, dwd, block_m: int) -> bool:
    """Whether the gathered Gluon dW down (``dw_down.sm90``) can run: as :func:`_gate_up_sm90_ok`, with the
    layouts of ``sparse_ffn_sm90.dw_down_layout_ok``."""
    from deepseek_kernels.triton import sparse_ffn_sm90

    return (_not_tracing(grad_out, hw, dwd) and sparse_ffn_sm90.supported(grad_out, dwd, block_m)
            and sparse_ffn_sm90.dw_down_layout_ok(grad_out, hw, dwd))


def _not_tracing(*tensors) -> bool:
    """Not under torch.compile's tracing, no fake or meta stand-in among ``tensors`` (the Gluon launches read data
    pointers)."""
    from deepseek_kernels.triton._common import tracing_stand_in

    return not torch.compiler.is_compiling() and not any(tracing_stand_in(t) for t in tensors)


def _sm90_block_k() -> int:
    from deepseek_kernels.triton import sparse_ffn_sm90

    return sparse_ffn_sm90.CONFIG["block_k"]


def _down_tma_ok(h: torch.Tensor, w_down: torch.Tensor, block_k: int) -> bool:
    """Whether the persistent TMA down kernel can run (:func:`_tma_gemm_ok`; w_down [D, F] with unit stride
    along F)."""
    return w_down.stride(1) == 1 and _tma_gemm_ok(h, h.shape[1], block_k, (h.shape[1], w_down.stride(0)),
                                                  (h, w_down))


def _down_tma(h, w_down, y, grouping: "Grouping", dn: dict, prec: str) -> None:
    """Launches :func:`_sorted_rows_tma_kernel` on :func:`_programs` programs."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    D, BS = w_down.shape[0], h.shape[1]
    bm = grouping.block_m
    programs = _programs(h, dn)
    h_desc = TensorDescriptor.from_tensor(h, [bm, dn["block_k"]])
    wd_desc = TensorDescriptor.from_tensor(w_down, [dn["block_n"], dn["block_k"]])
    _sorted_rows_tma_kernel[(programs,)](
        h_desc, wd_desc, wd_desc, y, grouping.tile_block, grouping.tile_start, grouping.offsets, grouping.tile_count,
        D, BS, W_NK=True, DUAL=False, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=dn["block_n"], BLOCK_K=dn["block_k"],
        NUM_PROGRAMS=programs, **launch_options(dn),
    )


# ---- 5. weighted combine -----------------------------------------------------------------------------


@triton.jit
def _sparse_ffn_combine_kernel(
    Y, INV, W, OUT, T, D, KT,
    stride_ot,
    WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, n] = sum_j W[t, j] * Y[INV[t, j], n] over the slots with INV >= 0 (fp32 sum; W = 1
    without WEIGHTED). A token with an invalid block id (INV = -2) gets a NaN row."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_mask = offs_t < T
    n_mask = offs_n < D
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    n_bad = tl.zeros((BLOCK_T,), dtype=tl.int32)
    for j in range(KT):
        pos = tl.load(INV + offs_t.to(tl.int64) * KT + j, mask=t_mask, other=-1)
        n_bad += (pos == -2).to(tl.int32)
        valid = pos >= 0
        y = tl.load(Y + pos[:, None] * D + offs_n[None, :], mask=valid[:, None] & n_mask[None, :], other=0.0)
        if WEIGHTED:
            w = tl.load(W + offs_t.to(tl.int64) * KT + j, mask=t_mask, other=0.0)
            acc += w[:, None] * y.to(tl.float32)
        else:
            acc += y.to(tl.float32)
    acc = tl.where(n_bad[:, None] > 0, float("nan"), acc)
    tl.store(OUT + offs_t[:, None].to(tl.int64) * stride_ot + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=t_mask[:, None] & n_mask[None, :])


# The combine's tiles: each program sums COMBINE_ELEMS outputs, whole token rows where d_model <= COMBINE_ELEMS
# (one row of 4096 columns per program at the issue's shape), else the widest power-of-2 column tiles. H200, session
# 35 (benchmarks/diag_sparse_ceilings.py --sweep, T8192 D4096, the real router's grouping): 16 tokens x 64 columns
# 0.373 / 0.736 ms at ratio 0.3 / 0.5 (3.60 / 3.01 TB/s of y read), 4 x 1024 0.369 / 0.591, 2 x 1024 0.351 / 0.559,
# 1 x 4096 0.327 / 0.523 (4.10 / 4.23 TB/s; 8 warps 0.341 / 0.546). A row tile of 128 bytes per program read each
# y row in 64 pieces at 64 different times; a whole 8 KB row streams. The order of y's rows (by block or by token)
# made no difference at any tile.
COMBINE_ELEMS = 4096
COMBINE_ROWS = True  # False: the large-batch tiles before session 35 (16 tokens x 64 columns), for A/B runs


def combine_tiles(d_model: int, block_n: int | None = None) -> tuple:
    """(tokens, columns) per combine program: ``block_n`` columns if given (a config's), else whole rows up to
    COMBINE_ELEMS; as many tokens as fill COMBINE_ELEMS outputs, at most 16."""
    if block_n is None:
        block_n = min(triton.next_power_of_2(max(d_model, 16)), COMBINE_ELEMS) if COMBINE_ROWS else 64
    return max(1, min(16, COMBINE_ELEMS // block_n)), block_n


# ---- launcher ----------------------------------------------------------------------------------------


def launch_config(tokens: int, d_model: int, block_size: int, wide: bool = True) -> dict:
    """Tile shapes: ``block_m`` (rows of one block per tile, shared: the grouping depends on it),
    the ``block_n/block_k/num_warps`` of every kernel, and per-kernel entries that override them
    (``num_stages`` None: Triton's default); see :func:`resolve_config`. Large batches use the
    H200 sweep's winners (``benchmarks/tune_sparse_ffn.py``, T8192 D4096 F14336, 64 blocks, 30 %
    active: forward 2.91 ms against 3.76 ms for the 64-wide first guess; dense 3.93 ms); small ones
    keep small tiles, since a block's rows are few. ``wide=False`` (GPUs with less shared memory per SM
    than Hopper: :func:`big_shared_memory`): the mid-size tiles for large batches too. ``down.tma``: the
    deterministic down projection as :func:`_sorted_rows_tma_kernel` on ``down.programs`` programs (None:
    ``down.programs_per_sm`` per SM) where :func:`_down_tma_ok` (else the plain kernel with the same tiles).
    ``cols_first``: the 1-D tile order of :func:`_tile_ids` (a row tile's column tiles run together, so its
    A rows are read from HBM once instead of once per column tile).

    Session 17 (H200, ``benchmarks/diag_sparse_train.py --sweep6``, T8192): gate/up in cols_first order and
    the down projection as the persistent TMA kernel (128 x 32 tiles, 4 warps, 4 stages, 2 programs per SM):
    forward 2.87 -> 2.35 ms at ratio 0.3, 4.86 -> 4.09 at 0.5. ``down.sm90`` (session 30): on sm_90 the down
    projection runs as the warp-specialized Gluon kernel of ``sparse_ffn_sm90`` (its own tiles:
    ``sparse_ffn_sm90.CONFIG``) where it can; the settings here stay for the Triton TMA kernel elsewhere.
    ``gate_up.sm90`` (session 31): gate/up as the Gluon kernel with gathered x rows (cp.async producer,
    ``sparse_ffn_sm90.GATE_UP_CONFIG``): whole forward 2.227 -> 2.113 ms at ratio 0.3."""
    if tokens * block_size <= 4096:
        base = dict(block_m=16, block_n=16, block_k=32, num_warps=4)
    elif tokens < 4096 or not wide:
        base = dict(block_m=64, block_n=64, block_k=64, num_warps=4)
    else:
        big = dict(block_n=128, block_k=64, num_warps=8, num_stages=3)
        base = dict(block_m=128, block_n=64, block_k=64, num_warps=4, gate_up=dict(big, cols_first=True, sm90=True),
                    down=dict(block_n=128, block_k=32, num_warps=4, num_stages=4, tma=True, sm90=True,
                              programs_per_sm=2, cols_first=True),
                    combine=dict(block_n=combine_tiles(d_model)[1], num_warps=4))
    base["gate_up"] = {"cols_first": False, "sm90": False, **base.get("gate_up", {})}
    base["down"] = {"tma": False, "sm90": False, "programs": None, "programs_per_sm": 1, "cols_first": False,
                    **base.get("down", {})}
    return base


FWD_KERNELS = ("gate_up", "down", "combine")
BWD_KERNELS = ("dact", "dx", "combine", "dw_gate_up", "dw_down")


def resolve_config(base: dict, kernels, *, block_m=None, block_n=None, block_k=None, num_warps=None,
                   config: dict | None = None) -> tuple[int, dict]:
    """``(block_m, {kernel: launch dict})`` from a base config (``launch_config`` /
    ``bwd_launch_config``), the scalar overrides (every kernel) and ``config`` (per kernel, e.g.
    ``{"gate_up": {"block_n": 32, "num_stages": 4}, "block_m": 128}``: what the tuner writes)."""
    config = dict(config or {})
    bm = block_m or config.pop("block_m", None) or base["block_m"]
    config.pop("block_m", None)
    defaults = {name: {"block_n": base["block_n"], "block_k": base["block_k"], "num_warps": base["num_warps"],
                       "num_stages": None, **base.get(name, {})} for name in kernels}
    return bm, resolve_launch("sparse FFN", defaults, config, block_n=block_n, block_k=block_k, num_warps=num_warps)


def _wide_tiles(x: torch.Tensor) -> bool:
    """Whether the large-batch tiles (tuned on the H200 for bf16: 150-200 KB of shared memory per program) can
    run: on GPUs with Hopper's shared memory (:func:`big_shared_memory`) and, on CUDA, for 2-byte operands only
    (fp32 doubles every tile's bytes: dact's 197 KB become 394). Elsewhere the mid-size tiles."""
    return big_shared_memory(x.device) and (x.device.type != "cuda" or x.element_size() <= 2)


def _same_strides(w_gate: torch.Tensor, w_up: torch.Tensor):
    """The gate/up kernels walk both weights with w_gate's strides: make them agree."""
    if w_up.stride() != w_gate.stride():
        return w_gate.contiguous(), w_up.contiguous()
    return w_gate, w_up


def sparse_ffn_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                   idx: torch.Tensor, weights: torch.Tensor, *, shared_blocks: int, n_blocks: int,
                   save_act: bool = True, block_m: int | None = None,
                   block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                   config: dict | None = None, routed: tuple | None = None):
    """FFN part for a given routing: ``x [T, D]``, routed ``idx/weights [T, k]`` ->
    ``(out [T, D] in x.dtype, act [T*(shared+k), 2, BS] in x.dtype (pre-activations in the grouped
    layout; empty [0, 2, BS] without save_act), grouping)``. The down GEMM writes ``y [P, D]`` and the
    combine kernel gathers it per token (bit-reproducible; y costs 2 * P * D * itemsize bytes of traffic).
    ``routed``: :func:`route_pairs`' ``(grouping, w_full, w_sorted)`` for this idx / weights at this call's
    block_m, made by the caller (else computed here)."""
    w_gate, w_up = _same_strides(w_gate, w_up)
    T, D = x.shape
    BS = w_gate.shape[0] // n_blocks
    block_m, kc = resolve_config(launch_config(T, D, BS, wide=_wide_tiles(x)), FWD_KERNELS,
                                 block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, config=config)
    gu, dn, cb = kc["gate_up"], kc["down"], kc["combine"]
    direct = plain_eager(x)  # plain launches in eager (wrap_triton only while torch.compile traces)
    if routed is not None and routed[0].block_m != block_m:
        raise ValueError(f"sparse_ffn_fwd: routed was grouped at block_m={routed[0].block_m}, this call tiles rows "
                         f"by {block_m}")
    grouping, w_full, _ = routed or route_pairs(idx, weights, shared_blocks, n_blocks, block_m, direct)
    KT = shared_blocks + idx.shape[1]
    P = T * KT
    h = torch.empty(P, BS, dtype=x.dtype, device=x.device)
    act = torch.empty((P if save_act else 0), 2, BS, dtype=x.dtype, device=x.device)
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if P == 0:
        return out.zero_(), act, grouping
    n_tiles = grouping.tile_block.numel()
    prec = _dot_precision(x.dtype)
    if gu["sm90"] and _gate_up_sm90_ok(x, w_gate, w_up, block_m, BS):
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        g9.gate_up_sm90(x, w_gate, w_up, h, act if save_act else None, grouping, bs=BS, **g9.GATE_UP_CONFIG)
    else:
        triton_kernel(_sparse_ffn_gate_up_kernel, direct)[_grid(n_tiles, triton.cdiv(BS, gu["block_n"]),
                                                                    gu["cols_first"])](
            x, w_gate, w_up, h, act if save_act else h, grouping.sorted_tok, grouping.tile_block,
            grouping.tile_start, grouping.offsets, D, BS, n_blocks, x.stride(0), x.stride(1), w_gate.stride(0),
            w_gate.stride(1), SAVE_ACT=save_act, DOT_PRECISION=prec, BLOCK_M=block_m, BLOCK_N=gu["block_n"],
            BLOCK_K=gu["block_k"], COLS_FIRST=bool(gu["cols_first"]), **launch_options(gu),
        )
    y = torch.empty(P, D, dtype=x.dtype, device=x.device)
    if dn["tma"] and dn["sm90"] and _sm90_ok(h, w_down, block_m) and _down_tma_ok(h, w_down, _sm90_block_k()):
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        g9.short_k_gemm_sm90(h, w_down, None, y, grouping, bs=BS, w_nk=True)
    elif dn["tma"] and _down_tma_ok(h, w_down, dn["block_k"]):
        _down_tma(h, w_down, y, grouping, dn, prec)
    else:
        triton_kernel(_sparse_ffn_down_kernel, direct)[_grid(n_tiles, triton.cdiv(D, dn["block_n"]),
                                                                 dn["cols_first"])](
            h, w_down, y, grouping.tile_block, grouping.tile_start, grouping.offsets, D, BS, n_blocks,
            w_down.stride(0), w_down.stride(1), DOT_PRECISION=prec, BLOCK_M=block_m, BLOCK_N=dn["block_n"],
            BLOCK_K=dn["block_k"], COLS_FIRST=bool(dn["cols_first"]), **launch_options(dn),
        )
    block_t, block_n = combine_tiles(D, cb["block_n"])
    triton_kernel(_sparse_ffn_combine_kernel, direct)[(triton.cdiv(T, block_t), triton.cdiv(D, block_n))](
        y, grouping.inv, w_full.contiguous(), out, T, D, KT, out.stride(0),
        WEIGHTED=True, BLOCK_T=block_t, BLOCK_N=block_n, **launch_options(cb),
    )
    return out, act, grouping


# ---- backward ----------------------------------------------------------------------------------------
#
# With the pairs grouped as in the forward (p = sorted row, b its block, t = tok[p], w_p its routing
# weight, a/u the saved pre-activations, s = sigmoid(a)), the gradients are
#
#     g[p, n]     = dO[t] . w_down[:, b*BS + n]                      (B1: grouped GEMM over D)
#     dweight[p]  = sum_n g[p, n] * h[p, n],  h = silu(a) * u
#     da[p, n]    = w_p * g * u * s * (1 + a * (1 - s)),   du[p, n] = w_p * g * silu(a)
#     dx_rows[p]  = da[p] . w_gate[b-slice] + du[p] . w_up[b-slice]  (B2: grouped GEMM over BS)
#     dx[t]       = sum_j dx_rows[inv[t, j]]                         (the combine kernel, weight 1)
#     dW_gate[b*BS + n, :] = sum_{p in b} da[p, n] x[t_p],  dW_up likewise with du   (B3)
#     dW_down[:, b*BS + n] = sum_{p in b} dO[t_p] (w_p h[p, n])                      (B4)
#
# B3/B4 give each program one output tile and walk the block's rows in a fixed order: deterministic,
# no atomics, every weight element written (blocks without rows get zeros). B1 writes dweight as one
# partial sum per neuron tile, summed afterwards in a fixed order.


@triton.jit
def _sparse_ffn_bwd_dact_kernel(
    DO, WD, ACT, WSORT, SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS,
    DACT, HW, DWP,
    D, BS, NB, P,
    stride_dot, stride_dod, stride_wd, stride_wf,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_EPILOGUE: tl.constexpr = False, COLS_FIRST: tl.constexpr = False,
):
    """B1: g = dO[tok] . w_down[:, block]^T with the SwiGLU derivative in the epilogue ->
    DACT [P, 2, BS] (da, du), HW [P, BS] (w_p * h) and DWP [n_tiles_n, P] (partial dweight).
    ``SPLIT_EPILOGUE``: the epilogue in two column halves (half the live registers: the 128 x 128 tile's
    one-piece epilogue spills ~1.8 KB per thread on sm_90). ``COLS_FIRST``: :func:`_tile_ids`."""
    pid_m, pid_n = _tile_ids(tl.cdiv(BS, BLOCK_N), COLS_FIRST)
    b = tl.load(TILE_BLOCK + pid_m)
    if b < NB:
        rows, r_mask = _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M)
        rows64 = rows.to(tl.int64)
        tok = tl.load(SORTED_TOK + rows, mask=r_mask, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < BS
        f = (b * BS + offs_n).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            go = tl.load(DO + tok[:, None] * stride_dot + offs_k[None, :] * stride_dod,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(WD + offs_k[:, None].to(tl.int64) * stride_wd + f[None, :] * stride_wf,
                        mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(go, w, acc, input_precision=DOT_PRECISION)
        wp = tl.load(WSORT + rows, mask=r_mask, other=0.0)
        if SPLIT_EPILOGUE:
            lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            half = pid_n * BLOCK_N + tl.arange(0, BLOCK_N // 2)
            part = _dact_epilogue(lo, ACT, DACT, HW, rows64, r_mask, half, wp, BS)
            part += _dact_epilogue(hi, ACT, DACT, HW, rows64, r_mask, half + BLOCK_N // 2, wp, BS)
        else:
            part = _dact_epilogue(acc, ACT, DACT, HW, rows64, r_mask, offs_n, wp, BS)
        tl.store(DWP + pid_n.to(tl.int64) * P + rows64, part, mask=r_mask)


@triton.jit
def _dact_epilogue(g, ACT, DACT, HW, rows64, r_mask, offs_n, wp, BS):
    """The SwiGLU derivative of g [rows, offs_n] (= dO . w_down slice): stores da, du and w_p * h, returns
    the rows' partial dweight sum over these columns."""
    mask = r_mask[:, None] & (offs_n < BS)[None, :]
    act = ACT + rows64[:, None] * (2 * BS) + offs_n[None, :]
    a = tl.load(act, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(act + BS, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(a)
    silu = a * s
    h = silu * u
    part = tl.sum(tl.where(mask, g * h, 0.0), 1)
    dh = g * wp[:, None]
    da = dh * u * s * (1 + a * (1 - s))
    du = dh * silu
    dact = DACT + rows64[:, None] * (2 * BS) + offs_n[None, :]
    tl.store(dact, da.to(DACT.dtype.element_ty), mask=mask)
    tl.store(dact + BS, du.to(DACT.dtype.element_ty), mask=mask)
    tl.store(HW + rows64[:, None] * BS + offs_n[None, :], (h * wp[:, None]).to(HW.dtype.element_ty), mask=mask)
    return part


@triton.jit
def _wd_piece(WD, offs_k, k_mask, f0, N: tl.constexpr, stride_wd, stride_wf):
    """w_down[offs_k, f0 : f0 + N] (a [BLOCK_K, N] piece of a block's columns)."""
    f = (f0 + tl.arange(0, N)).to(tl.int64)
    return tl.load(WD + offs_k[:, None].to(tl.int64) * stride_wd + f[None, :] * stride_wf, mask=k_mask[:, None],
                   other=0.0)


@triton.jit
def _sparse_ffn_bwd_dact_full_kernel(
    DO, WD, ACT, WSORT, SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS,
    DACT, HW, DWP,
    D, BS, NB, P,
    stride_dot, stride_dod, stride_wd, stride_wf,
    N0: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """B1 (:func:`_sparse_ffn_bwd_dact_kernel`) with one program per row tile over all of the block's BS neurons,
    as up to three accumulators of power-of-2 widths N0 + N1 + N2 = BS (:func:`k_pieces`; 224 = 128 + 64 + 32):
    no padded MMA columns (two 128-wide tiles compute 256 for 224) and the gathered dO rows are read once per row
    tile instead of once per neuron tile. The epilogue runs piece by piece; DWP has one row."""
    pid_m = tl.program_id(0)
    b = tl.load(TILE_BLOCK + pid_m)
    if b < NB:
        rows, r_mask = _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M)
        rows64 = rows.to(tl.int64)
        tok = tl.load(SORTED_TOK + rows, mask=r_mask, other=0).to(tl.int64)
        f0 = b * BS
        acc0 = tl.zeros((BLOCK_M, N0), dtype=tl.float32)
        if N1 > 0:
            acc1 = tl.zeros((BLOCK_M, N1), dtype=tl.float32)
        if N2 > 0:
            acc2 = tl.zeros((BLOCK_M, N2), dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < D
            go = tl.load(DO + tok[:, None] * stride_dot + offs_k[None, :] * stride_dod,
                         mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc0 = tl.dot(go, _wd_piece(WD, offs_k, k_mask, f0, N0, stride_wd, stride_wf), acc0,
                          input_precision=DOT_PRECISION)
            if N1 > 0:
                acc1 = tl.dot(go, _wd_piece(WD, offs_k, k_mask, f0 + N0, N1, stride_wd, stride_wf), acc1,
                              input_precision=DOT_PRECISION)
            if N2 > 0:
                acc2 = tl.dot(go, _wd_piece(WD, offs_k, k_mask, f0 + N0 + N1, N2, stride_wd, stride_wf), acc2,
                              input_precision=DOT_PRECISION)
        # the narrow pieces first (each epilogue's temporaries live next to the accumulators not yet done), the
        # widest in two halves (a one-piece 128-column epilogue spills: see SPLIT_EPILOGUE)
        wp = tl.load(WSORT + rows, mask=r_mask, other=0.0)
        part = tl.zeros((BLOCK_M,), dtype=tl.float32)
        if N2 > 0:
            part += _dact_epilogue(acc2, ACT, DACT, HW, rows64, r_mask, N0 + N1 + tl.arange(0, N2), wp, BS)
        if N1 > 0:
            part += _dact_epilogue(acc1, ACT, DACT, HW, rows64, r_mask, N0 + tl.arange(0, N1), wp, BS)
        if N0 >= 32:
            lo, hi = tl.split(tl.permute(tl.reshape(acc0, (BLOCK_M, 2, N0 // 2)), (0, 2, 1)))
            part += _dact_epilogue(lo, ACT, DACT, HW, rows64, r_mask, tl.arange(0, N0 // 2), wp, BS)
            part += _dact_epilogue(hi, ACT, DACT, HW, rows64, r_mask, N0 // 2 + tl.arange(0, N0 // 2), wp, BS)
        else:
            part += _dact_epilogue(acc0, ACT, DACT, HW, rows64, r_mask, tl.arange(0, N0), wp, BS)
        tl.store(DWP + rows64, part, mask=r_mask)


@triton.jit
def _sparse_ffn_bwd_dx_kernel(
    DACT, WG, WU, DXR, TILE_BLOCK, TILE_START, OFFSETS,
    D, BS, NB,
    stride_wf, stride_wd,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    COLS_FIRST: tl.constexpr = False,
):
    """B2: dx_rows[p, n] = sum_k da[p, k] w_gate[b*BS + k, n] + du[p, k] w_up[b*BS + k, n] -> DXR [P, D].
    ``COLS_FIRST``: :func:`_tile_ids`."""
    pid_m, pid_n = _tile_ids(tl.cdiv(D, BLOCK_N), COLS_FIRST)
    b = tl.load(TILE_BLOCK + pid_m)
    if b < NB:
        rows, r_mask = _tile_rows(b, pid_m, TILE_START, OFFSETS, BLOCK_M)
        rows64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < D
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, BS, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < BS
            a_mask = r_mask[:, None] & k_mask[None, :]
            dact = DACT + rows64[:, None] * (2 * BS) + offs_k[None, :]
            da = tl.load(dact, mask=a_mask, other=0.0)
            du = tl.load(dact + BS, mask=a_mask, other=0.0)
            w_off = (b * BS + offs_k)[:, None].to(tl.int64) * stride_wf + offs_n[None, :] * stride_wd
            w_mask = k_mask[:, None] & n_mask[None, :]
            acc = tl.dot(da, tl.load(WG + w_off, mask=w_mask, other=0.0), acc, input_precision=DOT_PRECISION)
            acc = tl.dot(du, tl.load(WU + w_off, mask=w_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        tl.store(DXR + rows64[:, None] * D + offs_n[None, :], acc.to(DXR.dtype.element_ty),
                 mask=r_mask[:, None] & n_mask[None, :])


def _dx_tma_ok(dact: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, block_k: int) -> bool:
    """Whether :func:`_sorted_rows_tma_kernel` can run (as :func:`_tma_gemm_ok`; dact [P, 2, BS]
    contiguous, w_gate / w_up [F, D] with unit stride along D)."""
    BS = dact.shape[2]
    return (dact.is_contiguous() and w_gate.stride(1) == 1 and w_up.stride() == w_gate.stride()
            and _tma_gemm_ok(dact, BS, block_k, (2 * BS, w_gate.stride(0)), (dact, w_gate, w_up)))


def _dx_tma(dact, w_gate, w_up, dx_rows, g: "Grouping", dxc: dict, prec: str) -> None:
    """Launches :func:`_sorted_rows_tma_kernel` on :func:`_programs` programs."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    P, _, BS = dact.shape
    D = w_gate.shape[1]
    bm, bn, bk = g.block_m, dxc["block_n"], dxc["block_k"]
    programs = _programs(dact, dxc)
    act_desc = TensorDescriptor.from_tensor(dact.view(P, 2 * BS), [bm, bk])
    wg_desc = TensorDescriptor.from_tensor(w_gate, [bk, bn])
    wu_desc = TensorDescriptor.from_tensor(w_up, [bk, bn])
    _sorted_rows_tma_kernel[(programs,)](
        act_desc, wg_desc, wu_desc, dx_rows, g.tile_block, g.tile_start, g.offsets, g.tile_count, D, BS,
        W_NK=False, DUAL=True, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, NUM_PROGRAMS=programs,
        **launch_options(dxc),
    )


@triton.jit
def _sparse_ffn_bwd_dw_gate_up_kernel(
    DACT, X, SORTED_TOK, OFFSETS, DWG, DWU,
    D, BS,
    stride_xt, stride_xd, stride_gf, stride_gd,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    NB: tl.constexpr = 0, D_GROUP: tl.constexpr = 0,
):
    """B3: for block b: dW_gate[b*BS + n, d] = sum_p da[p, n] x[tok_p, d] (and dW_up with du) over the
    block's rows, in row order. DWG and DWU share strides. Tile order: :func:`_dw_tile_ids` (NB: the
    block count, needed with D_GROUP)."""
    b, pid_n, pid_d = _dw_tile_ids(NB, tl.cdiv(BS, BLOCK_N), tl.cdiv(D, BLOCK_D), D_GROUP)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n_mask = offs_n < BS
    d_mask = offs_d < D
    lo = tl.load(OFFSETS + b)
    hi = tl.load(OFFSETS + b + 1)
    acc_g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < hi
        tok = tl.load(SORTED_TOK + rows, mask=r_mask, other=0).to(tl.int64)
        t_mask = n_mask[:, None] & r_mask[None, :]
        dact = DACT + rows[None, :].to(tl.int64) * (2 * BS) + offs_n[:, None]  # [BLOCK_N, BLOCK_K]: da^T
        xt = tl.load(X + tok[:, None] * stride_xt + offs_d[None, :] * stride_xd,
                     mask=r_mask[:, None] & d_mask[None, :], other=0.0)
        acc_g = tl.dot(tl.load(dact, mask=t_mask, other=0.0), xt, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(tl.load(dact + BS, mask=t_mask, other=0.0), xt, acc_u, input_precision=DOT_PRECISION)
    off = (b * BS + offs_n)[:, None].to(tl.int64) * stride_gf + offs_d[None, :] * stride_gd
    mask = n_mask[:, None] & d_mask[None, :]
    tl.store(DWG + off, acc_g.to(DWG.dtype.element_ty), mask=mask)
    tl.store(DWU + off, acc_u.to(DWU.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_ffn_bwd_dw_down_kernel(
    DO, HW, SORTED_TOK, OFFSETS, DWD,
    D, BS,
    stride_dot, stride_dod, stride_wd, stride_wf,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NB: tl.constexpr = 0, D_GROUP: tl.constexpr = 0,
):
    """B4: for block b: dW_down[d, b*BS + n] = sum_p dO[tok_p, d] hw[p, n] over the block's rows, in row
    order. Tile order: :func:`_dw_tile_ids` (the 3-D grid is (block, model-column tile, neuron tile))."""
    if D_GROUP == 0:
        b, pid_d, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    else:
        b, pid_n, pid_d = _dw_tile_ids(NB, tl.cdiv(BS, BLOCK_N), tl.cdiv(D, BLOCK_D), D_GROUP)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d_mask = offs_d < D
    n_mask = offs_n < BS
    lo = tl.load(OFFSETS + b)
    hi = tl.load(OFFSETS + b + 1)
    acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_mask = rows < hi
        tok = tl.load(SORTED_TOK + rows, mask=r_mask, other=0).to(tl.int64)
        go_t = tl.load(DO + tok[None, :] * stride_dot + offs_d[:, None] * stride_dod,  # [BLOCK_D, BLOCK_K]
                       mask=d_mask[:, None] & r_mask[None, :], other=0.0)
        hw = tl.load(HW + rows[:, None].to(tl.int64) * BS + offs_n[None, :],
                     mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(go_t, hw, acc, input_precision=DOT_PRECISION)
    off = offs_d[:, None].to(tl.int64) * stride_wd + (b * BS + offs_n)[None, :] * stride_wf
    tl.store(DWD + off, acc.to(DWD.dtype.element_ty), mask=d_mask[:, None] & n_mask[None, :])


@triton.jit
def _zero_tail_rows_kernel(DACT, HW, OFFSETS, P, NB, BS, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Zeros the rows [offsets[NB], P) of dact [P, 2 BS] and hw [P, BS]: the rows of empty slots (threshold
    mode, invalid ids), which no kernel writes. The Gluon dW kernels read a block's rows in whole K steps by TMA,
    so the last block's final step reaches them (as the K operand: garbage there, even times a zero x row, would
    be NaN in every gradient); the pointer kernels mask them instead."""
    r0 = tl.program_id(0) * BLOCK_R
    start = tl.load(OFFSETS + NB)
    if r0 + BLOCK_R > start:
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = (rows >= start) & (rows < P)
        rows64 = rows.to(tl.int64)
        zero = tl.zeros((BLOCK_R, BLOCK_C), dtype=DACT.dtype.element_ty)
        for c0 in range(0, 2 * BS, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            mask = r_ok[:, None] & (cols < 2 * BS)[None, :]
            tl.store(DACT + rows64[:, None] * (2 * BS) + cols[None, :], zero, mask=mask)
            tl.store(HW + rows64[:, None] * BS + cols[None, :], zero, mask=mask & (cols < BS)[None, :])


@triton.jit
def _dweights_kernel(DWP, INV, DW, T, K, P, SHARED: tl.constexpr, N_TILES: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    """dweights[t, j] = sum over the dact kernels' neuron tiles n of DWP[n, inv[t, SHARED + j]] (in n order), 0 for
    a slot outside every block (inv < 0: its DWP row was never written)."""
    ts = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    js = tl.arange(0, BLOCK_K)
    m = (ts < T)[:, None] & (js < K)[None, :]
    inv = tl.load(INV + ts[:, None].to(tl.int64) * (SHARED + K) + SHARED + js[None, :], mask=m, other=-1)
    ok = m & (inv >= 0)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for n in tl.static_range(N_TILES):
        acc += tl.load(DWP + n * P + inv, mask=ok, other=0.0)
    tl.store(DW + ts[:, None].to(tl.int64) * K + js[None, :], acc, mask=m)


# The dW kernels' sm90 forms with the block's neurons on N as 128 + 64 + 32 (sparse_ffn_sm90._dw_pieces_sm90_kernel:
# no padded MMA columns, 12.5 % less tensor work than the two-tile forms at 224-neuron blocks), where dw_pieces_ok(BS)
# (the two-tile forms serve the other block sizes). Session 33, H200, T8192 ratio 0.3
# (benchmarks/ab_sparse_train_flag.py sparse_ffn.DW_PIECES, six alternating rounds): whole backward 3.910 -> 3.655 ms,
# the same bits.
DW_PIECES = True


def bwd_launch_config(tokens: int, d_model: int, block_size: int, wide: bool = True) -> dict:
    """Tile shapes of the backward kernels (as :func:`launch_config`; the large-batch entries are H200
    sweeps' winners at T8192, 30 % active: 7.56 ms against 8.57 ms for the first guess (session 5), then
    5.87 ms against 7.36 with 128-row tiles and dx 256 columns wide (session 16,
    ``benchmarks/diag_sparse_train.py --sweep``): dx's K is only the block's 2 x 224 neurons, so its
    64 x 64 tiles moved ~32 FLOP per byte of L2 traffic (203 TF/s); 128 x 256 moves ~85. Then dact's
    epilogue in two column halves (255 registers + ~1.8 KB of spills per thread -> 194, none): backward
    6.02 -> 5.70 ms at ratio 0.3, 10.05 -> 9.47 at 0.5 (``--sweep3``). Then tile orders and the persistent
    TMA dx (session 17, ``--sweep6``): dact in cols_first order, dx as :func:`_sorted_rows_tma_kernel` (256 x 32,
    3 stages, one program per SM; the plain kernel in cols_first order where TMA cannot run), the dW grids in
    ``d_group`` order (4 model-column tiles per group for dW gate/up, 8 for dW down): 5.67 -> 5.29 ms at 0.3,
    9.46 -> 8.69 at 0.5. Then dact over all of a block's neurons in one program (``full_block``, session 30:
    :func:`_sparse_ffn_bwd_dact_full_kernel`, K tiles of 64; the tiled settings stay for blocks without a
    power-of-2 split): 5.27-5.37 -> 5.19-5.22 ms at 0.3, 8.59-8.74 -> 8.44-8.51 at 0.5 (``--sweep8``, three
    readings each). ``wide=False``: as for :func:`launch_config` (dact, dx and dW gate/up take
    192-197 KB of shared memory at T >= 4096)."""
    if tokens * block_size <= 4096:
        base = dict(block_m=16, block_n=16, block_k=16, num_warps=4)
    elif tokens < 4096 or not wide:
        base = dict(block_m=64, block_n=64, block_k=64, num_warps=4)
    else:
        big = dict(block_n=128, block_k=128, num_warps=8, num_stages=3)
        base = dict(block_m=128, block_n=64, block_k=64, num_warps=4,
                    dact=dict(big, split_epilogue=True, cols_first=True, full_block=True, block_k=64, sm90=True),
                    dw_gate_up=dict(big, d_group=4, sm90=True),
                    dx=dict(block_n=256, block_k=32, num_warps=8, num_stages=3, tma=True, sm90=True, cols_first=True),
                    dw_down=dict(block_n=128, block_k=64, num_warps=8, num_stages=3, d_group=8, sm90=True),
                    combine=dict(block_n=combine_tiles(d_model)[1], num_warps=4))
    # dx.sm90: on sm_90 dx as the Gluon kernel of sparse_ffn_sm90 (session 30; its own tiles) where it can run;
    # dact.sm90, dw_gate_up.sm90, dw_down.sm90: those kernels as their gathered Gluon forms (session 31;
    # sparse_ffn_sm90.DACT_CONFIG / DW_GATE_UP_CONFIG / DW_DOWN_CONFIG) where they can run: backward 4.80 -> 4.40 ms;
    # full_block: dact as _sparse_ffn_bwd_dact_full_kernel where k_pieces(BS) splits the block; split_epilogue:
    # the tiled dact's SwiGLU-derivative epilogue in two column halves (block_n >= 32); dx.tma: the
    # persistent TMA form of dx on dx.programs programs (None: dx.programs_per_sm per SM) where _dx_tma_ok;
    # cols_first / d_group: the tile orders of _tile_ids / _dw_tile_ids
    base["dact"] = {"split_epilogue": False, "cols_first": False, "full_block": False, "sm90": False,
                    **base.get("dact", {})}
    base["dx"] = {"tma": False, "sm90": False, "programs": None, "programs_per_sm": 1, "cols_first": False,
                  **base.get("dx", {})}
    for kern in ("dw_gate_up", "dw_down"):
        # pieces (with sm90): sparse_ffn_sm90's _dw_pieces_sm90_kernel (DW_PIECES)
        base[kern] = {"d_group": 0, "sm90": False, "pieces": DW_PIECES, **base.get(kern, {})}
    return base


def sparse_ffn_bwd(grad_out: torch.Tensor, x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                   w_down: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, act: torch.Tensor, *,
                   shared_blocks: int, n_blocks: int, block_m: int | None = None, block_n: int | None = None,
                   block_k: int | None = None, num_warps: int | None = None, config: dict | None = None,
                   routed: tuple | None = None):
    """Backward of :func:`sparse_ffn_fwd` (no host sync, deterministic): ``grad_out [T, D]`` and the
    forward's ``act`` -> ``(dx [T, D], dW_gate, dW_up [F, D], dW_down [D, F]`` in x's dtype,
    ``dweights`` fp32 ``[T, k])``. ``routed``: the forward's ``(grouping, w_full, w_sorted)`` (e.g. from
    :func:`unpack_plan`), used where it was grouped at this call's block_m; else the grouping is recomputed from
    ``idx`` (the forward's, bit for bit)."""
    w_gate, w_up = _same_strides(w_gate, w_up)
    T, D = x.shape
    F_ = w_gate.shape[0]
    BS = F_ // n_blocks
    block_m, kc = resolve_config(bwd_launch_config(T, D, BS, wide=_wide_tiles(x)), BWD_KERNELS,
                                 block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps, config=config)
    # dact tiles the block's neurons, so its block_n also sets the dweights partial-sum rows and
    # the neuron tiling of the dW kernels (they share hw/dact's layout, not the grid)
    dev, dt = x.device, x.dtype
    # an opaque op's body (never traced): every Triton kernel launched directly, without wrap_triton's
    # higher-order-op dispatch in eager (host time per launch)
    if routed is not None and routed[0].block_m == block_m:
        g, w_full, w_sorted = routed
    else:
        g, w_full, w_sorted = route_pairs(idx, weights, shared_blocks, n_blocks, block_m, direct=True)
    KT = shared_blocks + idx.shape[1]
    P = T * KT
    dwg = torch.empty(F_, D, dtype=dt, device=dev)
    dwu = torch.empty(F_, D, dtype=dt, device=dev)
    dwd = torch.empty(D, F_, dtype=dt, device=dev)
    if P == 0:
        return (torch.zeros_like(x), dwg.zero_(), dwu.zero_(), dwd.zero_(),
                torch.zeros(T, idx.shape[1], dtype=torch.float32, device=dev))
    grad_out = grad_out.to(dt)
    n_tiles = g.tile_block.numel()
    da, dxc, cb, dwgu, dwdn = (kc[n] for n in BWD_KERNELS)
    pieces = k_pieces(BS)
    da_sm90 = bool(da["sm90"]) and _dact_sm90_ok(grad_out, w_down, act, block_m, BS)
    da_full = not da_sm90 and bool(da["full_block"]) and pieces is not None
    n_ntiles = 1 if da_full or da_sm90 else triton.cdiv(BS, da["block_n"])
    dact = torch.empty(P, 2, BS, dtype=dt, device=dev)
    hw = torch.empty(P, BS, dtype=dt, device=dev)
    dwp = torch.empty(n_ntiles, P, dtype=torch.float32, device=dev)  # rows of empty slots: never read
    prec = _dot_precision(dt)
    dact_args = (grad_out, w_down, act, w_sorted, g.sorted_tok, g.tile_block, g.tile_start, g.offsets,
                 dact, hw, dwp, D, BS, n_blocks, P,
                 grad_out.stride(0), grad_out.stride(1), w_down.stride(0), w_down.stride(1))
    if da_sm90:
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        g9.dact_sm90(grad_out, w_down, act, w_sorted, dact, hw, dwp, g, bs=BS, **g9.DACT_CONFIG)
    elif da_full:
        triton_kernel(_sparse_ffn_bwd_dact_full_kernel, True)[(n_tiles,)](
            *dact_args, N0=pieces[0], N1=pieces[1], N2=pieces[2], DOT_PRECISION=prec, BLOCK_M=block_m,
            BLOCK_K=da["block_k"], **launch_options(da),
        )
    else:
        triton_kernel(_sparse_ffn_bwd_dact_kernel, True)[_grid(n_tiles, n_ntiles, da["cols_first"])](
            *dact_args, BLOCK_M=block_m, BLOCK_N=da["block_n"], BLOCK_K=da["block_k"], DOT_PRECISION=prec,
            SPLIT_EPILOGUE=bool(da["split_epilogue"]) and da["block_n"] >= 32, COLS_FIRST=bool(da["cols_first"]),
            **launch_options(da),
        )
    dx_rows = torch.empty(P, D, dtype=dt, device=dev)
    if (dxc["tma"] and dxc["sm90"] and _sm90_ok(dact, w_gate, block_m)
            and _dx_tma_ok(dact, w_gate, w_up, _sm90_block_k())):
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        g9.short_k_gemm_sm90(dact.view(P, 2 * BS), w_gate, w_up, dx_rows, g, bs=BS, w_nk=False)
    elif dxc["tma"] and _dx_tma_ok(dact, w_gate, w_up, dxc["block_k"]):
        _dx_tma(dact, w_gate, w_up, dx_rows, g, dxc, prec)
    else:
        triton_kernel(_sparse_ffn_bwd_dx_kernel, True)[_grid(n_tiles, triton.cdiv(D, dxc["block_n"]),
                                                                   dxc["cols_first"])](
            dact, w_gate, w_up, dx_rows, g.tile_block, g.tile_start, g.offsets, D, BS, n_blocks,
            w_gate.stride(0), w_gate.stride(1), BLOCK_M=block_m, BLOCK_N=dxc["block_n"], BLOCK_K=dxc["block_k"],
            DOT_PRECISION=prec, COLS_FIRST=bool(dxc["cols_first"]), **launch_options(dxc),
        )
    dx = torch.empty(T, D, dtype=dt, device=dev)
    block_t, block_n = combine_tiles(D, cb["block_n"])
    triton_kernel(_sparse_ffn_combine_kernel, True)[(triton.cdiv(T, block_t), triton.cdiv(D, block_n))](
        dx_rows, g.inv, w_full, dx, T, D, KT, dx.stride(0),
        WEIGHTED=False, BLOCK_T=block_t, BLOCK_N=block_n, **launch_options(cb),
    )
    gu_n = dwgu["block_n"]
    gu_g = int(dwgu["d_group"])
    dwgu_sm90 = dwgu["sm90"] and _dw_gate_up_sm90_ok(dact, x, dwg, dwu, block_m)
    dwdn_sm90 = dwdn["sm90"] and _dw_down_sm90_ok(grad_out, hw, dwd, block_m)
    if dwgu_sm90 or dwdn_sm90:
        block_r = 64
        triton_kernel(_zero_tail_rows_kernel, True)[(triton.cdiv(P, block_r),)](
            dact, hw, g.offsets, P, n_blocks, BS, BLOCK_R=block_r, BLOCK_C=64,
        )
    if dwgu_sm90:
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        if dwgu["pieces"] and g9.dw_pieces_ok(BS):
            g9.dw_pieces_sm90(dact.view(P, 2 * BS), x, dwg, dwu, g, n_blocks, bs=BS, n_prod=2, transposed=True,
                              **g9.DW_PIECES_GU_CONFIG)
        else:
            g9.dw_gate_up_sm90(dact, x, dwg, dwu, g, n_blocks, **g9.DW_GATE_UP_CONFIG)
    else:
        triton_kernel(_sparse_ffn_bwd_dw_gate_up_kernel, True)[
                _dw_grid(n_blocks, triton.cdiv(BS, gu_n), triton.cdiv(D, gu_n), gu_g)](
            dact, x, g.sorted_tok, g.offsets, dwg, dwu, D, BS, x.stride(0), x.stride(1), dwg.stride(0),
            dwg.stride(1), BLOCK_N=gu_n, BLOCK_D=gu_n, BLOCK_K=dwgu["block_k"], DOT_PRECISION=prec,
            NB=n_blocks if gu_g else 0, D_GROUP=gu_g, **launch_options(dwgu),
        )
    dn_n = dwdn["block_n"]
    dn_g = int(dwdn["d_group"])
    if dwdn_sm90:
        from deepseek_kernels.triton import sparse_ffn_sm90 as g9

        if dwdn["pieces"] and g9.dw_pieces_ok(BS):
            g9.dw_pieces_sm90(hw, grad_out, dwd, dwd, g, n_blocks, bs=BS, n_prod=1, transposed=False,
                              **g9.DW_PIECES_CONFIG)
        else:
            g9.dw_down_sm90(grad_out, hw, dwd, g, n_blocks, **g9.DW_DOWN_CONFIG)
    else:
        grid = _dw_grid(n_blocks, triton.cdiv(BS, dn_n), triton.cdiv(D, dn_n), dn_g)
        triton_kernel(_sparse_ffn_bwd_dw_down_kernel, True)[grid if dn_g else (grid[0], grid[2], grid[1])](
            grad_out, hw, g.sorted_tok, g.offsets, dwd, D, BS, grad_out.stride(0), grad_out.stride(1),
            dwd.stride(0), dwd.stride(1), BLOCK_D=dn_n, BLOCK_N=dn_n, BLOCK_K=dwdn["block_k"], DOT_PRECISION=prec,
            NB=n_blocks if dn_g else 0, D_GROUP=dn_g, **launch_options(dwdn),
        )
    K = idx.shape[1]
    dweights = torch.empty(T, K, dtype=torch.float32, device=dev)
    if T * K:
        block_t = 64
        triton_kernel(_dweights_kernel, True)[(triton.cdiv(T, block_t),)](
            dwp, g.inv, dweights, T, K, P, SHARED=shared_blocks, N_TILES=n_ntiles, BLOCK_T=block_t,
            BLOCK_K=triton.next_power_of_2(K))
    return dx, dwg, dwu, dwd, dweights


# ---- decode (a few tokens) ------------------------------------------------------------------------------
#
# For T <= DECODE_MAX_TOKENS tokens the grouping, y and the combine cost more than the math. The two
# decode kernels read the routing straight from idx [T, k] and treat the T tokens as one padded
# 16-row tile: every weight slice of a block that any of the tokens uses is read exactly once, slices
# of unused blocks are never read, so the bytes fall with the ratio. Tokens that do not use a block
# get weight 0 in its rows (free: the tile is padded anyway). Both kernels first list the used blocks
# (a [n_blocks] mask from idx, ranked by a cumsum): gate/up launches one program row per possible used
# block (min(n_blocks, shared + T*k)), down loops over (used block, K tile) pairs in one flat loop.

DECODE_MAX_TOKENS = 16
DECODE_MAX_DOWN_SPLITS = 16
# The down projection's h tile has the dot's 16 rows whatever T is (rows >= T hold zeros): with this on, those
# rows' loads are masked off, so a 1-token program reads 1/16 of the h bytes it read before (per K tile of 224
# neurons: 448 B instead of 7 KB from L2, next to 14 KB of w_down). The same bits either way. H200, session 28: no
# time difference measured (1 token: 23.1 vs 24.0 us in one run, 23.3 vs 23.3 in three more with another order;
# the diag's readings move ~0.7 us with their position in the run).
DECODE_MASK_H_ROWS = True
# The one-kernel down projection (up to 2 tokens) loads its first (used block, K tile) w_down tile before its
# programmatic-dependent-launch wait for gate/up (without PDL it just loads first). H200, session 28
# (benchmarks/diag_sparse_decode.py, graphed, three runs, same bits): 2 tokens decode kernels 38.4 -> 35.9 us (op
# 41.7 -> 39.1), 1 token 24.0 -> 23.4 (op unchanged, 26.4 / 26.5). Measured and dropped: 2 tiles (37.1 / 24.0 us:
# their 64 registers delay the loop), the early tiles as the last pairs (1 token 26.8 vs 24.4).
DECODE_DOWN_EARLY_W = True
# The one-kernel down projection finds each (used block, K tile) pair's block as the lowest set bit of a 64-bit
# mask of the used blocks (scalar arithmetic) instead of a reduction over all blocks per pair (shared memory and a
# barrier in every loop iteration); up to 64 blocks. Same pairs, same order, same bits. H200, session 29
# (benchmarks/ab_sparse_decode_flag.py, graphed op, 6 alternating rounds): 2 tokens 36.8-36.9 vs 37.0-37.2 us in
# every round, 1 token within 0.1 us but for one round where its readings jumped ~0.6 us before the other's.
DECODE_DOWN_BY_MASK = True


@triton.jit
def _decode_membership(IDX, WT, T, b, S, K, offs_t, BLOCK_KS: tl.constexpr):
    """Per token of the tile: the weight of block b (1 for shared blocks, the routing weight if b is
    among its chosen routed blocks, else 0) and whether it uses b."""
    offs_j = tl.arange(0, BLOCK_KS)
    m = (offs_t[:, None] < T) & (offs_j[None, :] < K)
    ids = tl.load(IDX + offs_t[:, None] * K + offs_j[None, :], mask=m, other=-1)
    hit = (ids == b - S) & m
    w = tl.sum(tl.where(hit, tl.load(WT + offs_t[:, None] * K + offs_j[None, :], mask=m, other=0.0), 0.0), 1)
    member = tl.sum(hit.to(tl.int32), 1) > 0
    shared = b < S
    w = tl.where(shared, 1.0, w)
    member = (member | shared) & (offs_t < T)
    return w, member


@triton.jit
def _decode_used_blocks(IDX, T, S, K, NB, BLOCK_T: tl.constexpr, BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr):
    """``(used [BLOCK_B], rank [BLOCK_B], n_used)``: which of the NB blocks any of the T tokens uses
    (shared blocks always), each used block's position in ascending order, and how many there are."""
    offs_b = tl.arange(0, BLOCK_B)
    offs_j = tl.arange(0, BLOCK_KS)
    hit = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for t in range(0, T):
        ids = tl.load(IDX + t * K + offs_j, mask=offs_j < K, other=-1)
        match = ((ids[None, :] + S) == offs_b[:, None]) & (ids[None, :] >= 0)
        hit = tl.maximum(hit, tl.max(match.to(tl.int32), 1))
    used = ((hit > 0) | (offs_b < S)) & (offs_b < NB)
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    return used, rank, tl.sum(used.to(tl.int32), 0)


@triton.jit
def _decode_program_tile(IDX, WT, T, BS, S, K, NB, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr):
    """The tile of a (used block, neuron tile) program: whether program_id(0) has a used block (the
    j-th used block in ascending order), that block b, the tokens' weights for b and whether they
    use it, and the neurons of program_id(1)."""
    used, rank, n_used = _decode_used_blocks(IDX, T, S, K, NB, BLOCK_T, BLOCK_KS, BLOCK_B)
    j = tl.program_id(0)
    b = tl.sum(tl.where(used & (rank == j), tl.arange(0, BLOCK_B), 0), 0)
    offs_t = tl.arange(0, BLOCK_T)
    w_t, member = _decode_membership(IDX, WT, T, b, S, K, offs_t, BLOCK_KS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return j < n_used, b, offs_t, w_t, member, offs_n, offs_n < BS


@triton.jit
def _sparse_ffn_decode_gate_up_kernel(
    X, WG, WU, IDX, WT, H,
    T, D, BS, S, K, NB,
    stride_xt, stride_xd, stride_wf, stride_wd,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Block b = the program_id(0)-th used block (ascending; programs past the last used block
    exit), neurons n of program_id(1): H[b, t, n] = weight(t, b) * silu(x[t] . w_gate[b*BS + n]) *
    (x[t] . w_up[b*BS + n]) for all T tokens. H of unused blocks stays unwritten and unread.
    The down kernel may launch once every program has finished its dot loop: triggered at the start instead, it
    lost 1.5 us at one token (H200, session 29: 26.4 vs 24.9 us, graphed op; 2 tokens a tie), as in session 12."""
    chain_wait(PDL)
    active, b, offs_t, w_t, member, offs_n, n_mask = _decode_program_tile(IDX, WT, T, BS, S, K, NB, BLOCK_T, BLOCK_N,
                                                                          BLOCK_KS, BLOCK_B)
    if active:
        _decode_gate_up_rows(X, WG, WU, H, b, w_t, member, offs_t, offs_n, n_mask, D, BS, stride_xt, stride_xd,
                             stride_wf, stride_wd, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K, PDL)


@triton.jit
def _decode_gate_up_rows(X, WG, WU, H, b, w_t, member, offs_t, offs_n, n_mask, D, BS, stride_xt, stride_xd,
                         stride_wf, stride_wd, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """H[b, t, n] = w_t[t] * silu(x[t] . w_gate[b*BS + n]) * (x[t] . w_up[b*BS + n]) for neurons offs_n of
    block b; tokens that do not use b (``member`` false) read zeros for x and get 0."""
    acc_g, acc_u = _gate_up_dots(X, WG, WU, offs_t, member, b * BS + offs_n, n_mask, D, stride_xt, stride_xd,
                                 stride_wf, stride_wd, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K)
    chain_trigger(PDL)
    h = acc_g * tl.sigmoid(acc_g) * acc_u * w_t[:, None]
    tl.store(H + (b * BLOCK_T + offs_t[:, None]).to(tl.int64) * BS + offs_n[None, :],
             h.to(H.dtype.element_ty), mask=n_mask[None, :])


@triton.jit
def _sparse_ffn_decode_route_gate_up_kernel(
    PART, BIAS, IDX, WOUT, PROBS, X, WG, WU, H,
    T, D, BS, S, NR, threshold,
    stride_xt, stride_xd, stride_wf, stride_wd,
    K: tl.constexpr, SOFTMAX: tl.constexpr, NORMALISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_THRESHOLD: tl.constexpr, SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_TS: tl.constexpr, BLOCK_NR: tl.constexpr, BLOCK_KS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """The router's selection and the gate/up projection in one kernel, for T <= BLOCK_TS tokens: every
    program sums the split kernel's partial logits (PART, a few KB from L2) and selects the top-K itself (by
    sorting, as :func:`sparse_ffn_route` does for few tokens), so the selecting kernel and its kernel boundary
    go away. Program (0, 0) stores idx, weights and probs (the down kernel and the caller read them). Then, as
    :func:`_sparse_ffn_decode_gate_up_kernel`: block b = the program_id(0)-th used block, neurons of
    program_id(1). The same sums in the same order as the two kernels: the same bits."""
    chain_wait(PDL)
    offs_ts = tl.arange(0, BLOCK_TS)
    offs_r = tl.arange(0, BLOCK_NR)
    acc = _sum_partial_logits(PART, T, offs_ts, offs_r, SPLITS, BLOCK_TS, BLOCK_NR)
    p, idx, w_route = _route_tile(acc, BIAS, NR, f32(threshold), offs_r, K, SOFTMAX, NORMALISE, HAS_BIAS,
                                  HAS_THRESHOLD, BLOCK_TS, BLOCK_NR, BLOCK_KS, 2)  # 2: by sorting
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        _store_route(IDX, WOUT, PROBS, p, idx, w_route, T, NR, offs_ts, offs_r, K, BLOCK_KS)
    # the used blocks (shared ones always) from the selection in registers, as _decode_used_blocks
    cols = tl.arange(0, BLOCK_KS)
    valid = (offs_ts[:, None] < T) & (cols[None, :] < K) & (idx >= 0)
    offs_b = tl.arange(0, BLOCK_B)
    hit = ((idx[:, :, None] + S) == offs_b[None, None, :]) & valid[:, :, None]
    used = (tl.max(tl.max(hit.to(tl.int32), 1), 0) > 0) | (offs_b < S)
    used = used & (offs_b < S + NR)
    rank = tl.cumsum(used.to(tl.int32), 0) - 1
    j = tl.program_id(0)
    b = tl.sum(tl.where(used & (rank == j), offs_b, 0), 0)
    # each token's weight for block b and whether it uses it, spread onto the BLOCK_T rows of the dot
    hb = ((idx + S) == b) & valid
    shared = b < S
    w_ts = tl.where(shared, 1.0, tl.sum(tl.where(hb, w_route, 0.0), 1))
    m_ts = ((tl.sum(hb.to(tl.int32), 1) > 0) | shared) & (offs_ts < T)
    offs_t = tl.arange(0, BLOCK_T)
    same = offs_t[:, None] == offs_ts[None, :]
    w_t = tl.sum(tl.where(same, w_ts[None, :], 0.0), 1)
    member = tl.sum(tl.where(same, m_ts[None, :].to(tl.int32), 0), 1) > 0
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if j < tl.sum(used.to(tl.int32), 0):
        _decode_gate_up_rows(X, WG, WU, H, b, w_t, member, offs_t, offs_n, offs_n < BS, D, BS, stride_xt, stride_xd,
                             stride_wf, stride_wd, DOT_PRECISION, BLOCK_T, BLOCK_N, BLOCK_K, PDL)


@triton.jit
def _decode_down_tile(IDX, T, D, BS, S, K, NB, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr):
    """A down-projection program's tokens, columns (program_id(0)) and column mask, the used blocks
    (:func:`_decode_used_blocks`) and the K tiles per block."""
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    used, rank, n_used = _decode_used_blocks(IDX, T, S, K, NB, BLOCK_T, BLOCK_KS, BLOCK_B)
    return offs_t, offs_n, offs_n < D, used, rank, n_used, tl.cdiv(BS, BLOCK_K)


@triton.jit
def _decode_down_w(WD, offs_n, n_mask, used, rank, i, valid, k_tiles, BS, stride_wd, stride_wf,
                   BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    """Pair i's (used block j, K tile) w_down tile [BLOCK_K, BLOCK_N] (zeros where ``valid`` is false), its block
    and neurons."""
    j = i // k_tiles
    b = tl.sum(tl.where(used & (rank == j), tl.arange(0, BLOCK_B), 0), 0)  # the j-th used block
    w, offs_k, k_mask = _decode_down_w_of(WD, b, i - j * k_tiles, offs_n, n_mask, valid, BS, stride_wd, stride_wf,
                                          BLOCK_K)
    return w, b, offs_k, k_mask


@triton.jit
def _decode_down_w_of(WD, b, kt, offs_n, n_mask, valid, BS, stride_wd, stride_wf, BLOCK_K: tl.constexpr):
    """Block b's K tile kt of w_down as [BLOCK_K, BLOCK_N] (zeros where ``valid`` is false), its neurons and mask."""
    offs_k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = (offs_k < BS) & valid
    w = tl.load(WD + offs_n[None, :].to(tl.int64) * stride_wd + (b * BS + offs_k)[:, None] * stride_wf,
                mask=k_mask[:, None] & n_mask[None, :], other=0.0)
    return w, offs_k, k_mask


@triton.jit
def _decode_down_h(H, T, b, offs_t, offs_k, k_mask, BS, BLOCK_T: tl.constexpr, MASK_ROWS: tl.constexpr):
    """h[b, t, offs_k] of the dot's BLOCK_T rows (``MASK_ROWS``: rows >= T, zeros, not loaded)."""
    h_mask = k_mask[None, :]
    if MASK_ROWS:
        h_mask = h_mask & (offs_t[:, None] < T)
    return tl.load(H + (b * BLOCK_T + offs_t[:, None]).to(tl.int64) * BS + offs_k[None, :], mask=h_mask, other=0.0)


@triton.jit
def _decode_down_pairs(acc, H, WD, T, offs_t, offs_n, n_mask, used, rank, start, stop, k_tiles, BS, stride_wd,
                       stride_wf, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_B: tl.constexpr, MASK_ROWS: tl.constexpr, BY_MASK: tl.constexpr = False, rem=0):
    """acc [BLOCK_T, BLOCK_N] fp32 plus, over the flat (used block j, K tile) pairs i in [start, stop) in ascending
    order, H[b_j, t, tile] . w_down[n, b_j tile]. ``MASK_ROWS``: the h rows of tokens >= T (zeros, the padding of
    the dot's 16 rows) are not loaded (see :data:`DECODE_MASK_H_ROWS`). ``BY_MASK``: each pair's block is the lowest
    set bit of ``rem`` (an int64 mask of the used blocks from pair ``start``'s on, :func:`_used_mask`), cleared after
    the block's last K tile: scalar arithmetic instead of a reduction over the BLOCK_B blocks per pair."""
    for i in range(start, stop):
        if BY_MASK:
            b = _lowest_bit(rem)
            w, offs_k, k_mask = _decode_down_w_of(WD, b, i % k_tiles, offs_n, n_mask, True, BS, stride_wd,
                                                  stride_wf, BLOCK_K)
            rem = tl.where((i + 1) % k_tiles == 0, rem & (rem - 1), rem)
        else:
            w, b, offs_k, k_mask = _decode_down_w(WD, offs_n, n_mask, used, rank, i, True, k_tiles, BS, stride_wd,
                                                  stride_wf, BLOCK_K, BLOCK_B)
        h = _decode_down_h(H, T, b, offs_t, offs_k, k_mask, BS, BLOCK_T, MASK_ROWS)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _used_mask(used, BLOCK_B: tl.constexpr):
    """int64 mask with bit b set for each used block b (BLOCK_B <= 64)."""
    bits = tl.full((BLOCK_B,), 1, tl.int64) << tl.arange(0, BLOCK_B).to(tl.int64)
    return tl.sum(tl.where(used, bits, 0), 0)  # distinct bits: the sum is their OR


@triton.jit
def _lowest_bit(m):
    """The index of the lowest set bit of the int64 scalar ``m`` (!= 0), from the exponent of the float of m & -m
    (a power of two, exact in fp32; -2^63 for bit 63 has the same exponent)."""
    low = (m & -m).to(tl.float32)
    return ((low.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _decode_store_rows(acc, IDX, OUT, T, K, NR, offs_t, offs_n, n_mask, stride_ot, BLOCK_KS: tl.constexpr):
    """Stores out[t, n] for the T tokens; a token with an id outside [-1, NR) gets a NaN row."""
    offs_j = tl.arange(0, BLOCK_KS)
    m = (offs_t[:, None] < T) & (offs_j[None, :] < K)
    ids = tl.load(IDX + offs_t[:, None] * K + offs_j[None, :], mask=m, other=-1)
    bad = tl.sum(((ids < -1) | (ids >= NR)).to(tl.int32), 1) > 0
    acc = tl.where(bad[:, None], float("nan"), acc)
    tl.store(OUT + offs_t[:, None].to(tl.int64) * stride_ot + offs_n[None, :], acc.to(OUT.dtype.element_ty),
             mask=(offs_t[:, None] < T) & n_mask[None, :])


@triton.jit
def _sparse_ffn_decode_down_kernel(
    H, WD, IDX, OUT,
    T, D, BS, S, K, NB, NR,
    stride_wd, stride_wf, stride_ot,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr,
    MASK_ROWS: tl.constexpr = True, EARLY_W: tl.constexpr = False, PDL: tl.constexpr = False,
    BY_MASK: tl.constexpr = False,
):
    """Columns n of program_id(0): out[t, n] = sum over the used blocks b of H[b, t] . w_down[n, b-slice],
    in ascending block order (each output element owned by one program: deterministic, no y, no
    combine). The used blocks are found once up front, then one flat loop runs over (used block,
    K tile) pairs, so the weight loads pipeline across blocks (a loop over all NB blocks with a
    membership test per block serialised ~64 dependent checks and ~7 unpipelined tiles per block).
    A token with an id outside [-1, NR) gets a NaN row.

    ``EARLY_W``: the first pair's w_down tile is loaded into registers before the programmatic-dependent-launch
    wait, while gate/up finishes. Safe: w_down is a weight, and idx was written by
    the router kernel, which every gate/up program waited for before letting this kernel launch."""
    if not EARLY_W:
        chain_wait(PDL)
    offs_t, offs_n, n_mask, used, rank, n_used, k_tiles = _decode_down_tile(IDX, T, D, BS, S, K, NB, BLOCK_T, BLOCK_N,
                                                                            BLOCK_K, BLOCK_KS, BLOCK_B)
    total = n_used * k_tiles
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    start = total * 0
    rem = tl.zeros((), dtype=tl.int64)
    if BY_MASK:
        rem = _used_mask(used, BLOCK_B)
    if EARLY_W:  # pair 0's w_down tile before the wait, its h after it
        w0, b0, k0, m0 = _decode_down_w(WD, offs_n, n_mask, used, rank, 0, total > 0, k_tiles, BS, stride_wd,
                                        stride_wf, BLOCK_K, BLOCK_B)
        chain_wait(PDL)
        acc = tl.dot(_decode_down_h(H, T, b0, offs_t, k0, m0, BS, BLOCK_T, MASK_ROWS), w0, acc,
                     input_precision=DOT_PRECISION)
        start = tl.minimum(total, 1)
        if BY_MASK:  # pair 0 was block b0's last K tile: the loop starts at the next block
            rem = tl.where((start > 0) & (k_tiles == 1), rem & (rem - 1), rem)
    acc = _decode_down_pairs(acc, H, WD, T, offs_t, offs_n, n_mask, used, rank, start, total, k_tiles, BS, stride_wd,
                             stride_wf, DOT_PRECISION, BLOCK_T, BLOCK_K, BLOCK_B, MASK_ROWS, BY_MASK, rem)
    chain_trigger(PDL)
    _decode_store_rows(acc, IDX, OUT, T, K, NR, offs_t, offs_n, n_mask, stride_ot, BLOCK_KS)


@triton.jit
def _sparse_ffn_decode_down_split_kernel(
    H, WD, IDX, PART,
    T, D, BS, S, K, NB,
    stride_wd, stride_wf,
    DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KS: tl.constexpr, BLOCK_B: tl.constexpr,
    MASK_ROWS: tl.constexpr = True, PDL: tl.constexpr = False,
):
    """The down projection's (used block, K tile) pairs of columns program_id(0) in program_id(1)'s
    slice of num_programs(1) equal slices: PART[s, t, n] (fp32; every slice written, an empty one
    with zeros). More programs, each with its own loads in flight (the one-program-per-column-tile
    kernel moved ~12 GB/s per SM, NOTES session 8). H200, session 10: 2 slices took the 8-token decode
    kernels from 108.9 to 93.9 us and left 1 token as it was (27.0 vs 27.2 us)."""
    chain_wait(PDL)
    offs_t, offs_n, n_mask, used, rank, n_used, k_tiles = _decode_down_tile(IDX, T, D, BS, S, K, NB, BLOCK_T, BLOCK_N,
                                                                            BLOCK_K, BLOCK_KS, BLOCK_B)
    total = n_used * k_tiles
    per = tl.cdiv(total, tl.num_programs(1))
    start = tl.program_id(1) * per
    stop = tl.minimum(start + per, total)
    acc = _decode_down_pairs(tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32), H, WD, T, offs_t, offs_n, n_mask, used,
                             rank, start, stop, k_tiles, BS, stride_wd, stride_wf, DOT_PRECISION, BLOCK_T, BLOCK_K,
                             BLOCK_B, MASK_ROWS)
    chain_trigger(PDL)
    tl.store(PART + ((tl.program_id(1) * BLOCK_T + offs_t[:, None]) * D).to(tl.int64) + offs_n[None, :], acc,
             mask=n_mask[None, :])


@triton.jit
def _sparse_ffn_decode_down_finish_kernel(PART, IDX, OUT, T, D, K, NR, stride_ot, SPLITS: tl.constexpr,
                                          BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KS: tl.constexpr,
                                          PDL: tl.constexpr = False):
    """out[t, n] = sum over s = 0, 1, ... of PART[s, t, n] (fixed order: deterministic), NaN rows for
    bad ids, in out's dtype."""
    chain_wait(PDL)
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(PART + ((s * BLOCK_T + offs_t[:, None]) * D).to(tl.int64) + offs_n[None, :],
                       mask=n_mask[None, :], other=0.0)
    chain_trigger(PDL)
    _decode_store_rows(acc, IDX, OUT, T, K, NR, offs_t, offs_n, n_mask, stride_ot, BLOCK_KS)


def decode_launch_config(tokens: int, d_model: int, block_size: int, itemsize: int = 2,
                         max_shared: int | None = None) -> dict:
    """Per-kernel launch settings of the decode kernels, tuned on the H200
    (``benchmarks/tune_sparse_ffn.py --decode``, D4096, 64 blocks of 224, 15 % active, graphed):
    1 token 23.9 us (the first untuned guess: 54.5 us), 8 tokens 85.8 us (was 224 us). The K tile of
    the down projection matters most (32 -> 128: 2x at 8 tokens; 256 = one tile per block of 224: -7 %).
    With ``max_shared`` (a device's :func:`shared_memory_limit`) the stages are cut to what fits it for operands
    of ``itemsize`` bytes (:func:`fit_stages`): 1-2 tokens' 8 gate/up stages take 280 KB in fp32, past the
    H200's 227 KB.

    No gate/up split over d_model: an opt-in (``gate_up.split``: the GEMM in d_model slices, fp32
    partials summed by a finish kernel that wrote h) lost everywhere on the H200
    (benchmarks/diag_sparse_decode.py, ratio 0.15, decode kernels): 1 token 27.9 us unsplit vs
    28.9 / 30.9 / 30.9 us at 2 / 4 / 8 slices, 8 tokens 108.2 vs 116.9 / 119.7 / 130.5 us. Removed in
    session 8 (the code is in git history); the router's logits split (:func:`router_splits`) stays.
    Nor a flat gate/up grid (session 11: the used blocks' rows in equal runs, one run per SM, instead of
    one program per (used block, 32-row tile), 70 programs at one token): 29.9 us vs 24.4 us for the two
    kernels at 1 token, 47.1 vs 37.1 at 2, 89.6 vs 90.7 at 8 (tune_sparse_ffn.py --decode; removed, in git
    history as commit 3d064ed): the 70-program grid is not held back by the SMs it leaves idle."""
    # H200, session 11 (tune_sparse_ffn.py --decode, 6-8 stages and one down K tile per block tried for the
    # first time): 1 token 27.7 -> 23.9 us, 8 tokens 90.7 -> 85.8 us for the two kernels, graphed.
    gate_up = dict(block_n=32, block_k=128, num_warps=4, num_stages=8 if tokens <= 2 else 4)
    # down: one K tile per used block where the block fits in 256 neurons (BS 224: 256 wide, masked).
    # splits > 1: the (used block, K tile) pairs of a column tile in that many slices, fp32 partials summed in
    # slice order by a finish kernel (deterministic). Session 10 made 2 slices the default from 3 tokens (8
    # tokens 93.9 vs 108.9 us at block_k 128); session 11 measured one kernel as fast with block_k 256 (85.8 vs
    # 86.1 us), but sessions 15 and 17 measured 2 slices faster again at 8 tokens (86.2 vs 92.5 us; 89.3 vs
    # 95.1) and at 4 (62.2 vs 66.5): the 128 column tiles alone leave the SMs' load queues short.
    block_k = min(256, max(16, triton.next_power_of_2(block_size)))
    down = dict(block_n=32, block_k=block_k, num_warps=4, num_stages=4, splits=2 if tokens >= 3 else 1)
    for c, weights in ((gate_up, 2), (down, 1)):  # per stage: the 16-row x / h tile, the weight tile(s)
        c["num_stages"] = fit_stages(c["num_stages"], (16 + weights * c["block_n"]) * c["block_k"] * itemsize,
                                     max_shared)
    return {"gate_up": gate_up, "down": down}


def _decode_launch(x: torch.Tensor, block_size: int, config: dict | None) -> dict:
    """The decode kernels' settings for ``x [T, D]`` (:func:`decode_launch_config`, stages fitted to x's device
    and dtype) with a caller's ``config`` overrides."""
    T, D = x.shape
    default = decode_launch_config(T, D, block_size, x.element_size(), shared_memory_limit(x.device))
    return resolve_launch("sparse FFN decode", default, config)


def sparse_ffn_decode(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                      idx: torch.Tensor, weights: torch.Tensor, *, shared_blocks: int, n_blocks: int,
                      direct: bool = False, config: dict | None = None, pdl: bool = False) -> torch.Tensor:
    """Forward for ``T <= DECODE_MAX_TOKENS`` tokens, reading only the used blocks' weight slices:
    ``x [T, D]``, routed ``idx/weights [T, k]`` -> ``out [T, D]`` in x's dtype. No grouping, no
    host sync, two launches (three with the down projection in slices: ``down.splits``, from 3 tokens);
    ``direct``: plain kernel launches, for eager calls. ``config``: per
    kernel overrides, e.g. ``{"down": {"block_k": 64, "num_stages": 4}}`` (see :func:`decode_launch_config`).
    ``pdl``: every kernel a programmatic dependent launch of the one before (see :func:`sparse_ffn_route`)."""
    w_gate, w_up = _same_strides(w_gate, w_up)
    T, D = x.shape
    if T > DECODE_MAX_TOKENS:
        raise ValueError(f"sparse_ffn_decode: at most {DECODE_MAX_TOKENS} tokens, got {T}")
    BS = w_gate.shape[0] // n_blocks
    kc = _decode_launch(x, BS, config)
    gu, dn = kc["gate_up"], kc["down"]
    K = idx.shape[1]
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if T == 0:
        return out
    idx = idx.contiguous()
    wt = weights.float().contiguous()
    block_t = 16
    h = torch.empty(n_blocks, block_t, BS, dtype=x.dtype, device=x.device)
    prec = _dot_precision(x.dtype)
    block_ks = max(2, triton.next_power_of_2(max(K, 1)))
    block_b = max(2, triton.next_power_of_2(n_blocks))
    max_used = min(n_blocks, shared_blocks + T * K)  # programs past the actual count exit at once
    triton_kernel(_sparse_ffn_decode_gate_up_kernel, direct)[(max(max_used, 1), triton.cdiv(BS, gu["block_n"]))](
        x, w_gate, w_up, idx, wt, h, T, D, BS, shared_blocks, K, n_blocks,
        x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
        DOT_PRECISION=prec, BLOCK_T=block_t, BLOCK_N=gu["block_n"], BLOCK_K=gu["block_k"],
        BLOCK_KS=block_ks, BLOCK_B=block_b, PDL=pdl, **launch_options(gu), **pdl_option(pdl),
    )
    return _decode_down(h, w_down, idx, out, shared_blocks, n_blocks, dn, direct, pdl)


def _decode_down(h, w_down, idx, out, shared_blocks: int, n_blocks: int, dn: dict, direct: bool, pdl: bool):
    """The decode's down projection from h [n_blocks, 16, BS] (one kernel, or slices + a finish kernel)."""
    T, D = out.shape
    K, BS = idx.shape[1], h.shape[2]
    block_t = h.shape[1]
    prec = _dot_precision(out.dtype)
    block_ks = max(2, triton.next_power_of_2(max(K, 1)))
    block_b = max(2, triton.next_power_of_2(n_blocks))
    splits = int(dn["splits"])
    if not 1 <= splits <= DECODE_MAX_DOWN_SPLITS:
        raise ValueError(f"sparse_ffn_decode: down splits must be in [1, {DECODE_MAX_DOWN_SPLITS}], got {splits}")
    dn_opts = {**launch_options(dn), **pdl_option(pdl)}
    if splits == 1:
        triton_kernel(_sparse_ffn_decode_down_kernel, direct)[(triton.cdiv(D, dn["block_n"]),)](
            h, w_down, idx, out, T, D, BS, shared_blocks, K, n_blocks, n_blocks - shared_blocks,
            w_down.stride(0), w_down.stride(1), out.stride(0),
            DOT_PRECISION=prec, BLOCK_T=block_t, BLOCK_N=dn["block_n"], BLOCK_K=dn["block_k"],
            BLOCK_KS=block_ks, BLOCK_B=block_b, MASK_ROWS=DECODE_MASK_H_ROWS, EARLY_W=DECODE_DOWN_EARLY_W, PDL=pdl,
            BY_MASK=DECODE_DOWN_BY_MASK and block_b <= 64, **dn_opts,
        )
        return out
    part = torch.empty(splits, block_t, D, dtype=torch.float32, device=out.device)
    triton_kernel(_sparse_ffn_decode_down_split_kernel, direct)[(triton.cdiv(D, dn["block_n"]), splits)](
        h, w_down, idx, part, T, D, BS, shared_blocks, K, n_blocks, w_down.stride(0), w_down.stride(1),
        DOT_PRECISION=prec, BLOCK_T=block_t, BLOCK_N=dn["block_n"], BLOCK_K=dn["block_k"],
        BLOCK_KS=block_ks, BLOCK_B=block_b, MASK_ROWS=DECODE_MASK_H_ROWS, PDL=pdl, **dn_opts,
    )
    finish_n = 256
    triton_kernel(_sparse_ffn_decode_down_finish_kernel, direct)[(triton.cdiv(D, finish_n),)](
        part, idx, out, T, D, K, n_blocks - shared_blocks, out.stride(0),
        SPLITS=splits, BLOCK_T=block_t, BLOCK_N=finish_n, BLOCK_KS=block_ks, PDL=pdl, num_warps=4,
        **pdl_option(pdl),
    )
    return out


# The token counts (at most FUSED_ROUTE_BLOCK_TS) at which gated_sparse_ffn's eager decode fuses the router's
# selection into the gate/up kernel (sparse_ffn_route_decode); empty = never. The same bits as the unfused path
# (GPU-tested); benchmarks/diag_sparse_decode.py times both, benchmarks/ab_sparse_decode_flag.py A/Bs them.
# H200, graphed op: session 12 (rank select) T1 28.0 vs 28.5 us, T2 43.1 vs 42.6; session 23 (sort select, 1.7
# us as its own kernel) T1 27.1 vs 26.4, T2 40.4 vs 40.5; session 29 (the down kernel's early w_down tile since
# session 28): T1 27.1 vs 25.6 us (diag), T2 36.9 vs 38.0 us (medians of 4 alternating rounds, 36.9 / 36.9 /
# 36.9 / 37.9 vs 37.8 / 38.1 / 38.0 / 38.0): on at 2 tokens only.
FUSED_ROUTE_TOKENS = (2,)
FUSED_ROUTE_BLOCK_TS = 2  # the selection's token tile in the fused kernel (as the router kernel's for few tokens)


def sparse_ffn_route_decode(x: torch.Tensor, router_weight: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                            w_down: torch.Tensor, *, k: int, gate: str, weighting: str, shared_blocks: int,
                            bias: torch.Tensor | None = None, threshold: float | None = None, direct: bool = False,
                            config: dict | None = None, pdl: bool = False, splits: int | None = None):
    """Router + decode for ``T <= FUSED_ROUTE_BLOCK_TS`` tokens in three launches: the router's split
    logits kernel, :func:`_sparse_ffn_decode_route_gate_up_kernel` (top-k by rank + gate/up) and the down
    projection; :func:`sparse_ffn_route` then :func:`sparse_ffn_decode` take four. Returns ``(out, idx,
    weights, probs)``, the same bits as those two calls (``splits``: as :func:`sparse_ffn_route`'s)."""
    T, D = x.shape
    if not 0 < T <= FUSED_ROUTE_BLOCK_TS:
        raise ValueError(f"sparse_ffn_route_decode: 1 to {FUSED_ROUTE_BLOCK_TS} tokens, got {T}")
    w_gate, w_up = _same_strides(w_gate, w_up)
    NR = router_weight.shape[0]
    n_blocks = NR + shared_blocks
    BS = w_gate.shape[0] // n_blocks
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    kc = _decode_launch(x, BS, config)
    gu = kc["gate_up"]
    block_d = 64
    splits, d_per_split = _split_plan(T, D, x.device, 32, block_d, splits)
    block_nr = max(16, triton.next_power_of_2(NR))
    part = _router_partial_logits(x, router_weight, splits, d_per_split, block_d, block_nr, direct, pdl)
    idx = torch.empty(T, k, dtype=torch.int32, device=x.device)
    weights = torch.empty(T, k, dtype=torch.float32, device=x.device)
    probs = torch.empty(T, NR, dtype=torch.float32, device=x.device)
    block_t = 16
    h = torch.empty(n_blocks, block_t, BS, dtype=x.dtype, device=x.device)
    max_used = min(n_blocks, shared_blocks + T * k)
    triton_kernel(_sparse_ffn_decode_route_gate_up_kernel, direct)[(max(max_used, 1), triton.cdiv(BS, gu["block_n"]))](
        part, bias if bias is not None else probs, idx, weights, probs, x, w_gate, w_up, h,
        T, D, BS, shared_blocks, NR, float(threshold) if threshold is not None else 0.0,
        x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
        K=k, SOFTMAX=gate == "softmax", NORMALISE=weighting == "gate", HAS_BIAS=bias is not None,
        HAS_THRESHOLD=threshold is not None, SPLITS=splits, DOT_PRECISION=_dot_precision(x.dtype),
        BLOCK_TS=FUSED_ROUTE_BLOCK_TS, BLOCK_NR=block_nr, BLOCK_KS=max(2, triton.next_power_of_2(k)),
        BLOCK_T=block_t, BLOCK_N=gu["block_n"], BLOCK_K=gu["block_k"],
        BLOCK_B=max(2, triton.next_power_of_2(n_blocks)), PDL=pdl, **launch_options(gu), **pdl_option(pdl),
    )
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    out = _decode_down(h, w_down, idx, out, shared_blocks, n_blocks, kc["down"], direct, pdl)
    return out, idx, weights, probs
