#!/usr/bin/env bash
# The demo on the sample data shipped in data/: a CPU bundle, a map of the Corridor database, a
# throughput run of the localization loop over the queries (frames/s this machine sustains,
# Recall@K), then a live run paced at 80 % of that rate under a latency budget: what a camera
# would see (capture-to-result latency, accepted matches).
# The weights are random (no checkpoint ships with the repository): pass a checkpoint to see
# real recall, e.g.  bash scripts/demo.sh --model salad-dinov2-vitb14 --checkpoint dino_salad.ckpt
set -euo pipefail
cd "$(dirname "$0")/.."
model=gem-dinov2-vits14
weights=(--random-weights)
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model="$2"; shift 2 ;;
    --checkpoint) weights=(--checkpoint "$2"); shift 2 ;;
    *) echo "usage: bash scripts/demo.sh [--model NAME] [--checkpoint PATH]" >&2; exit 2 ;;
  esac
done
data=data/vprbench_corridor
py=.venv/bin/python
bundle="engines/demo-$model"
map="out/demo-map-$model"
echo "== 1/4 bundle: $model for ONNX Runtime (CPU)"
$py export/build_engine.py --model "$model" "${weights[@]}" --precision fp32 --backend onnxruntime \
    --batch 1:8:16 --output "$bundle"
echo "== 2/4 map of $data/database"
$py -m runtime map build --bundle "$bundle" --images "$data/database" --output "$map"
echo "== 3/4 throughput run: $data/queries read as fast as possible, one frame at a time"
$py -m runtime localize --bundle "$bundle" --map "$map" --source "$data/queries" --batch-size 1 --top-k 20 \
    --output "out/demo-throughput-$model.jsonl" --summary "out/demo-throughput-$model.json" --ground-truth "$data"
# pace the live run at 80 % of the measured rate (headroom for jitter); budget: 2.5 frame periods
read -r fps budget < <($py -c 'import json, sys
rate = json.load(open(sys.argv[1]))["frames_per_s"]
print(f"{0.8 * rate:.2f} {2500 / (0.8 * rate):.0f}")' "out/demo-throughput-$model.json")
echo "== 4/4 live run: the queries as a camera at $fps fps, budget $budget ms, 3 consistent frames to accept"
$py -m runtime localize --bundle "$bundle" --map "$map" --source "$data/queries" --fps "$fps" --budget-ms "$budget" \
    --consistency 3 --top-k 20 --output "out/demo-results-$model.jsonl" --summary "out/demo-live-$model.json" \
    --ground-truth "$data"
