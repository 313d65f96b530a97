"""The ``deepseek-kernels`` command: ``info`` and ``bench``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deepseek-kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, GPU, extension build and the path each op takes here")
    bench = sub.add_parser("bench", help="run benchmark suites (accuracy only without a CUDA GPU)")
    bench.add_argument("suites", nargs="*", help="suite names (default: all)")
    bench.add_argument("--out", help="results folder (default: benchmarks/results/<gpu>)")
    bench.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    bench.add_argument("--reps", type=int, default=30, help="timed repeats per implementation (median reported)")
    bench.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    bench.add_argument("--list", action="store_true", help="list the suites and exit")
    bench.add_argument("--filter", metavar="REGEX",
                       help="time only the cases whose name matches this regular expression (re.search)")
    args = parser.parse_args(argv)

    if args.command == "info":
        from deepseek_kernels import info

        info()
        return 0
    from deepseek_kernels.bench import SUITES, run_suites

    if args.list:
        for name, mod in SUITES.items():
            print(f"{name:<16} {mod.TITLE}")
        return 0
    return run_suites(args.suites, out=args.out, quick=args.quick, reps=args.reps, make_plot=not args.no_plot,
                       case_filter=args.filter)


if __name__ == "__main__":
    sys.exit(main())
