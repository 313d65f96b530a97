#!/usr/bin/env bash
# Rebuilds the extension once per compile-time variant and times our quantization kernels alone:
#   benchmarks/tune_variants.sh "-DDSK_QUANT_ROUNDS=2" "-DDSK_QUANT_ROUNDS=4 -DDSK_QUANT_MIN_BLOCKS=4"
# DSK_TUNE_VPT lists the vectors-per-lane values to try (default "2"); DSK_TUNE_SUITE lists what is timed
# (quantization, default, and/or comm_hook for the DSK_REDUCE_* knobs: "quantization comm_hook"). Leaves the last variant built:
# rebuild without DSK_NVCC_EXTRA afterwards.
set -u
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}" MAX_JOBS="${MAX_JOBS:-16}" DSK_BUILD_CUDA=1
for variant in "$@"; do
  start=$(date +%s)
  DSK_NVCC_EXTRA="$variant" python3 -m pip install -q --no-build-isolation --no-deps -e . > /dev/null 2>&1 \
    || { echo "build failed: $variant"; continue; }
  echo "== $variant (build $(( $(date +%s) - start )) s)"
  for suite in ${DSK_TUNE_SUITE:-quantization}; do
    for v in ${DSK_TUNE_VPT:-2}; do DSK_QUANT_VECTORS_PER_THREAD=$v python3 benchmarks/tune_quantization.py "$suite"; done
  done
done
