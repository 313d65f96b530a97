"""Issue 7: one graphed hook pipeline per event pair (the GPU idles between calls) vs bursts of back-to-back replays."""
from deepseek_kernels.bench import harness
from deepseek_kernels.bench.suites import comm_hook
c = [c for c in comm_hook.cases() if c.name == "int8 W=2 CUDA graph per bucket"][0]
sets = harness.rotated_inputs(c.make_inputs)
for rep in range(2):
    for g in (1, None):
        t = harness.time_cuda(c.ours.fn, sets, reps=60, calls_per_sample=g)
        print(f"graph replay, calls_per_sample={t['calls_per_sample']}: {t['ms']*1e3:.1f} us = {100*c.bytes/(t['ms']*1e-3)/4.26e12:.1f} % of 4.26 TB/s")
