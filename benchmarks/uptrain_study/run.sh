#!/usr/bin/env bash
# The uptraining study on real text, end to end, with the user commands (benchmarks/README.md, "Uptraining
# study"): a corpus of the Python sources on this machine, a tokenizer, packed data, a 12-layer 12-head
# GPT-NeoX base pre-trained from scratch, converted to the paper's layouts plus an MHA control and three
# MLKV-6 ablations, each uptrained on 5% of the base's tokens and evaluated; then distillation from the
# base (a sweep of A and T at MLKV-6, layouts distilled with the best of them, and a token-budget curve of
# MLKV-6 plain against distilled at 2.5, 5, 10 and 20%); then the tables and plots.
#
#   benchmarks/uptrain_study/run.sh OUT                     # everything
#   benchmarks/uptrain_study/run.sh OUT prepare             # corpus, tokenizer, pack, task, base
#   benchmarks/uptrain_study/run.sh OUT uptrain             # convert and uptrain every variant (plain, 5%)
#   benchmarks/uptrain_study/run.sh OUT distill             # the sweep, the distilled layouts, the budget curve
#   benchmarks/uptrain_study/run.sh OUT report              # launch/report.py and the study's tables and plots
#   SCALE=tiny benchmarks/uptrain_study/run.sh OUT          # the same pipeline on the CPU, tiny sizes
#   VARIANTS="mha mlkv-6" benchmarks/uptrain_study/run.sh OUT uptrain   # only these variants
#   PORT=29700 benchmarks/uptrain_study/run.sh OUT distill  # beside another stage (its runs take ports from 29601)
#
# Each stage picks up what an earlier (interrupted) one finished: finished runs are skipped, interrupted
# ones resume from their last checkpoint, so the stages run in calls of any length. Wall times go to
# OUT/times.json.
set -euo pipefail
OUT=${1:?usage: run.sh OUT [prepare] [uptrain] [distill] [report]}
shift
STAGES=${*:-prepare uptrain distill report}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
STUDY="$PY $ROOT/benchmarks/uptrain_study/study.py"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1  # everything is local: never wait on the network
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

if [[ ${SCALE:-gpu} == tiny ]]; then   # a CPU check of every stage
  MAX_MB=(--max-mb 2); SAMPLE_MB=2; VOCAB=1024; SEQ=128; HIDDEN=96; PRE_TOKENS=400000; PRE_MINUTES=3; BATCH=16
  MICRO=8; PARALLEL=${PARALLEL:-2}; TASK_N=40; WORKERS=2; EVAL_LIMIT=(--eval-limit 20)
else                                   # one H200
  MAX_MB=(); SAMPLE_MB=50; VOCAB=16384; SEQ=512; HIDDEN=384; PRE_TOKENS=${PRE_TOKENS:-400000000}
  PRE_MINUTES=${PRE_MINUTES:-5}; BATCH=64
  MICRO=64; PARALLEL=${PARALLEL:-8}; TASK_N=1000; WORKERS=16; EVAL_LIMIT=()  # a run takes about 9 GB
fi
# distillation: the grid of A:T swept at MLKV-6, the layouts distilled with its best, the token budgets
# (percent of the base's pre-training tokens) of the curve beside the 5% every layout gets
SWEEP=${SWEEP:-"0.5:1 0.5:2 1.0:1 1.0:2"}
DISTILLED=${DISTILLED:-"gqa-48 mqa-12 mlkv-2 mlkv-1"}
BUDGETS=${BUDGETS:-"2.5 10 20"}

