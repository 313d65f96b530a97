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
only tiles on the diagonal, on the window's far edge or among the sinks evaluate the mask.

``supported()`` says which calls take this path (the op falls back to the Triton forward for the
rest: packed varlen, ``causal=False``, ``Sq != Sk``, head dims other than 64 / 128, float32,
GPUs other than sm_90).
"""

import functools

import torch
import triton

try:  # Gluon's Hopper API (Triton >= 3.5); absent on older Tritons and CPU-only builds
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

    # the partition-wide barrier: gl.thread_barrier on Triton 3.6 (the H200's), gl.barrier from 3.8
    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, STAGES) per head dim; 8 consumer warps + 1 producer warp. Shared memory:
# Q tile + STAGES x (K + V) tiles = 32 + 2 x 64 KB at D=128, 16 + 3 x 32 KB at D=64.
CONFIG = {64: (128, 128, 3), 128: (128, 128, 2)}
MAXNREG = 168  # 3 warpgroups x 128 threads x 168 <= 64K registers: the producer's keeps 24, the consumers 240
CONSUMER_REGS = 240
PINGPONG = True


def supported(q, k, v, *, causal: bool, cu_seqlens_q, cu_seqlens_k) -> bool:
    """Whether :func:`window_attention_fwd_sm90` handles this call (else the Triton forward does)."""
    if not (HAVE_GLUON and q.is_cuda and causal and cu_seqlens_q is None and cu_seqlens_k is None):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.dim() != 4 or q.shape[1] != k.shape[1]:
        return False
    if _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) != (9, 0):
        return False
    D = q.shape[-1]
    if D not in CONFIG:
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
                      BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Online-softmax step on one tile of raw scores: returns p = exp2(s * qk_scale - m) (one FMA and
        one exp2 per score), the rescale factor of the running output and the new running max (scaled)
        and sum. Tiles outside [full_lo, full_hi) are masked."""
        if (start_n < full_lo) | (start_n >= full_hi):
            cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            j = gl.expand_dims(cols, 0)
            p_ = gl.expand_dims(pos, 1)
            vis = ((j > p_ - window) | (j < sinks)) & (j <= p_)
            s = gl.where(vis, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return p, alpha, m_new, l_i

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
                  BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr):
        """One warpgroup (4 warps): scores, softmax and the output update for rows
        [m0 + WG * HALF_M, + HALF_M) of the query tile; releases each K / V slot once (empty barriers count
        both warpgroups)."""
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

        mbarrier.wait(q_bar, 0)
        q = q_smem.reshape([HALF_M, HEAD_DIM])

        # tile 0: scores, softmax; its K slot is released at once
        mbarrier.wait(k_ready.index(0), 0)
        _take_turn(turn, 0, WG, PINGPONG)
        s_tok = warpgroup_mma(q, k_bufs.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        s = warpgroup_mma_wait(0, deps=[s_tok])
        _barrier()
        mbarrier.arrive(k_empty.index(0), count=1)
        start_n = _tile_start(0, n_sink, start, BLOCK_N)
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, pos, start_n, full_lo, full_hi, window, sinks, qk_scale,
                                           BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        for i in range(1, n_tiles):
            slot = i % STAGES
            prev = (i - 1) % STAGES
            # S_i = Q K_i^T and O += P_{i-1} V_{i-1}, both in flight
            mbarrier.wait(k_ready.index(slot), (i // STAGES) & 1)
            mbarrier.wait(v_ready.index(prev), ((i - 1) // STAGES) & 1)
            _take_turn(turn, i, WG, PINGPONG)
            s_tok = warpgroup_mma(q, k_bufs.index(slot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero,
                                  use_acc=False, is_async=True)
            o_tok = warpgroup_mma(p_op, v_bufs.index(prev).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
            _pass_turn(turn, WG, PINGPONG)
            s = warpgroup_mma_wait(1, deps=[s_tok])  # the scores are done; the update may still run
            start_n = _tile_start(i, n_sink, start, BLOCK_N)
            p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, pos, start_n, full_lo, full_hi, window, sinks,
                                               qk_scale, BLOCK_N, s_layout)
            acc = warpgroup_mma_wait(0, deps=[o_tok])
            _barrier()  # the warpgroup's four warps are past K_i and V_{i-1}
            mbarrier.arrive(k_empty.index(slot), count=1)
            mbarrier.arrive(v_empty.index(prev), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)

        last = (n_tiles - 1) % STAGES
        mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
        _take_turn(turn, n_tiles, WG, PINGPONG)
        o_tok = warpgroup_mma(p_op, v_bufs.index(last).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        _pass_turn(turn, WG, PINGPONG)
        acc = warpgroup_mma_wait(0, deps=[o_tok])

        # epilogue: out = acc / l through the (now free) query tile and a clipping TMA store; lse in natural log
        seen = l_i > 0
        l_safe = gl.where(seen, l_i, 1.0)
        out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
        q.store(out.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(o_desc, [b, r0, q_col], q_smem)
        lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + h * stride_lh + b * seq_len + pos, lse, mask=pos < seq_len)
        tma.store_wait(0)

    @gluon.jit
    def _consumer1(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                   b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                   full_lo, full_hi, HEAD_DIM: gl.constexpr, HALF_M: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, PINGPONG: gl.constexpr, unused: gl.constexpr):
        """The second warpgroup (a worker partition: same signature as the producer's)."""
        WG1: gl.constexpr = 1
        _consumer(q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                  b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                  full_lo, full_hi, WG1, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG)

    # the integer arguments are not specialized (on == 1 or % 16 == 0): a warp-specialized Gluon compile takes
    # seconds, and every new specialization would pay it again
    @gluon.jit(do_not_specialize=["stride_lh", "seq_len", "window", "sinks", "HQ", "REP"])
    def _window_attn_fwd_sm90_kernel(q_desc, k_desc, v_desc, o_desc, LSE, stride_lh, seq_len, qk_scale, window,
                                     sinks, HQ, REP, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                     BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PINGPONG: gl.constexpr,
                                     CONSUMER_REGS: gl.constexpr):
        HALF_M: gl.constexpr = BLOCK_M // 2
        WG0: gl.constexpr = 0
        m0 = gl.program_id(0) * BLOCK_M
        pid_bh = gl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        q_col = h * HEAD_DIM
        kv_col = (h // REP) * HEAD_DIM
        # key tiles of rows [m0, m0 + BLOCK_M) (causal, Sq == Sk): sinks [0, sink_end), window [start, end),
        # the mask-free interior [full_lo, full_hi) (empty when every window tile needs the mask)
        pos_hi = gl.minimum(m0 + BLOCK_M, seq_len) - 1
        start = (gl.maximum(m0 - window + 1, 0) // BLOCK_N) * BLOCK_N
        sink_end = gl.minimum(gl.minimum(sinks, start), seq_len)
        end = pos_hi + 1
        full_lo = gl.cdiv(gl.maximum(pos_hi - window + 1, 0), BLOCK_N) * BLOCK_N
        full_hi = ((m0 + 1) // BLOCK_N) * BLOCK_N
        n_sink = gl.cdiv(sink_end, BLOCK_N)
        n_tiles = n_sink + gl.cdiv(end - start, BLOCK_N)

        q_bufs = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
        v_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # one arrival per consumer warpgroup
            mbarrier.init(v_empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(turn.index(i), count=1)

        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                         b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                         full_lo, full_hi, WG0, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG)),
            (_consumer1, (q_bufs, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, turn, o_desc, LSE,
                          b, h, m0, q_col, seq_len, stride_lh, qk_scale, window, sinks, start, n_sink, n_tiles,
                          full_lo, full_hi, HEAD_DIM, HALF_M, BLOCK_N, STAGES, PINGPONG, WG0)),
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
                              config: tuple | None = None, pingpong: bool | None = None):
    """Causal forward on the dense layout (see :func:`supported`). Returns ``(out, lse)`` as
    ``window_attention_fwd`` does: out ``[B, S, Hq, D]``, lse ``[B, Hq, S]`` float32 (a view of a
    ``[Hq, B * S]`` buffer). ``config = (BLOCK_M, BLOCK_N, STAGES)`` overrides the launch shape."""
    B, S, Hq, D = q.shape
    Hkv = k.shape[2]
    block_m, block_n, stages = config or CONFIG[D]
    out = torch.empty(B, S, Hq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(Hq, B * S, device=q.device, dtype=torch.float32)
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    grid = (triton.cdiv(S, block_m), B * Hq)
    _window_attn_fwd_sm90_kernel[grid](
        _descriptor(q, block_m // 2), _descriptor(k, block_n), _descriptor(v, block_n), _descriptor(out, block_m // 2),
        lse, lse.stride(0), S, scale * LOG2E, window, sinks, Hq, Hq // Hkv,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, PINGPONG=PINGPONG if pingpong is None else pingpong,
        CONSUMER_REGS=CONSUMER_REGS, num_warps=4, maxnreg=MAXNREG,
    )
    return out, lse.view(Hq, B, S).transpose(0, 1)
