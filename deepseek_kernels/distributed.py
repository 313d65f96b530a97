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

1. Pad the flat bucket to ``P = ceil(L / (W * block)) * W * block`` elements (zeros) and cut it
   into W shards of ``S = P / W`` elements (whole blocks). Quantize ``bucket + residual1``
   blockwise (hop 1, error feedback updates ``residual1`` in place).
2. ``all_to_all``: shard j (codes + fp32 scales, packed into one byte buffer) goes to rank j.
3. Rank r dequantizes the W copies of its shard, sums them in fp32 and divides by W.
4. Re-quantize that mean shard (hop 2, with its own ``residual2``), ``all_gather`` the packed
   shards, dequantize all of them into the bucket (cast to the gradient dtype), drop the padding.

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

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from deepseek_kernels.ops.quantization import dequantize_blockwise, quantize_blockwise
from deepseek_kernels.reference.quantization import FORMATS, stochastic_key

__all__ = ["QuantizedGradState", "quantized_allreduce_hook", "register_quantized_comm_hook"]


@dataclass
class _BucketResiduals:
    length: int
    hop1: torch.Tensor | None  # [P] fp32, this rank's quantization error of the full bucket
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
    """

    fmt: str = "int8"
    block: int = 128
    stochastic: bool = True
    error_feedback: bool = True
    process_group: dist.ProcessGroup | None = None
    seed: int = 0
    # running statistics (read them, do not set them)
    steps: int = 0
    buckets_reduced: int = 0
    bytes_sent: int = 0
    fp32_allreduce_bytes: int = 0
    bf16_allreduce_bytes: int = 0
    found_nonfinite: bool = False
    _residuals: dict = field(default_factory=dict, repr=False)
    _nonfinite: torch.Tensor | None = field(default=None, repr=False)  # device flag, no sync

    def __post_init__(self):
        if self.fmt not in FORMATS:
            raise ValueError(f"QuantizedGradState: fmt must be one of {tuple(FORMATS)}, got {self.fmt!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block <= 0 or self.block % 16:
            raise ValueError(f"QuantizedGradState: block must be a positive multiple of 16, got {self.block!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"QuantizedGradState: seed must be a non-negative int, got {self.seed!r}")

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

    def _flag_nonfinite(self, scales: torch.Tensor) -> None:
        bad = ~torch.isfinite(scales).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad

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

    def _residuals_for(self, bucket_index: int, length: int, padded: int, shard: int, device) -> "_BucketResiduals":
        r = self._residuals.get(bucket_index)
        if r is None or r.length != length or (r.hop1 is not None and r.hop1.device != device):
            # DDP rebuilds its buckets after the first iteration: a bucket whose size changed
            # starts with a fresh (zero) residual.
            make = (lambda n: torch.zeros(n, dtype=torch.float32, device=device)) if self.error_feedback else (lambda n: None)
            r = _BucketResiduals(length, make(padded), make(shard))
            self._residuals[bucket_index] = r
        return r


def _pack(q: torch.Tensor, scales: torch.Tensor, world: int) -> torch.Tensor:
    """Codes [W*S] + scales [W*S/block] -> one byte buffer [W, S + 4*S/block] (shard-major)."""
    return torch.cat([q.view(torch.uint8).view(world, -1), scales.view(world, -1).view(torch.uint8)], dim=1)


def _unpack(buf: torch.Tensor, shard: int, code_dtype: torch.dtype):
    world = buf.shape[0]
    q = buf[:, :shard].contiguous().view(code_dtype)
    scales = buf[:, shard:].contiguous().view(torch.float32).view(world, -1)
    return q, scales


def _all_gather_into(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    try:
        dist.all_gather_into_tensor(out, inp, group=group)
    except (RuntimeError, NotImplementedError):  # backends without the tensor form
        dist.all_gather(list(out.chunk(dist.get_world_size(group))), inp, group=group)


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

    fmt, block = state.fmt, state.block
    code_dtype = FORMATS[fmt].dtype
    length = buffer.numel()
    padded = math.ceil(length / (world * block)) * world * block
    shard = padded // world
    res = state._residuals_for(index, length, padded, shard, buffer.device)

    flat = torch.zeros(padded, dtype=torch.float32, device=buffer.device)
    flat[:length] = buffer.reshape(-1)
    q1, s1 = quantize_blockwise(flat, fmt, block, stochastic=state.stochastic,
                                seed=state._seed_for(index, rank, 1), error=res.hop1)
    send = _pack(q1, s1, world)
    recv = torch.empty_like(send)
    wire = send.numel() // world  # bytes per shard
    state.bytes_sent += 2 * (world - 1) * wire
    state.fp32_allreduce_bytes += 2 * (world - 1) * length * 4 // world
    state.bf16_allreduce_bytes += 2 * (world - 1) * length * 2 // world
    state.buckets_reduced += 1

    def reduce_and_gather(_fut) -> torch.Tensor:
        q_in, s_in = _unpack(recv, shard, code_dtype)
        mean = dequantize_blockwise(q_in, s_in, block, torch.float32).sum(0).div_(world)
        q2, s2 = quantize_blockwise(mean, fmt, block, stochastic=state.stochastic,
                                    seed=state._seed_for(index, rank, 2), error=res.hop2)
        gathered = torch.empty(world, wire, dtype=torch.uint8, device=buffer.device)
        _all_gather_into(gathered.view(-1), _pack(q2, s2, 1).view(-1), group)
        q_out, s_out = _unpack(gathered, shard, code_dtype)
        state._flag_nonfinite(s_out)  # NaN scales reach every rank: all ranks flag the step
        out = dequantize_blockwise(q_out, s_out, block, torch.float32).view(-1)[:length]
        buffer.copy_(out.view(buffer.shape))
        return buffer

    work = dist.all_to_all_single(recv, send, group=group, async_op=True)
    if buffer.is_cuda:
        # NCCL: the rest runs as a CUDA-aware callback once the all-to-all is done, so DDP can
        # overlap this bucket's communication with the rest of the backward pass.
        return work.get_future().then(reduce_and_gather)
    # gloo: its futures run callbacks on the backend's own threads, where issuing the next
    # collective can deadlock or abort; finish on the calling thread instead.
    work.wait()
    done: torch.futures.Future = torch.futures.Future()
    done.set_result(reduce_and_gather(None))
    return done


def register_quantized_comm_hook(model: torch.nn.Module, state: "QuantizedGradState | None" = None,
                                 **state_kwargs) -> QuantizedGradState:
    """Registers :func:`quantized_allreduce_hook` on a ``DistributedDataParallel`` model and
    returns its state (created from ``state_kwargs`` when not given)."""
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
