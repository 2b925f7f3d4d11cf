"""Timing several engines fairly on a shared machine: each engine lives in its own worker process
(torch, ONNX Runtime and OpenVINO thread pools disturb each other in one process,
shared/research/env-probe.md §4), and the driver runs them in turn, one inference each per round,
so a burst of load from other users hits every engine alike and the ratios stay fair.

A worker is described by a spec (a dict): ``kind`` is ``torch`` (model, random weights or
checkpoint, ``bf16`` autocast), ``bundle`` (a vpr-edge bundle through ``runtime.backends``, as
users run it), ``ort`` (an ONNX file on ONNX Runtime) or ``openvino`` (an ONNX file, with an
inference precision hint). Every worker reads the same images.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from common import ROOT

WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
spec = json.loads(sys.argv[2])
x = np.load(spec["images"])
kind, threads = spec["kind"], spec["threads"]
if kind == "torch":
    import torch
    torch.set_num_threads(threads)
    from export.zoo import create_model
    model, _, _ = create_model(spec["model"], checkpoint=spec.get("checkpoint"), random_weights=spec.get("checkpoint") is None,
                               image_size=spec.get("image_size"), depth=spec.get("depth"))
    xt = torch.from_numpy(x)
    def run():
        with torch.inference_mode():
            if spec.get("bf16"):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    return model(xt)["descriptor"].float().numpy()
            return model(xt)["descriptor"].numpy()
elif kind == "bundle":
    from runtime.backends import open_backend
    from runtime.bundle import load_bundle
    backend = open_backend(load_bundle(spec["path"]), threads=threads)
    run = lambda: backend.run(x)["descriptor"]
elif kind == "ort":
    import onnxruntime as ort
    from runtime.backends.ort_backend import session_options
    so = session_options(threads)
    if spec.get("spin"):  # spin-waiting threads: the ONNX Runtime default the runtime turns off
        so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    s = ort.InferenceSession(spec["path"], so, providers=["CPUExecutionProvider"])
    run = lambda: s.run(["descriptor"], {s.get_inputs()[0].name: x})[0]
elif kind == "openvino":
    import openvino as ov
    m = ov.Core().compile_model(spec["path"], "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": spec.get("hint", "f32"),
                                                      **spec.get("config", {})})
    req = m.create_infer_request()
    run = lambda: req.infer({0: x})[m.output("descriptor")].copy()
else:
    raise SystemExit(f"unknown kind {kind}")
out = run()
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "run":
        t = time.perf_counter(); out = run(); dt = time.perf_counter() - t
        print(json.dumps({"s": dt}), flush=True)
    elif cmd["op"] == "save":
        np.save(cmd["path"], np.asarray(out, np.float32)); print(json.dumps({"saved": True}), flush=True)
    else:
        break
"""


class Worker:
    """One engine in its own process, answering one request at a time."""

    def __init__(self, name: str, spec: dict) -> None:
        self.name, self.spec = name, spec
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(ROOT), json.dumps(spec)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker exited (rc {self.proc.wait()}); its stderr is above")
        return json.loads(line)

    def ask(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except OSError:
            pass
        self.proc.wait(timeout=60)


def interleaved(specs: Dict[str, dict], images: np.ndarray, threads: int, rounds: int, out_dir: Path,
                warmup: int = 1, gap_s: float = 0.2, concurrent: bool = False) -> Dict[str, dict]:
    """Median and spread of each engine's inference time over ``rounds`` rounds in turn, and its
    output saved to ``out_dir/<name>.npy``. ``concurrent=False`` starts one worker at a time and
    keeps them all alive (memory: the sum of the engines); the gap lets a finished engine's
    threads go idle before the next one runs."""
    path = out_dir / "images.npy"
    np.save(path, images.astype(np.float32))
    workers: List[Worker] = []
    try:
        for name, spec in specs.items():
            workers.append(Worker(name, {**spec, "images": str(path), "threads": threads}))
        times: Dict[str, List[float]] = {w.name: [] for w in workers}
        for r in range(warmup + rounds):
            for w in (workers if r % 2 == 0 else workers[::-1]):  # alternate the order too
                time.sleep(gap_s)
                dt = w.ask("run")["s"]
                if r >= warmup:
                    times[w.name].append(dt)
        for w in workers:
            w.ask("save", path=str(out_dir / f"{w.name}.npy"))
    finally:
        for w in workers:
            w.close()
    return {name: {"median_s": float(np.median(t)), "min_s": float(np.min(t)), "p90_s": float(np.percentile(t, 90)),
                   "rounds": len(t)} for name, t in times.items()}
