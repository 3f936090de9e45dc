#!/usr/bin/env bash
# The uptraining study on real text, end to end, with the user commands (benchmarks/README.md, "Uptraining
# study"): a corpus of the Python sources on this machine, a tokenizer, packed data, a 12-layer 12-head
# GPT-NeoX base pre-trained from scratch, converted to the paper's layouts plus an MHA control and three
# MLKV-6 ablations, each uptrained on 5% of the base's tokens and evaluated, then the tables and plots.
#
#   benchmarks/uptrain_study/run.sh OUT                     # everything (about 15 minutes on one H200)
#   benchmarks/uptrain_study/run.sh OUT prepare             # corpus, tokenizer, pack, task, base
#   benchmarks/uptrain_study/run.sh OUT uptrain             # convert and uptrain every variant
#   benchmarks/uptrain_study/run.sh OUT report              # launch/report.py and the study's table
#   SCALE=tiny benchmarks/uptrain_study/run.sh OUT          # the same pipeline on the CPU in minutes
#
# Each stage picks up what an earlier (interrupted) one finished. Wall times go to OUT/times.json.
set -euo pipefail
OUT=${1:?usage: run.sh OUT [prepare] [uptrain] [report]}
shift
STAGES=${*:-prepare uptrain report}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
STUDY="$PY $ROOT/benchmarks/uptrain_study/study.py"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything is local: never wait on the network
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

if [[ ${SCALE:-gpu} == tiny ]]; then   # a CPU check of every stage
  MAX_MB=(--max-mb 2); SAMPLE_MB=2; VOCAB=1024; SEQ=128; HIDDEN=96; PRE_TOKENS=400000; PRE_MINUTES=3; BATCH=16
  MICRO=8; PARALLEL=2; TASK_N=40; WORKERS=2; EVAL_LIMIT=(--eval-limit 20)
else                                   # one H200: about 15 minutes in all (884 s measured)
  MAX_MB=(); SAMPLE_MB=50; VOCAB=16384; SEQ=512; HIDDEN=384; PRE_TOKENS=${PRE_TOKENS:-400000000}
  PRE_MINUTES=${PRE_MINUTES:-5}; BATCH=64
  MICRO=64; PARALLEL=${PARALLEL:-6}; TASK_N=1000; WORKERS=16; EVAL_LIMIT=()
fi

record() {  # record STAGE SECONDS into OUT/times.json
  $PY - "$OUT/times.json" "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
path, stage, seconds = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
times = json.loads(path.read_text()) if path.exists() else {}
times[stage] = seconds
path.write_text(json.dumps(times, indent=2) + "\n")
EOF
}

prepare() {
  local t=$SECONDS
  [[ -f $OUT/corpus/corpus.json ]] || $STUDY corpus "$OUT/corpus" "${MAX_MB[@]}" > "$OUT/logs/corpus.log"
  [[ -f $OUT/tokenizer/tokenizer.json ]] || \
    $STUDY tokenizer "$OUT/corpus/train.jsonl" "$OUT/tokenizer" --vocab $VOCAB --sample-mb $SAMPLE_MB
  for split in train valid; do
    [[ -f $OUT/data/$split.json ]] || $PY "$ROOT/data_tools/pack_pile.py" --input "$OUT/corpus/$split.jsonl" \
      --tokenizer "$OUT/tokenizer" --seq-len $SEQ --workers $WORKERS --out "$OUT/data/$split" --no-progress
  done
  [[ -f $OUT/tasks/next_line.yaml ]] || $STUDY task "$OUT/corpus/valid.jsonl" "$OUT/tasks" --n $TASK_N
  record "corpus, tokenizer, pack, task" $((SECONDS - t))
  t=$SECONDS
  [[ -f $OUT/base/pretrain_summary.json ]] || \
    $STUDY pretrain "$OUT" --tokens $PRE_TOKENS --minutes $PRE_MINUTES --hidden $HIDDEN --batch-rows $BATCH
  record "pre-train the base" $((SECONDS - t))
}

