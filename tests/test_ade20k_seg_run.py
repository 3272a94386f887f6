"""`fourm-eval run ade20k-seg` end to end on generated data: the smoke acceptance (learning,
re-scoring, report), the UperNet head, the baselines, and the cosine schedule."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fourm_eval.data.ade_mini import make_mini_ade20k

from cli_runner import run_cli as _run
# a few-second configuration of the real pipeline
QUICK = ["--set", "image_size=64", "--set", "batch_size=2", "--set", "schedule.length=3", "--set", "schedule.val_interval=3",
         "--set", "schedule.checkpoint_interval=3", "--set", "log_interval=1", "--set", "eval_at_start=false",
         "--set", "val_subset=3"]


@pytest.fixture(scope="module")
def tiny_ade(tmp_path_factory):
    return make_mini_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016", n_train=6, n_val=4, seed=3)


# the smoke tests use the session's shared seed-0 smoke run (tests/smoke_runs.py)
pytestmark = pytest.mark.smoke_runs(("ade20k-seg", 0))


@pytest.fixture(scope="module")
def smoke_run(smoke_runs):
    """The acceptance command: default smoke profile, built-in mini ADE20K, default 4M."""
    run = smoke_runs.get("ade20k-seg", 0)
    return run.base, run.work_dir, run.record


def test_smoke_profile_learns(smoke_run):
    _, wd, rec = smoke_run
    miou, miou0 = rec["metrics"]["mIoU"], rec["metrics_step0"]["mIoU"]
    assert miou >= 0.2 and miou >= 2 * miou0, (miou, miou0)
    assert 0 <= rec["metrics"]["aAcc"] <= 1 and 0 <= rec["metrics"]["mAcc"] <= 1
    assert rec["status"] == "complete" and rec["config"]["head"] == "convnext"
    assert rec["backbone"]["options"] == {"out_indices": [3], "final_norm": True}  # the smoke inherits the paper's
    assert rec["config"]["protocol"] == "multimae" and rec["config"]["test_procedure"] == "single"
    assert rec["eval_history"][0]["iter"] == 0 and rec["eval_history"][-1]["iter"] == rec["config"]["schedule"]["length"]
    assert rec["dataset"]["classes_present"]["val"] and len(rec["dataset"]["classes"]) == 150


def test_smoke_predictions_are_ade20k_pngs_and_rescore_exactly(smoke_run):
    """multimae's scoring: each prediction is stored at the size the single pass scores (long side 128, the
    other side round(side x 128 / long side), albumentations' rule), and meta.json names that scoring."""
    tmp, wd, rec = smoke_run
    root = Path(rec["dataset"]["root"])
    pred = wd / "predictions"
    vals = sorted((root / "images" / "validation").iterdir())
    assert sorted(p.stem for p in pred.glob("*.png")) == [p.stem for p in vals]
    assert json.loads((pred / "meta.json").read_text())["scoring"] == {"procedure": "long-side", "size": 128}
    for img in vals[:5]:
        p = Image.open(pred / f"{img.stem}.png")
        a = np.asarray(p)
        w, h = Image.open(img).size
        want = (128, round(h * 128 / w)) if w >= h else (round(w * 128 / h), 128)
        assert p.mode == "L" and p.size == want and a.min() >= 1 and a.max() <= 150
    ev = _run(["evaluate", "ade20k-seg", "--predictions", str(pred), "--data-root", str(root),
               "--out", str(tmp / "rescored.json")], tmp)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp / "rescored.json").read_text())["metrics"] == rec["metrics"]


def test_smoke_report_and_rerun(smoke_run):
    tmp, wd, rec = smoke_run
    r = _run(["report", str(wd), "--out", str(tmp / "report")], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp / "report" / "report.md").read_text()
    assert f"| {rec['metrics']['mIoU'] * 100:.1f} (n=1) |" in md and "ade20k-seg" in md
    r2 = _run(["run", "ade20k-seg", "--profile", "smoke", "--work-dir", str(wd)], tmp)
    assert r2.returncode == 0 and "already holds a finished run" in r2.stdout


