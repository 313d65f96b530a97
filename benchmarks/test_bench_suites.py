"""pytest-benchmark wrapper of every benchmark suite (the same cases as ``deepseek-kernels bench``,
at their quick sizes), for regression tracking: ``pytest benchmarks/ --benchmark-autosave``.
Skipped without a GPU."""

import pytest
import torch

from deepseek_kernels.bench.harness import case_bytes
from deepseek_kernels.bench.suites import SUITES

pytestmark = pytest.mark.gpu
CASES = [(suite, case.name) for suite, mod in SUITES.items() for case in mod.cases(quick=True)]


@pytest.mark.parametrize("impl", ["ours", "baseline"])
@pytest.mark.parametrize("suite,case_name", CASES, ids=[f"{s}:{c}" for s, c in CASES])
def test_bench(benchmark, suite, case_name, impl):
    case = {c.name: c for c in SUITES[suite].cases(quick=True)}[case_name]
    inputs = case.make_inputs()
    if case.check is not None:
        case.check(inputs)
    fn = case.ours.fn if impl == "ours" else case.baseline.fn

    def run():
        fn(*inputs)
        torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, bytes=case_bytes(case, [inputs]))
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
