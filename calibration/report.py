"""What precision costs: FP32 vs FP16 vs INT8 bundles of one model on a dataset with ground truth.

Per bundle: descriptor cosine to the FP32 bundle (mean, 1st percentile, min over every database
and query image), top-1 retrieval agreement with FP32 (share of queries whose best database match
is the same), Recall@1/5/10, latency on the backend at hand (inference ms per image), and the
fidelity gate its precision class must pass (``GATES``: min cosine >= 0.999 for FP16 and bf16,
top-1 agreement >= 98 % for INT8).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

import numpy as np

from runtime.backends import open_backend
from runtime.bundle import Bundle
from runtime.compare import row_cosine
from runtime.datasets import Dataset, DatasetError
from runtime.encoder import Encoder
from runtime.errors import OptionError
from runtime.evaluate import recall_at_k, retrieve
from runtime.files import atomic_write
from runtime.timing import StageTimer

REPORT_NAME = "precision_report.json"
KS = (1, 5, 10)
# the fidelity gate of each precision class: a reduced-float path (FP16, bf16) keeps every
# descriptor close to FP32; an INT8 path keeps retrieval: the same top-1 database match
GATES = {"fp32": ("min_cosine", 0.99999), "fp16": ("min_cosine", 0.999), "bf16": ("min_cosine", 0.999),
         "int8": ("top1_agreement", 0.98)}


def gate(precision: str, min_cosine: float, top1_agreement: float) -> dict:
    """Which fidelity gate applies to ``precision`` and whether the measured value passes it."""
    metric, threshold = GATES[precision]
    value = min_cosine if metric == "min_cosine" else top1_agreement
    return {"metric": metric, "threshold": threshold, "value": float(value), "passed": bool(value >= threshold)}


def _encode(bundle: Bundle, dataset: Dataset, threads) -> dict:
    timer = StageTimer()
    enc = Encoder(bundle, open_backend(bundle, threads=threads), timer=timer)
    db = enc.encode_files(dataset.database)
    q = enc.encode_files(dataset.queries)
    if db.failures or q.failures:
        raise DatasetError(f"{dataset.root}: {len(db.failures) + len(q.failures)} images could not be read (listed "
                           "above); the report compares every image, so it needs them all")
    return {"db": db.outputs["descriptor"], "q": q.outputs["descriptor"], "latency": timer.summary().get("inference")}


def precision_report(bundles: Sequence[Bundle], dataset: Dataset, threads=None) -> dict:
    refs = [b for b in bundles if b.precision == "fp32"]
    if not refs:
        raise OptionError("the report compares with FP32: give the FP32 bundle of the model too (--bundle DIR)")
    ref = refs[0]
    names = {b.manifest["model"]["name"] for b in bundles}
    if len(names) != 1:
        raise OptionError(f"bundles of different models: {sorted(names)}; compare the bundles of one model")
    encoded = {str(b.path): _encode(b, dataset, threads) for b in bundles}
    r = encoded[str(ref.path)]
    ref_top1 = retrieve(r["q"], r["db"], 1)[:, 0]
    rows = []
    for b in bundles:
        e = encoded[str(b.path)]
        cos = row_cosine(np.concatenate([e["db"], e["q"]]), np.concatenate([r["db"], r["q"]]))
        ranked = retrieve(e["q"], e["db"], max(KS))
        rows.append({
            "bundle": str(b.path), "precision": b.precision, "backend": b.backend,
            "cosine_to_fp32": {"mean": float(cos.mean()), "p1": float(np.percentile(cos, 1)), "min": float(cos.min())},
            "top1_agreement": float((ranked[:, 0] == ref_top1).mean()),
            "gate": gate(b.precision, float(cos.min()), float((ranked[:, 0] == ref_top1).mean())),
            "recall": {str(k): v for k, v in recall_at_k(ranked, dataset.positives, KS).items()},
            "inference_ms_per_image": e["latency"]})
    return {"model": next(iter(names)), "dataset": str(dataset.root), "queries": len(dataset.queries),
            "database": len(dataset.database), "reference": str(ref.path),
            "random_weights": bool(ref.manifest["weights"].get("random_weights")), "rows": rows}


def format_report(report: dict) -> str:
    lines = [f"precision report: {report['model']} on {report['dataset']} ({report['queries']} queries, "
             f"{report['database']} database images)" + (" - RANDOM WEIGHTS: recall means nothing, agreement does"
                                                          if report["random_weights"] else ""),
             "| precision | backend | cos mean | cos p1 | cos min | top-1 agreement | R@1 | R@5 | R@10 | ms/img (p50) "
             "| fidelity gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        c, rec, lat = row["cosine_to_fp32"], row["recall"], row["inference_ms_per_image"] or {}
        lines.append(f"| {row['precision']} | {row['backend']} | {c['mean']:.5f} | {c['p1']:.5f} | {c['min']:.5f} | "
                     f"{row['top1_agreement']:.3f} | {rec['1']:.3f} | {rec['5']:.3f} | {rec['10']:.3f} | "
                     f"{lat.get('p50', float('nan')):.1f} | {_gate_text(row['gate'])} |")
    return "\n".join(lines)


def _gate_text(g: dict) -> str:
    name = "min cosine" if g["metric"] == "min_cosine" else "top-1 agreement"
    return f"{name} {g['value']:.5f} {'>=' if g['passed'] else '<'} {g['threshold']}: {'pass' if g['passed'] else 'FAIL'}"


def write_report(report: dict, bundles: Sequence[Bundle]) -> List[Path]:
    """Into every non-FP32 bundle of the report (beside its manifest)."""
    written = []
    text = json.dumps(report, indent=2)
    for b in bundles:
        if b.precision != "fp32":
            atomic_write(b.path / REPORT_NAME, lambda f: f.write(text.encode()))
            written.append(b.path / REPORT_NAME)
    return written
