"""Compressed gradient communication for DistributedDataParallel: INT8 / FP8 buckets with error
feedback.

Usage::

    from deepseek_kernels.distributed import QuantizedGradState, quantized_allreduce_hook

    state = QuantizedGradState(fmt="int8", block=128)
    ddp_model.register_comm_hook(state, quantized_allreduce_hook)
    ...
    print(state.report())          # bytes sent vs an fp32 / bf16 all-reduce, residual memory

Algorithm (per bucket of L gradient elements on W ranks). Codes with per-rank scales cannot be
summed inside an all-reduce, so the reduction happens locally, in fp32, between two quantized hops:

1. Quantize ``bucket + residual1`` blockwise (hop 1, error feedback updates ``residual1`` in
   place) straight into send buffers zero-padded to ``P = ceil(L / (W * block)) * W * block``
   elements: W shards of ``S = P / W`` elements (whole blocks). One kernel
   (``quantize_blockwise_into``; the padding is zero-filled by memsets).
2. ``all_to_all`` (codes, and the fp32 scales alongside): shard j goes to rank j.
3. Rank r dequantizes the W copies of its shard, sums them in fp32 in rank order
   (deterministic), divides by W and re-quantizes that mean shard (hop 2, with its own
   ``residual2``): one kernel (``requantize_sum_blockwise``), the sum never goes to memory.
4. ``all_gather`` codes and scales, dequantize all shards in the gradient's dtype (one kernel)
   and drop the padding; DDP copies the result into the gradients.

On CUDA the hook enqueues a bucket's whole pipeline at once on a side stream (which first waits
for the backward pass's stream) and returns a CUDA-aware future set there: no host callback, no
synchronization. The hook's cost in a real DDP step is host time per bucket (benchmarks/NOTES.md,
session 7), so two options of :class:`QuantizedGradState` change how a bucket is issued, never its
result: ``cuda_graphs=True`` replays each bucket's pipeline from a CUDA graph (one launch per bucket
instead of ~15), and ``pack_wire`` sends codes and scales in one buffer (one collective per hop
instead of two; by default on exactly when ``cuda_graphs`` is). Measured on one H200 (world size 1,
NCCL: the same host work with trivial exchanges; a 1.21B GPT in 73 buckets of 25 MB, step time over
10 steps, session 8): DDP's all-reduce 96.7 ms per step, torch's ``bf16_compress_hook`` 106.1 ms,
this hook 134.7 ms eager (57.4 ms of hook host time per step) and 117.9 ms with ``cuda_graphs=True``
(19.6 ms). On 2 H200s (session 9): over NVLink all-reduce 107.3 ms, the hook 165.9 ms eager (150.9
packed) and 122.2 ms graphed (115.1 with separate codes and scales); over host memory
(``NCCL_P2P_DISABLE=1``, 5 steps) all-reduce 231.7 ms, the hook 154.4 ms eager but 176.1 ms graphed
(hook host time 60 -> 90 ms per step), which is why ``cuda_graphs`` stays opt-in.

Each rank sends ``2 (W-1)/W * P * (1 + 4/block)`` bytes (one byte per code plus the scales) against
``2 (W-1)/W * 4L`` for a ring all-reduce in fp32: about a quarter.

Non-finite gradients are reported, not hidden: a block holding NaN/Inf gets a NaN scale, so the
reduced gradient is NaN in exactly those blocks on every rank (as an uncompressed all-reduce
would be), ``state.found_nonfinite`` turns True, and the residuals of those blocks stay untouched
(so the next step is not poisoned). ``torch.cuda.amp.GradScaler`` then skips the step as usual.

Backends: NCCL on GPUs and gloo on CPUs, both through ``all_to_all_single`` and
``all_gather_into_tensor`` (gloo implements both in the torch versions this package supports; a
gloo build without ``all_gather_into_tensor`` falls back to ``all_gather`` into a list).
FSDP2 is not covered: its public API (torch 2.11-2.14) offers no hook that receives the gradient
buckets before the reduce-scatter in a form this algorithm can replace.
"""

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

