"""Monocular depth metrics with the NYUv2 (Eigen et al., 2014) conventions.

For one image with ground truth ``g`` and prediction ``p`` (metres, same size):

* the evaluated pixels are those inside the **Eigen crop** whose ground truth lies in
  ``(MIN_DEPTH, MAX_DEPTH]`` = (1e-3, 10] m (0 marks a hole in the sensor's depth);
* predictions are clipped to ``[MIN_DEPTH, MAX_DEPTH]`` before scoring;
* ``delta_k`` = share of pixels with ``max(p/g, g/p) < 1.25**k`` (k = 1, 2, 3);
  ``abs_rel`` = mean ``|p - g| / g``; ``rmse`` = sqrt(mean ``(p - g)**2``) in metres;
  ``log10`` = mean ``|log10 p - log10 g|``.

**Averaging: per image, then over images.** Every metric is computed on each image's
own pixels and the dataset value is the plain mean of the per-image values (each
image weighs the same, whatever its number of valid pixels); the RMSE is therefore the
mean of per-image RMSEs. This is what the common NYUv2 evaluation code (Eigen's, BTS,
AdaBins, mmsegmentation's ``DepthMetric``) does.

**The Eigen crop** is rows 45:471 and columns 41:601 (end-exclusive) of a 480 x 640
image. For another size H x W each bound is scaled by H/480 (rows) or W/640 (columns)
and rounded to the nearest integer, halves up: at 120 x 160 the crop is rows 11:118,
columns 10:150. At 480 x 640 this is exactly the published crop.

Everything is computed in float64 with numpy; the same functions score a run's
predictions during training and a predictions folder afterwards, so both give the
same numbers bit for bit.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .errors import FourmEvalError

MIN_DEPTH = 1e-3     # metres; ground truth must be above this (0 = no measurement)
MAX_DEPTH = 10.0     # metres; ground truth at most this, predictions clipped to it
EIGEN_CROP_480x640 = (45, 471, 41, 601)  # row start, row end, column start, column end (end-exclusive)
METRICS = ("delta1", "delta2", "delta3", "abs_rel", "rmse", "log10")


class DepthMetricError(FourmEvalError):
    """A depth map cannot be scored (wrong shape, no valid ground-truth pixel)."""


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def eigen_crop(height: int, width: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1), end-exclusive: the Eigen crop scaled to ``height`` x ``width``."""
    r0, r1, c0, c1 = EIGEN_CROP_480x640
    return (_round_half_up(r0 * height / 480), _round_half_up(r1 * height / 480),
            _round_half_up(c0 * width / 640), _round_half_up(c1 * width / 640))


def eval_mask(gt: np.ndarray, crop: bool = True) -> np.ndarray:
    """Pixels that are scored: ground truth in (MIN_DEPTH, MAX_DEPTH], inside the Eigen crop."""
    gt = np.asarray(gt, dtype=np.float64)
    mask = (gt > MIN_DEPTH) & (gt <= MAX_DEPTH)
    if crop:
        r0, r1, c0, c1 = eigen_crop(*gt.shape)
        inside = np.zeros_like(mask)
        inside[r0:r1, c0:c1] = True
        mask &= inside
    return mask


def image_metrics(pred: np.ndarray, gt: np.ndarray, *, crop: bool = True, name: str = "image") -> dict[str, float]:
    """The metrics of one image (see the module doc). ``name`` is used in errors."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or gt.ndim != 2:
        raise DepthMetricError(f"{name}: prediction is {pred.shape[::-1] if pred.ndim == 2 else pred.shape} "
                               f"(width x height), ground truth {gt.shape[::-1]}; they must be the same 2-d size")
    mask = eval_mask(gt, crop)
    if not mask.any():
        raise DepthMetricError(f"{name}: no ground-truth pixel in ({MIN_DEPTH}, {MAX_DEPTH}] m"
                               + (" inside the Eigen crop" if crop else "") + "; it cannot be scored")
    g = gt[mask]
    p = np.clip(pred[mask], MIN_DEPTH, MAX_DEPTH)
    ratio = np.maximum(p / g, g / p)
    diff = p - g
    return {
        "delta1": float(np.mean(ratio < 1.25)),
        "delta2": float(np.mean(ratio < 1.25 ** 2)),
        "delta3": float(np.mean(ratio < 1.25 ** 3)),
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "rmse": float(np.sqrt(np.mean(diff * diff))),
        "log10": float(np.mean(np.abs(np.log10(p) - np.log10(g)))),
    }


def aggregate(per_image: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over images of the per-image metrics, summed in sorted image-name order
    (so the result does not depend on the order in which images were scored)."""
    if not per_image:
        raise DepthMetricError("no image to score")
    names = sorted(per_image)
    return {m: float(math.fsum(per_image[n][m] for n in names) / len(names)) for m in METRICS}


