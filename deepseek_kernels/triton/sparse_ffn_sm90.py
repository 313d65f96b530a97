"""Hopper (sm_90) form of the sparse FFN's two short-K grouped GEMMs over the block-sorted rows, written in Gluon:
the forward's down projection (``y = h . w_down[:, block]^T``, K = the block's BS neurons) and the backward's dx
(``dx_rows = da . w_gate[block] + du . w_up[block]``, K = 2 BS). Same function as ``_sorted_rows_tma_kernel`` in
``sparse_ffn.py`` (the persistent Triton TMA kernel); what differs is how the H200 runs it:

- a producer warp issues every load through TMA into a ring of ``STAGES`` shared-memory slots (the row tile's A
  operand as two 64-row halves and the weight tile), each slot with a ready and an empty mbarrier, running ahead
  across output tiles, so the next tile's operands arrive while the consumers finish the current one;
- two consumer warpgroups (4 warps each, one 64-row half of a 128-row tile each) share each weight tile and
  issue asynchronous wgmma with one product in flight, releasing a slot as soon as the product that read it is
  done; a half tile whose rows all belong to the block leaves through shared memory by an asynchronous TMA store
  (the warpgroup goes on to the next tile meanwhile), the block's last rows by masked 16-byte stores (the rows
  after them belong to the next block's first tile, computed by another program).

A Triton kernel issues loads and products from the same warps, so with K only 224 (7 steps of 32) its pipeline
barely fills before each tile's epilogue (Nsight Compute, session 17: one CTA per SM, warps waiting on their own
loads most of the time). ``supported()`` says which calls can take this path. The down projection's default is a
second form (session 37, :func:`rows_gemm_ar_sm90`): the row tile's A operand resident in shared memory for a unit
of column tiles, and the two consumer warpgroups on alternate whole column tiles, each with its own weight ring,
so one's epilogue overlaps the other's products (:func:`short_k_gemm_sm90` picks the form).

Four more kernels read gathered rows (each row another token's row, which Hopper's TMA cannot fetch), by a 4-warp
cp.async producer: the forward's gate/up + SwiGLU and the backward's dact (gathered x / dO rows as the A operand,
sharing one producer), and the backward's dW gate/up and dW down (gathered x / dO rows along K).
"""

import functools

import torch

from deepseek_kernels.triton._common import sm_count

try:  # Gluon's Hopper API (Triton >= 3.5)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

BLOCK_M = 128  # the grouping's row tile (two 64-row halves, one per consumer warpgroup)
# Output tiles 128 x 256, K steps of 32 (224-neuron blocks: 7 steps, 14 for dx), a ring of 6 slots (24 KB each).
# H200, session 30 (benchmarks/diag_sparse_sm90.py, T8192 ratio 0.3, do_bench): down 0.582 ms (491 TF/s) vs the
# Triton TMA kernel's 0.657 (434), dx 0.909 (628) vs 1.292 (442); with masked stores for every tile 0.637 / 0.991;
# 5 slots 0.608 / 0.945; 128-wide tiles (10-12 slots) 0.63-0.69 / 1.06-1.10; 8 slots or 3 products in flight a
# tie. The main loop alone (stores off) ran at 754 / 776 TF/s: the down projection's output (y, 1.27 GB) is what
# is left, both warpgroups storing at the same time.
CONFIG = dict(block_n=256, block_k=32, stages=6)
MAXNREG = 168  # 3 warpgroups x 128 threads x 168 <= 64K registers: the producer keeps 24, the consumers 240
CONSUMER_REGS = 240


def supported(a: torch.Tensor, w: torch.Tensor, block_m: int) -> bool:
    """Whether the Gluon kernels can run: Gluon present, an sm_90 CUDA device, 2-byte operands, 128-row tiles."""
    if not (HAVE_GLUON and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and w.dtype == a.dtype):
        return False
    return torch.cuda.get_device_capability(a.device) == (9, 0) and block_m == BLOCK_M


