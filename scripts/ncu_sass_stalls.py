"""Where a kernel's warps wait, from Nsight Compute's source page as CSV (``ncu -i report.ncu-rep --page source
--csv --print-source sass > sass.csv``): the stall reasons summed over all instructions, then the instructions
with the most samples and their two largest reasons.

    python scripts/ncu_sass_stalls.py sass.csv [--top 40]
"""

import argparse
import csv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    with open(args.csv) as f:
        rows = [r for r in csv.reader(f)]
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    hdr, data = rows[start], [r for r in rows[start + 1:] if len(r) == len(rows[start])]
    samples, source, executed = (hdr.index(n) for n in ("Warp Stall Sampling (All Samples)", "Source",
                                                        "Instructions Executed"))
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]

    def num(v: str) -> int:
        return int(float(v.replace(",", ""))) if v.strip() not in ("", "-") else 0

    total = sum(num(r[samples]) for r in data) or 1
    print(f"{total} samples over {len(data)} instructions")
    sums = {hdr[i]: sum(num(r[i]) for r in data) for i in reasons}
    for name, v in sorted(sums.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {name:26s} {v:8d} {100 * v / total:5.1f} %")
    print()
    for r in sorted(data, key=lambda r: -num(r[samples]))[:args.top]:
        top2 = sorted(((hdr[i][6:], num(r[i])) for i in reasons), key=lambda kv: -kv[1])[:2]
        print(f"{num(r[samples]):7d} {100 * num(r[samples]) / total:5.1f} % x{num(r[executed]):>8d}  "
              f"{r[source].strip()[:64]:64s} {', '.join(f'{n} {v}' for n, v in top2)}")


if __name__ == "__main__":
    main()