# ------------------------------------------------------------------ MultiMAE's scoring
MULTIMAE_METRICS = ("delta1", "delta2", "delta3", "abs_rel", "rmse", "rmse_log")
_EPS = 1e-6  # MultiMAE: clamp_min(1e-6) before ratios and logarithms


def multimae_sums(pred: np.ndarray, gt: np.ndarray, *, name: str = "image") -> dict[str, float]:
    """One image's pixel sums for MultiMAE's NYUv2 metric (EPFL-VILAB/MultiMAE ``run_finetuning_depth.py``,
    ``masked_nyu_metrics``): valid pixels are those with ground truth (> 0: MultiMAE's ``mask_valid``), no
    range limit, predictions not clipped; ratios and logarithms on values clamped to at least 1e-6."""
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if pred.shape != gt.shape or gt.ndim != 2:
        raise DepthMetricError(f"{name}: prediction is {pred.shape[::-1] if pred.ndim == 2 else pred.shape} "
                               f"(width x height), ground truth {gt.shape[::-1]}; they must be the same 2-d size")
    mask = gt > 0
    p, g = pred[mask], gt[mask]
    gc, pc = np.maximum(g, _EPS), np.maximum(p, _EPS)
    ratio = np.maximum(p / gc, g / pc)
    diff = np.abs(p - g)
    ln = np.log(pc) - np.log(gc)
    return {"n": float(mask.sum()), "sq": float(np.sum(diff * diff)), "rel": float(np.sum(diff / gc)),
            "sq_ln": float(np.sum(ln * ln)), **{f"d{k}": float(np.sum(ratio < 1.25 ** k)) for k in (1, 2, 3)}}


def multimae_aggregate(per_image: Mapping[str, Mapping[str, float]], batch: int) -> dict[str, float]:
    """MultiMAE's dataset value: images in sorted name order (MultiMAE's ImageFolder order) grouped into
    batches of ``batch``; each batch's metrics pool its valid pixels (``rmse`` = sqrt(sum d^2 / n), ``rmse_log``
    the same on natural-log differences: what MultiMAE logs as "log10"); the value is the plain mean over
    batches (its MetricLogger's average). A batch without a valid pixel is an error (MultiMAE divides by 0)."""
    if not per_image:
        raise DepthMetricError("no image to score")
    if batch < 1:
        raise DepthMetricError(f"score batch {batch}: must be at least 1")
    names = sorted(per_image)
    rows = []
    for i in range(0, len(names), batch):
        group = names[i:i + batch]
        t = {k: math.fsum(per_image[n][k] for n in group) for k in ("n", "sq", "rel", "sq_ln", "d1", "d2", "d3")}
        if t["n"] <= 0:
            raise DepthMetricError(f"images {group[0]}..{group[-1]}: no pixel with ground truth in the batch; "
                                   "MultiMAE's metric is undefined there")
        rows.append({"delta1": t["d1"] / t["n"], "delta2": t["d2"] / t["n"], "delta3": t["d3"] / t["n"],
                     "abs_rel": t["rel"] / t["n"], "rmse": math.sqrt(t["sq"] / t["n"]),
                     "rmse_log": math.sqrt(t["sq_ln"] / t["n"])})
    return {m: float(math.fsum(r[m] for r in rows) / len(rows)) for m in MULTIMAE_METRICS}


__all__ = ["DepthMetricError", "EIGEN_CROP_480x640", "MAX_DEPTH", "METRICS", "MIN_DEPTH", "MULTIMAE_METRICS",
           "aggregate", "eigen_crop", "eval_mask", "image_metrics",
           "multimae_aggregate", "multimae_sums"]
