"""The benchmark harness: its timers (GPU only: they time CUDA work; the interleaving logic also with a
fake timer on the CPU) and case selection."""

import pytest
import torch

from deepseek_kernels.bench.harness import (
    Case,
    ClockSampler,
    Impl,
    case_bytes,
    clock_limited_rounds,
    clock_state,
    host_probe,
    round_clock_summary,
    run_case,
    summarize,
    time_cuda,
    time_cuda_graph,
    time_interleaved,
)


def test_interleaved_rounds_alternate_and_pool_the_samples():
    """Ours and the baseline alternate in rounds (A B, B A, A B), each round a third of the repeats, the
    first with the timer's warm-up and the later ones with one call; the summary pools every sample."""
    log = []

    def fake_timer(fn, input_sets, *, reps, **kw):
        log.append((fn(), reps, kw.get("warmup")))
        base = {"a": 1.0, "b": 2.0}[fn()] + len(log)  # a drift: later rounds are slower
        return summarize([base + 0.01 * i for i in range(reps)])

    out = time_interleaved({"a": lambda: "a", "b": lambda: "b"}, [()], reps=30, rounds=3, timer=fake_timer)
    assert [(n, r) for n, r, _ in log] == [("a", 10), ("b", 10), ("b", 10), ("a", 10), ("a", 10), ("b", 10)]
    assert [w for *_, w in log] == [None, None, 1, 1, 1, 1]
    assert out["a"]["reps"] == out["b"]["reps"] == 30
    assert len(out["a"]["samples_ms"]) == 30 and out["a"]["round_ms"][0] < out["a"]["round_ms"][-1]
    # pooled median: a ran in positions 1, 4, 5 (drift +1, +4, +5), b in 2, 3, 6: equal drift on average
    assert out["a"]["ms"] == pytest.approx(1.0 + 4 + 0.045, abs=0.01)
    assert out["b"]["ms"] == pytest.approx(2.0 + 3 + 0.045, abs=0.01)


def test_sustained_rounds_run_each_side_before_its_timing():
    """With ``sustain_s``, every round runs the side about to be timed back to back first (its own
    steady state under the power limit), cycling through the input sets, then times it."""
    log = []

    def fake_timer(fn, input_sets, *, reps, **kw):
        log.append(("timed", fn(*input_sets[0])))
        return summarize([1.0] * reps)

    calls = {"a": 0, "b": 0}

    def impl(name):
        def fn(x):
            calls[name] += 1
            if log and log[-1] == ("sustain", name):
                return name
            log.append(("sustain", name))
            return name
        return fn

    time_interleaved({"a": impl("a"), "b": impl("b")}, [(0,), (1,)], reps=4, rounds=2, timer=fake_timer,
                     sustain_s=0.01)
    # rounds: a, b, then b, a: each timing right after that side's own sustained run
    assert log == [("sustain", "a"), ("timed", "a"), ("sustain", "b"), ("timed", "b"),
                   ("sustain", "b"), ("timed", "b"), ("sustain", "a"), ("timed", "a")]
    assert calls["a"] >= 2 * 16 and calls["b"] >= 2 * 16


def test_rested_rounds_idle_before_each_side(monkeypatch):
    """With ``rest_s``, the GPU idles that long before every side's timing in every round (both start from a
    rested power state); with ``sustain_s`` as well it refuses (the two exclude each other)."""
    import deepseek_kernels.bench.harness as harness

    log = []
    monkeypatch.setattr(harness.time, "sleep", lambda s: log.append(("rest", s)))

    def fake_timer(fn, input_sets, *, reps, **kw):
        log.append(("timed", fn()))
        return summarize([1.0] * reps)

    time_interleaved({"a": lambda: "a", "b": lambda: "b"}, [()], reps=4, rounds=2, timer=fake_timer, rest_s=0.5)
    assert log == [("rest", 0.5), ("timed", "a"), ("rest", 0.5), ("timed", "b"),
                   ("rest", 0.5), ("timed", "b"), ("rest", 0.5), ("timed", "a")]
    with pytest.raises(ValueError, match="sustain_s and rest_s"):
        time_interleaved({"a": lambda: "a"}, [()], timer=fake_timer, rest_s=0.5, sustain_s=1.0)


