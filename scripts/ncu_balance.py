"""How evenly a step's kernels keep the SMs busy, from Nsight Compute's CSV of the metrics below (one row per
kernel launch and metric): per launch its duration, the mean SM's active cycles as a share of the elapsed
cycles, and the busiest / idlest SM against the mean. A persistent kernel whose programs get unequal work shows
a low mean share and a wide max / min spread.

    ncu --csv --print-units base --metrics sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,\\
sm__cycles_elapsed.max,gpu__time_duration.sum python ... > launches.csv
    python scripts/ncu_balance.py launches.csv
"""

import csv
import sys
from collections import defaultdict

METRICS = "sm__cycles_active.avg,sm__cycles_active.max,sm__cycles_active.min,sm__cycles_elapsed.max," \
          "gpu__time_duration.sum"


def balance(path: str) -> list[dict]:
    """One dict per launch, in launch order: kernel, us, busy (%), max_over_avg, min_over_avg."""
    with open(path) as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu's CSV rows; the program's own output left out
    launches = defaultdict(dict)
    names = {}
    for row in csv.DictReader(lines):
        key = row["ID"]
        names[key] = row["Kernel Name"]
        launches[key][row["Metric Name"]] = float(row["Metric Value"].replace(",", ""))
    out = []
    for key, m in sorted(launches.items(), key=lambda kv: int(kv[0])):
        avg = m["sm__cycles_active.avg"]
        out.append(dict(kernel=names[key], us=m["gpu__time_duration.sum"] / 1e3,
                        busy=100 * avg / m["sm__cycles_elapsed.max"], max_over_avg=m["sm__cycles_active.max"] / avg,
                        min_over_avg=m["sm__cycles_active.min"] / avg))
    return out


def main(path: str) -> None:
    print(f"{'kernel':58s} {'us':>8s} {'busy %':>7s} {'max/avg':>8s} {'min/avg':>8s}")
    for r in balance(path):
        print(f"{r['kernel'][:58]:58s} {r['us']:8.1f} {r['busy']:7.1f} {r['max_over_avg']:8.3f} "
              f"{r['min_over_avg']:8.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
