"""Map building on a Ray cluster: the same map as ``map build``, encoded by many workers.

Ray Data reads the image list; ``map_batches`` runs a pool of encoder actors, one per worker,
each with its own backend (ONNX Runtime on CPU, or TensorRT / CUDA with one GPU per actor). Each
actor returns its batch as a shard of descriptors (a Ray block, in the object store, spilled to
disk when large: no shared file system is needed for the outputs); the driver streams the shards,
in image order, into the map's new segment, then trains the index once on a seeded sample and
adds every row (``MapWriter.commit``). The result is an ordinary map, loadable without Ray.

Every image exactly once: a worker killed mid-run is restarted and its batch run again (Ray's
actor restarts and task retries); a batch's shard exists only once it has completed, and the
driver checks that each image index arrives exactly once before anything is committed. Images
that cannot be decoded are reported as ``map build`` reports them. The image paths must be
readable by every node (a shared file system, or the same copy on each).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import UserError
from .images import find_images

RAY_HINT = "pip install 'vpr-edge[ray]' (or pip install 'ray[data]')"


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise UserError(f"--ray needs Ray Data, which is not installed ({exc}); {RAY_HINT}") from None
    return ray


class EncodeActor:
    """One encoder (bundle + backend) per Ray worker; called on batches of image paths."""

    def __init__(self, bundle: str, batch_size: Optional[int], threads: Optional[int], device: str) -> None:
        from .backends import open_backend
        from .bundle import load_bundle
        from .encoder import Encoder
        from .maps import bundle_identity

        b = load_bundle(bundle)
        self.encoder = Encoder(b, open_backend(b, threads=threads, device=device), batch_size=batch_size)
        self.keep = ["descriptor"] + (["local_features"] if "local_features" in b.outputs else [])
        # fixed row shapes, so that a batch of failures still concatenates with the others
        self.shapes = {"descriptor": (bundle_identity(b)["dim"],)}
        if "local_features" in self.keep:
            self.shapes["local_features"] = tuple(b.outputs["local_features"]["shape"][1:])

    def __call__(self, batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        paths = [Path(str(p)) for p in batch["path"]]
        index = np.asarray(batch["index"], dtype=np.int64)
        failures: List[Tuple[str, str]] = []
        rows: Dict[int, Dict[str, np.ndarray]] = {}
        for names, out in self.encoder.stream(paths, [str(i) for i in index], self.keep, False, failures):
            for j, name in enumerate(names):
                rows[int(name)] = {k: out[k][j] for k in self.keep}
        errors = {p: e for p, e in failures}
        result: Dict[str, np.ndarray] = {"index": index, "ok": np.array([int(i) in rows for i in index]),
                                         "error": np.array([errors.get(str(p), "") for p in paths], dtype=object)}
        for k in self.keep:
            empty = np.zeros(self.shapes[k], np.float32)
            result[k] = np.stack([rows[int(i)][k] if int(i) in rows else empty for i in index])
        return result


def ray_build_map(bundle: Union[str, Path], images: Union[str, Path], output: Union[str, Path],
                  address: Optional[str] = None, workers: Optional[int] = None, batch_size: Optional[int] = None,
                  threads: Optional[int] = None, device: str = "cpu", index_type: str = "auto",
                  memory_budget: Optional[int] = None, store_dtype: str = "float32",
                  poses: Optional[dict] = None, poses_path: Optional[Path] = None, progress: bool = False) -> dict:
    """Encode ``images`` on a Ray cluster (``address``; None: a local one) into a new map."""
    ray = _ray()
    from .bundle import load_bundle
    from .maps import bundle_identity, open_build, poses_for

    images_list = find_images(images)
    b = load_bundle(bundle)
    writer = open_build(output, bundle_identity(b), index_type, memory_budget, store_dtype)  # fails fast if locked
    with writer:
        started = not ray.is_initialized()
        if started:
            path = os.environ.get("PYTHONPATH")  # a checkout used without installing it
            ray.init(address=address or None, log_to_driver=False, include_dashboard=False, logging_level="ERROR",
                     runtime_env={"env_vars": {"PYTHONPATH": path}} if path else None)
        try:
            failures = _encode_into(ray, writer, images_list, b, workers, batch_size, threads, device, progress)
        finally:
            if started:
                ray.shutdown()
        if writer.count == 0:
            raise UserError("no image could be processed; no map was written")
        version = writer.commit(poses_for(poses, writer.names, poses_path) if poses is not None else None)
    return {"version": version, "count": writer.count, "images": len(images_list), "failures": failures}


def _encode_into(ray, writer, images_list, bundle, workers, batch_size, threads, device, progress) -> list:
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    gpu = bundle.backend == "tensorrt" or device == "cuda"
    per_actor_cpus = threads or 1
    if workers is None:
        res = ray.cluster_resources()
        workers = max(1, int(res.get("GPU", 0)) if gpu else int(res.get("CPU", 1) // per_actor_cpus))
    items = [{"index": i, "path": str(p)} for i, p in enumerate(images_list.files)]
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), 4 * workers)))
    batch = batch_size or int(bundle.batch["opt"])
    shards = ds.map_batches(EncodeActor, fn_constructor_args=(str(bundle.path), batch_size, threads, device),
                            batch_size=batch, compute=ray.data.ActorPoolStrategy(size=workers),
                            num_cpus=per_actor_cpus, num_gpus=1 if gpu else 0, batch_format="numpy")
    # Ray Data restarts a dead actor and retries its batches (max_restarts = max_task_retries = -1)
    seen = np.zeros(len(items), dtype=np.int64)
    failures = []
    for out in shards.iter_batches(batch_size=None, batch_format="numpy"):
        idx = np.asarray(out["index"], dtype=np.int64)
        np.add.at(seen, idx, 1)
        ok = np.asarray(out["ok"], dtype=bool)
        for j in np.flatnonzero(~ok):
            i, err = idx[j], str(out["error"][j])
            failures.append((str(images_list.files[i]), err))
            print(f"error: {images_list.files[i]}: {err}", file=sys.stderr)
        if ok.any():
            local = out.get("local_features")
            writer.append([images_list.names[i] for i in idx[ok]], np.asarray(out["descriptor"])[ok],
                          None if local is None else np.asarray(local)[ok])
    if not (seen == 1).all():
        twice, never = int((seen > 1).sum()), int((seen == 0).sum())
        raise RuntimeError(f"Ray returned {twice} images more than once and {never} never; the map was not written")
    return failures
