"""pytest-benchmark wrapper of the comm_hook suite (same cases as ``deepseek-kernels bench``).
Skipped without a GPU."""

import pytest
import torch

from deepseek_kernels.bench.suites import comm_hook

pytestmark = pytest.mark.gpu
CASE_NAMES = [c.name for c in comm_hook.cases(quick=True)]


@pytest.mark.parametrize("impl", ["ours", "baseline"])
@pytest.mark.parametrize("case_name", CASE_NAMES)
def test_comm_hook(benchmark, case_name, impl):
    case = {c.name: c for c in comm_hook.cases(quick=True)}[case_name]
    inputs = case.make_inputs()
    case.check(inputs)
    fn = case.ours.fn if impl == "ours" else case.baseline.fn

    def run():
        fn(*inputs)
        torch.cuda.synchronize()

    benchmark.extra_info.update(case.params, bytes=case.bytes)
    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
