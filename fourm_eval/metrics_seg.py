"""Semantic segmentation metrics (mIoU, mAcc, aAcc) and the label-PNG prediction format.

The per-image counting is mmseg's own (``IoUMetric.intersect_and_union``: per class, the pixels
where prediction and label agree, the predicted pixels and the labelled pixels, ignored label
pixels left out), summed over the whole validation set in float64. The summary follows mmseg's
``IoUMetric`` too, at full precision (mmseg rounds to two decimals of a percentage):

* IoU_c = intersect_c / union_c and Acc_c = intersect_c / label_c over the whole set;
* **mIoU** = mean of IoU_c over the classes whose union is not empty -- a class absent from both
  the predictions and the ground truth of the whole set is left out of the mean (it has no IoU);
  a class that is predicted but never labelled counts, with IoU 0;
* **mAcc** = mean of Acc_c over the classes present in the ground truth;
* **aAcc** = all correct pixels / all labelled pixels.

All three are fractions in [0, 1]. Label maps follow ADE20K's on-disk format: 8-bit PNGs, 0 =
"other" (ignored), value v = class v - 1 (:func:`reduce_zero_label`); the task writes predictions
the same way (class k -> k + 1; ``tasks/ade20k_seg.py``), and a prediction value 0 ("no class") is
allowed and counts as wrong wherever a class is labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import PredictionsError

IGNORE = 255


def image_areas(pred: Any, label: Any, num_classes: int, ignore_index: int = IGNORE) -> np.ndarray:
    """(4, K) float64: intersect, union, predicted and labelled pixels per class for one image
    (mmseg's counting). ``pred`` and ``label`` are (H, W) class indices; label ``ignore_index``
    pixels are left out, prediction values outside 0..K-1 count as no class."""
    import torch
    from mmseg.evaluation.metrics import IoUMetric

    p, lab = torch.as_tensor(np.asarray(pred)).long(), torch.as_tensor(np.asarray(label)).long()
    if p.shape != lab.shape:
        raise ValueError(f"prediction {tuple(p.shape)} and label {tuple(lab.shape)} differ in size")
    # mmseg counts with torch.histc, which puts a value outside [0, K-1] in no bin; -1 marks "no class"
    p = torch.where((p >= 0) & (p < num_classes), p, torch.full_like(p, -1))
    out = IoUMetric.intersect_and_union(p, lab, num_classes, ignore_index)
    return np.stack([t.double().numpy() for t in out])


def summarize(total: np.ndarray) -> dict[str, Any]:
    """mIoU, mAcc, aAcc (fractions) from summed (4, K) areas; plus the per-class values and
    which classes entered each mean."""
    inter, union, _pred, label = total
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(label > 0, inter / label, np.nan)
    n_label = label.sum()
    return {"mIoU": float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0,
            "mAcc": float(np.nanmean(acc)) if np.isfinite(acc).any() else 0.0,
            "aAcc": float(inter.sum() / n_label) if n_label > 0 else 0.0,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
            "classes_in_miou": int(np.isfinite(iou).sum()), "classes_in_macc": int(np.isfinite(acc).sum())}


def reduce_zero_label(raw: np.ndarray) -> np.ndarray:
    """ADE20K's stored labels -> class indices: 0 ("other") -> ignore, v -> v - 1."""
    lab = raw.astype(np.int64) - 1
    lab[raw == 0] = IGNORE
    return lab


__all__ = ["IGNORE", "PredictionsError", "image_areas", "reduce_zero_label", "summarize"]
