"""Runs the quantization benchmark suite: ``python benchmarks/bench_quantization.py [--out DIR] [--quick]``.
Same as ``deepseek-kernels bench quantization``; the suite lives in deepseek_kernels/bench/suites/."""

import sys

from deepseek_kernels.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "quantization", *sys.argv[1:]]))