import deepseek_kernels.ops.quantization  # noqa: F401  (registers the ops bound in FAST_OPS)
from deepseek_kernels.ops.quantization import key_int, key_value
from deepseek_kernels.reference.quantization import (
    FORMATS,
    dequantize_blockwise_ref,
    quantize_blockwise_into_ref,
    requantize_sum_blockwise_ref,
    stochastic_key,
)

__all__ = ["QuantizedGradState", "quantized_allreduce_hook", "register_quantized_comm_hook"]


@dataclass
class _BucketResiduals:
    length: int
    hop1: torch.Tensor | None  # [L] fp32, this rank's quantization error of the full bucket
    hop2: torch.Tensor | None  # [S] fp32, this rank's error on its reduced shard


@dataclass
class QuantizedGradState:
    """Configuration and running statistics of :func:`quantized_allreduce_hook`.

    Args:
        fmt: ``"int8"``, ``"fp8_e4m3"`` or ``"fp8_e5m2"``.
        block: elements per quantization block (a positive multiple of 16).
        stochastic: unbiased stochastic rounding (seeded per step, bucket, rank and hop).
        error_feedback: keep per-bucket residuals so each step's quantization error is added back
            in the next one.
        process_group: the group to reduce over (default: the world).
        seed: base seed of the stochastic-rounding streams.
        cuda_graphs: capture each bucket's whole pipeline (both hops, both exchanges, the
            decompression) in a CUDA graph on its second call and replay it from then on: one
            launch per bucket instead of ~15, since host time, not GPU time, is what the hook costs
            in a DDP step. The stochastic-rounding keys are written into device memory before each
            replay (the kernels read them at run time), so a replay is bit-identical to the eager
            pipeline; a bucket whose buffer, size or settings change is captured again. Measured on
            one H200 (world size 1, 1.21B GPT, 73 buckets of 25 MB, session 8): 117.9 ms per step
            and 19.6 ms of hook host time with the packed wire (119.3 / 26.3 ms with separate codes
            and scales; fp8_e4m3: 118.2 / 26.0 ms) against 134.7 / 57.4 ms eager. On 2 H200s (session
            9) it wins over NVLink (122.2 vs 165.9 ms per step) and loses over host memory
            (``NCCL_P2P_DISABLE=1``: 176.1 vs 154.4 ms), so it is opt-in. Ignored for CPU tensors
            (the gloo path runs eagerly).
        pack_wire: send codes and scales in one buffer, one all-to-all and one all-gather per
            bucket instead of two of each. ``None`` (default): packed exactly when ``cuda_graphs``
            is on, which measured best (eager, packing cost more than it saved: 138.9 vs 134.7 ms per
            step, session 8); ``True`` / ``False`` force it. Same arithmetic and seeds: the result is
            bit-identical either way.
    """

    fmt: str = "int8"
    block: int = 128
    stochastic: bool = True
    error_feedback: bool = True
    process_group: dist.ProcessGroup | None = None
    seed: int = 0
    cuda_graphs: bool = False
    pack_wire: bool | None = None
    # running statistics (read them, do not set them)
    steps: int = 0
    buckets_reduced: int = 0
    bytes_sent: int = 0
    fp32_allreduce_bytes: int = 0
    bf16_allreduce_bytes: int = 0
    found_nonfinite: bool = False
    _residuals: dict = field(default_factory=dict, repr=False)
    _nonfinite: torch.Tensor | None = field(default=None, repr=False)  # device flag, no sync
    _streams: dict = field(default_factory=dict, repr=False)  # device -> the hook's side stream
    _graphs: dict = field(default_factory=dict, repr=False)  # bucket index -> signature or _BucketGraph
    _graph_pools: dict = field(default_factory=dict, repr=False)  # device -> memory pool of the graphs

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"QuantizedGradState: fmt must be one of {tuple(FORMATS)}, got {self.fmt!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block <= 0 or self.block % 16:
            raise ValueError(f"QuantizedGradState: block must be a positive multiple of 16, got {self.block!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuantizedGradState: seed must be a non-negative int, got {self.seed!r}")
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"QuantizedGradState: cuda_graphs must be True or False, got {self.cuda_graphs!r}")
        if self.pack_wire is not None and not isinstance(self.pack_wire, bool):
            raise ValueError(
                f"QuantizedGradState: pack_wire must be None (packed exactly when cuda_graphs is on), True or False, "
                f"got {self.pack_wire!r}"
            )

    @property
    def packs_wire(self) -> bool:
        """``pack_wire`` resolved: whether codes and scales travel in one buffer."""
        return self.cuda_graphs if self.pack_wire is None else self.pack_wire

    # ---- statistics ----------------------------------------------------------------------------

    def residual_bytes(self) -> int:
        """Memory held by the error-feedback residuals on this rank."""
        return sum(
            t.numel() * t.element_size()
            for r in self._residuals.values()
            for t in (r.hop1, r.hop2)
            if t is not None
        )

    def compression_ratio(self) -> float:
        """Bytes sent over the bytes an fp32 ring all-reduce of the same buckets would send."""
        return self.bytes_sent / self.fp32_allreduce_bytes if self.fp32_allreduce_bytes else float("nan")

    def check_nonfinite(self) -> bool:
        """True if any bucket reduced so far held a NaN/Inf gradient on any rank (reads a device
        flag, so it synchronizes; the hook itself never does)."""
        if self._nonfinite is not None:
            self.found_nonfinite = self.found_nonfinite or bool(self._nonfinite)
            self._nonfinite = None
        return self.found_nonfinite

    def _fold_nonfinite(self, bad: torch.Tensor) -> None:
        """ORs a bucket's device flag into the step's (no sync; ``bad`` may be a graph's static
        output, so it is copied, never kept)."""
        self._nonfinite = bad.clone() if self._nonfinite is None else self._nonfinite | bad

    def report(self) -> str:
        mb = 1 / 2**20
        return (
            f"{self.fmt} block={self.block} EF={'on' if self.error_feedback else 'off'}: "
            f"{self.steps} steps, {self.buckets_reduced} buckets, sent {self.bytes_sent * mb:.2f} MiB "
            f"(fp32 all-reduce {self.fp32_allreduce_bytes * mb:.2f} MiB, bf16 {self.bf16_allreduce_bytes * mb:.2f} MiB; "
            f"ratio {self.compression_ratio():.3f} of fp32), residuals {self.residual_bytes() * mb:.2f} MiB, "
            f"non-finite seen: {self.check_nonfinite()}"
        )

    # ---- helpers for the hook ------------------------------------------------------------------

    def _seed_for(self, bucket_index: int, rank: int, hop: int) -> int:
        mix = stochastic_key(self.seed) ^ (self.steps * 0x9E3779B1) ^ (bucket_index << 20) ^ (rank << 8) ^ hop
        return (stochastic_key(mix) << 31 | stochastic_key(mix + 1)) & (2**62 - 1)

    def _stream_for(self, device: torch.device) -> "torch.cuda.Stream":
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def _residuals_for(self, bucket_index: int, plan: "_Plan", device) -> "_BucketResiduals":
        r = self._residuals.get(bucket_index)
        if r is None or r.length != plan.length or (r.hop1 is not None and r.hop1.device != device):
            # DDP rebuilds its buckets after the first iteration: a bucket whose size changed
            # starts with a fresh (zero) residual.
            make = (lambda n: torch.zeros(n, dtype=torch.float32, device=device)) if self.error_feedback else (lambda n: None)
            r = _BucketResiduals(plan.length, make(plan.length), make(plan.shard))
            self._residuals[bucket_index] = r
        return r


