# session 39 calls 2-3: K steps of 32 (deeper rings in the same shared memory) for dact and gate/up
# (ran from the repository root as scripts/s39_c2.sh; kept here as the record of calls 2 and 3)
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1; cd benchmarks
tag=${TAG:-c2}
ab() { local flag=$1 vals=$2 t=$3; shift 3
  timeout 100 python ab_sparse_train_flag.py "$flag" --values "$vals" --rounds 6 "$@" --out "$OUT/$tag/ab_${flag#*.}_$t.json" 2>&1 | grep -v Warn | tail -3; }
mkdir -p $OUT/$tag
D64="{'block_n': 128, 'block_k': 64, 'stages': 3, 'a_stages': 0}"
G64="{'block_n': 128, 'block_k': 64, 'stages': 4, 'a_stages': 0}"
for r in ${RATIOS:-0.3 0.5}; do
  for st in 6 7; do ab sparse_ffn_sm90.DACT_CONFIG "$D64;{'block_n': 128, 'block_k': 32, 'stages': $st, 'a_stages': 0}" k32s${st}_$r --ratio $r; done
  ab sparse_ffn_sm90.DACT_CONFIG "$D64;{'block_n': 128, 'block_k': 32, 'stages': 7, 'a_stages': 0}" k32s7split_$r --ratio $r --set sparse_ffn_sm90.DACT_SPLIT_BOXES=True
  ab sparse_ffn_sm90.GATE_UP_CONFIG "$G64;{'block_n': 128, 'block_k': 32, 'stages': 8, 'a_stages': 0}" k32s8_fwd_$r --ratio $r --fwd
done
