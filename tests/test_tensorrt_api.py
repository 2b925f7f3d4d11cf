"""The TensorRT calls of the runtime's backend exist in the real bindings.

``tensorrt-lean`` (runtime API only, installable from PyPI) is enough for that by introspection;
using it without a GPU would crash, so nothing is called.
"""
import re
from pathlib import Path

import pytest

trt = pytest.importorskip("tensorrt_lean", reason="tensorrt-lean is not installed (dev extra, x86-64)")

SOURCE = (Path(__file__).resolve().parents[1] / "runtime" / "backends" / "tensorrt_backend.py").read_text()
OWNERS = {r"self\.engine": trt.ICudaEngine, r"self\.context": trt.IExecutionContext, r"runtime": trt.Runtime,
          r"trt": trt}


@pytest.mark.parametrize("pattern", list(OWNERS))
def test_backend_uses_only_existing_tensorrt_api(pattern):
    used = set(re.findall(pattern + r"\.(\w+)", SOURCE))
    assert used, f"no {pattern} calls found: the test pattern is stale"
    missing = sorted(a for a in used if not hasattr(OWNERS[pattern], a))
    assert not missing, f"not in TensorRT {trt.__version__}: {missing}"


def test_enum_members_used_exist():
    assert hasattr(trt.TensorIOMode, "INPUT") and hasattr(trt.Logger, "WARNING")
