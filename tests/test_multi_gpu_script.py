"""benchmarks/multi_gpu_ddp.py (issue 8's multi-GPU run) as a smoke run on two CPU ranks (gloo):
the same code path as on GPUs, with a tiny model and a few steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.dist_utils import free_port

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu_ddp.py"


def test_multi_gpu_ddp_script_runs_on_two_cpu_ranks(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}", str(SCRIPT),
           "--device", "cpu", "--tiny", "--out", str(tmp_path), "--steps", "2", "--warmup", "1",
           "--converge-steps", "6", "--corpus-bytes", "2000000"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "multi_gpu_ddp.json").read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    for fmt, bound in (("int8", 3e-2), ("fp8_e4m3", 1e-1)):  # per-bucket error of the hook's mean
        r = result["check"][fmt]
        assert r["buckets"] >= 1 and 0 < r["rel_error_max"] < bound, r
    assert set(result["step"]) >= {"allreduce", "bf16_compress", "int8+EF", "fp8_e4m3+EF"}
    conv = result["converge"]
    assert all(len(c["loss"]) == 6 and c["loss"][-1] < c["loss"][0] for c in conv.values())
    assert conv["int8+EF"]["bytes_sent_vs_fp32"] < 0.35  # about a quarter of an fp32 all-reduce
    assert (tmp_path / "multi_gpu_ddp_loss.png").read_bytes()[:4] == b"\x89PNG"