def test_mae_upernet_protocol_smoke_with_a_rectangular_crop_runs_and_rescores(tmp_path, tiny_ade):
    """The mae-upernet protocol's smoke profile (UperNet on four blocks, mmseg's scale jitter and photometric
    distortion, warm-up from 1e-6 then poly, sliding windows scored at the original size), here with a
    non-square crop (32 x 64: a 2 x 4 token grid, sliding windows of that shape) and a poly power given by --set."""
    r = _run(["run", "ade20k-seg", "--profile", "mae-upernet-smoke", "--data-root", str(tiny_ade), *QUICK,
              "--set", "upernet.channels=32", "--set", "upernet.aux_channels=16", "--set", "image_size=[32,64]",
              "--set", "test_scale=[256,64]", "--set", "slide_stride=21", "--set", "schedule.poly_power=0.9",
              "--set", "schedule.warmup_iters=1", "--work-dir", str(tmp_path / "u")], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "u" / "result.json").read_text())
    assert rec["config"]["protocol"] == "mae-upernet" and rec["profile"] == "mae-upernet-smoke"
    assert rec["config"]["head"] == "upernet" and rec["backbone"]["options"]["out_indices"] == [0, 1, 2, 3]
    assert rec["config"]["image_size"] == [32, 64]
    assert rec["config"]["schedule_resolved"]["decay"] == "poly" and rec["config"]["schedule_resolved"]["poly_power"] == 0.9
    from mmengine.config import Config
    cfg = Config.fromfile(next((tmp_path / "u").glob("2*.py")))  # the run's full mmengine config
    assert tuple(cfg.model.test_cfg.crop_size) == tuple(cfg.model.data_preprocessor.size) == (32, 64)
    assert cfg.model.test_cfg.mode == "slide" and tuple(cfg.model.test_cfg.stride) == (21, 21)
    assert [(c.type, c.get("power"), c.get("start_factor")) for c in cfg.param_scheduler] == [
        ("LinearLR", None, 1e-6), ("PolyLR", 0.9, None)]
    train_types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
    assert "PhotoMetricDistortion" in train_types and "FourmColorJitter" not in train_types
    assert [t.scale for t in cfg.train_dataloader.dataset.pipeline if t.type == "RandomResize"] == [(512, 128)]
    assert rec["dataset"]["subsets"]["val"]["n"] == 3
    meta = json.loads((tmp_path / "u" / "predictions" / "meta.json").read_text())
    assert meta["scoring"] == {"procedure": "original"}
    from fourm_eval.tasks import get_task
    note = get_task("ade20k-seg").footnote(rec)  # the kit's footnote says what ran
    assert "UperNet" in note and ", poly decay;" in note and "sliding window 32 x 64 / stride 21" in note, note
    assert "photometric distortion" in note, note
    ev = _run(["evaluate", "ade20k-seg", "--predictions", str(tmp_path / "u" / "predictions"), "--data-root",
               str(tiny_ade), "--out", str(tmp_path / "e.json")], tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "e.json").read_text())["metrics"] == rec["metrics"]


# one baseline per task, built as `run --backbone deit3 --random-init` builds it (the command itself runs a
# baseline end to end in test_coco_det_run.py; test_baselines.py loads both baselines' released layouts)
def test_a_baseline_builds_into_the_upernet_model(tmp_path, tiny_ade):
    import torch

    from task_context import build_task_model

    model, groups = build_task_model("ade20k-seg", tiny_ade, "deit3-b", tmp_path, {"image_size": 64})
    assert model.backbone.net.name == "deit3-b" and model.backbone.out_indices == [11]
    assert {g["layer_id"] for g in groups} == set(range(14))  # the 12 ViT blocks, embeddings, the head
    with torch.no_grad():
        feats = model.extract_feat(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(768, 4, 4)]  # ViT-B's last block as a 64/16 px map


