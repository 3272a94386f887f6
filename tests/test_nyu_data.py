"""NYUv2 data: the converter from the official file structure, the layout checks, the mini generator."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fourm_eval.cli import app
from fourm_eval.data.nyu import (NyuDataError, check_split, median_depth_m, read_depth_mm, write_depth_mm)
from fourm_eval.data.nyu_convert import convert_nyu
from fourm_eval.data.nyu_mini import make_mini_nyu

H, W, N = 6, 8, 5   # asymmetric on purpose: a transposed image would be 8 x 6


def _image(i: int) -> np.ndarray:
    """(H, W, 3): every pixel and channel its own value, so any flip or transpose shows."""
    y, x, c = np.mgrid[0:H, 0:W, 0:3]
    return (y * W + x + 50 * c + i).astype(np.uint8)


def _depth(i: int) -> np.ndarray:
    """(H, W) metres: 1 m + 0.1 m per row + 0.01 m per column + i."""
    y, x = np.mgrid[0:H, 0:W]
    return (1.0 + 0.1 * y + 0.01 * x + i).astype(np.float32)


def _write_official(tmp: Path, train=(2, 4), test=(1, 3, 5)) -> tuple[Path, Path]:
    """A tiny labelled file with the official structure: MATLAB v7.3 = HDF5 behind a 512-byte header,
    arrays as h5py shows them (MATLAB's H x W x 3 x N seen reversed: (N, 3, W, H))."""
    import h5py
    import scipy.io

    images = np.stack([_image(i).transpose(2, 1, 0) for i in range(N)])   # (N, 3, W, H)
    depths = np.stack([_depth(i).T for i in range(N)])                     # (N, W, H)
    depths[0, 0, 0] = np.nan   # no measurement
    depths[0, 1, 1] = 0.0
    labelled = tmp / "nyu_depth_v2_labeled.mat"
    with h5py.File(labelled, "w", userblock_size=512) as f:
        f.create_dataset("images", data=images)
        f.create_dataset("depths", data=depths)
        f.create_dataset("labels", data=np.zeros((N, W, H), np.uint16))
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
    with open(labelled, "r+b") as f:
        f.write(header.ljust(116) + b"\0" * 8 + b"\x00\x02" + b"IM")
    splits = tmp / "splits.mat"
    scipy.io.savemat(splits, {"trainNdxs": np.array(train, float).reshape(-1, 1),
                              "testNdxs": np.array(test, float).reshape(-1, 1)})
    return labelled, splits


def test_converter_keeps_orientation_values_and_indices(tmp_path):
    labelled, splits = _write_official(tmp_path)
    assert labelled.read_bytes()[:10] == b"MATLAB 7.3"
    out = convert_nyu(labelled, splits, tmp_path / "nyu", log=lambda _: None)
    for split, idx in (("train", (2, 4)), ("test", (1, 3, 5))):
        assert sorted(p.name for p in (out / "images" / split).iterdir()) == [f"nyu_{i:04d}.png" for i in idx]
        for i in idx:  # 1-based splits.mat index i is source image i - 1
            rgb = np.asarray(Image.open(out / "images" / split / f"nyu_{i:04d}.png"))
            assert rgb.shape == (H, W, 3) and (rgb == _image(i - 1)).all()
            mm = read_depth_mm(out / "annotations" / split / f"nyu_{i:04d}.png")
            want = np.rint(_depth(i - 1).astype(np.float64) * 1000)
            if i == 1:
                want[0, 0] = want[1, 1] = 0  # NaN and 0 in the source: no measurement
            assert mm.shape == (H, W) and (mm == want).all()
    assert mm[2, 3] == 1000 + 200 + 30 + 4000   # test image 5 = source 4, row 2, column 3
    summary = json.loads((out / "NYU_CONVERTED").read_text())
    assert summary["n_train"] == 2 and summary["n_test"] == 3 and summary["no_measurement_pixels"] == 2
    # the converted folder passes the layout check
    assert check_split(out, "train").n_images == 2


def test_convert_command_and_its_errors(tmp_path):
    labelled, splits = _write_official(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["data", "convert", "nyu", str(labelled), str(splits), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "annotations" / "test" / "nyu_0005.png").is_file()
    r = runner.invoke(app, ["data", "check", "nyu", str(tmp_path / "out")])
    assert r.exit_code == 0 and "2 training / 3 validation" in r.output, r.output
    cases = [
        ([str(labelled), str(splits), str(tmp_path / "out")], "not an empty folder"),
        ([str(splits), str(splits), str(tmp_path / "o2")], "not an HDF5 file"),
        ([str(labelled), str(labelled), str(tmp_path / "o3")], "MATLAB v7.3"),
        ([str(labelled), str(tmp_path / "none.mat"), str(tmp_path / "o4")], "splits file not found"),
        ([str(labelled), str(tmp_path / "o5")], "expected two source files"),
    ]
    for args, msg in cases:
        r = runner.invoke(app, ["data", "convert", "nyu", *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
    r = runner.invoke(app, ["data", "convert", "coco", str(labelled), str(tmp_path / "o6")])
    assert r.exit_code == 2 and "no converter" in r.output


@pytest.mark.parametrize("train,test,msg", [((2, 6), (1,), "1..5"), ((2, 3), (3, 4), "in both"),
                                            ((0, 2), (1,), "1-based"), ((2, 2), (1,), "repeats")])
def test_bad_splits_are_named(tmp_path, train, test, msg):
    labelled, splits = _write_official(tmp_path, train, test)
    with pytest.raises(NyuDataError, match=msg):
        convert_nyu(labelled, splits, tmp_path / "nyu", log=lambda _: None)
    assert not (tmp_path / "nyu").exists()


# ------------------------------------------------------------------ layout checks
@pytest.fixture()
def mini(tmp_path):
    return make_mini_nyu(tmp_path / "mini", n_train=3, n_test=2, size=(24, 32), seed=5)


def _first(root, split, kind):
    folder = "images" if kind == "image" else "annotations"
    return sorted((root / folder / split).iterdir())[0]


def _break(root, how):
    d = _first(root, "train", "depth")
    if how == "8bit":
        Image.fromarray(np.full((24, 32), 7, np.uint8)).save(d)
    elif how == "rgb":
        Image.fromarray(np.full((24, 32, 3), 7, np.uint8)).save(d)
    elif how == "zero":
        write_depth_mm(d, np.zeros((24, 32), np.uint16))
    elif how == "size":
        write_depth_mm(d, np.full((32, 24), 2000, np.uint16))
    elif how == "no_depth":
        d.unlink()
    elif how == "no_image":
        _first(root, "train", "image").unlink()
    elif how == "no_folder":
        for p in (root / "annotations" / "test").iterdir():
            p.unlink()
        (root / "annotations" / "test").rmdir()
    elif how == "mixed":
        i = _first(root, "train", "image")
        Image.open(i).save(i.with_suffix(".png"))
        i.unlink()
    elif how == "corrupt":
        _first(root, "train", "image").write_bytes(b"not a jpeg")
    elif how == "outside_crop":
        t = _first(root, "test", "depth")
        mm = np.zeros((24, 32), np.uint16)
        mm[:2] = 3000  # rows 0-1: above the scaled crop (rows 2:24)
        write_depth_mm(t, mm)
    return d


@pytest.mark.parametrize("how,msg", [
    ("8bit", "8-bit PNG"), ("rgb", "RGB PNG"), ("zero", "every pixel is 0"), ("size", "must be the same size"),
    ("no_depth", "without a depth map"), ("no_image", "without an image"), ("no_folder", "folder not found"),
    ("mixed", "several suffixes"), ("corrupt", "does not decode"), ("outside_crop", "inside the Eigen crop")])
def test_layout_errors_are_named(mini, how, msg):
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import load_profile

    _break(mini, how)
    with pytest.raises(NyuDataError, match=msg):
        get_task("nyu").check_data(mini, load_profile("nyu-depth", "smoke"), skip_bad_images=False, out_dir=None,
                                   log=lambda _: None)


def test_skip_bad_images_drops_and_records(mini):
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import load_profile

    bad = _break(mini, "8bit")
    data = get_task("nyu-depth").check_data(mini, load_profile("nyu-depth", "smoke"), skip_bad_images=True,
                                            out_dir=None, log=lambda _: None)
    assert data.n_train == 2 and data.record["skipped_bad_images"] == 1
    assert data.record["splits"]["train"]["skipped"][0]["file"] == bad.stem
    assert bad.stem not in data.private["checks"]["train"].names


def test_median_is_the_lower_median_of_valid_training_depths():
    hist = np.zeros(65536, np.int64)
    values = [0, 0, 1, 500, 1200, 1200, 3000, 9000, 10000, 10001, 20000]  # 0, 1 mm, >10 m are not valid
    for v in values:
        hist[v] += 1
    valid = sorted(v for v in values if 1 < v <= 10000)   # 500 1200 1200 3000 9000 10000
    assert median_depth_m(hist) == valid[(len(valid) + 1) // 2 - 1] / 1000 == 1.2
    hist[3000] += 1   # seven valid values: the middle one
    assert median_depth_m(hist) == 3.0 == np.median([500, 1200, 1200, 3000, 3000, 9000, 10000]) / 1000


def test_baseline_is_recorded_and_computed_by_the_metric(mini):
    from fourm_eval.data.nyu import read_depth_m
    from fourm_eval.metrics_depth import image_metrics
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import load_profile

    # the eigen protocol's smoke: Eigen crop, per image (the smoke itself scores as MultiMAE; same rule, its metric)
    data = get_task("nyu").check_data(mini, load_profile("nyu-depth", "eigen-smoke"), skip_bad_images=False,
                                      out_dir=None, log=lambda _: None)
    base = data.record["train_median_baseline"]
    train = np.concatenate([read_depth_m(p).ravel() for p in sorted((mini / "annotations" / "train").iterdir())])
    train = np.sort(train[(train > 1e-3) & (train <= 10)])
    assert base["median_depth_m"] == train[(train.size + 1) // 2 - 1]
    gts = [read_depth_m(p) for p in sorted((mini / "annotations" / "test").iterdir())]
    d1 = np.mean([image_metrics(np.full(g.shape, base["median_depth_m"]), g)["delta1"] for g in gts])
    assert base["metrics"]["delta1"] == pytest.approx(d1)


def test_mini_is_deterministic_learnable_shaped(tmp_path):
    a = make_mini_nyu(tmp_path / "a", n_train=2, n_test=1, seed=3)
    b = make_mini_nyu(tmp_path / "b", n_train=2, n_test=1, seed=3)
    c = make_mini_nyu(tmp_path / "c", n_train=2, n_test=1, seed=4)

    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.*")))).hexdigest()

    assert digest(a) == digest(b) != digest(c)
    depth = read_depth_mm(a / "annotations" / "train" / "mini_0001.png")
    rgb = np.asarray(Image.open(a / "images" / "train" / "mini_0001.jpg"))
    assert depth.shape == (120, 160) and rgb.shape == (120, 160, 3)
    valid = depth[depth > 0] / 1000
    assert 0.3 < valid.min() and valid.max() <= 10 and valid.max() - valid.min() > 1  # a room, not a plane
    assert (rgb[0] > 240).all()  # NYU's white frame
