#!/usr/bin/env bash
# Multi-GPU measurements with the real launcher (2 GPUs): ZeRO-2 data-parallel scaling at 160M and
# TP=2 against TP=1 on the Pythia-1B shape. Needs a packed dataset at $DATA (2048-token rows) and
# writes under $OUT_DIR. Usage: benchmarks/multi_gpu.sh DATA OUT_DIR
set -euo pipefail
DATA=$1; OUT_DIR=$2; ITERS=${ITERS:-30}; RUNS=${RUNS:-"dp1_160m dp2_160m tp1_1b tp2_1b"}
mkdir -p "$OUT_DIR"
for shape in ${SHAPES:-pythia-160m pythia-1b}; do
  python - "$shape" "$OUT_DIR/init-$shape" <<'PY'
import sys, torch
from megatron_mlkv.config import preset
from megatron_mlkv.hf import export_pretrained
from megatron_mlkv.model import MLKVTransformer
torch.manual_seed(0)
cfg = preset(sys.argv[1])
export_pretrained(MLKVTransformer(cfg).state_dict(), cfg, sys.argv[2], dtype=torch.bfloat16, overwrite=True)
PY
done
cfg() { python - "$1" "$2" <<'PY'
import json, sys
c = json.load(open("ds_configs/zero2.json")); c["train_micro_batch_size_per_gpu"] = int(sys.argv[2])
json.dump(c, open(sys.argv[1], "w"))
PY
}
cfg "$OUT_DIR/zero2_b12.json" 12
cfg "$OUT_DIR/zero2_b8.json" 8
run() { local name=$1; shift; [[ " $RUNS " == *" $name "* ]] || return 0; echo "== $name"; deepspeed "$@" --data "$DATA" --out "$OUT_DIR/$name" \
  --train-iters "$ITERS" --save-interval 100000 --log-interval 1 2>&1 | grep -E "error|Error|done:|validation" || true; }
run dp1_160m --num_gpus 1 launch/uptrain.py --ds_config "$OUT_DIR/zero2_b12.json" --init "$OUT_DIR/init-pythia-160m"
run dp2_160m --num_gpus 2 launch/uptrain.py --ds_config "$OUT_DIR/zero2_b12.json" --init "$OUT_DIR/init-pythia-160m"
run tp1_1b --num_gpus 1 launch/uptrain.py --ds_config "$OUT_DIR/zero2_b8.json" --init "$OUT_DIR/init-pythia-1b"
run tp2_1b --num_gpus 2 launch/uptrain.py --ds_config "$OUT_DIR/zero2_b8.json" --init "$OUT_DIR/init-pythia-1b" --tp 2
run tp2_1b_eager --num_gpus 2 launch/uptrain.py --ds_config "$OUT_DIR/zero2_b8.json" --init "$OUT_DIR/init-pythia-1b" --tp 2 --no-compile
python - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); summary = {}
for run in ("dp1_160m", "dp2_160m", "tp1_1b", "tp2_1b", "tp2_1b_eager"):
    f = out / run / "metrics.jsonl"
    if not f.exists():
        summary[run] = None; continue
    recs = [json.loads(l) for l in f.read_text().splitlines() if '"loss"' in l]
    if not recs:
        summary[run] = None; continue
    late = recs[len(recs) // 2:]  # after compilation and warm-up
    summary[run] = {"losses": [r["loss"] for r in recs],
                    "tokens_per_s": sum(r["tokens_per_s"] for r in late) / len(late),
                    "tokens_per_s_per_device": sum(r["tokens_per_s_per_device"] for r in late) / len(late),
                    "mfu": sum(r["mfu"] for r in late) / len(late), "max_memory_bytes": recs[-1]["max_memory_bytes"]}
if summary.get("dp1_160m") and summary.get("dp2_160m"):
    summary["dp_scaling_efficiency"] = summary["dp2_160m"]["tokens_per_s"] / (2 * summary["dp1_160m"]["tokens_per_s"])
if summary.get("tp1_1b") and summary.get("tp2_1b"):
    a, b = summary["tp1_1b"]["losses"], summary["tp2_1b"]["losses"]
    summary["tp_max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
if summary.get("tp1_1b") and summary.get("tp2_1b_eager"):
    a, b = summary["tp1_1b"]["losses"], summary["tp2_1b_eager"]["losses"]
    summary["tp_eager_max_abs_loss_diff"] = max(abs(x - y) for x, y in zip(a, b))
(out / "multi_gpu.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk != "losses"})
                  for k, v in summary.items()}, indent=1))
PY
