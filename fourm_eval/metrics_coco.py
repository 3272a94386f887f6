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
import json
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import FourmEvalError


class PredictionsError(FourmEvalError):
    """A predictions file is not in the expected format or does not fit the ground truth."""

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


def _load_results(path: Path, iou_type: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PredictionsError(f"{path}: predictions file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PredictionsError(f"{path}: not valid JSON ({e}); expected a COCO results list") from None
    if not isinstance(data, list):
        raise PredictionsError(f"{path}: expected a JSON list of COCO results "
                               f"([{{image_id, category_id, {'bbox' if iou_type == 'bbox' else 'segmentation'}, "
                               f"score}}, ...]), got a {type(data).__name__}")
    need = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise PredictionsError(f"{path}: entry {i} is not an object")
        missing = [k for k in need if k not in r]
        if missing:
            raise PredictionsError(f"{path}: entry {i} lacks {missing} (a {iou_type} result needs {list(need)})")
        if not isinstance(r["score"], (int, float)) or isinstance(r["score"], bool):
            raise PredictionsError(f"{path}: entry {i} has a non-numeric score {r['score']!r}")
        if iou_type == "bbox":
            b = r["bbox"]
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                raise PredictionsError(f"{path}: entry {i} has bbox {b!r}; expected [x, y, width, height]")
        else:
            seg = r["segmentation"]
            if not ((isinstance(seg, dict) and "size" in seg and "counts" in seg) or isinstance(seg, list)):
                raise PredictionsError(f"{path}: entry {i} has a segmentation that is neither an RLE "
                                       "({size, counts}) nor a polygon list")
    return data


def _check_ids(path: Path, results: list[dict[str, Any]], gt: Any) -> None:
    img_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
    bad_img = sorted({r["image_id"] for r in results if r["image_id"] not in img_ids}, key=str)
    if bad_img:
        raise PredictionsError(f"{path}: {len(bad_img)} image id(s) not in the ground truth, e.g. {bad_img[:5]} "
                               "(predictions for another split or dataset?)")
    bad_cat = sorted({r["category_id"] for r in results if r["category_id"] not in cat_ids}, key=str)
    if bad_cat:
        raise PredictionsError(f"{path}: category id(s) {bad_cat[:10]} not in the ground truth's categories "
                               f"{sorted(cat_ids)[:20]} (label indices written instead of category ids?)")


def evaluate_files(predictions: str | Path, ann_file: str | Path, names: dict[str, str]) -> dict[str, float]:
    """Score COCO results files against ``ann_file`` with :func:`evaluate`.

    ``predictions``: a folder holding ``names['bbox']`` and/or ``names['segm']`` (and
    optionally ``meta.json`` with the evaluated ``image_ids``: images a run left out are
    then left out here too), or one file whose name ends in ``.bbox.json`` or ``.segm.json``.
    Without ``meta.json`` every image of the ground truth is evaluated (the server's rule)."""
    from pycocotools.coco import COCO

    pred = Path(predictions)
    files: dict[str, Path] = {}
    img_ids = None
    if pred.is_dir():
        for kind, name in names.items():
            if (pred / name).is_file():
                files[kind] = pred / name
        if not files:
            raise PredictionsError(f"{pred}: no {' or '.join(names.values())} in this folder")
        if (pred / "meta.json").is_file():
            try:
                meta = json.loads((pred / "meta.json").read_text())
                img_ids = [int(i) for i in meta["image_ids"]]
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise PredictionsError(f"{pred / 'meta.json'}: expected {{\"image_ids\": [int, ...]}} "
                                       f"({type(e).__name__})") from None
    elif pred.is_file():
        kind = next((k for k in names if pred.name.endswith(f".{k}.json")), None)
        if kind is None:
            raise PredictionsError(f"{pred}: name the file *.bbox.json or *.segm.json so the IoU type is stated, "
                                   "not guessed")
        files[kind] = pred
    else:
        raise PredictionsError(f"{pred}: no such file or folder")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    results = {k: _load_results(f, k) for k, f in files.items()}
    for k, r in results.items():
        _check_ids(files[k], r, gt)
    if img_ids is not None:
        unknown = sorted(set(img_ids) - set(gt.getImgIds()))
        if unknown:
            raise PredictionsError(f"{pred / 'meta.json'}: image ids {unknown[:5]} not in {ann_file}")
    out: dict[str, float] = {}
    if "bbox" in results:
        out.update(_summarize(gt, results["bbox"], "bbox", img_ids))
    if "segm" in results:
        out.update(_summarize(gt, results["segm"], "segm", img_ids))
    return out
