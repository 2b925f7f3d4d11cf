#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU and TensorRT: FP32/FP16 engines of the registry
# models vs ONNX Runtime and PyTorch, as a table (about 10 minutes with full-size models).
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 .venv/bin/python scripts/gpu_check.py "$@"
