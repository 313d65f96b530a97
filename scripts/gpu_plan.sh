#!/usr/bin/env bash
# The next GPU session's steps (benchmarks/NOTES.md, "Next GPU session"), one device call each:
#   scripts/gpu_plan.sh STEP        results and logs -> $OUT (default benchmarks/results/plan)
# Steps: ddp | ddp-profile (2+ GPUs: issue 8) | tests [1|2] | tests-generic | graphed | diag-sparse-decode | ncu-sparse-decode | sparse-train | ncu-sparse-train | sparse-pieces | sparse-ab34 | sparse-plan34 | sparse-red35 | sparse-l2-35 | sparse-ab35 | sparse-tests35 | sparse-wide36 | sparse-epi36 | sparse-ar37 | sparse-final37 | sparse-check37 | sparse-dwp37 | sparse-dwp38 | ncu-gateup38 | ncu-kernel38 REGEX TAG | sparse-rot38 | sparse-mp38 | sparse-38b | sparse-38c | sparse-dact39 | sparse-k32-39 | sparse-39b | sparse-power40 | sparse-graphed37 | sparse-host36 | diag-comm-kernels | diag-hier-kernels | diag-hier-variants | tune-hier | tune-hier-131k | tune-hier-512k | tune-hier-decode | tune-attn-tma | tune-attn-ws | attn-sm90 | attn-sm90-bwd | tune-sparse | tune-sparse-decode | tune-sparse-down | tune-sparse-down-nm | tune-comm | comm-ab REV | diag-int8-eager | diag-int8-route | int8-compiled | host-state | diag-pdl | int8-power | tune-int8-rested | tune-int8-gemv | tune-int8 | int8-host | int8-burst |
#        tune-int8-small | bench [suite ...]
# The tuners need no CUDA extension (Triton only), so they skip the build; each step stays under the
# device tool's 10-minute limit (timeouts below).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/plan}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# a sparse-FFN switch A/B (run from benchmarks/, results under $out_abs): ab MODULE.FLAG VALUES TAG ARGS...
ab() {
  local flag=$1 vals=$2 tag=$3; shift 3
  timeout 100 "$PY" ab_sparse_train_flag.py "$flag" --values "$vals" --rounds 6 "$@" \
    --out "$out_abs/ab_${flag#*.}_$tag.json" 2>&1 | grep -v Warn | tail -3
}
# every kernel of one sparse-FFN fwd+bwd step at ratio 0.3 under Nsight Compute: its time and how evenly it keeps the
# SMs busy (scripts/ncu_balance.py), into $1/ncu_balance.{csv,txt}
step_balance() {
  local ncu
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  [ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
  (cd benchmarks && timeout 240 "$ncu" --clock-control none --csv --print-units base \
    --metrics "$("$PY" -c 'import sys; sys.path.insert(0, "../scripts"); import ncu_balance; print(ncu_balance.METRICS)')" \
    "$PY" diag_sparse_train.py --once --ratios 0.3 > "$1/ncu_balance.csv" 2>&1; echo "ncu rc=$?")
  "$PY" scripts/ncu_balance.py "$1/ncu_balance.csv" | tee "$1/ncu_balance.txt"
}
# the GPU tests of the Triton ops, in two groups (``tests 1`` / ``tests 2``; ``tests`` runs both)
TESTS_1="tests/test_int8_matmul.py tests/test_decode.py tests/test_sparse_ffn_triton.py tests/test_hierarchical_decode.py
  tests/test_bench_harness.py"
TESTS_2="tests/test_hierarchical_triton.py tests/test_window_attention_triton.py tests/test_compile_on_gpu.py"

step="${1:-}"
shift || true
build() {  # the CUDA extension (the comm hook's kernels); a few minutes on a fresh machine
  TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="$(nproc)" DSK_BUILD_CUDA=1 "$PY" -m pip install -q --no-build-isolation --no-deps \
    -e . 2>&1 | grep -v "Running pip as the 'root'"
  "$PY" -c "import deepseek_kernels._C" || { echo "the CUDA extension did not build"; exit 1; }
}

case "$step" in
  ddp)  # issue 8 on every GPU of the machine: NCCL tests, then benchmarks/multi_gpu_ddp.py over
    # NVLink (all parts) and over host shared memory (NCCL_P2P_DISABLE=1: link and step parts)
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    nvidia-smi topo -m
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    [ "$gpus" -ge 2 ] || { echo "ddp needs 2 or more GPUs, found $gpus"; exit 1; }
    t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"
    timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_distributed.py
    ddp=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" benchmarks/multi_gpu_ddp.py --out "$OUT/ddp")
    timeout 330 "${ddp[@]}" ${DDP_ARGS:-}
    NCCL_P2P_DISABLE=1 timeout 150 "${ddp[@]}" --label shm --parts link,step --warmup 2 --steps 5 ;;
  ddp-profile)  # the hook's host-time variants (eager / CUDA graphs x packed / separate wire): NCCL tests, step
    # times, a phase profile. Works on 1 GPU too (world 1: the same host work, trivial exchanges).
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    gpus=$("$PY" -c "import torch; print(torch.cuda.device_count())")
    [ "$gpus" -ge 1 ] || { echo "ddp-profile needs a GPU"; exit 1; }
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    ddp=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$gpus" benchmarks/multi_gpu_ddp.py --out "$OUT/ddp")
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_distributed.py \
      tests/test_quantized_reduce.py tests/test_quantization.py
    timeout 200 "${ddp[@]}" --label variants --parts step \
      --configs allreduce,bf16_compress,int8+EF,int8+EF/packed,int8+EF/graph,int8+EF/graph/separate,fp8_e4m3+EF/graph
    timeout 120 "${ddp[@]}" --label variants-profile --parts step --configs int8+EF,int8+EF/graph --profile --steps 3 ;;
  tests)  # scripts/gpu_plan.sh tests [1|2|all] (Triton-only files: no CUDA build needed)
    # one pytest process per file, all at once: the Triton compiles are CPU-bound and the H200 host has
    # 16 cores (session 5: all 110 tests in 190 s instead of ~10 min in one process)
    half="${1:-all}"
    files="$TESTS_1 $TESTS_2"; [ "$half" = 1 ] && files="$TESTS_1"; [ "$half" = 2 ] && files="$TESTS_2"
    # per-file logs in a scratch folder, one combined log under $OUT (the device tool returns 8 files at most)
    logs=$(mktemp -d)
    for f in $files; do
      name=$(basename "$f" .py)
      ( timeout 560 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short "$f" > "$logs/$name.log" 2>&1
        echo "$f rc=$?" > "$logs/rc_$name.txt" ) &
    done
    wait
    for f in $files; do name=$(basename "$f" .py); echo "==== $f"; cat "$logs/$name.log"; done > "$OUT/tests.log"
    cat "$logs"/rc_*.txt
    for f in $files; do grep -hE "FAILED|ERROR|passed|failed" "$logs/$(basename "$f" .py).log" | tail -5; done
    ! grep -q -v "rc=0" "$logs"/rc_*.txt ;;
  tests-generic)  # the unmarked, device-generic tests on CUDA (their `cuda if available` paths): one pytest process
    # per file, 6 at a time (Triton compiles are CPU-bound; the host has 16 cores); a log per file in $OUT/generic.
    # Left out: files that never touch the device (AOT / build / ptxas resources / the multi-GPU script's CLI) and
    # the gloo convergence run (CPU only, minutes). TEST_FILES overrides the list.
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    mkdir -p "$OUT/generic"
    files="${TEST_FILES:-$(ls tests/test_*.py | grep -v -E 'test_(aot_compile|build|cuda_resources|multi_gpu_script|distributed_convergence)\.py')}"
    printf '%s\n' $files | xargs -P 6 -I{} bash -c 'f={}; n=$(basename $f .py); timeout 480 '"$PY"' -m pytest -q \
      -m "not gpu" -p no:cacheprovider --tb=short "$f" > "'"$OUT"'/generic/$n.log" 2>&1; echo "$n rc=$? $(tail -1 "'"$OUT"'/generic/$n.log")"'
    grep -h -E "^(FAILED|ERROR)" "$OUT"/generic/*.log | head -40 ;;
  graphed)  # the multi-call graph timer's GPU test, then every graphed decode row of the Triton suites
    timeout 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_bench_harness.py
    timeout 420 "$PY" -m deepseek_kernels.cli bench int8_matmul attention hierarchical sparse_ffn \
      --filter graphed --out "$OUT/graphed" ;;
  diag-sparse-decode)
    timeout 300 "$PY" benchmarks/diag_sparse_decode.py --out "$OUT/diag_sparse_decode.json" ;;
  sparse-train)  # issue 6 training: the per-kernel profile of fwd+bwd at T8192 (ratios 0.3 / 0.5, and the dense
    # FFN's kernels), then the sparse file's GPU tests
    out_abs=$(cd "$OUT" && pwd)
    (cd benchmarks && timeout 150 "$PY" diag_sparse_train.py --ratios 0.3,0.5 --out "$out_abs/diag_sparse_train.json" \
      | grep -vi warning | head -30)
    timeout 300 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_sparse_ffn_triton.py | tail -2 ;;
  ncu-sparse-decode)  # issue 6 decode: Nsight Compute on the T1 decode kernels (the last two of four eager calls) with
    # source-level stall sampling, to see where the down kernel's 4 warps wait (NOTES session 23)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    [ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
    out_abs=$(cd "$OUT" && pwd)
    (cd benchmarks && timeout 300 "$ncu" --clock-control none -k 'regex:_sparse_ffn_' --launch-skip 8 -c 8 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats \
      --section Occupancy --section SourceCounters --import-source yes \
      "$PY" diag_sparse_decode.py --once --tokens 1 > "$out_abs/ncu_sparse_decode.txt" 2>&1; echo "ncu rc=$?")
    grep -E "^  _|Duration|DRAM Throughput|L2 Hit Rate|Achieved Occupancy|Warp Cycles Per Issued|Stall|stall" \
      "$out_abs/ncu_sparse_decode.txt" | head -80 ;;
  ncu-sparse-train)  # issue 6 training: Nsight Compute on each grouped-GEMM kernel of one fwd+bwd at T8192 ratio 0.3
    # (speed of light, memory and compute workload, warp stall reasons, occupancy; clocks left alone: METHOD.md);
    # on sm_90 the Gluon kernels of sparse_ffn_sm90 (session 31: the gathered ones at 388-416 TF/s, gate/up at 590)
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    [ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
    (cd benchmarks && timeout 400 "$ncu" --clock-control none --target-processes all \
      -k 'regex:_sparse_ffn_(gate_up|bwd_dact|bwd_dw_gate_up|bwd_dw_down)_kernel|_sorted_rows_tma_kernel|_sm90_kernel' -c 6 \
      --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats \
      --section SourceCounters \
      "$PY" diag_sparse_train.py --once --ratios 0.3 > "$OUT/ncu_sparse_train.txt" 2>&1; echo "ncu rc=$?")
    grep -E "^  _|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|L2 Hit Rate|DRAM Throughput|Achieved Occupancy|Registers Per|Stall|Issued Ipc|No Eligible" \
      "$OUT/ncu_sparse_train.txt" | head -120 ;;
  sparse-pieces)  # issue 6: session 32's dW kernels with the neurons on N in pieces (sparse_ffn.DW_PIECES, the default
    # since session 33): their GPU tests, then an A/B against the two-tile forms on the training backward (T8192, 0.3)
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse_ffn_triton.py -k "test_dw_sm90" 2>&1 | tail -3
    (cd benchmarks && timeout 200 "$PY" ab_sparse_train_flag.py sparse_ffn.DW_PIECES --rounds 6 \
      --out "$OUT/ab_dw_pieces.json") ;;
  sparse-ab34)  # issue 6, session 34: the GPU tests of the sparse FFN kernels, then A/Bs of session 33's tail pieces of
    # gate/up / dact (TAIL_PIECES) on the T8192 step
    timeout 260 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse_ffn_triton.py \
      -k "sm90 or combine or tail or on_gpu" > "$OUT/tests_sparse.txt" 2>&1
    for spec in "sparse_ffn_sm90.TAIL_PIECES:False;True:--fwd" "sparse_ffn_sm90.TAIL_PIECES:False;True:"; do
      IFS=: read -r flag vals mode <<< "$spec"
      (cd benchmarks && timeout 90 "$PY" ab_sparse_train_flag.py "$flag" --values "$vals" $mode --rounds 6 \
        --out "$OUT/ab_${flag##*.}${mode:+_fwd}.json" 2>&1 | tail -3)
    done
    tail -3 "$OUT/tests_sparse.txt"; grep -E "^FAILED|^ERROR" "$OUT/tests_sparse.txt" | head -20 ;;
  sparse-plan34)  # issue 6, session 34: the backward reuses the forward's grouping (the blocks op's plan output):
    # the compiled-op GPU tests, the per-kernel profile (one grouping per step), then the suite
    timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_compile_on_gpu.py -k sparse 2>&1 | tail -3
    timeout 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse_ffn_triton.py \
      -k "test_forward_on_gpu or test_forward_backward_on_gpu or deterministic" 2>&1 | tail -3
    out_abs=$(cd "$OUT" && pwd)
    (cd benchmarks && timeout 60 "$PY" diag_sparse_train.py --ratios 0.3,0.5 --out "$out_abs/diag_sparse_train.json" \
      2>&1 | grep -v Warning | grep -v warn_once | tail -40)
    timeout 130 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd\+bwd T8192 ratio0\.[35].*dense" \
      --out "$OUT/suite" 2>&1 | grep -E "^fwd" | head -12 ;;
  sparse-red35)  # issue 6, session 35: fp32 reductions in L2 (v4 red / atomic) against bf16 rows + combine, then
    # the whole sparse suite's forward rows at this tree
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    (cd benchmarks && timeout 120 "$PY" diag_sparse_red.py --out "$out_abs/diag_sparse_red.json" 2>&1 | grep -v Warn | tail -40)
    timeout 330 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd" --out "$OUT/suite" 2>&1 | grep -E "^fwd" | head -30 ;;
  sparse-l2-35)  # issue 6, session 35: are the gathered kernels waiting on DRAM (tile orders, L2-resident rows);
    # the combine over token-major rows
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    (cd benchmarks && timeout 200 "$PY" diag_sparse_gather_l2.py --out "$out_abs/diag_sparse_gather_l2.json" 2>&1 | grep -v Warn | tail -30
     timeout 100 "$PY" diag_sparse_ceilings.py --out "$out_abs/diag_sparse_ceilings.json" 2>&1 | grep -v Warn | tail -14) ;;
  sparse-ab35)  # issue 6, session 35 A/Bs (call 9): whole-row combine tiles (COMBINE_ROWS, kept) at 0.5 / 0.3. The
    # same call measured three switches since removed (code at 9c541c0 / 679510c / f8ccdae): dact's and gate/up's A
    # operand in registers (DACT_REG_A, GATE_UP_REG_A: slower) and the down / dx warpgroups staggered (STAGGER: a tie)
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    cd benchmarks
    ab sparse_ffn.COMBINE_ROWS "False;True" 0.5fwd --ratio 0.5 --fwd
    ab sparse_ffn.COMBINE_ROWS "False;True" 0.5bwd --ratio 0.5
    ab sparse_ffn.COMBINE_ROWS "False;True" 0.3bwd --ratio 0.3 ;;
  sparse-tests35)  # issue 6, session 35: the GPU tests of the sparse FFN kernels the combine tiles touch
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse_ffn_triton.py \
      -k "combine or test_forward_on_gpu or test_forward_backward_on_gpu or deterministic or down_tma_on_gpu or sorted_rows_gemm_sm90 or dact_sm90 or gate_up_sm90" 2>&1 | tail -3
    timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_compile_on_gpu.py -k sparse 2>&1 | tail -2 ;;
  sparse-wide36)  # issue 6, session 36: dact as one 256-column product (DACT_WIDE: lost, removed; code at 0ff6529) and
    # gate/up's whole tiles as one product over the merged gate / up tiles (GATE_UP_WIDE): their GPU tests, then
    # same-run A/Bs at 0.3 / 0.5
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "dact_sm90 or gate_up_sm90 or tail_pieces" 2>&1 | tail -4
    cd benchmarks
    ab sparse_ffn_sm90.GATE_UP_WIDE "False;True" 0.3fwd --ratio 0.3 --fwd
    ab sparse_ffn_sm90.GATE_UP_WIDE "False;True" 0.5fwd --ratio 0.5 --fwd ;;
  sparse-epi36)  # issue 6, session 36 (call 7 ran it with A/Bs of the switches since removed: DACT_EPI kept as the
    # only form, GATE_UP_EPI dropped; code at a1a939c): the gathered kernels' GPU tests, each kernel alone
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "dact_sm90 or gate_up_sm90" 2>&1 | tail -4
    cd benchmarks
    timeout 200 "$PY" diag_sparse_epilogue.py --out "$out_abs/diag_sparse_epilogue.json" 2>&1 | grep -v Warn | tail -9 ;;
  sparse-ar37)  # issue 6, session 37 (call 5, with one A_RESIDENT switch for both, off by default): the short-K GEMMs
    # with A resident per unit and the warpgroups on alternate column tiles: GPU tests (same bits as the two-half
    # kernel), each kernel alone at 0.3 / 0.5, then A/Bs of the whole forward (down) / backward (dx)
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "sorted_rows_gemm_sm90" 2>&1 | tail -4
    for r in 0.3 0.5; do
      (cd benchmarks && timeout 200 "$PY" diag_sparse_sm90.py --ratio $r --gemms-only --ar \
        --out "$out_abs/diag_sparse_ar_$r.json" 2>&1 | grep -v Warn | tail -12)
    done
    cd benchmarks
    for r in 0.3 0.5; do
      ab sparse_ffn_sm90.A_RESIDENT_DOWN "False;True" "fwd$r" --fwd --ratio $r
      ab sparse_ffn_sm90.A_RESIDENT_DX "False;True" "bwd$r" --ratio $r
    done ;;
  sparse-final37)  # issue 6, session 37: the sparse FFN's GPU tests with the A-resident down projection, an A/B of
    # gate/up's ring in K steps of 32 (8 slots) against 64 (4), then the suite's training rows
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py -k "test_forward_on_gpu or \
      test_forward_backward_on_gpu or deterministic or down_tma_on_gpu or dx_tma_on_gpu or sorted_rows_gemm_sm90 or \
      large_batch_defaults" 2>&1 | tail -3
    (cd benchmarks && ab sparse_ffn_sm90.GATE_UP_CONFIG "{'block_n': 128, 'block_k': 64, 'stages': 4};{'block_n': 128, \
'block_k': 32, 'stages': 8}" fwd0.3 --fwd --ratio 0.3)
    timeout 300 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd" --out "$out_abs/suite" 2>&1 | \
      grep -E "^fwd|ratio" | head -20 ;;
  sparse-check37)  # issue 6, session 37, the final tree: GPU tests, the A-resident down's units (16 vs 8 column
    # tiles) in a forward A/B, the fwd+bwd steps as CUDA-graph replays (device-bound ratios), the suite's T8192 rows
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py -k "sorted_rows_gemm_sm90 \
      or test_forward_backward_on_gpu or down_tma_on_gpu or dx_tma_on_gpu" 2>&1 | tail -2
    (cd benchmarks && ab sparse_ffn_sm90.AR_DOWN_CONFIG "{'block_n': 128, 'block_k': 32, 'stages': 8, 'o_bufs': 1, \
'unit_cols': 16};{'block_n': 128, 'block_k': 32, 'stages': 8, 'o_bufs': 1, 'unit_cols': 8}" fwd0.3 --fwd --ratio 0.3)
    (cd benchmarks && timeout 150 "$PY" diag_sparse_host.py --ratios 0.3,0.5 --graphed \
      --out "$out_abs/diag_sparse_host_graphed.json" 2>&1 | grep -v Warn | tail -7)
    timeout 150 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd\+bwd T8192 ratio0\.[35].*dense" \
      --out "$out_abs/suite_rows" 2>&1 | grep -E "^fwd" ;;
  sparse-dwp37)  # issue 6, session 37 (call 8): dW gate/up's pieces kernel with 5 ring slots or K steps of 128 (2
    # slots) against 4 slots of 64 (DW_PIECES_GU_CONFIG; dW down's does not fit 5), whole backward A/Bs
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    cd benchmarks
    ab sparse_ffn_sm90.DW_PIECES_GU_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 64, 'stages': 5}" s5_0.3 --ratio 0.3
    ab sparse_ffn_sm90.DW_PIECES_GU_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 128, 'stages': 2}" k128_0.3 --ratio 0.3
    ab sparse_ffn_sm90.DW_PIECES_GU_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 64, 'stages': 5}" s5_0.5 --ratio 0.5 ;;
  sparse-dwp38)  # issue 6, next session: dW gate/up's pieces kernel at 5 ring slots (session 37 call 8: backward
    # -0.5 % / -1 % at 0.3 / 0.5, same bits): its GPU tests with the setting, then the A/B once more; if both hold,
    # make DW_PIECES_GU_CONFIG's stages 5
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 240 "$PY" -c "import sys, pytest; import deepseek_kernels.triton.sparse_ffn_sm90 as g9
g9.DW_PIECES_GU_CONFIG['stages'] = 5
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-m', 'gpu', 'tests/test_sparse_ffn_triton.py', '-k',
                      'dw_sm90 or test_forward_backward_on_gpu or deterministic']))" 2>&1 | tail -3
    (cd benchmarks && ab sparse_ffn_sm90.DW_PIECES_GU_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 64, 'stages': 5}" \
      s5_0.3 --ratio 0.3) ;;
  ncu-gateup38|ncu-kernel38)  # issue 6: Nsight Compute (full set, source counters) on one kernel of the training
    # step alone (ncu-gateup38: the forward's gathered gate/up; ncu-kernel38 REGEX TAG: any): the report, its details
    # page and the SASS with per-instruction stall samples come back under $OUT
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
    [ -n "$ncu" ] || { echo "no ncu on this machine"; exit 1; }
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    regex=_gate_up_sm90_kernel; tag=gate_up
    [ "$step" = ncu-kernel38 ] && { regex=$1; tag=$2; }
    (cd benchmarks && timeout 300 "$ncu" --clock-control none --set full --import-source yes \
      -k "regex:$regex" -c 1 -f -o "$out_abs/ncu_$tag" \
      "$PY" diag_sparse_train.py --once --ratios 0.3 > "$out_abs/ncu_${tag}_run.txt" 2>&1; echo "ncu rc=$?")
    "$ncu" -i "$out_abs/ncu_$tag.ncu-rep" --page details > "$out_abs/ncu_${tag}_details.txt" 2>&1
    "$ncu" -i "$out_abs/ncu_$tag.ncu-rep" --page source --csv --print-source sass \
      > "$out_abs/ncu_${tag}_sass.csv" 2>&1
    grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Hit Rate|DRAM Throughput|Issued Ipc|No Eligible|SM Frequency" \
      "$out_abs/ncu_${tag}_details.txt" | head -20 ;;
  sparse-rot38)  # issue 6: gate/up's items in rotated program order (GATE_UP_ROTATE): its GPU tests, A/Bs of the
    # forward at 0.3 / 0.5, then every kernel of one fwd+bwd step: how evenly it keeps the SMs busy (ncu_balance.py)
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "test_gate_up_sm90_on_gpu or test_forward_on_gpu" 2>&1 | tail -2
    for r in 0.3 0.5; do
      (cd benchmarks && ab sparse_ffn_sm90.GATE_UP_ROTATE "False;True" "fwd_$r" --fwd --ratio "$r")
    done
    step_balance "$out_abs" ;;
  sparse-mp38)  # issue 6: gate/up's last column tile as two merged products (GATE_UP_MERGED_PIECES): the gate/up and
    # forward GPU tests, then A/Bs of the forward at 0.3 / 0.5
    timeout 300 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "test_gate_up_sm90_on_gpu or test_forward_on_gpu or test_forward_backward_on_gpu" 2>&1 | tail -2
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    for r in 0.3 0.5; do
      (cd benchmarks && ab sparse_ffn_sm90.GATE_UP_MERGED_PIECES "False;True" "fwd_$r" --fwd --ratio "$r")
    done ;;
  sparse-38b)  # issue 6: gate/up's merged pieces (GATE_UP_MERGED_PIECES) and dact's prefetching epilogue
    # (DACT_EPI_PREFETCH): their GPU tests, then A/Bs of the forward / backward at 0.3 / 0.5 (session 38's run also
    # A/B'd the A-resident down's split last round, a tie, removed after)
    timeout 330 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "test_gate_up_sm90_on_gpu or test_dact_sm90_on_gpu or test_forward_on_gpu or test_forward_backward_on_gpu \
          or (test_sorted_rows_gemm_sm90_on_gpu and down)" 2>&1 | tail -2
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    for r in 0.3 0.5; do
      (cd benchmarks && ab sparse_ffn_sm90.GATE_UP_MERGED_PIECES "False;True" "fwd_$r" --fwd --ratio "$r")
      (cd benchmarks && ab sparse_ffn_sm90.DACT_EPI_PREFETCH "False;True" "bwd_$r" --ratio "$r")
    done ;;
  sparse-38c|sparse-dact39)  # issue 6: dact's second part padded to one 128-column product instead of its 64 + 32
    # pieces (sparse-38c: DACT_TAIL_PIECES); sparse-dact39: dact's pieces in weight boxes of their own
    # (DACT_SPLIT_BOXES). The GPU tests, then A/Bs of the backward at 0.3 / 0.5. (Session 39's call 1 also A/B'd the
    # A tiles in a ring of their own, dact 4 slots and gate/up 6: both slower, removed; code at bf08b19.)
    flag="DACT_TAIL_PIECES"; vals="True;False"; tests="test_dact_sm90_on_gpu"
    [ "$step" = sparse-dact39 ] && { flag="DACT_SPLIT_BOXES"; vals="False;True"
                                     tests="test_dact_sm90_on_gpu or test_gate_up_sm90_on_gpu"; }
    # SKIP_TESTS=1 leaves the tests out; RATIOS="0.3" runs the A/Bs at fewer ratios
    [ -n "${SKIP_TESTS:-}" ] || timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "$tests" 2>&1 | tail -2
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    for r in ${RATIOS:-0.3 0.5}; do
      (cd benchmarks && ab "sparse_ffn_sm90.$flag" "$vals" "bwd_$r" --ratio "$r")
    done ;;
  sparse-k32-39)  # issue 6 (session 39): dact in K steps of 32 with 7 ring slots (the default since): the dact, gate/up,
    # forward and fwd+bwd GPU tests, the same-run A/B against session 38's 64 x 3 at 0.3 / 0.5, then the suite's
    # training rows
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_sparse_ffn_triton.py \
      -k "dact_sm90 or gate_up_sm90 or forward_backward" 2>&1 | tail -2
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    for r in 0.3 0.5; do
      (cd benchmarks && ab sparse_ffn_sm90.DACT_CONFIG "{'block_n': 128, 'block_k': 64, 'stages': 3};\
{'block_n': 128, 'block_k': 32, 'stages': 7}" "k32_bwd_$r" --ratio "$r")
    done
    timeout 200 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd" --out "$OUT/suite" 2>&1 \
      | grep -E "^fwd" | head -12 ;;
  sparse-39b)  # issue 6 (session 39): at dact's K 32 x 7, its epilogue's prefetch and chunk rows once more (backward
    # A/Bs at 0.3), then every kernel of one fwd+bwd step at 0.3: time and how evenly it keeps the SMs busy
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    (cd benchmarks && ab sparse_ffn_sm90.DACT_EPI_PREFETCH "True;False" "k32_bwd_0.3" --ratio 0.3)
    (cd benchmarks && ab sparse_ffn_sm90.DACT_EPI_ROWS "16;8" "k32_bwd_0.3" --ratio 0.3)
    step_balance "$out_abs" ;;
  sparse-power40)  # issue 6, next session: the T8192 fwd+bwd vs dense rows at 0.5 / 0.3 timed three ways (alternating
    # bursts, rested, sustained: the suite's POWER_ROWS), clocks sampled during the rounds
    timeout 300 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd\+bwd T8192 ratio0\.(5|3) .*dense" \
      --out "$OUT/suite" 2>&1 | grep -E "^fwd|round" | head -20 ;;
  sparse-graphed37)  # issue 6, next session: the training step's device-bound ratios (ours and dense fwd+bwd as
    # CUDA-graph replays; session 36 found the eager step host-bound near ratio 0.3), then where the host's time goes
    # (inside Triton's launcher per kernel, descriptor building, the rest; no profiler)
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    (cd benchmarks && timeout 200 "$PY" diag_sparse_host.py --ratios 0.3,0.5,0.15 --graphed \
      --out "$out_abs/diag_sparse_host_graphed.json" 2>&1 | grep -v Warn | tail -12)
    (cd benchmarks && timeout 200 "$PY" diag_sparse_host.py --ratios 0.3,0.15 --breakdown \
      --out "$out_abs/diag_sparse_host_breakdown.json" 2>&1 | grep -v Warn | tail -30) ;;
  sparse-host36)  # issue 6, next session: the T8192 0.15 fwd+bwd row (2.95-2.99x in session 35, 3.96x in session 34):
    # the host's enqueue time per step and its cProfile (pack_plan / unpack_plan), then the suite's 0.15 / 0.3 rows
    out_abs=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
    (cd benchmarks && timeout 200 "$PY" diag_sparse_host.py --ratios 0.15,0.3 --out "$out_abs/diag_sparse_host.json" \
      2>&1 | grep -v Warn | tail -60)
    timeout 200 "$PY" -m deepseek_kernels.cli bench sparse_ffn --filter "^fwd\+bwd T8192 ratio0\.(15|3) .*dense" \
      --out "$OUT/suite" 2>&1 | grep -E "^fwd" | head ;;
  diag-comm-kernels)  # per-kernel time of the DDP hook's local work (needs the CUDA build: run after `bench comm_hook`)
    timeout 300 "$PY" benchmarks/diag_comm_kernels.py --out "$OUT/diag_comm_kernels.json" ;;
  diag-hier-kernels)  # per-kernel time of hierarchical fwd+bwd at 8k-512k (the scaling question)
    timeout 400 "$PY" benchmarks/diag_hier_kernels.py --out "$OUT/diag_hier_kernels.json" ;;
  diag-hier-variants)  # the same, defaults and the untimed variants (packed tiles, bcast, pool per group)
    timeout 560 "$PY" benchmarks/diag_hier_kernels.py --variants --out "$OUT/diag_hier_variants.json" ;;
  tune-hier)
    timeout 560 "$PY" benchmarks/tune_hierarchical.py --out "$OUT/tune_hierarchical.json" ;;
  tune-hier-131k)  # the tiles at S=131072 (summary tiles packed across levels since session 8), dkdv per key vs broadcast
    timeout 560 "$PY" benchmarks/tune_hierarchical.py --seqlen 131072 --bcast --out "$OUT/tune_hier_131k.json" ;;
  tune-hier-512k)  # the backward kernels' tiles at S=524288 (dsum's block_s: q/dO visits vs wasted pairs, NOTES session 8)
    timeout 560 "$PY" benchmarks/tune_hierarchical.py --seqlen 524288 --skip-fwd --kernels dsum --out "$OUT/tune_hier_512k.json" ;;
  tune-hier-decode)
    timeout 300 "$PY" benchmarks/tune_hierarchical.py --decode --out "$OUT/tune_hier_decode.json" ;;
  tune-attn-tma)
    timeout 560 "$PY" benchmarks/tune_attention.py --tma --fwd-only --shapes "8192,4,4096,32,32" \
      --out "$OUT/tune_attention_tma.json" ;;
  attn-sm90)  # issue 3: the Gluon forward's GPU tests (incl. the persistent grid, written after session 24's last
    # call), then diag_attn_sm90 check + time (one-tile / no ping-pong / persistent rows, Triton forward, FlexAttention);
    # each diag step in a child under a watchdog
    timeout 240 "$PY" -m pytest -q -p no:cacheprovider --tb=short tests/test_window_attention_sm90.py | tail -4
    timeout 330 "$PY" benchmarks/diag_attn_sm90.py --steps check,time --timeout 160 --out "$OUT/diag_attn_sm90.json" \
      | grep -v " ok$" | tail -20 ;;
  attn-sm90-bwd)  # issue 3: the Gluon backward (off by default) checked, timed and its launch shapes swept
    timeout 500 "$PY" benchmarks/diag_attn_sm90.py --steps check_bwd,time_bwd,tune_bwd --timeout 160 \
      --out "$OUT/diag_attn_sm90_bwd.json" | grep -v " ok$" | tail -20 ;;
  tune-attn-ws)  # issue 3: the warp-specialized one-loop forward (ws=True). Session 12: its first launch at
    # (128, 64, 4, 2) never finished (190 s). diag_attn_ws.py runs each step in a child under a watchdog (a hang
    # prints its Python stack: compiler or synchronize); only if the full-shape steps finish, the tuner's sweep.
    timeout 420 "$PY" benchmarks/diag_attn_ws.py --out "$OUT/diag_attn_ws.json" || { echo "a ws step failed or hung: no sweep"; exit 0; }
    DSK_ATTN_WS=1 timeout 150 "$PY" benchmarks/tune_attention.py --ws --quick --fwd-only --shapes "8192,4,1024,32,32" \
      --out "$OUT/tune_attention_ws.json" ;;
  tune-sparse)
    timeout 560 "$PY" benchmarks/tune_sparse_ffn.py --out "$OUT/tune_sparse_ffn.json" ;;
  tune-sparse-decode)
    timeout 560 "$PY" benchmarks/tune_sparse_ffn.py --decode --out "$OUT/tune_sparse_decode.json" ;;
  tune-sparse-down)  # issue 6: the down kernel's configs alone at 1 and 8 tokens (session 14 added 6-8 stage and
    # 64-wide candidates of the one-K-tile form: the T1 down kernel moves 17.6 MB at 1.74 TB/s)
    timeout 400 "$PY" benchmarks/tune_sparse_ffn.py --decode --kernels down --out "$OUT/tune_sparse_down.json" ;;
  tune-sparse-down-nm)  # issue 6: the down kernel's configs with w_down neuron-major (each used block's down slice
    # one contiguous slab; session 15's reading of the T1 down kernel's 1.74 TB/s) against nn.Linear's layout, one call
    timeout 280 "$PY" benchmarks/tune_sparse_ffn.py --decode --kernels down --down-layout neuron-major \
      --out "$OUT/tune_sparse_down_nm.json"
    timeout 280 "$PY" benchmarks/tune_sparse_ffn.py --decode --kernels down --out "$OUT/tune_sparse_down.json" ;;
  tune-comm)  # issue 7: compile-time variants of the comm kernels against the default build, all in one call:
    #   scripts/gpu_plan.sh tune-comm "-DFLAG=1 ..." ["-D..." ...]
    # the comm GPU tests on the first variant's build, then the comm_hook suite per build (the default first),
    # then the default build again. Session 15 timed the reduce kernel's early residual loads (W=8 graphed 66.3 %
    # vs 68.0 % default, W=2 65.9 vs 73.1 %: removed) and the 2-CTA cap alone (68.1 / 69.3 %). Session 23 timed
    # (and removed) fp8 stochastic rounding with one decode per element, the narrow form's early residual loads and
    # the dequantize kernel at 16 codes per lane (benchmarks/NOTES.md).
    [ $# -ge 1 ] || { echo "usage: scripts/gpu_plan.sh tune-comm \"-DFLAG=1 ...\" [...]"; exit 1; }
    DSK_NVCC_EXTRA="$1" build
    timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_quantized_reduce.py \
      tests/test_distributed.py tests/test_quantization.py > "$OUT/comm_variant_tests.log" 2>&1
    echo "tests with $1: rc=$?"; tail -1 "$OUT/comm_variant_tests.log"
    DSK_TUNE_SUITE=comm_hook timeout 400 bash benchmarks/tune_variants.sh "" "$@"
    build ;;  # tune_variants.sh leaves the last variant installed: back to the default build
  diag-int8-eager)  # issue 5: host vs kernel time of eager int8 calls at decode and at M2048 N4096 K4096 (0.64x in
    # session 9's suite, 56 us kernel-alone in session 3's sweep), then the int8 suite's rows that hinge on it
    for shape in 1,14336,4096 2048,4096,4096; do timeout 120 "$PY" benchmarks/diag_eager_overhead.py --shape "$shape"; done
    timeout 300 "$PY" -m deepseek_kernels.cli bench int8_matmul --filter "^M2048 N4096 K4096|graphed|^e2e" \
      --out "$OUT/int8_eager" ;;
  tune-int8-gemv)  # issue 5: the C++ decode GEMV's rows per CTA (16/32/64) vs the Triton kernels, graphed and eager
    # (the ops, the pybind11 entries, the public functions), each variant in its own process (needs the CUDA build: built
    # here if missing). The tuner runs first: eager rows are host-bound and slowed after long test runs (session 14).
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    timeout 300 "$PY" benchmarks/tune_int8_gemv.py --out "$OUT/tune_int8_gemv.json"
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=line tests/test_int8_matmul.py -k "gemv or linear" \
      | tail -3 ;;
  diag-int8-route)  # issue 5: where eager int8 decode spends host time (per layer, per module of one e2e block, a CPU
    # profile), then the eager decode and e2e 1-token rows; the host probe is in the bench JSON
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    timeout 150 "$PY" benchmarks/diag_int8_route.py --out "$OUT/diag_int8_route.json" 2>&1 | tail -60
    timeout 200 "$PY" -m deepseek_kernels.cli bench int8_matmul --no-plot --out "$OUT/int8_route" \
      --filter "^M(1|4|16) N[0-9]+ K[0-9]+ vs cuBLAS bf16$|int8_linear.*linear$|^e2e.*1 token" ;;
  int8-compiled)  # issue 5: the extension's int8 GPU tests (the eager entries as restructured after session 15's last
    # GPU call) and quantize_model's layers under torch.compile(mode="reduce-overhead") (same bits as eager), then
    # the 4-block stack at 1 token eager and compiled, bf16 and int8 (diag_int8_route.py --stack-only --compiled)
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    timeout 250 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_int8_matmul.py \
      -k "gemv or linear or eager or reduce_overhead" | tail -3
    timeout 300 "$PY" benchmarks/diag_int8_route.py --stack-only --compiled --out "$OUT/int8_compiled.json" ;;
  host-state)  # the eager rows' dependence on what ran before (session 14: ~2x slower after ~70 s of GPU tests in the
    # same call): one eager decode row and the host probe, then the int8 GPU tests, then the same row again
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    row='^M1 N14336 K4096 vs cuBLAS bf16$|^M2048 N4096 K4096'
    timeout 90 "$PY" -m deepseek_kernels.cli bench int8_matmul --no-plot --out "$OUT/host_before" --filter "$row" \
      | grep -E "host probe|^M"
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_int8_matmul.py | tail -1
    uptime
    timeout 90 "$PY" -m deepseek_kernels.cli bench int8_matmul --no-plot --out "$OUT/host_after" --filter "$row" \
      | grep -E "host probe|^M" ;;
  tune-int8-small)  # the decode GEMVs (M <= 16), graphed; TUNE_ARGS=--pdl as int8_matmul launches them on Hopper
    timeout 560 "$PY" benchmarks/tune_int8.py --shapes "1,14336,4096;16,14336,4096;1,4096,14336" ${TUNE_ARGS:-} \
      --out "$OUT/tune_int8_small.json" ;;
  comm-ab)  # issue 7: the comm_hook suite's W=2 rows for an older tree (exported by scripts/ab_tree.sh REV into .ab/REV,
    # carried to the device) and for this tree, built and timed in one call, old / new / old
    rev="${1:?usage: scripts/gpu_plan.sh comm-ab REV (after scripts/ab_tree.sh REV, with .ab/REV carried)}"
    ab=".ab/$rev"
    [ -d "$ab" ] || { echo "$ab is missing: run scripts/ab_tree.sh $rev here and carry .ab/$rev"; exit 1; }
    ( cd "$ab" && TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="$(nproc)" DSK_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace \
        > /dev/null 2>&1 ) || { echo "the $rev tree did not build"; exit 1; }
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || build
    outdir=$(cd "$OUT" && pwd)
    for side in old new old; do
      # run from inside the tree: python puts the working directory first on sys.path, ahead of PYTHONPATH
      if [ "$side" = old ]; then path="$PWD/$ab"; else path="$PWD"; fi
      ( cd "$path" && echo "== $side: $(PYTHONPATH="$path" "$PY" -c 'import deepseek_kernels._C as c; print(c.__file__)')"
        PYTHONPATH="$path" timeout 120 "$PY" -m deepseek_kernels.cli bench comm_hook --filter "W=2" \
          --out "$outdir/comm_ab_$side" 2>&1 | grep -E "W=2|copy bandwidth|extension" )
    done ;;
  diag-pdl)  # issues 5 and 6: decode chains as programmatic dependent launches (DSK_PDL=1, opt-in): the GPU tests
    # (bits equal over fresh inputs, eager and graphed) then graphed times with and without (int8_linear, sparse FFN, stack)
    timeout 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_int8_matmul.py \
      tests/test_sparse_ffn_triton.py -k "programmatic or direct_launch"
    timeout 200 "$PY" benchmarks/diag_pdl.py ;;
  int8-power)  # issue 5: the M8192 rows at the GPU's power-limited steady state (2 s of back-to-back calls
    # before each timing; session 10: 8192^3 0.834 ms cool, 1.033 ms at the 700 W cap), plain and persistent TMA
    timeout 280 "$PY" benchmarks/tune_int8.py --sustained 2 --shapes "8192,8192,8192;8192,4096,4096" \
      --out "$OUT/tune_int8_sustained.json"
    timeout 280 "$PY" benchmarks/tune_int8.py --tma --persistent --sustained 2 --shapes "8192,8192,8192;8192,4096,4096" \
      --out "$OUT/tune_int8_tma_sustained.json" ;;
  tune-int8-rested)  # issue 5: M8192 N4096 K4096 reads 1.47-1.49x from a rested GPU (1.5x asked; 1.70x sustained):
    # the plain and the persistent TMA kernel's tiles, each config timed for ~5 ms after 0.5 s of idle
    timeout 200 "$PY" benchmarks/tune_int8.py --rested 0.5 --shapes "8192,4096,4096;8192,8192,8192" \
      --out "$OUT/tune_int8_rested.json"
    timeout 200 "$PY" benchmarks/tune_int8.py --tma --persistent --rested 0.5 --shapes "8192,4096,4096;8192,8192,8192" \
      --out "$OUT/tune_int8_tma_rested.json" ;;
  tune-int8)
    # the persistent TMA kernel (the eager default at M, N >= 8192) on the two M8192 shapes below 1.5x,
    # then with the TMA-store epilogue (3 stages at most at 128x256: the 4-stage rows fail by design)
    timeout 270 "$PY" benchmarks/tune_int8.py --tma --persistent --shapes "8192,4096,4096;8192,14336,4096" \
      --out "$OUT/tune_int8_tma_persistent.json"
    timeout 270 "$PY" benchmarks/tune_int8.py --tma --persistent --tma-store \
      --shapes "8192,8192,8192;8192,4096,4096;8192,14336,4096" --out "$OUT/tune_int8_tma_store.json" ;;
  int8-host)  # issue 5: the eager M2048 N4096 K4096 row (1.66x in one call, 1.42x in the next: session 20): host
    # time per call against GPU time, then the M2048 rows again
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    timeout 120 "$PY" - <<'PY'
import sys, torch
sys.path.insert(0, "benchmarks")
from _tuning import bench_graphed, per_call_us
import deepseek_kernels as dk
for M, N, K in ((2048, 4096, 4096), (2048, 14336, 4096)):
    a = torch.randint(-127, 128, (M, K), dtype=torch.int8, device="cuda")
    b = torch.randint(-127, 128, (N, K), dtype=torch.int8, device="cuda")
    sa, sb = torch.rand(M, 1, device="cuda"), torch.rand(N, device="cuda")
    call = lambda: dk.int8_matmul(a, b, sa, sb)
    print(f"M{M} N{N} K{K}: int8_matmul wall {per_call_us(call, 300):.1f} us/call, host {per_call_us(call, 300, wait=False):.1f},"
          f" graphed {1e3 * bench_graphed(call):.1f} (GPU time; the weights stay in L2 here)")
PY
    timeout 300 "$PY" -m deepseek_kernels.cli bench int8_matmul --filter "M2048" --out "$OUT" ;;
  int8-burst)  # issue 5: host vs GPU time of the eager M2048 rows on the suite's own inputs, the burst timer at 1-64
    # calls per sample, and ours' host functions by cProfile (session 21: host ~= GPU time there)
    "$PY" -c "import deepseek_kernels._C" 2>/dev/null || { t0=$SECONDS; build; echo "build: $((SECONDS - t0)) s"; }
    for shape in 2048,4096,4096 2048,14336,4096; do
      timeout 150 "$PY" benchmarks/diag_int8_burst.py --shape "$shape" --out "$OUT/burst_${shape//,/_}.json"
    done ;;
  bench)
    SKIP_TESTS=1 OUT_DIR="$OUT" timeout 570 bash scripts/gpu_check.sh "$@" ;;
  *)
    echo "usage: scripts/gpu_plan.sh tests|tests-generic|graphed|diag-sparse-decode|ncu-sparse-decode|diag-comm-kernels|diag-hier-kernels|diag-hier-variants|tune-hier|tune-hier-131k|tune-hier-512k|tune-hier-decode|tune-attn-tma|tune-attn-ws|tune-sparse|tune-sparse-decode|tune-sparse-down|tune-comm|comm-ab REV|diag-int8-eager|diag-int8-route|host-state|diag-pdl|int8-power|tune-int8-rested|tune-int8-gemv|tune-int8|tune-int8-small|bench [suite ...]" >&2
    exit 2 ;;
esac
