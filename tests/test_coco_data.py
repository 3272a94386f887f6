"""COCO layout validation: every broken input gives an error naming the file and the problem."""

import json
import shutil

import pytest

from fourm_eval.data.coco_check import DatasetError, check_split
from fourm_eval.data.coco_mini import make_mini_coco


@pytest.fixture()
def mini(tmp_path_factory, tmp_path):
    src = tmp_path_factory.getbasetemp() / "mini-src"
    if not src.exists():
        make_mini_coco(src, n_train=6, n_val=4, seed=1)
    dst = tmp_path / "coco"
    shutil.copytree(src, dst)
    return dst


def test_generator_is_deterministic_and_valid(tmp_path, mini):
    again = make_mini_coco(tmp_path / "again", n_train=6, n_val=4, seed=1)
    for rel in ("annotations/instances_train2017.json", "val2017/000001000000.jpg"):
        assert (again / rel).read_bytes() == (mini / rel).read_bytes()
    data = json.loads((mini / "annotations/instances_train2017.json").read_text())
    assert {c["name"] for c in data["categories"]} == {"circle", "square", "triangle"}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        poly = a["segmentation"][0]
        xs, ys = poly[0::2], poly[1::2]
        assert min(xs) >= x - 0.02 and max(xs) <= x + w + 0.02 and min(ys) >= y - 0.02
        assert 0 < a["area"] <= w * h + 1e-6
    c = check_split(mini, "train", False, None)
    assert c.n_images == 6 and not c.bad_images


def test_missing_annotation_file(mini):
    (mini / "annotations/instances_val2017.json").unlink()
    with pytest.raises(DatasetError, match=r"instances_val2017.json: annotation file not found"):
        check_split(mini, "val", False, None)


def test_corrupt_image_is_named_and_can_be_skipped(mini, tmp_path):
    bad = mini / "train2017" / "000000000002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(DatasetError, match=r"000000000002.jpg: does not decode"):
        check_split(mini, "train", False, None)
    c = check_split(mini, "train", True, tmp_path / "run")
    assert [b[0] for b in c.bad_images] == [str(bad)] and c.n_images == 5
    cleaned = json.loads(c.used_ann_file.read_text())
    assert 2 not in {im["id"] for im in cleaned["images"]}
    assert all(a["image_id"] != 2 for a in cleaned["annotations"])


def test_missing_image_file(mini):
    (mini / "val2017" / "000001000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000001000001.jpg: file not found"):
        check_split(mini, "val", False, None)


def test_non_image_file(mini):
    (mini / "val2017" / "000001000000.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match=r"000001000000.jpg: does not decode"):
        check_split(mini, "val", False, None)


@pytest.mark.parametrize("mutate,expected", [
    (lambda d: d["annotations"][0].update(image_id=999), r"annotation \d+ references image_id 999"),
    (lambda d: d["annotations"][0].update(category_id=42), r"category_id 42"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, -3, 4]), r"bbox \[1, 2, -3, 4\]"),
    (lambda d: d["annotations"][0].update(segmentation=[[1, 2, 3]]), r"malformed segmentation"),
    (lambda d: d.pop("categories"), r"missing the 'categories' list"),
    (lambda d: d["images"][0].pop("file_name"), r"lacks \['file_name'\]"),
    (lambda d: d["categories"].append(dict(d["categories"][0])), r"category id 1 is listed twice"),
    (lambda d: d["categories"][0].update(id="1"), r"category id '1' is not an integer"),
])
def test_malformed_annotations(mini, mutate, expected):
    path = mini / "annotations/instances_train2017.json"
    data = json.loads(path.read_text())
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=expected) as e:
        check_split(mini, "train", False, None)
    assert "instances_train2017.json" in str(e.value)


def test_invalid_json(mini):
    (mini / "annotations/instances_train2017.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances_train2017.json: not valid JSON"):
        check_split(mini, "train", False, None)