@dataclass(frozen=True)
class HookOps:
    """The three ops of the hook's local pipeline, called positionally with the registered ops'
    arguments (the benchmark and the tests swap in the reference functions):

    - ``quantize_into(x, fmt, block, stochastic, seed, error, q_out, scales_out)``: hop 1, straight
      into the zero-padded send buffers;
    - ``requantize_sum(q, scales, block, average, stochastic, seed, error) -> (q, scales)``: the
      reduce step (dequantize the W received shards, sum in fp32, divide by W, re-quantize with
      error feedback), one kernel;
    - ``dequantize(q, scales, block, out_dtype)``: the gathered shards back to the bucket's dtype.
    """

    quantize_into: Callable
    requantize_sum: Callable
    dequantize: Callable


# The registered ops directly: the hook's shapes and settings are valid by construction (the state
# checked fmt and block), so the public functions' Python checks are skipped on this hot path; the
# ops' own kernels still validate.
FAST_OPS = HookOps(
    quantize_into=torch.ops.deepseek_kernels.quantize_blockwise_into.default,
    requantize_sum=torch.ops.deepseek_kernels.requantize_sum_blockwise.default,
    dequantize=torch.ops.deepseek_kernels.dequantize_blockwise.default,
)


def _ref_quantize_into(x, fmt, block, stochastic, seed, error, q_out, scales_out, key=None):
    quantize_blockwise_into_ref(x, fmt, block, q_out, scales_out, stochastic=stochastic, seed=seed, error=error,
                                key=key_int(key))


