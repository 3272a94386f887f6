"""in1k-cls: top-k metric, mixup targets, data checks, predictions CSV, linear probe, and real smoke runs."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fourm_eval.data.checks import DatasetError
from fourm_eval.errors import PredictionsError
from fourm_eval.data.imagenet_mini import SHAPES, make_mini_imagenet, mini_wnids
from fourm_eval.tasks import get_task
from fourm_eval.tasks import in1k_cls as T
from fourm_eval.tasks.kits import classification_model as CM
from fourm_eval.tasks.kits.classification import PRED_FILE, topk_accuracy

from cli_runner import run_cli as _run
TASK = get_task("in1k-cls")


# ------------------------------------------------------------------ metric
def test_topk_against_hand_computation():
    # 4 images, 6 classes; probabilities chosen so the ranking is clear by eye
    probs = torch.tensor([[0.05, 0.50, 0.20, 0.10, 0.10, 0.05],    # label 1: top-1 hit
                          [0.30, 0.05, 0.25, 0.20, 0.15, 0.05],    # label 4: rank 4 -> top-5 hit only
                          [0.01, 0.02, 0.03, 0.04, 0.05, 0.85],    # label 0: rank 6 -> miss
                          [0.10, 0.10, 0.60, 0.05, 0.05, 0.10]])   # label 2: top-1 hit
    labels = [1, 4, 0, 2]
    # by hand: top-1 hits images 0 and 3 (2/4); top-5 hits images 0, 1, 3 (3/4)
    m = CM.FourmTopKMetric(num_classes=6)
    m.process({}, [{"file": f"val/x/{i}.JPEG", "label": y, "probs": p} for i, (p, y) in enumerate(zip(probs, labels))])
    assert m.compute_metrics(m.results) == {"top1": 0.5, "top5": 0.75}
    assert topk_accuracy([[1, 2, 3, 4, 0], [0, 2, 3, 4, 1], [5, 4, 3, 2, 1]], [1, 4, 0]) == {"top1": 1 / 3,
                                                                                           "top5": 2 / 3}


def test_topk_with_fewer_than_five_classes():
    """With 3 classes every image's top-5 holds its label (top-5 = 1), top-1 by hand."""
    m = CM.FourmTopKMetric(num_classes=3)
    probs = torch.tensor([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    m.process({}, [{"file": "a", "label": 1, "probs": probs[0]}, {"file": "b", "label": 2, "probs": probs[1]}])
    assert m.compute_metrics(m.results) == {"top1": 0.5, "top5": 1.0}


# ------------------------------------------------------------------- mixup
@pytest.mark.parametrize("mix", [dict(mixup=0.1, cutmix=0.0), dict(mixup=0.0, cutmix=1.0),
                                 dict(mixup=0.1, cutmix=1.0)])
def test_mixup_cutmix_targets_sum_to_one(mix):
    from fourm_eval.tasks.profiles import load_profile
    p = load_profile("in1k-cls", "paper")
    p["augment"].update(mix)
    cfg = T.build_model_cfg(p, dict(name="4m-tiny"), num_classes=7)
    TASK.register_mm()
    from mmengine.registry import MODELS
    model = MODELS.build(cfg)
    assert model._mixup is not None
    np.random.seed(0)
    x = torch.rand(8, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    for _ in range(5):
        xm, target = model._mixup(x.clone(), y)
        assert target.shape == (8, 7)
        assert torch.allclose(target.sum(1), torch.ones(8), atol=1e-6)
        assert (target >= 0).all()
        # label smoothing 0.1 over 7 classes: no target is one-hot
        assert target.max() <= 1 - 0.1 + 0.1 / 7 + 1e-6
        assert xm.shape == x.shape


# -------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def small_mini(tmp_path_factory):
    return make_mini_imagenet(tmp_path_factory.mktemp("in1k") / "mini", n_train_per_class=5, n_val_per_class=4,
                              seed=2)


def _copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_mini_is_deterministic_sorted_and_holds_odd_files(small_mini, tmp_path):
    again = make_mini_imagenet(tmp_path / "again", n_train_per_class=5, n_val_per_class=4, seed=2)

    def digest(root):
        h = hashlib.sha256()
        for f in sorted(root.rglob("*")):
            if f.is_file():
                h.update(str(f.relative_to(root)).encode() + f.read_bytes())
        return h.hexdigest()
    assert digest(small_mini) == digest(again)
    wnids = mini_wnids(2)
    assert wnids != sorted(wnids), "generation order should differ from the sorted class order"
    data = TASK.check_data(small_mini, {"subset_seed": 0}, skip_bad_images=False, out_dir=tmp_path / "d",
                           log=lambda _: None)
    assert data.record["classes"] == sorted(wnids) and data.n_train == 50 and data.n_val == 40
    # class index = position of the wnid in sorted order, whatever order the generator used
    samples = json.loads((tmp_path / "d" / "train_samples.json").read_text())
    for rel, label in samples:
        assert rel.split("/")[1] == sorted(wnids)[label]
    # the grayscale, CMYK and PNG-named-.JPEG files decode to 3-channel images
    from PIL import Image
    modes = {}
    for f in small_mini.rglob("*.JPEG"):
        with Image.open(f) as im:
            modes.setdefault((im.format, im.mode), f)
    assert {("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")} <= set(modes)
    ds = CM.FourmImageFolder(str(small_mini), str(tmp_path / "d" / "train_samples.json"),
                             T.transform_cfg({"image_size": 32, "eval_crop_pct": 0.875, "interpolation": "bicubic",
                                              "augment": {}}, False))
    index = {rel: i for i, (rel, _) in enumerate(ds.samples)}
    for key in (("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGB")):
        rel = str(modes[key].relative_to(small_mini))
        if rel in index:
            assert ds[index[rel]]["inputs"].shape == (3, 32, 32)
    assert len(SHAPES) * 2 == len(wnids)


def test_data_check_named_errors(small_mini, tmp_path):
    log = lambda _: None  # noqa: E731
    wnids = sorted(mini_wnids(2))
    # a val class that train does not have
    r = _copy(small_mini, tmp_path / "a")
    (r / "val" / wnids[0]).rename(r / "val" / "n99999999")
    with pytest.raises(DatasetError, match="n99999999.*not classes of train"):
        TASK.check_data(r, {}, skip_bad_images=False, out_dir=None, log=log)
    # an empty class folder
    r = _copy(small_mini, tmp_path / "b")
    for f in (r / "train" / wnids[3]).iterdir():
        f.unlink()
    with pytest.raises(DatasetError, match=f"{wnids[3]}: class folder without images"):
        TASK.check_data(r, {}, skip_bad_images=False, out_dir=None, log=log)
    # val delivered flat (before re-foldering)
    r = _copy(small_mini, tmp_path / "c")
    f = next((r / "val" / wnids[1]).iterdir())
    f.rename(r / "val" / f.name)
    with pytest.raises(DatasetError, match="directly in val/.*re-foldering"):
        TASK.check_data(r, {}, skip_bad_images=False, out_dir=None, log=log)
    # no train folder
    with pytest.raises(DatasetError, match="train: folder not found"):
        TASK.check_data(tmp_path / "nothing", {}, skip_bad_images=False, out_dir=None, log=log)
    # an undecodable image: named, or skipped and counted
    r = _copy(small_mini, tmp_path / "d")
    bad = sorted((r / "train" / wnids[2]).iterdir())[0]
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=bad.name):
        TASK.check_data(r, {}, skip_bad_images=False, out_dir=None, log=log)
    data = TASK.check_data(r, {}, skip_bad_images=True, out_dir=tmp_path / "dd", log=log)
    assert data.n_train == 49 and data.record["skipped_bad_images"] == 1


# ------------------------------------------------------------- predictions
def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_predictions_are_named_errors(small_mini, tmp_path):
    classes = sorted(mini_wnids(2))
    vals = sorted(str(f.relative_to(small_mini)) for f in (small_mini / "val").rglob("*.JPEG"))
    good = []
    for v in vals:  # a correct file: the true class first, then four others
        y = classes.index(v.split("/")[1])
        top = [y] + [c for c in range(10) if c != y][:4]
        good.append(f"{v},{' '.join(map(str, top))},0.5 0.2 0.1 0.1 0.1")
    ok = TASK.evaluate(_write(tmp_path / "ok.csv", ["file,top5,scores"] + good), small_mini)
    assert ok == {"top1": 1.0, "top5": 1.0}
    cases = {
        "header": (["f,t,s"] + good, "header"),
        "fields": (["file,top5,scores", good[0] + ",extra"] + good[1:], "expected 3 fields"),
        "index": (["file,top5,scores", f"{vals[0]},a b c d e,0.1 0.1 0.1 0.1 0.1"] + good[1:], "class indices"),
        "range": (["file,top5,scores", f"{vals[0]},10 1 2 3 4,0.1 0.1 0.1 0.1 0.1"] + good[1:], "out of range"),
        "repeat": (["file,top5,scores", f"{vals[0]},1 1 2 3 4,0.1 0.1 0.1 0.1 0.1"] + good[1:], "repeats"),
        "short": (["file,top5,scores", f"{vals[0]},1 2,0.1 0.1"] + good[1:], "top-5 needs 5"),
        "scores": (["file,top5,scores", f"{vals[0]},0 1 2 3 4,0.1 0.1"] + good[1:], "2 scores for 5"),
        "dup": (["file,top5,scores"] + good + [good[0]], "appears twice"),
        "missing": (["file,top5,scores"] + good[1:], "no prediction for 1 of 40"),
        "extra": (["file,top5,scores"] + good + ["val/n1/x.JPEG,0 1 2 3 4,0.1 0.1 0.1 0.1 0.1"], "not validation"),
    }
    for name, (lines, msg) in cases.items():
        path = _write(tmp_path / f"{name}.csv", lines)
        with pytest.raises(PredictionsError, match=msg):
            TASK.evaluate(path, small_mini)
    with pytest.raises(PredictionsError, match="not found"):
        TASK.evaluate(tmp_path / "absent.csv", small_mini)
    # the CLI prints the named error without a traceback
    r = _run(["evaluate", "in1k-cls", "--predictions", str(tmp_path / "dup.csv"), "--data-root", str(small_mini)],
             tmp_path)
    assert r.returncode == 2 and "appears twice" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------ linear probe
def test_linear_probe_leaves_backbone_bit_identical_and_in_eval_mode():
    """A few real optimiser steps (the runner's optimiser constructor) train only the head."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS

    from fourm_eval.tasks.profiles import load_profile, resolve_per_size
    TASK.register_mm()
    p = resolve_per_size(load_profile("in1k-cls", "linear-smoke"), "tiny")
    model = MODELS.build(T.build_model_cfg(p, dict(name="4m-tiny", drop_path_rate=0.1), num_classes=5))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head[1].weight.clone()
    ow = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.5, momentum=0.9,
                                                                             weight_decay=0.1),
                                         constructor="LayerDecayOptimWrapperConstructor",
                                         paramwise_cfg=dict(layer_decay_rate=0.5, backbone_attr="backbone.net")))
    assert all(id(q) not in {id(b) for b in model.backbone.parameters()}
               for g in ow.optimizer.param_groups for q in g["params"])
    model.train()
    assert model.head.training and not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    for i in range(3):
        batch = {"inputs": list(torch.randn(4, 3, 32, 32)), "label": [0, 1, 2, 3], "file": list("abcd")}
        model.train_step(batch, ow)
    after = model.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head[1].weight)
    assert model.head[0].running_mean.abs().sum() > 0  # BatchNorm statistics of the features were collected


# ------------------------------------------------------------ real runs
# the smoke tests use the session's shared seed-0 smoke run (tests/smoke_runs.py)
pytestmark = pytest.mark.smoke_runs(("in1k-cls", 0))


@pytest.fixture(scope="module")
def smoke_run(smoke_runs):
    """The acceptance command: built-in mini ImageNet, default tiny 4M, smoke profile."""
    run = smoke_runs.get("in1k-cls", 0)
    return run.base, run.work_dir, run.record


def test_smoke_learns_and_rescores_exactly(smoke_run):
    tmp, wd, rec = smoke_run
    top1, top1_0 = rec["metrics"]["top1"], rec["metrics_step0"]["top1"]
    chance = 1 / rec["dataset"]["num_classes"]
    assert top1 >= 3 * chance and top1 >= 2 * top1_0, (top1, top1_0)
    assert rec["dataset"]["classes"] == sorted(rec["dataset"]["classes"]) and rec["dataset"]["num_classes"] == 10
    assert rec["eval_history"][0]["iter"] == 0
    assert rec["config"]["schedule_resolved"]["decay"] == "cosine"
    # one row per val image, then an exact re-score from the file alone
    rows = (wd / "predictions" / PRED_FILE).read_text().splitlines()
    assert rows[0] == "file,top5,scores" and len(rows) == 1 + rec["dataset"]["n_val_images"]
    ev = _run(["evaluate", "in1k-cls", "--predictions", str(wd / "predictions"), "--data-root",
               rec["dataset"]["root"], "--out", str(tmp / "rescored.json")], tmp)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp / "rescored.json").read_text())["metrics"] == {k: rec["metrics"][k] for k in ("top1", "top5")}
    # the report shows an ImageNet-1K column beside the published numbers
    r = _run(["report", str(wd), "--out", str(tmp / "report")], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp / "report" / "report.md").read_text()
    assert "in1k-cls top1" in md and f"{top1 * 100:.1f}" in md


def test_init_from_starts_from_the_final_weights(smoke_run):
    """--init-from: the new run's step-0 evaluation is the source run's final one (same weights, same
    evaluation), and the source is in the record's provenance."""
    tmp, wd, rec = smoke_run
    short = ["--set", "schedule.length=2", "--set", "schedule.val_interval=2", "--set", "schedule.warmup_epochs=0"]
    # the smoke profile runs the in21k-cls stage first: another run stands in for it only if it is one
    wrong = _run(["run", "in1k-cls", "--profile", "smoke", "--init-from", str(wd), "--work-dir", str(tmp / "w")], tmp)
    assert wrong.returncode == 2 and "pre_stage is in21k-cls / smoke" in wrong.stderr, wrong.stderr[-2000:]
    r = _run(["run", "in1k-cls", "--profile", "smoke", "--init-from", str(wd), "--work-dir", str(tmp / "chained"),
              "--set", "pre_stage=null", *short], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec2 = json.loads((tmp / "chained" / "result.json").read_text())
    assert any("--set removed it" in w and "not protocol 4m-21's" in w for w in rec2["warnings"]), rec2["warnings"]
    assert "pre_stage" not in rec2["config"] and "stage" not in rec2["provenance"]["init_from"]
    assert rec2["metrics_step0"] == {k: rec["metrics"][k] for k in rec2["metrics_step0"]}
    src = rec2["provenance"]["init_from"]
    assert src["run_dir"] == str(wd) and src["checkpoint"].endswith(
        f"iter_{rec['config']['schedule_resolved']['max_iters']}.pth") and len(src["sha256"]) == 64
    assert src["loaded_tensors"] > 0 and src["shape_mismatch"] == []
    # a finished run of the stage stands in for it: nothing of the stage reruns, the record names it
    r = _run(["run", "in1k-cls", "--profile", "smoke", "--init-from", str(wd / "stage-in21k-cls"),
              "--work-dir", str(tmp / "from-stage"), *short], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    st = json.loads((tmp / "from-stage" / "result.json").read_text())["provenance"]["init_from"]["stage"]
    assert st["cell"] == rec["provenance"]["init_from"]["stage"]["cell"] and not (tmp / "from-stage" / "stage-in21k-cls").exists()
    # not a finished run: a named error
    bad = _run(["run", "in1k-cls", "--init-from", str(tmp), "--work-dir", str(tmp / "x")], tmp)
    assert bad.returncode == 2 and "not a finished run" in bad.stderr


def test_linear_smoke_run_keeps_the_checkpoint_backbone(tmp_path):
    """The linear-probe smoke profile end to end: the final checkpoint's backbone equals the 4M file."""
    from fourm_eval.backbones import build_backbone
    # a third of the profile's 300 iterations (CI time): enough for the probe to beat its step 0
    r = _run(["run", "in1k-cls", "--profile", "linear-smoke", "--set", "schedule.length=100",
              "--work-dir", str(tmp_path / "lin")], tmp_path, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "lin" / "result.json").read_text())
    assert rec["config"]["mode"] == "linear" and rec["metrics"]["top1"] > rec["metrics_step0"]["top1"]
    sd = torch.load(tmp_path / "lin" / f"iter_{rec['config']['schedule_resolved']['max_iters']}.pth",
                    map_location="cpu", weights_only=False)["state_dict"]
    ref = build_backbone("4m", checkpoint=rec["backbone"]["checkpoint"]).state_dict()
    got = {k.removeprefix("backbone.net."): v for k, v in sd.items() if k.startswith("backbone.net.")}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_ema_follows_timm_rule_and_is_evaluated():
    """With ema.enabled the EMA copy is never in the optimiser, moves by its decay after each step
    (timm ModelEmaV3: the first updates copy the weights, then ema = d * ema + (1 - d) * model), and
    the prediction carries both the model's and the EMA's probabilities."""
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import MODELS

    from fourm_eval.tasks.profiles import load_profile, resolve_per_size
    TASK.register_mm()
    p = resolve_per_size(load_profile("in1k-cls", "smoke"), "tiny")
    p["ema"] = {"enabled": True, "decay": 0.5, "warmup": False}
    model = MODELS.build(T.build_model_cfg(p, dict(name="4m-tiny"), num_classes=4))
    ow = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-2),
                                         constructor="LayerDecayOptimWrapperConstructor",
                                         paramwise_cfg=dict(layer_decay_rate=0.9, backbone_attr="backbone.net")))
    ema_ids = {id(q) for q in model.ema.parameters()}
    assert not any(id(q) in ema_ids for g in ow.optimizer.param_groups for q in g["params"])
    model.train()
    batch = {"inputs": list(torch.randn(4, 3, 32, 32)), "label": [0, 1, 2, 3], "file": list("abcd")}
    for _ in range(2):
        model.train_step(batch, ow)
    assert torch.equal(model.ema.module["head"][1].weight, model.head[1].weight)
    prev = model.ema.module["head"][1].weight.clone()
    model.train_step(batch, ow)
    assert not torch.equal(prev, model.head[1].weight)
    assert torch.allclose(model.ema.module["head"][1].weight, 0.5 * prev + 0.5 * model.head[1].weight, atol=1e-7)
    model.eval()
    out = model.val_step(batch)
    assert out[0]["probs"].shape == (4,) and out[0]["probs_ema"].shape == (4,)
    assert torch.allclose(out[0]["probs_ema"].sum(), torch.tensor(1.0))
