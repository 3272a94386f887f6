"""COCO box / mask AP with the official definitions (pycocotools' COCOeval).

The arithmetic is pycocotools' own; this module only turns predictions into
COCO result entries (xywh boxes, RLE masks, category ids) and returns every
summary statistic at full precision (mmdet's CocoMetric rounds to 3 decimals).

Returned names: ``{box,mask}_{AP, AP50, AP75, APs, APm, APl}`` as fractions
in [0, 1]; -1 where COCO defines no value (no ground truth of that size).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Sequence

import numpy as np

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def encode_masks(masks: np.ndarray) -> list[dict[str, Any]]:
    """(N, H, W) bool/uint8 masks -> COCO RLEs with str counts."""
    from pycocotools import mask as mask_util

    out = []
    for m in masks:
        rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
        rle["counts"] = rle["counts"].decode("ascii")
        out.append(rle)
    return out


def to_coco_results(image_id: int, boxes_xyxy: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                    cat_ids: Sequence[int], rles: list[dict[str, Any]] | None = None
                    ) -> tuple[list[dict], list[dict]]:
    dets, segs = [], []
    for i in range(len(scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes_xyxy[i])
        cat = int(cat_ids[int(labels[i])])
        dets.append({"image_id": int(image_id), "category_id": cat, "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "score": float(scores[i])})
        if rles is not None:
            segs.append({"image_id": int(image_id), "category_id": cat, "segmentation": rles[i],
                         "score": float(scores[i])})
    return dets, segs


def _summarize(gt: Any, results: list[dict], iou_type: str, img_ids: Iterable[int] | None) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    prefix = "box" if iou_type == "bbox" else "mask"
    if not results:
        return {f"{prefix}_{n}": 0.0 for n in STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {f"{prefix}_{n}": float(ev.stats[i]) for i, n in enumerate(STAT_NAMES)}


def evaluate(gt: Any, dets: list[dict], segs: list[dict] | None = None,
             img_ids: Iterable[int] | None = None) -> dict[str, float]:
    """``gt``: a pycocotools COCO object (or path to an instances json)."""
    if not hasattr(gt, "loadRes"):
        from pycocotools.coco import COCO
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(gt))
    out = _summarize(gt, dets, "bbox", img_ids)
    if segs is not None:
        out.update(_summarize(gt, segs, "segm", img_ids))
    return out