def test_clock_sampler_records_each_round_while_it_runs():
    """With a sampler, every timing round is wrapped in a ClockSampler whose background thread reads the
    probe while the round runs; each side's rows carry per-round min / mean clock, peak power and the
    fraction of samples under a limit, and the summary line names them."""
    import time as _time

    clock = {"mhz": 1980}

    def probe():
        return {"sm_mhz": clock["mhz"], "power_w": 300.0 if clock["mhz"] > 1800 else 699.0,
                "power_instant_w": 450.0 if clock["mhz"] > 1800 else 760.0,
                "limits": [] if clock["mhz"] > 1800 else ["sw_power_cap"]}

    def fake_timer(fn, input_sets, *, reps, **kw):
        clock["mhz"] = fn()
        _time.sleep(0.03)  # the round: the sampler must see it
        return summarize([1.0] * reps)

    out = time_interleaved({"ours": lambda: 1500, "baseline": lambda: 1980}, [()], reps=4, rounds=2,
                           timer=fake_timer, sampler=lambda: ClockSampler(probe, interval_s=0.002))
    ours, base = out["ours"]["round_clocks"], out["baseline"]["round_clocks"]
    assert len(ours) == len(base) == 2
    assert all(c["samples"] >= 3 for c in ours + base)
    # the first samples of a round may still see the clock the previous round left: the minimum holds
    assert all(c["sm_mhz_min"] == 1500 and c["limited_fraction"] > 0.5 for c in ours)
    assert all(c["sm_mhz_mean"] > 1800 and c["power_w_max"] >= 300.0 for c in base)
    line = round_clock_summary({"ours_round_clocks": ours, "baseline_round_clocks": base})
    assert all(c["power_instant_w_max"] == 760.0 for c in ours)
    assert all(450.0 <= c["power_instant_w_mean"] <= 760.0 for c in ours + base)
    assert line[0].startswith("ours 1500/") and "power max 699.0 W, instantaneous max 760.0 W" in line[0]
    assert ClockSampler(lambda: None).__enter__().__exit__(None, None, None) is False
    assert round_clock_summary({"ours_round_clocks": [None]}) == []
    # a driver without the instantaneous field: the keys are absent, the line has no instantaneous part
    plain = ClockSampler(lambda: {"sm_mhz": 1980, "power_w": 100.0, "limits": []}, interval_s=0.001)
    with plain:
        _time.sleep(0.01)
    assert "power_instant_w_max" not in plain.summary()
    assert "instantaneous" not in round_clock_summary({"ours_round_clocks": [plain.summary()]})[0]


def test_instant_power_reads_the_nvml_field_in_watts():
    """_instant_power_w: the field's milliwatts as watts; None for a field error or a library without it."""
    from types import SimpleNamespace

    from deepseek_kernels.bench.harness import _instant_power_w

    def lib(ret, mw):
        value = SimpleNamespace(nvmlReturn=ret, value=SimpleNamespace(uiVal=mw))
        return SimpleNamespace(NVML_FI_DEV_POWER_INSTANT=186, nvmlDeviceGetFieldValues=lambda h, ids: [value])

    assert _instant_power_w(lib(0, 712345), None) == 712.3
    assert _instant_power_w(lib(3, 712345), None) is None
    assert _instant_power_w(SimpleNamespace(), None) is None


def test_rounds_record_the_probe_and_flag_clock_limits():
    """With a probe, each implementation's rounds carry what it returned after them; a row whose
    rounds ended under a clock limit (e.g. the board's power cap) is listed, others are not."""
    states = iter([{"sm_mhz": 1980, "power_w": 300.0, "limits": []},
                   {"sm_mhz": 1980, "power_w": 320.0, "limits": []},
                   {"sm_mhz": 1500, "power_w": 699.0, "limits": ["sw_power_cap"]},
                   {"sm_mhz": 1500, "power_w": 698.0, "limits": ["sw_power_cap"]}])

    def fake_timer(fn, input_sets, *, reps, **kw):
        return summarize([1.0] * reps)

    out = time_interleaved({"ours": lambda: 0, "baseline": lambda: 0}, [()], reps=4, rounds=2, timer=fake_timer,
                           probe=lambda: next(states))
    # rounds: ours, baseline, then baseline, ours
    assert [st["power_w"] for st in out["ours"]["round_state"]] == [300.0, 698.0]
    assert [st["power_w"] for st in out["baseline"]["round_state"]] == [320.0, 699.0]
    row = {"ours_round_state": out["ours"]["round_state"], "baseline_round_state": out["baseline"]["round_state"]}
    assert clock_limited_rounds(row) == ["ours round 2: sw_power_cap, 1500 MHz",
                                         "baseline round 2: sw_power_cap, 1500 MHz"]
    assert clock_limited_rounds({"ours_round_state": [None, {"sm_mhz": 1980, "limits": []}]}) == []
    assert "round_state" not in time_interleaved({"a": lambda: 0}, [()], reps=2, rounds=1, timer=fake_timer)["a"]


