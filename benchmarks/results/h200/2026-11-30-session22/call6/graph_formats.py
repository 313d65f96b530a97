# session 22 call 6 (throwaway): graphed hook pipeline per 25 MiB bucket for every format, as the suite's int8 graph rows
import torch
from deepseek_kernels.bench import harness
from deepseek_kernels.bench.suites.comm_hook import BUCKET, BLOCK, GraphReplay, _inputs, fused_bytes, fused_pipeline
from deepseek_kernels.distributed import QuantizedGradState, _Plan
copy = harness.measure_copy_bandwidth()
print(f"copy {copy/1e12:.3f} TB/s")
for r in range(2):
    for fmt in ("int8", "fp8_e4m3", "fp8_e5m2"):
        for world in (2, 8):
            plan = _Plan.of(BUCKET, world, BLOCK)
            state = QuantizedGradState(fmt=fmt, block=BLOCK)
            sets = harness.rotated_inputs(lambda: _inputs(plan, fmt))
            fn = GraphReplay(lambda *i: fused_pipeline(state, plan, *i))
            t = harness.time_cuda(fn, sets, reps=30)
            b = fused_bytes(plan)
            print(f"r{r} {fmt:9s} W={world} graphed {t['ms']*1e3:6.2f} us  {b/(t['ms']*1e-3)/1e9:6.0f} GB/s  {100*b/(t['ms']*1e-3)/copy:5.1f} % of copy")
            del sets, fn
            torch.cuda.empty_cache()