if HAVE_GLUON:
    # the attention forward's mbarrier helpers: n barriers of a count; one arrival per warpgroup past a barrier
    from deepseek_kernels.triton.window_attention_sm90 import _barrier_array, _release

    @gluon.jit
    def _work(t, n_col, TILE_BLOCK, TILE_START):
        """(block, first sorted row, first output column index) of work item ``t`` (row tile t // n_col)."""
        pid_m = t // n_col
        return gl.load(TILE_BLOCK + pid_m), gl.load(TILE_START + pid_m), t - pid_m * n_col

    @gluon.jit
    def _work_rotated(t, n_col, TILE_BLOCK, TILE_START, ROTATE: gl.constexpr):
        """:func:`_work` with the column index turned by the round ``t // num_programs`` (``ROTATE``), so a
        program's items cycle through a row tile's column tiles (of unequal cost where the last is partial)
        instead of always taking the same one: with row-tile-major items and a program count that is a multiple
        of ``n_col``, program p's items are all column p % n_col. Items t and t + 1 of one row tile stay in one
        round (so a row tile's gathered A rows are still read by neighbouring programs at once), which keeps the
        map a permutation of the items."""
        G = gl.num_programs(0)
        pid_m = t // n_col
        pid_n = t - pid_m * n_col
        if ROTATE:
            if G % n_col == 0:
                pid_n = (pid_n + t // G) % n_col
        return gl.load(TILE_BLOCK + pid_m), gl.load(TILE_START + pid_m), pid_n

    @gluon.jit
    def _short_k_w_load(w_desc, w2_desc, bar, dst, f0, s, ks, n0, BLOCK_K: gl.constexpr, W_NK: gl.constexpr):
        """K step ``s``'s weight tile of a short-K GEMM into ``dst`` (TMA, on ``bar``): w [D, F] as an [n, k] tile
        (W_NK, down), else w [F, D] as a [k, n] tile, steps >= ks from w2 (dx: w_up after w_gate); f0 the block's
        first neuron, n0 the first output column."""
        if W_NK:
            tma.async_copy_global_to_shared(w_desc, [n0, f0 + s * BLOCK_K], bar, dst)
        elif s < ks:
            tma.async_copy_global_to_shared(w_desc, [f0 + s * BLOCK_K, n0], bar, dst)
        else:
            tma.async_copy_global_to_shared(w2_desc, [f0 + (s - ks) * BLOCK_K, n0], bar, dst)

    @gluon.jit
    def _short_k_w_slot(ready, w_bufs, it, STAGES: gl.constexpr, W_NK: gl.constexpr):
        """A short-K consumer's K step ``it``: wait for its weight slot; returns (slot, the tile as the product's
        [k, n] operand: an [n, k] tile permuted where W_NK)."""
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        if W_NK:
            return slot, w_bufs.index(slot).permute((1, 0))
        else:
            return slot, w_bufs.index(slot)

    @gluon.jit
    def _producer(a_desc, w_desc, w2_desc, a_bufs, b_bufs, ready, empty, TILE_BLOCK, TILE_START, TILE_COUNT, D, BS,
                  W_NK: gl.constexpr, DUAL: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                  STAGES: gl.constexpr):
        """One warp: for every work item of this program and every K step, the two A halves and the weight tile
        into slot ``it % STAGES`` once both consumers released it. DUAL: steps >= BS / BLOCK_K read A's second
        half-row block (du) and w2 (w_up)."""
        HALF_M: gl.constexpr = a_desc.block_type.shape[0]
        n_col = gl.cdiv(D, BLOCK_N)
        total = gl.load(TILE_COUNT).to(gl.int32) * n_col
        ks = BS // BLOCK_K
        n_steps = 2 * ks if DUAL else ks
        nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + w_desc.block_type.nbytes
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, pid_n = _work(t, n_col, TILE_BLOCK, TILE_START)
            n0 = pid_n * BLOCK_N
            for s in range(n_steps):
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(a_desc, [start, s * BLOCK_K], bar, a_bufs.index(2 * slot))
                tma.async_copy_global_to_shared(a_desc, [start + HALF_M, s * BLOCK_K], bar, a_bufs.index(2 * slot + 1))
                _short_k_w_load(w_desc, w2_desc, bar, b_bufs.index(slot), b * BS, s, ks, n0, BLOCK_K, W_NK)
                it += 1

    @gluon.jit
    def _stage_store(piece, o_bufs, n, out_desc, r0, c0, O_BUFS: gl.constexpr, BASE: gl.constexpr):
        """``piece`` into staging buffer BASE + n % O_BUFS once the store that last used it has read it (bulk
        groups complete in order: at most O_BUFS - 1 younger ones pending), then an asynchronous TMA store of it
        to ``[r0, c0]``. Returns n + 1."""
        buf = o_bufs.index(BASE + n % O_BUFS)
        tma.store_wait(O_BUFS - 1)
        buf.store(piece)
        fence_async_shared()
        tma.async_copy_shared_to_global(out_desc, [r0, c0], buf)
        return n + 1

    @gluon.jit
    def _consumer(a_bufs, b_bufs, o_bufs, ready, empty, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT,
                  D, BS, WG: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr, BLOCK_N: gl.constexpr,
                  BLOCK_K: gl.constexpr, STAGES: gl.constexpr, TMA_STORE: gl.constexpr):
        """One warpgroup: rows [WG * 64, + 64) of every work item's tile, K steps as async wgmma with one in
        flight (a slot is released once the product that read it is done), then the rows of the block stored.
        Measured and removed (session 37, call 2): the stores in pieces of 128 / 64 columns through 2-6 staging
        buffers per warpgroup, so that a piece waits only for an older store (down 0.578-0.609 ms vs 0.586 at
        ratio 0.3, dx 0.894-0.948 vs 0.894; at 0.5 down 0.959-1.041 vs 0.981, dx 1.511-1.628 vs 1.511): the
        store's wait is not what the epilogue costs."""
        HALF_M: gl.constexpr = a_bufs.type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        # 8 consecutive outputs (16 bytes) per thread, a warp over 4 rows x 64 columns
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        n_col = gl.cdiv(D, BLOCK_N)
        total = gl.load(TILE_COUNT).to(gl.int32) * n_col
        ks = BS // BLOCK_K
        n_steps = 2 * ks if DUAL else ks
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, pid_n = _work(t, n_col, TILE_BLOCK, TILE_START)
            hi = gl.load(OFFSETS + b + 1)  # (loaded here, in flight during the products)
            acc = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
            for s in range(n_steps):
                slot, w_tile = _short_k_w_slot(ready, b_bufs, it, STAGES, W_NK)
                acc = warpgroup_mma(a_bufs.index(2 * slot + WG), w_tile, acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=(acc,))  # the previous step's product is done
                if s > 0:
                    _release(empty.index((it - 1) % STAGES))
                it += 1
            acc = warpgroup_mma_wait(0, deps=(acc,))
            _release(empty.index((it - 1) % STAGES))
            r0 = start + WG * HALF_M
            c0 = pid_n * BLOCK_N
            if TMA_STORE and r0 + HALF_M <= hi:  # all rows in the block: an asynchronous store
                _stage_store(acc.to(out_desc.dtype), o_bufs, 0, out_desc, r0, c0, 1, WG)
            else:  # the block's last rows: masked stores (the rows after belong to the next block's tile)
                out = gl.convert_layout(acc.to(OUT.dtype.element_ty), out_layout)
                rows = r0 + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, out_layout))
                cols = c0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
                mask = gl.expand_dims(rows < hi, 1) & gl.expand_dims(cols < D, 0)
                ptrs = OUT + gl.expand_dims(rows.to(gl.int64) * D, 1) + gl.expand_dims(cols, 0)
                gl.store(ptrs, out, mask=mask)
        tma.store_wait(0)

    @gluon.jit
    def _consumer1(a_bufs, b_bufs, o_bufs, ready, empty, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS,
                   TILE_COUNT, D, BS, W_NK: gl.constexpr, DUAL: gl.constexpr, BLOCK_N: gl.constexpr,
                   BLOCK_K: gl.constexpr, STAGES: gl.constexpr, TMA_STORE: gl.constexpr):
        """The second warpgroup (a worker partition)."""
        WG1: gl.constexpr = 1
        _consumer(a_bufs, b_bufs, o_bufs, ready, empty, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT,
                  D, BS, WG1, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, TMA_STORE)

    # D stays specialized: its divisibility by 16 is what lets the epilogue store 16 bytes per thread (without it,
    # session 30's first build stored 2 bytes at a time and took 3.0 ms where its main loop alone took 0.38)
    @gluon.jit
    def _sorted_rows_gemm_sm90_kernel(a_desc, w_desc, w2_desc, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS,
                                      TILE_COUNT, D, BS, W_NK: gl.constexpr, DUAL: gl.constexpr,
                                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                                      CONSUMER_REGS: gl.constexpr, TMA_STORE: gl.constexpr = True):
        """OUT[rows of block b, :D] = A[rows, :BS] . W_b (+ A[rows, BS:2 BS] . W2_b with DUAL) for every real row
        tile of the grouping, as a persistent program per SM walking (row tile, column tile) work items (a row
        tile's column tiles consecutively, as the Triton kernel). W_NK: w is [D, F] (the down projection's
        w_down, read as [n, k] tiles); else [F, D] (dx's w_gate / w_up, [k, n] tiles). ``TMA_STORE``: a half tile
        whose rows all belong to the block leaves through shared memory and an asynchronous TMA store (out_desc,
        [64, BLOCK_N] boxes), so the warpgroup goes on to the next tile's products; the block's last rows take
        masked stores."""
        WG0: gl.constexpr = 0
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        o_bufs = gl.allocate_shared_memory(out_desc.dtype, [2 if TMA_STORE else 1] + out_desc.block_type.shape,
                                           out_desc.layout)
        ready = _barrier_array(STAGES, 1)  # the producer's expect + the TMA bytes
        empty = _barrier_array(STAGES, 2)  # one arrival per consumer warpgroup
        gl.warp_specialize([
            (_consumer, (a_bufs, b_bufs, o_bufs, ready, empty, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS,
                         TILE_COUNT, D, BS, WG0, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, TMA_STORE)),
            (_consumer1, (a_bufs, b_bufs, o_bufs, ready, empty, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS,
                          TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, TMA_STORE)),
            (_producer, (a_desc, w_desc, w2_desc, a_bufs, b_bufs, ready, empty, TILE_BLOCK, TILE_START, TILE_COUNT,
                         D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])


@functools.lru_cache(maxsize=None)
def _nvmma_layout(block: tuple, bf16: bool):
    """The default NVMMA shared layout of a ``block`` box (a pure function of its arguments; building it took
    ~12 us of host time per descriptor, 16 descriptors per training step)."""
    return gl.NVMMASharedLayout.get_default_for(list(block), gl.bfloat16 if bf16 else gl.float16)


def _desc(t: torch.Tensor, block: list):
    layout = _nvmma_layout(tuple(block), t.dtype == torch.bfloat16)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def sorted_rows_gemm_sm90(a: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, out: torch.Tensor, grouping, *,
                          bs: int, w_nk: bool, block_n: int, block_k: int, stages: int, tma_store: bool = True) -> None:
    """``out [P, D]`` for the grouping's row tiles (see the kernel): ``a [P, BS]`` (or ``[P, 2 BS]`` with
    ``w2``), ``w`` ``[D, F]`` if ``w_nk`` else ``[F, D]`` (and ``w2`` likewise). The caller checked
    :func:`supported` and the TMA layout rules (unit inner strides, 16-byte aligned rows and bases)."""
    D = out.shape[1]
    half = BLOCK_M // 2
    w_block = [block_n, block_k] if w_nk else [block_k, block_n]
    w_desc = _desc(w, w_block)
    _sorted_rows_gemm_sm90_kernel[(sm_count(a.device),)](
        _desc(a, [half, block_k]), w_desc, w_desc if w2 is None else _desc(w2, w_block), _desc(out, [half, block_n]),
        out, grouping.tile_block, grouping.tile_start, grouping.offsets, grouping.tile_count, D, bs, W_NK=w_nk,
        DUAL=w2 is not None, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, CONSUMER_REGS=CONSUMER_REGS,
        TMA_STORE=tma_store, num_warps=4, maxnreg=MAXNREG,
    )


# ---- the short-K GEMMs with the row tile's A operand resident (``A_RESIDENT_DOWN`` / ``_DX``; session 37) -----------
#
# The kernel above has both consumer warpgroups on one tile (a 64-row half each, sharing the weight tile), so they
# finish their products together and run their epilogues together while the tensor cores idle: its tiles without
# the TMA stores take 0.476 ms (down) / 0.898 ms (dx) at T8192 ratio 0.3 against 0.38 / 0.74 for the products
# alone (diag_sparse_epilogue.py, session 37 call 4 and session 30), ~0.65-1 us per work item. Here a work unit is
# a row tile and a range of UNIT_COLS column tiles: its A operand ([128, KT], KT = BS or 2 BS) is loaded once into
# KS = KT / BLOCK_K resident chunks, and each consumer warpgroup takes every other column tile of the unit as a whole
# [128, BLOCK_N] tile (two m64 products per K step over the two row halves), its weight tiles from its own ring fed
# by its own producer warp. The warpgroups share nothing but A, so one's epilogue overlaps the other's products,
# and a column tile's L2 reads are its weight tile alone (A once per unit): a third fewer bytes per FLOP.
# Chunk s of A is released by both warpgroups after step s of their last tile of the unit, and the producer
# loads the next unit's chunk s just before that unit's first weight tile of step s.
#
# H200, session 37 (call 5; diag_sparse_sm90.py --ar, T8192, kernels alone, same run): down 0.599 -> 0.538 ms at
# ratio 0.3 and 1.016 -> 0.887 at 0.5 (8 ring slots, one staging buffer per warpgroup, units of 16 column tiles;
# 6 slots with 2 buffers, units of 8 or 32 within 0.02 ms but for units of 32 at 0.5, 1.001); whole forward 2.117 ->
# 2.055 ms at 0.3 and 3.574 -> 3.333 at 0.5 (A/B, same bits). dx gains nothing (0.891 vs 0.885-0.939 at 0.3, 1.479
# vs 1.474-1.564 at 0.5: its A takes 112 KB, which leaves 5 ring slots), so it stays on the kernel above.
AR_DOWN_CONFIG = dict(block_n=128, block_k=32, stages=8, o_bufs=1, unit_cols=16)
AR_DX_CONFIG = dict(block_n=128, block_k=32, stages=5, o_bufs=1, unit_cols=16)
A_RESIDENT_DOWN = True  # the down projection by the A-resident kernel (where A fits)
A_RESIDENT_DX = False  # dx likewise (a tie: off)
AR_PRODUCER_REGS = 40
SMEM_LIMIT = 232448  # the H200's (sm_90) largest shared-memory allocation per block, bytes


def ring_stages(stages: int, slot_bytes: int, fixed_bytes: int) -> int:
    """``stages`` or fewer ring slots of ``slot_bytes`` each, so that they fit in shared memory beside
    ``fixed_bytes`` of other buffers and margin; never fewer than 2."""
    while stages > 2 and stages * slot_bytes + fixed_bytes > SMEM_LIMIT:
        stages -= 1
    return stages

if HAVE_GLUON:

    @gluon.jit
    def _ar_unit(u, NQ, UNIT_COLS: gl.constexpr, TILE_BLOCK, TILE_START):
        """(block, first sorted row, first column tile) of work unit ``u`` (row tile u // NQ)."""
        m = u // NQ
        return gl.load(TILE_BLOCK + m), gl.load(TILE_START + m), (u - m * NQ) * UNIT_COLS

    @gluon.jit
    def _ar_producer(a_desc, w_desc, w2_desc, a_bufs, w_bufs, a_ready, a_empty, w_ready, w_empty, TILE_BLOCK,
                     TILE_START, TILE_COUNT, D, BS: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, UNIT_COLS: gl.constexpr,
                     WG: gl.constexpr, LOAD_A: gl.constexpr):
        """One warp: the weight tiles of warpgroup WG's column tiles (c = first + WG, + 2, ...) of every unit into
        its ring; with LOAD_A (WG 0, which has a tile in every unit) also the unit's A chunks, chunk s just before
        the unit's first weight tile of step s, once both warpgroups released it."""
        KS: gl.constexpr = (2 * BS if DUAL else BS) // BLOCK_K
        ks: gl.constexpr = BS // BLOCK_K
        n_col = gl.cdiv(D, BLOCK_N)
        NQ = gl.cdiv(n_col, UNIT_COLS)
        total = gl.load(TILE_COUNT).to(gl.int32) * NQ
        a_bytes: gl.constexpr = 2 * a_desc.block_type.nbytes
        it = 0
        nu = 0
        for u in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, c_first = _ar_unit(u, NQ, UNIT_COLS, TILE_BLOCK, TILE_START)
            c_end = gl.minimum(c_first + UNIT_COLS, n_col)
            first = True
            for c in range(c_first + WG, c_end, 2):
                n0 = c * BLOCK_N
                for s in range(KS):
                    if LOAD_A:
                        if first:
                            mbarrier.wait(a_empty.index(s), (nu & 1) ^ 1)
                            mbarrier.expect(a_ready.index(s), a_bytes)
                            tma.async_copy_global_to_shared(a_desc, [start, s * BLOCK_K], a_ready.index(s),
                                                            a_bufs.index(2 * s))
                            tma.async_copy_global_to_shared(a_desc, [start + 64, s * BLOCK_K], a_ready.index(s),
                                                            a_bufs.index(2 * s + 1))
                    slot = it % STAGES
                    mbarrier.wait(w_empty.index(slot), ((it // STAGES) & 1) ^ 1)
                    bar = w_ready.index(slot)
                    mbarrier.expect(bar, w_desc.block_type.nbytes)
                    _short_k_w_load(w_desc, w2_desc, bar, w_bufs.index(slot), b * BS, s, ks, n0, BLOCK_K, W_NK)
                    it += 1
                first = False
            nu += 1

    @gluon.jit
    def _ar_store_half(acc, o_bufs, n, out_desc, OUT, r0, hi, c0, D, O_BUFS: gl.constexpr, BASE: gl.constexpr):
        """Rows [r0, r0 + 64) of a tile: through a staging buffer by TMA if all are the block's, else the block's
        last rows by masked stores straight from the accumulator (the rows after belong to the next block's
        tile). Returns the warpgroup's store count."""
        if r0 + acc.type.shape[0] <= hi:
            n = _stage_store(acc.to(out_desc.dtype), o_bufs, n, out_desc, r0, c0, O_BUFS, BASE)
        else:
            layout: gl.constexpr = acc.type.layout
            rows = r0 + gl.arange(0, acc.type.shape[0], layout=gl.SliceLayout(1, layout))
            cols = c0 + gl.arange(0, acc.type.shape[1], layout=gl.SliceLayout(0, layout))
            mask = gl.expand_dims(rows < hi, 1) & gl.expand_dims(cols < D, 0)
            ptrs = OUT + gl.expand_dims(rows.to(gl.int64) * D, 1) + gl.expand_dims(cols, 0)
            gl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=mask)
        return n

    @gluon.jit
    def _ar_consumer(a_bufs, w_bufs, o_bufs, a_ready, a_empty, w_ready, w_empty, out_desc, OUT, TILE_BLOCK,
                     TILE_START, OFFSETS, TILE_COUNT, D, BS: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr,
                     BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, UNIT_COLS: gl.constexpr,
                     O_BUFS: gl.constexpr, WG: gl.constexpr):
        """One warpgroup: column tiles first + WG, + 2, ... of every unit, each a [128, BLOCK_N] tile as two 64-row
        accumulators (async wgmma, one step's pair in flight; a ring slot released once the pair that read it is
        done, A's chunk s after step s of the unit's last tile), then stored: a 64-row half whose rows all belong to
        the block through this warpgroup's O_BUFS staging buffers by TMA (:func:`_stage_store`), the block's last
        rows by masked stores straight from the accumulator."""
        KS: gl.constexpr = (2 * BS if DUAL else BS) // BLOCK_K
        HALF_M: gl.constexpr = 64
        BASE: gl.constexpr = WG * O_BUFS
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        n_col = gl.cdiv(D, BLOCK_N)
        NQ = gl.cdiv(n_col, UNIT_COLS)
        total = gl.load(TILE_COUNT).to(gl.int32) * NQ
        it = 0
        nu = 0
        n = 0
        for u in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, c_first = _ar_unit(u, NQ, UNIT_COLS, TILE_BLOCK, TILE_START)
            hi = gl.load(OFFSETS + b + 1)
            c_end = gl.minimum(c_first + UNIT_COLS, n_col)
            for c in range(c_first + WG, c_end, 2):
                first = c < c_first + 2
                last = c + 2 >= c_end
                acc0 = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
                acc1 = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
                for s in range(KS):
                    if first:
                        mbarrier.wait(a_ready.index(s), nu & 1)
                    slot, w_tile = _short_k_w_slot(w_ready, w_bufs, it, STAGES, W_NK)
                    acc0 = warpgroup_mma(a_bufs.index(2 * s), w_tile, acc0, is_async=True)
                    acc1 = warpgroup_mma(a_bufs.index(2 * s + 1), w_tile, acc1, is_async=True)
                    acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # the previous step's pair is done
                    if s > 0:
                        _release(w_empty.index((it - 1) % STAGES))
                        if last:
                            _release(a_empty.index(s - 1))
                    it += 1
                acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
                _release(w_empty.index((it - 1) % STAGES))
                if last:
                    _release(a_empty.index(KS - 1))
                n = _ar_store_half(acc0, o_bufs, n, out_desc, OUT, start, hi, c * BLOCK_N, D, O_BUFS, BASE)
                n = _ar_store_half(acc1, o_bufs, n, out_desc, OUT, start + HALF_M, hi, c * BLOCK_N, D, O_BUFS, BASE)
            if c_first + WG >= c_end:  # no column tile here for this warpgroup: release the unit's chunks
                for s in gl.static_range(KS):
                    mbarrier.wait(a_ready.index(s), nu & 1)
                    _release(a_empty.index(s))
            nu += 1
        tma.store_wait(0)

    @gluon.jit
    def _ar_consumer1(a_bufs, w_bufs, o_bufs, a_ready, a_empty, w_ready, w_empty, out_desc, OUT, TILE_BLOCK,
                      TILE_START, OFFSETS, TILE_COUNT, D, BS: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, UNIT_COLS: gl.constexpr,
                      O_BUFS: gl.constexpr):
        """The second warpgroup (a worker partition), on its own ring."""
        WG1: gl.constexpr = 1
        _ar_consumer(a_bufs, w_bufs, o_bufs, a_ready, a_empty, w_ready, w_empty, out_desc, OUT, TILE_BLOCK,
                     TILE_START, OFFSETS, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, UNIT_COLS, O_BUFS,
                     WG1)

    @gluon.jit
    def _ar_producer1(a_desc, w_desc, w2_desc, a_bufs, w_bufs, a_ready, a_empty, w_ready, w_empty, TILE_BLOCK,
                      TILE_START, TILE_COUNT, D, BS: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, UNIT_COLS: gl.constexpr):
        """Warpgroup 1's weight tiles (a partition of its own: warpgroup 0's producer, which also loads A, is
        :func:`_ar_producer` itself)."""
        WG1: gl.constexpr = 1
        LOAD_A: gl.constexpr = False
        _ar_producer(a_desc, w_desc, w2_desc, a_bufs, w_bufs, a_ready, a_empty, w_ready, w_empty, TILE_BLOCK,
                     TILE_START, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, UNIT_COLS, WG1, LOAD_A)

    @gluon.jit
    def _rows_gemm_ar_sm90_kernel(a_desc, w_desc, w2_desc, out_desc, OUT, TILE_BLOCK, TILE_START, OFFSETS,
                                  TILE_COUNT, D, BS: gl.constexpr, W_NK: gl.constexpr, DUAL: gl.constexpr,
                                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                                  UNIT_COLS: gl.constexpr, O_BUFS: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                  PRODUCER_REGS: gl.constexpr):
        """OUT[rows of block b, :D] as :func:`_sorted_rows_gemm_sm90_kernel` computes it (same products in the
        same order: the same bits), with the row tile's A operand resident per unit and the two consumer
        warpgroups on alternate column tiles (see the section's comment). a_desc boxes [64, BLOCK_K], w_desc
        [BLOCK_N, BLOCK_K] (W_NK) or [BLOCK_K, BLOCK_N], out_desc [64, BLOCK_N]."""
        KS: gl.constexpr = (2 * BS if DUAL else BS) // BLOCK_K
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [2 * KS] + a_desc.block_type.shape, a_desc.layout)
        w0_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        w1_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        o_bufs = gl.allocate_shared_memory(out_desc.dtype, [2 * O_BUFS] + out_desc.block_type.shape, out_desc.layout)
        a_ready = _barrier_array(KS, 1)  # the producer's expect + the TMA bytes
        a_empty = _barrier_array(KS, 2)  # one arrival per consumer warpgroup
        w0_ready = _barrier_array(STAGES, 1)
        w0_empty = _barrier_array(STAGES, 1)
        w1_ready = _barrier_array(STAGES, 1)
        w1_empty = _barrier_array(STAGES, 1)
        WG0: gl.constexpr = 0
        LOAD_A: gl.constexpr = True
        gl.warp_specialize([
            (_ar_consumer, (a_bufs, w0_bufs, o_bufs, a_ready, a_empty, w0_ready, w0_empty, out_desc, OUT, TILE_BLOCK,
                            TILE_START, OFFSETS, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, UNIT_COLS,
                            O_BUFS, WG0)),
            (_ar_consumer1, (a_bufs, w1_bufs, o_bufs, a_ready, a_empty, w1_ready, w1_empty, out_desc, OUT,
                             TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES,
                             UNIT_COLS, O_BUFS)),
            (_ar_producer, (a_desc, w_desc, w2_desc, a_bufs, w0_bufs, a_ready, a_empty, w0_ready, w0_empty,
                            TILE_BLOCK, TILE_START, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES, UNIT_COLS,
                            WG0, LOAD_A)),
            (_ar_producer1, (a_desc, w_desc, w2_desc, a_bufs, w1_bufs, a_ready, a_empty, w1_ready, w1_empty,
                             TILE_BLOCK, TILE_START, TILE_COUNT, D, BS, W_NK, DUAL, BLOCK_N, BLOCK_K, STAGES,
                             UNIT_COLS)),
        ], [4, 1, 1], [CONSUMER_REGS, PRODUCER_REGS, PRODUCER_REGS])


def ar_smem_bytes(bs: int, dual: bool, block_n: int, block_k: int, stages: int, o_bufs: int) -> int:
    """Shared memory the A-resident kernel allocates (bf16 / fp16; barriers aside): A, two rings, staging."""
    return 2 * (128 * (2 * bs if dual else bs) + 2 * stages * block_n * block_k + 2 * o_bufs * 64 * block_n)


def ar_config(bs: int, dual: bool) -> dict | None:
    """The A-resident kernel's settings for blocks of ``bs`` neurons (fewer ring slots where A is large), or
    None where A does not fit in shared memory with a 2-slot ring."""
    cfg = AR_DX_CONFIG if dual else AR_DOWN_CONFIG
    if bs % cfg["block_k"]:
        return None
    for stages in range(cfg["stages"], 1, -1):  # (1 KB for the barriers and alignment)
        if ar_smem_bytes(bs, dual, cfg["block_n"], cfg["block_k"], stages, cfg["o_bufs"]) + 1024 <= SMEM_LIMIT:
            return {**cfg, "stages": stages}
    return None


def rows_gemm_ar_sm90(a: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, out: torch.Tensor, grouping, *,
                      bs: int, w_nk: bool, block_n: int, block_k: int, stages: int, o_bufs: int,
                      unit_cols: int) -> None:
    """``out [P, D]`` as :func:`sorted_rows_gemm_sm90` computes it, by the A-resident kernel (the caller took
    the settings from :func:`ar_config`)."""
    D = out.shape[1]
    w_block = [block_n, block_k] if w_nk else [block_k, block_n]
    w_desc = _desc(w, w_block)
    _rows_gemm_ar_sm90_kernel[(sm_count(a.device),)](
        _desc(a, [64, block_k]), w_desc, w_desc if w2 is None else _desc(w2, w_block), _desc(out, [64, block_n]),
        out, grouping.tile_block, grouping.tile_start, grouping.offsets, grouping.tile_count, D, bs, W_NK=w_nk,
        DUAL=w2 is not None, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages, UNIT_COLS=unit_cols, O_BUFS=o_bufs,
        CONSUMER_REGS=CONSUMER_REGS, PRODUCER_REGS=AR_PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG,
    )


def short_k_gemm_sm90(a: torch.Tensor, w: torch.Tensor, w2: torch.Tensor | None, out: torch.Tensor, grouping, *,
                      bs: int, w_nk: bool) -> None:
    """The down projection (``w2`` None) or dx by the sm_90 default: the A-resident kernel where
    ``A_RESIDENT_DOWN`` / ``A_RESIDENT_DX`` asks for it and A fits, else :func:`sorted_rows_gemm_sm90` at
    ``CONFIG``."""
    dual = w2 is not None
    cfg = ar_config(bs, dual) if (A_RESIDENT_DX if dual else A_RESIDENT_DOWN) else None
    if cfg is not None:
        rows_gemm_ar_sm90(a, w, w2, out, grouping, bs=bs, w_nk=w_nk, **cfg)
    else:
        sorted_rows_gemm_sm90(a, w, w2, out, grouping, bs=bs, w_nk=w_nk, **CONFIG)

# ---- the forward's gate/up GEMM with gathered x rows (``gate_up.sm90``, the T >= 4096 default on sm_90; written in
# session 30, first run in session 31: H200, T8192 ratio 0.3, ~0.98 ms (589 TF/s) vs the Triton kernel's ~1.08) ------
#
# h[p, n] = silu(x[tok_p] . w_gate[b*BS + n]) * (x[tok_p] . w_up[b*BS + n]) over the rows p of block b, as the Triton
# _sparse_ffn_gate_up_kernel computes it. The A operand is gathered (each row of the tile is another token's x row),
# which TMA cannot do on Hopper: a 4-warp producer partition issues cp.async copies of the tile's rows (rows past
# the block's end read zeros) and each of its threads arrives on the slot's ready barrier once its copies land
# (cp.async.mbarrier.arrive.noinc); the weight tiles come by TMA. Work items are (row tile, 128-neuron column
# tile): two per block row tile (224 = 128 + 96; the second tile's last 32 columns read the next block's weights
# and are not stored).

# Measured and removed (session 39, code at bf08b19): the gathered A tiles in a ring of their own, 6 slots beside 3
# weight slots (forward 1.874 -> 2.269 ms at ratio 0.3); K steps of 32 in 8 slots: 1.905 -> 1.977 ms (slower).
GATE_UP_CONFIG = dict(block_n=128, block_k=64, stages=4)
PRODUCER_REGS = 56  # the cp.async producer's address tensors; (2 x 224 + 56) x 128 <= 64K registers
GATHER_CONSUMER_REGS = 224

if HAVE_GLUON:
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    @gluon.jit
    def _gather_ring(dtype: gl.constexpr, w_desc0, w_desc1, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                     MERGE_B: gl.constexpr = False):
        """The shared memory of the gathered-A kernels: per slot the two 64-row A halves [64, BLOCK_K] (written by
        cp.async) and two weight tiles (TMA; ``MERGE_B``: the two [BLOCK_N, BLOCK_K] tiles as the halves of one
        [2 BLOCK_N, BLOCK_K] tile, returned twice, so one product can read both: :func:`_w_tiles`), a ready
        barrier (the weights' expect + one cp.async arrival per producer thread) and an empty one (one arrival
        per consumer warpgroup)."""
        HALF_M: gl.constexpr = 64  # BLOCK_M // 2: one consumer warpgroup's rows
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([HALF_M, BLOCK_K], dtype)
        a_bufs = gl.allocate_shared_memory(dtype, [2 * STAGES, HALF_M, BLOCK_K], a_layout)
        if MERGE_B:
            N: gl.constexpr = w_desc0.block_type.shape[0]
            K: gl.constexpr = w_desc0.block_type.shape[1]
            b0_bufs = gl.allocate_shared_memory(w_desc0.dtype, [STAGES, 2 * N, K], w_desc0.layout)
            b1_bufs = b0_bufs
        else:
            b0_bufs = gl.allocate_shared_memory(w_desc0.dtype, [STAGES] + w_desc0.block_type.shape, w_desc0.layout)
            b1_bufs = gl.allocate_shared_memory(w_desc1.dtype, [STAGES] + w_desc1.block_type.shape, w_desc1.layout)
        return a_bufs, b0_bufs, b1_bufs, _barrier_array(STAGES, 1 + 4 * 32), _barrier_array(STAGES, 2)

    @gluon.constexpr_function
    def _row_gather_layout(block_k):
        """The cp.async gathers' register layout of a [rows, block_k] bf16 tile: 8 consecutive elements (16 bytes)
        a thread and copy, a warp's 32 threads across block_k // 8 columns and the rest down the rows, 4 warps
        (block_k 64: 16 rows x 64 columns a repetition; 32: 32 x 32), so no thread copies another's elements."""
        tc = min(block_k // 8, 32)
        return gl.BlockedLayout([1, 8], [32 // tc, tc], [4, 1], [1, 0])

    @gluon.jit
    def _w_tiles(b0_bufs, b1_bufs, slot, MERGED: gl.constexpr):
        """Slot ``slot``'s two weight tiles (views of the merged tile's halves where ``MERGED``)."""
        if MERGED:
            t = b0_bufs.index(slot)
            N: gl.constexpr = t.type.shape[0] // 2
            return t.slice(0, N), t.slice(N, N)
        else:
            return b0_bufs.index(slot), b1_bufs.index(slot)

    @gluon.jit
    def _w_loads(bar, slot, k0, f0, pieces, w_desc0, w_desc1, wp_g0, wp_u0, wp_g1, wp_u1, b0_bufs, b1_bufs, b2_bufs,
                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, W_KN: gl.constexpr, KN_SPLIT: gl.constexpr,
                 MERGE_B: gl.constexpr, PR0: gl.constexpr, PR1: gl.constexpr):
        """One K step's weight tiles into ring slot ``slot`` by TMA, their bytes expected on ``bar`` (the forms
        of :func:`_gather_producer`): dact (W_KN) the block's [k0 +: BLOCK_K] rows of w_down at columns f0 and
        f0 + BLOCK_N (KN_SPLIT: the second part as its two pieces' boxes, ``w_desc1`` and ``wp_g0``); gate/up the
        [f0 +: BLOCK_N, k0 +: BLOCK_K] tiles of w_gate / w_up, or where ``pieces`` (a block's last column tile,
        PR0 > 0) its pieces side by side in the merged tile."""
        w_bytes: gl.constexpr = w_desc0.block_type.nbytes + w_desc1.block_type.nbytes
        if W_KN and KN_SPLIT:
            mbarrier.expect(bar, w_bytes + wp_g0.block_type.nbytes)
            tma.async_copy_global_to_shared(w_desc0, [k0, f0], bar, b0_bufs.index(slot))
            tma.async_copy_global_to_shared(w_desc1, [k0, f0 + BLOCK_N], bar, b1_bufs.index(slot))
            tma.async_copy_global_to_shared(wp_g0, [k0, f0 + BLOCK_N + w_desc1.block_type.shape[1]], bar,
                                            b2_bufs.index(slot))
        elif W_KN:
            mbarrier.expect(bar, w_bytes)
            tma.async_copy_global_to_shared(w_desc0, [k0, f0], bar, b0_bufs.index(slot))
            tma.async_copy_global_to_shared(w_desc1, [k0, f0 + BLOCK_N], bar, b1_bufs.index(slot))
        elif PR0 > 0 and pieces:
            p_bytes: gl.constexpr = 2 * (PR0 + PR1) * BLOCK_K * w_desc0.dtype.primitive_bitwidth // 8
            mbarrier.expect(bar, p_bytes)
            wt = b0_bufs.index(slot)
            tma.async_copy_global_to_shared(wp_g0, [f0, k0], bar, wt.slice(0, PR0))
            tma.async_copy_global_to_shared(wp_u0, [f0, k0], bar, wt.slice(PR0, PR0))
            if PR1 > 0:
                tma.async_copy_global_to_shared(wp_g1, [f0 + PR0, k0], bar, wt.slice(2 * PR0, PR1))
                tma.async_copy_global_to_shared(wp_u1, [f0 + PR0, k0], bar, wt.slice(2 * PR0 + PR1, PR1))
        else:
            mbarrier.expect(bar, w_bytes)
            w0, w1 = _w_tiles(b0_bufs, b1_bufs, slot, MERGE_B)
            tma.async_copy_global_to_shared(w_desc0, [f0, k0], bar, w0)
            tma.async_copy_global_to_shared(w_desc1, [f0, k0], bar, w1)

    @gluon.jit
    def _gather_producer(w_desc0, w_desc1, wp_g0, wp_u0, wp_g1, wp_u1, X, a_bufs, b0_bufs, b1_bufs, ready, empty,
                         SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT, D, BS, stride_xt,
                         BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_KN: gl.constexpr,
                         MERGE_B: gl.constexpr = False, ROTATE: gl.constexpr = False, PR0: gl.constexpr = 0,
                         PR1: gl.constexpr = 0, b2_bufs=None, KN_SPLIT: gl.constexpr = False):
        """Four warps: per work item and K step, the gathered X rows of both 64-row halves by cp.async (every
        thread arrives on the slot's ready barrier when its copies are done) and two weight tiles by TMA. Gate/up
        (not W_KN): items are (row tile, BLOCK_N-neuron column tile), the tiles ``w_gate / w_up [f0 +: BLOCK_N,
        k0 +: BLOCK_K]``; dact (W_KN, ``w_desc0 = w_desc1`` over w_down [D, F]): one item per row tile, the tiles
        ``w_down[k0 +: BLOCK_K, f0 +: BLOCK_N]`` and the next BLOCK_N columns (the block's BS <= 2 BLOCK_N).
        ``MERGE_B``: the gate / up tiles into the halves of the merged tile (:func:`_gather_ring`). ``ROTATE``: the
        items in :func:`_work_rotated`'s order (as the consumers take them). ``PR0 > 0`` (with MERGE_B): a block's
        last column tile as its pieces side by side, gate and up of each (:func:`_gate_up_merged_pieces_loop`):
        rows [0, PR0) / [PR0, 2 PR0) of the merged tile w_gate / w_up [f0 +: PR0] (boxes ``wp_g0 / wp_u0``), then
        [2 PR0, + PR1) / [2 PR0 + PR1, + PR1) the next PR1 neurons' (``wp_g1 / wp_u1``), nothing past the block's
        end. ``KN_SPLIT`` (dact, W_KN): the second part as two boxes, ``w_desc1`` [BLOCK_K, R0] into ``b1_bufs``
        and ``wp_g0`` [BLOCK_K, R1] into ``b2_bufs``. (Otherwise the ``wp_*`` and ``b2_bufs`` go unused.)"""
        HALF_M: gl.constexpr = a_bufs.type.shape[1]
        ld_layout: gl.constexpr = _row_gather_layout(BLOCK_K)  # 16-byte copies, none twice
        row_l: gl.constexpr = gl.SliceLayout(1, ld_layout)
        col_l: gl.constexpr = gl.SliceLayout(0, ld_layout)
        if W_KN:
            n_col = 1
        else:
            n_col = gl.cdiv(BS, BLOCK_N)
        total = gl.load(TILE_COUNT).to(gl.int32) * n_col
        cols = gl.arange(0, BLOCK_K, layout=col_l)
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, pid_n = _work_rotated(t, n_col, TILE_BLOCK, TILE_START, ROTATE)
            hi = gl.load(OFFSETS + b + 1)
            r0 = start + gl.arange(0, HALF_M, layout=row_l)
            r1 = r0 + HALF_M
            ok0 = r0 < hi
            ok1 = r1 < hi
            x0 = X + gl.expand_dims(gl.load(SORTED_TOK + r0, mask=ok0, other=0).to(gl.int64) * stride_xt, 1)
            x1 = X + gl.expand_dims(gl.load(SORTED_TOK + r1, mask=ok1, other=0).to(gl.int64) * stride_xt, 1)
            m0 = gl.expand_dims(ok0, 1)
            m1 = gl.expand_dims(ok1, 1)
            f0 = b * BS + pid_n * BLOCK_N
            pieces = pid_n == n_col - 1  # (used only where PR0 > 0)
            for k0 in range(0, D, BLOCK_K):  # (columns past D read zeros: the row's end is not the next row)
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                _w_loads(bar, slot, k0, f0, pieces, w_desc0, w_desc1, wp_g0, wp_u0, wp_g1, wp_u1, b0_bufs, b1_bufs,
                         b2_bufs, BLOCK_N, BLOCK_K, W_KN, KN_SPLIT, MERGE_B, PR0, PR1)
                kc = gl.expand_dims(k0 + cols, 0)
                k_ok = kc < D
                async_copy.async_copy_global_to_shared(a_bufs.index(2 * slot), x0 + kc, mask=m0 & k_ok)
                async_copy.async_copy_global_to_shared(a_bufs.index(2 * slot + 1), x1 + kc, mask=m1 & k_ok)
                async_copy.mbarrier_arrive(bar, increment_count=False)
                it += 1

    @gluon.jit
    def _gate_up_store(acc_g, acc_u, H, ACT, rows, hi, c0, BS: gl.constexpr, SAVE_ACT: gl.constexpr,
                       out_layout: gl.constexpr):
        """h = silu(a) * u (and a, u with SAVE_ACT) of the accumulators (rows ``rows``, block columns ``c0 +: N``)
        stored for the rows before ``hi`` and the block's columns."""
        N: gl.constexpr = acc_g.type.shape[1]
        cols = c0 + gl.arange(0, N, layout=gl.SliceLayout(0, out_layout))
        mask = gl.expand_dims(rows < hi, 1) & gl.expand_dims(cols < BS, 0)
        rows64 = gl.expand_dims(rows.to(gl.int64), 1)
        c2 = gl.expand_dims(cols, 0)
        h = acc_g * (1.0 / (1.0 + gl.exp(-acc_g))) * acc_u
        gl.store(H + rows64 * BS + c2, gl.convert_layout(h.to(H.dtype.element_ty), out_layout), mask=mask)
        if SAVE_ACT:
            act = ACT + rows64 * (2 * BS) + c2
            gl.store(act, gl.convert_layout(acc_g.to(ACT.dtype.element_ty), out_layout), mask=mask)
            gl.store(act + BS, gl.convert_layout(acc_u.to(ACT.dtype.element_ty), out_layout), mask=mask)

    @gluon.jit
    def _gather_step(a_bufs, ready, it, WG: gl.constexpr, STAGES: gl.constexpr):
        """A gathered-A consumer's K step ``it``: wait for its ring slot, order the producer's cp.async writes
        before the async proxy's reads; returns (the slot, this warpgroup's A tile)."""
        slot = it % STAGES
        mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
        fence_async_shared()  # cp.async wrote A through the generic proxy: order it before wgmma's reads
        return slot, a_bufs.index(2 * slot + WG)

    @gluon.jit
    def _gate_up_pieces_loop(a_bufs, bg_bufs, bu_bufs, ready, empty, it, D, g0, u0, g1, u1, WG: gl.constexpr,
                             TWO: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                             MERGED: gl.constexpr = False):
        """The K loop of a block's last, partial column tile: its neurons as one or (TWO) two power-of-2 pieces
        (rows [0, R0) and [R0, R0 + R1) of the slot's weight tiles: the tile's rows past the block's end, which the
        producer loads all the same, meet no product), gate and up products per piece as async wgmma, one step's
        products in flight. Returns (g0, u0, g1, u1, it)."""
        R0: gl.constexpr = g0.type.shape[1]
        R1: gl.constexpr = g1.type.shape[1]
        for k0 in range(0, D, BLOCK_K):
            slot, a = _gather_step(a_bufs, ready, it, WG, STAGES)
            bg, bu = _w_tiles(bg_bufs, bu_bufs, slot, MERGED)
            g0 = warpgroup_mma(a, bg.slice(0, R0).permute((1, 0)), g0, is_async=True)
            u0 = warpgroup_mma(a, bu.slice(0, R0).permute((1, 0)), u0, is_async=True)
            if TWO:
                g1 = warpgroup_mma(a, bg.slice(R0, R1).permute((1, 0)), g1, is_async=True)
                u1 = warpgroup_mma(a, bu.slice(R0, R1).permute((1, 0)), u1, is_async=True)
                g0, u0, g1, u1 = warpgroup_mma_wait(4, deps=(g0, u0, g1, u1))
            else:
                g0, u0 = warpgroup_mma_wait(2, deps=(g0, u0))
            if k0 > 0:
                _release(empty.index((it - 1) % STAGES))
            it += 1
        if TWO:
            g0, u0, g1, u1 = warpgroup_mma_wait(0, deps=(g0, u0, g1, u1))
        else:
            g0, u0 = warpgroup_mma_wait(0, deps=(g0, u0))
        _release(empty.index((it - 1) % STAGES))
        return g0, u0, g1, u1, it

    @gluon.jit
    def _gate_up_merged_pieces_loop(a_bufs, b_bufs, ready, empty, it, D, acc0, acc1, WG: gl.constexpr,
                                    TWO: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """:func:`_gate_up_pieces_loop` over the merged tile that holds each piece's gate and up rows side by side
        (:func:`_gather_producer`'s PR0 > 0): one product per piece, acc0 [64, 2 R0] = (gate | up) of the first
        R0 neurons, acc1 [64, 2 R1] of the next R1 (TWO), rather than four; each product reads the warpgroup's A
        tile from shared memory once, which the narrow products did four times per K step. Returns (acc0, acc1,
        it)."""
        N0: gl.constexpr = acc0.type.shape[1]
        N1: gl.constexpr = acc1.type.shape[1]
        for k0 in range(0, D, BLOCK_K):
            slot, a = _gather_step(a_bufs, ready, it, WG, STAGES)
            wt = b_bufs.index(slot)
            acc0 = warpgroup_mma(a, wt.slice(0, N0).permute((1, 0)), acc0, is_async=True)
            if TWO:
                acc1 = warpgroup_mma(a, wt.slice(N0, N1).permute((1, 0)), acc1, is_async=True)
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
            else:
                acc0 = warpgroup_mma_wait(1, deps=(acc0,))
            if k0 > 0:
                _release(empty.index((it - 1) % STAGES))
            it += 1
        if TWO:
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        else:
            acc0 = warpgroup_mma_wait(0, deps=(acc0,))
        _release(empty.index((it - 1) % STAGES))
        return acc0, acc1, it

    @gluon.jit
    def _gate_up_consumer(a_bufs, bg_bufs, bu_bufs, ready, empty, H, ACT, TILE_BLOCK, TILE_START, OFFSETS,
                          TILE_COUNT, D, BS: gl.constexpr, WG: gl.constexpr, SAVE_ACT: gl.constexpr,
                          BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, R0: gl.constexpr,
                          R1: gl.constexpr, WIDE: gl.constexpr = False, ROTATE: gl.constexpr = False,
                          MP: gl.constexpr = False):
        """One warpgroup: rows [WG * 64, + 64) of every work item, the gate and up products as async wgmma (one
        step's pair in flight), then h = silu(a) * u (and a, u with SAVE_ACT) stored for the block's rows and
        neurons. R0 > 0: a block's last column tile holds only BS % BLOCK_N = R0 + R1 neurons, computed as
        pieces of those widths (:func:`_gate_up_pieces_loop`) rather than BLOCK_N padded columns. ``WIDE``: a
        whole column tile's gate and up products as one product over the merged weight tiles (``bg_bufs`` is
        ``bu_bufs``, :func:`_gather_ring`'s MERGE_B: the A tile read from shared memory once per K step, not
        twice). ``MP`` (with WIDE): the last column tile's pieces as one product each over the merged tile
        (:func:`_gate_up_merged_pieces_loop`). ``ROTATE``: the items in :func:`_work_rotated`'s order. Measured and
        removed (session 36, code at a1a939c): the epilogue in a fourth partition from the values staged in shared
        memory, as dact's (forward 2.125 -> 2.160 ms at 0.3, 3.490 -> 3.573 at 0.5: slower)."""
        HALF_M: gl.constexpr = a_bufs.type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
        n_col: gl.constexpr = (BS + BLOCK_N - 1) // BLOCK_N
        total = gl.load(TILE_COUNT).to(gl.int32) * n_col
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, pid_n = _work_rotated(t, n_col, TILE_BLOCK, TILE_START, ROTATE)
            rows = start + WG * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, out_layout))
            if R0 > 0 and pid_n == n_col - 1:
                TWO: gl.constexpr = R1 > 0
                R1P: gl.constexpr = R1 if R1 > 0 else 16  # an absent second piece: a small accumulator never used
                piece_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # 32 columns per pass
                l0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, R0, 16])
                l1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, R1P, 16])
                if MP:  # the pieces' gate and up side by side in the merged tile: one product per piece
                    m0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                 instr_shape=[16, 2 * R0, 16])
                    m1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                 instr_shape=[16, 2 * R1P, 16])
                    acc0 = gl.zeros([HALF_M, 2 * R0], gl.float32, m0)
                    acc1 = gl.zeros([HALF_M, 2 * R1P], gl.float32, m1)
                    acc0, acc1, it = _gate_up_merged_pieces_loop(a_bufs, bg_bufs, ready, empty, it, D, acc0, acc1,
                                                                 WG, TWO, BLOCK_K, STAGES)
                    g0, u0 = _halves(acc0)
                    g1, u1 = _halves(acc1)
                else:
                    g0 = gl.zeros([HALF_M, R0], gl.float32, l0)
                    u0 = gl.zeros([HALF_M, R0], gl.float32, l0)
                    g1 = gl.zeros([HALF_M, R1P], gl.float32, l1)
                    u1 = gl.zeros([HALF_M, R1P], gl.float32, l1)
                    g0, u0, g1, u1, it = _gate_up_pieces_loop(a_bufs, bg_bufs, bu_bufs, ready, empty, it, D, g0, u0,
                                                              g1, u1, WG, TWO, BLOCK_K, STAGES, WIDE)
                p_rows = start + WG * HALF_M + gl.arange(0, HALF_M, layout=gl.SliceLayout(1, piece_layout))
                hi = gl.load(OFFSETS + b + 1)
                if TWO:
                    _gate_up_store(g1, u1, H, ACT, p_rows, hi, pid_n * BLOCK_N + R0, BS, SAVE_ACT, piece_layout)
                _gate_up_store(g0, u0, H, ACT, p_rows, hi, pid_n * BLOCK_N, BS, SAVE_ACT, piece_layout)
            else:
                if WIDE:
                    wide_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                                          instr_shape=[16, 2 * BLOCK_N, 16])
                    acc = gl.zeros([HALF_M, 2 * BLOCK_N], gl.float32, wide_layout)
                    for k0 in range(0, D, BLOCK_K):
                        slot, a = _gather_step(a_bufs, ready, it, WG, STAGES)
                        acc = warpgroup_mma(a, bg_bufs.index(slot).permute((1, 0)), acc, is_async=True)
                        acc = warpgroup_mma_wait(1, deps=(acc,))  # the previous step's product is done
                        if k0 > 0:
                            _release(empty.index((it - 1) % STAGES))
                        it += 1
                    acc = warpgroup_mma_wait(0, deps=(acc,))
                    _release(empty.index((it - 1) % STAGES))
                    acc_g, acc_u = _halves(acc)  # columns [0, BLOCK_N): gate, [BLOCK_N, 2 BLOCK_N): up
                else:
                    acc_g = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
                    acc_u = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
                    for k0 in range(0, D, BLOCK_K):
                        # (_gather_step: cp.async writes through the generic proxy, wgmma reads through the async
                        # one, so a fence orders them, as Triton's own pipeliner does between cp.async waits and wgmma)
                        slot, a = _gather_step(a_bufs, ready, it, WG, STAGES)
                        acc_g = warpgroup_mma(a, bg_bufs.index(slot).permute((1, 0)), acc_g, is_async=True)
                        acc_u = warpgroup_mma(a, bu_bufs.index(slot).permute((1, 0)), acc_u, is_async=True)
                        acc_g, acc_u = warpgroup_mma_wait(2, deps=(acc_g, acc_u))  # the previous step's pair is done
                        if k0 > 0:
                            _release(empty.index((it - 1) % STAGES))
                        it += 1
                    acc_g, acc_u = warpgroup_mma_wait(0, deps=(acc_g, acc_u))
                    _release(empty.index((it - 1) % STAGES))
                _gate_up_store(acc_g, acc_u, H, ACT, rows, gl.load(OFFSETS + b + 1), pid_n * BLOCK_N, BS, SAVE_ACT,
                               out_layout)

    @gluon.jit
    def _gate_up_consumer1(a_bufs, bg_bufs, bu_bufs, ready, empty, H, ACT, TILE_BLOCK, TILE_START, OFFSETS,
                           TILE_COUNT, D, BS: gl.constexpr, SAVE_ACT: gl.constexpr, BLOCK_N: gl.constexpr,
                           BLOCK_K: gl.constexpr, STAGES: gl.constexpr, R0: gl.constexpr, R1: gl.constexpr,
                           WIDE: gl.constexpr, ROTATE: gl.constexpr, MP: gl.constexpr):
        WG1: gl.constexpr = 1
        _gate_up_consumer(a_bufs, bg_bufs, bu_bufs, ready, empty, H, ACT, TILE_BLOCK, TILE_START, OFFSETS,
                          TILE_COUNT, D, BS, WG1, SAVE_ACT, BLOCK_N, BLOCK_K, STAGES, R0, R1, WIDE, ROTATE, MP)

    @gluon.jit
    def _gate_up_sm90_kernel(w_desc_g, w_desc_u, wp_g0, wp_u0, wp_g1, wp_u1, X, H, ACT, SORTED_TOK, TILE_BLOCK,
                             TILE_START, OFFSETS, TILE_COUNT, D, stride_xt, BS: gl.constexpr, SAVE_ACT: gl.constexpr,
                             BLOCK_K: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                             PRODUCER_REGS: gl.constexpr, R0: gl.constexpr = 0, R1: gl.constexpr = 0,
                             WIDE: gl.constexpr = False, ROTATE: gl.constexpr = False, MP: gl.constexpr = False):
        """The forward's gate/up GEMM + SwiGLU over the grouping's real row tiles (see above), persistent.
        ``WIDE``: a whole column tile's gate and up products as one [64, 2 BLOCK_N] product. ``ROTATE``: the work
        items in :func:`_work_rotated`'s order. ``MP`` (WIDE and R0 > 0): the last column tile's pieces merged,
        loaded through the boxes ``wp_g0 / wp_u0`` ([R0, BLOCK_K]) and ``wp_g1 / wp_u1`` ([R1, BLOCK_K])."""
        WG0: gl.constexpr = 0
        W_KN: gl.constexpr = False
        PR0: gl.constexpr = R0 if MP else 0
        PR1: gl.constexpr = R1 if MP else 0
        BLOCK_N: gl.constexpr = w_desc_g.block_type.shape[0]
        a_bufs, bg_bufs, bu_bufs, ready, empty = _gather_ring(X.dtype.element_ty, w_desc_g, w_desc_u, BLOCK_K, STAGES,
                                                              WIDE)
        gl.warp_specialize([
            (_gate_up_consumer, (a_bufs, bg_bufs, bu_bufs, ready, empty, H, ACT, TILE_BLOCK, TILE_START, OFFSETS,
                                 TILE_COUNT, D, BS, WG0, SAVE_ACT, BLOCK_N, BLOCK_K, STAGES, R0, R1, WIDE, ROTATE,
                                 MP)),
            (_gate_up_consumer1, (a_bufs, bg_bufs, bu_bufs, ready, empty, H, ACT, TILE_BLOCK, TILE_START, OFFSETS,
                                  TILE_COUNT, D, BS, SAVE_ACT, BLOCK_N, BLOCK_K, STAGES, R0, R1, WIDE, ROTATE, MP)),
            (_gather_producer, (w_desc_g, w_desc_u, wp_g0, wp_u0, wp_g1, wp_u1, X, a_bufs, bg_bufs, bu_bufs, ready,
                                empty, SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT, D, BS, stride_xt,
                                BLOCK_N, BLOCK_K, STAGES, W_KN, WIDE, ROTATE, PR0, PR1)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def gate_up_layout_ok(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, bs: int) -> bool:
    """The gathered gate/up kernel's layout needs: x, w_gate and w_up with unit stride along D and 16-byte aligned
    rows and bases (16-byte cp.async copies, TMA weight tiles), the same weight strides, blocks of a multiple of 8
    neurons (16-byte stores of h and act)."""
    es = x.element_size()
    return (x.stride(1) == 1 and w_gate.stride(1) == 1 and w_up.stride() == w_gate.stride() and bs % 8 == 0
            and all((t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x, w_gate, w_up)))


# A block's last column tile (gate/up) or second part (dact) as power-of-2 pieces of its real neurons (224-neuron
# blocks: 64 + 32 of 128 columns) rather than a padded column tile: 12.5 % less MMA work at 224 (session 33).
TAIL_PIECES = True


def tail_pieces(r: int) -> tuple:
    """``r`` (0 < r <= 128 neurons) as (R0, R1): one or two powers of 2 of at least 16, the larger first (96 ->
    (64, 32), 64 -> (64, 0)); (0, 0) where there is no such split or TAIL_PIECES is off (the padded tile)."""
    bits = [1 << i for i in range(r.bit_length() - 1, -1, -1) if r >> i & 1] if 0 < r <= 128 else []
    if not TAIL_PIECES or not bits or len(bits) > 2 or bits[-1] < 16:
        return 0, 0
    return bits[0], bits[1] if len(bits) > 1 else 0


def gate_up_pieces(bs: int, block_n: int) -> tuple:
    """(R0, R1) of the gathered gate/up kernel for blocks of ``bs`` neurons: the last column tile's pieces where a
    block spans more than one tile; a block narrower than one tile keeps the padded tile (Triton 3.6 fails an LLVM
    assertion in ConvertTritonGPUToLLVM compiling the kernel whose every tile is pieces, session 34)."""
    return tail_pieces(bs % block_n) if bs > block_n else (0, 0)


# A whole column tile's gate and up products as one [64, 2 x 128] product per warpgroup and K step over the two weight
# tiles side by side in shared memory (instead of two products, each re-reading the warpgroup's A tile). The
# block's last, partial tile keeps its pieces (which read the merged tiles' halves). False: two products (A/B).
GATE_UP_WIDE = True

# The work items in :func:`_work_rotated`'s order: a program's items cycle through a row tile's column tiles. In
# row-tile-major order on 132 programs every even program took the full 128-neuron tiles and every odd one the
# cheaper 96-neuron pieces (Nsight Compute, session 38: SM active cycles 10 % below to 7 % above the mean, 91 % of
# the kernel's time busy on average). H200, session 38: the kernel 1.000 -> 0.901 ms (97 % busy), the forward
# 2.060 -> 1.964 ms at ratio 0.3 and 3.420 -> 3.259 at 0.5 (A/Bs, same bits). False: plain row-tile-major order.
GATE_UP_ROTATE = True

# A block's last column tile's pieces (224: 64 + 32 neurons) as one product each over gate and up side by side in
# the merged weight tile (with GATE_UP_WIDE), instead of four narrow products that each read the A tile from shared
# memory (m64n32k16 reads 3 KB of shared memory for 16 cycles of tensor work: bound by shared memory, session 38).
# H200, session 38 (forward A/Bs, same bits): 1.935 -> 1.897 ms at ratio 0.3, 3.191 -> 3.150 at 0.5.
GATE_UP_MERGED_PIECES = True


def gate_up_sm90(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, h: torch.Tensor, act: torch.Tensor | None,
                 grouping, *, bs: int, block_n: int, block_k: int, stages: int) -> None:
    """``h [P, BS]`` (and ``act [P, 2, BS]``) for the grouping's row tiles from the gathered rows of ``x [T, D]``
    (unit stride along D) and ``w_gate / w_up [F, D]`` (unit stride along D, 16-byte aligned rows)."""
    w_block = [block_n, block_k]
    r0, r1 = gate_up_pieces(bs, block_n)
    wg, wu = _desc(w_gate, w_block), _desc(w_up, w_block)
    mp = GATE_UP_WIDE and GATE_UP_MERGED_PIECES and r0 > 0
    # the pieces' boxes (merged pieces), or any descriptors where unused
    wp = [_desc(w, [r or r0, block_k]) for r in (r0, r1) for w in (w_gate, w_up)] if mp else [wg, wu, wg, wu]
    _gate_up_sm90_kernel[(sm_count(x.device),)](
        wg, wu, *wp, x, h, h if act is None else act, grouping.sorted_tok,
        grouping.tile_block, grouping.tile_start, grouping.offsets, grouping.tile_count, x.shape[1], x.stride(0),
        BS=bs, SAVE_ACT=act is not None, BLOCK_K=block_k, STAGES=stages, CONSUMER_REGS=GATHER_CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, R0=r0, R1=r1, WIDE=GATE_UP_WIDE, ROTATE=GATE_UP_ROTATE, MP=mp, num_warps=4,
        maxnreg=MAXNREG,
    )


# ---- the backward's dact with gathered dO rows (``dact.sm90``, the T >= 4096 default on sm_90, session 31: H200,
# T8192 ratio 0.3, 0.69 ms (416 TF/s) in the step's profile; the whole backward against the Triton full-block kernel
# -57, +3 and -87 us in three runs: a small gain at most; session 36: 0.622 ms with its epilogue partition) ---------
#
# g[p, n] = dO[tok_p] . w_down[:, b*BS + n] over the rows p of block b (K = d_model), then the SwiGLU derivative of
# _sparse_ffn_bwd_dact_full_kernel's epilogue: da, du and w_p * h stored, the row's dweight partial sum(g * h). The
# gathered A operand comes as in the gate/up kernel (the same producer, W_KN: w_down [D, F] read as [k, n] tiles);
# one work item per row tile covers the block's BS <= 256 neurons as a 128-column accumulator per warpgroup and
# the rest as pieces (224 = 128 + 64 + 32), so each gathered dO row is read once per row tile; g goes through
# shared memory to a fourth, epilogue partition (below). Measured and removed (session 36, code at 0ff6529): the
# block as one [64, 256] product per K step (0.767 vs 0.667 ms: the padded MMA work costs more than the A tile's
# shared-memory reads it saves).

# K steps of 32 in 7 ring slots (the launcher trims the ring to what fits beside g's staging: dact_stages). Nsight
# Compute, session 38: at K 64 the 3 slots that fit beside g's staging left the producer waiting on empty slots and
# the consumers on ready ones. H200, session 39 (whole-backward A/Bs, same bits): 64 x 3 -> 32 x 7 3.595 -> 3.505 ms
# at ratio 0.3, 5.749 -> 5.702 at 0.5 (call 3's three pairs: -2.0 to -4.0 % at 0.3, -0.1 to -2.1 % at 0.5); dact
# alone 0.540 ms at 1.59 GHz, tensor pipe 63.5 % (session 38: 0.609 ms at ~1.7 GHz, 52 %). Measured and removed
# (session 39, code at bf08b19): the A tiles in a ring of their own, 4 slots beside 3 weight slots at K 64
# (3.635 -> 3.739 ms at 0.3: slower).
DACT_CONFIG = dict(block_n=128, block_k=32, stages=7)
if HAVE_GLUON:

    @gluon.jit
    def _halves(x):
        """x [M, N] -> its column halves (a register split: in the MMA layout a thread holds columns c and c + N/2)."""
        M: gl.constexpr = x.type.shape[0]
        N: gl.constexpr = x.type.shape[1]
        return gl.split(gl.permute(gl.reshape(x, [M, 2, N // 2]), [0, 2, 1]))

    @gluon.jit
    def _dact_mainloop(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, it, D, acc0, acc1, acc2,
                       WG: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, R0: gl.constexpr,
                       R1: gl.constexpr, SPLIT: gl.constexpr = False):
        """One warpgroup's K loop of a row tile: g over the block's first BLOCK_N columns (acc0) and its second
        part (acc1, and acc2 where R1 > 0: the pieces, see :func:`_dact_consumer`) as async wgmma, one step's
        products in flight, each ring slot released once the products that read it are done. ``SPLIT``: the
        pieces' weights in tiles of their own (``b1_bufs`` [.., R0], ``b2_bufs`` [.., R1]) rather than column
        slices of one BLOCK_N-wide tile. Returns (acc0, acc1, acc2, it)."""
        for k0 in range(0, D, BLOCK_K):
            slot, a = _gather_step(a_bufs, ready, it, WG, STAGES)
            acc0 = warpgroup_mma(a, b0_bufs.index(slot), acc0, is_async=True)
            if R0 == 0:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot), acc1, is_async=True)
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # the previous step's pair is done
            elif R1 == 0:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot).slice(0, R0, dim=1), acc1, is_async=True)
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
            elif SPLIT:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot), acc1, is_async=True)
                acc2 = warpgroup_mma(a, b2_bufs.index(slot), acc2, is_async=True)
                acc0, acc1, acc2 = warpgroup_mma_wait(3, deps=(acc0, acc1, acc2))
            else:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot).slice(0, R0, dim=1), acc1, is_async=True)
                acc2 = warpgroup_mma(a, b1_bufs.index(slot).slice(R0, R1, dim=1), acc2, is_async=True)
                acc0, acc1, acc2 = warpgroup_mma_wait(3, deps=(acc0, acc1, acc2))
            if k0 > 0:
                _release(empty.index((it - 1) % STAGES))
            it += 1
        if R1 == 0:
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        else:
            acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2))
        _release(empty.index((it - 1) % STAGES))
        return acc0, acc1, acc2, it

    @gluon.jit
    def _dact_consumer(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, TILE_COUNT, D, g0_smem, g1_smem, g2_smem,
                       g_full, g_empty, WG: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr, R0: gl.constexpr, R1: gl.constexpr, SPLIT: gl.constexpr = False):
        """One warpgroup: rows [WG * 64, + 64) of every row tile, g over the block's first and second BLOCK_N
        columns (:func:`_dact_mainloop`), staged in shared memory (bf16, ``g*_smem``) for the epilogue partition
        (:func:`_dact_epilogue`) once it is done with the previous tile's, then on to the next tile's products.
        R0 > 0: the second part holds only BS - BLOCK_N = R0 + R1 neurons, computed as pieces of those widths
        (columns [0, R0) and [R0, R0 + R1) of the slot's second weight tile) rather than BLOCK_N padded columns.
        Measured and removed (session 36, code at a1a939c): the epilogue in the consumers themselves (dact alone
        0.685 vs 0.622 ms, the backward 3.702 vs 3.632 ms at 0.3, 6.127 vs 5.987 at 0.5)."""
        HALF_M: gl.constexpr = a_bufs.type.shape[1]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        W1: gl.constexpr = R0 if R0 > 0 else BLOCK_N  # the second part's first accumulator
        W2: gl.constexpr = R1 if R1 > 0 else 16  # its second (R1 > 0), else a small one never used
        l1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, W1, 16])
        l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, W2, 16])
        dt: gl.constexpr = g0_smem.dtype
        total = gl.load(TILE_COUNT).to(gl.int32)
        it = 0
        n = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            acc0 = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
            acc1 = gl.zeros([HALF_M, W1], gl.float32, l1)
            acc2 = gl.zeros([HALF_M, W2], gl.float32, l2)
            acc0, acc1, acc2, it = _dact_mainloop(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, it, D, acc0, acc1,
                                                  acc2, WG, BLOCK_K, STAGES, R0, R1, SPLIT)
            mbarrier.wait(g_empty, (n & 1) ^ 1)
            g0_smem.slice(WG * HALF_M, HALF_M, dim=0).store(acc0.to(dt))
            g1_smem.slice(WG * HALF_M, HALF_M, dim=0).store(acc1.to(dt))
            if R1 > 0:
                g2_smem.slice(WG * HALF_M, HALF_M, dim=0).store(acc2.to(dt))
            _release(g_full)
            n += 1

    @gluon.jit
    def _dact_consumer1(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, TILE_COUNT, D, g0_smem, g1_smem, g2_smem,
                        g_full, g_empty, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                        R0: gl.constexpr, R1: gl.constexpr, SPLIT: gl.constexpr):
        WG1: gl.constexpr = 1
        _dact_consumer(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, TILE_COUNT, D, g0_smem, g1_smem, g2_smem,
                       g_full, g_empty, WG1, BLOCK_N, BLOCK_K, STAGES, R0, R1, SPLIT)

    @gluon.jit
    def _dact_load(ACT, WSORT, r0, hi, c0: gl.constexpr, BS: gl.constexpr, CH: gl.constexpr, N: gl.constexpr):
        """The loads of the SwiGLU derivative of a staged g chunk (act's a and u, w_p) for sorted rows ``r0 +: CH``
        and block columns ``c0 +: N``, in a blocked layout (16-byte loads of act and stores of da, du, w_p * h where
        N allows), for :func:`_dact_apply`."""
        VEC: gl.constexpr = 8 if N * CH // 128 >= 8 else N * CH // 128
        TN: gl.constexpr = N // VEC
        layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TN, TN], [4, 1], [1, 0])
        rows = r0 + gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
        cols = c0 + gl.arange(0, N, layout=gl.SliceLayout(0, layout))
        r_ok = rows < hi
        mask = gl.expand_dims(r_ok, 1) & gl.expand_dims(cols < BS, 0)
        o = gl.expand_dims(rows.to(gl.int64) * (2 * BS), 1) + gl.expand_dims(cols, 0)
        a = gl.load(ACT + o, mask=mask, other=0.0)
        u = gl.load(ACT + o + BS, mask=mask, other=0.0)
        wp = gl.load(WSORT + rows, mask=r_ok, other=0.0)
        return a, u, wp

    @gluon.jit
    def _dact_apply(g_smem, a, u, wp, DACT, HW, r0, hi, c0: gl.constexpr, BS: gl.constexpr):
        """The SwiGLU derivative of the staged g rows ``g_smem [CH, N]`` (read in the layout of a, u, w_p from
        :func:`_dact_load`): da, du and w_p * h stored; returns the rows' partial sum of g * h."""
        layout: gl.constexpr = a.type.layout
        CH: gl.constexpr = g_smem.type.shape[0]
        N: gl.constexpr = g_smem.type.shape[1]
        g = g_smem.load(layout).to(gl.float32)
        rows = r0 + gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
        cols = c0 + gl.arange(0, N, layout=gl.SliceLayout(0, layout))
        mask = gl.expand_dims(rows < hi, 1) & gl.expand_dims(cols < BS, 0)
        o = gl.expand_dims(rows.to(gl.int64) * (2 * BS), 1) + gl.expand_dims(cols, 0)
        a = a.to(gl.float32)
        u = u.to(gl.float32)
        wp = gl.expand_dims(wp.to(gl.float32), 1)
        s = 1.0 / (1.0 + gl.exp(-a))
        silu = a * s
        h = silu * u
        part = gl.sum(gl.where(mask, g * h, 0.0), axis=1)
        dh = g * wp
        dt = DACT.dtype.element_ty
        gl.store(DACT + o, (dh * u * s * (1.0 + a * (1.0 - s))).to(dt), mask=mask)
        gl.store(DACT + o + BS, (dh * silu).to(dt), mask=mask)
        hw_off = gl.expand_dims(rows.to(gl.int64) * BS, 1) + gl.expand_dims(cols, 0)
        gl.store(HW + hw_off, (h * wp).to(HW.dtype.element_ty), mask=mask)
        return part

    @gluon.jit
    def _dact_epilogue(g0_smem, g1_smem, g2_smem, g_full, g_empty, ACT, WSORT, DACT, HW, DWP, TILE_BLOCK,
                       TILE_START, OFFSETS, TILE_COUNT, BS: gl.constexpr, BLOCK_N: gl.constexpr, R0: gl.constexpr,
                       R1: gl.constexpr, PREFETCH: gl.constexpr = False, CH: gl.constexpr = 16):
        """The epilogue partition (4 warps): per row tile, once both consumers staged g, the SwiGLU
        derivative of its rows in chunks of CH (:func:`_dact_load`, :func:`_dact_apply` over each staged part) and
        the rows' dweight partial sums, then g's buffers handed back; the consumers meanwhile run the next tile's
        products.
        ``PREFETCH``: each part's act and w_p loads issued one part ahead (:func:`_dact_load`; the tile's first
        before g is staged), so a part's math and stores run while the next part's loads are in flight, instead
        of every part waiting out its own loads' latency. ``CH``: rows per chunk."""
        M: gl.constexpr = g0_smem.type.shape[0]
        total = gl.load(TILE_COUNT).to(gl.int32)
        n = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, start, _ = _work(t, 1, TILE_BLOCK, TILE_START)
            hi = gl.load(OFFSETS + b + 1)
            if PREFETCH:
                W1: gl.constexpr = g1_smem.type.shape[1]
                a0, u0, w0 = _dact_load(ACT, WSORT, start, hi, 0, BS, CH, BLOCK_N)
            mbarrier.wait(g_full, n & 1)
            for rc in gl.static_range(0, M, CH):
                r0 = start + rc
                if PREFETCH:
                    a1, u1, w1 = _dact_load(ACT, WSORT, r0, hi, BLOCK_N, BS, CH, W1)
                    part = _dact_apply(g0_smem.slice(rc, CH, dim=0), a0, u0, w0, DACT, HW, r0, hi, 0, BS)
                    if R1 > 0:
                        a2, u2, w2 = _dact_load(ACT, WSORT, r0, hi, BLOCK_N + R0, BS, CH, R1)
                    elif rc + CH < M:
                        a0, u0, w0 = _dact_load(ACT, WSORT, r0 + CH, hi, 0, BS, CH, BLOCK_N)
                    p1 = _dact_apply(g1_smem.slice(rc, CH, dim=0), a1, u1, w1, DACT, HW, r0, hi, BLOCK_N, BS)
                    part += gl.convert_layout(p1, part.type.layout)
                    if R1 > 0:
                        if rc + CH < M:
                            a0, u0, w0 = _dact_load(ACT, WSORT, r0 + CH, hi, 0, BS, CH, BLOCK_N)
                        p2 = _dact_apply(g2_smem.slice(rc, CH, dim=0), a2, u2, w2, DACT, HW, r0, hi, BLOCK_N + R0,
                                         BS)
                        part += gl.convert_layout(p2, part.type.layout)
                else:  # each part's loads just before their use
                    a0, u0, w0 = _dact_load(ACT, WSORT, r0, hi, 0, BS, CH, BLOCK_N)
                    part = _dact_apply(g0_smem.slice(rc, CH, dim=0), a0, u0, w0, DACT, HW, r0, hi, 0, BS)
                    a1, u1, w1 = _dact_load(ACT, WSORT, r0, hi, BLOCK_N, BS, CH, g1_smem.type.shape[1])
                    p1 = _dact_apply(g1_smem.slice(rc, CH, dim=0), a1, u1, w1, DACT, HW, r0, hi, BLOCK_N, BS)
                    part += gl.convert_layout(p1, part.type.layout)
                    if R1 > 0:
                        a2, u2, w2 = _dact_load(ACT, WSORT, r0, hi, BLOCK_N + R0, BS, CH, R1)
                        p2 = _dact_apply(g2_smem.slice(rc, CH, dim=0), a2, u2, w2, DACT, HW, r0, hi, BLOCK_N + R0,
                                         BS)
                        part += gl.convert_layout(p2, part.type.layout)
                rows = r0 + gl.arange(0, CH, layout=part.type.layout)
                gl.store(DWP + rows, part, mask=rows < hi)
            _release(g_empty)
            n += 1

    @gluon.jit
    def _dact_sm90_kernel(w_desc, w_desc1, w_desc2, DO, ACT, WSORT, DACT, HW, DWP, SORTED_TOK, TILE_BLOCK,
                          TILE_START, OFFSETS, TILE_COUNT, D, stride_dot, BS: gl.constexpr, BLOCK_K: gl.constexpr,
                          STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          EPI_REGS: gl.constexpr, R0: gl.constexpr = 0, R1: gl.constexpr = 0,
                          PREFETCH: gl.constexpr = False, EPI_ROWS: gl.constexpr = 16, SPLIT: gl.constexpr = False):
        """The backward's dact (see above) over the grouping's real row tiles, persistent: two consumer
        warpgroups, the cp.async producer and the epilogue partition (4 warps, ``EPI_REGS``), which works from g
        staged in shared memory (``PREFETCH``, ``EPI_ROWS``: :func:`_dact_epilogue`'s). ``SPLIT`` (R1 > 0): the
        second part's pieces loaded as boxes of their own (``w_desc1`` [BLOCK_K, R0], ``w_desc2`` [BLOCK_K, R1])
        into tiles of their own width and swizzle; else ``w_desc1 / w_desc2`` go unused."""
        WG0: gl.constexpr = 0
        # the producer's dact form: w_down read as [k, n] tiles, no merged tile, no rotation, no gate/up pieces
        W_KN: gl.constexpr = True
        NO: gl.constexpr = False
        NONE: gl.constexpr = 0
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
        dt: gl.constexpr = DO.dtype.element_ty
        if SPLIT:
            wd1 = w_desc1
        else:
            wd1 = w_desc
        a_bufs, b0_bufs, b1_bufs, ready, empty = _gather_ring(dt, w_desc, wd1, BLOCK_K, STAGES)
        if SPLIT:
            b2_bufs = gl.allocate_shared_memory(w_desc2.dtype, [STAGES] + w_desc2.block_type.shape, w_desc2.layout)
        else:
            b2_bufs = b1_bufs
        W1: gl.constexpr = R0 if R0 > 0 else BLOCK_N
        W2: gl.constexpr = R1 if R1 > 0 else 16
        M: gl.constexpr = 2 * a_bufs.type.shape[1]
        g0_smem = gl.allocate_shared_memory(dt, [M, BLOCK_N], gl.NVMMASharedLayout.get_default_for([M, BLOCK_N], dt))
        g1_smem = gl.allocate_shared_memory(dt, [M, W1], gl.NVMMASharedLayout.get_default_for([M, W1], dt))
        g2_smem = gl.allocate_shared_memory(dt, [M, W2], gl.NVMMASharedLayout.get_default_for([M, W2], dt))
        g_full = _barrier_array(1, 2).index(0)  # one arrival per consumer warpgroup
        g_empty = _barrier_array(1, 1).index(0)  # the epilogue partition's
        gl.warp_specialize([
            (_dact_consumer, (a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, TILE_COUNT, D, g0_smem, g1_smem,
                              g2_smem, g_full, g_empty, WG0, BLOCK_N, BLOCK_K, STAGES, R0, R1, SPLIT)),
            (_dact_consumer1, (a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, TILE_COUNT, D, g0_smem, g1_smem,
                               g2_smem, g_full, g_empty, BLOCK_N, BLOCK_K, STAGES, R0, R1, SPLIT)),
            (_gather_producer, (w_desc, wd1, w_desc2, w_desc, w_desc, w_desc, DO, a_bufs, b0_bufs, b1_bufs, ready,
                                empty, SORTED_TOK, TILE_BLOCK, TILE_START, OFFSETS, TILE_COUNT, D, BS, stride_dot,
                                BLOCK_N, BLOCK_K, STAGES, W_KN, NO, NO, NONE, NONE, b2_bufs, SPLIT)),
            (_dact_epilogue, (g0_smem, g1_smem, g2_smem, g_full, g_empty, ACT, WSORT, DACT, HW, DWP, TILE_BLOCK,
                              TILE_START, OFFSETS, TILE_COUNT, BS, BLOCK_N, R0, R1, PREFETCH, EPI_ROWS)),
        ], [4, 4, 4], [CONSUMER_REGS, PRODUCER_REGS, EPI_REGS])


