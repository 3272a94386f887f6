"""COCO AP: 1.0 for ground truth as predictions, identical to pycocotools (and mmdet) otherwise."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from fourm_eval.data.coco_mini import make_mini_coco
from fourm_eval.metrics_coco import encode_masks, evaluate, to_coco_results


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = make_mini_coco(tmp_path_factory.mktemp("coco"), n_train=4, n_val=12, seed=5)
    ann = root / "annotations" / "instances_val2017.json"
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
    return ann, gt


def _gt_masks(gt, ann):
    img = gt.imgs[ann["image_id"]]
    return gt.annToMask(ann).reshape(img["height"], img["width"])


def _predictions_from_gt(gt, rng, noisy):
    """Per image: (boxes xyxy, scores, labels, masks) built from the ground truth."""
    cat_ids = sorted(gt.getCatIds())
    out = {}
    for img_id in gt.getImgIds():
        anns = gt.loadAnns(gt.getAnnIds(imgIds=[img_id]))
        boxes, scores, labels, masks = [], [], [], []
        for a in anns:
            x, y, w, h = a["bbox"]
            m = _gt_masks(gt, a)
            label = cat_ids.index(a["category_id"])
            if noisy:
                dx, dy = rng.normal(0, 0.08 * w), rng.normal(0, 0.08 * h)
                x, y = x + dx, y + dy
                m = np.roll(m, (int(round(dy)), int(round(dx))), axis=(0, 1))
                if rng.random() < 0.2:
                    label = (label + 1) % len(cat_ids)
            boxes.append([x, y, x + w, y + h])
            scores.append(rng.uniform(0.3, 1.0) if noisy else 1.0)
            labels.append(label)
            masks.append(m)
        if noisy:  # false positives
            img = gt.imgs[img_id]
            for _ in range(2):
                x0, y0 = rng.uniform(0, img["width"] - 20), rng.uniform(0, img["height"] - 20)
                boxes.append([x0, y0, x0 + 20, y0 + 20])
                scores.append(rng.uniform(0.0, 0.6))
                labels.append(int(rng.integers(0, len(cat_ids))))
                m = np.zeros((img["height"], img["width"]), np.uint8)
                m[int(y0):int(y0) + 20, int(x0):int(x0) + 20] = 1
                masks.append(m)
        out[img_id] = (np.array(boxes, float), np.array(scores, float), np.array(labels), np.stack(masks))
    return out, cat_ids


def _ours(ann, preds, cat_ids):
    dets, segs = [], []
    for img_id, (b, s, l, m) in preds.items():
        d, sg = to_coco_results(img_id, b, s, l, cat_ids, encode_masks(m))
        dets += d
        segs += sg
    return evaluate(str(ann), dets, segs)


def test_ground_truth_as_predictions_scores_one(mini):
    ann, gt = mini
    preds, cat_ids = _predictions_from_gt(gt, np.random.default_rng(0), noisy=False)
    m = _ours(ann, preds, cat_ids)
    for k in ("box_AP", "box_AP50", "box_AP75", "mask_AP", "mask_AP50", "mask_AP75"):
        assert m[k] == pytest.approx(1.0), k


def test_matches_pycocotools_on_noisy_predictions(mini):
    ann, gt = mini
    preds, cat_ids = _predictions_from_gt(gt, np.random.default_rng(1), noisy=True)
    ours = _ours(ann, preds, cat_ids)
    assert 0.05 < ours["box_AP"] < 0.95  # non-trivial
    # the reference: pycocotools fed directly, boxes converted by hand here
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        res = []
        for img_id, (b, s, l, m) in preds.items():
            for i in range(len(s)):
                entry = {"image_id": img_id, "category_id": cat_ids[int(l[i])], "score": float(s[i])}
                if iou_type == "bbox":
                    entry["bbox"] = [b[i, 0], b[i, 1], b[i, 2] - b[i, 0], b[i, 3] - b[i, 1]]
                else:
                    rle = mask_util.encode(np.asfortranarray(m[i].astype(np.uint8)))
                    rle["counts"] = rle["counts"].decode()
                    entry["segmentation"] = rle
                res.append(entry)
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(res), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        for i, name in enumerate(("AP", "AP50", "AP75", "APs", "APm", "APl")):
            if ev.stats[i] == -1:  # COCOeval's "no value": NaN here, null in records
                assert np.isnan(ours[f"{prefix}_{name}"]), (prefix, name)
            else:
                assert ours[f"{prefix}_{name}"] == pytest.approx(ev.stats[i], abs=1e-12), (prefix, name)


def _feed_mmdet(metric, ann, gt, preds):
    """Our per-image predictions (boxes xyxy, scores, labels, masks) into mmdet's CocoMetric."""
    import torch

    metric.dataset_meta = {"classes": [c["name"] for c in json.loads(ann.read_text())["categories"]]}
    samples = []
    for img_id, (b, s, l, m) in preds.items():
        img = gt.imgs[img_id]
        samples.append({"img_id": img_id, "ori_shape": (img["height"], img["width"]),
                        "pred_instances": {"bboxes": torch.tensor(b, dtype=torch.float32),
                                           "scores": torch.tensor(s, dtype=torch.float32),
                                           "labels": torch.tensor(l), "masks": torch.tensor(m).bool()}})
    metric.process({}, samples)


