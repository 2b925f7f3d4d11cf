#!/usr/bin/env python3
"""vpr-edge as RTAB-Map's global descriptor: a script for RTAB-Map's PyDescriptor.

RTAB-Map (built with Python 3 support) settings, as command-line arguments or in its .ini file::

    --Mem/GlobalDescriptorStrategy 1 --Kp/TfIdfLikelihoodUsed false --Mem/RehearsalSimilarity 1
    --PyDescriptor/Dim D --PyDescriptor/Path /path/to/vpr-edge/integrations/rtabmap/vpr_edge_rtabmap.py

with ``VPR_EDGE_BUNDLE=/path/to/engines/<bundle>`` in RTAB-Map's environment and D that bundle's
descriptor length (``VPR_EDGE_BUNDLE=... python vpr_edge_rtabmap.py`` prints the line for it).
Optional: ``VPR_EDGE_THREADS`` (ONNX Runtime CPU threads; default all cores),
``VPR_EDGE_DEVICE`` (``cpu`` or ``cuda``: ONNX Runtime's CUDA provider where present).
``runtime`` is imported from the vpr-edge checkout holding this script (else the installed one).

How RTAB-Map calls it (``corelib/src/python/PyDescriptor.cpp``): it appends this script's folder
to ``sys.path`` and imports it by name, calls ``init(PyDescriptor/Dim)`` once, then
``extract(image)`` for each new node, ``image`` being its camera image wrapped without a copy as
a numpy array of type NPY_BYTE (signed int8), shape (rows, cols, channels), in OpenCV's BGR order.
It reads the returned object as a float32 array of shape (1, D) (asserted) straight from its data
pointer. So ``extract`` reinterprets the bytes as uint8 first (read as int8, every pixel above 127
would reach the model negative), converts BGR to RGB, and returns a C-contiguous float32 (1, D).

Failures, chosen from what RTAB-Map does with each outcome:

* ``init`` never raises: PyDescriptor.cpp logs an exception from ``init`` and then releases its
  NULL result, which crashes the process. A problem (``VPR_EDGE_BUNDLE`` unset, a bundle that does
  not load, ``PyDescriptor/Dim`` different from the bundle's dimension: the message names both) is
  printed on stderr and kept; ``extract`` repeats it.
* ``extract`` never raises and always returns a float32 (1, D) array: after an exception
  RTAB-Map stores the node without a global descriptor, and with ``Kp/TfIdfLikelihoodUsed false``
  it compares each new node with the others by ``Signature::compareTo``, which asserts that both
  hold the same number of global descriptors: one node without it stops RTAB-Map. A frame that
  cannot be encoded (or every frame while ``init`` has failed) gets a zero descriptor instead:
  RTAB-Map scores two nodes ``(d1 . d2 + 1) / 2``, so a zero descriptor is 0.5 similar to every
  node, below any real match; it can neither close a loop nor merge with a neighbour. The problem
  is printed on stderr, each distinct one at its 1st, 10th, 100th, ... occurrence.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, Optional

import numpy as np

CHECKOUT = Path(__file__).resolve().parents[2]
if (CHECKOUT / "runtime" / "__init__.py").is_file():  # the runtime beside this script, else the installed one
    sys.path.insert(0, str(CHECKOUT))

from runtime.encoder import Encoder  # noqa: E402
from runtime.errors import UserError  # noqa: E402

BUNDLE_ENV, THREADS_ENV, DEVICE_ENV = "VPR_EDGE_BUNDLE", "VPR_EDGE_THREADS", "VPR_EDGE_DEVICE"
SETTINGS = ("--Mem/GlobalDescriptorStrategy 1 --Kp/TfIdfLikelihoodUsed false --Mem/RehearsalSimilarity 1 "
            "--PyDescriptor/Dim {dim} --PyDescriptor/Path {path}")


class PluginError(Exception):
    """Why the plug-in cannot encode: printed on stderr, never raised to RTAB-Map."""


_encoder: Optional[Encoder] = None
_dim = 0  # the D RTAB-Map expects (PyDescriptor/Dim)
_problem: Optional[str] = "init() has not been called"
_reported: Dict[str, int] = {}


def _report(problem: str) -> None:
    """Print a problem on stderr at its 1st, 10th, 100th, ... occurrence."""
    n = _reported[problem] = _reported.get(problem, 0) + 1
    if str(n).rstrip("0") == "1":
        times = f" ({n} times)" if n > 1 else ""
        print(f"vpr-edge RTAB-Map plug-in: error{times}: {problem}", file=sys.stderr, flush=True)


def _open(dim: int) -> Encoder:
    bundle = os.environ.get(BUNDLE_ENV)
    if not bundle:
        raise PluginError(f"{BUNDLE_ENV} is not set: set it to a vpr-edge bundle folder (engines/<name>) in "
                          "RTAB-Map's environment")
    threads = os.environ.get(THREADS_ENV) or None
    if threads is not None and not threads.isdigit():
        raise PluginError(f"{THREADS_ENV}={threads}: expected a number of threads")
    encoder = Encoder.from_bundle(bundle, threads=int(threads) if threads else None,
                                  device=os.environ.get(DEVICE_ENV) or "cpu", batch_size=1)
    if encoder.dim != dim:
        encoder.close()
        raise PluginError(f"PyDescriptor/Dim is {dim} but the bundle {bundle} gives {encoder.dim}-D descriptors: "
                          f"set PyDescriptor/Dim {encoder.dim}")
    return encoder


def init(descriptorDim: int) -> None:  # noqa: N803 - RTAB-Map's name
    """Open the bundle named by ``VPR_EDGE_BUNDLE`` and check that its descriptors are
    ``descriptorDim`` long. Never raises (see the module docstring): a problem is printed and
    kept."""
    global _encoder, _dim, _problem
    if _encoder is not None:  # RTAB-Map reloaded its parameters
        _encoder.close()
        _encoder = None
    try:
        _dim = int(descriptorDim)
        _encoder = _open(_dim)
        _problem = None
        if _encoder.bundle.batch_mode == "batched":
            print(f"vpr-edge RTAB-Map plug-in: warning: {_encoder.bundle.path} is a batch-coupled model (CricaVPR "
                  "batched mode): encoded one frame at a time here; prefer its -independent variant", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - nothing may reach RTAB-Map from init
        _problem = _describe(exc)
        _report(_problem)


def extract(image: np.ndarray) -> np.ndarray:
    """The global descriptor of RTAB-Map's image, float32 (1, D), C-contiguous.

    ``image``: (rows, cols, channels) int8 as RTAB-Map wraps it (uint8 is taken as well), BGR
    (3 channels), BGRA (4) or grey (1). Never raises: a zero descriptor when the image cannot be
    encoded (see the module docstring)."""
    zeros = np.zeros((1, max(_dim, 1)), dtype=np.float32)
    if _encoder is None:
        _report(f"no descriptor: {_problem}")
        return zeros
    try:
        pixels = np.asarray(image)
        if pixels.dtype == np.int8:
            pixels = pixels.view(np.uint8)  # NPY_BYTE: the camera's unsigned bytes, read as signed
        descriptor = _encoder.encode(pixels, bgr=True)
        if descriptor.shape != (1, _dim):
            raise PluginError(f"the model returned shape {descriptor.shape}, expected (1, {_dim})")
        if not np.isfinite(descriptor).all():
            raise PluginError("the model returned NaN or infinite values")
        return np.ascontiguousarray(descriptor, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - nothing may reach RTAB-Map from extract
        _report(f"cannot encode this frame ({_describe(exc)}); a zero descriptor was returned")
        return zeros


def _describe(exc: Exception) -> str:
    """A user's problem as its message; anything else (a bug) with its type."""
    return str(exc) if isinstance(exc, (UserError, PluginError)) else f"{type(exc).__name__}: {exc}"


