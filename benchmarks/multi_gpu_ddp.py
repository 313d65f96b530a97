"""Compressed gradient all-reduce on several GPUs: correctness on real gradients, DDP step time, and
a short convergence run on real text (issue 8). One process per GPU, NCCL:

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node=8 benchmarks/multi_gpu_ddp.py --out results/ddp

On CPU ranks (gloo) with a tiny model it is a smoke run of the same code (what the tests do):

    torchrun --nproc_per_node=2 benchmarks/multi_gpu_ddp.py --device cpu --tiny --out /tmp/ddp

Four parts (``--parts link,check,step,converge``); the last three compare DDP's own all-reduce,
torch's ``bf16_compress_hook`` and ``quantized_allreduce_hook`` (int8 and fp8_e4m3, error feedback
and stochastic rounding on):

- **link**: bus bandwidth of the collectives the configurations use (all-reduce fp32/bf16,
  all-to-all, all-gather) at 256 MiB, so the step times can be read against the link.
- **check**: two backward passes of the model (int8, fp8_e4m3, fp8_e5m2); on the second, every
  bucket is reduced both ways (a plain all-reduce mean of a copy, and the hook) and the relative
  error of the hook's mean is recorded per bucket.
- **step**: time of a training step (forward, backward with the bucket communication, AdamW) per
  configuration, tokens/s per GPU, and the share of the step spent communicating, estimated
  against the same step under ``no_sync()`` (no gradient communication at all). Parameters and
  gradients are fp32 with bf16 autocast (mixed precision, ``--param-dtype fp32``, the default) or
  bf16 throughout (``--param-dtype bf16``: then the bf16 hook compresses nothing).
- **converge**: a few hundred steps of the same seeded model on real text (the Python standard
  library's source files, byte-level tokens) per configuration; loss curves as JSON and PNG.

A slower link on the same machine: ``NCCL_P2P_DISABLE=1`` (NCCL through host shared memory) with
``--label shm``. Rank 0 writes ``multi_gpu_ddp[-LABEL].json`` under ``--out`` after every part (a
run cut short keeps what it finished), then ``..._loss.png`` and ``..._steps.png``;
``--replot A.json [B.json ...]`` draws them again from finished runs (the step bars of all of them
side by side). ``--configs`` picks configurations and hook variants (``int8+EF/graph``,
``int8+EF/graph/separate``, ``int8+EF/packed``: see ``parse_config``); ``--profile`` adds a per-kernel
and per-phase profile of two more steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

CONFIGS = ("allreduce", "bf16_compress", "int8+EF", "fp8_e4m3+EF")


# ---- model: a small GPT (pre-norm, causal SDPA) ----------------------------------------------------


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.up, self.down = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, D // self.heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def model_config(tiny: bool) -> dict:
    # GPUs: 12 d^2 = 50.3M parameters per layer, 24 layers: ~1.2e9; CPU smoke runs: ~1e5
    return dict(vocab=256, d=64, layers=2, heads=4, seq=64) if tiny else dict(vocab=256, d=2048, layers=24, heads=16,
                                                                               seq=1024)


# ---- data: real text, byte-level tokens ---------------------------------------------------------------


def corpus(max_bytes: int) -> torch.Tensor:
    """The standard library's .py files (sorted, so every rank and run reads the same bytes),
    concatenated up to ``max_bytes``, as a uint8 tensor of byte tokens."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for p in sorted(root.rglob("*.py")):
        try:
            data = p.read_bytes()
        except OSError:
            continue
        out.append(data)
        n += len(data)
        if n >= max_bytes:
            break
    if n < 1 << 16:
        raise RuntimeError(f"found only {n} bytes of Python source under {root}; the text corpus needs more")
    return torch.frombuffer(bytearray(b"".join(out)[:max_bytes]), dtype=torch.uint8).long()


