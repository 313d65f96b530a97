"""Hopper (sm_90) forward of the causal sliding-window attention, written in Gluon (Triton's
explicit-layout dialect), for the dense layout ``q [B, S, Hq, D]``, ``k, v [B, S, Hkv, D]``.

Same function as ``_window_attn_fwd_kernel`` in ``window_attention.py`` (semantics in
``deepseek_kernels/reference/attention.py``); what differs is how the H200 runs it:

- a producer warp issues every load through TMA: the query tile once (one half per consumer), then
  each key tile's K and V into a ring of ``STAGES`` shared-memory slots, each with a ready and an
  empty mbarrier, so loads run ahead of the math without the consumers issuing anything;
- two consumer warpgroups (4 warps each, 64 query rows each, separate partitions) run the two
  products as asynchronous wgmma and overlap them across tiles: the scores of tile ``i``
  (``Q K_i^T``, both operands in shared memory) and the update ``O += P_{i-1} V_{i-1}`` (``P`` from
  registers) are issued back to back, and the softmax of tile ``i`` runs on the CUDA cores while the
  tensor cores do the update. The warpgroups release a slot separately (empty barriers count two
  arrivals), so neither waits for the other's softmax; with ``PINGPONG`` they also take turns to
  issue their products (two mbarriers passed back and forth), so one's softmax runs under the
  other's products (FlashAttention-3's schedule). The Triton forward can express neither overlap;
- descriptors are 3-D (``[B, S, H * D]``), so a tile that runs past the end of a sequence reads
  zeros from the hardware, never the next sequence's rows, and the output tile is written through
  a TMA store that clips the rows past the end.

Key tiles are visited as in the Triton forward: the sink tiles before the window, then the window;
only tiles on the diagonal, on the window's far edge or among the sinks evaluate the mask. By default a
program handles one query tile; where the window is short (``PERSISTENT_MAX_WINDOW``) one program per SM
loops over the tiles (the producer loading the next tile during the current one's epilogue). Each head's
last query tile goes first, and a row's running max moves only when a tile's exceeds it by more than
``RESCALE`` (log2 units), so most tiles skip rescaling the output.

``supported()`` says which calls take this path (the op falls back to the Triton forward for the
rest: packed varlen, ``causal=False``, ``Sq != Sk``, head dims other than 64 / 128, float32,
GPUs other than sm_90).
"""

import functools

import torch
import triton

from deepseek_kernels.triton._common import sm_count

try:  # Gluon's Hopper API (Triton >= 3.5); absent on older Tritons and CPU-only builds
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_init,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    # the partition-wide barrier: gl.thread_barrier on Triton 3.6 (the H200's), gl.barrier from 3.8
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, STAGES) per head dim: two 4-warp consumer partitions (64 query rows each) and a 1-warp
# producer. Shared memory: the Q tile + STAGES x (K + V) tiles = 32 + 2 x 64 KB at D=128, 16 + 3 x 32 KB at D=64.
# H200, session 24 (S8192 B4 W4096): 128x128 tiles ~15 % faster than 128x64; 3 stages at D=128 (224 KB) tie 2.
CONFIG = {64: (128, 128, 3), 128: (128, 128, 2)}
MAXNREG = 168  # 3 warpgroups x 128 threads x 168 <= 64K registers: the producer's keeps 24, the consumers 240
CONSUMER_REGS = 240
PINGPONG = True  # the consumers take turns issuing their products: +1-3 % on the forward
# One program per SM looping over the tiles (the producer loads the next tile's Q / K / V during the current one's
# epilogue) where the window spans at most PERSISTENT_MAX_WINDOW keys: there a tile is short (9 key tiles at
# W1024) and its prologue / epilogue weigh. H200, session 27 (two readings each, same process): S32768 W1024
# 1.150 / 1.142 vs 1.209 / 1.222 ms, S131072 W1024 4.69 / 4.62 vs 4.99 / 4.96, S8192 B4 W1024 1.125 / 1.126 vs
# 1.093 / 1.176 (a tie); at W4096 it lost (S8192 2.99 / 3.03 vs 2.82 / 2.91, S131072 16.5 / 14.9 vs 14.9 / 14.8).
PERSISTENT_MAX_WINDOW = 1024

# Conditional rescale (FlashAttention-4): a row's running max moves only when a tile's exceeds it by more than
# RESCALE (log2 units; p stays below 2^RESCALE, well inside bf16 / fp16), so most tiles skip acc *= alpha;
# 0 = the max follows every tile. REVERSE: the last query tile of each head first (the longest tiles start first,
# the short ones of the window's ramp fill the last wave). H200, session 27 (two readings each, same process):
# both together 2.88 vs 2.99 ms at S8192 B4 W4096, 3.53 vs 3.71 at S32768 W4096, 3.53 vs 3.65 GQA 32/8, 15.16 vs
# 16.17 at S131072; either alone was within the noise of the default.
RESCALE = 8.0
REVERSE = True


def use_persistent(window: int, seq_len: int) -> bool:
    """The forward's default grid: persistent where the keys a query sees (window, at most the sequence) are few."""
    return min(window, seq_len) <= PERSISTENT_MAX_WINDOW


def supported(q, k, v, *, causal: bool, cu_seqlens_q, cu_seqlens_k) -> bool:
    """Whether :func:`window_attention_fwd_sm90` handles this call (else the Triton forward does)."""
    if not (HAVE_GLUON and q.is_cuda and causal and cu_seqlens_q is None and cu_seqlens_k is None):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.dim() != 4 or q.shape[1] != k.shape[1]:
        return False
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return False
    B, S, Hq, D = q.shape
    # the kernels index rows and lse in int32; a grid's second axis holds at most 65535 (batch x head) programs
    if D not in CONFIG or S == 0 or B * S * Hq >= 2**31 or B * Hq > 65535:
        return False
    return all(_tma_layout_ok(t) for t in (q, k, v))


@functools.lru_cache(maxsize=None)
def _capability(index: int):
    return torch.cuda.get_device_capability(index)



def _tma_layout_ok(t: torch.Tensor) -> bool:
    """The ``[B, S, H * D]`` view a 3-D descriptor needs: heads and head dim contiguous, 16-byte aligned
    outer strides. (The base address is checked at launch: tracing under torch.compile has no addresses.)"""
    es = t.element_size()
    return t.stride(3) == 1 and t.stride(2) == t.shape[3] and (t.stride(1) * es) % 16 == 0 and (t.stride(0) * es) % 16 == 0


def aligned(*ts: torch.Tensor) -> bool:
    """16-byte aligned base addresses (a TMA descriptor's requirement; a view that starts mid-row may not be)."""
    return all(t.data_ptr() % 16 == 0 for t in ts)


