"""in21k-cls (ImageNet-21K, winter21 release) and the two-stage 4m-21 ImageNet protocol.

The data check's named errors and the held-out split (computed here by hand from its stated rule),
scoring against hand-made predictions, and the real two-stage smoke: in1k-cls's smoke runs the
in21k-cls smoke first (the CI gate's in1k-cls runs are that command; seeds 0 and 1 are used here)."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from fourm_eval.cells import identity
from fourm_eval.data.checks import DatasetError
from fourm_eval.data.imagenet21k_mini import make_mini_imagenet21k, mini_classes
from fourm_eval.data.imagenet_mini import mini_wnids
from fourm_eval.errors import PredictionsError
from fourm_eval.tasks import get_task

from cli_runner import cli_env, run_cli

TASK = get_task("in21k-cls")
P = {"val_per_class": 3, "subset_seed": 0, "train_subset": None, "val_subset": None}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    return make_mini_imagenet21k(tmp_path_factory.mktemp("in21k") / "winter21_whole", n_per_class=8)


def _check(root, p=P, **kw):
    return TASK.check_data(Path(root), {**P, **p}, skip_bad_images=kw.pop("skip", False), out_dir=kw.pop("out", None),
                           log=lambda s: None)


def _held_out_by_hand(names, k, seed):
    keyed = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    return set(keyed[:k])


def test_mini_layout_and_the_held_out_split_by_its_rule(mini, tmp_path):
    """15 wnid folders (the mini ImageNet-1K's ten among them, as ImageNet-21K holds ImageNet-1K's
    classes), classes in sorted order whatever the generation order, and per class exactly the
    files the stated rule picks (computed here with hashlib), at most half of a small class."""
    wnids = [w for w, _, _ in mini_classes()]
    assert wnids != sorted(wnids) and set(mini_wnids()) < set(wnids) and len(wnids) == 15
    data = _check(mini, out=tmp_path / "d")
    classes = data.private["classes"]
    assert classes == sorted(wnids) and data.record["num_classes"] == 15
    val = json.loads((tmp_path / "d" / "val_samples.json").read_text())
    train = json.loads((tmp_path / "d" / "train_samples.json").read_text())
    for c, wnid in enumerate(classes):
        names = sorted(p.name for p in (mini / wnid).iterdir())
        got = {f.split("/")[1] for f, y in val if f.startswith(wnid + "/")}
        assert got == _held_out_by_hand(names, 3, 0), wnid
        assert all(y == c for f, y in val + train if f.startswith(wnid + "/"))
    assert len(val) == 45 and len(train) == 15 * 5 and not set(f for f, _ in val) & set(f for f, _ in train)
    # another seed, another split; a small class gives at most half; another class's images never move it
    other = tmp_path / "other"
    shutil.copytree(mini, other)
    a, b = classes[0], classes[1]
    for p in sorted((other / a).iterdir())[3:]:
        p.unlink()                                        # class a: 3 images -> 1 held out
    shutil.copy(other / b / sorted(os.listdir(other / b))[0], other / b / f"{b}_999.JPEG")
    d2 = _check(other, out=tmp_path / "d2")
    val2 = json.loads((tmp_path / "d2" / "val_samples.json").read_text())
    assert len([f for f, _ in val2 if f.startswith(a + "/")]) == 1
    assert {f for f, _ in val2 if f.startswith(classes[2] + "/")} == {f for f, _ in val if f.startswith(classes[2] + "/")}
    assert d2.record["val_split"]["classes_with_fewer"] == 1
    d3 = _check(mini, {"subset_seed": 1}, out=tmp_path / "d3")
    assert json.loads((tmp_path / "d3" / "val_samples.json").read_text()) != val and d3.n_val == 45


def test_data_check_named_errors(mini, tmp_path):
    """Packed class archives (with the unpack command), the release's parent folder, a train/val layout,
    an empty class folder, an undecodable image (named; --skip-bad-images drops and counts it)."""
    parent = mini.parent
    with pytest.raises(DatasetError, match="winter21_whole"):
        _check(parent)
    packed = tmp_path / "packed"
    shutil.copytree(mini, packed)
    wnid = sorted(d.name for d in packed.iterdir() if d.is_dir())[4]
    shutil.make_archive(str(packed / wnid), "tar", packed / wnid)
    shutil.rmtree(packed / wnid)
    with pytest.raises(DatasetError, match=rf"still packed.*{wnid}\.tar.*tar -xf"):
        _check(packed)
    for bad_name, expect in (("train", "ImageNet-21K-P"), ("misc", "not WordNet ids")):
        root = tmp_path / f"layout-{bad_name}"
        shutil.copytree(mini, root)
        (root / bad_name).mkdir()
        with pytest.raises(DatasetError, match=expect):
            _check(root)
    empty = tmp_path / "empty"
    shutil.copytree(mini, empty)
    (empty / "n00000001").mkdir()
    with pytest.raises(DatasetError, match="n00000001: class folder without images"):
        _check(empty)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(mini, corrupt)
    victim = sorted((corrupt / wnid).iterdir())[0]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DatasetError, match=victim.name):
        _check(corrupt)
    data = _check(corrupt, skip=True)
    assert data.record["skipped_bad_images"] == 1 and data.n_train + data.n_val == 15 * 8 - 1


def test_evaluate_scores_hand_made_predictions(mini, tmp_path):
    """A run's held-out list and a predictions CSV written here: 2 of 6 right at top-1 and 4 of 6 in the
    top 5, by construction; the label comes from the file's folder. Missing list: a named error."""
    run = tmp_path / "run"
    _check(mini, out=run / "data")
    classes = sorted(d.name for d in mini.iterdir() if d.is_dir())
    val = json.loads((run / "data" / "val_samples.json").read_text())[:6]
    (run / "data" / "val_samples.json").write_text(json.dumps(val))
    rows = ["file,top5,scores"]
    for i, (f, _) in enumerate(val):
        y = classes.index(f.split("/")[0])
        others = [c for c in range(15) if c != y]
        top = ([y] + others[:4] if i < 2 else others[:2] + [y] + others[2:4] if i < 4 else others[:5])
        rows.append(f"{f},{' '.join(map(str, top))},{' '.join(['0.2'] * 5)}")
    (run / "predictions").mkdir()
    (run / "predictions" / "val_predictions.csv").write_text("\n".join(rows) + "\n")
    assert TASK.evaluate(run / "predictions", mini) == {"top1": 2 / 6, "top5": 4 / 6}
    (run / "data" / "val_samples.json").unlink()
    with pytest.raises(PredictionsError, match="val_samples.json"):
        TASK.evaluate(run / "predictions", mini)