def batches(text: torch.Tensor, rank: int, world: int, batch: int, seq: int, steps: int, seed: int):
    """Per step, this rank's [batch, seq + 1] windows of the text (disjoint across ranks)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, text.numel() - seq - 1, (world, batch), generator=g)[rank]
        yield torch.stack([text[s:s + seq + 1] for s in starts.tolist()])


# ---- communication configurations ---------------------------------------------------------------------


def timed_hook(hook, clock: list):
    """``hook`` with its host time (the call, and its callbacks when they run inline) added to
    ``clock[0]``: the hooks run on the autograd thread, so this is time the backward pass cannot
    spend launching kernels."""

    def run(state, bucket):
        t0 = time.perf_counter()
        fut = hook(state, bucket)
        clock[0] += time.perf_counter() - t0
        return fut

    return run


# Hook variants after "/", combinable ("int8+EF/graph/separate"), as QuantizedGradState options:
# "graph" (each bucket's pipeline replayed from a CUDA graph; ignored on CPU ranks), "packed" (codes
# and scales in one buffer: one collective per hop), "separate" (two). Without "packed" or "separate"
# the state's default applies: packed exactly when graphed.
VARIANTS = {"graph": ("cuda_graphs", True), "packed": ("pack_wire", True), "separate": ("pack_wire", False)}
# variants of earlier sessions whose code paths are gone (session 8)
REMOVED_VARIANTS = {
    "enqueue": "the hook always enqueues the whole bucket at once on its side stream now",
    "pool": "the host-callback path, whose second half ran on torch's pool streams, is gone",
}


def parse_config(config: str) -> tuple[str, dict]:
    """``"int8+EF/graph/separate"`` -> ``("int8+EF", {"cuda_graphs": True, "pack_wire": False})``:
    the configuration and the ``QuantizedGradState`` options of its variants (SystemExit on a bad
    one)."""
    name, *variants = config.split("/")
    for variant in variants:
        if variant in REMOVED_VARIANTS:
            raise SystemExit(f"--configs {config}: the variant {variant!r} was removed ({REMOVED_VARIANTS[variant]}); "
                             "drop it")
        if variant not in VARIANTS:
            raise SystemExit(f"--configs {config}: unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    if {"packed", "separate"} <= set(variants):
        raise SystemExit(f"--configs {config}: 'packed' and 'separate' exclude each other")
    if variants and name in ("allreduce", "bf16_compress"):
        raise SystemExit(f"--configs {config}: variants apply to the quantized hook only, not to {name}")
    return name, dict(VARIANTS[v] for v in variants)


def wrap(model: nn.Module, config: str, device: torch.device, bucket_mb: int, clock: list | None = None):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from deepseek_kernels.distributed import QuantizedGradState, quantized_allreduce_hook

    config, options = parse_config(config)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=bucket_mb)
    state = None
    clock = [0.0] if clock is None else clock
    if config == "bf16_compress":
        ddp.register_comm_hook(None, timed_hook(default_hooks.bf16_compress_hook, clock))
    elif config != "allreduce":
        state = QuantizedGradState(fmt=config.split("+")[0], block=128, stochastic=True, error_feedback=True,
                                   **options)
        ddp.register_comm_hook(state, timed_hook(quantized_allreduce_hook, clock))
    return ddp, state


def release(device) -> None:
    """After the caller dropped a configuration's model, DDP wrapper, optimizer and hook state:
    DDP and the hooks' closures hold reference cycles, so ``del`` alone leaves a 1B model's tens
    of GB allocated until the cycle collector runs; the next configuration would then run near
    the memory limit, where the caching allocator frees blocks (cudaFree synchronizes the device)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def link(args, device, rank, world) -> dict:
    """Bus bandwidth (NCCL's convention: algorithm bytes times 2 (W-1)/W for all-reduce, (W-1)/W
    for all-to-all and all-gather) of 256 MiB collectives (4 MiB with ``--tiny``), median of 5
    after 2 warm-ups."""
    from deepseek_kernels.distributed import _all_gather_into

    n = (4 if args.tiny else 256) << 20
    out = {}
    cases = {"all_reduce fp32": (torch.float32, 2), "all_reduce bf16": (torch.bfloat16, 2),
             "all_to_all uint8": (torch.uint8, 1), "all_gather uint8": (torch.uint8, 1)}
    for name, (dtype, factor) in cases.items():
        x = torch.ones(n // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=device)
        y = torch.empty_like(x)

        def once():
            if name.startswith("all_reduce"):
                dist.all_reduce(x)
            elif name.startswith("all_to_all"):
                dist.all_to_all_single(y, x)
            else:
                _all_gather_into(y, x[: x.numel() // world], None)

        times = []
        for i in range(7):
            sync(device)
            dist.barrier()
            t0 = time.perf_counter()
            once()
            sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
        t = sorted(times)[len(times) // 2]
        out[name] = {"bytes": n, "time_s": t, "busbw_GBps": n * factor * (world - 1) / world / t / 1e9}
        del x, y
    return out


def check(args, device, rank, world) -> dict:
    """Per bucket: the hook's mean vs an all-reduce mean of the same gradients. Two backward
    passes, recorded on the second: DDP puts every gradient in one bucket on its first iteration
    and rebuilds its ``--bucket-mb`` buckets after it (the second pass also carries the first
    one's error-feedback residuals, as training does)."""
    from deepseek_kernels.distributed import QuantizedGradState, quantized_allreduce_hook

    torch.manual_seed(0)
    cfg = model_config(args.tiny)
    text = corpus(args.corpus_bytes)
    tokens = next(batches(text, rank, world, args.batch, cfg["seq"], 1, seed=1)).to(device)
    out = {}
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        torch.manual_seed(0)
        with torch.device(device):  # initialised on the GPU: a 1B model's CPU init takes seconds
            model = GPT(**cfg)
        state = QuantizedGradState(fmt=fmt, block=128, stochastic=True, error_feedback=True)
        errors, sizes = [], []

        def both(st, bucket):
            exact = bucket.buffer().clone()
            dist.all_reduce(exact)
            exact /= world
            fut = quantized_allreduce_hook(st, bucket)

            def record(f):
                got = f.value()
                errors.append(((got.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30)).item())
                sizes.append(got.numel())
                return got

            return fut.then(record)

        ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, bucket_cap_mb=args.bucket_mb)
        ddp.register_comm_hook(state, both)
        for _ in range(2):
            errors.clear(), sizes.clear()
            logits = ddp(tokens[:, :-1])
            F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            sync(device)
            model.zero_grad(set_to_none=True)
        out[fmt] = {"buckets": len(errors), "rel_error_max": max(errors), "rel_error_mean": sum(errors) / len(errors),
                    "rel_errors": errors, "bucket_numel": sizes}
        del ddp, model, state, both
        release(device)
    return out


def step_time(args, device, rank, world) -> dict:
    cfg = model_config(args.tiny)
    text = corpus(args.corpus_bytes)
    out = {}
    for config in args.configs.split(","):
        torch.manual_seed(0)
        clock = [0.0]
        bf16_params = args.param_dtype == "bf16" and device.type == "cuda"
        with torch.device(device):
            model = GPT(**cfg).to(torch.bfloat16 if bf16_params else torch.float32)
        ddp, state = wrap(model, config, device, args.bucket_mb, clock)
        autocast = device.type == "cuda" and not bf16_params
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
        data = list(batches(text, rank, world, args.batch, cfg["seq"], args.warmup + args.steps, seed=2))

        def one(tokens, communicate=True):
            tokens = tokens.to(device)
            ctx = ddp.no_sync() if not communicate else _null()
            with ctx:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                    logits = ddp(tokens[:, :-1])
                F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        times, allocs = {}, {}
        for communicate in (True, False):
            for tokens in data[:args.warmup]:
                one(tokens, communicate)
            sync(device)
            dist.barrier()
            clock[0] = 0.0
            before = {k: torch.cuda.memory_stats(device).get(k, 0) for k in ALLOC_STATS} if device.type == "cuda" else {}
            t0 = time.perf_counter()
            for tokens in data[args.warmup:]:
                one(tokens, communicate)
            sync(device)
            times[communicate] = (time.perf_counter() - t0) / args.steps
            if communicate:
                hook_host_s = clock[0] / args.steps
            if communicate and device.type == "cuda":  # the timed steps with communication only
                allocs = {k: torch.cuda.memory_stats(device).get(k, 0) - before[k] for k in ALLOC_STATS}
        # every rank runs the profiled steps (their collectives pair up); rank 0 keeps the table
        profile = profile_steps(one, data[-2:], device, rank) if args.profile and device.type == "cuda" else None
        tok = args.batch * cfg["seq"]
        numel = sum(p.numel() for p in model.parameters())
        grad_bytes = 2 if bf16_params else 4
        if state is not None:  # what the hook counted over its steps (warm-ups included)
            sent = state.bytes_sent / state.steps
        else:  # a ring all-reduce: 2 (W-1)/W of the buffer, in bf16 for the compress hook
            sent = 2 * (world - 1) / world * numel * (2 if config == "bf16_compress" else grad_bytes)
        out[config] = {"step_s": times[True], "step_no_comm_s": times[False], "tokens_per_s_per_gpu": tok / times[True],
                       "comm_share": max(0.0, 1 - times[False] / times[True]),
                       "exposed_comm_s": max(0.0, times[True] - times[False]), "bytes_sent_per_rank_per_step": sent,
                       "hook_host_s_per_step": hook_host_s, "profile": profile,
                       "allocator_events_in_timed_steps": allocs,
                       "peak_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                       "reserved_GiB": torch.cuda.memory_reserved(device) / 2**30 if device.type == "cuda" else None,
                       "device_free_GiB": torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else None,
                       "buckets_per_step": state.buckets_reduced / state.steps if state is not None else None}
        if rank == 0:
            print(f"  step {config:14s} {1e3 * times[True]:8.1f} ms (no comm {1e3 * times[False]:8.1f} ms), "
                  f"hook host time {1e3 * hook_host_s:6.1f} ms/step, allocator {allocs}, "
                  f"peak {out[config]['peak_allocated_GiB'] or 0:.1f} GiB, reserved {out[config]['reserved_GiB'] or 0:.1f} GiB, "
                  f"device free {out[config]['device_free_GiB'] or 0:.1f} GiB", flush=True)
            if profile:
                for row in profile["top"]:
                    print(f"    {row['device_ms']:8.2f} ms  {row['calls']:6d}x  {row['name'][:90]}")
                for row in profile["top_host"]:
                    print(f"    host {row['host_ms']:8.2f} ms  {row['calls']:6d}x  {row['name'][:90]}")
                for name, row in profile["hook_phases"].items():
                    print(f"    phase {row['host_ms']:8.2f} ms  {row['calls']:6d}x  {name} (host, inclusive)")
        del ddp, opt, model, state, one
        release(device)
    out["params"] = numel
    out["param_dtype"] = args.param_dtype
    return out


ALLOC_STATS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


def profile_steps(one, data, device, rank) -> dict | None:
    """Two more steps under the profiler: GPU time per kernel (top 12, per step) and the total of
    the hook's own kernels (returned on rank 0)."""
    from torch.profiler import ProfilerActivity, profile

    import deepseek_kernels.distributed as dsk_dist

    dsk_dist.PROFILE_RANGES = True  # host time per phase of the hook ("dsk_hook:*" ranges)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for tokens in data:
                one(tokens)
            sync(device)
    finally:
        dsk_dist.PROFILE_RANGES = False
    if rank != 0:
        return None
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)
        if t > 0:
            rows.append({"name": e.key, "device_ms": t / 1e3 / len(data), "calls": e.count // len(data)})
    rows.sort(key=lambda r: -r["device_ms"])
    host = [{"name": e.key, "host_ms": e.self_cpu_time_total / 1e3 / len(data), "calls": e.count // len(data)}
            for e in prof.key_averages() if e.self_cpu_time_total > 0]
    host.sort(key=lambda r: -r["host_ms"])
    ours = sum(r["device_ms"] for r in rows if "quantiz" in r["name"].lower() or "requant" in r["name"].lower())
    nccl = sum(r["device_ms"] for r in rows if "nccl" in r["name"].lower())
    phases = {e.key: {"host_ms": e.cpu_time_total / 1e3 / len(data), "calls": e.count // len(data)}
              for e in prof.key_averages() if e.key.startswith("dsk_hook:")}
    return {"top": rows[:12], "top_host": host[:15], "hook_phases": phases, "hook_kernels_ms": ours, "nccl_ms": nccl,
            "all_kernels_ms": sum(r["device_ms"] for r in rows)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def converge(args, device, rank, world) -> dict:
    cfg = model_config(args.tiny)
    if not args.tiny:  # a smaller model: hundreds of steps must fit the run
        cfg = dict(cfg, d=768, layers=12, heads=12, seq=512)
    text = corpus(args.corpus_bytes)
    split = int(0.95 * text.numel())
    train, held = text[:split], text[split:]
    out = {}
    for config in args.converge_configs.split(","):
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(**cfg)
        ddp, state = wrap(model, config, device, args.bucket_mb)
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.1)
        curve = []
        steps = batches(train, rank, world, args.batch, cfg["seq"], args.converge_steps, seed=3)
        bar = tqdm(steps, total=args.converge_steps, desc=f"converge {config}", unit="step", disable=rank != 0,
                   mininterval=5.0)
        for step, tokens in enumerate(bar):
            tokens = tokens.to(device)
            for g in opt.param_groups:  # linear warm-up, cosine decay
                warm = min(1.0, (step + 1) / max(1, args.converge_steps // 10))
                g["lr"] = args.lr * warm * 0.5 * (1 + math.cos(math.pi * step / args.converge_steps))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = ddp(tokens[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lt = loss.detach().clone()
            dist.all_reduce(lt)
            curve.append(lt.item() / world)
        with torch.no_grad():
            ev = next(batches(held, 0, 1, 8, cfg["seq"], 1, seed=4)).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                held_loss = F.cross_entropy(model(ev[:, :-1]).flatten(0, 1).float(), ev[:, 1:].flatten()).item()
        if rank == 0:
            print(f"  converge {config:14s} final loss {curve[-1]:.3f} held-out {held_loss:.3f}", flush=True)
        out[config] = {"loss": curve, "held_out_loss": held_loss,
                       "bytes_sent_vs_fp32": None if state is None else state.bytes_sent / max(1, state.fp32_allreduce_bytes)}
        del ddp, opt, model, state
        release(device)
    return out


def _pyplot():
    """matplotlib's pyplot on the file-only backend, or None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(path: Path, conv: dict, title: str = "") -> bool:
    """Two panels: the loss curves (every configuration starts from the same seed and sees the
    same batches, so they lie on top of each other), and each one's difference from DDP's
    all-reduce, smoothed over 20 steps, where a compression bias would show."""
    plt = _pyplot()
    if plt is None:
        return False

    def smooth(xs, n=20):
        return [sum(xs[max(0, i - n + 1):i + 1]) / len(xs[max(0, i - n + 1):i + 1]) for i in range(len(xs))]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    colour = {}
    for name, r in conv.items():
        (line,) = top.plot(r["loss"], label=f"{name} (held-out {r['held_out_loss']:.3f})", lw=1)
        colour[name] = line.get_color()
    top.set_ylabel("training loss (byte tokens, nats)")
    top.legend(fontsize=8)
    if title:
        top.set_title(title, fontsize=9)
    base = conv.get("allreduce")
    if base is not None:
        for name, r in conv.items():
            if name != "allreduce":
                bottom.plot(smooth([a - b for a, b in zip(r["loss"], base["loss"])]), label=name, lw=1,
                            color=colour[name])
        bottom.axhline(0.0, color="grey", lw=0.8)
        bottom.set_ylabel("loss - all-reduce loss\n(20-step mean)")
        bottom.legend(fontsize=8)
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_title(result: dict) -> str:
    return (f"{result['world']} x {result.get('gpu', result['backend'])}: "
            f"{result['args']['converge_steps']} steps, batch {result['args']['batch']} per rank")


def plot_steps(path: Path, results: list[dict]) -> bool:
    """Step time per configuration, split into the step without gradient communication and the
    exposed communication on top of it; one group of bars per run (link)."""
    plt = _pyplot()
    if plt is None:
        return False

    def link(r):
        p2p_off = (r.get("env") or {}).get("NCCL_P2P_DISABLE") == "1"
        return r["args"].get("label") or ("NCCL P2P off" if p2p_off else "NCCL default transport (P2P)")

    runs = [(link(r), r["step"]) for r in results if "step" in r]
    configs = [c for c in runs[0][1] if isinstance(runs[0][1][c], dict)]
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(configs) * len(runs) / 2, 4.5))
    width = 0.8 / len(runs)
    for i, (label, step) in enumerate(runs):
        xs = [k + i * width for k in range(len(configs))]
        base = [1e3 * step[c]["step_no_comm_s"] if c in step else 0 for c in configs]
        comm = [1e3 * step[c]["exposed_comm_s"] if c in step else 0 for c in configs]
        ax.bar(xs, base, width, color="0.75", edgecolor="k", lw=0.5, label="step without communication" if i == 0 else None)
        bars = ax.bar(xs, comm, width, bottom=base, edgecolor="k", lw=0.5, label=f"exposed communication: {label}")
        for bar, b, c in zip(bars, base, comm):
            ax.text(bar.get_x() + bar.get_width() / 2, b + c, f"{b + c:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([k + width * (len(runs) - 1) / 2 for k in range(len(configs))], configs, fontsize=8)
    ax.set_ylabel("ms per training step")
    r0 = results[0]
    ax.set_title(f"{r0['world']} x {r0.get('gpu', r0['backend'])}: DDP step, {r0['step'].get('params', 0) / 1e9:.2f}B "
                 f"parameters", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def replot(paths: list[str]) -> None:
    """``--replot RESULT.json [MORE.json ...]``: the figures again from finished runs' JSON: the loss
    curves of the first run that has them, and the step times of every run side by side."""
    results = [json.loads(Path(path).read_text()) for path in paths]
    first = Path(paths[0])
    written = []
    for result in results:
        if "converge" in result:
            png = first.with_name(first.stem + "_loss.png")
            if not plot(png, result["converge"], plot_title(result)):
                raise SystemExit("--replot needs matplotlib")
            written.append(png)
            break
    if any("step" in r for r in results):
        png = first.with_name(first.stem + "_steps.png")
        if not plot_steps(png, [r for r in results if "step" in r]):
            raise SystemExit("--replot needs matplotlib")
        written.append(png)
    print("wrote " + ", ".join(map(str, written)) if written else "nothing to plot in " + ", ".join(paths))


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--replot":
        return replot(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--parts", default="link,check,step,converge")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="step part: which configurations")
    ap.add_argument("--converge-configs", default=",".join(CONFIGS),
                    help="converge part: which configurations (variants too: int8+EF/graph)")
    ap.add_argument("--profile", action="store_true", help="step part: profile two more steps per configuration")
    ap.add_argument("--label", default="", help="suffix of the output files (e.g. the link: shm)")
    ap.add_argument("--param-dtype", default="fp32", choices=("fp32", "bf16"),
                    help="step part: fp32 parameters + bf16 autocast, or bf16 parameters")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke runs)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bucket-mb", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--converge-steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--corpus-bytes", type=int, default=32 << 20)
    args = ap.parse_args()
    for config in args.configs.split(","):  # a bad variant fails now, not after the parts before "step"
        parse_config(config)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    env = {k: os.environ.get(k) for k in ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_NVLS_ENABLE", "NCCL_ALGO",
                                          "PYTORCH_CUDA_ALLOC_CONF")}
    result = {"world": world, "backend": backend, "tiny": args.tiny, "args": vars(args), "env": env}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    stem = "multi_gpu_ddp" + (f"-{args.label}" if args.label else "")
    out = Path(args.out)
    parts = {"link": link, "check": check, "step": step_time, "converge": converge}
    try:
        for name in args.parts.split(","):
            if name not in parts:
                raise SystemExit(f"--parts: unknown part {name!r}; expected a comma list of {', '.join(parts)}")
            if rank == 0:
                print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            result[name] = parts[name](args, device, rank, world)
            result.setdefault("part_seconds", {})[name] = time.perf_counter() - t0
            if rank == 0:  # after every part: a run cut short keeps what it finished
                out.mkdir(parents=True, exist_ok=True)
                (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        if rank == 0:
            if "converge" in result:
                plot(out / f"{stem}_loss.png", result["converge"], plot_title(result))
            if "step" in result:
                plot_steps(out / f"{stem}_steps.png", [result])
            for name, r in result.get("link", {}).items():
                print(f"link {name:18s} {r['busbw_GBps']:8.1f} GB/s bus bandwidth")
            for name, r in result.get("step", {}).items():
                if isinstance(r, dict):
                    print(f"{name:14s} step {1e3 * r['step_s']:8.1f} ms  {r['tokens_per_s_per_gpu']:9.0f} tok/s/GPU  "
                          f"comm {100 * r['comm_share']:5.1f} %  sent {r['bytes_sent_per_rank_per_step'] / 2**20:8.1f} MiB/step")
            for fmt, r in result.get("check", {}).items():
                print(f"check {fmt}: {r['buckets']} buckets, relative error max {r['rel_error_max']:.2e}")
            for name, r in result.get("converge", {}).items():
                print(f"converge {name:14s} final loss {r['loss'][-1]:.3f}  held-out {r['held_out_loss']:.3f}")
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
