"""The benchmark harness's timers (GPU only: they time CUDA work)."""

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
    graphed = time_cuda_graph(fn, [(x,)], warmup=2, reps=5)
    # warmup calls + one capture; the timed replays do not call Python again
    assert len(calls) == n + 2 + 1
    assert torch.equal(out, x * 2)
    assert eager["ms"] > 0 and graphed["ms"] > 0


@pytest.mark.gpu
def test_run_case_marks_graphed_rows():
    make = lambda: (torch.randn(1024, device="cuda"),)  # noqa: E731
    row = run_case(Case("tiny", make, Impl("a", lambda x: x * 2), Impl("b", lambda x: x + x), graph=True), {}, reps=3)
    assert row["graph"] and row["ours_impl"] == "a (CUDA graph)" and row["speedup"] > 0
