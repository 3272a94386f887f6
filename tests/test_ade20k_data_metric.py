"""ADE20K: the mIoU / mAcc / aAcc metric against hand computations and an independent confusion
matrix; the label-PNG predictions and their named errors; the layout check and its named errors;
the mini dataset."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fourm_eval.data.ade_check import check_split
from fourm_eval.data.ade_mini import MINI_CLASSES, make_mini_ade20k
from fourm_eval.data.coco_check import DatasetError
from fourm_eval.data.pngmap import write_png_map
from fourm_eval.metrics_seg import PredictionsError, image_areas, reduce_zero_label, summarize
from fourm_eval.tasks import get_task
from fourm_eval.tasks.kits.dense import score_folder

ADE = get_task("ade20k-seg")


def evaluate_folder(pred_dir, gt):
    """The dense kit's folder scoring with the ADE20K task's encoding, metric and summary."""
    metrics, extras = score_folder(ADE, pred_dir, gt, {"procedure": "original"})  # scored at the full size
    return {**metrics, **extras}

K = 150


# ------------------------------------------------------------------ metric
def test_metric_matches_a_hand_computed_confusion_matrix():
    """Two images, classes 0..3 of 5, ignore pixels, a class predicted but never labelled, a class
    absent everywhere. Confusion (rows = label, cols = prediction), over both images:

        label 0: pred 0 x3, pred 1 x1          label 1: pred 1 x2, pred 2 x1
        label 3: pred 3 x1, pred 0 x1          (class 2 never labelled, class 4 absent everywhere)
    """
    p1 = np.array([[0, 0, 1], [1, 1, 2], [9, 9, 9]])
    g1 = np.array([[0, 0, 0], [1, 1, 1], [255, 255, 255]])    # last row ignored (whatever is predicted)
    p2 = np.array([[0, 3]])
    g2 = np.array([[0, 3]])
    p3 = np.array([[0]])
    g3 = np.array([[3]])
    total = sum(image_areas(p, g, 5) for p, g in ((p1, g1), (p2, g2), (p3, g3)))
    # intersect / union / pred / label per class, by hand from the matrix above
    assert total[0].tolist() == [3, 2, 0, 1, 0]
    assert total[2].tolist() == [4, 3, 1, 1, 0]                    # column sums
    assert total[3].tolist() == [4, 3, 0, 2, 0]                    # row sums
    assert total[1].tolist() == [5, 4, 1, 2, 0]                    # pred + label - intersect
    s = summarize(total)
    # IoU: 3/5, 2/4, 0/1, 1/2; class 4 (no union) left out -> mean over 4 classes
    assert s["mIoU"] == pytest.approx((3 / 5 + 2 / 4 + 0 + 1 / 2) / 4, abs=1e-12)
    # Acc: 3/4, 2/3, 1/2 over the labelled classes 0, 1, 3
    assert s["mAcc"] == pytest.approx((3 / 4 + 2 / 3 + 1 / 2) / 3, abs=1e-12)
    assert s["aAcc"] == pytest.approx(6 / 9, abs=1e-12)
    assert s["classes_in_miou"] == 4 and s["classes_in_macc"] == 3
    assert s["per_class_iou"][4] is None


def _confusion(pred, label, k, ignore=255):
    m = label != ignore
    return np.bincount(label[m] * k + np.where((pred[m] >= 0) & (pred[m] < k), pred[m], k * k)
                       .clip(max=k * k), minlength=k * k + 1)[:k * k].reshape(k, k)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metric_agrees_with_an_independent_confusion_matrix(seed):
    """Random images of random sizes, a random subset of the 150 classes present, in any order."""
    rng = np.random.default_rng(seed)
    present = rng.choice(K, size=int(rng.integers(2, 12)), replace=False)
    conf = np.zeros((K, K), dtype=np.int64)
    total = np.zeros((4, K))
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(5, 40, size=2))
        label = rng.choice(np.append(present, 255), size=(h, w))
        pred = np.where(rng.random((h, w)) < 0.6, label, rng.choice(present, size=(h, w)))
        pred[label == 255] = rng.integers(0, K)
        conf += _confusion(pred, label, K)
        total += image_areas(pred, label, K)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    keep = union > 0
    labelled = conf.sum(1) > 0
    s = summarize(total)
    assert s["mIoU"] == pytest.approx(np.mean(inter[keep] / union[keep]), abs=1e-12)
    assert s["mAcc"] == pytest.approx(np.mean(inter[labelled] / conf.sum(1)[labelled]), abs=1e-12)
    assert s["aAcc"] == pytest.approx(inter.sum() / conf.sum(), abs=1e-12)
    assert s["classes_in_miou"] == keep.sum()


def test_reduce_zero_label_and_no_class_predictions():
    raw = np.array([[0, 1, 150]], dtype=np.uint8)
    assert reduce_zero_label(raw).tolist() == [[255, 0, 149]]
    # prediction value 0 ("no class") is read as -1: wrong wherever a class is labelled, counted nowhere
    a = image_areas(np.array([[-1, -1]]), np.array([[0, 1]]), 3)
    assert a[0].sum() == 0 and a[2].sum() == 0 and a[3].tolist() == [1, 1, 0]


# ------------------------------------------------------------- predictions
def _gt_folder(tmp_path, shapes):
    gt = {}
    d = tmp_path / "gt"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(shapes):
        p = d / f"img{i}.png"
        Image.fromarray(rng.integers(0, 151, size=(h, w)).astype(np.uint8), mode="L").save(p)
        gt[f"img{i}"] = p
    return gt


def test_prediction_pngs_round_trip_to_the_metric(tmp_path):
    gt = _gt_folder(tmp_path, [(7, 9), (12, 5)])
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    total = np.zeros((4, K))
    for stem, path in gt.items():
        label = reduce_zero_label(np.asarray(Image.open(path)))
        pred = np.where(label == 255, 3, label)
        pred[0, 0] = 149
        write_png_map(pred_dir / f"{stem}.png", ADE.encode(pred))
        stored = np.asarray(Image.open(pred_dir / f"{stem}.png"))
        assert stored.dtype == np.uint8 and stored.min() >= 1 and stored.max() <= 150  # ADE20K's 1..150
        assert (stored.astype(int) - 1 == pred).all()
        total += image_areas(pred, label, K)
    assert evaluate_folder(pred_dir, gt) == summarize(total)


@pytest.mark.parametrize("problem,match", [
    ("missing", r"no prediction for 1 of the 2 val images, e.g. \['img1.png'\]"),
    ("extra", r"1 prediction\(s\) for no val image, e.g. \['stray.png'\]"),
    ("size", "prediction is 9x6 .* ground truth .*img1.png \\(8x6\\) a prediction is 8x6"),
    ("corrupt", "does not decode"),
    ("rgb", "an? RGB PNG; predictions must be single-channel 8-bit PNGs"),
    ("sixteen", "a 16-bit PNG; predictions must be single-channel 8-bit"),
    ("not-png", "1 file\\(s\\) that are not .png predictions"),
    ("value", "values \\[151\\] above 150"),
    ("nofolder", "predictions folder not found"),
])
def test_bad_predictions_are_named_errors(tmp_path, problem, match):
    gt = _gt_folder(tmp_path, [(6, 8), (6, 8)])
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    for stem in gt:
        Image.fromarray(np.ones((6, 8), np.uint8), mode="L").save(pred_dir / f"{stem}.png")
    target = pred_dir / "img1.png"
    if problem == "missing":
        target.unlink()
    elif problem == "extra":
        shutil.copy(pred_dir / "img0.png", pred_dir / "stray.png")
    elif problem == "size":
        Image.fromarray(np.ones((6, 9), np.uint8), mode="L").save(target)
    elif problem == "corrupt":
        target.write_bytes(target.read_bytes()[:30])
    elif problem == "rgb":
        Image.fromarray(np.ones((6, 8, 3), np.uint8)).save(target)
    elif problem == "sixteen":
        write_png_map(target, np.ones((6, 8), np.uint16))
    elif problem == "not-png":
        (pred_dir / "notes.txt").write_text("x")
    elif problem == "value":
        Image.fromarray(np.full((6, 8), 151, np.uint8), mode="L").save(target)
    elif problem == "nofolder":
        shutil.rmtree(pred_dir)
    with pytest.raises(PredictionsError, match=match):
        evaluate_folder(pred_dir, gt)


# --------------------------------------------------------------- data check
@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016", n_train=6, n_val=4, seed=5)


def _copy(mini, tmp_path):
    out = tmp_path / "ADEChallengeData2016"
    shutil.copytree(mini, out)
    return out


def test_mini_dataset_layout_and_determinism(mini, tmp_path):
    again = make_mini_ade20k(tmp_path / "again", n_train=6, n_val=4, seed=5)
    for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
        a, b = sorted((mini / sub).iterdir()), sorted((again / sub).iterdir())
        assert [p.name for p in a] == [p.name for p in b] and a
        assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    values = set()
    for p in (mini / "annotations" / "validation").iterdir():
        im = Image.open(p)
        assert im.mode == "L" and im.size == Image.open(mini / "images" / "validation" / (p.stem + ".jpg")).size
        values |= set(np.unique(np.asarray(im)).tolist())
    assert values - {0} <= set(MINI_CLASSES) and len(values - {0}) >= 3
    assert Image.open(mini / "images" / "training" / "ADE_train_00000001.jpg").mode == "L"  # a grayscale JPEG
    c = check_split(mini, "val", skip_bad_images=False, out_dir=tmp_path / "lists")
    assert c.n_images == 4 and (tmp_path / "lists" / "val_files.txt").read_text().split() == c.stems
    assert {v + 1 for v in c.classes_present} <= set(MINI_CLASSES)


def _break(root, problem):
    img = root / "images" / "validation" / "ADE_val_00000002.jpg"
    ann = root / "annotations" / "validation" / "ADE_val_00000002.png"
    if problem == "no annotation":
        ann.unlink()
    elif problem == "no image":
        img.unlink()
    elif problem == "label > 150":
        a = np.asarray(Image.open(ann)).copy()
        a[0, :3] = 200
        Image.fromarray(a, mode="L").save(ann)
    elif problem == "size mismatch":
        Image.open(ann).crop((0, 0, 50, 40)).save(ann)
    elif problem == "corrupt image":
        img.write_bytes(img.read_bytes()[:400])
    elif problem == "corrupt annotation":
        ann.write_bytes(b"not a png")
    elif problem == "rgb annotation":
        Image.open(ann).convert("RGB").save(ann)
    return img, ann


@pytest.mark.parametrize("problem,match,names", [
    ("no annotation", "no annotation", "img"),
    ("no image", "no image", "ann"),
    ("label > 150", r"label values \[200\] above 150", "ann"),
    ("size mismatch", "must be the same size", "ann"),
    ("corrupt image", "does not decode", "img"),
    ("corrupt annotation", "annotation does not decode", "ann"),
    ("rgb annotation", "mode RGB", "ann"),
])
def test_bad_samples_are_named_errors_or_skipped(mini, tmp_path, problem, match, names):
    root = _copy(mini, tmp_path)
    img, ann = _break(root, problem)
    with pytest.raises(DatasetError, match=match) as e:
        check_split(root, "val", skip_bad_images=False)
    assert str(img if names == "img" else ann) in str(e.value) and "--skip-bad-images" in str(e.value)
    c = check_split(root, "val", skip_bad_images=True, out_dir=tmp_path / "lists")
    assert c.n_images == 3 and len(c.bad) == 1 and "ADE_val_00000002" not in c.stems
    assert "ADE_val_00000002" not in (tmp_path / "lists" / "val_files.txt").read_text()


def test_missing_folder_is_a_named_error(mini, tmp_path):
    root = _copy(mini, tmp_path)
    shutil.rmtree(root / "annotations" / "training")
    with pytest.raises(DatasetError, match=r"annotations/training: annotation folder not found"):
        check_split(root, "train", skip_bad_images=True)


def test_cli_data_check_and_evaluate_print_named_errors(mini, tmp_path):
    """No traceback: the CLI prints the named error and exits 2."""
    root = _copy(mini, tmp_path)
    _break(root, "label > 150")
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "data", "check", "ade20k", str(root)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "above 150" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "ADE_val_00000001.png").write_bytes(b"garbage")
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "evaluate", "ade20k-seg", "--predictions",
                        str(pred), "--data-root", str(mini)], capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "no prediction for" in out and "Traceback" not in out


def test_meta_json_limits_evaluation_to_the_run_images(mini, tmp_path):
    """A run's own predictions name their images (a subset, or bad files skipped); scoring follows them."""
    from fourm_eval.tasks import get_task

    pred = tmp_path / "pred"
    pred.mkdir()
    ann = mini / "annotations" / "validation"
    stems = sorted(p.stem for p in ann.iterdir())[:2]
    for s in stems:
        shutil.copy(ann / f"{s}.png", pred / f"{s}.png")  # the ground truth itself as prediction
    (pred / "meta.json").write_text(json.dumps({"stems": stems}))
    m = get_task("ade20k-seg").evaluate(pred, mini)
    # a perfect prediction except for the ignored "other" pixels (stored 0 -> no class, never scored)
    assert m["mIoU"] == 1.0 and m["aAcc"] == 1.0 and m["mAcc"] == 1.0
    (pred / "meta.json").write_text(json.dumps({"stems": stems + ["nope"]}))
    with pytest.raises(PredictionsError, match="nope"):
        get_task("ade20k-seg").evaluate(pred, mini)