if HAVE_GLUON:

    @gluon.jit
    def _tile_start(i, n_sink, start, BLOCK_N: gl.constexpr):
        """First key of virtual tile ``i``: sink tiles first, then the window's tiles from ``start``."""
        if i < n_sink:
            start_n = i * BLOCK_N
        else:
            start_n = start + (i - n_sink) * BLOCK_N
        return start_n

    @gluon.jit
    def _query_program(HQ, REP, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, REVERSE: gl.constexpr = False):
        """A (query tile, batch x query head) program's first row, batch, head, and its head's columns in the
        ``[B, S, H * D]`` views of q and of k / v. ``REVERSE``: the last query tile first (the tiles past the
        window's ramp, the longest, start first and the short ones fill the last wave)."""
        if REVERSE:
            m0 = (gl.num_programs(0) - 1 - gl.program_id(0)) * BLOCK_M
        else:
            m0 = gl.program_id(0) * BLOCK_M
        pid_bh = gl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        return m0, b, h, h * HEAD_DIM, (h // REP) * HEAD_DIM

    @gluon.jit
    def _tile_coords(tile, N_M, HQ, REP, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, REVERSE: gl.constexpr):
        """:func:`_query_program` for tile ``tile`` of a persistent program (query tiles fastest, then heads,
        then the batch: consecutive tiles share K/V in L2; ``REVERSE``: each head's last query tile first)."""
        bh = tile // N_M
        b = bh // HQ
        h = bh - b * HQ
        mt = tile - bh * N_M
        if REVERSE:
            mt = N_M - 1 - mt
        return mt * BLOCK_M, b, h, h * HEAD_DIM, (h // REP) * HEAD_DIM

    @gluon.jit
    def _key_tile_plan(m0, seq_len, window, sinks, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
        """Key tiles of the query rows [m0, m0 + BLOCK_M) (causal, Sq == Sk): ``n_sink`` sink tiles from key 0,
        then the window's tiles from ``start``, ``n_tiles`` in all; tiles starting in [full_lo, full_hi) hold
        only visible pairs (empty when every window tile needs the mask)."""
        pos_hi = gl.minimum(m0 + BLOCK_M, seq_len) - 1
        start = (gl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        sink_end = gl.minimum(gl.minimum(sinks, start), seq_len)
        full_lo = gl.cdiv(gl.maximum(pos_hi - window + 1, 0), BLOCK_N) * BLOCK_N
        full_hi = ((m0 + 1) // BLOCK_N) * BLOCK_N
        n_sink = gl.cdiv(sink_end, BLOCK_N)
        n_tiles = n_sink + gl.cdiv(pos_hi + 1 - start, BLOCK_N)
        return start, n_sink, n_tiles, full_lo, full_hi

    @gluon.jit
    def _key_program(seq_len, window, sinks, HKV, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr):
        """A (key tile, batch x kv head) program's first key, batch, kv head, and the query tiles that see its keys
        (causal, Sq == Sk): from ``q_lo``, ``n_qt`` of them; every pair is visible in the query tiles
        [full_lo, full_hi) (sink keys are seen by every later query)."""
        n0 = gl.program_id(0) * BLOCK_N
        pid_bh = gl.program_id(1)
        b = pid_bh // HKV
        kvh = pid_bh % HKV
        q_lo = (n0 // BLOCK_M) * BLOCK_M
        if n0 < sinks:
            q_hi = seq_len
            full_lo = 0
            full_hi = 0
        else:
            q_hi = gl.minimum(n0 + BLOCK_N - 1 + window, seq_len)
            full_lo = gl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
            full_hi = gl.minimum(((n0 + window) // BLOCK_M) * BLOCK_M, (seq_len // BLOCK_M) * BLOCK_M)
        return n0, b, kvh, q_lo, gl.cdiv(q_hi - q_lo, BLOCK_M), full_lo, full_hi

    @gluon.jit
    def _barrier_array(n: gl.constexpr, count: gl.constexpr):
        """``n`` mbarriers, each completing a phase after ``count`` arrivals."""
        bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(n):
            mbarrier.init(bars.index(i), count=count)
        return bars

    @gluon.jit
    def _visible(j, p, window, sinks):
        """Causal window with sinks: query position ``p`` sees key ``j`` (reference/attention.py)."""
        return ((j > p - window) | (j < sinks)) & (j <= p)

    @gluon.jit
    def _release(bar, pred=True):
        """One arrival on ``bar`` for the partition, once all its warps got here (past their reads of a slot)."""
        _barrier()
        mbarrier.arrive(bar, count=1, pred=pred)

    @gluon.jit
    def _lse2_delta(LSE, DELTA, offset, idx, ok):
        """The forward's lse in the exp2 domain (+inf for rows that saw no key: their p is 0) and delta, at rows
        ``offset + idx`` where ``ok``."""
        lse = gl.load(LSE + offset + idx, mask=ok, other=float("-inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        return lse2, gl.load(DELTA + offset + idx, mask=ok, other=0.0)

    @gluon.jit
    def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                  b, m0, q_col, kv_col, start, n_sink, n_tiles, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
        """One warp: the two halves of the query tile, then K_i and V_i of every key tile into slot
        ``i % STAGES`` once both consumers have released that slot (its empty barrier; a fresh barrier
        counts as released)."""
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [b, m0, q_col], q_bar, q_bufs.index(0))
        tma.async_copy_global_to_shared(q_desc, [b, m0 + HALF_M, q_col], q_bar, q_bufs.index(1))
        for i in range(n_tiles):
            slot = i % STAGES
            phase = (i // STAGES) & 1
            start_n = _tile_start(i, n_sink, start, BLOCK_N)
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, start_n, kv_col], k_ready.index(slot), k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [b, start_n, kv_col], v_ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _softmax_tile(s, m_i, l_i, pos, start_n, full_lo, full_hi, window, sinks, qk_scale,
                      BLOCK_N: gl.constexpr, s_layout: gl.constexpr, RESCALE: gl.constexpr):
        """Online-softmax step on one tile of raw scores: returns p = exp2(s * qk_scale - m) (one FMA and
        one exp2 per score), the rescale factor of the running output, the new running max (scaled) and
        sum, and whether any row's max moved (the output needs ``acc *= alpha`` only then). Tiles outside
        [full_lo, full_hi) are masked. ``RESCALE > 0``: a row keeps its old max unless the tile's exceeds
        it by more than ``RESCALE`` (log2 units), so p stays below 2^RESCALE and most tiles move no max
        (FlashAttention-4's conditional rescale); ``RESCALE == 0``: the max follows every tile."""
        if (start_n < full_lo) | (start_n >= full_hi):
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            j = gl.expand_dims(cols, 0)
            p_ = gl.expand_dims(pos, 1)
            s = gl.where(_visible(j, p_, window, sinks), s, float("-inf"))
        m_tile = gl.max(s, 1) * qk_scale
        if RESCALE > 0:
            m_new = gl.where(m_tile > m_i + RESCALE, m_tile, m_i)  # -inf + RESCALE stays -inf
            moved = gl.max((m_new != m_i).to(gl.int32), 0) > 0
        else:
            m_new = gl.maximum(m_i, m_tile)
            moved = True
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i, moved

    @gluon.jit
    def _take_turn(turn, event, WG: gl.constexpr, PINGPONG: gl.constexpr):
        """Ping-pong: warpgroup WG issues its products for ``event`` only after the other one issued its
        previous ones (warpgroup 0 goes first), so one warpgroup's softmax runs under the other's products."""
        if PINGPONG:
            mbarrier.wait(turn.index(WG), (event + 1 - WG) & 1)

    @gluon.jit
    def _pass_turn(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
        if PINGPONG:
            mbarrier.arrive(turn.index(1 - WG), count=1)

    @gluon.jit
    def _consumer(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                  b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                  full_lo, full_hi, WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr, RESCALE: gl.constexpr):
        """One warpgroup (4 warps) of a one-tile program: its query half, then the output through that half."""
        _consume_tile(q_bufs, q_bufs, k_bufs, v_bufs, q_bar, 0, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                      o_desc, LSE, 0, 0, b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink,
                      n_tiles, full_lo, full_hi, WG, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, False, RESCALE)

    @gluon.jit
    def _consume_tile(q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_phase, q_empty, k_ready, v_ready, k_empty, v_empty,
                      turn, o_desc, LSE, it0, ev0, b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start,
                      n_sink, n_tiles, full_lo, full_hi, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                      HALF_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                      PERSISTENT: gl.constexpr, RESCALE: gl.constexpr):
        """One warpgroup (4 warps): scores, softmax and the output update for rows
        [m0 + WG * HALF_M, + HALF_M) of one query tile; releases each K / V slot once (empty barriers count
        both warpgroups). ``it0`` / ``ev0``: the K/V ring iterations and ping-pong turns of the program's
        earlier tiles (0 for a one-tile program). ``PERSISTENT``: the query half is released (``q_empty``) once
        its last product is done, and the output goes out through ``o_bufs`` (the previous tile's store
        finished first); else through the query half itself."""
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        q_smem = q_bufs.index(WG)
        dtype: gl.constexpr = q_smem.dtype
        r0 = m0 + WG * HALF_M

        pos = r0 + gl.arange(0, HALF_M, layout=row_s)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        acc = gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([HALF_M], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([HALF_M], gl.float32, row_s)

        mbarrier.wait(q_bar, q_phase)
        q = q_smem.reshape([HALF_M, HEAD_DIM])

        # tile 0: scores, softmax; its K slot is released at once
        slot0 = it0 % STAGES
        mbarrier.wait(k_ready.index(slot0), (it0 // STAGES) & 1)
        _take_turn(turn, ev0, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_bufs.index(slot0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        _release(k_empty.index(slot0))
        start_n = _tile_start(0, n_sink, start, BLOCK_N)
        p, alpha, m_i, l_i, moved = _softmax_tile(s, m_i, l_i, pos, start_n, full_lo, full_hi, window, sinks,
                                                  qk_scale, BLOCK_N, s_layout, RESCALE)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for i in range(1, n_tiles):
            g = it0 + i
            slot = g % STAGES
            prev = (g - 1) % STAGES
            # S_i = Q K_i^T and O += P_{i-1} V_{i-1}, both in flight
            mbarrier.wait(k_ready.index(slot), (g // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((g - 1) // STAGES) & 1)
            _take_turn(turn, ev0 + i, WG, PINGPONG)
            s_tok = warpgroup_mma(q, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_op, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            _pass_turn(turn, WG, PINGPONG)
            s = warpgroup_mma_wait(1, deps=[s_tok])  # the scores are done; the update may still run
            start_n = _tile_start(i, n_sink, start, BLOCK_N)
            p, alpha, m_i, l_i, moved = _softmax_tile(s, m_i, l_i, pos, start_n, full_lo, full_hi, window, sinks,
                                                      qk_scale, BLOCK_N, s_layout, RESCALE)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            _release(k_empty.index(slot))  # the warpgroup's four warps are past K_i and V_{i-1}
            mbarrier.arrive(v_empty.index(prev), count=1)
            if moved:
                acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        if PERSISTENT:  # every product reading the query half is done: the producer may load the next tile's
            mbarrier.arrive(q_empty, count=1)
        g_last = it0 + n_tiles - 1
        last = g_last % STAGES
        mbarrier.wait(v_ready.index(last), (g_last // STAGES) & 1)
        _take_turn(turn, ev0 + n_tiles, WG, PINGPONG)
        o_tok = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=[o_tok])
        if PERSISTENT:
            _release(v_empty.index(last))

        # epilogue: out = acc / l through shared memory and a clipping TMA store; lse in natural log
        seen = l_i > 0
        l_safe = gl.where(seen, l_i, 1.0)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
        if PERSISTENT:
            o_smem = o_bufs.index(WG)
            tma.store_wait(0)  # the previous tile's output left o_smem
            o_smem.reshape([HALF_M, HEAD_DIM]).store(out.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [b, r0, q_col], o_smem)
        else:  # the query half is free
            q.store(out.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(o_desc, [b, r0, q_col], q_smem)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + h * stride_lh + b * seq_len + pos, lse, mask=pos < seq_len)
        if not PERSISTENT:
            tma.store_wait(0)

    @gluon.jit
    def _consumer1(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                   b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                   full_lo, full_hi, HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, PINGPONG: gl.constexpr, RESCALE: gl.constexpr, unused: gl.constexpr):
        """The second warpgroup (a worker partition: same signature as the producer's)."""
        WG1: gl.constexpr = 1
        _consumer(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                  b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                  full_lo, full_hi, WG1, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, RESCALE)

    @gluon.jit
    def _producer_persistent(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready,
                             k_empty, v_empty, seq_len, window, sinks, HQ, REP, N_M, TOTAL, HEAD_DIM: gl.constexpr,
                             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                             REVERSE: gl.constexpr):
        """:func:`_producer` over a persistent program's tiles: the next tile's query halves as soon as both
        consumers are past their last product on the current ones, the K/V ring running on across tiles."""
        HALF_M: gl.constexpr = BLOCK_M // 2
        it = 0
        tc = 0
        for tile in range(gl.program_id(0), TOTAL, gl.num_programs(0)):
            m0, b, h, q_col, kv_col = _tile_coords(tile, N_M, HQ, REP, HEAD_DIM, BLOCK_M, REVERSE)
            start, n_sink, n_tiles, full_lo, full_hi = _key_tile_plan(m0, seq_len, window, sinks, BLOCK_M, BLOCK_N)
            mbarrier.wait(q_empty, (tc & 1) ^ 1)
            mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m0, q_col], q_bar, q_bufs.index(0))
            tma.async_copy_global_to_shared(q_desc, [b, m0 + HALF_M, q_col], q_bar, q_bufs.index(1))
            for i in range(n_tiles):
                g = it + i
                slot = g % STAGES
                phase = (g // STAGES) & 1
                start_n = _tile_start(i, n_sink, start, BLOCK_N)
                mbarrier.wait(k_empty.index(slot), phase ^ 1)
                mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(k_desc, [b, start_n, kv_col], k_ready.index(slot), k_bufs.index(slot))
                mbarrier.wait(v_empty.index(slot), phase ^ 1)
                mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(v_desc, [b, start_n, kv_col], v_ready.index(slot), v_bufs.index(slot))
            it += n_tiles
            tc += 1

    @gluon.jit
    def _consumer_persistent(q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                             turn, o_desc, LSE, seq_len, stride_lh, qk_scale, window, sinks, HQ, REP, N_M, TOTAL,
                             WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                             STAGES: gl.constexpr, PINGPONG: gl.constexpr, RESCALE: gl.constexpr,
                             REVERSE: gl.constexpr):
        """One consumer warpgroup over a persistent program's tiles (the producer's order)."""
        HALF_M: gl.constexpr = BLOCK_M // 2
        it = 0
        ev = 0
        tc = 0
        for tile in range(gl.program_id(0), TOTAL, gl.num_programs(0)):
            m0, b, h, q_col, kv_col = _tile_coords(tile, N_M, HQ, REP, HEAD_DIM, BLOCK_M, REVERSE)
            start, n_sink, n_tiles, full_lo, full_hi = _key_tile_plan(m0, seq_len, window, sinks, BLOCK_M, BLOCK_N)
            _consume_tile(q_bufs, o_bufs, k_bufs, v_bufs, q_bar, tc & 1, q_empty, k_ready, v_ready, k_empty, v_empty,
                          turn, o_desc, LSE, it, ev, b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start,
                          n_sink, n_tiles, full_lo, full_hi, WG, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, True,
                          RESCALE)
            it += n_tiles
            ev += n_tiles + 1
            tc += 1
        tma.store_wait(0)

    @gluon.jit
    def _consumer_persistent1(q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                              turn, o_desc, LSE, seq_len, stride_lh, qk_scale, window, sinks, HQ, REP, N_M, TOTAL,
                              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, PINGPONG: gl.constexpr, RESCALE: gl.constexpr,
                              REVERSE: gl.constexpr, unused: gl.constexpr):
        WG1: gl.constexpr = 1
        _consumer_persistent(q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty, v_empty,
                             turn, o_desc, LSE, seq_len, stride_lh, qk_scale, window, sinks, HQ, REP, N_M, TOTAL,
                             WG1, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, RESCALE, REVERSE)

    # the integer arguments are not specialized (on == 1 or % 16 == 0): a warp-specialized Gluon compile takes
    # seconds, and every new specialization would pay it again
    @gluon.jit(do_not_specialize=["stride_lh", "seq_len", "window", "sinks", "HQ", "REP", "N_M", "TOTAL"])
    def _window_attn_fwd_sm90_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window,
                                     sinks, HQ, REP, N_M, TOTAL, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                                     CONSUMER_REGS: gl.constexpr, PERSISTENT: gl.constexpr, RESCALE: gl.constexpr,
                                     REVERSE: gl.constexpr):
        """One query tile per program, or with ``PERSISTENT`` a grid of at most one program per SM, each over
        tiles ``pid, pid + nprog, ...`` of the ``TOTAL = N_M x B x HQ`` (query tile, batch x head) tiles, so
        that the producer loads the next tile while the consumers finish the current one."""
        if PERSISTENT:
            _fwd_persistent(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window, sinks, HQ, REP,
                            N_M, TOTAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, CONSUMER_REGS, RESCALE,
                            REVERSE)
        else:
            _fwd_one_tile(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window, sinks, HQ, REP,
                          HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, CONSUMER_REGS, RESCALE, REVERSE)

    @gluon.jit
    def _fwd_persistent(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window, sinks, HQ, REP,
                        N_M, TOTAL, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        RESCALE: gl.constexpr, REVERSE: gl.constexpr):
        WG0: gl.constexpr = 0
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        o_bufs = gl.allocate_shared_memory(o_desc.dtype, [2] + o_desc.block_type.shape, o_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = _barrier_array(1, 1).index(0)
        q_empty = _barrier_array(1, 2).index(0)  # one arrival per consumer warpgroup
        k_ready = _barrier_array(STAGES, 1)
        v_ready = _barrier_array(STAGES, 1)
        k_empty = _barrier_array(STAGES, 2)
        v_empty = _barrier_array(STAGES, 2)
        turn = _barrier_array(2, 1)
        gl.warp_specialize([
            (_consumer_persistent, (q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                                    v_empty, turn, o_desc, LSE, seq_len, stride_lh, qk_scale, window, sinks, HQ, REP,
                                    N_M, TOTAL, WG0, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, RESCALE,
                                    REVERSE)),
            (_consumer_persistent1, (q_bufs, o_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready, k_empty,
                                     v_empty, turn, o_desc, LSE, seq_len, stride_lh, qk_scale, window, sinks, HQ, REP,
                                     N_M, TOTAL, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, PINGPONG, RESCALE, REVERSE,
                                     WG0)),
            (_producer_persistent, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, q_empty, k_ready, v_ready,
                                    k_empty, v_empty, seq_len, window, sinks, HQ, REP, N_M, TOTAL, HEAD_DIM, BLOCK_M,
                                    BLOCK_N, STAGES, REVERSE)),
        ], [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _fwd_one_tile(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window, sinks, HQ, REP,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                      PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr, RESCALE: gl.constexpr,
                      REVERSE: gl.constexpr):
        HALF_M: gl.constexpr = BLOCK_M // 2
        WG0: gl.constexpr = 0
        m0, b, h, q_col, kv_col = _query_program(HQ, REP, HEAD_DIM, BLOCK_M, REVERSE)
        start, n_sink, n_tiles, full_lo, full_hi = _key_tile_plan(m0, seq_len, window, sinks, BLOCK_M, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = _barrier_array(1, 1).index(0)
        k_ready = _barrier_array(STAGES, 1)  # the producer's expect
        v_ready = _barrier_array(STAGES, 1)
        k_empty = _barrier_array(STAGES, 2)  # one arrival per consumer warpgroup
        v_empty = _barrier_array(STAGES, 2)
        turn = _barrier_array(2, 1)

        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                         b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                         full_lo, full_hi, WG0, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, RESCALE)),
            (_consumer1, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                          b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                          full_lo, full_hi, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, RESCALE, WG0)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                         b, m0, q_col, kv_col, start, n_sink, n_tiles, HALF_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])


def _descriptor(t: torch.Tensor, rows: int):
    """3-D TMA descriptor over ``t [B, S, H, D]`` viewed as ``[B, S, H * D]``, one ``[1, rows, D]`` box."""
    B, S, H, D = t.shape
    block = [1, rows, D]  # (the query and output boxes are half a query tile: one per consumer warpgroup)
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for(block, gl_dtype)
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], block, layout)


def window_attention_fwd_sm90(q, k, v, *, window: int, sinks: int = 0, softmax_scale: float | None = None,
                              config: tuple | None = None, pingpong: bool | None = None,
                              persistent: bool | None = None, rescale: float | None = None,
                              reverse: bool | None = None):
    """Causal forward on the dense layout (see :func:`supported`). Returns ``(out, lse)`` as
    ``window_attention_fwd`` does: out ``[B, S, Hq, D]``, lse ``[B, Hq, S]`` float32 (a view of a
    ``[Hq, B * S]`` buffer). ``config = (BLOCK_M, BLOCK_N, STAGES)`` overrides the launch shape; ``persistent``
    (default: where ``min(window, S) <= PERSISTENT_MAX_WINDOW``): one program per SM looping over the tiles
    (32 KB more shared memory at D=128);
    ``rescale`` / ``reverse``: see ``RESCALE`` / ``REVERSE``."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    block_m, block_n, stages = config or CONFIG[D]
    persistent = use_persistent(window, S) if persistent is None else persistent
    out = torch.empty(B, S, Hq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(Hq, B * S, device=q.device, dtype=torch.float32)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    n_m = triton.cdiv(S, block_m)
    total = n_m * B * Hq
    grid = (min(total, sm_count(q.device)),) if persistent else (n_m, B * Hq)
    _window_attn_fwd_sm90_kernel[grid](
        _descriptor(q, block_m // 2), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m // 2),
        lse, lse.stride(0), S, scale * LOG2E, window, sinks, Hq, Hq // Hkv, n_m, total,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, PINGPONG=PINGPONG if pingpong is None else pingpong,
        CONSUMER_REGS=CONSUMER_REGS, PERSISTENT=persistent, RESCALE=float(RESCALE if rescale is None else rescale),
        REVERSE=REVERSE if reverse is None else reverse, num_warps=4, maxnreg=MAXNREG,
    )
    return out, lse.view(Hq, B, S).transpose(0, 1)


# ---- backward -----------------------------------------------------------------------------------------
#
# Deterministic, two kernels as the Triton backward (window_attention.py), on the forward's machinery (a TMA
# producer warp, two consumer warpgroups, optional ping-pong):
#   _bwd_dq_kernel:   per query tile (two 64-row halves), over the forward's key tiles: S = Q K^T and
#       dP = dO V^T issued together, P = exp2(S * scale - lse), dS = P (dP - delta), dQ += dS K.
#   _bwd_dkdv_kernel: per key tile (two 64-key halves), over the query tiles that see it (every query head of
#       the GQA group): S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q.
# delta = rowsum(dO * O) comes from the Triton kernel launch_delta. Each product's operands are in shared
# memory except P / dS, which stay in registers as wgmma's A operand.

# Measured on the H200 (session 24, S8192 B4 W4096 H32 D128, the whole backward): ping-pong off 13.4 ms vs on 16.1;
# dQ 128x128x2 -0.3 ms vs 128x64x4; dK/dV 128x32x4 best (64-query tiles spill, 16 are slower). The Triton
# backward took 12.3 ms in the same run. Session 26 measured it 1-3 % faster than the Triton backward at D128 and
# 9 % at D64 (window_attention.SM90_BWD_DEFAULT): the default deterministic backward on sm_90 since.
BWD_DQ_CONFIG = {64: (128, 64, 4), 128: (128, 128, 2)}  # (BLOCK_M, BLOCK_N, STAGES)
BWD_PINGPONG = False
# (BLOCK_N keys, BLOCK_M queries, STAGES); at D=128 64-query tiles spill in the consumers (ptxas: 192 B), 32 do not
BWD_DKDV_CONFIG = {64: (128, 64, 3), 128: (128, 32, 4)}

if HAVE_GLUON:

    @gluon.jit
    def _dq_producer(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty,
                     b, m0, q_col, kv_col, start, n_sink, n_tiles, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr):
        mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes + 2 * do_desc.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(q_desc, [b, m0 + w * HALF_M, q_col], q_bar, q_bufs.index(w))
            tma.async_copy_global_to_shared(do_desc, [b, m0 + w * HALF_M, q_col], q_bar, do_bufs.index(w))
        for i in range(n_tiles):
            slot = i % STAGES
            start_n = _tile_start(i, n_sink, start, BLOCK_N)
            mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [b, start_n, kv_col], ready.index(slot), k_bufs.index(slot))
            tma.async_copy_global_to_shared(v_desc, [b, start_n, kv_col], ready.index(slot), v_bufs.index(slot))

    @gluon.jit
    def _dq_consumer(q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty, turn, dq_desc, LSE, DELTA,
                     b, h, m0, q_col, seq_len, stride_lh, qk_scale, sm_scale, window, sinks, start, n_sink, n_tiles,
                     full_lo, full_hi, WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr,
                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        ds_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        dtype: gl.constexpr = q_bufs.dtype
        r0 = m0 + WG * HALF_M
        pos = r0 + gl.arange(0, HALF_M, layout=row_s)
        lse2, delta = _lse2_delta(LSE, DELTA, h * stride_lh + b * seq_len, pos, pos < seq_len)
        s_zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, s_layout)
        dq_tok = warpgroup_mma_init(gl.zeros([HALF_M, HEAD_DIM], gl.float32, o_layout))

        mbarrier.wait(q_bar, 0)
        q = q_bufs.index(WG).reshape([HALF_M, HEAD_DIM])
        do = do_bufs.index(WG).reshape([HALF_M, HEAD_DIM])
        for i in range(n_tiles):
            slot = i % STAGES
            mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
            k_smem = k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM])
            _take_turn(turn, i, WG, PINGPONG)
            s_tok = warpgroup_mma(q, k_smem.permute((1, 0)), s_zero, use_acc=False, is_async=True)
            dp_tok = warpgroup_mma(do, v_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                   use_acc=False, is_async=True)
            _pass_turn(turn, WG, PINGPONG)
            dq, s, dp = warpgroup_mma_wait(0, deps=[dq_tok, s_tok, dp_tok])
            # the previous tile's dQ product is done: its slot goes back to the producer
            _release(empty.index((i + STAGES - 1) % STAGES), i > 0)
            p = gl.exp2(s * qk_scale - gl.expand_dims(lse2, 1))
            start_n = _tile_start(i, n_sink, start, BLOCK_N)
            if (start_n < full_lo) | (start_n >= full_hi):
                j = gl.expand_dims(start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout)), 0)
                p_ = gl.expand_dims(pos, 1)
                p = gl.where(_visible(j, p_, window, sinks), p, 0.0)
            ds = p * (dp - gl.expand_dims(delta, 1))
            dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), ds_layout), k_smem, dq, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq_tok])
        _release(empty.index((n_tiles - 1) % STAGES))
        q.store((dq * sm_scale).to(dtype))  # the query half is free: stage dQ there for a clipping TMA store
        fence_async_shared()
        tma.async_copy_shared_to_global(dq_desc, [b, r0, q_col], q_bufs.index(WG))
        tma.store_wait(0)

    @gluon.jit
    def _dq_consumer1(q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty, turn, dq_desc, LSE, DELTA,
                      b, h, m0, q_col, seq_len, stride_lh, qk_scale, sm_scale, window, sinks, start, n_sink, n_tiles,
                      full_lo, full_hi, HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      STAGES: gl.constexpr, PINGPONG: gl.constexpr, unused: gl.constexpr):
        WG1: gl.constexpr = 1
        _dq_consumer(q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty, turn, dq_desc, LSE, DELTA,
                     b, h, m0, q_col, seq_len, stride_lh, qk_scale, sm_scale, window, sinks, start, n_sink, n_tiles,
                     full_lo, full_hi, WG1, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG)

    @gluon.jit(do_not_specialize=["stride_lh", "seq_len", "window", "sinks", "HQ", "REP"])
    def _bwd_dq_kernel(q_desc, do_desc, k_desc, v_desc, dq_desc, LSE, DELTA, stride_lh, seq_len, qk_scale, sm_scale,
                       window, sinks, HQ, REP, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                       STAGES: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        HALF_M: gl.constexpr = BLOCK_M // 2
        WG0: gl.constexpr = 0
        m0, b, h, q_col, kv_col = _query_program(HQ, REP, HEAD_DIM, BLOCK_M)
        start, n_sink, n_tiles, full_lo, full_hi = _key_tile_plan(m0, seq_len, window, sinks, BLOCK_M, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [2] + do_desc.block_type.shape, do_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = _barrier_array(1, 1).index(0)
        ready = _barrier_array(STAGES, 1)
        empty = _barrier_array(STAGES, 2)
        turn = _barrier_array(2, 1)
        gl.warp_specialize([
            (_dq_consumer, (q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty, turn, dq_desc, LSE, DELTA,
                            b, h, m0, q_col, seq_len, stride_lh, qk_scale, sm_scale, window, sinks, start, n_sink,
                            n_tiles, full_lo, full_hi, WG0, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG)),
            (_dq_consumer1, (q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty, turn, dq_desc, LSE, DELTA,
                             b, h, m0, q_col, seq_len, stride_lh, qk_scale, sm_scale, window, sinks, start, n_sink,
                             n_tiles, full_lo, full_hi, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, WG0)),
            (_dq_producer, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, q_bar, ready, empty,
                            b, m0, q_col, kv_col, start, n_sink, n_tiles, HALF_M, BLOCK_N, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])

    @gluon.jit
    def _dkdv_producer(q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty,
                       b, n0, kvh, REP, q_lo, n_qt, n_tiles, HALF_N: gl.constexpr, BLOCK_M: gl.constexpr,
                       HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        mbarrier.expect(kv_bar, 2 * k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
        for w in gl.static_range(2):
            tma.async_copy_global_to_shared(k_desc, [b, n0 + w * HALF_N, kvh * HEAD_DIM], kv_bar, k_bufs.index(w))
            tma.async_copy_global_to_shared(v_desc, [b, n0 + w * HALF_N, kvh * HEAD_DIM], kv_bar, v_bufs.index(w))
        for t in range(n_tiles):
            slot = t % STAGES
            r = t // n_qt
            m = q_lo + (t - r * n_qt) * BLOCK_M
            col = (kvh * REP + r) * HEAD_DIM
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m, col], ready.index(slot), q_bufs.index(slot))
            tma.async_copy_global_to_shared(do_desc, [b, m, col], ready.index(slot), do_bufs.index(slot))

    @gluon.jit
    def _dkdv_consumer(q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty, turn, dk_desc, dv_desc, LSE, DELTA,
                       b, n0, kvh, REP, q_lo, n_qt, n_tiles, full_lo, full_hi, seq_len, stride_lh, qk_scale, sm_scale,
                       window, sinks, WG: gl.constexpr, HEAD_DIM: gl.constexpr, HALF_N: gl.constexpr,
                       BLOCK_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        col_l: gl.constexpr = gl.SliceLayout(0, st_layout)
        dtype: gl.constexpr = q_bufs.dtype
        kr0 = n0 + WG * HALF_N
        kpos = gl.expand_dims(kr0 + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, st_layout)), 1)
        st_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, st_layout)
        dk_tok = warpgroup_mma_init(gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout))
        dv_tok = warpgroup_mma_init(gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout))

        mbarrier.wait(kv_bar, 0)
        k = k_bufs.index(WG).reshape([HALF_N, HEAD_DIM])
        v = v_bufs.index(WG).reshape([HALF_N, HEAD_DIM])
        for t in range(n_tiles):
            slot = t % STAGES
            r = t // n_qt
            m = q_lo + (t - r * n_qt) * BLOCK_M
            h = kvh * REP + r
            mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
            q = q_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
            do = do_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
            _take_turn(turn, t, WG, PINGPONG)
            st_tok = warpgroup_mma(k, q.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            dpt_tok = warpgroup_mma(v, do.permute((1, 0)), st_zero, use_acc=False, is_async=True)
            _pass_turn(turn, WG, PINGPONG)
            qi = m + gl.arange(0, BLOCK_M, layout=col_l)
            lse2, delta = _lse2_delta(LSE, DELTA, h * stride_lh + b * seq_len, qi, qi < seq_len)
            lse2 = gl.expand_dims(lse2, 0)
            delta = gl.expand_dims(delta, 0)
            dk, dv, st, dpt = warpgroup_mma_wait(0, deps=[dk_tok, dv_tok, st_tok, dpt_tok])
            # the previous tile's dK / dV products are done: its slot goes back to the producer
            _release(empty.index((t + STAGES - 1) % STAGES), t > 0)
            pt = gl.exp2(st * qk_scale - lse2)
            if (m < full_lo) | (m >= full_hi):
                i_ = gl.expand_dims(qi, 0)
                pt = gl.where(_visible(kpos, i_, window, sinks), pt, 0.0)
            dst = pt * (dpt - delta)
            dv_tok = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do, dv, is_async=True)
            dk_tok = warpgroup_mma(gl.convert_layout(dst.to(dtype), op_layout), q, dk, is_async=True)
        dk, dv = warpgroup_mma_wait(0, deps=[dk_tok, dv_tok])
        _release(empty.index((n_tiles - 1) % STAGES))
        k.store((dk * sm_scale).to(dtype))  # K / V halves are free: stage dK / dV there for clipping TMA stores
        v.store(dv.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(dk_desc, [b, kr0, kvh * HEAD_DIM], k_bufs.index(WG))
        tma.async_copy_shared_to_global(dv_desc, [b, kr0, kvh * HEAD_DIM], v_bufs.index(WG))
        tma.store_wait(0)

    @gluon.jit
    def _dkdv_consumer1(q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty, turn, dk_desc, dv_desc, LSE, DELTA,
                        b, n0, kvh, REP, q_lo, n_qt, n_tiles, full_lo, full_hi, seq_len, stride_lh, qk_scale,
                        sm_scale, window, sinks, HEAD_DIM: gl.constexpr, HALF_N: gl.constexpr, BLOCK_M: gl.constexpr,
                        STAGES: gl.constexpr, PINGPONG: gl.constexpr, unused: gl.constexpr):
        WG1: gl.constexpr = 1
        _dkdv_consumer(q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty, turn, dk_desc, dv_desc, LSE, DELTA,
                       b, n0, kvh, REP, q_lo, n_qt, n_tiles, full_lo, full_hi, seq_len, stride_lh, qk_scale, sm_scale,
                       window, sinks, WG1, HEAD_DIM, HALF_N, BLOCK_M, STAGES, PINGPONG)

    @gluon.jit(do_not_specialize=["stride_lh", "seq_len", "window", "sinks", "HKV", "REP"])
    def _bwd_dkdv_kernel(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, LSE, DELTA, stride_lh, seq_len, qk_scale,
                         sm_scale, window, sinks, HKV, REP, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                         BLOCK_M: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr):
        HALF_N: gl.constexpr = BLOCK_N // 2
        WG0: gl.constexpr = 0
        n0, b, kvh, q_lo, n_qt, full_lo, full_hi = _key_program(seq_len, window, sinks, HKV, BLOCK_N, BLOCK_M)
        n_tiles = REP * n_qt

        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [2] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [2] + v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        kv_bar = _barrier_array(1, 1).index(0)
        ready = _barrier_array(STAGES, 1)
        empty = _barrier_array(STAGES, 2)
        turn = _barrier_array(2, 1)
        gl.warp_specialize([
            (_dkdv_consumer, (q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty, turn, dk_desc, dv_desc, LSE,
                              DELTA, b, n0, kvh, REP, q_lo, n_qt, n_tiles, full_lo, full_hi, seq_len, stride_lh,
                              qk_scale, sm_scale, window, sinks, WG0, HEAD_DIM, HALF_N, BLOCK_M, STAGES, PINGPONG)),
            (_dkdv_consumer1, (q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty, turn, dk_desc, dv_desc, LSE,
                               DELTA, b, n0, kvh, REP, q_lo, n_qt, n_tiles, full_lo, full_hi, seq_len, stride_lh,
                               qk_scale, sm_scale, window, sinks, HEAD_DIM, HALF_N, BLOCK_M, STAGES, PINGPONG, WG0)),
            (_dkdv_producer, (q_desc, do_desc, k_desc, v_desc, q_bufs, do_bufs, k_bufs, v_bufs, kv_bar, ready, empty,
                              b, n0, kvh, REP, q_lo, n_qt, n_tiles, HALF_N, BLOCK_M, HEAD_DIM, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])


# ---- the one-kernel backward (deterministic=False): FlashAttention-3's layout ----------------------------
#
# Per key tile of BLOCK_N keys (two 64-key halves, one per consumer warpgroup), over the query tiles of BLOCK_M
# rows and the GQA heads that see it: S^T = K Q^T and dP^T = V dO^T, then dV += P^T dO and dK += dS^T Q as
# the deterministic dK/dV kernel does, and in the same step dQ = dS K: each warpgroup writes its half of dS^T
# (bf16) to shared memory, the two meet at an mbarrier, and warpgroup w multiplies the whole dS [BLOCK_M, BLOCK_N]
# by K's head-dim columns [w * D / 2, (w + 1) * D / 2). Its [BLOCK_M, D / 2] share goes into an fp32 dQ
# accumulator in global memory by a TMA reduce-add (cp.reduce.async.bulk.tensor): 5 products per tile pair
# instead of the deterministic backward's 7. The order of the additions into a dQ row varies run to run.
# (BLOCK_N keys, BLOCK_M queries, STAGES of Q / dO / lse / delta). H200, session 26 (S8192 B4 W4096, the whole
# backward): D128 128x64x2 8.16 ms vs 128x64x3 8.79 (128x128 does not fit); D64 128x128x2 4.87 ms vs 128x64x2 5.52,
# 128x64x3 5.53, the Triton deterministic backward 7.99. ptxas: 198 KB of shared memory and no spills at D128, 199 KB
# and 52 B of spills at D64.
BWD_FUSED_CONFIG = {64: (128, 128, 2), 128: (128, 64, 2)}

if HAVE_GLUON:
    _tma_reduce_add = getattr(tma, "async_atomic_add", None)
    if _tma_reduce_add is None:  # Triton 3.6 (the H200's) builds the op but has no Gluon wrapper for it
        from triton._C.libtriton import ir as _ir
        from triton.experimental.gluon.language._core import builtin as _builtin

        @_builtin
        def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
            """Add ``src`` (shared memory) into the box of ``tensor_desc`` at ``coord`` through TMA."""
            coord = _semantic._convert_to_ir_values(coord, require_i64=False)
            _semantic.builder.create_async_tma_reduce(_ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord,
                                                      src.handle)

    @gluon.jit
    def _fused_producer(q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_buf, v_buf,
                        lse_bufs, delta_bufs, kv_bar, ready, empty, b, n0, kvh, REP, q_lo, n_qt, n_tiles, NB,
                        BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """One warp: the key tile's K and V once, then Q, dO, lse and delta of each (head, query tile) step into a
        ring (lse / delta through TMA too: the consumers read them from shared memory, no address registers)."""
        mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [b, n0, kvh * HEAD_DIM], kv_bar, k_buf)
        tma.async_copy_global_to_shared(v_desc, [b, n0, kvh * HEAD_DIM], kv_bar, v_buf)
        for t in range(n_tiles):
            slot = t % STAGES
            r = t // n_qt
            m = q_lo + (t - r * n_qt) * BLOCK_M
            h = kvh * REP + r
            mbarrier.wait(empty.index(slot), ((t // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes
                            + lse_desc.block_type.nbytes + delta_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [b, m, h * HEAD_DIM], ready.index(slot), q_bufs.index(slot))
            tma.async_copy_global_to_shared(do_desc, [b, m, h * HEAD_DIM], ready.index(slot), do_bufs.index(slot))
            tma.async_copy_global_to_shared(lse_desc, [h * NB + b, m], ready.index(slot), lse_bufs.index(slot))
            tma.async_copy_global_to_shared(delta_desc, [h * NB + b, m], ready.index(slot), delta_bufs.index(slot))

    @gluon.jit
    def _fused_scores(t, q_bufs, do_bufs, k, v, ready, st_zero, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr,
                      STAGES: gl.constexpr):
        """Step ``t``'s S^T = K Q^T and dP^T = V dO^T, issued once its Q / dO have landed."""
        slot = t % STAGES
        mbarrier.wait(ready.index(slot), (t // STAGES) & 1)
        q = q_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do = do_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
        st_tok = warpgroup_mma(k, q.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        dpt_tok = warpgroup_mma(v, do.permute((1, 0)), st_zero, use_acc=False, is_async=True)
        return st_tok, dpt_tok

    @gluon.jit
    def _fused_coords(t, kvh, REP, q_lo, n_qt, BLOCK_M: gl.constexpr):
        """Step ``t``'s query tile ``m`` and head ``h`` (the query tiles of head kvh * REP first, then the next)."""
        r = t // n_qt
        return q_lo + (t - r * n_qt) * BLOCK_M, kvh * REP + r

    @gluon.jit
    def _fused_probs(st, dpt, lse_buf, delta_buf, m, full_lo, full_hi, kpos, qk_scale, window, sinks,
                     BLOCK_M: gl.constexpr, dtype: gl.constexpr):
        """P^T (float32) and dS^T = P^T * (dP^T - delta) (``dtype``) of a step from its S^T / dP^T accumulators.
        Rows past the sequence read zeros (the pad, or TMA's fill past it): their Q / dO rows are zeros and their
        dQ rows fall outside the reduce's box, so whatever P / dS they get adds nothing."""
        col_l: gl.constexpr = gl.SliceLayout(0, st.type.layout)
        vec: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])  # the unswizzled [1, BLOCK_M] box as a vector
        lse = lse_buf._reinterpret(gl.float32, [BLOCK_M], vec).load(col_l)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        pt = gl.exp2(st * qk_scale - gl.expand_dims(lse2, 0))
        if (m < full_lo) | (m >= full_hi):
            qi = m + gl.arange(0, BLOCK_M, layout=col_l)
            pt = gl.where(_visible(kpos, gl.expand_dims(qi, 0), window, sinks), pt, 0.0)
        delta = delta_buf._reinterpret(gl.float32, [BLOCK_M], vec).load(col_l)
        return pt, (pt * (dpt - gl.expand_dims(delta, 0))).to(dtype)

    @gluon.jit
    def _fused_dq_out(dq, dq_smem, dq_desc, b, m, h, sm_scale, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                      BLOCK_M: gl.constexpr):
        """Warpgroup WG's share of a step's dQ (columns [WG * HEAD_DIM / 2, + HEAD_DIM / 2)), scaled, staged in
        ``dq_smem`` once the previous reduce has left it, and added into the fp32 accumulator by a TMA reduce."""
        HALF_D: gl.constexpr = HEAD_DIM // 2
        tma.store_wait(0)
        dq_smem.reshape([BLOCK_M, HALF_D]).store(dq * sm_scale)
        fence_async_shared()
        _barrier()
        _tma_reduce_add(dq_desc, [b, m, h * HEAD_DIM + WG * HALF_D], dq_smem)

    @gluon.jit
    def _fused_step(t, st_tok, dpt_tok, dk, dv, st_zero, dq_zero, q_bufs, do_bufs, k, v, k_cols, ds_bufs, dq_smem,
                    ready, empty, ds_ready, dq_desc, lse_bufs, delta_bufs, b, kvh, REP, q_lo, n_qt, full_lo, full_hi,
                    kpos, qk_scale, sm_scale, window, sinks, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                    HALF_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, LAST: gl.constexpr):
        """Step ``t`` of a consumer warpgroup (its S^T / dP^T already issued): P^T and dS^T, the dV / dK products,
        dS^T's half into shared memory, dQ's share once both halves are in, reduce-added into global memory, then
        (unless ``LAST``) step t + 1's S^T / dP^T. Measured and dropped on the H200 (session 25, S8192 B4 W4096):
        issuing step t + 1's S^T / dP^T before waiting for dQ's share (64 more accumulator registers live: ptxas
        spills 512 B; 14.9 vs 11.6 ms), S^T alone early (a tie), and each warpgroup adding dS[:, its keys]
        K[its keys, :] with no dS exchange (twice the reduce traffic; 9.3 vs 8.1 ms); session 26: dQ one step
        behind (step t issuing its dV / dK products and step t - 1's dQ product in a row, 3 dS slots; ptxas spilled
        132 B): 8.33 vs 8.40 ms, 10.09 vs 10.23 (S32768 GQA), a tie."""
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        dtype: gl.constexpr = q_bufs.dtype
        slot = t % STAGES
        m, h = _fused_coords(t, kvh, REP, q_lo, n_qt, BLOCK_M)
        q = q_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do = do_bufs.index(slot).reshape([BLOCK_M, HEAD_DIM])
        st, dpt = warpgroup_mma_wait(0, deps=[st_tok, dpt_tok])
        pt, dst = _fused_probs(st, dpt, lse_bufs.index(slot), delta_bufs.index(slot), m, full_lo, full_hi, kpos,
                               qk_scale, window, sinks, BLOCK_M, dtype)
        dv_tok = warpgroup_mma(gl.convert_layout(pt.to(dtype), op_layout), do, dv, is_async=True)
        dk_tok = warpgroup_mma(gl.convert_layout(dst, op_layout), q, dk, is_async=True)
        # this warpgroup's half of dS^T into the step's dS slot; both halves in, dQ's share is dS K[:, cols]
        ds = ds_bufs.index(t % 2)
        ds.slice(WG * HALF_N, HALF_N, dim=0).store(dst)
        fence_async_shared()
        _release(ds_ready.index(t % 2))
        mbarrier.wait(ds_ready.index(t % 2), (t // 2) & 1)
        dv, dk = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok])  # (frees P^T / dS^T's registers)
        _release(empty.index(slot))  # Q / dO of this step are read
        dq_tok = warpgroup_mma(ds.permute((1, 0)), k_cols, dq_zero, use_acc=False, is_async=True)
        dq = warpgroup_mma_wait(0, deps=[dq_tok])
        _fused_dq_out(dq, dq_smem, dq_desc, b, m, h, sm_scale, WG, HEAD_DIM, BLOCK_M)
        if not LAST:
            st_tok, dpt_tok = _fused_scores(t + 1, q_bufs, do_bufs, k, v, ready, st_zero, BLOCK_M, HEAD_DIM, STAGES)
        return st_tok, dpt_tok, dk, dv

    @gluon.jit
    def _fused_consumer(q_bufs, do_bufs, k_buf, v_buf, ds_bufs, dq_buf, kv_bar, ready, empty, ds_ready, done,
                        dk_desc, dv_desc, dq_desc, lse_bufs, delta_bufs, b, n0, kvh, REP, q_lo, n_qt, n_tiles,
                        full_lo, full_hi, qk_scale, sm_scale, window, sinks, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                        HALF_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """Warpgroup WG: keys [n0 + WG * HALF_N, + HALF_N) for dK / dV, head-dim columns
        [WG * HALF_D, + HALF_D) of every step's dQ."""
        HALF_D: gl.constexpr = HEAD_DIM // 2
        st_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, BLOCK_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                             instr_shape=[16, HEAD_DIM, 16])
        dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                            instr_shape=[16, HALF_D, 16])
        dtype: gl.constexpr = q_bufs.dtype
        BLOCK_N: gl.constexpr = 2 * HALF_N
        kr0 = n0 + WG * HALF_N
        kpos = gl.expand_dims(kr0 + gl.arange(0, HALF_N, layout=gl.SliceLayout(1, st_layout)), 1)
        st_zero = gl.zeros([HALF_N, BLOCK_M], gl.float32, st_layout)
        dq_zero = gl.zeros([BLOCK_M, HALF_D], gl.float32, dq_layout)
        dk = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)
        dv = gl.zeros([HALF_N, HEAD_DIM], gl.float32, acc_layout)

        mbarrier.wait(kv_bar, 0)
        k_all = k_buf.reshape([BLOCK_N, HEAD_DIM])
        k = k_all.slice(WG * HALF_N, HALF_N, dim=0)
        v = v_buf.reshape([BLOCK_N, HEAD_DIM]).slice(WG * HALF_N, HALF_N, dim=0)
        k_cols = k_all.slice(WG * HALF_D, HALF_D, dim=1)
        dq_smem = dq_buf.index(WG)
        st_tok, dpt_tok = _fused_scores(0, q_bufs, do_bufs, k, v, ready, st_zero, BLOCK_M, HEAD_DIM, STAGES)
        for t in range(n_tiles - 1):
            st_tok, dpt_tok, dk, dv = _fused_step(
                t, st_tok, dpt_tok, dk, dv, st_zero, dq_zero, q_bufs, do_bufs, k, v, k_cols, ds_bufs, dq_smem,
                ready, empty, ds_ready, dq_desc, lse_bufs, delta_bufs, b, kvh, REP, q_lo, n_qt, full_lo, full_hi,
                kpos, qk_scale, sm_scale, window, sinks, WG, HEAD_DIM, HALF_N, BLOCK_M, STAGES, False)
        st_tok, dpt_tok, dk, dv = _fused_step(
            n_tiles - 1, st_tok, dpt_tok, dk, dv, st_zero, dq_zero, q_bufs, do_bufs, k, v, k_cols, ds_bufs,
            dq_smem, ready, empty, ds_ready, dq_desc, lse_bufs, delta_bufs, b, kvh, REP, q_lo, n_qt, full_lo,
            full_hi, kpos, qk_scale, sm_scale, window, sinks, WG, HEAD_DIM, HALF_N, BLOCK_M, STAGES, True)
        # K's rows are read by both warpgroups' dQ products: stage dK there only once both are done
        _release(done)
        mbarrier.wait(done, 0)
        k.store((dk * sm_scale).to(dtype))
        v.store(dv.to(dtype))
        fence_async_shared()
        _barrier()
        tma.async_copy_shared_to_global(dk_desc, [b, kr0, kvh * HEAD_DIM], k_buf.slice(WG * HALF_N, HALF_N, dim=1))
        tma.async_copy_shared_to_global(dv_desc, [b, kr0, kvh * HEAD_DIM], v_buf.slice(WG * HALF_N, HALF_N, dim=1))
        tma.store_wait(0)

    @gluon.jit
    def _fused_consumer1(q_bufs, do_bufs, k_buf, v_buf, ds_bufs, dq_buf, kv_bar, ready, empty, ds_ready, done,
                         dk_desc, dv_desc, dq_desc, lse_bufs, delta_bufs, b, n0, kvh, REP, q_lo, n_qt, n_tiles,
                         full_lo, full_hi, qk_scale, sm_scale, window, sinks, HEAD_DIM: gl.constexpr,
                         HALF_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, unused: gl.constexpr):
        WG1: gl.constexpr = 1
        _fused_consumer(q_bufs, do_bufs, k_buf, v_buf, ds_bufs, dq_buf, kv_bar, ready, empty, ds_ready, done,
                        dk_desc, dv_desc, dq_desc, lse_bufs, delta_bufs, b, n0, kvh, REP, q_lo, n_qt, n_tiles,
                        full_lo, full_hi, qk_scale, sm_scale, window, sinks, WG1, HEAD_DIM, HALF_N, BLOCK_M, STAGES)

    @gluon.jit(do_not_specialize=["seq_len", "NB", "window", "sinks", "HKV", "REP"])
    def _bwd_fused_kernel(q_desc, do_desc, k_desc, v_desc, dk_desc, dv_desc, dq_desc, lse_desc, delta_desc, seq_len,
                          NB, qk_scale, sm_scale, window, sinks, HKV, REP, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                          BLOCK_M: gl.constexpr, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        HALF_N: gl.constexpr = BLOCK_N // 2
        WG0: gl.constexpr = 0
        n0, b, kvh, q_lo, n_qt, full_lo, full_hi = _key_program(seq_len, window, sinks, HKV, BLOCK_N, BLOCK_M)
        n_tiles = REP * n_qt

        k_buf = gl.allocate_shared_memory(k_desc.dtype, k_desc.block_type.shape, k_desc.layout)
        v_buf = gl.allocate_shared_memory(v_desc.dtype, v_desc.block_type.shape, v_desc.layout)
        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape, q_desc.layout)
        do_bufs = gl.allocate_shared_memory(do_desc.dtype, [STAGES] + do_desc.block_type.shape, do_desc.layout)
        ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], q_desc.dtype)
        ds_bufs = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_N, BLOCK_M], ds_layout)
        dq_buf = gl.allocate_shared_memory(dq_desc.dtype, [2] + dq_desc.block_type.shape, dq_desc.layout)
        lse_raw = gl.allocate_shared_memory(gl.float32, [STAGES] + lse_desc.block_type.shape, lse_desc.layout)
        delta_raw = gl.allocate_shared_memory(gl.float32, [STAGES] + delta_desc.block_type.shape, delta_desc.layout)
        kv_bar = _barrier_array(1, 1).index(0)
        ready = _barrier_array(STAGES, 1)
        empty = _barrier_array(STAGES, 2)  # one arrival per consumer warpgroup
        ds_ready = _barrier_array(2, 2)
        done = _barrier_array(1, 2).index(0)
        gl.warp_specialize([
            (_fused_consumer, (q_bufs, do_bufs, k_buf, v_buf, ds_bufs, dq_buf, kv_bar, ready, empty, ds_ready, done,
                               dk_desc, dv_desc, dq_desc, lse_raw, delta_raw, b, n0, kvh, REP, q_lo, n_qt, n_tiles,
                               full_lo, full_hi, qk_scale, sm_scale, window, sinks, WG0, HEAD_DIM, HALF_N,
                               BLOCK_M, STAGES)),
            (_fused_consumer1, (q_bufs, do_bufs, k_buf, v_buf, ds_bufs, dq_buf, kv_bar, ready, empty, ds_ready, done,
                                dk_desc, dv_desc, dq_desc, lse_raw, delta_raw, b, n0, kvh, REP, q_lo, n_qt, n_tiles,
                                full_lo, full_hi, qk_scale, sm_scale, window, sinks, HEAD_DIM, HALF_N,
                                BLOCK_M, STAGES, WG0)),
            (_fused_producer, (q_desc, do_desc, k_desc, v_desc, lse_desc, delta_desc, q_bufs, do_bufs, k_buf, v_buf,
                               lse_raw, delta_raw, kv_bar, ready, empty, b, n0, kvh, REP, q_lo, n_qt, n_tiles, NB,
                               BLOCK_M, HEAD_DIM, STAGES)),
        ], [4, 1], [CONSUMER_REGS, 24])


def _descriptor_f32(t: torch.Tensor, rows: int, cols: int):
    """3-D TMA descriptor over the fp32 ``t [B, S, H, D]`` viewed as ``[B, S, H * D]``, one ``[1, rows, cols]`` box."""
    B, S, H, D = t.shape
    block = [1, rows, cols]
    return TensorDescriptor(t, [B, S, H * D], [t.stride(0), t.stride(1), 1], block,
                            gl.NVMMASharedLayout.get_default_for(block, gl.float32))


def _row_descriptor(t: torch.Tensor, cols: int):
    """2-D TMA descriptor over the contiguous fp32 ``t [R, L]`` (L a multiple of 4), one ``[1, cols]`` box, unswizzled
    (the kernel reads the box back as a plain vector)."""
    layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], [1, cols], layout)


def window_attention_bwd_sm90(do, q, k, v, out, lse, *, window: int, sinks: int = 0,
                              softmax_scale: float | None = None, pingpong: bool | None = None,
                              config_dq: tuple | None = None, config_dkdv: tuple | None = None,
                              deterministic: bool = True, config_fused: tuple | None = None):
    """Gradients ``(dq, dk, dv)`` of the causal dense forward (calls :func:`supported` takes), given ``do``, the
    forward's ``out`` and ``lse`` ([B, Hq, S], any strides). ``deterministic``: two kernels, no atomics; else one
    kernel adding dQ into an fp32 accumulator by TMA reduce-adds (head dims in ``BWD_FUSED_CONFIG``; the last bits
    of dq vary run to run)."""
    from deepseek_kernels.triton.window_attention import launch_delta, launch_fused_prep

    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    do, out = do.contiguous(), out.contiguous()
    dk = torch.empty(B, S, Hkv, D, device=q.device, dtype=q.dtype)
    dv = torch.empty(B, S, Hkv, D, device=q.device, dtype=q.dtype)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    if not deterministic:
        if D not in BWD_FUSED_CONFIG:
            raise ValueError(f"window_attention_bwd_sm90(deterministic=False): head dim {D} is not one of "
                             f"{sorted(BWD_FUSED_CONFIG)}")
        bn, bm, st = config_fused or BWD_FUSED_CONFIG[D]
        # lse / delta as [Hq * B, S rounded up to 4] (zero pad): the kernel reads [1, BLOCK_M] boxes of them through
        # TMA, whose boxes must start 16-byte aligned in the row (an [Hq, B * S] view's rows at b * S need not:
        # B2 S17 raised an illegal instruction, H200 session 25); one pass writes them and zeroes dq_acc
        dq_acc, lse_rows, delta_rows = launch_fused_prep(out, do, lse, triton.cdiv(S, 4) * 4)
        _bwd_fused_kernel[(triton.cdiv(S, bn), B * Hkv)](
            _descriptor(q, bm), _descriptor(do, bm), _descriptor(k, bn), _descriptor(v, bn), _descriptor(dk, bn // 2),
            _descriptor(dv, bn // 2), _descriptor_f32(dq_acc, bm, D // 2), _row_descriptor(lse_rows, bm),
            _row_descriptor(delta_rows, bm), S, B, scale * LOG2E, scale, window, sinks, Hkv, Hq // Hkv,
            HEAD_DIM=D, BLOCK_N=bn, BLOCK_M=bm, STAGES=st, CONSUMER_REGS=CONSUMER_REGS, num_warps=4,
            maxnreg=MAXNREG,
        )
        return dq_acc.to(q.dtype), dk, dv
    lsep = lse.transpose(0, 1).reshape(Hq, B * S).contiguous()
    delta = torch.empty(Hq, B * S, device=q.device, dtype=torch.float32)
    launch_delta(out.view(B * S, Hq, D), do.view(B * S, Hq, D), delta)
    dq = torch.empty(B, S, Hq, D, device=q.device, dtype=q.dtype)
    pp = BWD_PINGPONG if pingpong is None else pingpong
    bm, bn, st = config_dq or BWD_DQ_CONFIG[D]
    _bwd_dq_kernel[(triton.cdiv(S, bm), B * Hq)](
        _descriptor(q, bm // 2), _descriptor(do, bm // 2), _descriptor(k, bn), _descriptor(v, bn),
        _descriptor(dq, bm // 2), lsep, delta, lsep.stride(0), S, scale * LOG2E, scale, window, sinks, Hq, Hq // Hkv,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, STAGES=st, PINGPONG=pp, CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4, maxnreg=MAXNREG,
    )
    bn, bm, st = config_dkdv or BWD_DKDV_CONFIG[D]
    _bwd_dkdv_kernel[(triton.cdiv(S, bn), B * Hkv)](
        _descriptor(q, bm), _descriptor(do, bm), _descriptor(k, bn // 2), _descriptor(v, bn // 2),
        _descriptor(dk, bn // 2), _descriptor(dv, bn // 2), lsep, delta, lsep.stride(0), S, scale * LOG2E, scale,
        window, sinks, Hkv, Hq // Hkv,
        HEAD_DIM=D, BLOCK_N=bn, BLOCK_M=bm, STAGES=st, PINGPONG=pp, CONSUMER_REGS=CONSUMER_REGS,
        num_warps=4, maxnreg=MAXNREG,
    )
    return dq, dk, dv
