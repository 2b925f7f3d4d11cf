"""The CPU's instruction-set features, read from ``/proc/cpuinfo``, and the check a CPU bundle
gets when it is loaded.

A CPU bundle (``export/build_engine.py --target cpu...``) records the path it was built for
(library, precision) and the features that path was chosen for (``manifest["cpu"]``). The graph
it ships is portable ONNX: ONNX Runtime and OpenVINO pick their kernels at run time from what the
CPU has, so a bundle never carries code for instructions a CPU lacks (never an illegal
instruction). What can differ is the run-time setting the path asks for (OpenVINO's bf16
inference precision) and the speed the choice was made for; on a CPU without the recorded
features, ``check_cpu_path`` returns the fallback settings and one warning naming what is missing.
"""
from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Optional

log = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")
ARCHES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def normalize_arch(machine: str) -> str:
    return ARCHES.get(machine.lower(), machine.lower())


@dataclass(frozen=True)
class CpuInfo:
    """What a path choice depends on: architecture, feature flags, model name, core count."""

    arch: str
    flags: FrozenSet[str]
    model: str = ""
    cores: int = 1
    mhz: Optional[float] = None

    def has(self, *features: str) -> bool:
        return all(f in self.flags for f in features)

    def missing(self, features: Iterable[str]) -> list:
        return [f for f in features if f not in self.flags]


def parse_cpuinfo(text: str, machine: Optional[str] = None) -> CpuInfo:
    """``/proc/cpuinfo`` as a CpuInfo: x86 lists ``flags``, ARM ``Features`` (the first
    processor's; every core of one machine shares them here)."""
    fields: Dict[str, str] = {}
    cores = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if not sep:
            continue
        if key == "processor":
            cores += 1
        fields.setdefault(key, value.strip())
    flags = frozenset((fields.get("flags") or fields.get("features") or "").split())
    arch = normalize_arch(machine or platform.machine())
    model = fields.get("model name") or fields.get("cpu part", "")
    try:
        mhz = float(fields["cpu mhz"]) if "cpu mhz" in fields else None
    except ValueError:
        mhz = None
    return CpuInfo(arch=arch, flags=flags, model=model, cores=max(cores, 1), mhz=mhz)


def this_cpu() -> CpuInfo:
    """This machine's CPU (an empty feature set where ``/proc/cpuinfo`` cannot be read)."""
    try:
        return parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        return CpuInfo(arch=normalize_arch(platform.machine()), flags=frozenset())


@dataclass
class PathCheck:
    """The outcome of checking a bundle's CPU path on this CPU: the settings to run with and,
    where the CPU lacks what the path was chosen for, the warning that says so."""

    settings: Dict[str, str] = field(default_factory=dict)
    warning: Optional[str] = None


def check_cpu_path(manifest: dict, cpu: Optional[CpuInfo] = None, where: str = "bundle") -> PathCheck:
    """Compare ``manifest["cpu"]`` (architecture and required features) with ``cpu``; a
    bundle without a CPU path needs nothing. On a mismatch the path's ``fallback`` settings
    apply and one warning is logged."""
    path = manifest.get("cpu")
    if not path:
        return PathCheck()
    cpu = cpu or this_cpu()
    settings = dict(path.get("settings", {}))
    problems = []
    if path.get("arch") and path["arch"] != cpu.arch:
        problems.append(f"it was built for {path['arch']}, this CPU is {cpu.arch}")
    else:
        missing = cpu.missing(path.get("requires", []))
        if missing:
            problems.append(f"this CPU lacks {', '.join(missing)}")
    if not problems:
        return PathCheck(settings)
    settings.update(path.get("fallback", {}).get("settings", {}))
    warning = (f"{where}: CPU path {path['path']!r} ({path.get('target', 'cpu')}): {'; '.join(problems)}. "
               f"Running {path.get('fallback', {}).get('note', 'with the portable kernels')}; for this CPU's "
               f"fastest path rebuild here with: python export/build_engine.py ... --target cpu")
    log.warning("warning: %s", warning)
    return PathCheck(settings, warning)