convert() {  # convert NAME ARGS...: one variant into OUT/ckpt/NAME
  local name=$1
  shift
  [[ -d $OUT/ckpt/$name ]] || $PY "$ROOT/launch/convert.py" --base "$OUT/base" --out "$OUT/ckpt/$name" \
    --no-progress "$@" > "$OUT/logs/convert-$name.log"
}

uptrain_one() {  # uptrain_one NAME PORT
  local name=$1 port=$2
  deepspeed --num_gpus 1 --master_port "$port" "$ROOT/launch/uptrain.py" --ds_config "$OUT/zero2_study.json" \
    --init "$OUT/ckpt/$name" --data "$OUT/data/train" --valid-data "$OUT/data/valid" --out "$OUT/runs/$name" \
    --valid-rows 512 --train-tokens "$UP_TOKENS" --save-interval "$SAVE" --log-interval 5 --export-dtype float32 \
    --no-compile \
    --eval-tasks next_line --eval-include-path "$OUT/tasks" "${EVAL_LIMIT[@]}" > "$OUT/logs/uptrain-$name.log" 2>&1 \
    || { echo "error: uptraining $name failed; see $OUT/logs/uptrain-$name.log" >&2; tail -5 "$OUT/logs/uptrain-$name.log" >&2; return 1; }
}

uptrain() {
  local t=$SECONDS
  [[ -f $OUT/ckpt/paper_variants.json ]] || $PY "$ROOT/launch/convert.py" --base "$OUT/base" --paper-variants \
    --out-root "$OUT/ckpt" --no-progress > "$OUT/logs/convert-paper.log"
  convert mha
  convert mlkv-6-sequential --kv-layers 6 --kv-groups 1 --merge sequential
  convert mlkv-6-copy --kv-layers 6 --kv-groups 1 --mlp-init copy
  convert mlkv-6-scratch --kv-layers 6 --kv-groups 1 --random-init
  record "convert" $((SECONDS - t))
  t=$SECONDS
  # 5% of the base's pre-training tokens; checkpoint (validation, export, evaluation) at half-way and the end.
  # Runs are eager (--no-compile): a few hundred steps do not pay back compiling twelve layers.
  read -r UP_TOKENS SAVE < <($PY - "$OUT" $MICRO $SEQ <<'EOF'
import json, math, sys
out, micro, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
tokens = json.load(open(f"{out}/base/pretrain_summary.json"))["tokens"] // 20
print(tokens, max(1, (math.ceil(tokens / (micro * seq)) + 1) // 2))
EOF
)
  $PY - "$ROOT/ds_configs/zero2.json" "$OUT/zero2_study.json" $MICRO <<'EOF'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["train_micro_batch_size_per_gpu"] = int(sys.argv[3])
json.dump(cfg, open(sys.argv[2], "w"), indent=2)
EOF
  local names=() port=29600 failed=0
  for dir in "$OUT"/ckpt/*/; do names+=("$(basename "$dir")"); done
  for name in "${names[@]}"; do  # PARALLEL runs at a time share the GPU
    while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || failed=1; done
    port=$((port + 1))
    uptrain_one "$name" $port &
  done
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
  record "uptrain ${#names[@]} variants ($PARALLEL at a time)" $((SECONDS - t))
  return $failed
}

report() {
  local t=$SECONDS
  $PY "$ROOT/launch/report.py" "$OUT"/runs/* --out "$OUT/report" > "$OUT/logs/report.log"
  $STUDY summarize "$OUT"
  record "report" $((SECONDS - t))
}

for stage in $STAGES; do
  case $stage in
    prepare|uptrain|report) echo "== $stage"; $stage ;;
    *) echo "error: unknown stage '$stage' (prepare, uptrain, report)" >&2; exit 2 ;;
  esac
done
