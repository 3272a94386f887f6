"""COCO box / mask AP with the official definitions (pycocotools' COCOeval).

The arithmetic is pycocotools' own; this module only turns predictions into
COCO result entries (xywh boxes, RLE masks, category ids) and returns every
summary statistic at full precision (mmdet's CocoMetric rounds to 3 decimals).

Returned names: ``{box,mask}_{AP, AP50, AP75, APs, APm, APl}`` as fractions
in [0, 1]; NaN where COCO defines no value (pycocotools' -1: no ground truth of
that size), which records store as null and no mean ever includes.

Prediction files read by :func:`evaluate_files`: this project's
``coco_results.{bbox,segm}.json``, mmdet's ``<prefix>.{bbox,segm}.json`` (its
``CocoMetric`` with ``outfile_prefix``, e.g. ``results.bbox.json``) and
detectron2's ``coco_instances_results.json`` (boxes and masks in one list).
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


NO_VALUE = float("nan")
# COCOeval's area ranges for APs / APm / APl (pixels^2)
_AREAS = {"APs": (0.0, 32.0 ** 2), "APm": (32.0 ** 2, 96.0 ** 2), "APl": (96.0 ** 2, 1e10)}


def _no_detections(gt: Any, img_ids: Iterable[int] | None) -> dict[str, float]:
    """COCOeval's numbers for an empty result list (which ``loadRes`` refuses): 0 where there is
    ground truth to find, no value where there is none (as COCOeval's -1)."""
    ids = set(gt.getImgIds()) if img_ids is None else set(img_ids)
    areas = [a["area"] for a in gt.loadAnns(gt.getAnnIds(imgIds=sorted(ids))) if not a.get("iscrowd", 0)]
    out = {n: (0.0 if areas else NO_VALUE) for n in ("AP", "AP50", "AP75")}
    for n, (lo, hi) in _AREAS.items():
        out[n] = 0.0 if any(lo <= a <= hi for a in areas) else NO_VALUE
    return out


def _summarize(gt: Any, results: list[dict], iou_type: str, img_ids: Iterable[int] | None) -> dict[str, float]:
    from pycocotools.cocoeval import COCOeval

    prefix = "box" if iou_type == "bbox" else "mask"
    if not results:
        return {f"{prefix}_{n}": v for n, v in _no_detections(gt, img_ids).items()}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 is COCOeval's "no value" (no ground truth in that area range): NaN, never a number
    return {f"{prefix}_{n}": (NO_VALUE if float(ev.stats[i]) == -1.0 else float(ev.stats[i]))
            for i, n in enumerate(STAT_NAMES)}


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


DETECTRON2_FILE = "coco_instances_results.json"


def _result_sets(folder: Path, names: dict[str, str]) -> dict[str, dict[str, Path]]:
    """The result-file sets a folder holds, by who wrote them: this project's ``names``, mmdet's
    ``<prefix>.bbox.json`` / ``<prefix>.segm.json`` per prefix, detectron2's one file."""
    sets: dict[str, dict[str, Path]] = {}
    ours = {k: folder / n for k, n in names.items() if (folder / n).is_file()}
    if ours:
        sets["fourm-eval"] = ours
    for f in sorted(folder.glob("*.json")):
        for kind in ("bbox", "segm"):
            if f.name.endswith(f".{kind}.json") and f not in ours.values():
                prefix = f.name[: -len(f".{kind}.json")]
                sets.setdefault(f"mmdet ({prefix}.*.json)", {})[kind] = f
    if (folder / DETECTRON2_FILE).is_file():
        sets["detectron2"] = {"instances": folder / DETECTRON2_FILE}
    return sets


def _files_of(pred: Path, names: dict[str, str]) -> tuple[dict[str, Path], str]:
    """IoU type -> file, and who wrote them, for a predictions folder or file; never a guess."""
    if pred.is_dir():
        sets = _result_sets(pred, names)
        if not sets:
            raise PredictionsError(f"{pred}: no COCO results in this folder (expected {' / '.join(names.values())}, "
                                   f"mmdet's <prefix>.bbox.json / <prefix>.segm.json, or detectron2's "
                                   f"{DETECTRON2_FILE})")
        if len(sets) > 1:
            listing = "; ".join(f"{who}: {', '.join(p.name for p in f.values())}" for who, f in sets.items())
            raise PredictionsError(f"{pred}: holds several sets of COCO results ({listing}); pass the file to "
                                   "score with --predictions")
        who, files = next(iter(sets.items()))
        return files, who
    if not pred.is_file():
        raise PredictionsError(f"{pred}: no such file or folder")
    if pred.name == DETECTRON2_FILE:
        return {"instances": pred}, "detectron2"
    kind = next((k for k in names if pred.name.endswith(f".{k}.json")), None)
    if kind is None:
        raise PredictionsError(f"{pred}: name the file *.bbox.json or *.segm.json (or detectron2's "
                               f"{DETECTRON2_FILE}) so the IoU type is stated, not guessed")
    return {kind: pred}, "file"


def evaluate_files(predictions: str | Path, ann_file: str | Path, names: dict[str, str]) -> dict[str, float]:
    """Score COCO results files against ``ann_file`` with :func:`evaluate`.

    ``predictions``: a folder holding one set of results, or one file. A set is this project's
    ``names['bbox']`` and/or ``names['segm']`` (with ``meta.json``'s ``image_ids``, the images a
    run evaluated, when present), mmdet's ``<prefix>.bbox.json`` / ``<prefix>.segm.json``, or
    detectron2's ``coco_instances_results.json`` (boxes, and masks when its entries carry a
    ``segmentation``). A folder with several sets is an error. Without ``image_ids`` every image of
    the ground truth is evaluated (the server's rule)."""
    from pycocotools.coco import COCO

    pred = Path(predictions)
    files, who = _files_of(pred, names)
    img_ids = None
    meta_file = (pred if pred.is_dir() else pred.parent) / "meta.json"
    if who in ("fourm-eval", "file") and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
            # no image_ids: a meta.json that only states the run's evaluation state
            img_ids = [int(i) for i in meta["image_ids"]] if "image_ids" in meta else None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise PredictionsError(f"{meta_file}: expected {{\"image_ids\": [int, ...]}} "
                                   f"({type(e).__name__})") from None
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
    if "instances" in files:  # detectron2: one list; every entry has a box, masks when predicted
        f = files["instances"]
        entries = _load_results(f, "bbox")
        with_seg = [r for r in entries if "segmentation" in r]
        if with_seg and len(with_seg) != len(entries):
            raise PredictionsError(f"{f}: {len(entries) - len(with_seg)} of {len(entries)} entries lack a "
                                   "'segmentation' (a detectron2 file has masks on every entry or on none)")
        results = {"bbox": entries}
        files = {"bbox": f}
        if with_seg:
            results["segm"] = _load_results(f, "segm")
            files["segm"] = f
    else:
        results = {k: _load_results(f, k) for k, f in files.items()}
    for k, r in results.items():
        _check_ids(files[k], r, gt)
    if img_ids is not None:
        unknown = sorted(set(img_ids) - set(gt.getImgIds()))
        if unknown:
            raise PredictionsError(f"{meta_file}: image ids {unknown[:5]} not in {ann_file}")
    out: dict[str, float] = {}
    if "bbox" in results:
        out.update(_summarize(gt, results["bbox"], "bbox", img_ids))
    if "segm" in results:
        out.update(_summarize(gt, results["segm"], "segm", img_ids))
    return out
