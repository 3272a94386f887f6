"""One class order per COCO run, whatever order the annotation files list their categories in.

mmdet numbers labels in the file's category order; the metric and the record map label k to
the k-th smallest category id. Ground truth fed through the real path (the task's data check ->
mmdet CocoDataset built from the task's config -> gt instances as predictions -> the project's
metric, as the runner calls it) must score AP 1.0 for any listing order and non-contiguous ids.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from fourm_eval.data.coco_check import DatasetError
from fourm_eval.data.coco_mini import make_mini_coco
from fourm_eval.tasks import coco_det
from fourm_eval.tasks.profiles import load_profile
from task_context import run_context_for

# the mini dataset's circle / square / triangle get non-contiguous ids; "star" is declared, never annotated
REMAP = {1: 17, 2: 90, 3: 1}
NAMES = {17: "circle", 90: "square", 1: "triangle", 3: "star"}
BY_ID = [1, 3, 17, 90]
REVERSED = [90, 17, 3, 1]
SHUFFLED = [17, 1, 90, 3]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return make_mini_coco(tmp_path_factory.mktemp("mini"), n_train=4, n_val=8, seed=3, size_range=(96, 128))


def _layout(src: Path, dst: Path, orders: dict[str, list[int]], names: dict[str, dict[int, str]] | None = None
            ) -> Path:
    """A copy of ``src`` whose split files list the categories in ``orders[split]`` (ids remapped)."""
    shutil.copytree(src, dst)
    for split, order in orders.items():
        path = dst / "annotations" / f"instances_{split}2017.json"
        data = json.loads(path.read_text())
        for a in data["annotations"]:
            a["category_id"] = REMAP[a["category_id"]]
        split_names = (names or {}).get(split, NAMES)
        data["categories"] = [{"id": i, "name": split_names[i], "supercategory": "shape"} for i in order]
        path.write_text(json.dumps(data))
    return dst


def _build(root: Path, work: Path):
    """Data check, config parts and datasets exactly as the shared runner makes them for coco-det."""
    from mmdet.registry import DATASETS

    task = coco_det.TASK
    p = load_profile(task.name, "smoke")
    data = task.check_data(root, p, skip_bad_images=False, out_dir=work / "data", log=lambda _: None)
    cat_ids = data.private["cat_ids"]
    task.register_mm()
    cfg = task.runner_parts(run_context_for(task, p, data, work / "predictions"))
    train = DATASETS.build(cfg["train_dataset"])
    val = DATASETS.build(cfg["val_dataset"])
    coco_det.check_label_order(train, cat_ids, "train")
    coco_det.check_label_order(val, cat_ids, "val")
    return cfg, cat_ids, train, val


def _ground_truth_metrics(cfg: dict, val) -> dict[str, float]:
    """Each val sample's gt instances as predictions (score 1), through the project's metric as the
    runner's ValLoop drives it (Evaluator.process per batch, then evaluate -> compute_metrics)."""
    from mmengine.evaluator import Evaluator
    from mmengine.structures import InstanceData

    evaluator = Evaluator(cfg["val_evaluator"])
    evaluator.dataset_meta = val.metainfo
    for i in range(len(val)):
        item = val[i]
        sample = item["data_samples"]
        gt = sample.gt_instances
        h, w = sample.ori_shape
        # the test pipeline loads annotations after Resize: gt is in original image coordinates,
        # where mmdet's predictions are too
        assert (gt.masks.height, gt.masks.width) == (h, w)
        boxes = gt.bboxes.tensor if hasattr(gt.bboxes, "tensor") else torch.as_tensor(gt.bboxes)
        sample.pred_instances = InstanceData(
            bboxes=boxes.float(), labels=gt.labels, scores=torch.ones(len(gt.labels)),
            masks=torch.from_numpy(gt.masks.to_ndarray().astype(bool)))
        evaluator.process(data_samples=[sample], data_batch={"inputs": [item["inputs"]], "data_samples": [sample]})
    return evaluator.evaluate(len(val))


def _assert_perfect(cfg: dict, val) -> None:
    m = _ground_truth_metrics(cfg, val)
    assert m["coco/box_AP"] == pytest.approx(1.0) and m["coco/mask_AP"] == pytest.approx(1.0), m


def _assert_train_labels(train, cat_ids: list[int], root: Path) -> None:
    """The training labels mean the same categories as the metric's label -> id map."""
    raw = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    want: dict[int, list[int]] = {}
    for a in raw["annotations"]:
        want.setdefault(a["image_id"], []).append(a["category_id"])
    assert len(train) > 0
    for i in range(len(train)):
        info = train.get_data_info(i)
        got = sorted(cat_ids[inst["bbox_label"]] for inst in info["instances"])
        assert got == sorted(want[info["img_id"]])


@pytest.mark.parametrize("order", [BY_ID, REVERSED, SHUFFLED], ids=["by-id", "reversed", "shuffled"])
def test_ground_truth_scores_one_in_any_category_order(src, tmp_path, order):
    root = _layout(src, tmp_path / "coco", {"train": order, "val": order})
    cfg, cat_ids, train, val = _build(root, tmp_path / "run")
    assert cat_ids == BY_ID and list(val.metainfo["classes"]) == [NAMES[i] for i in BY_ID]
    _assert_perfect(cfg, val)
    _assert_train_labels(train, cat_ids, root)


def test_train_and_val_in_different_orders(src, tmp_path):
    root = _layout(src, tmp_path / "coco", {"train": REVERSED, "val": SHUFFLED})
    cfg, cat_ids, train, val = _build(root, tmp_path / "run")
    assert list(train.cat_ids) == list(val.cat_ids) == cat_ids == BY_ID
    _assert_perfect(cfg, val)
    _assert_train_labels(train, cat_ids, root)


def test_label_order_guard_names_the_mismatch(src, tmp_path):
    """A dataset read from a file in another order than the metric's is refused, not scored."""
    from mmdet.registry import DATASETS

    root = _layout(src, tmp_path / "coco", {"train": REVERSED, "val": REVERSED})
    cfg, cat_ids, _, _ = _build(root, tmp_path / "run")
    raw = dict(cfg["val_dataset"], ann_file=str(root / "annotations" / "instances_val2017.json"))
    with pytest.raises(DatasetError, match=r"val dataset .*category ids \[90, 17, 3, 1\].*\[1, 3, 17, 90\]"):
        coco_det.check_label_order(DATASETS.build(raw), cat_ids, "val")


@pytest.mark.parametrize("val_order,val_names,expected", [
    ([90, 17, 1], NAMES, r"only in train: 3 \('star'\)"),
    (SHUFFLED, {**NAMES, 17: "disc"}, r"same id, different name: 17 \('circle' vs 'disc'\)"),
], ids=["missing-id", "renamed"])
def test_train_val_categories_must_match(src, tmp_path, val_order, val_names, expected):
    root = _layout(src, tmp_path / "coco", {"train": REVERSED, "val": val_order}, {"val": val_names})
    with pytest.raises(DatasetError, match=expected) as e:
        coco_det.check_data(root, False, tmp_path / "run" / "data", log=lambda _: None)
    assert "instances_train2017.json" in str(e.value) and "instances_val2017.json" in str(e.value)