def _ref_requantize_sum(q, scales, block, average, stochastic, seed, error, key=None):
    return requantize_sum_blockwise_ref(q, scales, block, average=average, stochastic=stochastic, seed=seed,
                                        error=error, key=key_int(key))


# The same pipeline through the plain-PyTorch definitions (test oracle, benchmark baseline).
REFERENCE_OPS = HookOps(quantize_into=_ref_quantize_into, requantize_sum=_ref_requantize_sum,
                        dequantize=dequantize_blockwise_ref)


@dataclass
class _Plan:
    """Sizes of one bucket's reduction on `world` ranks."""

    world: int
    length: int  # L, elements in the bucket
    padded: int  # P, a multiple of world * block
    shard: int  # S = P / world
    block: int

    @staticmethod
    def of(length: int, world: int, block: int) -> "_Plan":
        padded = math.ceil(length / (world * block)) * world * block
        return _Plan(world, length, padded, padded // world, block)

    @property
    def shard_blocks(self) -> int:  # scales per shard
        return self.shard // self.block

    @property
    def wire(self) -> int:
        """Bytes per shard of the packed exchange: S codes, then the shard's fp32 scales, padded
        to 16 bytes (S is a multiple of block, itself a multiple of 16, so every part is aligned)."""
        return self.shard + -(-4 * self.shard_blocks // 16) * 16


def _pack_wire(plan: _Plan, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[shards, wire] bytes holding codes [shards * S] and scales [shards * S / block] shard by
    shard (all world shards for hop 1, this rank's one for hop 2)."""
    shards = codes.numel() // plan.shard
    wire = torch.empty(shards, plan.wire, dtype=torch.uint8, device=codes.device)
    codes_view, scales_view = _unpack_wire(plan, wire)
    codes_view.copy_(codes.view(shards, plan.shard))
    scales_view.copy_(scales.view(shards, plan.shard_blocks))
    return wire


def _unpack_wire(plan: _Plan, wire: torch.Tensor):
    """The codes [rows, S] (bytes) and scales [rows, S / block] (fp32) views of a packed wire (the
    ops copy these strided views contiguous first: four small copies per bucket)."""
    rows = wire.view(-1, plan.wire)
    return rows[:, :plan.shard], rows[:, plan.shard:plan.shard + 4 * plan.shard_blocks].view(torch.float32)


def compress_bucket(state: "QuantizedGradState", flat: torch.Tensor, plan: _Plan, residual, seed: int,
                    ops: HookOps = FAST_OPS, key: torch.Tensor | None = None):
    """Hop 1: quantize the bucket (plus its residual) straight into the send buffers: codes [P]
    (bytes) and scales [P / block], laid out as `world` equal shards, zero-padded to whole blocks
    (one kernel; the padding is zero-filled by memsets, no copy)."""
    codes = torch.empty(plan.padded, dtype=FORMATS[state.fmt].dtype, device=flat.device)
    scales = torch.empty(plan.padded // plan.block, dtype=torch.float32, device=flat.device)
    ops.quantize_into(flat, state.fmt, plan.block, state.stochastic, seed, residual, codes, scales, key)
    return codes.view(torch.uint8), scales


def reduce_shard(state: "QuantizedGradState", codes: torch.Tensor, scales: torch.Tensor, plan: _Plan,
                 residual, seed: int, ops: HookOps = FAST_OPS, key: torch.Tensor | None = None):
    """After the all-to-all: the mean of the `world` copies of this rank's shard, summed in fp32
    in rank order (deterministic), re-quantized (hop 2) with its residual, in one kernel.
    codes [W * S] bytes, scales [W * S / block]; returns codes [S] bytes and scales [S / block]."""
    code_dtype = FORMATS[state.fmt].dtype
    q, s = ops.requantize_sum(codes.view(code_dtype).view(plan.world, plan.shard), scales.view(plan.world, -1),
                              plan.block, True, state.stochastic, seed, residual, key)
    return q.view(torch.uint8), s


def decompress_bucket(state: "QuantizedGradState", codes: torch.Tensor, scales: torch.Tensor, plan: _Plan,
                      dtype: torch.dtype, ops: HookOps = FAST_OPS) -> torch.Tensor:
    """After the all-gather: every rank's reduced shard, dequantized into the bucket's dtype
    (padding dropped). codes [P] bytes, scales [P / block]."""
    code_dtype = FORMATS[state.fmt].dtype
    out = ops.dequantize(codes.view(code_dtype).view(plan.world, plan.shard), scales.view(plan.world, -1),
                         plan.block, dtype)
    return out.view(-1)[: plan.length]


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    try:
        dist.all_gather_into_tensor(out, inp, group=group)
    except (RuntimeError, NotImplementedError):  # backends without the tensor form
        dist.all_gather(list(out.chunk(dist.get_world_size(group))), inp, group=group)


# Profiler ranges around the hook's phases ("dsk_hook:compress", ...), for attributing its host
# time under torch.profiler (benchmarks/multi_gpu_ddp.py --profile turns them on). Off by default:
# each range costs a few microseconds even when no profiler runs.
PROFILE_RANGES = False


def _phase(name: str):
    return torch.profiler.record_function(name) if PROFILE_RANGES else contextlib.nullcontext()


def quantized_allreduce_hook(state: QuantizedGradState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of the bucket over the group, sent as blockwise INT8/FP8
    codes (see the module docstring). Register with ``ddp_model.register_comm_hook(state, hook)``."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    buffer = bucket.buffer()
    index = bucket.index()
    if index == 0:
        state.steps += 1  # DDP reduces buckets in index order: bucket 0 starts a backward pass

    flat = buffer.view(-1)
    plan = _Plan.of(flat.numel(), world, state.block)
    state.bytes_sent += 2 * (world - 1) * (plan.wire if state.packs_wire else plan.shard + 4 * plan.shard_blocks)
    state.fp32_allreduce_bytes += 2 * (world - 1) * plan.length * 4 // world
    state.bf16_allreduce_bytes += 2 * (world - 1) * plan.length * 2 // world
    state.buckets_reduced += 1
    if not buffer.is_cuda:
        # gloo: run the whole exchange synchronously (its futures run callbacks on the backend's
        # own threads, where issuing the next collective can deadlock or abort).
        done: torch.futures.Future = torch.futures.Future()
        out, bad = _reduce_bucket(state, flat, plan, index, rank, group)
        state._fold_nonfinite(bad)
        done.set_result(out.view(buffer.shape))
        return done
    # Everything enqueued now on the hook's side stream (one per device), which first waits for the
    # backward pass's stream (the bucket's gradients). The collectives are stream-ordered (the side
    # stream waits for each one's end), so no host callback is needed: the returned CUDA-aware
    # future completes where the side stream reaches the end of the bucket's work, and DDP's wait()
    # makes its own stream wait for that. The backward pass keeps running meanwhile. (This replaced
    # a host callback chained on the all-to-all's future: 151.8 ms per step and 67.9 ms of hook host
    # time against 134.7 / 57.4 ms on one H200, session 8.)
    side = state._stream_for(buffer.device)
    side.wait_stream(torch.cuda.current_stream(buffer.device))
    with torch.cuda.stream(side):
        if state.cuda_graphs:
            out, bad = _graphed_bucket(state, flat, plan, index, rank, group)
        else:
            out, bad = _reduce_bucket(state, flat, plan, index, rank, group)
        state._fold_nonfinite(bad)  # NaN scales reach every rank: all ranks flag the step
        fut: torch.futures.Future = torch.futures.Future(devices=[buffer.device])
        fut.set_result(out.view(buffer.shape))  # records an event on the side stream
    return fut


def _reduce_bucket(state: QuantizedGradState, flat: torch.Tensor, plan: _Plan, index: int, rank: int, group,
                   keys=(None, None)):
    """The whole pipeline of one bucket on the current stream, in stream order: (mean [L], device
    flag of a non-finite scale). ``keys``: device-resident stochastic-rounding keys of the two hops
    (graph capture) instead of the ones derived from the seeds."""
    sent = _send_bucket(state, flat, plan, index, rank, group, key=keys[0])
    return _finish_bucket(state, plan, index, rank, group, flat.dtype, *sent, key=keys[1])


def _send_bucket(state: QuantizedGradState, flat: torch.Tensor, plan: _Plan, index: int, rank: int, group,
                 key: torch.Tensor | None = None):
    """Hop 1 and the all-to-all on the current stream, in stream order: (residuals, received codes
    and scales)."""
    with _phase("dsk_hook:compress"):
        res = state._residuals_for(index, plan, flat.device)
        codes, scales = compress_bucket(state, flat, plan, res.hop1, state._seed_for(index, rank, 1), key=key)
        if state.packs_wire:
            send = _pack_wire(plan, codes, scales)
            recv = torch.empty_like(send)
        else:
            codes_in, scales_in = torch.empty_like(codes), torch.empty_like(scales)
    with _phase("dsk_hook:all_to_all"):
        if state.packs_wire:
            dist.all_to_all_single(recv, send, group=group)
            codes_in, scales_in = _unpack_wire(plan, recv)
        else:
            dist.all_to_all_single(scales_in, scales, group=group)  # scales first (small)
            dist.all_to_all_single(codes_in, codes, group=group)
    return res, codes_in, scales_in


def _finish_bucket(state: QuantizedGradState, plan: _Plan, index: int, rank: int, group, dtype: torch.dtype, res,
                   codes_in: torch.Tensor, scales_in: torch.Tensor, key: torch.Tensor | None = None):
    """Hop 2, the all-gather and the decompression on the current stream: (mean [L], device flag:
    a scale of the reduced bucket is non-finite)."""
    with _phase("dsk_hook:reduce"):
        q2, s2 = reduce_shard(state, codes_in, scales_in, plan, res.hop2, state._seed_for(index, rank, 2), key=key)
        if state.packs_wire:
            mine = _pack_wire(plan, q2, s2).view(-1)
            gathered = torch.empty(plan.world, plan.wire, dtype=torch.uint8, device=codes_in.device)
        else:
            codes_out = torch.empty(plan.padded, dtype=torch.uint8, device=codes_in.device)
            scales_out = torch.empty(plan.padded // plan.block, dtype=torch.float32, device=codes_in.device)
    with _phase("dsk_hook:all_gather"):
        if state.packs_wire:
            _all_gather_into(gathered.view(-1), mine, group)
            codes_out, scales_out = _unpack_wire(plan, gathered)
        else:
            _all_gather_into(codes_out, q2, group)
            _all_gather_into(scales_out, s2, group)
    with _phase("dsk_hook:decompress"):
        bad = ~torch.isfinite(scales_out).all()  # NaN scales reach every rank: all ranks flag the step
        return decompress_bucket(state, codes_out, scales_out, plan, dtype), bad


@dataclass
class _BucketGraph:
    """One bucket's captured pipeline: replay after writing the two hops' keys into ``keys``."""

    signature: tuple
    graph: "torch.cuda.CUDAGraph"
    keys: torch.Tensor  # int32 [2] on the device: hop 1, hop 2
    out: torch.Tensor  # the mean [L]: DDP's bucket buffer, rewritten by every replay
    bad: torch.Tensor  # the non-finite flag (static)


def _graphed_bucket(state: QuantizedGradState, flat: torch.Tensor, plan: _Plan, index: int, rank: int, group):
    """``state.cuda_graphs``: the bucket's pipeline eagerly on its first call, captured and replayed
    on its second, replayed from then on; a new signature (DDP rebuilt its buckets, the settings
    changed) starts over. All ranks call the hook on the same buckets in the same order, so they
    capture on the same call. Runs on the side stream (the current stream here)."""
    signature = (flat.data_ptr(), flat.numel(), flat.dtype, plan.world, state.fmt, state.block, state.stochastic,
                 state.error_feedback, state.packs_wire, id(group))
    seen = state._graphs.get(index)
    key1 = key_value(state._seed_for(index, rank, 1))
    key2 = key_value(state._seed_for(index, rank, 2))
    if isinstance(seen, _BucketGraph) and seen.signature == signature:
        seen.keys[0].fill_(key1)  # by value at launch: safe however far the host runs ahead
        seen.keys[1].fill_(key2)
        seen.graph.replay()
        return seen.out, seen.bad
    if seen != signature:
        state._graphs[index] = signature
        return _reduce_bucket(state, flat, plan, index, rank, group)
    keys = torch.empty(2, dtype=torch.int32, device=flat.device)
    keys[0].fill_(key1)
    keys[1].fill_(key2)
    graph = torch.cuda.CUDAGraph()
    pool = state._graph_pools.get(flat.device)
    if pool is None:
        pool = state._graph_pools[flat.device] = torch.cuda.graph_pool_handle()
    try:
        # thread_local: NCCL's watchdog thread keeps querying its events during the capture
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.current_stream(flat.device),
                              capture_error_mode="thread_local"):
            mean, bad = _reduce_bucket(state, flat, plan, index, rank, group, keys=(keys[0:1], keys[1:2]))
            # The mean back into DDP's own bucket buffer (hop 1 has consumed it), as an in-place
            # all-reduce does: the graph then keeps no output of its own (L x 4 bytes per bucket
            # for fp32 gradients) and its intermediates are free for the next bucket's capture.
            flat.copy_(mean)
            del mean
        out = flat
    except Exception as exc:
        raise RuntimeError(
            f"quantized_allreduce_hook: capturing bucket {index} in a CUDA graph failed ({exc}); pass "
            "cuda_graphs=False (QuantizedGradState or register_quantized_comm_hook) to run the hook without graphs"
        ) from exc
    state._graphs[index] = _BucketGraph(signature, graph, keys, out, bad)
    graph.replay()  # the capture only recorded the work
    return out, bad


def register_quantized_comm_hook(model: torch.nn.Module, state: "QuantizedGradState | None" = None,
                                 **state_kwargs) -> QuantizedGradState:
    """Registers :func:`quantized_allreduce_hook` on a ``DistributedDataParallel`` model and
    returns its state (created from ``state_kwargs`` when not given).

    The hook costs host time per bucket (about 1 ms on an H200 host with 2 GPUs in session 7, with
    the host-callback path since replaced: four collectives and three kernels issued from the
    backward pass's thread; on one H200 in session 8, 0.8 ms eager and 0.27 ms with
    ``cuda_graphs=True``), so build the DDP model with large buckets, e.g.
    ``DistributedDataParallel(model, bucket_cap_mb=100)``: a 1.2B-parameter model then has ~37
    buckets instead of 73 (benchmarks/NOTES.md, session 7)."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        raise TypeError(
            "register_quantized_comm_hook: model must be a torch.nn.parallel.DistributedDataParallel, got "
            f"{type(model).__name__}; wrap it first: DistributedDataParallel(model, ...)"
        )
    if state is not None and state_kwargs:
        raise ValueError("register_quantized_comm_hook: pass either state or state keyword arguments, not both")
    state = state or QuantizedGradState(**state_kwargs)
    model.register_comm_hook(state, quantized_allreduce_hook)
    return state
