"""`fourm-eval run nyu-depth` end to end: the smoke profile (protocol multimae) learns, predictions re-score
exactly, `evaluate` names bad prediction folders, both heads and both losses run (one of them as the eigen
protocol's smoke), the baselines run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fourm_eval.data.nyu import read_depth_mm, write_depth_mm
from fourm_eval.data.nyu_mini import make_mini_nyu

from cli_runner import run_cli as _run
# a few-second configuration of the real pipeline
QUICK = ["--set", "image_size=32", "--set", "batch_size=2", "--set", "schedule.warmup_epochs=0.5",
         "--set", "schedule.length=2", "--set", "schedule.val_interval=2", "--set", "schedule.checkpoint_interval=2",
         "--set", "log_interval=1", "--set", "eval_at_start=false", "--set", "val_batch_size=2"]


# the smoke tests use the session's shared seed-0 smoke run (tests/smoke_runs.py)
pytestmark = pytest.mark.smoke_runs(("nyu-depth", 0))


@pytest.fixture(scope="module")
def smoke(smoke_runs):
    """The acceptance command as a user types it: built-in mini data, default tiny 4M, smoke profile."""
    run = smoke_runs.get("nyu-depth", 0)
    return run.base, run.work_dir, run.record, run.proc


@pytest.fixture(scope="module")
def tiny_nyu(tmp_path_factory):
    return make_mini_nyu(tmp_path_factory.mktemp("nyu"), n_train=4, n_test=2, size=(48, 64), seed=2)


def test_smoke_profile_learns(smoke):
    tmp, wd, rec, r = smoke
    m, m0 = rec["metrics"], rec["metrics_step0"]
    base = rec["dataset"]["train_median_baseline"]
    assert m["delta1"] >= m0["delta1"] + 0.1, (m["delta1"], m0["delta1"])
    assert m["delta1"] > base["metrics"]["delta1"], (m["delta1"], base)
    assert m["abs_rel"] < m0["abs_rel"] and m["abs_rel"] < base["metrics"]["abs_rel"]
    assert set(m) == {"delta1", "delta2", "delta3", "abs_rel", "rmse", "rmse_log"}  # MultiMAE's metric
    assert rec["status"] == "complete" and rec["config"]["head"] == "convnext" and rec["config"]["loss"] == "berhu"
    assert rec["config"]["protocol"] == "multimae" and rec["config"]["test_procedure"] == "center-crop"
    assert "scored as the run scores" in rec["dataset"]["train_median_baseline"]["what"]
    assert rec["config"]["schedule_resolved"]["decay"] == "cosine"
    assert rec["eval_history"][0]["iter"] == 0 and rec["eval_history"][-1]["iter"] == 400
    assert rec["dataset"]["n_val_images"] == 60 and len(rec["dataset"]["files_sha256"]) == 64
    assert "Traceback" not in r.stderr


def test_predictions_are_the_scored_crops_16bit_and_rescore_exactly(smoke):
    """multimae's scoring: each stored prediction is the centre crop the model saw (96 x 96 here), in 16-bit
    millimetres, and meta.json names the scoring `evaluate` then applies (the same numbers, bit for bit)."""
    tmp, wd, rec, _ = smoke
    root = Path(rec["dataset"]["root"])
    pred_dir = wd / rec["files"]["predictions"]
    images = sorted((root / "images" / "test").iterdir())
    assert sorted(p.name for p in pred_dir.glob("*.png")) == [p.stem + ".png" for p in images]
    # beside them, what they are: the final model's (iteration 400 of 400), and how they are scored
    assert sorted(p.name for p in pred_dir.iterdir() if p.suffix != ".png") == ["meta.json"]
    meta = json.loads((pred_dir / "meta.json").read_text())
    state = meta["evaluation"]
    assert state["iteration"] == state["max_iters"] == 400 and state["final"] and state["complete"]
    assert meta["scoring"] == {"procedure": "short-side-crop", "size": 96, "metric": "multimae", "batch": 16}
    for img in images[:5]:
        pred = read_depth_mm(pred_dir / f"{img.stem}.png")  # checks 16-bit grayscale
        assert pred.shape == (96, 96) and 500 < np.median(pred) < 9000
    ev = _run(["evaluate", "nyu-depth", "--predictions", str(pred_dir), "--data-root", str(root),
               "--out", str(tmp / "rescored.json")], tmp)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp / "rescored.json").read_text())["metrics"] == rec["metrics"]


def test_evaluate_names_bad_prediction_folders(smoke, tmp_path):
    from fourm_eval.errors import PredictionsError
    from fourm_eval.tasks import get_task

    _, wd, rec, _ = smoke
    root = Path(rec["dataset"]["root"])
    task = get_task("nyu-depth")

    def broken(how):
        d = tmp_path / how
        shutil.copytree(wd / "predictions", d)
        first = sorted(d.glob("*.png"))[0]
        if how == "missing":
            first.unlink()
        elif how == "extra":
            shutil.copy(first, d / "not_a_test_image.png")
        elif how == "8bit":
            Image.fromarray(np.full((120, 160), 3, np.uint8)).save(first)
        elif how == "size":
            write_depth_mm(first, np.full((60, 80), 3000, np.uint16))
        return d

    for how, msg in (("missing", "no prediction for 1 of the 60"), ("extra", "for no test image"),
                     ("8bit", "8-bit PNG"), ("size", r"a prediction is 96x96 \(scored by short-side-crop 96\) "
                                                     "or 160x120")):
        with pytest.raises(PredictionsError, match=msg):
            task.evaluate(broken(how), root)
    r = _run(["evaluate", "nyu-depth", "--predictions", str(tmp_path / "missing"), "--data-root", str(root)],
             tmp_path)
    assert r.returncode == 2 and "no prediction for" in r.stderr and "Traceback" not in r.stderr


def test_report_shows_the_nyu_column_and_a_finished_run_is_kept(smoke):
    tmp, wd, rec, _ = smoke
    r = _run(["report", str(wd), "--out", str(tmp / "report")], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp / "report" / "report.md").read_text()
    assert "nyu-depth delta1" in md and f"| {rec['metrics']['delta1'] * 100:.1f} (n=1) |" in md
    assert "| 4M-7 | B | CC12M |" in md and "| 92.0 |" in md  # the published NYUv2 number beside it
    r2 = _run(["run", "nyu-depth", "--profile", "smoke", "--work-dir", str(wd)], tmp)
    assert r2.returncode == 0 and "already holds a finished run" in r2.stdout


# (the multimae smoke's own convnext + berhu is the shared smoke run; DPT's multimae scoring differs from
# convnext's in nothing the runs below leave untested)
@pytest.mark.parametrize("profile,head,loss", [("eigen-smoke", "convnext", "berhu"), ("eigen-smoke", "dpt", "silog")])
def test_both_heads_and_both_losses_run(tmp_path, tiny_nyu, profile, head, loss):
    """Both heads and losses, under both protocols' smokes: eigen's predictions are full size (48 x 64)
    and scored in the Eigen crop, multimae's are the 32 px centre crop."""
    r = _run(["run", "nyu-depth", "--profile", profile, "--data-root", str(tiny_nyu), *QUICK, "--set", f"head={head}",
              "--set", f"loss={loss}", "--work-dir", str(tmp_path / "w")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / "w" / "result.json").read_text())
    assert rec["config"]["head"] == head and rec["config"]["loss"] == loss
    assert 0 <= rec["metrics"]["delta1"] <= 1 and np.isfinite(rec["metrics"]["rmse"])
    preds = sorted((tmp_path / "w" / "predictions").glob("*.png"))
    assert len(preds) == 2
    eigen = profile == "eigen-smoke"
    assert rec["config"]["protocol"] == ("eigen" if eigen else "multimae")
    assert read_depth_mm(preds[0]).shape == ((48, 64) if eigen else (32, 32))
    assert ("log10" in rec["metrics"]) == eigen and ("rmse_log" in rec["metrics"]) != eigen
    if eigen:  # the eigen protocol's training: mmseg's photometric distortion, no flip
        from mmengine.config import Config
        cfg = Config.fromfile(next((tmp_path / "w").glob("2*.py")))
        types = [t.type for t in cfg.train_dataloader.dataset.pipeline]
        assert "PhotoMetricDistortion" in types and "RandomFlip" not in types and "FourmColorJitter" not in types