def test_clock_state_is_a_dict_or_none():
    """Without NVML or a GPU driver (CI) the probe answers None instead of raising."""
    st = clock_state()
    assert st is None or (isinstance(st["sm_mhz"], int) and isinstance(st["limits"], list))


def test_host_probe_times_the_python_loop_and_launches_only_with_a_gpu():
    probe = host_probe(n=20)
    assert probe["python_loop_us"] > 0
    assert ("launch_us" in probe) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert probe["launch_us"] > 0


def test_summarize_percentiles():
    t = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t["ms"], t["ms_p20"], t["ms_p80"], t["reps"]) == (3.0, 2.0, 5.0, 5)
    assert t["samples_ms"] == [5.0, 1.0, 3.0, 2.0, 4.0]


@pytest.mark.gpu
def test_graph_timer_replays_the_captured_work():
    x = torch.randn(4096, 4096, device="cuda")
    out = torch.empty_like(x)
    calls = []

    def fn(x):
        calls.append(1)
        torch.mul(x, 2.0, out=out)

    eager = time_cuda(fn, [(x,)], warmup=2, reps=5)
    n = len(calls)
    out.zero_()
    graphed = time_cuda_graph(fn, [(x,)], warmup=2, reps=5, min_calls=4)
    # warmup calls + one capture of 4 calls; the timed replays do not call Python again
    assert len(calls) == n + 2 + 4
    assert torch.equal(out, x * 2)
    assert graphed["calls_per_replay"] == 4
    assert eager["ms"] > 0 and graphed["ms"] > 0
    # per call: one replay of 4 multiplies of 64 MiB each takes ~4x one eager call, not 1x
    assert 0.5 * eager["ms"] < graphed["ms"] < 2 * eager["ms"]
    # two input sets and min_calls 3: two cycles (4 calls), every set as often
    calls.clear()
    two = time_cuda_graph(fn, [(x,), (x.clone(),)], warmup=0, reps=2, min_calls=3)
    assert two["calls_per_replay"] == 4 and len(calls) == 4


@pytest.mark.gpu
def test_eager_samples_are_bursts_timing_max_of_host_and_gpu():
    """A call whose host work (1 ms, busy-waited after the launch) exceeds its kernel (~0.13 ms):
    bursts of calls measure ~1 ms per call, the rate of a loop of such calls, not the kernel's
    time. A kernel-bound call measures its kernel."""
    import time

    x = torch.randn(2**26, device="cuda")

    def host_bound():
        x.mul_(1.0)  # 512 MiB read and written
        t = time.perf_counter()
        while time.perf_counter() - t < 1e-3:
            pass

    def one_call_ms():
        one = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        one[0].record()
        x.mul_(1.0)
        one[1].record()
        torch.cuda.synchronize()
        return one[0].elapsed_time(one[1])

    # the kernel's own time: the best of a few single calls after a warm-up (one cold call read 0.21 ms for a
    # 0.13 ms kernel on the H200 while other test processes shared the GPU, session 19)
    one_call_ms()
    kernel_ms = min(one_call_ms() for _ in range(5))
    assert kernel_ms < 0.5, kernel_ms  # the premise: the kernel is much shorter than the host work
    burst = time_cuda(host_bound, [()], warmup=2, reps=6, calls_per_sample=8)
    assert burst["calls_per_sample"] == 8
    assert 0.85 < burst["ms"] < 1.0 + kernel_ms, (burst["ms"], kernel_ms)
    auto = time_cuda(lambda: x.mul_(1.0), [()], warmup=2, reps=6)  # kernel-bound: any burst length
    assert auto["calls_per_sample"] >= 1 and abs(auto["ms"] - kernel_ms) < 0.25 * kernel_ms, (auto, kernel_ms)


