"""runtime/ must import with torch and timm unavailable (a robot ships it without them), and
without Ray (an optional extra for map building on a cluster)."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import runtime

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "timm", "torchvision", "ray"):
            raise ImportError(f"runtime imported {name}")
sys.meta_path.insert(0, Block())
import importlib
for m in sys.argv[1:]:
    importlib.import_module(m)
assert not any(k.split(".")[0] in ("torch", "timm", "ray") for k in sys.modules)
print("ok", len(sys.argv) - 1)
"""


def runtime_modules() -> list:
    # every module but the entry point (importing runtime.__main__ would run the CLI)
    return ["runtime"] + [m.name for m in pkgutil.walk_packages(runtime.__path__, prefix="runtime.")
                          if m.name != "runtime.__main__"]


def test_every_runtime_module_imports_without_torch():
    mods = runtime_modules()
    assert len(mods) >= 3 and "runtime.backends.tensorrt_backend" in mods
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *mods], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok {len(mods)}"


def test_blocker_really_blocks_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCKER, "json", "torch"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "runtime imported torch" in proc.stderr