# ------------------------------------------------------------- the two protocols' scoring
def _miou_by_hand(pairs, classes):
    """mIoU over the classes with a union, pixels pooled over images: loops over classes, boolean masks."""
    inter = {c: 0 for c in classes}
    union = {c: 0 for c in classes}
    for pred, gt in pairs:  # stored values: class k as k + 1; ground truth 0 = ignored
        keep = gt != 0
        for c in classes:
            p, g = (pred == c + 1) & keep, (gt == c + 1) & keep
            inter[c] += int((p & g).sum())
            union[c] += int((p | g).sum())
    ious = [inter[c] / union[c] for c in classes if union[c] > 0]
    return sum(ious) / len(ious)


def test_protocol_scoring_by_hand_and_switching_protocols_changes_the_number(tmp_path):
    """The same full-size predictions scored by mae-upernet (at the original size) and by multimae (MultiMAE's
    single pass: labels and predictions nearest-resized to long side S, OpenCV's rule floor(x * in / out));
    each equals a hand computation, and the two differ. A prediction stored at the scored size (as a multimae
    run stores it) scores the same as the full-size one viewed there."""
    assert ADE.protocol_scoring("mae-upernet") == {"procedure": "original"}
    assert ADE.protocol_scoring("multimae") == {"procedure": "long-side", "size": 512}
    rng = np.random.default_rng(5)
    gt_dir, pred_dir, small_dir = tmp_path / "gt", tmp_path / "pred", tmp_path / "small"
    for d in (gt_dir, pred_dir, small_dir):
        d.mkdir()
    gt_files, full, viewed = {}, [], []
    S = 6
    for stem, (h, w) in (("a", (6, 9)), ("b", (10, 7))):
        gt = rng.integers(0, 4, size=(h, w)).astype(np.uint8)            # 0 ignored, classes 0..2 stored 1..3
        pred = np.where(rng.random((h, w)) < 0.7, np.maximum(gt, 1), rng.integers(1, 4, size=(h, w))).astype(np.uint8)
        Image.fromarray(gt, mode="L").save(gt_dir / f"{stem}.png")
        gt_files[stem] = gt_dir / f"{stem}.png"
        write_png_map(pred_dir / f"{stem}.png", pred)
        full.append((pred, gt))
        # by hand: long side -> S, the other side round(side * S / long) (6 x 9 -> 4 x 6; 10 x 7 -> 6 x 4)
        nh, nw = {("a"): (4, 6), ("b"): (6, 4)}[stem]
        rows = [int(y * h / nh) for y in range(nh)]
        cols = [int(x * w / nw) for x in range(nw)]
        small = lambda m: np.array([[m[r, c] for c in cols] for r in rows], dtype=np.uint8)  # noqa: E731
        viewed.append((small(pred), small(gt)))
        write_png_map(small_dir / f"{stem}.png", small(pred))
    original = score_folder(ADE, pred_dir, gt_files, {"procedure": "original"})[0]["mIoU"]
    single = score_folder(ADE, pred_dir, gt_files, {"procedure": "long-side", "size": S})[0]["mIoU"]
    assert original == pytest.approx(_miou_by_hand(full, range(3)))
    assert single == pytest.approx(_miou_by_hand(viewed, range(3)))
    assert abs(original - single) > 1e-3, (original, single)
    assert score_folder(ADE, small_dir, gt_files, {"procedure": "long-side", "size": S})[0]["mIoU"] == single
    with pytest.raises(PredictionsError, match=r"small/a.png: prediction is 6x4 .* a prediction is 9x6"):
        score_folder(ADE, small_dir, gt_files, {"procedure": "original"})