# one baseline per task, built as `run --backbone mae --random-init` builds it (the command itself runs a
# baseline end to end in test_coco_det_run.py; test_baselines.py loads both baselines' released layouts)
def test_a_baseline_builds_into_the_dpt_model(tmp_path, tiny_nyu):
    from task_context import build_task_model

    model, groups = build_task_model("nyu-depth", tiny_nyu, "mae-b", tmp_path, {"head": "dpt"})
    # DPT reads the last block of each quarter of the 12 ViT blocks; the layer-decay table covers them all
    assert model.backbone.net.name == "mae-b" and model.backbone.out_indices == [2, 5, 8, 11]
    assert {g["layer_id"] for g in groups} == set(range(14))


def test_eval_only_reproduces_the_smoke_run(smoke):
    """`run --eval-only --from RUN_DIR` evaluates the run's final weights with its own settings and data
    root, writes a record and predictions marked evaluation-only, and reproduces the metrics exactly."""
    tmp, wd, rec, _ = smoke
    out = tmp / "eval-only"
    r = _run(["run", "nyu-depth", "--eval-only", "--from", str(wd), "--work-dir", str(out)], tmp)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = json.loads((out / "result.json").read_text())
    assert ev["metrics"] == rec["metrics"]
    assert ev["eval_only"] == {**ev["eval_only"], "source_run": str(wd), "iteration": 400, "final": True,
                               "checkpoint": str(wd / "iter_400.pth")}
    assert ev["metrics_step0"] is None and ev["eval_history"] == [{"iter": 400, "metrics": rec["metrics"]}]
    state = json.loads((out / "predictions" / "meta.json").read_text())["evaluation"]
    assert state["eval_only"] and state["final"] and state["iteration"] == 400
    assert "evaluation only" in r.stdout and "no training" in r.stdout
    # the same cell as the run it evaluated: one seed, two runs that agree
    ls = _run(["results", "ls", str(wd), str(out)], tmp)
    assert "2 run(s) in 1 cell(s)" in ls.stdout and "2 runs agree exactly" in ls.stdout
    # the run's settings are what is evaluated: options that would change them are refused
    bad = _run(["run", "nyu-depth", "--eval-only", "--from", str(wd), "--set", "head=dpt"], tmp)
    assert bad.returncode == 2 and "--set cannot change them" in bad.stderr
    bad = _run(["run", "coco-det", "--eval-only", "--from", str(wd)], tmp)
    assert bad.returncode == 2 and "a nyu-depth run, not coco-det" in bad.stderr


def test_two_runs_in_one_process_keep_their_own_logs(tmp_path, tiny_nyu):
    """The Python API twice in one process (a notebook): each run's log and scalars are in its own run
    directory and its record names them (mmengine's per-process logger and visualizer instances were
    once shared by name, so the second run's scalars went to the first run's directory)."""
    from fourm_eval.console import RunConsole
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.runner import run

    sets = ["image_size=32", "batch_size=2", "schedule.length=2", "schedule.val_interval=2",
            "schedule.checkpoint_interval=2", "log_interval=1"]
    for name in ("first", "second"):
        rec = run(get_task("nyu-depth"), data_root=tiny_nyu, work_dir=tmp_path / name, sets=sets,
                  console=RunConsole(force_plain=True))
        scalars = rec["files"]["scalars"]
        assert len(scalars) == 1, (name, scalars)
        lines = (tmp_path / name / scalars[0]).read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == [1, 2]  # this run's two steps only
        assert len(list((tmp_path / name).glob("*/*.log"))) == 1
