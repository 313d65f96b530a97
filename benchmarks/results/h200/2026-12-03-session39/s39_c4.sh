# session 39 call 4: dact K32 (7 slots) with and without split boxes, 6 vs 7 slots; the dW pieces kernels at K32
# (ran from the repository root as scripts/s39_c4.sh; kept here as the record of call 4)
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1; cd benchmarks
tag=${TAG:-c4}
ab() { local flag=$1 vals=$2 t=$3; shift 3
  timeout 100 python ab_sparse_train_flag.py "$flag" --values "$vals" --rounds 6 "$@" --out "$OUT/$tag/ab_${flag#*.}_$t.json" 2>&1 | grep -v Warn | tail -3; }
mkdir -p $OUT/$tag
K32S7="{'block_n': 128, 'block_k': 32, 'stages': 7, 'a_stages': 0}"
for r in ${RATIOS:-0.3 0.5}; do
  ab sparse_ffn_sm90.DACT_SPLIT_BOXES "False;True" k32s7_$r --ratio $r --set "sparse_ffn_sm90.DACT_CONFIG=$K32S7"
  ab sparse_ffn_sm90.DACT_CONFIG "{'block_n': 128, 'block_k': 32, 'stages': 6, 'a_stages': 0};$K32S7" s6s7split_$r --ratio $r --set sparse_ffn_sm90.DACT_SPLIT_BOXES=True
  ab sparse_ffn_sm90.DW_PIECES_GU_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 32, 'stages': 8}" k32s8_$r --ratio $r
  ab sparse_ffn_sm90.DW_PIECES_CONFIG "{'block_k': 64, 'stages': 4};{'block_k': 32, 'stages': 8}" k32s8_$r --ratio $r
done
