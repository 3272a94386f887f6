"""The classification kit: tasks that give an image one class (ImageNet-1K and its kin).

Light (no torch): the prediction format and the metric, shared by runs and ``fourm-eval evaluate``.
Predictions are a CSV (``val_predictions.csv``; ``val_predictions_ema.csv`` for the EMA weights)
with the header ``file,top5,scores``: one row per scored image, ``file`` relative to the data root,
``top5`` the class indices best first (space-separated), ``scores`` their probabilities; every
malformed line is a named error. The metric is top-1 / top-5 accuracy as fractions
(:func:`topk_accuracy`; with fewer than five classes top-5 ranks them all).

The model parts (the classifier on the shared backbone adapter, its data preprocessor, the
image-list dataset with timm's transforms, the run's metric) are in ``classification_model.py``,
imported when a run registers its mm modules.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from fourm_eval.errors import PredictionsError

from ..base import Metric

CLASSIFICATION_METRICS = (
    Metric("top1", main=True, gated=True, description="top-1 accuracy, centre-crop evaluation"),
    Metric("top5", description="top-5 accuracy, centre-crop evaluation"),
    Metric("top1_ema", description="top-1 accuracy of the EMA weights (profiles with ema.enabled)"),
    Metric("top5_ema", description="top-5 accuracy of the EMA weights (profiles with ema.enabled)"),
)
PRED_FILE = "val_predictions.csv"
PRED_FILE_EMA = "val_predictions_ema.csv"
CSV_HEADER = ["file", "top5", "scores"]
TOPK = 5


# ------------------------------------------------------------------ metric
def topk_accuracy(topk: list[list[int]], labels: list[int]) -> dict[str, float]:
    """top-1 / top-5 accuracy (fractions) from each image's ranked class indices (best first)."""
    n = len(labels)
    if n == 0 or len(topk) != n:
        raise ValueError("topk and labels must be non-empty and of the same length")
    top1 = sum(1 for t, y in zip(topk, labels) if t and t[0] == y)
    top5 = sum(1 for t, y in zip(topk, labels) if y in t[:TOPK])
    return {"top1": top1 / n, "top5": top5 / n}


def write_predictions_csv(path: Path, rows: list[tuple[str, list[int], list[float]]]) -> None:
    """One row per image, sorted by file: ``file`` (relative to the data root), ``top5`` (class
    indices, best first, space-separated), ``scores`` (their probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for file, idx, probs in sorted(rows, key=lambda r: r[0]):
            w.writerow([file, " ".join(str(int(i)) for i in idx), " ".join(f"{p:.6g}" for p in probs)])
    tmp.replace(path)


def read_predictions_csv(path: Path, num_classes: int) -> dict[str, list[int]]:
    """file -> ranked class indices; every malformed line is a named error."""
    if path.is_dir():
        path = path / PRED_FILE
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found (expected a CSV with the header "
                               f"{','.join(CSV_HEADER)}, or a run's predictions folder holding {PRED_FILE})")
    out: dict[str, list[int]] = {}
    need = min(TOPK, num_classes)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise PredictionsError(f"{path}: the first line must be the header {','.join(CSV_HEADER)}, got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{path}, line {line_no}"
            if len(row) != 3:
                raise PredictionsError(f"{where}: expected 3 fields (file, top5, scores), got {len(row)}")
            file, top, scores = row[0].strip(), row[1].split(), row[2].split()
            try:
                idx = [int(t) for t in top]
            except ValueError:
                raise PredictionsError(f"{where}: top5 must be space-separated class indices, got {row[1]!r}") \
                    from None
            if len(idx) < need:
                raise PredictionsError(f"{where}: {len(idx)} class indices; top-5 needs {need}")
            if len(set(idx)) != len(idx):
                raise PredictionsError(f"{where}: a class index repeats in {row[1]!r}")
            bad = [i for i in idx if not 0 <= i < num_classes]
            if bad:
                raise PredictionsError(f"{where}: class index {bad[0]} out of range 0..{num_classes - 1} "
                                       "(index = the class's position in the task's class list)")
            try:
                probs = [float(s) for s in scores]
            except ValueError:
                raise PredictionsError(f"{where}: scores must be space-separated numbers, got {row[2]!r}") from None
            if len(probs) != len(idx):
                raise PredictionsError(f"{where}: {len(probs)} scores for {len(idx)} class indices")
            if any(not math.isfinite(p) for p in probs):
                raise PredictionsError(f"{where}: a score is not finite ({row[2]!r})")
            if file in out:
                raise PredictionsError(f"{where}: {file!r} appears twice")
            out[file] = idx
    if not out:
        raise PredictionsError(f"{path}: no prediction rows")
    return out


def score_predictions(preds: dict[str, list[int]], truth: list[tuple[str, int]], path: Path) -> dict[str, float]:
    """Top-k of predictions against every val image; missing or extra images are named errors."""
    labels = dict(truth)
    extra = sorted(set(preds) - set(labels))
    if extra:
        raise PredictionsError(f"{path}: {len(extra)} row(s) name files that are not validation images of the data "
                               f"root, e.g. {extra[:3]} (file = path relative to the root, val/<wnid>/<name>)")
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise PredictionsError(f"{path}: no prediction for {len(missing)} of {len(labels)} validation image(s), "
                               f"e.g. {missing[:3]}")
    files = sorted(labels)
    return topk_accuracy([preds[f] for f in files], [labels[f] for f in files])


__all__ = ["CLASSIFICATION_METRICS", "CSV_HEADER", "PRED_FILE", "PRED_FILE_EMA", "PredictionsError", "TOPK", "read_predictions_csv",
           "score_predictions", "topk_accuracy", "write_predictions_csv"]
