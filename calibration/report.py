"""What precision costs: FP32 vs FP16 vs INT8 bundles of one model on a dataset with ground truth.

Per bundle: descriptor cosine to the FP32 bundle (mean, 1st percentile, min over every database
and query image), top-1 retrieval agreement with FP32 (share of queries whose best database match
is the same), Recall@1/5/10, latency on the backend at hand (inference ms per image), and the
fidelity gate its precision class must pass (``GATES``: min cosine >= 0.999 for FP16 and bf16,
top-1 agreement >= 98 % for INT8).

Strict top-1 agreement is ill-conditioned where FP32 itself barely separates two database images:
with MegaLoc's fixture weights (bias-dominated descriptors, pairwise cosine 0.97-0.9999) the FP32
best match leads the runner-up by a median 1e-4 in cosine, and the queries INT8 flips are those led
by 2-4e-6, 20-50x below the similarity change any INT8 graph makes (BENCHMARKS.md section 3). So
the report also gives the agreement up to ties: a different best match counts when FP32 scores it
within ``tie`` (default 1e-5) of its own best; every disagreement is listed with FP32's margin.
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
TIE = 1e-5  # FP32 scores closer than this are a tie (float32 noise in an 8448-D product is ~1e-7)


def top1_agreement(ref_q: np.ndarray, ref_db: np.ndarray, ref_top2: np.ndarray, top1: np.ndarray,
                   tie: float = TIE) -> dict:
    """Agreement of ``top1`` (a bundle's best database index per query) with FP32's (``ref_top2``:
    FP32's two best per query), strict and up to ties, and each disagreement with FP32's margin
    (its best minus its runner-up score) and FP32's score gap between the two choices. Scores are
    FP32's: the bundle is judged by the reference."""
    ref_best = ref_top2[:, 0]
    best = np.einsum("ij,ij->i", ref_q, ref_db[ref_best])
    chosen = np.einsum("ij,ij->i", ref_q, ref_db[top1])
    margin = best - np.einsum("ij,ij->i", ref_q, ref_db[ref_top2[:, 1]]) if ref_top2.shape[1] > 1 else np.full(len(top1), np.inf)
    differs = top1 != ref_best
    gap = best - chosen
    return {"strict": float(np.mean(~differs)), "within_tie": float(np.mean(~differs | (gap <= tie))), "tie": tie,
            "disagreements": [{"query": int(i), "fp32_margin": float(margin[i]), "fp32_gap": float(gap[i])}
                              for i in np.flatnonzero(differs)]}
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


def precision_report(bundles: Sequence[Bundle], dataset: Dataset, threads=None, tie: float = TIE) -> dict:
    refs = [b for b in bundles if b.precision == "fp32"]
    if not refs:
        raise OptionError("the report compares with FP32: give the FP32 bundle of the model too (--bundle DIR)")
    ref = refs[0]
    names = {b.manifest["model"]["name"] for b in bundles}
    if len(names) != 1:
        raise OptionError(f"bundles of different models: {sorted(names)}; compare the bundles of one model")
    encoded = {str(b.path): _encode(b, dataset, threads) for b in bundles}
    r = encoded[str(ref.path)]
    ref_top2 = retrieve(r["q"], r["db"], min(2, len(r["db"])))
    rows = []
    for b in bundles:
        e = encoded[str(b.path)]
        cos = row_cosine(np.concatenate([e["db"], e["q"]]), np.concatenate([r["db"], r["q"]]))
        ranked = retrieve(e["q"], e["db"], max(KS))
        agreement = _agreement(top1_agreement(r["q"], r["db"], ref_top2, ranked[:, 0], tie))
        rows.append({
            "bundle": str(b.path), "precision": b.precision, "backend": b.backend,
            "cosine_to_fp32": {"mean": float(cos.mean()), "p1": float(np.percentile(cos, 1)), "min": float(cos.min())},
            **agreement,
            "gate": gate(b.precision, float(cos.min()), agreement["top1_agreement"]),
            "recall": {str(k): v for k, v in recall_at_k(ranked, dataset.positives, KS).items()},
            "inference_ms_per_image": e["latency"]})
    return {"model": next(iter(names)), "dataset": str(dataset.root), "queries": len(dataset.queries),
            "database": len(dataset.database), "reference": str(ref.path),
            "random_weights": bool(ref.manifest["weights"].get("random_weights")), "rows": rows}


def _agreement(a: dict) -> dict:
    return {"top1_agreement": a["strict"], "top1_agreement_within_tie": a["within_tie"], "tie": a["tie"],
            "top1_disagreements": a["disagreements"]}


def format_report(report: dict) -> str:
    lines = [f"precision report: {report['model']} on {report['dataset']} ({report['queries']} queries, "
             f"{report['database']} database images)" + (" - RANDOM WEIGHTS: recall means nothing, agreement does"
                                                          if report["random_weights"] else ""),
             "| precision | backend | cos mean | cos p1 | cos min | top-1 agreement | up to ties | R@1 | R@5 | R@10 "
             "| ms/img (p50) | fidelity gate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        c, rec, lat = row["cosine_to_fp32"], row["recall"], row["inference_ms_per_image"] or {}
        lines.append(f"| {row['precision']} | {row['backend']} | {c['mean']:.5f} | {c['p1']:.5f} | {c['min']:.5f} | "
                     f"{row['top1_agreement']:.3f} | {row['top1_agreement_within_tie']:.3f} | {rec['1']:.3f} | "
                     f"{rec['5']:.3f} | {rec['10']:.3f} | {lat.get('p50', float('nan')):.1f} | {_gate_text(row['gate'])} |")
    tie = report["rows"][0]["tie"]
    for row in report["rows"]:
        flips = row["top1_disagreements"]
        if flips:
            margins = sorted(f["fp32_margin"] for f in flips)
            lines.append(f"{row['precision']}: {len(flips)} queries with another best match; FP32's own margins there "
                         f"{margins[0]:.1e}..{margins[-1]:.1e} (ties: FP32 gap <= {tie:.0e})")
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