@pytest.mark.gpu
def test_run_case_marks_graphed_rows():
    make = lambda: (torch.randn(1024, device="cuda"),)  # noqa: E731
    row = run_case(Case("tiny", make, Impl("a", lambda x: x * 2), Impl("b", lambda x: x + x), graph=True), {}, reps=3)
    assert row["graph"] and row["ours_impl"] == "a (CUDA graph)" and row["speedup"] > 0
    assert len(row["ours_round_ms"]) == len(row["baseline_round_ms"]) == 3 and row["ours_calls_per_replay"] >= 8
    eager = run_case(Case("tiny", make, Impl("a", lambda x: x * 2), Impl("b", lambda x: x + x)), {}, reps=6, rounds=2)
    assert not eager["graph"] and len(eager["ours_round_ms"]) == 2 and eager["ours_ms"] > 0
    assert eager["ours_calls_per_sample"] >= 1 and "ours_calls_per_sample" not in row
    # NVML on the GPU machine: every round's clock state is in the row
    assert len(eager["ours_round_state"]) == 2 and all(st is None or "sm_mhz" in st for st in eager["ours_round_state"])


@pytest.mark.gpu
def test_a_failing_case_keeps_the_rest_of_the_suite(tmp_path, monkeypatch):
    """A case that raises gets an error row; the other cases are still timed, the JSON is still
    written, and the run exits non-zero."""
    import json
    import types

    from deepseek_kernels import bench

    def broken(x):
        raise RuntimeError("broken on purpose")

    make = lambda: (torch.randn(1024, device="cuda"),)  # noqa: E731
    suite = types.SimpleNamespace(
        TITLE="two cases", accuracy=lambda device: [],
        cases=lambda quick=False: [Case("good", make, Impl("a", lambda x: x * 2), Impl("b", lambda x: x + x)),
                                   Case("bad", make, Impl("a", broken), Impl("b", lambda x: x + x))])
    monkeypatch.setitem(bench.SUITES, "two_cases", suite)
    assert bench.run_suites(["two_cases"], out=str(tmp_path), reps=3, make_plot=False) == 1
    rows = json.loads((tmp_path / "two_cases.json").read_text())["rows"]
    assert rows[0]["case"] == "good" and rows[0]["speedup"] > 0
    assert rows[1]["case"] == "bad (FAILED)" and "broken on purpose" in rows[1]["error"]


def test_case_filter_selects_by_name_and_rejects_bad_patterns(capsys):
    """``bench --filter``: cases picked by re.search on their names, in order; an invalid pattern is
    an exit code 2 with a message, before anything runs (no GPU needed)."""
    from deepseek_kernels import bench
    from deepseek_kernels.bench.suites import SUITES

    names = [c.name for c in SUITES["int8_matmul"].cases()]
    picked = [c.name for c in bench.select_cases(SUITES["int8_matmul"].cases(), r"^M1 .*graphed")]
    # (with the CUDA extension built the suite adds the C++ decode kernel's rows: more than one M1 graphed row)
    assert picked == [n for n in names if n.startswith("M1 ") and "graphed" in n] and len(picked) >= 1
    assert "M1 N14336 K4096 vs cuBLAS bf16 (graphed)" in picked
    assert bench.select_cases(SUITES["int8_matmul"].cases(), "no such case") == []
    assert bench.run_suites(["int8_matmul"], case_filter="M1 (", make_plot=False) == 2
    assert "not a valid regular expression" in capsys.readouterr().err


def test_plot_of_no_rows_is_skipped(tmp_path):
    """A --filter that matches no case of a suite leaves nothing to plot: no file and no error (it
    raised a TypeError on the H200 in session 6); rows still give a PNG."""
    pytest.importorskip("matplotlib")
    from deepseek_kernels.bench.report import plot

    ceilings = {"copy_bytes_per_s": 4.2e12}
    assert plot(tmp_path / "none.png", "empty", [], ceilings) is False
    assert not (tmp_path / "none.png").exists()
    rows = [{"case": "a", "ours_gbps": 100.0, "baseline_gbps": 50.0, "speedup": 2.0}]
    assert plot(tmp_path / "one.png", "one row", rows, ceilings) is True
    assert (tmp_path / "one.png").stat().st_size > 0