def test_resize_nearest_is_opencvs_and_sizes_are_albumentations():
    """The scoring geometry against OpenCV (INTER_NEAREST, what albumentations uses on masks) and
    albumentations' size rule round(side * size / long side), worked by hand."""
    import cv2

    from fourm_eval.data.geometry import resize_nearest, scaled_size, scored_view

    rng = np.random.default_rng(1)
    for (h, w), (nh, nw) in (((6, 9), (4, 6)), ((480, 640), (384, 512)), ((7, 5), (13, 11)), ((375, 500), (384, 512))):
        a = rng.integers(0, 255, size=(h, w)).astype(np.uint8)
        assert (resize_nearest(a, nh, nw) == cv2.resize(a, (nw, nh), interpolation=cv2.INTER_NEAREST)).all()
    assert scaled_size(6, 9, 6, "long") == (4, 6)
    assert scaled_size(375, 500, 512, "long") == (384, 512)     # 375 * 512 / 500 = 384.0
    assert scaled_size(683, 512, 512, "long") == (512, 384)     # 512 * 512 / 683 = 383.8 -> 384
    assert scaled_size(480, 640, 256, "short") == (256, 341)    # 640 * 256 / 480 = 341.3
    crop = scored_view(np.arange(480 * 640).reshape(480, 640), "short-side-crop", 256)
    assert crop.shape == (256, 256)
    # the centre crop of the 256 x 341 resize starts at column (341 - 256) // 2 = 42: input column floor(42 * 640 / 341)
    assert crop[0, 0] == int(42 * 640 / 341)


