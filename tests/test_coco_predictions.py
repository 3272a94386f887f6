"""Saved COCO predictions and `fourm-eval evaluate coco-det`: scored exactly as pycocotools scores
them when fed by hand, and malformed files get named errors (no traceback)."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from fourm_eval.data.coco_mini import make_mini_coco
from fourm_eval.tasks import get_task
from fourm_eval.tasks.coco_det import write_predictions

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_mini_coco(tmp_path_factory.mktemp("coco"), n_train=2, n_val=6, seed=5)


def _fake_results(ann_file):
    """Ground truth, jittered, with some wrong classes and extra boxes: a non-trivial score."""
    from pycocotools import mask as mask_util

    gt = json.loads(ann_file.read_text())
    rng = np.random.default_rng(0)
    sizes = {im["id"]: (im["height"], im["width"]) for im in gt["images"]}
    cats = [c["id"] for c in gt["categories"]]
    dets, segs = [], []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        box = [x + rng.normal(0, 2), y + rng.normal(0, 2), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
        cat = a["category_id"] if rng.random() > 0.2 else int(rng.choice(cats))
        score = float(rng.uniform(0.3, 1.0))
        dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": [float(v) for v in box], "score": score})
        hgt, wid = sizes[a["image_id"]]
        rles = mask_util.frPyObjects(a["segmentation"], hgt, wid)
        rle = mask_util.merge(rles) if isinstance(rles, list) else rles
        rle["counts"] = rle["counts"].decode("ascii")
        segs.append({"image_id": a["image_id"], "category_id": cat, "segmentation": rle, "score": score})
    for im in gt["images"][:3]:
        dets.append({"image_id": im["id"], "category_id": cats[0], "bbox": [1.0, 1.0, 20.0, 20.0], "score": 0.9})
        m = np.zeros(sizes[im["id"]], dtype=np.uint8, order="F")
        m[1:21, 1:21] = 1
        rle = mask_util.encode(m)
        rle["counts"] = rle["counts"].decode("ascii")
        segs.append({"image_id": im["id"], "category_id": cats[0], "segmentation": rle, "score": 0.95})
    return dets, segs


def _pycocotools(ann_file, results, iou_type):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(json.loads(json.dumps(results)))
        ev = COCOeval(gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return _no_value(ev.stats[:6])


def _no_value(stats):
    """pycocotools' stats with its -1 ("no ground truth of that size") as NaN, as fourm-eval reports it."""
    return [float("nan") if v == -1 else float(v) for v in stats]


def _same(a, b):
    np.testing.assert_equal(np.asarray(a, float), np.asarray(b, float))  # NaN equals NaN here


def test_saved_predictions_score_like_pycocotools(coco, tmp_path):
    ann = coco / "annotations" / "instances_val2017.json"
    dets, segs = _fake_results(ann)
    gt_ids = [im["id"] for im in json.loads(ann.read_text())["images"]]
    write_predictions(tmp_path / "pred", json.loads(json.dumps(dets)), json.loads(json.dumps(segs)), gt_ids)
    got = get_task("coco-det").evaluate(tmp_path / "pred", coco)
    box, mask = _pycocotools(ann, dets, "bbox"), _pycocotools(ann, segs, "segm")
    assert 0.2 < box[0] < 0.95 and 0.2 < mask[0] < 0.95  # a score with something to get wrong
    _same([got[f"box_{s}"] for s in STATS], box)
    _same([got[f"mask_{s}"] for s in STATS], mask)
    # one file, named by its IoU type, gives the same numbers for that type
    single = tmp_path / "mine.bbox.json"
    shutil.copy(tmp_path / "pred" / "coco_results.bbox.json", single)
    one = get_task("coco-det").evaluate(single, coco)
    assert sorted(one) == sorted(f"box_{s}" for s in STATS)
    _same([one[f"box_{s}"] for s in STATS], box)


def test_meta_image_ids_restrict_the_evaluation(coco, tmp_path):
    """A run that left images out (skipped as unreadable) is re-scored on the same images."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    ann = coco / "annotations" / "instances_val2017.json"
    dets, segs = _fake_results(ann)
    ids = sorted({d["image_id"] for d in dets})[:4]
    dets = [d for d in dets if d["image_id"] in ids]
    # written inside a validation: the run's mark (an evaluation in progress) stays beside the ids
    from fourm_eval.tasks.runs import mark_predictions, predictions_state
    mark_predictions(tmp_path / "pred", iteration=8, complete=False)
    write_predictions(tmp_path / "pred", json.loads(json.dumps(dets)), None, ids)
    assert predictions_state(tmp_path / "pred") == {**predictions_state(tmp_path / "pred"), "iteration": 8,
                                                    "complete": False}
    got = get_task("coco-det").evaluate(tmp_path / "pred", coco)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann))
        ev = COCOeval(gt, gt.loadRes(json.loads(json.dumps(dets))), "bbox")
        ev.params.imgIds = ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    _same([got[f"box_{s}"] for s in STATS], _no_value(ev.stats[:6]))
    assert "mask_AP" not in got


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "fourm_eval.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.mark.parametrize("content,expected", [
    ("{not json", "not valid JSON"),
    ('{"image_id": 1}', "expected a JSON list of COCO results"),
    ('[{"image_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]', r"entry 0 lacks \['category_id'\]"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}]', "expected \\[x, y, width, height\\]"),
    ('[{"image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "score": "high"}]', "non-numeric score"),
    ('[{"image_id": 987654, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]',
     r"image id\(s\) not in the ground truth, e.g. \[987654\]"),
    ('[{"image_id": IMG, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}]',
     r"category id\(s\) \[0\] not in the ground truth"),
], ids=["not-json", "not-a-list", "missing-field", "bad-bbox", "bad-score", "unknown-image", "unknown-category"])
def test_malformed_predictions_are_named(coco, tmp_path, content, expected):
    img = json.loads((coco / "annotations" / "instances_val2017.json").read_text())["images"][0]["id"]
    f = tmp_path / "res.bbox.json"
    f.write_text(content.replace("IMG", str(img)))
    r = _cli(["evaluate", "coco-det", "--predictions", str(f), "--data-root", str(coco)], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "res.bbox.json" in r.stderr
    assert __import__("re").search(expected, r.stderr.replace("\n", " ")), r.stderr


def test_unnamed_file_and_empty_folder_are_named(coco, tmp_path):
    f = tmp_path / "results.json"
    f.write_text("[]")
    r = _cli(["evaluate", "coco-det", "--predictions", str(f), "--data-root", str(coco)], tmp_path)
    assert r.returncode == 2 and "*.bbox.json or *.segm.json" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "empty").mkdir()
    r = _cli(["evaluate", "coco-det", "--predictions", str(tmp_path / "empty"), "--data-root", str(coco)], tmp_path)
    assert r.returncode == 2 and "no COCO results in this folder" in r.stderr
    assert "coco_results.bbox.json" in r.stderr and "coco_instances_results.json" in r.stderr
    r = _cli(["evaluate", "coco-det", "--predictions", str(f), "--data-root", str(tmp_path / "nowhere")], tmp_path)
    assert r.returncode == 2 and "instances_val2017.json: annotation file not found" in r.stderr
