"""The benchmark harness: its timers (GPU only: they time CUDA work) and case selection."""

import pytest
import torch

from deepseek_kernels.bench.harness import Case, Impl, run_case, time_cuda, time_cuda_graph


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
def test_run_case_marks_graphed_rows():
    make = lambda: (torch.randn(1024, device="cuda"),)  # noqa: E731
    row = run_case(Case("tiny", make, Impl("a", lambda x: x * 2), Impl("b", lambda x: x + x), graph=True), {}, reps=3)
    assert row["graph"] and row["ours_impl"] == "a (CUDA graph)" and row["speedup"] > 0


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
    assert picked == [n for n in names if n.startswith("M1 ") and "graphed" in n] and len(picked) == 1
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