record() {  # record STAGE SECONDS into OUT/times.json
  $STUDY record-time "$OUT" "$1" "$2"
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

uptrain_one() {  # uptrain_one NAME CKPT PERCENT PORT [uptrain.py flags...]: PERCENT% of the base's tokens
  local name=$1 ckpt=$2 percent=$3 port=$4 tokens save
  shift 4
  [[ -f $OUT/runs/$name/finished ]] && return 0
  read -r tokens save < <($STUDY budget "$OUT" "$percent" --micro $MICRO --seq $SEQ)
  # checkpoint (validation, export, evaluation) at half-way and the end. Eager (--no-compile): a few
  # hundred steps do not pay back compiling twelve layers.
  deepspeed --num_gpus 1 --master_port "$port" "$ROOT/launch/uptrain.py" --ds_config "$OUT/zero2_study.json" \
    --init "$OUT/ckpt/$ckpt" --data "$OUT/data/train" --valid-data "$OUT/data/valid" --out "$OUT/runs/$name" \
    --valid-rows 512 --train-tokens "$tokens" --save-interval "$save" --log-interval 5 --export-dtype float32 \
    --no-compile --eval-tasks next_line --eval-include-path "$OUT/tasks" "${EVAL_LIMIT[@]}" "$@" \
    > "$OUT/logs/uptrain-$name.log" 2>&1 \
    || { echo "error: uptraining $name failed; see $OUT/logs/uptrain-$name.log" >&2
         tail -5 "$OUT/logs/uptrain-$name.log" >&2; return 1; }
  touch "$OUT/runs/$name/finished"
}

pool() {  # pool < SPECS: a line "NAME CKPT PERCENT [uptrain.py flags...]" per run, PARALLEL at a time, longest first
  local port=${PORT:-29600} failed=0 spec words
  $STUDY ds-config "$ROOT/ds_configs/zero2.json" "$OUT/zero2_study.json" --micro $MICRO
  mapfile -t specs < <(sort -k3,3 -g -r)
  for spec in "${specs[@]}"; do
    while (( $(jobs -rp | wc -l) >= PARALLEL )); do wait -n || failed=1; done
    port=$((port + 1))
    read -r -a words <<< "$spec"
    uptrain_one "${words[0]}" "${words[1]}" "${words[2]}" $port "${words[@]:3}" &
  done
  while (( $(jobs -rp | wc -l) > 0 )); do wait -n || failed=1; done
  return $failed
}

uptrain() {
  local t=$SECONDS name names=()
  [[ -f $OUT/ckpt/paper_variants.json ]] || $PY "$ROOT/launch/convert.py" --base "$OUT/base" --paper-variants \
    --out-root "$OUT/ckpt" --no-progress > "$OUT/logs/convert-paper.log"
  convert mha
  convert mlkv-6-sequential --kv-layers 6 --kv-groups 1 --merge sequential
  convert mlkv-6-copy --kv-layers 6 --kv-groups 1 --mlp-init copy
  convert mlkv-6-scratch --kv-layers 6 --kv-groups 1 --random-init
  record "convert" $((SECONDS - t))
  t=$SECONDS
  for dir in "$OUT"/ckpt/*/; do names+=("$(basename "$dir")"); done
  [[ -n ${VARIANTS:-} ]] && read -r -a names <<< "$VARIANTS"
  for name in "${names[@]}"; do echo "$name $name 5"; done | pool
  record "uptrain ${#names[@]} variants on 5% ($PARALLEL at a time)" $((SECONDS - t))
}

distill() {
  local t=$SECONDS g b name best
  {  # the sweep at MLKV-6, and the plain runs of the budget curve (they need no sweep)
    for b in $BUDGETS; do echo "mlkv-6-tokens$b mlkv-6 $b"; done
    for g in $SWEEP; do
      echo "mlkv-6-kd-a${g%:*}-t${g#*:} mlkv-6 5 --distill-from $OUT/base --distill-weight ${g%:*} --distill-temperature ${g#*:}"
    done
  } | pool
  best=$($STUDY best-sweep "$OUT" $SWEEP)  # "A:T" of the lowest validation loss
  echo "$best" > "$OUT/logs/sweep_best.txt"
  local kd="--distill-from $OUT/base --distill-weight ${best%:*} --distill-temperature ${best#*:}"
  {
    for b in $BUDGETS; do echo "mlkv-6-kd-tokens$b mlkv-6 $b $kd"; done
    for name in $DISTILLED; do echo "$name-kd $name 5 $kd"; done
  } | pool
  record "distill: sweep of ${SWEEP// /, }, then $DISTILLED and budgets $BUDGETS ($PARALLEL at a time)" \
    $((SECONDS - t))
}

report() {
  local t=$SECONDS
  $PY "$ROOT/launch/report.py" "$OUT"/runs/* --out "$OUT/report" > "$OUT/logs/report.log"
  $STUDY summarize "$OUT"
  record "report" $((SECONDS - t))
}

for stage in $STAGES; do
  case $stage in
    prepare|uptrain|distill|report) echo "== $stage"; $stage ;;
    *) echo "error: unknown stage '$stage' (prepare, uptrain, distill, report)" >&2; exit 2 ;;
  esac
done