def main(argv=None) -> int:
    """Print the RTAB-Map settings for ``VPR_EDGE_BUNDLE``; with an image, also extract it as
    RTAB-Map would (int8 BGR) and print the descriptor's shape and norm."""
    from runtime.cli_util import ArgumentParser, run_cli
    from runtime.errors import OptionError
    from runtime.inputs import to_rgb

    def body() -> int:
        p = ArgumentParser(prog="vpr_edge_rtabmap.py", description=main.__doc__)
        p.add_argument("image", nargs="?", type=Path, help="an image file to extract, as a check")
        args = p.parse_args(argv)
        bundle = os.environ.get(BUNDLE_ENV)
        if not bundle:
            raise OptionError(f"set {BUNDLE_ENV} to a bundle folder (engines/<name>)")
        with Encoder.from_bundle(bundle, batch_size=1) as encoder:
            dim = encoder.dim
        print(SETTINGS.format(dim=dim, path=Path(__file__).resolve()))
        if args.image:
            bgr = np.ascontiguousarray(np.asarray(to_rgb(args.image))[:, :, ::-1])
            init(dim)
            d = extract(bgr.view(np.int8))
            print(f"{args.image}: descriptor {d.shape} {d.dtype}, norm {np.linalg.norm(d):.6f}")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