def test_single_pass_test_geometry_pads_and_crops_as_scored():
    """The test transform of the single-pass procedures: long-side (resized to long side S, grey padding at the
    bottom / right recorded for mmseg's segmentors to crop, the scored size as ori_shape) and short-side-crop."""
    from mmseg.registry import TRANSFORMS

    ADE.register_mm()
    img = np.full((6, 9, 3), 10, np.uint8)
    out = TRANSFORMS.build(dict(type="FourmTestGeometry", procedure="long-side", size=6, pad_value=128))(
        {"img": img.copy(), "ori_shape": (6, 9), "img_shape": (6, 9)})
    assert out["img"].shape == (6, 6, 3) and out["ori_shape"] == (4, 6) and out["img_padding_size"] == [0, 0, 0, 2]
    assert (out["img"][:4] == 10).all() and (out["img"][4:] == 128).all()
    img = np.arange(10 * 14 * 3, dtype=np.uint8).reshape(10, 14, 3) % 200
    out = TRANSFORMS.build(dict(type="FourmTestGeometry", procedure="short-side-crop", size=10))(
        {"img": img.copy(), "ori_shape": (10, 14), "img_shape": (10, 14)})
    assert out["ori_shape"] == out["img"].shape[:2] == (10, 10) and out["img_padding_size"] == [0, 0, 0, 0]
    assert (out["img"] == img[:, 2:12]).all()  # no resize (short side already 10), columns (14 - 10) // 2 = 2 on