# ------------------------------------------------------------- the two stages, real runs
@pytest.mark.smoke_runs(("in1k-cls", 0), ("in1k-cls", 1))
def test_two_stage_smoke_names_both_and_starts_from_the_stage(smoke_runs):
    """`fourm-eval run in1k-cls --profile smoke` (the gate's runs): the in21k-cls smoke ran first in
    WORK_DIR/stage-in21k-cls and finished; the ImageNet-1K stage loaded every tensor of its final
    checkpoint but the 15-way head; one record names both (stage task, profile, cell, metrics, record hash); the two
    seeds are one cell (the stage's settings, not its weights, key it); the stage's predictions
    re-score exactly; the same command again finds both stages finished."""
    import torch

    r0, r1 = smoke_runs.get("in1k-cls", 0), smoke_runs.get("in1k-cls", 1)
    rec = r0.record
    init = rec["provenance"]["init_from"]
    st = init["stage"]
    stage_dir = r0.work_dir / "stage-in21k-cls"
    srec = json.loads((stage_dir / "result.json").read_text())
    assert (st["task"], st["profile"], st["work_dir"]) == ("in21k-cls", "smoke", "stage-in21k-cls")
    assert srec["task"] == "in21k-cls" and srec["dataset"]["num_classes"] == 15 and srec["seed"] == rec["seed"]
    assert st["metrics"] == srec["metrics"] and st["cell"] == identity(srec)["cell"]
    assert st["record_sha256"] == hashlib.sha256((stage_dir / "result.json").read_bytes()).hexdigest()
    final = stage_dir / f"iter_{srec['config']['schedule_resolved']['max_iters']}.pth"
    assert init["checkpoint"] == str(final) and init["sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    sd = torch.load(final, map_location="cpu", weights_only=False)["state_dict"]
    assert init["shape_mismatch"] == ["head.1.bias", "head.1.weight"]
    assert init["loaded_tensors"] == len(sd) - 2 and init["not_in_model"] == [] and init["not_in_source"] == []
    assert srec["metrics"]["top1"] >= 2 * srec["metrics_step0"]["top1"]
    assert "pre-stage" in r0.proc.stdout and "stage 2 of 2" in r0.proc.stdout
    # one cell for both seeds; the stage weights differ
    assert identity(rec)["cell"] == identity(r1.record)["cell"]
    assert r1.record["provenance"]["init_from"]["sha256"] != init["sha256"]
    # the stage's predictions re-score exactly from the files
    ev = run_cli(["evaluate", "in21k-cls", "--predictions", str(stage_dir / "predictions"), "--data-root",
                  srec["dataset"]["root"], "--out", str(r0.base / "stage-rescored.json")], r0.base)
    assert ev.returncode == 0, ev.stderr[-2000:]
    got = json.loads((r0.base / "stage-rescored.json").read_text())["metrics"]
    assert got == {k: srec["metrics"][k] for k in ("top1", "top5")}
    # the same command again: both stages found finished, nothing rerun
    before = (stage_dir / "result.json").stat().st_mtime_ns
    again = run_cli(["run", "in1k-cls", "--profile", "smoke", "--seed", "0", "--work-dir", str(r0.work_dir)], r0.base)
    assert again.returncode == 0 and "already holds a finished run" in again.stdout
    assert (stage_dir / "result.json").stat().st_mtime_ns == before


def test_stage_data_root_required_and_dry_run_shows_both(tmp_path):
    """With a data root for ImageNet-1K, the ImageNet-21K stage's data must be given (never the mini
    set silently); --dry-run prints both stages and their learning rates."""
    from fourm_eval.data.imagenet_mini import make_mini_imagenet
    root = make_mini_imagenet(tmp_path / "in1k", n_train_per_class=2, n_val_per_class=1)
    r = run_cli(["run", "in1k-cls", "--profile", "paper", "--data-root", str(root), "--dry-run"], tmp_path)
    assert r.returncode == 2 and "--stage-data-root" in r.stderr and "in21k-cls" in r.stderr
    stage_root = make_mini_imagenet21k(tmp_path / "in21k", n_per_class=4)
    r = run_cli(["run", "in1k-cls", "--profile", "paper", "--data-root", str(root), "--stage-data-root",
                 str(stage_root), "--dry-run"], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    i1, i2 = out.index("stage 1 of 2: in21k-cls --profile 4m-21"), out.index("stage 2 of 2: in1k-cls")
    # stage 1: batch 4096, betas (0.9, 0.95), RRC (0.5, 1); stage 2: batch 1024
    assert "total batch 4096" in out[i1:i2] and "betas = [0.9, 0.95]" in out[i1:i2]
    assert "augment.rrc_scale = [0.5, 1.0]" in out[i1:i2]
    assert "total batch 1024" in out[i2:] and "pre_stage.task = in21k-cls" in out[i2:]
    assert str(stage_root) in out[i1:i2] and str(root) in out[i2:]



def test_a_second_check_decodes_nothing_and_a_touched_image_is_decoded_again(tmp_path, monkeypatch):
    """The image-decode cache of the data check: a second check of the unchanged dataset opens no image
    (PIL's open made to fail proves it) and says so on the console; an image rewritten since is decoded
    again, and a broken one is still the named error."""
    import PIL.Image

    from fourm_eval.data.checks import image_check_cache

    monkeypatch.setenv("FOURM_EVAL_CACHE", str(tmp_path / "cache"))
    root = make_mini_imagenet21k(tmp_path / "w", n_per_class=4)
    with image_check_cache(root) as first:
        _check(root, {"val_per_class": 1})
    assert (first.decoded, first.cached) == (60, 0) and first.file.is_file()
    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded again")))
        with image_check_cache(root) as second:
            _check(root, {"val_per_class": 1})
    assert (second.decoded, second.cached) == (0, 60)
    r = run_cli(["data", "check", "in21k-cls", str(root)], tmp_path)
    assert r.returncode == 0 and "0 image(s) decoded, 60 of 60 unchanged since an earlier check" in r.stdout, r.stdout
    victim = sorted((root / sorted(d for d in os.listdir(root) if d.startswith("n"))[0]).iterdir())[0]
    good = victim.read_bytes()
    victim.write_bytes(b"\xff\xd8 not a jpeg any more")
    with image_check_cache(root) as third, pytest.raises(DatasetError, match=victim.name):
        _check(root, {"val_per_class": 1})
    assert third.decoded == 1
    victim.write_bytes(good)
    with image_check_cache(root) as fourth:
        _check(root, {"val_per_class": 1})
    assert (fourth.decoded, fourth.cached) == (1, 59)
