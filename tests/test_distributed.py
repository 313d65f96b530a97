"""The quantized DDP communication hook on real torch.distributed (gloo, 2 and 4 CPU ranks)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from deepseek_kernels.distributed import QuantizedGradState, quantized_allreduce_hook, register_quantized_comm_hook
from dist_utils import run_on_ranks

# Relative error ||out - mean|| / ||mean|| allowed after both hops (stochastic rounding, random
# Gaussian gradients); about 2x what the formats give (int8 ~1.4 %, e4m3 ~6 %, e5m2 ~12 %).
TOL = {"int8": 0.03, "fp8_e4m3": 0.12, "fp8_e5m2": 0.25}
LENGTHS = [1, 17, 1000, 4097, 300, 2048]


class OneBucket:
    """A gradient bucket for calling the hook directly, outside a DDP backward pass: it offers the
    two ``GradBucket`` methods the hook reads (``index()`` and ``buffer()``); the collectives
    underneath are the real ones."""

    def __init__(self, index: int, buffer: torch.Tensor):
        self._index, self._buffer = index, buffer

    def index(self) -> int:
        return self._index

    def buffer(self) -> torch.Tensor:
        return self._buffer


def grad_of(rank: int, length: int, salt: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(7919 * length + 104729 * rank + salt)
    return torch.randn(length, generator=g) * (1 + rank)


def exact_mean(world: int, length: int, salt: int = 0) -> torch.Tensor:
    return torch.stack([grad_of(r, length, salt) for r in range(world)]).double().mean(0)


def rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def same_on_all_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(g.view(torch.uint8) if g.is_floating_point() else g, gathered[0].view(torch.uint8)
                           if gathered[0].is_floating_point() else gathered[0]) for g in gathered)


def _hook_checks(rank: int, world: int) -> None:
    for fmt in TOL:
        state = QuantizedGradState(fmt=fmt, block=128, seed=3)
        for i, n in enumerate(LENGTHS):
            out = quantized_allreduce_hook(state, OneBucket(i, grad_of(rank, n).clone())).wait()
            ref = exact_mean(world, n)
            assert out.shape == (n,) and torch.isfinite(out).all()
            assert rel(out, ref) < TOL[fmt], (fmt, n, rel(out, ref))
            assert same_on_all_ranks(out), (fmt, n)
        assert not state.check_nonfinite()
        # residuals: one fp32 copy of each bucket plus this rank's (padded) shard of it
        padded = [-(-n // (world * 128)) * world * 128 for n in LENGTHS]
        assert state.residual_bytes() == sum(4 * n + 4 * p // world for n, p in zip(LENGTHS, padded))
    # bf16 gradients come back in bf16
    state = QuantizedGradState(fmt="int8")
    out = quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, 999).bfloat16())).wait()
    assert out.dtype == torch.bfloat16 and rel(out.float(), exact_mean(world, 999)) < 0.03
    # all-zero gradients: exact zeros, no NaN
    out = quantized_allreduce_hook(state, OneBucket(1, torch.zeros(777))).wait()
    assert torch.equal(out, torch.zeros(777)) and not state.check_nonfinite()
    # byte accounting: one bucket of 128k fp32 gradients sends about a quarter of fp32's bytes
    state = QuantizedGradState(fmt="fp8_e4m3")
    n = 128 * 1024
    quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, n))).wait()
    expected = 2 * (world - 1) * (n // world) * (1 + 4 / 128)
    assert state.bytes_sent == expected and state.fp32_allreduce_bytes == 2 * (world - 1) * n * 4 // world
    assert abs(state.compression_ratio() - (1 + 4 / 128) / 4) < 1e-9
    assert state.bf16_allreduce_bytes == state.fp32_allreduce_bytes // 2
    assert "ratio 0.258 of fp32" in state.report() and "non-finite seen: False" in state.report()


def _nonfinite_checks(rank: int, world: int) -> None:
    state = QuantizedGradState(fmt="int8", block=128)
    g = grad_of(rank, 1000)
    if rank == 0:
        g[130] = float("nan")
    if rank == world - 1:
        g[600] = float("inf")
    out = quantized_allreduce_hook(state, OneBucket(0, g)).wait()
    bad = torch.zeros(1000, dtype=torch.bool)
    bad[128:256] = True
    bad[512:640] = True
    assert torch.isnan(out[bad]).all(), "the blocks holding NaN/Inf must come back NaN"
    assert torch.isfinite(out[~bad]).all()
    assert rel(out[~bad], exact_mean(world, 1000)[~bad]) < TOL["int8"]
    assert state.check_nonfinite()  # flagged on every rank, not only the one with the NaN
    res = state._residuals[0]
    assert torch.isfinite(res.hop1).all() and torch.isfinite(res.hop2).all()
    # the next, finite step is not poisoned by the residuals
    out = quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, 1000))).wait()
    assert torch.isfinite(out).all() and rel(out, exact_mean(world, 1000)) < TOL["int8"]


def _error_feedback_checks(rank: int, world: int) -> None:
    n, steps = 2000, 60
    ref = exact_mean(world, n, salt=5)
    bias = {}
    for ef in (True, False):
        state = QuantizedGradState(fmt="int8", block=128, stochastic=False, error_feedback=ef)
        acc = torch.zeros(n, dtype=torch.float64)
        for _ in range(steps):
            acc += quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, n, salt=5).clone())).wait().double()
        bias[ef] = ((acc / steps - ref).norm() / ref.norm()).item()
        if not ef:
            assert state.residual_bytes() == 0
    assert bias[True] < bias[False] / 10, bias


def _ddp_checks(rank: int, world: int) -> None:
    torch.manual_seed(0)
    sizes = [1, 17, 1000, 4097, 300]

    class Params(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n)) for n in sizes])

        def forward(self, gs):
            return sum((p * g).sum() for p, g in zip(self.ps, gs))

    model = DDP(Params(), bucket_cap_mb=0.004)  # ~1000 fp32 per bucket: several uneven buckets
    state = register_quantized_comm_hook(model, fmt="int8", block=64)
    for step in range(3):
        for p in model.parameters():
            p.grad = None
        gs = [grad_of(rank, n, salt=step) for n in sizes]
        model(gs).backward()
        refs = [exact_mean(world, n, salt=step) for n in sizes]
        got = [p.grad for p in model.module.ps]
        assert rel(torch.cat(got), torch.cat(refs)) < TOL["int8"], step
        # per parameter, the error is bounded by the quantization steps of the blocks it shares
        # with its bucket neighbours: each hop moves a value by at most one step (amax / 127)
        amax = max(grad_of(r, n, salt=step).abs().max().item() for r in range(world) for n in sizes)
        for g, ref, n in zip(got, refs, sizes):
            assert (g.double() - ref).abs().max() <= 2 * amax / 127, (step, n)
            assert same_on_all_ranks(g)
    # DDP starts with one large bucket and re-buckets after the first step (bucket_cap_mb)
    assert state.steps == 3 and state.buckets_reduced > 3, (state.steps, state.buckets_reduced)
    assert 0 < state.compression_ratio() < 1
    # Free the DDP model (its reducer holds the Python hook and state) while the interpreter and
    # the process group are alive: left to interpreter shutdown, the teardown aborted the process
    # now and then ("terminate called without an active exception") after every check had passed.
    del model, state
    gc.collect()


@pytest.mark.parametrize("world", [2, 4])
def test_hook_matches_exact_mean(world):
    run_on_ranks(_hook_checks, world)


@pytest.mark.parametrize("world", [2, 4])
def test_nonfinite_gradients_are_flagged_not_hidden(world):
    run_on_ranks(_nonfinite_checks, world)


def test_error_feedback_removes_the_bias():
    run_on_ranks(_error_feedback_checks, 2)


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_training_steps_with_the_hook(world):
    run_on_ranks(_ddp_checks, world)


def _cuda_checks(rank: int, world: int, pack_wire: bool = False) -> None:
    """NCCL on GPUs: the CUDA kernels and the hook's CUDA path (the whole bucket enqueued at once
    on its side stream, a CUDA-aware future set there), with separate or packed codes and scales
    on the wire."""
    if pack_wire:  # bit-identical to the separate exchange
        for fmt, n in (("int8", 6_553_600), ("fp8_e4m3", 4097)):
            outs = []
            for packed in (False, True):
                state = QuantizedGradState(fmt=fmt, block=128, seed=11, pack_wire=packed)
                outs.append(quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, n).to(rank))).wait())
            assert torch.equal(outs[0], outs[1]), fmt
    device = torch.device("cuda", rank)
    for fmt in TOL:
        state = QuantizedGradState(fmt=fmt, block=128, pack_wire=pack_wire)
        for i, n in enumerate([17, 4097, 6_553_600]):
            g = grad_of(rank, n).to(device)
            out = quantized_allreduce_hook(state, OneBucket(i, g.clone())).wait()
            assert out.device == device and torch.isfinite(out).all()
            assert rel(out.cpu(), exact_mean(world, n)) < TOL[fmt], (fmt, n)
        assert "cuda" in __import__("deepseek_kernels").explain("quantize_blockwise", g, fmt, 128)
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)).to(device),
                device_ids=[rank])
    plain = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(32, 256, device=device)
    model(x).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = None
    state = register_quantized_comm_hook(model, fmt="int8", pack_wire=pack_wire)
    model(x).square().mean().backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert rel(got.cpu(), torch.cat([r.flatten() for r in ref]).cpu().double()) < TOL["int8"]
    assert all(torch.equal(a, b) for a, b in zip(plain, model.parameters()))  # no step was taken
    assert state.steps == 1 and not state.check_nonfinite()
    del model, state  # see _ddp_checks
    gc.collect()


def _profile_range_checks(rank: int, world: int) -> None:
    import deepseek_kernels.distributed as dsk_dist

    outs = []
    for ranges in (False, True):
        dsk_dist.PROFILE_RANGES = ranges
        try:
            state = QuantizedGradState(fmt="int8", block=128, seed=5)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                outs.append(quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, 3000).clone())).wait())
        finally:
            dsk_dist.PROFILE_RANGES = False
        names = {e.key for e in prof.key_averages()}
        phases = {"dsk_hook:compress", "dsk_hook:reduce", "dsk_hook:all_gather", "dsk_hook:decompress"}
        assert phases <= names if ranges else not (phases & names), names
    assert torch.equal(outs[0], outs[1])  # the ranges change nothing but the profile


def test_profile_ranges_name_the_hook_phases_and_change_nothing():
    run_on_ranks(_profile_range_checks, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("pack_wire", [False, True], ids=["separate", "packed"])
def test_hook_on_cuda_with_nccl(pack_wire):
    run_on_ranks(_cuda_checks, torch.cuda.device_count(), pack_wire, backend="nccl")


def _graph_checks(rank: int, world: int, pack_wire: bool | None) -> None:
    """cuda_graphs=True: replays of a captured bucket are bit-identical to the eager pipeline, step
    after step (new keys each step), residuals included; NaN is still flagged; DDP training steps
    give the same gradients with and without graphs. ``pack_wire=None``: the graphed state packs
    the wire and the eager one does not (the defaults), so this also checks packed vs separate."""
    from deepseek_kernels.distributed import _BucketGraph

    device = torch.device("cuda", rank)
    for fmt, n in (("int8", 6_553_600 + 17), ("fp8_e4m3", 4097)):
        buffers = [torch.empty(n, device=device) for _ in range(2)]  # persistent, as DDP's are
        states = [QuantizedGradState(fmt=fmt, block=128, seed=4, cuda_graphs=graphs, pack_wire=pack_wire)
                  for graphs in (False, True)]
        assert states[1].packs_wire == (pack_wire is None) and not states[0].packs_wire
        for step in range(4):
            outs = []
            for buf, state in zip(buffers, states):
                buf.copy_(grad_of(rank, n, salt=step))
                if step == 3 and rank == 0:
                    buf[5] = float("nan")
                outs.append(quantized_allreduce_hook(state, OneBucket(0, buf)).wait().clone())
            eager, graphed = outs
            assert torch.equal(eager.nan_to_num(7.0), graphed.nan_to_num(7.0)), (fmt, step)
            assert torch.equal(states[0]._residuals[0].hop1, states[1]._residuals[0].hop1)
        assert isinstance(states[1]._graphs[0], _BucketGraph)  # replayed, not eager
        assert not states[0]._graphs  # the eager state never captured
        assert states[0].check_nonfinite() and states[1].check_nonfinite()
    grads = []
    for graphs in (False, True):
        torch.manual_seed(0)
        model = DDP(torch.nn.Sequential(torch.nn.Linear(256, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 64))
                    .to(device), device_ids=[rank], bucket_cap_mb=1)  # 4.5 MB of fp32 grads: several buckets
        state = register_quantized_comm_hook(model, fmt="int8", seed=2, cuda_graphs=graphs, pack_wire=pack_wire)
        x = torch.randn(32, 256, device=device, generator=torch.Generator(device).manual_seed(rank))
        per_step = []
        for _ in range(4):  # eager, eager (buckets rebuilt), capture + replay, replay
            model(x).square().mean().backward()
            per_step.append(torch.cat([p.grad.flatten() for p in model.parameters()]).clone())
            model.zero_grad(set_to_none=False)
        assert any(isinstance(g, _BucketGraph) for g in state._graphs.values()) == graphs
        grads.append(per_step)
        del model, state  # see _ddp_checks
        gc.collect()
    assert all(torch.equal(a, b) for a, b in zip(*grads))


@pytest.mark.gpu
@pytest.mark.parametrize("pack_wire", [None, False], ids=["packed_when_graphed", "separate"])
def test_graphed_buckets_replay_the_eager_pipeline_bit_for_bit(pack_wire):
    run_on_ranks(_graph_checks, torch.cuda.device_count(), pack_wire, backend="nccl")


def _packed_wire_checks(rank: int, world: int) -> None:
    for fmt in TOL:
        for n in (1, 17, 4097, 300):  # smaller than a block, uneven, padded shards
            outs, sent = [], []
            for packed in (False, True):
                state = QuantizedGradState(fmt=fmt, block=128, seed=9, pack_wire=packed)
                outs.append(quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, n).clone())).wait())
                sent.append(state.bytes_sent)
            assert torch.equal(outs[0], outs[1]), (fmt, n)  # same arithmetic, same seeds
            assert sent[0] <= sent[1] <= sent[0] + 2 * (world - 1) * 16  # + at most 16 B pad per shard
    # NaN still reaches every rank through the packed scales
    g = grad_of(rank, 1000)
    if rank == 0:
        g[5] = float("nan")
    state = QuantizedGradState(fmt="int8", block=128, pack_wire=True)
    out = quantized_allreduce_hook(state, OneBucket(0, g)).wait()
    assert torch.isnan(out[:128]).all() and torch.isfinite(out[128:]).all() and state.check_nonfinite()
    # cuda_graphs on CPU tensors: no graph (the gloo path runs eagerly), the wire packed by default,
    # the same bits as forcing the packed wire without graphs
    n = 4097
    outs, sent = [], []
    for kwargs in (dict(cuda_graphs=True), dict(pack_wire=True)):
        state = QuantizedGradState(fmt="int8", block=128, seed=9, **kwargs)
        for step in range(3):  # a CUDA bucket would be captured on its second call
            out = quantized_allreduce_hook(state, OneBucket(0, grad_of(rank, n, salt=step).clone())).wait()
        assert not state._graphs
        outs.append(out)
        sent.append(state.bytes_sent)
    assert torch.equal(outs[0], outs[1]) and sent[0] == sent[1]


@pytest.mark.parametrize("world", [2, 3])
def test_packed_wire_is_bit_identical_to_separate_exchange(world):
    run_on_ranks(_packed_wire_checks, world)


def test_bad_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="fmt"):
        QuantizedGradState(fmt="int4")
    with pytest.raises(ValueError, match="block"):
        QuantizedGradState(block=24)
    with pytest.raises(ValueError, match="seed"):
        QuantizedGradState(seed=-1)
    with pytest.raises(ValueError, match="cuda_graphs must be True or False, got 'yes'"):
        QuantizedGradState(cuda_graphs="yes")
    with pytest.raises(ValueError, match="cuda_graphs"):
        QuantizedGradState(cuda_graphs=None)
    with pytest.raises(ValueError, match="pack_wire must be None .*, True or False, got 1.5"):
        QuantizedGradState(pack_wire=1.5)
    with pytest.raises(ValueError, match="pack_wire"):
        QuantizedGradState(pack_wire="packed")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_quantized_comm_hook(torch.nn.Linear(4, 4), fmt="int8")


def test_pack_wire_follows_cuda_graphs_unless_forced():
    assert not QuantizedGradState().packs_wire
    assert QuantizedGradState(cuda_graphs=True).packs_wire
    assert not QuantizedGradState(cuda_graphs=True, pack_wire=False).packs_wire
    assert QuantizedGradState(pack_wire=True).packs_wire


def _local_pipeline(ops, fmt, world, n, device):
    from deepseek_kernels.distributed import _Plan, compress_bucket, decompress_bucket, reduce_shard

    state = QuantizedGradState(fmt=fmt, block=128)
    plan = _Plan.of(n, world, 128)
    g = torch.Generator().manual_seed(n + world)
    grad = torch.randn(n, generator=g).to(device)
    e1, e2 = (torch.randn(n, generator=g) * 1e-3).to(device), (torch.randn(plan.shard, generator=g) * 1e-3).to(device)
    codes, scales = compress_bucket(state, grad, plan, e1, seed=11, ops=ops)
    # all-to-all stand-in: the W shards of this rank's own send buffer, shifted so they differ
    received = torch.roll(codes.view(world, -1), 1, 1).reshape(-1)
    q2, s2 = reduce_shard(state, received, scales, plan, e2, seed=12, ops=ops)
    gathered_codes, gathered_scales = q2.repeat(world), s2.repeat(world)
    out = decompress_bucket(state, gathered_codes, gathered_scales, plan, torch.bfloat16, ops=ops)
    return codes, scales, q2, s2, out, e1, e2


def _same_bits(a, b):
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) if x.element_size() == 1 else torch.equal(x, y)
               for x, y in zip(a, b))


@pytest.mark.parametrize("fmt", list(TOL))
@pytest.mark.parametrize("world,n", [(1, 1), (2, 17), (4, 1000), (3, 4097)])
def test_hook_phases_through_the_ops_match_the_reference(world, n, fmt):
    """The hook's three phases through the registered ops (CPU path here) vs straight through the
    reference functions: the same bits (checks the HookOps wiring and the padded send buffers)."""
    from deepseek_kernels.distributed import FAST_OPS, REFERENCE_OPS

    ours = _local_pipeline(FAST_OPS, fmt, world, n, "cpu")
    ref = _local_pipeline(REFERENCE_OPS, fmt, world, n, "cpu")
    assert _same_bits(ours, ref)
    codes, scales = ours[0], ours[1]
    nb = -(-n // 128)
    assert (codes[n:] == 0).all() and (scales[nb:] == 0).all()  # zero padding, no stale bytes


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", list(TOL))
@pytest.mark.parametrize("world,n", [(1, 1), (2, 17), (4, 1000), (3, 4097), (2, 6_553_600), (8, 6_553_601)])
def test_hook_phases_cuda_match_the_reference(world, n, fmt):
    """The fused CUDA pipeline (quantize_into -> requantize_sum -> dequantize) bit for bit against the
    reference on the same GPU inputs."""
    from deepseek_kernels.distributed import FAST_OPS, REFERENCE_OPS

    ours = _local_pipeline(FAST_OPS, fmt, world, n, "cuda")
    ref = _local_pipeline(REFERENCE_OPS, fmt, world, n, "cuda")
    assert _same_bits(ours, ref)