def test_missing_dataset_is_a_clear_error(tmp_path):
    (tmp_path / "empty" / "images" / "training").mkdir(parents=True)
    r = _run(["run", "ade20k-seg", "--data-root", str(tmp_path / "empty"), "--work-dir", str(tmp_path / "x")],
             tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 2 and "annotation folder not found" in out and "Traceback" not in out


def test_cosine_schedule_with_a_warmup_epoch():
    """The profile's schedule: 1 warm-up epoch (at the run's batch), then cosine to 0 at the end."""
    from fourm_eval.errors import ConfigError
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import load_profile, resolve_per_size
    from fourm_eval.tasks.runner import runner_cfg, schedule

    p = resolve_per_size(load_profile("ade20k-seg", "paper"), "b")
    s = schedule(p, n_train=20210, world=8)
    assert s["max_iters"] == round(64 * 20210 / 64) and s["warmup"] == round(20210 / 64) and s["decay"] == "cosine"
    cfg = runner_cfg(get_task("ade20k-seg"), p, dict(model={}, train_dataset={}, val_dataset={}, val_evaluator={}),
                     sched=s, work_dir=Path("/tmp/x"), seed=0, launcher="none")
    warm, cos = cfg["param_scheduler"]
    assert warm["type"] == "LinearLR" and warm["end"] == s["warmup"]
    assert cos == dict(type="CosineAnnealingLR", by_epoch=False, begin=s["warmup"], end=s["max_iters"], eta_min_ratio=0.0)
    p["schedule"]["warmup_iters"] = 5
    with pytest.raises(ConfigError, match="not both"):
        schedule(p, n_train=100, world=1)


def test_poly_schedule_follows_mmsegs_formula():
    """decay: poly (mmseg's standard): after the warm-up, lr x (1 - t / T)^power, stepped by mmengine's own
    schedulers built from the runner's config; poly_power only with poly; milestones only with step."""
    import copy

    import torch
    from mmengine.optim import OptimWrapper
    from mmengine.registry import PARAM_SCHEDULERS

    from fourm_eval.errors import ConfigError
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.profiles import apply_overrides, load_profile, resolve_per_size
    from fourm_eval.tasks.runner import runner_cfg, schedule

    p = resolve_per_size(apply_overrides(load_profile("ade20k-seg", "smoke"), ["schedule.decay=poly"]), "tiny")
    p["schedule"].pop("warmup_epochs", None)
    p["schedule"].update(warmup_iters=10, length=50, poly_power=0.9)
    s = schedule(p, n_train=100, world=1)
    assert s["decay"] == "poly" and s["poly_power"] == 0.9 and s["warmup"] == 10
    cfg = runner_cfg(get_task("ade20k-seg"), p, dict(model={}, train_dataset={}, val_dataset={}, val_evaluator={}),
                     sched=s, work_dir=Path("/tmp/x"), seed=0, launcher="none")
    assert [c["type"] for c in cfg["param_scheduler"]] == ["LinearLR", "PolyLR"]
    lr0 = float(p["lr"])
    opt = OptimWrapper(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr0))
    scheds = [PARAM_SCHEDULERS.build({**copy.deepcopy(c), "optimizer": opt}) for c in cfg["param_scheduler"]]
    lrs = []
    for _ in range(50):
        lrs.append(opt.optimizer.param_groups[0]["lr"])
        for sc in scheds:
            sc.step()
    # mmengine's PolyLR (mmseg's schedule) reaches eta_min at the last iteration of its span:
    # lr = lr0 (1 - i / (T - 1))^power, i = iterations since the warm-up, T = 40 its length
    for t in range(10, 50):
        assert lrs[t] == pytest.approx(lr0 * (1 - (t - 10) / 39) ** 0.9, rel=1e-6, abs=1e-12), t
    assert lrs[49] == 0.0
    assert lrs[0] < lr0 * 0.01
    bad = copy.deepcopy(p)
    bad["schedule"]["decay"] = "cosine"
    with pytest.raises(ConfigError, match="poly_power applies to decay 'poly' only"):
        schedule(bad, n_train=100, world=1)