def test_matches_mmdet_cocometric(mini):
    """A second, independently written conversion (mmdet's CocoMetric) agrees to its 3 decimals."""
    from mmdet.evaluation.metrics import CocoMetric

    ann, gt = mini
    preds, cat_ids = _predictions_from_gt(gt, np.random.default_rng(2), noisy=True)
    ours = _ours(ann, preds, cat_ids)
    metric = CocoMetric(ann_file=str(ann), metric=["bbox", "segm"])
    _feed_mmdet(metric, ann, gt, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = metric.compute_metrics(metric.results)
    assert ours["box_AP"] == pytest.approx(theirs["bbox_mAP"], abs=6e-4)
    assert ours["mask_AP50"] == pytest.approx(theirs["segm_mAP_50"], abs=6e-4)


def _one_image_gt(tmp_path):
    """One 200x200 image, one category, one small (10x10) object: COCOeval has no medium or large value."""
    gt = {"images": [{"id": 7, "width": 200, "height": 200, "file_name": "a.jpg"}],
          "categories": [{"id": 3, "name": "thing"}, {"id": 5, "name": "other"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [20, 20, 10, 10], "area": 100.0,
                           "iscrowd": 0, "segmentation": [[20, 20, 30, 20, 30, 30, 20, 30]]}]}
    f = tmp_path / "gt.json"
    f.write_text(json.dumps(gt))
    return f


def _cocoeval_stats(ann, dets):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return list(ev.stats[:6])


def test_no_ground_truth_of_a_size_is_no_value(tmp_path):
    """COCOeval's -1 (no ground truth in that area range) is NaN, never a number; an empty result list
    (which pycocotools' loadRes refuses) scores as a detection that finds nothing does."""
    from fourm_eval.results import clean_metrics

    ann = _one_image_gt(tmp_path)
    hit = [{"image_id": 7, "category_id": 3, "bbox": [20.0, 20.0, 10.0, 10.0], "score": 0.9}]
    ref = _cocoeval_stats(ann, hit)
    assert ref[4] == -1 and ref[5] == -1 and ref[0] == pytest.approx(1.0)
    got = evaluate(str(ann), hit)
    names = ["box_AP", "box_AP50", "box_AP75", "box_APs", "box_APm", "box_APl"]
    for name, r in zip(names, ref):
        assert np.isnan(got[name]) if r == -1 else got[name] == pytest.approx(r), name
    assert clean_metrics(got)["box_APm"] is None and clean_metrics(got)["box_AP"] == pytest.approx(1.0)
    # nothing found: as COCOeval scores a detection of the category without ground truth
    miss = [{"image_id": 7, "category_id": 5, "bbox": [150.0, 150.0, 10.0, 10.0], "score": 0.1}]
    ref0 = _cocoeval_stats(ann, miss)
    got0 = evaluate(str(ann), [])
    for name, r in zip(names, ref0):
        assert np.isnan(got0[name]) if r == -1 else got0[name] == r, (name, r, got0[name])


def test_files_named_as_mmdet_and_detectron2_name_them(mini, tmp_path):
    """mmdet's CocoMetric writes results.bbox.json / results.segm.json itself; a detectron2-style
    coco_instances_results.json holds the same entries in one list. `evaluate` reads both (folder
    or file) and scores them exactly as pycocotools does; a folder with two sets is refused."""
    import shutil

    from mmdet.evaluation.metrics import CocoMetric

    from fourm_eval.metrics_coco import PredictionsError
    from fourm_eval.tasks import get_task

    ann, gt = mini
    root = ann.parent.parent
    preds, _ = _predictions_from_gt(gt, np.random.default_rng(3), noisy=True)
    mm = tmp_path / "mmdet"
    metric = CocoMetric(ann_file=str(ann), metric=["bbox", "segm"], format_only=True,
                        outfile_prefix=str(mm / "results"))
    mm.mkdir()
    _feed_mmdet(metric, ann, gt, preds)
    with contextlib.redirect_stdout(io.StringIO()):
        metric.compute_metrics(metric.results)
    assert sorted(p.name for p in mm.iterdir()) == ["results.bbox.json", "results.segm.json"]
    bbox, segm = (json.loads((mm / f"results.{k}.json").read_text()) for k in ("bbox", "segm"))
    truth = {}
    for iou_type, res, prefix in (("bbox", bbox, "box"), ("segm", segm, "mask")):
        with contextlib.redirect_stdout(io.StringIO()):
            ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(res))), iou_type)
            ev.evaluate(), ev.accumulate(), ev.summarize()
        truth.update({f"{prefix}_{n}": float(v) for n, v in zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ev.stats)})
    task = get_task("coco-det")

    def same(got):
        assert set(got) == set(truth)
        for k, v in truth.items():
            assert np.isnan(got[k]) if v == -1 else got[k] == v, k

    same(task.evaluate(mm, root))                                   # mmdet's folder
    assert task.evaluate(mm / "results.segm.json", root) == {k: v for k, v in task.evaluate(mm, root).items()
                                                             if k.startswith("mask_")}
    d2 = tmp_path / "d2"
    d2.mkdir()
    assert [(b["image_id"], b["score"]) for b in bbox] == [(s["image_id"], s["score"]) for s in segm]
    merged = [{**b, "segmentation": s["segmentation"]} for b, s in zip(bbox, segm)]
    (d2 / "coco_instances_results.json").write_text(json.dumps(merged))
    same(task.evaluate(d2, root))                                   # detectron2's folder
    same(task.evaluate(d2 / "coco_instances_results.json", root))   # and its file
    both = tmp_path / "both"
    shutil.copytree(mm, both)
    shutil.copy(d2 / "coco_instances_results.json", both)
    with pytest.raises(PredictionsError, match="several sets of COCO results"):
        task.evaluate(both, root)
