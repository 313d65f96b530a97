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
           "--converge-steps", "6", "--corpus-bytes", "2000000", "--label", "smoke"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "multi_gpu_ddp-smoke.json").read_text())
    assert result["world"] == 2 and result["backend"] == "gloo"
    assert set(result["link"]) == {"all_reduce fp32", "all_reduce bf16", "all_to_all uint8", "all_gather uint8"}
    assert all(r["busbw_GBps"] > 0 and r["time_s"] > 0 for r in result["link"].values())
    for fmt, bound in (("int8", 3e-2), ("fp8_e4m3", 1e-1), ("fp8_e5m2", 2e-1)):  # per-bucket error of the mean
        r = result["check"][fmt]
        assert r["buckets"] >= 1 and 0 < r["rel_error_max"] < bound, r
    step = result["step"]
    assert set(step) >= {"allreduce", "bf16_compress", "int8+EF", "fp8_e4m3+EF"}
    assert all(step[c]["step_s"] > 0 and step[c]["tokens_per_s_per_gpu"] > 0 for c in ("allreduce", "int8+EF"))
    # fp32 gradients: the bf16 hook sends half, int8 codes + scales about a quarter
    full = step["allreduce"]["bytes_sent_per_rank_per_step"]
    assert step["bf16_compress"]["bytes_sent_per_rank_per_step"] == full / 2
    assert 0.2 * full < step["int8+EF"]["bytes_sent_per_rank_per_step"] < 0.35 * full
    conv = result["converge"]
    assert all(len(c["loss"]) == 6 and c["loss"][-1] < c["loss"][0] for c in conv.values())
    assert conv["int8+EF"]["bytes_sent_vs_fp32"] < 0.35  # about a quarter of an fp32 all-reduce
    assert (tmp_path / "multi_gpu_ddp-smoke_steps.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "multi_gpu_ddp-smoke_loss.png").read_bytes()[:4] == b"\x89PNG"
    # the figure again from the JSON alone (how committed results are re-plotted)
    png = tmp_path / "multi_gpu_ddp-smoke_loss.png"
    png.unlink()
    (tmp_path / "multi_gpu_ddp-smoke_steps.png").unlink()
    done = subprocess.run([sys.executable, str(SCRIPT), "--replot", str(tmp_path / "multi_gpu_ddp-smoke.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "multi_gpu_ddp-smoke_steps.png").read_bytes()[:4] == b"\x89PNG"