def dact_layout_ok(grad_out: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor, bs: int, block_n: int) -> bool:
    """The gathered dact kernel's layout needs: grad_out and w_down [D, F] with unit inner strides and 16-byte
    aligned rows and bases (cp.async rows, TMA weight tiles), act contiguous, blocks of a multiple of 8 neurons
    and at most two column tiles."""
    es = grad_out.element_size()
    return (grad_out.stride(1) == 1 and w_down.stride(1) == 1 and act.is_contiguous() and bs % 8 == 0
            and bs <= 2 * block_n and w_down.dtype == grad_out.dtype
            and all((t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (grad_out, w_down)))


# The epilogue runs in its own partition (session 36): the consumers stage g (bf16) in shared memory and go on to the
# next tile's products while a fourth warpgroup computes the SwiGLU derivative and stores da, du, w_p * h and the
# dweight partial sums. H200 session 36, T8192: dact alone 0.685 -> 0.622 ms at 0.3 (its main loop alone: 0.499),
# the whole backward 3.702 -> 3.632 ms at 0.3 and 6.127 -> 5.987 at 0.5 against the epilogue in the consumers
# (same-run A/Bs; g is rounded to bf16 before the derivative, as a dense bf16 SwiGLU's backward rounds dh). The
# staging buffers (56 KB at 224 neurons) take the ring's fourth slot (DACT_CONFIG), and 16 warps leave 128 registers
# a thread on average: the consumers EPI_CONSUMER_REGS, the producer PRODUCER_REGS, the epilogue partition
# EPI_REGS. The same for gate/up lost (see _gate_up_consumer).
EPI_CONSUMER_REGS = 168
EPI_REGS = 120
EPI_MAXNREG = 128
# The epilogue partition's act / w_p loads issued one staged part ahead (session 38; see _dact_epilogue), and its
# chunk of rows (32 spills registers, with or without the prefetch). H200, session 38 (backward A/Bs, same bits):
# 3.584 -> 3.578 ms at ratio 0.3, 5.786 -> 5.733 at 0.5: a small gain at most. False: each part's loads where used.
DACT_EPI_PREFETCH = True
# dact's second part as its pieces (with TAIL_PIECES; 224: 64 + 32 neurons, column slices of the second weight tile)
# rather than one padded 128-column product. Nsight Compute, session 38: the m64n32 products of the pieces are the
# most-sampled instructions after the barrier waits, at 52 % tensor-pipe use for the kernel; padded all the same
# is slower (backward A/Bs 3.557 -> 3.607 ms at ratio 0.3, 5.841 -> 5.935 at 0.5). False: padded.
DACT_TAIL_PIECES = True
# The pieces' weights as boxes of their own ([BLOCK_K, 64] and [BLOCK_K, 32] tiles, each with its own swizzle: 7/8
# of a slot's weight bytes) rather than column slices of a second [BLOCK_K, 128] tile. H200, session 39 (backward
# A/Bs, same bits): at K 64 x 3 3.684 -> 3.658 ms at ratio 0.3; at K 32 x 7 3.573 -> 3.579 (0.3), 5.779 -> 5.772
# (0.5): a tie, so off (the GPU tests keep it bit-exact).
DACT_SPLIT_BOXES = False
DACT_EPI_ROWS = 16


def dact_stages(block_n: int, block_k: int, stages: int, r0: int, r1: int, split: bool) -> int:
    """dact's ring depth: ``stages`` or fewer, so that the slots (both 64-row A halves and the weight tiles:
    ``block_n`` columns, then the second part's ``block_n`` padded columns or, ``split``, its R0 + R1 pieces) fit
    in shared memory beside g's staging (128 rows of block_n + W1 + W2 bf16 columns, W1 / W2 as in
    :func:`_dact_sm90_kernel`) and the barriers (1 KB of margin: the AOT check at K 32 / 64 reads 300-400 B over
    the buffers)."""
    second = r0 + r1 if split else block_n
    staging = 2 * 128 * (block_n + (r0 or block_n) + (r1 or 16))
    return ring_stages(stages, 2 * (2 * 64 * block_k + block_k * (block_n + second)), staging + 1024)


def dact_sm90(grad_out: torch.Tensor, w_down: torch.Tensor, act: torch.Tensor, w_sorted: torch.Tensor,
              dact: torch.Tensor, hw: torch.Tensor, dwp: torch.Tensor, grouping, *, bs: int, block_n: int,
              block_k: int, stages: int) -> None:
    """``dact [P, 2, BS]``, ``hw [P, BS]`` and the dweight partial sums ``dwp [1, P]`` (fp32) for the grouping's
    row tiles from the gathered rows of ``grad_out [T, D]``, ``w_down [D, F]`` and the forward's ``act [P, 2,
    BS]`` (the caller checked :func:`supported` and :func:`dact_layout_ok`); a ring of ``stages`` slots or as many
    as fit (:func:`dact_stages`)."""
    r0, r1 = tail_pieces(bs - block_n) if DACT_TAIL_PIECES else (0, 0)
    w_desc = _desc(w_down, [block_k, block_n])
    split = DACT_SPLIT_BOXES and r1 > 0
    w1, w2 = (_desc(w_down, [block_k, r0]), _desc(w_down, [block_k, r1])) if split else (w_desc, w_desc)
    stages = dact_stages(block_n, block_k, stages, r0, r1, split)
    _dact_sm90_kernel[(sm_count(grad_out.device),)](
        w_desc, w1, w2, grad_out, act, w_sorted, dact, hw, dwp, grouping.sorted_tok,
        grouping.tile_block, grouping.tile_start, grouping.offsets, grouping.tile_count, grad_out.shape[1],
        grad_out.stride(0), BS=bs, BLOCK_K=block_k, STAGES=stages, CONSUMER_REGS=EPI_CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, EPI_REGS=EPI_REGS, R0=r0, R1=r1, PREFETCH=DACT_EPI_PREFETCH,
        EPI_ROWS=DACT_EPI_ROWS, SPLIT=split, num_warps=4, maxnreg=EPI_MAXNREG,
    )


# ---- the backward's dW gate/up with gathered x rows along K (``dw_gate_up.sm90``, the T >= 4096 default on sm_90,
# session 31: H200, T8192 ratio 0.3, 1.49 ms (388 TF/s) vs the Triton kernel's 1.72; rings of 3 slots a tie, K steps
# of 32 (8 slots) or 64-wide d tiles slower) -----------------------------------------------------------------------
#
# dW_gate[b*BS + n, d] = sum over the rows p of block b of da[p, n] x[tok_p, d] (dW_up with du), as
# _sparse_ffn_bwd_dw_gate_up_kernel computes it. Work items are (block, d tile of BLOCK_N, 128-neuron tile), the
# neuron tiles of a d tile consecutive (they share the gathered x tile, so the second reads it from L2); K runs over
# the block's rows in steps of BLOCK_K. Per K step the producer brings da and du for the item's neurons by TMA
# (dact viewed as [P, 2 BS]: four [BLOCK_K, 64] boxes, one per consumer warpgroup and product; rows past the block's
# end read the next block's rows, which meet zeros in x) and gathers the x rows [BLOCK_K, BLOCK_N] by cp.async (rows
# past the end read zeros); each consumer warpgroup multiplies its 64 neurons' da^T and du^T (an M-major A
# operand: the permuted [BLOCK_K, 64] box) by the shared x tile into two [64, BLOCK_N] accumulators.

DW_GATE_UP_CONFIG = dict(block_n=128, block_k=64, stages=4)

if HAVE_GLUON:

    @gluon.jit
    def _dw_work(t, n_d, N_M: gl.constexpr, OFFSETS):
        """(block, d tile, neuron tile or product, the block's first and end sorted rows) of work item ``t`` (the
        last index fastest)."""
        pid_m = t % N_M
        t2 = t // N_M
        b = t2 // n_d
        return b, t2 % n_d, pid_m, gl.load(OFFSETS + b), gl.load(OFFSETS + b + 1)

    @gluon.jit
    def _row_ids(SORTED_TOK, r0, hi, BLOCK_K: gl.constexpr, row_l: gl.constexpr):
        """Which of the sorted rows ``r0 +: BLOCK_K`` come before ``hi``, and their token ids (0 past ``hi``)."""
        rows = r0 + gl.arange(0, BLOCK_K, layout=row_l)
        ok = rows < hi
        return ok, gl.load(SORTED_TOK + rows, mask=ok, other=0)

    @gluon.jit
    def _dw_k_loop(a_bufs, b_bufs, ready, empty, lo, hi, it, acc0, acc1, WG: gl.constexpr, SHARED_B: gl.constexpr,
                   BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """A dW consumer's K loop over the block's rows [lo, hi): per step two async wgmma with one step's pair in
        flight, each slot released once the products that read it are done. SHARED_B (dW gate/up): the products
        take this warpgroup's da and du boxes (``a_bufs[4 s + WG]``, ``[4 s + 2 + WG]``, permuted: M-major) and the
        shared x tile ``b_bufs[s]``; else (dW down): this warpgroup's dO half ``a_bufs[2 s + WG]`` and the two hw
        boxes ``b_bufs[2 s]``, ``[2 s + 1]``. Returns (acc0, acc1, it)."""
        for r0 in range(lo, hi, BLOCK_K):
            slot = it % STAGES
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            fence_async_shared()  # cp.async wrote the gathered rows through the generic proxy (see _gate_up_consumer)
            if SHARED_B:
                a0 = a_bufs.index(4 * slot + WG).permute((1, 0))
                a1 = a_bufs.index(4 * slot + 2 + WG).permute((1, 0))
                b0 = b_bufs.index(slot)
                b1 = b0
            else:
                a0 = a_bufs.index(2 * slot + WG).permute((1, 0))
                a1 = a0
                b0 = b_bufs.index(2 * slot)
                b1 = b_bufs.index(2 * slot + 1)
            acc0 = warpgroup_mma(a0, b0, acc0, is_async=True)
            acc1 = warpgroup_mma(a1, b1, acc1, is_async=True)
            acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))  # the previous step's pair is done
            if r0 > lo:
                _release(empty.index((it + STAGES - 1) % STAGES))
            it += 1
        acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        _release(empty.index((it + STAGES - 1) % STAGES), pred=hi > lo)
        return acc0, acc1, it

    @gluon.jit
    def _dw_producer(a_desc, X, a_bufs, b_bufs, ready, empty, SORTED_TOK, OFFSETS, NB, D, stride_xt,
                     BS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Four warps: per work item and K step, the four dact boxes by TMA and the gathered x rows by cp.async."""
        N_M: gl.constexpr = (BS + 127) // 128
        HALF: gl.constexpr = 64
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])  # 8 rows x 128 columns per pass
        row_l: gl.constexpr = gl.SliceLayout(1, ld_layout)
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, ld_layout))
        a_bytes: gl.constexpr = 4 * a_desc.block_type.nbytes
        n_d = gl.cdiv(D, BLOCK_N)
        total = NB * n_d * N_M
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, pid_m, lo, hi = _dw_work(t, n_d, N_M, OFFSETS)
            n0 = pid_m * 128
            kc = gl.expand_dims(pid_d * BLOCK_N + cols, 0)
            k_ok = kc < D
            ok, tok = _row_ids(SORTED_TOK, lo, hi, BLOCK_K, row_l)
            for r0 in range(lo, hi, BLOCK_K):
                # the next step's row ids, in flight while this step waits for its slot (session 31's form loaded
                # them here and waited on the load before each step's copies: 388 TF/s)
                ok_n, tok_n = _row_ids(SORTED_TOK, r0 + BLOCK_K, hi, BLOCK_K, row_l)
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, a_bytes)
                tma.async_copy_global_to_shared(a_desc, [r0, n0], bar, a_bufs.index(4 * slot))
                tma.async_copy_global_to_shared(a_desc, [r0, n0 + HALF], bar, a_bufs.index(4 * slot + 1))
                tma.async_copy_global_to_shared(a_desc, [r0, BS + n0], bar, a_bufs.index(4 * slot + 2))
                tma.async_copy_global_to_shared(a_desc, [r0, BS + n0 + HALF], bar, a_bufs.index(4 * slot + 3))
                xr = X + gl.expand_dims(tok.to(gl.int64) * stride_xt, 1)
                async_copy.async_copy_global_to_shared(b_bufs.index(slot), xr + kc, mask=gl.expand_dims(ok, 1) & k_ok)
                async_copy.mbarrier_arrive(bar, increment_count=False)
                ok, tok = ok_n, tok_n
                it += 1

    @gluon.jit
    def _dw_consumer(a_bufs, b_bufs, ready, empty, DWG, DWU, OFFSETS, NB, D, stride_wf, WG: gl.constexpr,
                     BS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: neurons [WG * 64, + 64) of every work item's 128, both products as async wgmma (one
        step's pair in flight), then dW_gate and dW_up stored for the block's neurons (zeros for an empty block)."""
        N_M: gl.constexpr = (BS + 127) // 128
        HALF: gl.constexpr = 64
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        n_d = gl.cdiv(D, BLOCK_N)
        total = NB * n_d * N_M
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, pid_m, lo, hi = _dw_work(t, n_d, N_M, OFFSETS)
            acc_g = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
            acc_u = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
            acc_g, acc_u, it = _dw_k_loop(a_bufs, b_bufs, ready, empty, lo, hi, it, acc_g, acc_u, WG, True, BLOCK_K,
                                          STAGES)
            neurons = pid_m * 128 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_layout))
            cols = pid_d * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
            mask = gl.expand_dims(neurons < BS, 1) & gl.expand_dims(cols < D, 0)
            off = gl.expand_dims((b * BS + neurons).to(gl.int64) * stride_wf, 1) + gl.expand_dims(cols, 0)
            gl.store(DWG + off, gl.convert_layout(acc_g.to(DWG.dtype.element_ty), out_layout), mask=mask)
            gl.store(DWU + off, gl.convert_layout(acc_u.to(DWU.dtype.element_ty), out_layout), mask=mask)

    @gluon.jit
    def _dw_consumer1(a_bufs, b_bufs, ready, empty, DWG, DWU, OFFSETS, NB, D, stride_wf, BS: gl.constexpr,
                      BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        WG1: gl.constexpr = 1
        _dw_consumer(a_bufs, b_bufs, ready, empty, DWG, DWU, OFFSETS, NB, D, stride_wf, WG1, BS, BLOCK_N, BLOCK_K,
                     STAGES)

    @gluon.jit
    def _dw_gate_up_sm90_kernel(a_desc, X, DWG, DWU, SORTED_TOK, OFFSETS, NB, D, stride_xt, stride_wf,
                                BS: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                                CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """The backward's dW gate/up (see above) over every (block, d tile, neuron tile), persistent."""
        WG0: gl.constexpr = 0
        BLOCK_K: gl.constexpr = a_desc.block_type.shape[0]
        b_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, BLOCK_N], X.dtype.element_ty)
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [4 * STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(X.dtype.element_ty, [STAGES, BLOCK_K, BLOCK_N], b_layout)
        ready = _barrier_array(STAGES, 1 + 4 * 32)  # the dact boxes' expect + one cp.async arrival per producer thread
        empty = _barrier_array(STAGES, 2)
        gl.warp_specialize([
            (_dw_consumer, (a_bufs, b_bufs, ready, empty, DWG, DWU, OFFSETS, NB, D, stride_wf, WG0, BS, BLOCK_N,
                            BLOCK_K, STAGES)),
            (_dw_consumer1, (a_bufs, b_bufs, ready, empty, DWG, DWU, OFFSETS, NB, D, stride_wf, BS, BLOCK_N,
                             BLOCK_K, STAGES)),
            (_dw_producer, (a_desc, X, a_bufs, b_bufs, ready, empty, SORTED_TOK, OFFSETS, NB, D, stride_xt, BS,
                            BLOCK_N, BLOCK_K, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def dw_gate_up_layout_ok(dact: torch.Tensor, x: torch.Tensor, dwg: torch.Tensor, dwu: torch.Tensor) -> bool:
    """The gathered dW gate/up kernel's layout needs: dact [P, 2, BS] contiguous with 16-byte aligned rows (TMA
    boxes of its [P, 2 BS] view), x with unit stride along D and 16-byte aligned rows and base (cp.async), dW gate
    and dW up with unit inner stride and the same strides."""
    es = x.element_size()
    return (dact.is_contiguous() and (dact.shape[1] * dact.shape[2] * es) % 16 == 0 and dact.data_ptr() % 16 == 0
            and x.stride(1) == 1 and (x.stride(0) * es) % 16 == 0 and x.data_ptr() % 16 == 0
            and dwg.stride(1) == 1 and dwu.stride() == dwg.stride() and dact.dtype == x.dtype)


def dw_gate_up_sm90(dact: torch.Tensor, x: torch.Tensor, dwg: torch.Tensor, dwu: torch.Tensor, grouping,
                    n_blocks: int, *, block_n: int, block_k: int, stages: int) -> None:
    """``dwg / dwu [F, D]`` from ``dact [P, 2, BS]`` and the gathered rows of ``x [T, D]`` (the caller checked
    :func:`supported` and :func:`dw_gate_up_layout_ok`)."""
    P, _, bs = dact.shape
    D = x.shape[1]
    total = n_blocks * -(-D // block_n) * -(-bs // 128)
    _dw_gate_up_sm90_kernel[(min(sm_count(x.device), total),)](
        _desc(dact.view(P, 2 * bs), [block_k, 64]), x, dwg, dwu, grouping.sorted_tok, grouping.offsets, n_blocks, D,
        x.stride(0), dwg.stride(0), BS=bs, BLOCK_N=block_n, STAGES=stages, CONSUMER_REGS=GATHER_CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG,
    )


# ---- the backward's dW down with gathered dO rows along K (``dw_down.sm90``, the T >= 4096 default on sm_90, session
# 31: H200, T8192 ratio 0.3, 0.70 ms (415 TF/s) vs the Triton kernel's 0.80) ----------------------------------------
#
# dW_down[d, b*BS + n] = sum over the rows p of block b of dO[tok_p, d] hw[p, n], as _sparse_ffn_bwd_dw_down_kernel
# computes it. Work items are (block, 128-column d tile); K runs over the block's rows. Per K step the producer
# gathers the dO rows' two 64-column halves by cp.async ([BLOCK_K, 64] each, one per consumer warpgroup: its M-major
# A operand, permuted) and brings hw [BLOCK_K, 128] twice by TMA (the block's neurons 0-127 and 128-255: columns past
# BS read zeros; rows past the block's end read the next block's rows, which meet zero dO rows); each consumer
# warpgroup keeps two [64, 128] accumulators (224 = 128 + 96 neurons stored).

DW_DOWN_CONFIG = dict(block_k=64, stages=4)

if HAVE_GLUON:

    @gluon.jit
    def _gather_halves(X, a_bufs, slot, bar, tok, r_ok, c0, c1, stride_xt, D):
        """The rows ``tok`` of X (where ``r_ok``; zeros elsewhere) at columns c0 and c1 (its two 64-column halves)
        into slot ``slot``'s two A buffers by cp.async; every producer thread arrives on ``bar`` once its copies
        land."""
        ok = gl.expand_dims(r_ok, 1)
        xr = X + gl.expand_dims(tok.to(gl.int64) * stride_xt, 1)
        async_copy.async_copy_global_to_shared(a_bufs.index(2 * slot), xr + c0, mask=ok & (c0 < D))
        async_copy.async_copy_global_to_shared(a_bufs.index(2 * slot + 1), xr + c1, mask=ok & (c1 < D))
        async_copy.mbarrier_arrive(bar, increment_count=False)

    @gluon.jit
    def _dwd_producer(hw_desc, DO, a_bufs, b_bufs, ready, empty, SORTED_TOK, OFFSETS, NB, D, stride_dot,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Four warps: per work item and K step, the gathered dO halves by cp.async and the two hw boxes by TMA."""
        HALF: gl.constexpr = 64
        BLOCK_N: gl.constexpr = hw_desc.block_type.shape[1]
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16 rows x 64 columns per pass
        row_l: gl.constexpr = gl.SliceLayout(1, ld_layout)
        cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, ld_layout))
        b_bytes: gl.constexpr = 2 * hw_desc.block_type.nbytes
        n_d = gl.cdiv(D, 2 * HALF)
        total = NB * n_d
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, _, lo, hi = _dw_work(t, n_d, 1, OFFSETS)
            c0 = gl.expand_dims(pid_d * 2 * HALF + cols, 0)
            c1 = c0 + HALF
            r_ok, tok = _row_ids(SORTED_TOK, lo, hi, BLOCK_K, row_l)
            for r0 in range(lo, hi, BLOCK_K):
                r_ok_n, tok_n = _row_ids(SORTED_TOK, r0 + BLOCK_K, hi, BLOCK_K, row_l)  # as in _dw_producer
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, b_bytes)
                tma.async_copy_global_to_shared(hw_desc, [r0, 0], bar, b_bufs.index(2 * slot))
                tma.async_copy_global_to_shared(hw_desc, [r0, BLOCK_N], bar, b_bufs.index(2 * slot + 1))
                _gather_halves(DO, a_bufs, slot, bar, tok, r_ok, c0, c1, stride_dot, D)
                r_ok, tok = r_ok_n, tok_n
                it += 1

    @gluon.jit
    def _dwd_consumer(a_bufs, b_bufs, ready, empty, DWD, OFFSETS, NB, D, stride_wd, WG: gl.constexpr,
                      BS: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: d columns [WG * 64, + 64) of every work item's 128, the block's neurons as two 128-wide
        async wgmma products (one step's pair in flight), then dW_down stored (zeros for an empty block)."""
        HALF: gl.constexpr = 64
        BLOCK_N: gl.constexpr = b_bufs.type.shape[2]
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        out_layout: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [4, 1], [1, 0])
        n_d = gl.cdiv(D, 2 * HALF)
        total = NB * n_d
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, _, lo, hi = _dw_work(t, n_d, 1, OFFSETS)
            acc0 = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
            acc1 = gl.zeros([HALF, BLOCK_N], gl.float32, acc_layout)
            acc0, acc1, it = _dw_k_loop(a_bufs, b_bufs, ready, empty, lo, hi, it, acc0, acc1, WG, False, BLOCK_K,
                                        STAGES)
            d = pid_d * 2 * HALF + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, out_layout))
            n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, out_layout))
            d_ok = gl.expand_dims(d < D, 1)
            off = gl.expand_dims(d.to(gl.int64) * stride_wd, 1) + gl.expand_dims(b * BS + n, 0)
            dt = DWD.dtype.element_ty
            gl.store(DWD + off, gl.convert_layout(acc0.to(dt), out_layout), mask=d_ok & gl.expand_dims(n < BS, 0))
            gl.store(DWD + off + BLOCK_N, gl.convert_layout(acc1.to(dt), out_layout),
                     mask=d_ok & gl.expand_dims(n + BLOCK_N < BS, 0))

    @gluon.jit
    def _dwd_consumer1(a_bufs, b_bufs, ready, empty, DWD, OFFSETS, NB, D, stride_wd, BS: gl.constexpr,
                       BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        WG1: gl.constexpr = 1
        _dwd_consumer(a_bufs, b_bufs, ready, empty, DWD, OFFSETS, NB, D, stride_wd, WG1, BS, BLOCK_K, STAGES)

    @gluon.jit
    def _dw_down_sm90_kernel(hw_desc, DO, DWD, SORTED_TOK, OFFSETS, NB, D, stride_dot, stride_wd, BS: gl.constexpr,
                             STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr):
        """The backward's dW down (see above) over every (block, d tile), persistent."""
        WG0: gl.constexpr = 0
        BLOCK_K: gl.constexpr = hw_desc.block_type.shape[0]
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, 64], DO.dtype.element_ty)
        a_bufs = gl.allocate_shared_memory(DO.dtype.element_ty, [2 * STAGES, BLOCK_K, 64], a_layout)
        b_bufs = gl.allocate_shared_memory(hw_desc.dtype, [2 * STAGES] + hw_desc.block_type.shape, hw_desc.layout)
        ready = _barrier_array(STAGES, 1 + 4 * 32)  # the hw boxes' expect + one cp.async arrival per producer thread
        empty = _barrier_array(STAGES, 2)
        gl.warp_specialize([
            (_dwd_consumer, (a_bufs, b_bufs, ready, empty, DWD, OFFSETS, NB, D, stride_wd, WG0, BS, BLOCK_K,
                             STAGES)),
            (_dwd_consumer1, (a_bufs, b_bufs, ready, empty, DWD, OFFSETS, NB, D, stride_wd, BS, BLOCK_K, STAGES)),
            (_dwd_producer, (hw_desc, DO, a_bufs, b_bufs, ready, empty, SORTED_TOK, OFFSETS, NB, D, stride_dot,
                             BLOCK_K, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def dw_down_layout_ok(grad_out: torch.Tensor, hw: torch.Tensor, dwd: torch.Tensor) -> bool:
    """The gathered dW down kernel's layout needs: grad_out with unit stride along D and 16-byte aligned rows and
    base (cp.async), hw [P, BS] contiguous with 16-byte rows (TMA), BS <= 256 (two 128-neuron boxes), dW down with
    unit inner stride."""
    es = grad_out.element_size()
    return (grad_out.stride(1) == 1 and (grad_out.stride(0) * es) % 16 == 0 and grad_out.data_ptr() % 16 == 0
            and hw.is_contiguous() and (hw.shape[1] * es) % 16 == 0 and hw.data_ptr() % 16 == 0
            and hw.shape[1] <= 256 and dwd.stride(1) == 1 and hw.dtype == grad_out.dtype)


def dw_down_sm90(grad_out: torch.Tensor, hw: torch.Tensor, dwd: torch.Tensor, grouping, n_blocks: int, *,
                 block_k: int, stages: int) -> None:
    """``dwd [D, F]`` from the gathered rows of ``grad_out [T, D]`` and ``hw [P, BS]`` (the caller checked
    :func:`supported` and :func:`dw_down_layout_ok`)."""
    bs = hw.shape[1]
    D = grad_out.shape[1]
    total = n_blocks * -(-D // 128)
    _dw_down_sm90_kernel[(min(sm_count(grad_out.device), total),)](
        _desc(hw, [block_k, 128]), grad_out, dwd, grouping.sorted_tok, grouping.offsets, n_blocks, D,
        grad_out.stride(0), dwd.stride(0), BS=bs, STAGES=stages, CONSUMER_REGS=GATHER_CONSUMER_REGS,
        PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG,
    )


# ---- the dW kernels with the block's neurons on N in power-of-2 pieces (``dw_gate_up.pieces`` / ``dw_down.pieces``,
# the default where dw_pieces_ok; session 32, first run in session 33: H200, T8192 ratio 0.3, backward 3.91 -> 3.66 ms) --
#
# Both kernels above compute 256 neuron columns for a block's 224 (dW gate/up: its second 128-neuron tile holds 96;
# dW down: its second 128-wide hw box past BS reads zeros): 12.5 % of their MMA work. Gluon's tensors have
# power-of-2 shapes, so a block's BS neurons go on N as up to three products of N0 + N1 + N2 = BS (``k_pieces``:
# 224 = 128 + 64 + 32), with the model columns on M: work items (block, 128-column d tile, product q), the products
# of a d tile consecutive (dW gate/up: q = gate, up; they share the gathered rows, the second from L2; dW down:
# one). Per K step the producer gathers the rows' two 64-column halves (one per consumer warpgroup: its M-major A
# operand, as in the dW down kernel above) and brings the product's B operand (dact viewed as [P, 2 BS] at columns
# q * BS + piece, or hw [P, BS]) as up to three TMA boxes; each consumer keeps three accumulators [64, N_i]
# (64 + 32 + 16 registers per thread at 224, fewer than the 128 of the two-tile forms). dW gate/up is stored
# transposed (its rows are neurons). Rows past a block's end: as above (zeros in the gathered rows; the empty
# slots' rows after the last block zeroed by the caller).

DW_PIECES_CONFIG = dict(block_k=64, stages=4)  # dW down's (5 slots do not fit beside its store's scratch)
# dW gate/up's (the launcher trims the ring to what fits: dw_pieces_stages). H200, session 37 (call 8, whole
# backward A/Bs, same bits): 5 slots 3.643 -> 3.624 ms at ratio 0.3, 5.909 -> 5.848 at 0.5; K steps of 128 with 2
# slots 3.490 -> 4.222 (slower). 5 slots stay off until the dW GPU tests have run with them (the budget ran out).
DW_PIECES_GU_CONFIG = dict(block_k=64, stages=4)

if HAVE_GLUON:

    @gluon.jit
    def _dwp_producer(bd0, bd1, bd2, X, a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, SORTED_TOK, OFFSETS, NB, D,
                      stride_xt, BS: gl.constexpr, N_PROD: gl.constexpr, NP: gl.constexpr, B_BYTES: gl.constexpr,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """Four warps: per work item and K step, the gathered rows' two 64-column halves by cp.async and the
        product's NP B boxes by TMA."""
        HALF: gl.constexpr = 64
        N0: gl.constexpr = bd0.block_type.shape[1]
        N1: gl.constexpr = bd1.block_type.shape[1]
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])  # 16 rows x 64 columns per pass
        row_l: gl.constexpr = gl.SliceLayout(1, ld_layout)
        cols = gl.arange(0, HALF, layout=gl.SliceLayout(0, ld_layout))
        n_d = gl.cdiv(D, 2 * HALF)
        total = NB * n_d * N_PROD
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, q, lo, hi = _dw_work(t, n_d, N_PROD, OFFSETS)
            c0 = gl.expand_dims(pid_d * 2 * HALF + cols, 0)
            c1 = c0 + HALF
            col = q * BS  # the product's first column of the B tensor
            r_ok, tok = _row_ids(SORTED_TOK, lo, hi, BLOCK_K, row_l)
            for r0 in range(lo, hi, BLOCK_K):
                r_ok_n, tok_n = _row_ids(SORTED_TOK, r0 + BLOCK_K, hi, BLOCK_K, row_l)  # as in _dw_producer
                slot = it % STAGES
                mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(slot)
                mbarrier.expect(bar, B_BYTES)  # the NP boxes' bytes
                tma.async_copy_global_to_shared(bd0, [r0, col], bar, b0_bufs.index(slot))
                if NP > 1:
                    tma.async_copy_global_to_shared(bd1, [r0, col + N0], bar, b1_bufs.index(slot))
                if NP > 2:
                    tma.async_copy_global_to_shared(bd2, [r0, col + N0 + N1], bar, b2_bufs.index(slot))
                _gather_halves(X, a_bufs, slot, bar, tok, r_ok, c0, c1, stride_xt, D)
                r_ok, tok = r_ok_n, tok_n
                it += 1

    @gluon.jit
    def _dwp_k_loop(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, lo, hi, it, acc0, acc1, acc2, WG: gl.constexpr,
                    NP: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """A consumer's K loop over the block's rows [lo, hi): per step NP async wgmma (this warpgroup's 64 model
        columns, M-major, times each B piece), one step's products in flight, each slot released once the
        products that read it are done. Returns (acc0, acc1, acc2, it)."""
        for r0 in range(lo, hi, BLOCK_K):
            slot = it % STAGES
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            fence_async_shared()  # cp.async wrote the gathered rows through the generic proxy (see _gate_up_consumer)
            a = a_bufs.index(2 * slot + WG).permute((1, 0))
            acc0 = warpgroup_mma(a, b0_bufs.index(slot), acc0, is_async=True)
            if NP == 1:
                acc0 = warpgroup_mma_wait(1, deps=(acc0,))
            elif NP == 2:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot), acc1, is_async=True)
                acc0, acc1 = warpgroup_mma_wait(2, deps=(acc0, acc1))
            else:
                acc1 = warpgroup_mma(a, b1_bufs.index(slot), acc1, is_async=True)
                acc2 = warpgroup_mma(a, b2_bufs.index(slot), acc2, is_async=True)
                acc0, acc1, acc2 = warpgroup_mma_wait(3, deps=(acc0, acc1, acc2))
            if r0 > lo:
                _release(empty.index((it + STAGES - 1) % STAGES))
            it += 1
        if NP == 1:
            acc0 = warpgroup_mma_wait(0, deps=(acc0,))
        elif NP == 2:
            acc0, acc1 = warpgroup_mma_wait(0, deps=(acc0, acc1))
        else:
            acc0, acc1, acc2 = warpgroup_mma_wait(0, deps=(acc0, acc1, acc2))
        _release(empty.index((it + STAGES - 1) % STAGES), pred=hi > lo)
        return acc0, acc1, acc2, it

    @gluon.jit
    def _dwp_store(acc, DW, b, d0, n0, D, stride_w, BS: gl.constexpr, TRANSPOSED: gl.constexpr):
        """acc [64, N]: model columns d0 +: 64 by block b's neurons n0 +: N, into DW [D, F] at [d, b BS + n]
        (dW down), or TRANSPOSED into DW [F, D] at [b BS + n, d] (dW gate / up)."""
        N: gl.constexpr = acc.type.shape[1]
        t_layout: gl.constexpr = gl.BlockedLayout([8, 1], [8, 4], [1, 4], [0, 1])  # 8 consecutive model columns
        n_layout: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])  # 8 consecutive neurons
        if TRANSPOSED:
            v = gl.convert_layout(acc.to(DW.dtype.element_ty), t_layout)
            d = d0 + gl.arange(0, 64, layout=gl.SliceLayout(1, t_layout))
            f = b * BS + n0 + gl.arange(0, N, layout=gl.SliceLayout(0, t_layout))
            mask = gl.expand_dims(d < D, 1) & gl.expand_dims(f < (b + 1) * BS, 0)
            gl.store(DW + gl.expand_dims(d, 1) + gl.expand_dims(f.to(gl.int64) * stride_w, 0), v, mask=mask)
        else:
            v = gl.convert_layout(acc.to(DW.dtype.element_ty), n_layout)
            d = d0 + gl.arange(0, 64, layout=gl.SliceLayout(1, n_layout))
            f = b * BS + n0 + gl.arange(0, N, layout=gl.SliceLayout(0, n_layout))
            mask = gl.expand_dims(d < D, 1) & gl.expand_dims(f < (b + 1) * BS, 0)
            gl.store(DW + gl.expand_dims(d.to(gl.int64) * stride_w, 1) + gl.expand_dims(f, 0), v, mask=mask)

    @gluon.jit
    def _dwp_store_pieces(acc0, acc1, acc2, DW, b, d0, D, stride_w, BS: gl.constexpr, NP: gl.constexpr,
                          TRANSPOSED: gl.constexpr):
        """The NP piece accumulators (neurons 0 +: N0, N0 +: N1, N0 + N1 +: N2) through :func:`_dwp_store`."""
        N0: gl.constexpr = acc0.type.shape[1]
        N1: gl.constexpr = acc1.type.shape[1]
        _dwp_store(acc0, DW, b, d0, 0, D, stride_w, BS, TRANSPOSED)
        if NP > 1:
            _dwp_store(acc1, DW, b, d0, N0, D, stride_w, BS, TRANSPOSED)
        if NP > 2:
            _dwp_store(acc2, DW, b, d0, N0 + N1, D, stride_w, BS, TRANSPOSED)

    @gluon.jit
    def _dwp_consumer(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, DW0, DW1, OFFSETS, NB, D, stride_w,
                      WG: gl.constexpr, BS: gl.constexpr, N_PROD: gl.constexpr, NP: gl.constexpr,
                      TRANSPOSED: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """One warpgroup: model columns [WG * 64, + 64) of every work item's 128, the NP products as async wgmma,
        then the piece accumulators stored into DW0 (q = 0) or DW1 (q = 1); zeros for an empty block."""
        HALF: gl.constexpr = 64
        N0: gl.constexpr = b0_bufs.type.shape[2]
        N1: gl.constexpr = b1_bufs.type.shape[2]
        N2: gl.constexpr = b2_bufs.type.shape[2]
        l0: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N0, 16])
        l1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N1, 16])
        l2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, N2, 16])
        n_d = gl.cdiv(D, 2 * HALF)
        total = NB * n_d * N_PROD
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            b, pid_d, q, lo, hi = _dw_work(t, n_d, N_PROD, OFFSETS)
            acc0 = gl.zeros([HALF, N0], gl.float32, l0)
            acc1 = gl.zeros([HALF, N1], gl.float32, l1)
            acc2 = gl.zeros([HALF, N2], gl.float32, l2)
            acc0, acc1, acc2, it = _dwp_k_loop(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, lo, hi, it, acc0, acc1,
                                               acc2, WG, NP, BLOCK_K, STAGES)
            d0 = pid_d * 2 * HALF + WG * HALF
            if q == 0:
                _dwp_store_pieces(acc0, acc1, acc2, DW0, b, d0, D, stride_w, BS, NP, TRANSPOSED)
            else:
                _dwp_store_pieces(acc0, acc1, acc2, DW1, b, d0, D, stride_w, BS, NP, TRANSPOSED)

    @gluon.jit
    def _dwp_consumer1(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, DW0, DW1, OFFSETS, NB, D, stride_w,
                       BS: gl.constexpr, N_PROD: gl.constexpr, NP: gl.constexpr, TRANSPOSED: gl.constexpr,
                       BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        WG1: gl.constexpr = 1
        _dwp_consumer(a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, DW0, DW1, OFFSETS, NB, D, stride_w, WG1, BS,
                      N_PROD, NP, TRANSPOSED, BLOCK_K, STAGES)

    @gluon.jit
    def _dw_pieces_sm90_kernel(bd0, bd1, bd2, X, DW0, DW1, SORTED_TOK, OFFSETS, NB, D, stride_xt, stride_w,
                               BS: gl.constexpr, N_PROD: gl.constexpr, NP: gl.constexpr, B_BYTES: gl.constexpr,
                               TRANSPOSED: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                               PRODUCER_REGS: gl.constexpr):
        """dW gate/up (N_PROD 2, TRANSPOSED) or dW down (N_PROD 1) over every (block, d tile, product), the
        block's neurons as NP pieces on N (see above), persistent."""
        WG0: gl.constexpr = 0
        BLOCK_K: gl.constexpr = bd0.block_type.shape[0]
        a_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_K, 64], X.dtype.element_ty)
        a_bufs = gl.allocate_shared_memory(X.dtype.element_ty, [2 * STAGES, BLOCK_K, 64], a_layout)
        b0_bufs = gl.allocate_shared_memory(bd0.dtype, [STAGES] + bd0.block_type.shape, bd0.layout)
        b1_bufs = gl.allocate_shared_memory(bd1.dtype, [STAGES] + bd1.block_type.shape, bd1.layout)
        b2_bufs = gl.allocate_shared_memory(bd2.dtype, [STAGES] + bd2.block_type.shape, bd2.layout)
        ready = _barrier_array(STAGES, 1 + 4 * 32)  # the B boxes' expect + one cp.async arrival per producer thread
        empty = _barrier_array(STAGES, 2)
        gl.warp_specialize([
            (_dwp_consumer, (a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, DW0, DW1, OFFSETS, NB, D, stride_w, WG0,
                             BS, N_PROD, NP, TRANSPOSED, BLOCK_K, STAGES)),
            (_dwp_consumer1, (a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, DW0, DW1, OFFSETS, NB, D, stride_w, BS,
                              N_PROD, NP, TRANSPOSED, BLOCK_K, STAGES)),
            (_dwp_producer, (bd0, bd1, bd2, X, a_bufs, b0_bufs, b1_bufs, b2_bufs, ready, empty, SORTED_TOK, OFFSETS,
                             NB, D, stride_xt, BS, N_PROD, NP, B_BYTES, BLOCK_K, STAGES)),
        ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])