def test_categories_out_of_id_order_get_a_sorted_copy(mini, tmp_path):
    """mmdet numbers labels in file order; the copy it reads lists categories by id, nothing else changes."""
    c = check_split(mini, "val", False, tmp_path / "run")
    assert c.used_ann_file is None  # already in id order: the original is read
    path = mini / "annotations/instances_val2017.json"
    data = json.loads(path.read_text())
    data["categories"] = data["categories"][::-1]
    path.write_text(json.dumps(data))
    c = check_split(mini, "val", False, tmp_path / "run")
    assert [x["id"] for x in c.categories] == [1, 2, 3]
    copy = json.loads(c.used_ann_file.read_text())
    assert [x["id"] for x in copy["categories"]] == [1, 2, 3]
    assert copy["images"] == data["images"] and copy["annotations"] == data["annotations"]
    assert check_split(mini, "val", False, None).used_ann_file is None  # a check only writes nothing


def test_subset_is_seeded_random_and_recorded(tmp_path):
    """train_subset / val_subset: a seeded random choice of image ids (not the file's first N),
    written into the run directory with the ids."""
    import json

    from fourm_eval.data.coco_check import check_split
    from fourm_eval.data.coco_mini import make_mini_coco

    root = make_mini_coco(tmp_path / "coco", n_train=30, n_val=4, seed=4, size_range=(64, 80))
    a = check_split(root, "train", False, tmp_path / "a", subset=10, subset_seed=0)
    b = check_split(root, "train", False, tmp_path / "b", subset=10, subset_seed=0)
    c = check_split(root, "train", False, tmp_path / "c", subset=10, subset_seed=1)
    all_ids = sorted(im["id"] for im in json.loads((root / "annotations" / "instances_train2017.json")
                                                    .read_text())["images"])
    assert a.subset_ids == b.subset_ids and a.subset_ids != c.subset_ids and len(a.subset_ids) == 10
    assert a.subset_ids != all_ids[:10] or c.subset_ids != all_ids[:10]
    assert a.n_images == 10
    used = json.loads(a.used_ann_file.read_text())
    assert sorted(im["id"] for im in used["images"]) == a.subset_ids
    assert {x["image_id"] for x in used["annotations"]} <= set(a.subset_ids)
    ids = json.loads((tmp_path / "a" / "train_subset_ids.json").read_text())
    assert ids["image_ids"] == a.subset_ids and ids["seed"] == 0


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    from fourm_eval.data.coco_mini import make_mini_coco

    root = make_mini_coco(tmp_path / "coco", n_train=12, n_val=4, seed=4, size_range=(64, 80))
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "run", "coco-det", "--profile", "short", "--dry-run",
                        "--data-root", str(root), "--set", "train_subset=6", "--work-dir", str(tmp_path / "w")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "subsets        train: 6 images, seed 0" in out
    assert ("10000 iterations x batch 8 (total batch 8 = 8 per process x 1 process(es)) = 80000 training images"
            in out)
    assert "peak lr 1.25e-05 as written (lr; total batch 8, not rescaled)" in out
    assert "optimiser      AdamW" in out and "time estimate  about 6.7 h" in out
    assert not (tmp_path / "w").exists()
    # a base lr (in1k-cls: ml-4m's and MAE's blr): the plan shows the base lr, the total batch and the peak lr
    from fourm_eval.data.imagenet_mini import make_mini_imagenet
    from fourm_eval.data.imagenet21k_mini import make_mini_imagenet21k
    im = make_mini_imagenet(tmp_path / "im", n_train_per_class=2, n_val_per_class=1, seed=1)
    im21 = make_mini_imagenet21k(tmp_path / "im21", n_per_class=2, seed=1)  # the 4m-21 protocol's first stage
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "run", "in1k-cls", "--profile", "paper", "--dry-run",
                        "--data-root", str(im), "--stage-data-root", str(im21), "--work-dir", str(tmp_path / "w2")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "base lr (blr) 0.0001 per 256 images x total batch 1024 / 256 = peak lr 0.0004" in r.stdout, r.stdout
    # the protocol's name and its resolved values
    assert "protocol       4m-21" in r.stdout and "resolved settings of protocol 4m-21 (profile paper" in r.stdout
    assert "  augment.mixup = 0.1" in r.stdout and "  blr = 0.0001" in r.stdout
