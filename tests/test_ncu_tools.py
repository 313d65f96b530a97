"""The Nsight Compute readers in scripts/ (ncu_balance.py, ncu_sass_stalls.py) on small CSVs in ncu's formats:
the figures they print come from the right columns and rows."""

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ncu_balance(tmp_path):
    nb = _load("ncu_balance")
    head = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
            "Grid Size", "Device", "CC", "Section Name", "Metric Name", "Metric Unit", "Metric Value"]
    # launch 1 is listed first (ncu's order is not assumed); values with thousands separators, as ncu prints them
    launches = {"1": ("_gate_up_sm90_kernel", {"gpu__time_duration.sum": "900,600", "sm__cycles_active.avg": "900",
                                               "sm__cycles_active.max": "990", "sm__cycles_active.min": "810",
                                               "sm__cycles_elapsed.max": "1,000"}),
                "0": ("_router_kernel", {"gpu__time_duration.sum": "49,500", "sm__cycles_active.avg": "500",
                                         "sm__cycles_active.max": "500", "sm__cycles_active.min": "250",
                                         "sm__cycles_elapsed.max": "500"})}
    path = tmp_path / "launches.csv"
    with open(path, "w", newline="") as f:
        f.write("==PROF== the program's own output, skipped\n")
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(head)
        for key, (kernel, metrics) in launches.items():
            for metric in nb.METRICS.split(","):
                w.writerow([key, "1", "python", "host", kernel, "1", "7", "(384, 1, 1)", "(132, 1, 1)", "0", "9.0",
                            "Command line profiler metrics", metric, "cycle", metrics[metric]])
    rows = nb.balance(str(path))
    assert [r["kernel"] for r in rows] == ["_router_kernel", "_gate_up_sm90_kernel"]
    router, gate_up = rows
    assert router["us"] == pytest.approx(49.5) and router["busy"] == pytest.approx(100.0)
    assert router["min_over_avg"] == pytest.approx(0.5)
    assert gate_up["us"] == pytest.approx(900.6) and gate_up["busy"] == pytest.approx(90.0)
    assert gate_up["max_over_avg"] == pytest.approx(1.1) and gate_up["min_over_avg"] == pytest.approx(0.9)


def test_ncu_sass_stalls(tmp_path):
    ns = _load("ncu_sass_stalls")
    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
            "Instructions Executed", "stall_long_sb", "stall_wait", "stall_mio", "stall_long_sb (Not Issued)"]
    path = tmp_path / "sass.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(["Kernel Name", "_dact_sm90_kernel", ""])
        w.writerow(head)
        w.writerow(["0x10", "  HGMMA.64x32x16.F32.BF16 R120, gdesc[UR16].tnspB, R120", "30", "20", "1,000", "0",
                    "10", "20", "999"])
        w.writerow(["0x20", "  @!P6  BRA 0x7ff177022420", "70", "70", "319,232", "65", "5", "0", "999"])
        w.writerow(["0x30", "  NOP", "-", "-", "12", "-", "-", "-", "-"])
    total, sums, per = ns.stalls(str(path))
    assert total == 100
    assert sums == {"long_sb": 65, "wait": 15, "mio": 20}  # the "(Not Issued)" columns not counted
    assert [p[0] for p in per] == [70, 30, 0]
    assert per[0][1] == 319232 and per[0][2] == "@!P6  BRA 0x7ff177022420"
    assert per[1][3] == {"long_sb": 0, "wait": 10, "mio": 20}
