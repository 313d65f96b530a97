"""Timing and environment capture shared by every benchmark suite.

A suite describes *cases*: one workload, our implementation and the baseline a user would pick
instead, both run on the same inputs in the same process, plus the useful bytes or FLOPs it must
move or compute. ``run_case`` times both with CUDA events (warm-up, samples that are bursts of
back-to-back calls, median of many samples in alternating rounds of ours and baseline, inputs
rotated so repeated runs do not read from L2) and returns a row with ms, GB/s or TFLOP/s, the
fraction of the ceiling measured in the same run, and the speedup over the baseline.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

L2_BYTES_FALLBACK = 60 * 2**20  # H100/H200


@dataclass
class Impl:
    """One implementation of a case: ``fn(*inputs)`` is timed."""

    name: str
    fn: Callable


@dataclass
class Case:
    """A workload timed for ``ours`` and ``baseline`` on the same inputs.

    ``make_inputs()`` returns a fresh tuple of inputs (random data, never zeros); it is called as
    many times as needed to rotate through more memory than the L2 cache holds. ``bytes`` counts
    each input read once and each output written once; ``flops`` counts useful work only.
    """

    name: str
    make_inputs: Callable[[], tuple]
    ours: Impl
    baseline: Impl | None = None
    bytes: int | None = None
    flops: int | None = None
    params: dict = field(default_factory=dict)
    # Checks ours against the baseline on one input set before timing (raises on mismatch).
    check: Callable[[tuple], None] | None = None
    # Time CUDA-graph replays instead of eager calls (both implementations): the GPU time per call
    # of work too short to hide Python launch overhead, as a serving engine would run it
    # (several calls per graph: see time_cuda_graph).
    graph: bool = False
    # Seconds of back-to-back calls before each side's timing in every round: both are timed at their
    # own sustained (power-limited) steady state rather than in the short alternating bursts of the
    # default, whose clocks carry over from whatever ran just before (see time_interleaved).
    sustain_s: float = 0.0
    # Seconds the GPU idles before each side's timing in every round: both are timed from the same rested
    # power state, for compute-bound rows whose speed changes within tens of milliseconds of full load
    # (session 12, int8 8192^3 in alternating rounds: ours 0.837 ms in its first round after idle, 1.016 ms
    # right after the baseline's round, at the same reported SM clock; see NOTES). Not with sustain_s.
    rest_s: float = 0.0
    # Sample the GPU's clock and power in a background thread *during* every timing round (ClockSampler):
    # for compute-bound rows near the power limit, where the state after a round says little about it.
    sample_clocks: bool = False
    # Bytes that depend on the inputs (e.g. the weight blocks a routing touches): ``bytes_of(inputs)`` per
    # input set, averaged over the rotated sets; replaces ``bytes`` when given.
    bytes_of: Callable[[tuple], int] | None = None


def compiled_baseline(fn: Callable) -> Callable:
    """``torch.compile(fn)`` for a baseline, never silently degraded to eager.

    Suites compile the same function for many shapes/dtypes; past dynamo's recompile limit (8)
    torch would quietly run it eagerly and the baseline would look slower than it is. Raise the
    limit and make hitting it an error.
    """
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 128)
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit"):
        dynamo_config.fail_on_recompile_limit_hit = True
    return torch.compile(fn, dynamic=False)


def l2_bytes() -> int:
    try:
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except Exception:
        return L2_BYTES_FALLBACK


def _input_bytes(inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))


def rotated_inputs(make_inputs: Callable[[], tuple], max_sets: int = 8) -> list[tuple]:
    """Enough input sets that cycling through them touches at least 2x the L2 cache."""
    sets = [make_inputs()]
    per_set = max(1, _input_bytes(sets[0]))
    want = min(max_sets, max(1, -(-2 * l2_bytes() // per_set)))
    sets += [make_inputs() for _ in range(want - 1)]
    return sets


def summarize(samples_ms: list[float]) -> dict:
    """Median, 20th and 80th percentile of per-call times (ms), and the samples themselves."""
    ms = sorted(samples_ms)
    return {"ms": statistics.median(ms), "ms_p20": ms[len(ms) // 5], "ms_p80": ms[(4 * len(ms)) // 5],
            "reps": len(ms), "samples_ms": list(samples_ms)}


BURST_MS = 0.5  # eager samples cover at least this much time (see time_cuda)
BURST_MAX_CALLS = 16


def time_cuda(fn: Callable, input_sets: list[tuple], *, warmup: int = 5, reps: int = 30,
              calls_per_sample: int | None = None) -> dict:
    """Median (and spread) of ``reps`` CUDA-event-timed samples of ``fn(*inputs)``, in ms per call.

    Each sample is a burst of back-to-back calls (inputs rotating) between two events, divided by
    the calls in it: what a program calling ``fn`` in a loop or a model's forward sees, max(host
    time, GPU time) per call. One call per event pair measures something else whenever the host
    work exceeds the kernel's: host time before the launch lands inside the interval when the GPU
    idles at the start event, host time after it lands outside (session 10: an int8 GEMM with a
    ~20 us kernel and 31 us of host work measured 45 us that way and 30 us in bursts).
    ``calls_per_sample`` (default: enough calls to cover BURST_MS, at most BURST_MAX_CALLS, from
    one timed warm-up call) is in the result."""
    n_sets = len(input_sets)
    for i in range(warmup):
        fn(*input_sets[i % n_sets])
    torch.cuda.synchronize()
    if calls_per_sample is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*input_sets[warmup % n_sets])
        end.record()
        end.synchronize()
        one = max(start.elapsed_time(end), 1e-3)
        calls_per_sample = max(1, min(BURST_MAX_CALLS, math.ceil(BURST_MS / one)))
    g = calls_per_sample
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    k = 0
    for i in range(reps):
        starts[i].record()
        for _ in range(g):
            fn(*input_sets[k % n_sets])
            k += 1
        ends[i].record()
    torch.cuda.synchronize()
    return {**summarize([s.elapsed_time(e) / g for s, e in zip(starts, ends)]), "calls_per_sample": g}


GRAPH_MIN_CALLS = 8


def time_cuda_graph(fn: Callable, input_sets: list[tuple], *, warmup: int = 3, reps: int = 30,
                    min_calls: int = GRAPH_MIN_CALLS) -> dict:
    """Like :func:`time_cuda`, for work replayed from a CUDA graph: the GPU time per call with no
    Python or launch overhead. One graph holds the call on every input set in turn, repeated to at
    least ``min_calls`` calls, and the times are per call (replay time / calls): a graph launch
    costs the GPU a few microseconds before its first kernel, which a graph of one call would
    charge to a ~20 us decode kernel, while a decode step graphed whole pays it once for hundreds
    of kernels. Consecutive calls cycle through the input sets, so they read from HBM as the
    eager timer's do (the sets together exceed the L2; see :func:`rotated_inputs`)."""
    for i in range(warmup):  # compiles / autotunes outside the capture
        fn(*input_sets[i % len(input_sets)])
    torch.cuda.synchronize()
    cycles = max(1, -(-min_calls // len(input_sets)))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=stream):
            for _ in range(cycles):
                for inputs in input_sets:
                    fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    calls = cycles * len(input_sets)
    t = time_cuda(lambda: g.replay(), [()], warmup=warmup, reps=reps, calls_per_sample=1)
    return {**summarize([v / calls for v in t["samples_ms"]]), "calls_per_replay": calls}


def measure_copy_bandwidth(nbytes: int = 2**30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written), the memory ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    t = time_cuda(lambda: dst.copy_(src), [()], warmup=3, reps=20, calls_per_sample=1)
    return 2 * nbytes / (t["ms"] * 1e-3)


def measure_bf16_matmul(n: int = 8192) -> float:
    """bf16 cuBLAS matmul rate in FLOP/s on random data, the tensor-core ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_cuda(lambda: a @ b, [()], warmup=3, reps=10, calls_per_sample=1)
    return 2 * n**3 / (t["ms"] * 1e-3)


TIMING_ROUNDS = 3


def sustain(fn: Callable, input_sets: list[tuple], seconds: float) -> int:
    """Calls ``fn`` on the rotated input sets back to back for ``seconds`` of wall time (a
    synchronize every 16 calls keeps the queue short, so the time is GPU time); returns the calls made."""
    calls, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(16):
            fn(*input_sets[calls % len(input_sets)])
            calls += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return calls


class ClockSampler:
    """``with ClockSampler() as c: ...`` samples ``probe()`` (default :func:`clock_state`) every
    ``interval_s`` in a background thread while the block runs; :meth:`summary` gives the SM clock's
    minimum and mean, the peak power and the fraction of samples under a clock limit (None without
    samples). Session 11: at the H200's 700 W cap the int8 suite's burst rows depended on what ran
    before them, and NVML read after a round (GPU idle again) showed near-boost clocks."""

    def __init__(self, probe: Callable[[], dict | None] | None = None, interval_s: float = 0.002):
        self.probe = probe or clock_state
        self.interval_s = interval_s
        self.samples: list[dict] = []

    def __enter__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            st = self.probe()
            if st:
                self.samples.append(st)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def summary(self) -> dict | None:
        if not self.samples:
            return None
        mhz = [st["sm_mhz"] for st in self.samples]
        out = {"samples": len(mhz), "sm_mhz_min": min(mhz), "sm_mhz_mean": round(statistics.fmean(mhz)),
               "power_w_max": max(st["power_w"] for st in self.samples),
               "limited_fraction": round(sum(bool(st["limits"]) for st in self.samples) / len(mhz), 3)}
        instant = [st["power_instant_w"] for st in self.samples if "power_instant_w" in st]
        if instant:
            out["power_instant_w_max"] = max(instant)
            out["power_instant_w_mean"] = round(statistics.fmean(instant), 1)
        return out


def rest(seconds: float) -> None:
    """Waits for the GPU's queued work, then lets it idle for ``seconds``."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    time.sleep(seconds)


def time_interleaved(impls: dict[str, Callable], input_sets: list[tuple], *, reps: int = 30,
                     rounds: int = TIMING_ROUNDS, timer: Callable = time_cuda,
                     probe: Callable[[], dict | None] | None = None, sustain_s: float = 0.0,
                     rest_s: float = 0.0, sampler: Callable[[], ClockSampler] | None = None) -> dict[str, dict]:
    """Times every implementation in ``rounds`` alternating chunks of ``reps / rounds`` calls
    (order reversed every other round: A B, B A, A B, ...) and pools each one's samples. A clock or
    power state that drifts during a case (e.g. after the previous case's large GEMMs) then weighs on
    both sides alike instead of on whichever ran first. Warm-up: the timer's default in the first
    round, one call after that. Returns ``{name: summary}`` with the per-round medians added, and
    with ``probe`` (e.g. :func:`clock_state`) what it returned right after each round (``round_state``).
    ``sustain_s`` > 0: each side first runs back to back for that long in every round (:func:`sustain`),
    so both are timed at their own steady state under the GPU's power limit. ``rest_s`` > 0: the GPU
    idles that long (after a synchronize) before each side's timing, so both start from a rested power
    state. ``sampler``: a :class:`ClockSampler` factory run around every timing (``round_clocks``: its
    summary per round)."""
    if sustain_s > 0 and rest_s > 0:
        raise ValueError("time_interleaved: sustain_s and rest_s exclude each other (a sustained side is not rested)")
    names = list(impls)
    per = max(1, -(-reps // rounds))
    samples = {n: [] for n in names}
    round_ms = {n: [] for n in names}
    round_state = {n: [] for n in names}
    round_clocks = {n: [] for n in names}
    extra = {}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            kw = {} if r == 0 else {"warmup": 1}
            if sustain_s > 0:
                sustain(impls[n], input_sets, sustain_s)
            if rest_s > 0:
                rest(rest_s)
            if sampler is not None:
                with sampler() as clocks:
                    t = timer(impls[n], input_sets, reps=per, **kw)
                round_clocks[n].append(clocks.summary())
            else:
                t = timer(impls[n], input_sets, reps=per, **kw)
            samples[n] += t["samples_ms"]
            round_ms[n].append(t["ms"])
            if probe is not None:
                round_state[n].append(probe())
            extra[n] = {k: v for k, v in t.items() if k in ("calls_per_replay", "calls_per_sample")}
            if probe is not None:
                extra[n]["round_state"] = round_state[n]
            if sampler is not None:
                extra[n]["round_clocks"] = round_clocks[n]
    return {n: {**summarize(samples[n]), "round_ms": round_ms[n], **extra[n]} for n in names}


def case_bytes(case: Case, input_sets) -> int | None:
    """The bytes a row counts: ``case.bytes_of`` averaged over the input sets (rounded), else ``case.bytes``."""
    if case.bytes_of is None:
        return case.bytes
    return round(sum(case.bytes_of(s) for s in input_sets) / len(input_sets))


def run_case(case: Case, ceilings: dict, *, reps: int = 30, rounds: int = TIMING_ROUNDS) -> dict:
    """Times ours and the baseline of ``case`` side by side (interleaved: :func:`time_interleaved`);
    returns one result row."""
    input_sets = rotated_inputs(case.make_inputs)
    if case.check is not None:
        case.check(input_sets[0])
        # Drop the check's temporaries so they do not shape where the timed outputs land.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    nbytes = case_bytes(case, input_sets)
    row = {"case": case.name, **case.params, "bytes": nbytes, "flops": case.flops, "graph": case.graph,
           **({"sustain_s": case.sustain_s} if case.sustain_s else {}),
           **({"rest_s": case.rest_s} if case.rest_s else {})}
    impls = {role: impl for role, impl in (("ours", case.ours), ("baseline", case.baseline)) if impl is not None}
    times = time_interleaved({role: impl.fn for role, impl in impls.items()}, input_sets, reps=reps, rounds=rounds,
                             timer=time_cuda_graph if case.graph else time_cuda, probe=clock_state,
                             sustain_s=case.sustain_s, rest_s=case.rest_s,
                             sampler=ClockSampler if case.sample_clocks else None)
    for role, impl in impls.items():
        t = times[role]
        row[f"{role}_impl"] = impl.name + (" (CUDA graph)" if case.graph else "")
        row[f"{role}_round_ms"] = t["round_ms"]
        row[f"{role}_ms"] = t["ms"]
        row[f"{role}_ms_p20"], row[f"{role}_ms_p80"] = t["ms_p20"], t["ms_p80"]
        for key in ("calls_per_replay", "calls_per_sample", "round_state", "round_clocks"):
            if key in t:
                row[f"{role}_{key}"] = t[key]
        if nbytes:
            row[f"{role}_gbps"] = nbytes / (t["ms"] * 1e-3) / 1e9
            if ceilings.get("copy_bytes_per_s"):
                row[f"{role}_pct_copy"] = 100 * nbytes / (t["ms"] * 1e-3) / ceilings["copy_bytes_per_s"]
        if case.flops:
            row[f"{role}_tflops"] = case.flops / (t["ms"] * 1e-3) / 1e12
            if ceilings.get("bf16_flops_per_s"):
                row[f"{role}_pct_mm"] = 100 * case.flops / (t["ms"] * 1e-3) / ceilings["bf16_flops_per_s"]
    if "baseline_ms" in row:
        row["speedup"] = row["baseline_ms"] / row["ours_ms"]
    return row


# ---- environment --------------------------------------------------------------------------------


def git_commit() -> str | None:
    if os.environ.get("DSK_GIT_COMMIT"):
        return os.environ["DSK_GIT_COMMIT"]
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(
            ["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
        dirty = subprocess.run(
            ["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except Exception:
        return None


# NVML clock-event reasons worth flagging in a timing row (bit -> name); the idle bit is left out
CLOCK_LIMITS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                0x80: "hw_power_brake"}
_nvml = None  # (pynvml, device handle) once opened, False when NVML is unavailable


def clock_state(index: int = 0) -> dict | None:
    """The GPU's SM clock (MHz), power draw (W) and active clock limits (names from CLOCK_LIMITS:
    e.g. ``sw_power_cap`` when the board's power limit holds the clock down) right now, through
    nvidia-ml-py; None without NVML. The harness records it after every timing round, so a row whose
    later rounds ran power-capped (session 10: int8 GEMMs at 8192^3 drew the H200 to its 700 W limit
    and 1500 MHz) says so in its JSON."""
    global _nvml
    if _nvml is None:
        try:
            import pynvml

            pynvml.nvmlInit()
            _nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(index))
        except Exception:  # NVML missing (CPU machine, container without the library)
            _nvml = False
    if not _nvml:
        return None
    pynvml, h = _nvml
    try:
        get_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        bits = get_reasons(h)
        state = {"sm_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                 "power_w": round(pynvml.nvmlDeviceGetPowerUsage(h) / 1000, 1),
                 "limits": [name for bit, name in CLOCK_LIMITS.items() if bits & bit]}
    except Exception:
        return None
    instant = _instant_power_w(pynvml, h)
    if instant is not None:
        state["power_instant_w"] = instant
    return state


def _instant_power_w(pynvml, handle) -> float | None:
    """Instantaneous board power (W) where the driver has the field (NVML_FI_DEV_POWER_INSTANT: Hopper, driver
    535+), else None. ``nvmlDeviceGetPowerUsage`` is averaged over about a second on these boards, so rounds of
    ~10 ms read as near idle (session 12: 8192^3 int8 bursts read 127-158 W)."""
    field = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", None)
    if field is None:
        return None
    try:
        value = pynvml.nvmlDeviceGetFieldValues(handle, [field])[0]
        if value.nvmlReturn != 0:
            return None
        return round(value.value.uiVal / 1000, 1)  # mW
    except Exception:
        return None


def round_clock_summary(row: dict) -> list[str]:
    """``role: SM MHz min / mean per round`` for a row timed with a ClockSampler (empty otherwise)."""
    out = []
    for role in ("ours", "baseline"):
        rounds = [c for c in row.get(f"{role}_round_clocks") or [] if c]
        if rounds:
            instant = [c["power_instant_w_max"] for c in rounds if "power_instant_w_max" in c]
            out.append(f"{role} " + ", ".join(f"{c['sm_mhz_min']}/{c['sm_mhz_mean']} MHz" for c in rounds)
                       + f" (power max {max(c['power_w_max'] for c in rounds)} W"
                       + (f", instantaneous max {max(instant)} W)" if instant else ")"))
    return out


def clock_limited_rounds(row: dict) -> list[str]:
    """``role round: limits, SM MHz`` for each timing round of a result row that ended under a clock
    limit (empty when none did or nothing was recorded)."""
    out = []
    for role in ("ours", "baseline"):
        for i, st in enumerate(row.get(f"{role}_round_state") or []):
            if st and st.get("limits"):
                out.append(f"{role} round {i + 1}: {'+'.join(st['limits'])}, {st['sm_mhz']} MHz")
    return out


def gpu_telemetry(index: int = 0) -> dict:
    """Clocks, power, temperature through nvidia-ml-py (empty dict when NVML is unavailable)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            clock = lambda kind: pynvml.nvmlDeviceGetClockInfo(h, kind)  # noqa: E731
            maxclock = lambda kind: pynvml.nvmlDeviceGetMaxClockInfo(h, kind)  # noqa: E731
            name = pynvml.nvmlDeviceGetName(h)
            return {
                "name": name.decode() if isinstance(name, bytes) else name,
                "driver": _s(pynvml.nvmlSystemGetDriverVersion()),
                "sm_clock_mhz": clock(pynvml.NVML_CLOCK_SM),
                "sm_clock_max_mhz": maxclock(pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": clock(pynvml.NVML_CLOCK_MEM),
                "power_w": pynvml.nvmlDeviceGetPowerUsage(h) / 1000,
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # NVML missing (CPU machine, container without the library)
        return {"nvml_error": f"{type(exc).__name__}: {exc}"}


def _s(v):
    return v.decode() if isinstance(v, bytes) else v


def host_probe(n: int = 200) -> dict:
    """How fast this process's host side runs right now: microseconds per 100 iterations of a fixed Python
    loop (CPU speed and contention) and per launch of a one-element CUDA kernel queued without waiting (the
    launch cost eager decode rows pay per kernel). Recorded before and after each suite: eager rows are
    host-bound, and the host's speed moved 2x between calls of one session (session 14: eager decode GEMV
    rows 18.5 us in some calls, 32 us in others, graph-replayed rows unchanged)."""
    t = time.perf_counter()
    acc = 0
    for i in range(100 * n):
        acc += i & 7
    out = {"python_loop_us": round((time.perf_counter() - t) / n * 1e6, 2)}
    if torch.cuda.is_available():
        x = torch.zeros(1, device="cuda")
        for _ in range(10):
            x.add_(1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            x.add_(1)
        out["launch_us"] = round((time.perf_counter() - t) / n * 1e6, 2)
        torch.cuda.synchronize()
    return out


def environment() -> dict:
    from deepseek_kernels.info import collect

    env = collect()
    env["git_commit"] = git_commit()
    env["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return env


def gpu_slug() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).lower()
    for prefix in ("nvidia ", "geforce "):
        name = name.replace(prefix, "")
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")
