"""pytest-benchmark wrapper of the quantization suite (same cases as ``deepseek-kernels bench``),
for regression tracking: ``pytest benchmarks/ --benchmark-autosave``. Skipped without a GPU."""

import pytest
import torch

from deepseek_kernels.bench.suites import quantization

pytestmark = pytest.mark.gpu
CASE_NAMES = [c.name for c in quantization.cases(quick=True)]


@pytest.mark.parametrize("impl", ["ours", "baseline"])
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_quantization(benchmark, case_name, impl):
    case = {c.name: c for c in quantization.cases(quick=True)}[case_name]
    inputs = case.make_inputs()
    if case.check is not None:
        case.check(inputs)
    fn = case.ours.fn if impl == "ours" else case.baseline.fn

    def run():
        fn(*inputs)
        torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, bytes=case.bytes)
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
