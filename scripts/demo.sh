#!/usr/bin/env bash
# The demo on the sample data shipped in data/: a CPU bundle, a map of the Corridor database,
# the localization loop over its queries, Recall@K and the per-stage latency table.
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
echo "== 1/3 bundle: $model for ONNX Runtime (CPU)"
$py export/build_engine.py --model "$model" "${weights[@]}" --precision fp32 --backend onnxruntime \
    --batch 1:8:16 --output "engines/demo-$model"
echo "== 2/3 map of $data/database"
$py -m runtime map build --bundle "engines/demo-$model" --images "$data/database" --output "out/demo-map-$model"
echo "== 3/3 localization loop over $data/queries"
$py -m runtime localize --bundle "engines/demo-$model" --map "out/demo-map-$model" --source "$data/queries" \
    --top-k 20 --output "out/demo-results-$model.jsonl" --ground-truth "$data"
