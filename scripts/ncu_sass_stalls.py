"""Where a kernel's warps wait, from Nsight Compute's source page as CSV (``ncu -i report.ncu-rep --page source
--csv --print-source sass > sass.csv``): the stall reasons summed over all instructions, then the instructions
with the most samples and their two largest reasons.

    python scripts/ncu_sass_stalls.py sass.csv [--top 40]
"""

import argparse
import csv


def _num(v: str) -> int:
    return int(float(v.replace(",", ""))) if v.strip() not in ("", "-") else 0


def stalls(path: str) -> tuple[int, dict, list]:
    """(total samples, {stall reason: samples} over all instructions, [(samples, executed, source, {reason:
    samples})] per instruction, most sampled first)."""
    with open(path) as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr = rows[start]
    data = [r for r in rows[start + 1:] if len(r) == len(hdr)]
    samples, source, executed = (hdr.index(n) for n in ("Warp Stall Sampling (All Samples)", "Source",
                                                        "Instructions Executed"))
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(_num(r[samples]) for r in data)
    sums = {hdr[i][6:]: sum(_num(r[i]) for r in data) for i in reasons}
    per = sorted(((_num(r[samples]), _num(r[executed]), r[source].strip(), {hdr[i][6:]: _num(r[i]) for i in reasons})
                  for r in data), key=lambda x: -x[0])
    return total, sums, per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    total, sums, per = stalls(args.csv)
    share = 100 / (total or 1)
    print(f"{total} samples over {len(per)} instructions")
    for name, v in sorted(sums.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  stall_{name:20s} {v:8d} {v * share:5.1f} %")
    print()
    for n, ex, src, by in per[:args.top]:
        top2 = sorted(by.items(), key=lambda kv: -kv[1])[:2]
        print(f"{n:7d} {n * share:5.1f} % x{ex:>8d}  {src[:64]:64s} {', '.join(f'{k} {v}' for k, v in top2)}")


if __name__ == "__main__":
    main()