def dw_pieces_ok(bs: int) -> bool:
    """Whether the pieces kernel covers blocks of ``bs`` neurons: up to three power-of-2 pieces of 16 to 256."""
    from deepseek_kernels.triton.sparse_ffn import k_pieces

    pieces = k_pieces(bs)
    return pieces is not None and max(pieces) <= 256


def dw_pieces_stages(bs: int, block_k: int, stages: int, transposed: bool) -> int:
    """The pieces kernel's ring depth: ``stages`` or fewer, so that the slots (128 gathered model columns and the
    block's ``bs`` neurons, ``block_k`` rows each, 2-byte values) fit in shared memory beside the store's
    layout-conversion scratch (4 KB transposed, 8 KB not: the AOT check at BS 32-256, Triton 3.6) and the
    barriers."""
    scratch = 4096 if transposed else 8192
    return ring_stages(stages, block_k * (128 + bs) * 2 + 64, scratch + 64)


def dw_pieces_sm90(b_src: torch.Tensor, rows_src: torch.Tensor, dw0: torch.Tensor, dw1: torch.Tensor, grouping,
                   n_blocks: int, *, bs: int, n_prod: int, transposed: bool, block_k: int, stages: int) -> None:
    """dW gate/up (``b_src`` = dact viewed as [P, 2 BS], ``rows_src`` = x, ``n_prod`` 2, ``transposed``: dw0 / dw1
    = dW gate / dW up [F, D]) or dW down (``b_src`` = hw [P, BS], ``rows_src`` = grad_out, ``n_prod`` 1: dw0 = dw1
    = dW down [D, F]) by :func:`_dw_pieces_sm90_kernel` (the caller checked :func:`supported`, the layouts as for
    the two-tile kernels, and :func:`dw_pieces_ok`)."""
    from deepseek_kernels.triton.sparse_ffn import k_pieces

    pieces = [n for n in k_pieces(bs) if n]
    np_ = len(pieces)
    boxes = pieces + [16] * (3 - np_)  # an absent piece: a small descriptor (and ring) the kernel never loads
    D = rows_src.shape[1]
    total = n_blocks * -(-D // 128) * n_prod
    stages = dw_pieces_stages(bs, block_k, stages, transposed)
    _dw_pieces_sm90_kernel[(min(sm_count(rows_src.device), total),)](
        _desc(b_src, [block_k, boxes[0]]), _desc(b_src, [block_k, boxes[1]]), _desc(b_src, [block_k, boxes[2]]),
        rows_src, dw0, dw1, grouping.sorted_tok, grouping.offsets, n_blocks, D, rows_src.stride(0), dw0.stride(0),
        BS=bs, N_PROD=n_prod, NP=np_, B_BYTES=block_k * bs * b_src.element_size(), TRANSPOSED=transposed,
        STAGES=stages, CONSUMER_REGS=GATHER_CONSUMER_REGS, PRODUCER_REGS=PRODUCER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
