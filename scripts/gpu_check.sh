#!/usr/bin/env bash
# Build the CUDA extension, run the GPU tests and the benchmarks in one go on a CUDA machine.
#   scripts/gpu_check.sh [suite ...]        results -> $OUT_DIR (default benchmarks/results/<gpu>)
# Environment: TORCH_CUDA_ARCH_LIST (default 9.0a here), MAX_JOBS (default 16), PYTEST_ARGS,
#   TEST_FILES (default tests/; e.g. "tests/test_decode.py tests/test_int8_matmul.py"),
#   SKIP_TESTS=1 / SKIP_BENCH=1 to run only one half (a device call is limited to 10 minutes),
#   MARKERS (default "gpu": the GPU-only tests; "not gpu" runs the device-generic ones on CUDA).
# The benchmarks run even when a test fails (their own checks still guard the numbers); the
# script then exits non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" DSK_BUILD_CUDA=1
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
"$PY" -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "Running pip as the 'root'"
"$PY" -c "import deepseek_kernels._C" || { echo "the CUDA extension did not build"; exit 1; }
"$PY" -m deepseek_kernels.cli info

tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests"
  "$PY" -m pytest -q -m "${MARKERS:-gpu}" -p no:cacheprovider ${PYTEST_ARGS:-} ${TEST_FILES:-tests/}
  tests_rc=$?
fi
if [ "${SKIP_BENCH:-0}" = 1 ]; then
  echo "== GPU tests exit code $tests_rc (benchmarks skipped)"
  exit "$tests_rc"
fi

echo "== benchmarks"
if [ -n "${OUT_DIR:-}" ]; then
  "$PY" -m deepseek_kernels.cli bench "$@" --out "$OUT_DIR"
else
  "$PY" -m deepseek_kernels.cli bench "$@"
fi
bench_rc=$?
echo "== GPU tests exit code $tests_rc, benchmarks exit code $bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
