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
"other" (ignored), value v = class v - 1; predictions are written the same way (class k -> k + 1),
and a prediction value 0 ("no class") is allowed and counts as wrong wherever a class is labelled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import FourmEvalError

IGNORE = 255


class PredictionsError(FourmEvalError):
    """A predictions folder is incomplete or holds files that are not label maps of the right size."""


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


def read_label_png(path: Path, max_value: int, what: str, error: type[FourmEvalError]) -> np.ndarray:
    """An 8-bit single-channel PNG (mode L, or P read as its indices) with values 0..max_value."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("L", "P"):
                raise error(f"{path}: {what} must be a single-channel 8-bit PNG (mode L or P), not mode {mode}")
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise error(f"{path}: {what} does not decode ({type(e).__name__}: {e})") from None
    top = int(arr.max()) if arr.size else 0
    if top > max_value:
        bad = sorted(int(v) for v in np.unique(arr[arr > max_value]))[:10]
        raise error(f"{path}: {what} has values {bad} above {max_value} (expected 0..{max_value})")
    return arr


def write_prediction_png(path: Path, classes: np.ndarray) -> None:
    """Class indices 0..K-1 -> an 8-bit PNG of values 1..K, written atomically."""
    import os

    from PIL import Image

    arr = np.asarray(classes)
    if arr.min(initial=0) < 0 or arr.max(initial=0) > 254:
        raise ValueError("class indices must be in 0..254 to be stored as label + 1 in an 8-bit PNG")
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.png")
    Image.fromarray((arr + 1).astype(np.uint8), mode="L").save(tmp)
    tmp.replace(path)


def evaluate_folder(pred_dir: Path, gt_files: dict[str, Path], num_classes: int) -> dict[str, Any]:
    """Score a folder of prediction PNGs (``<stem>.png``, values 1..K, 0 = no class) against the
    ground-truth label PNGs ``gt_files`` (stem -> path, ADE20K format)."""
    from .data.coco_check import DatasetError

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionsError(f"{pred_dir}: predictions folder not found (expected one PNG per validation "
                               "image, named like the image, values 1..K)")
    preds = {p.stem: p for p in pred_dir.iterdir() if p.is_file() and p.suffix.lower() == ".png"
             and not p.name.startswith(".")}
    missing, extra = sorted(set(gt_files) - set(preds)), sorted(set(preds) - set(gt_files))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} validation image(s) have no prediction: {_names(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction(s) match no validation image: {_names(extra)}")
        raise PredictionsError(f"{pred_dir}: " + "; ".join(parts) + " (expected exactly one <stem>.png per "
                               "validation image)")
    total = np.zeros((4, num_classes))
    for stem in sorted(gt_files):
        gt = read_label_png(gt_files[stem], num_classes, "the ground-truth annotation", DatasetError)
        pred = read_label_png(preds[stem], num_classes, "the prediction", PredictionsError)
        if pred.shape != gt.shape:
            raise PredictionsError(f"{preds[stem]}: prediction is {pred.shape[1]}x{pred.shape[0]} (w x h) but its "
                                   f"annotation {gt_files[stem]} is {gt.shape[1]}x{gt.shape[0]}; predictions "
                                   "must have the image's size")
        total += image_areas(pred.astype(np.int64) - 1, reduce_zero_label(gt), num_classes)
    return summarize(total)


def _names(items: Iterable[str], n: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