def test_plot_puts_compute_and_bandwidth_rows_in_their_own_panels(tmp_path):
    """A suite with GEMM rows (TFLOP/s) and GEMV rows (GB/s) gets one panel per unit: the int8 suite's
    decode rows drew as empty bars on the TFLOP/s axis before (session 21). Rows with no rate plot the
    speedup."""
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    from deepseek_kernels.bench.report import plot

    ceilings = {"copy_bytes_per_s": 4.2e12, "bf16_flops_per_s": 7.5e14}
    gemm = {"case": "gemm", "ours_tflops": 1300.0, "baseline_tflops": 800.0, "speedup": 1.62,
            "baseline_impl": "cuBLAS bf16"}
    gemv = {"case": "gemv", "ours_gbps": 3500.0, "baseline_gbps": 1900.0, "speedup": 1.84,
            "baseline_impl": "cuBLAS bf16"}
    heights = {}
    for name, rows in (("mixed", [gemm, gemv]), ("gemm", [gemm]), ("gemv", [gemv]),
                       ("bare", [{"case": "e2e", "speedup": 1.5}])):
        assert plot(tmp_path / f"{name}.png", name, rows, ceilings) is True
        heights[name] = imread(tmp_path / f"{name}.png").shape[0]
    assert heights["mixed"] == 2 * heights["gemm"] == 2 * heights["gemv"] == 2 * heights["bare"]


def test_case_bytes_average_input_dependent_counts():
    """``bytes_of`` (bytes that depend on the inputs) is averaged over the rotated input sets and replaces
    ``bytes``; without it a row counts ``bytes``."""
    sets = [(torch.zeros(3),), (torch.zeros(6),)]
    fixed = Case("fixed", lambda: sets[0], Impl("a", lambda x: x), bytes=100)
    assert case_bytes(fixed, sets) == 100
    per_input = Case("per input", lambda: sets[0], Impl("a", lambda x: x), bytes=100,
                     bytes_of=lambda inputs: 10 * inputs[0].numel())
    assert case_bytes(per_input, sets) == 45
    assert case_bytes(Case("none", lambda: sets[0], Impl("a", lambda x: x)), sets) is None


def test_sparse_decode_rows_count_the_blocks_the_tokens_use():
    """The sparse FFN suite's decode rows count the weight slices of the blocks any token uses (tokens
    share blocks): k blocks for one token or for repeated tokens, the routing's distinct blocks for many."""
    from deepseek_kernels.bench.suites.sparse_ffn import _decode_bytes
    from deepseek_kernels.reference.sparse_ffn import route_ref

    T, D, F_, NB, k = 8, 32, 256, 16, 3
    BS = F_ // NB
    g = torch.Generator().manual_seed(0)
    wr, wg = torch.randn(NB, D, generator=g), torch.randn(F_, D, generator=g)
    fixed = 2 * (NB * D + 2 * T * D)
    count = _decode_bytes(k)
    same = torch.randn(1, D, generator=g).expand(T, D)
    assert count((same, wr, wg)) == 2 * 3 * D * BS * k + fixed
    x = torch.randn(T, D, generator=g)
    used = torch.unique(route_ref(x, wr, k=k)[0]).numel()
    assert k < used < T * k  # this draw shares some blocks
    assert count((x, wr, wg)) == 2 * 3 * D * BS * used + fixed


def test_sparse_training_rows_also_rested_and_sustained():
    """The sparse FFN suite times the issue's power-limited training rows (T8192 fwd+bwd vs dense at 0.5 / 0.3)
    three ways: alternating bursts (as every row), from a rested GPU and at each side's sustained steady state,
    clocks sampled during the rounds; quick runs leave the slow rows out."""
    from deepseek_kernels.bench.suites import sparse_ffn as suite

    rows = {c.name: c for c in suite.cases()}
    for ratio, k in ((0.5, 32), (0.3, 19)):
        base = f"fwd+bwd T8192 ratio{ratio} ({k}/64 blocks) vs dense"
        assert rows[base].rest_s == 0 and rows[base].sustain_s == 0
        rested, sustained = rows[f"{base} (rested 1 s)"], rows[f"{base} (sustained 2 s)"]
        assert rested.rest_s == suite.REST_S and rested.sustain_s == 0 and rested.sample_clocks
        assert sustained.sustain_s == suite.SUSTAIN_S and sustained.rest_s == 0 and sustained.sample_clocks
        assert rested.flops == sustained.flops == rows[base].flops
        assert rested.params["timing"] == "rested" and sustained.params["timing"] == "sustained"
    assert not any("rested" in c.name or "sustained" in c.name for c in suite.cases(quick=True))
