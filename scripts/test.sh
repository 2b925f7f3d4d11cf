#!/usr/bin/env bash
# The test suite: ruff, everything in .venv (Python 3.11, torch), then the runtime's tests again on
# Python 3.10 (JetPack 6's) in an environment without torch.
set -euo pipefail
cd "$(dirname "$0")/.."
# lint first: pyflakes and import order (configuration in pyproject.toml)
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"

py310="${PYTHON310:-}"
if [ -z "$py310" ]; then
  for c in "$HOME/.pyenv/versions/3.10.13/bin/python" python3.10; do
    # run it: a pyenv shim exists even where that version is not selected
    if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 10)' >/dev/null 2>&1; then py310="$c"; break; fi
  done
fi
if [ -z "$py310" ]; then
  echo "Python 3.10 not found: skipping the torch-free runtime run (set PYTHON310 to enable it)" >&2
  exit 0
fi
if [ ! -x .venv-runtime310/bin/python ]; then
  "$py310" -m venv .venv-runtime310
  .venv-runtime310/bin/pip install -q -e ".[hloc]" pytest hypothesis
fi
if ! .venv-runtime310/bin/python -c "import h5py" 2>/dev/null; then  # a venv made before the hloc extra
  .venv-runtime310/bin/pip install -q -e ".[hloc]"
fi
if .venv-runtime310/bin/python -c "import torch" 2>/dev/null; then
  echo "error: .venv-runtime310 has torch installed; the runtime must work without it" >&2
  exit 1
fi
.venv-runtime310/bin/python -m pytest -q tests/test_runtime_no_torch.py tests/test_preprocess.py tests/test_rerank.py \
    tests/test_bundle.py tests/test_maps.py tests/test_datasets.py tests/test_loop.py tests/test_sinkhorn.py \
    tests/test_reliability.py tests/test_properties.py tests/test_map_build.py tests/test_timing.py \
    tests/test_decisions.py tests/test_loop_cli.py tests/test_output_dirs.py tests/test_api.py tests/test_formats.py \
    tests/test_rtabmap_plugin.py tests/test_cpu_features.py
