"""`fourm-eval run coco-det` end to end on generated data: learning, resume, distributed, baselines."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fourm_eval.data.coco_mini import make_mini_coco

from cli_runner import FOURM_EVAL, cli_env as _env, run_cli as _run
# a few-second configuration of the real pipeline
QUICK = ["--set", "image_size=64", "--set", "batch_size=2", "--set", "schedule.warmup_iters=2",
         "--set", "schedule.length=8", "--set", "schedule.val_interval=8", "--set", "schedule.checkpoint_interval=2",
         "--set", "log_interval=2", "--set", "eval_at_start=false"]


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_mini_coco(tmp_path_factory.mktemp("coco"), n_train=8, n_val=4, seed=3)


@pytest.mark.smoke_runs(("coco-det", 0))
def test_smoke_profile_learns(smoke_runs, tmp_path):
    """The acceptance run: the default smoke command (built-in data, the shipped pre-trained tiny 4M; the
    session's shared seed-0 run, tests/smoke_runs.py) learns (AP50 >= 0.5, mask AP >= 0.3; an untrained
    detector scores about 0: measured 0.0005 / 0.0000 at step 0) and learns the classes."""
    run = smoke_runs.get("coco-det", 0)
    wd, rec = run.work_dir, run.record
    assert rec["metrics"]["box_AP50"] >= 0.5 and rec["metrics"]["mask_AP"] >= 0.3, rec["metrics"]
    # no step-0 evaluation in this smoke (its 100 untrained detections per image cost 100 s): none recorded
    assert rec["metrics_step0"] is None
    assert rec["schema_version"] == 1 and rec["status"] == "complete"
    assert len(rec["backbone"]["sha256"]) == 64 and rec["dataset"]["annotations_sha256"]["val"]
    assert [h["iter"] for h in rec["eval_history"]] == [600] == [rec["config"]["schedule"]["length"]]
    assert (wd / "param_groups.csv").exists()
    # the saved predictions re-score to exactly the recorded numbers, without the model
    assert rec["files"]["predictions"] == "predictions"
    ev = _run(["evaluate", "coco-det", "--predictions", str(wd / "predictions"), "--data-root",
               rec["dataset"]["root"], "--out", str(tmp_path / "rescored.json")], tmp_path)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.loads((tmp_path / "rescored.json").read_text())["metrics"] == rec["metrics"]
    # the smoke starts from the shipped pre-trained tiny 4M, and its detector learns the classes:
    # the R-CNN classifier is right on > 85% of the sampled RoIs (75% of them are background) ...
    from fourm_eval.pretrain import shipped_checkpoint
    from fourm_eval.checkpoints import sha256_file
    assert rec["backbone"]["init"] == "checkpoint"
    assert rec["backbone"]["sha256"] == sha256_file(shipped_checkpoint())
    assert rec["train_end"]["values"]["acc"] > 85.0, rec["train_end"]
    # ... and the boxes carry the class: the same predictions with every category id mapped to another
    # category (a cyclic permutation) score at most half the AP50
    pred = wd / "predictions"
    cats = sorted({d["category_id"] for d in json.loads((pred / "coco_results.bbox.json").read_text())})
    ids = [c["id"] for c in json.loads(
        (Path(rec["dataset"]["root"]) / "annotations" / "instances_val2017.json").read_text())["categories"]]
    assert set(cats) <= set(ids) and len(ids) >= 2
    perm = {a: b for a, b in zip(ids, ids[1:] + ids[:1])}
    swapped = tmp_path / "permuted"
    swapped.mkdir()
    for name in ("coco_results.bbox.json", "coco_results.segm.json"):
        dets = json.loads((pred / name).read_text())
        for d in dets:
            d["category_id"] = perm[d["category_id"]]
        (swapped / name).write_text(json.dumps(dets))
    (swapped / "meta.json").write_text((pred / "meta.json").read_text())
    ev2 = _run(["evaluate", "coco-det", "--predictions", str(swapped), "--data-root", rec["dataset"]["root"],
                "--out", str(tmp_path / "permuted.json")], tmp_path)
    assert ev2.returncode == 0, ev2.stderr[-2000:]
    permuted = json.loads((tmp_path / "permuted.json").read_text())["metrics"]
    assert permuted["box_AP50"] <= 0.5 * rec["metrics"]["box_AP50"], (permuted["box_AP50"], rec["metrics"])
    # the report of this real run: three files, and Table 1 shows the record's numbers
    r3 = _run(["report", str(wd / "result.json"), "--out", str(tmp_path / "report")], tmp_path)
    assert r3.returncode == 0, r3.stderr[-2000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert (tmp_path / "report" / "report.html").exists() and (tmp_path / "report" / "tables.tex").exists()
    box, mask = rec["metrics"]["box_AP"] * 100, rec["metrics"]["mask_AP"] * 100
    assert f"| {box:.1f} (n=1) | {mask:.1f} (n=1) |" in md
    # running the same command again (in the same place, so the same built-in data) does not redo it
    r2 = _run(["run", "coco-det", "--profile", "smoke", "--work-dir", str(wd)], run.base)
    assert r2.returncode == 0 and "already holds a finished run" in r2.stdout, r2.stdout[-2000:] + r2.stderr[-2000:]


# periodic validation and checkpoints, as real runs have: a kill can land after a validation
RESUMABLE = ["--set", "schedule.length=12", "--set", "schedule.val_interval=4", "--set", "eval_at_start=true",
             "--set", "schedule.checkpoint_interval=4"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_coco):
    tmp = tmp_path_factory.mktemp("ref")
    base = ["run", "coco-det", "--data-root", str(tiny_coco), *QUICK, *RESUMABLE]
    ref = _run(base + ["--work-dir", str(tmp / "ref")], tmp)
    assert ref.returncode == 0, ref.stderr[-3000:]
    return base, tmp / "ref", ref


def test_console_without_a_terminal(reference_run):
    """A non-TTY console (CI, Slurm logs): plain progress lines and the closing table, no mmengine
    chatter, which is in the run directory's log instead."""
    _, wd, ref = reference_run
    out = ref.stdout
    assert "training: 12/12  loss" in out and "it/s" in out and "ETA" in out
    assert "evaluation before training: box_AP" in out and "evaluation at iteration 12: box_AP" in out
    assert "after training vs step 0" in out and "│ box_AP " in out and f"result       {wd / 'result.json'}" in out
    assert "mmengine - INFO" not in out and "Config:" not in out and "loading annotations" not in out
    assert len(out.splitlines()) < 60, out
    log = next(wd.glob("*/*.log")).read_text()
    assert "Iter(train) [12/12]" in log and "Config:" in log


def test_eval_only_reproduces_the_finished_run(reference_run, tmp_path):
    """Evaluation only, from a finished run: its final checkpoint, settings and data, the same metrics
    exactly and the same prediction files. The quick run's detector is barely trained (its files may
    hold no detection above the score threshold); re-scoring real detections exactly is checked on
    the nyu-depth smoke run, and the coco-det smoke's predictions are re-scored from their files."""
    from fourm_eval.checkpoints import sha256_file

    _, wd, _ = reference_run
    rec = json.loads((wd / "result.json").read_text())
    r = _run(["run", "coco-det", "--eval-only", "--from", str(wd), "--work-dir", str(tmp_path / "eval-only")],
             tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ev = json.loads((tmp_path / "eval-only" / "result.json").read_text())
    assert ev["metrics"] == rec["metrics"]
    assert ev["eval_only"] == {**ev["eval_only"], "source_run": str(wd), "iteration": 12, "final": True,
                               "checkpoint": str(wd / "iter_12.pth"), "weights_sha256": sha256_file(wd / "iter_12.pth")}
    for name in ("coco_results.bbox.json", "coco_results.segm.json"):
        assert (json.loads((tmp_path / "eval-only" / "predictions" / name).read_text())
                == json.loads((wd / "predictions" / name).read_text())), name


def test_killed_run_resumes_to_the_same_numbers(reference_run, tmp_path):
    """Preempted three times, each at another kind of point (right after iteration 4's checkpoint;
    inside the validation after iteration 8's checkpoint; at iteration 10, between checkpoints), the
    same command resumes each time and ends with the uninterrupted run's numbers and evaluation
    history (the validation the second kill interrupted is redone). Other settings in the preempted
    run's folder are refused without touching it."""
    base, ref_dir, _ = reference_run
    wd = tmp_path / "killed"
    resumed_from = None
    for kill_at, ckpt in (("after_checkpoint:4", 4), ("during_eval:8", 8), ("after_iter:10", 8)):
        killed = subprocess.run(FOURM_EVAL + base + ["--work-dir", str(wd)], capture_output=True, text=True,
                                env={**_env(tmp_path), "FOURM_EVAL_KILL_AT": kill_at}, cwd=tmp_path, timeout=900)
        assert killed.returncode == -signal.SIGKILL, (kill_at, killed.stderr[-2000:])
        assert not (wd / "result.json").exists()
        if resumed_from is not None:
            assert f"(resuming from iter_{resumed_from}.pth" in killed.stdout, (kill_at, killed.stdout[-2000:])
        resumed_from = ckpt
    # the same folder with other settings is another run: refused, and the preempted run is untouched
    listing = sorted(p.name for p in wd.iterdir())
    other = _run(base + ["--set", "schedule.length=16", "--work-dir", str(wd)], tmp_path)
    assert other.returncode == 2 and "holds a different run" in other.stderr, other.stderr[-2000:]
    assert "profile.{schedule}" in other.stderr and sorted(p.name for p in wd.iterdir()) == listing
    again = _run(base + ["--work-dir", str(wd)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(resuming from iter_8.pth" in again.stdout, again.stdout[-2000:]
    a = json.loads((ref_dir / "result.json").read_text())
    b = json.loads((wd / "result.json").read_text())
    assert a["metrics"] == b["metrics"]
    assert a["eval_history"] == b["eval_history"]
    assert [i["status"] for i in b["provenance"]["invocations"]] == ["killed"] * 3 + ["finished"]


def test_missing_dataset_is_a_clear_error(tmp_path):
    r = _run(["run", "coco-det", "--data-root", str(tmp_path / "nowhere"), "--work-dir", str(tmp_path / "w")],
             tmp_path)
    assert r.returncode == 2
    assert "instances_train2017.json: annotation file not found" in r.stderr and "Traceback" not in r.stderr


def test_skip_bad_images_counts_them(tmp_path, tiny_coco):
    import shutil
    root = tmp_path / "coco"
    shutil.copytree(tiny_coco, root)
    (root / "train2017" / "000000000003.jpg").write_bytes(b"garbage")
    args = ["run", "coco-det", "--data-root", str(root), *QUICK, "--set", "schedule.length=2",
            "--set", "schedule.val_interval=2", "--work-dir", str(tmp_path / "w")]
    r = _run(args, tmp_path)
    assert r.returncode == 2 and "000000000003.jpg: does not decode" in r.stderr
    r = _run(args + ["--skip-bad-images"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((tmp_path / "w" / "result.json").read_text())
    assert rec["dataset"]["skipped_bad_images"] == 1 and rec["dataset"]["n_train_images"] == 7


# one baseline per task (each task builds both through the same backbone_cfg; test_baselines.py loads both)
@pytest.mark.parametrize("backbone", ["mae"])
def test_baselines_run_through_the_same_command(tmp_path, tiny_coco, backbone):
    r = _run(["run", "coco-det", "--backbone", backbone, "--random-init", "--data-root", str(tiny_coco), *QUICK,
              "--set", "schedule.length=2", "--set", "schedule.val_interval=2", "--set", "val_subset=2",
              "--work-dir", str(tmp_path / backbone)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((tmp_path / backbone / "result.json").read_text())
    assert rec["backbone"]["name"] == f"{backbone}-b" and "box_AP" in rec["metrics"]
    # the layer-decay table covers the 12 ViT blocks of the baseline
    rows = (tmp_path / backbone / "param_groups.csv").read_text().splitlines()
    assert {int(r.split(",")[0]) for r in rows[1:]} == set(range(14))


def test_distributed_two_processes_gloo(tmp_path, tiny_coco):
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "fourm_eval.cli", "run",
                        "coco-det", "--data-root", str(tiny_coco), *QUICK, "--set", "schedule.length=4",
                        "--set", "schedule.val_interval=4", "--launcher", "pytorch",
                        "--work-dir", str(tmp_path / "ddp")],
                       capture_output=True, text=True, env={**_env(tmp_path), "OMP_NUM_THREADS": "1"},
                       cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert rec["config"]["world_size"] == 2
    assert rec["config"]["schedule_resolved"]["eff_batch"] == 2  # batch 2 split over 2 processes


def test_nan_loss_stops_with_a_clear_error_and_keeps_checkpoints(tmp_path, tiny_coco):
    r = _run(["run", "coco-det", "--data-root", str(tiny_coco), *QUICK, "--set", "lr=1e30",
              "--set", "clip_grad=null", "--set", "schedule.warmup_iters=0", "--set", "schedule.length=40",
              "--set", "schedule.val_interval=40", "--work-dir", str(tmp_path / "nan")], tmp_path)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "non-finite loss at iteration" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nan" / "result.json").exists()
    assert (tmp_path / "nan" / "run.json").exists()


def test_pth_without_metadata_is_recorded(tmp_path, tiny_coco):
    """A 4M .pth without config metadata trains, and the record says the architecture was guessed."""
    import torch

    from fourm_eval.backbones.fourm import NAMED_SIZES
    from fourm_eval.fixtures import make_fourm_state_dict

    sd, _ = make_fourm_state_dict(**NAMED_SIZES["4m-tiny"], seed=0)
    ckpt = tmp_path / "no-metadata.pth"
    torch.save({"model": sd}, ckpt)
    base = ["run", "coco-det", "--data-root", str(tiny_coco), "--checkpoint", str(ckpt), *QUICK,
            "--set", "schedule.length=2", "--set", "schedule.val_interval=2"]
    r = _run(base + ["--work-dir", str(tmp_path / "guessed")], tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "WARNING" in r.stdout and "num_heads = 2 (dim / 64" in r.stdout
    rec = json.loads((tmp_path / "guessed" / "result.json").read_text())
    assert rec["backbone"]["config_source"] == "shapes" and rec["backbone"]["file_format"] == "torch-zip"
    assert "num_heads" in rec["backbone"]["config_guessed"]
    assert any("num_heads = 2" in w for w in rec["warnings"])
    told = _run(base + ["--num-heads", "4", "--work-dir", str(tmp_path / "told")], tmp_path)
    assert told.returncode == 0, told.stdout[-2000:] + told.stderr[-2000:]
    rec4 = json.loads((tmp_path / "told" / "result.json").read_text())
    assert rec4["backbone"]["architecture"]["num_heads"] == 4
    assert "num_heads" not in rec4["backbone"]["config_guessed"]


def test_slurm_launch_two_processes(tmp_path, tiny_coco):
    """Two processes started the way srun starts them (Slurm variables, scontrol on PATH): world size 2,
    half the total batch per process, iterations of the total batch, one writer, a true record."""
    import socket

    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text('#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo 127.0.0.1 && exit 0\nexit 1\n')
    (stub / "scontrol").chmod(0o755)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wd = tmp_path / "slurm"
    args = FOURM_EVAL + ["run", "coco-det", "--data-root", str(tiny_coco), *QUICK, "--set", "batch_size=4",
                         "--set", "schedule.unit=epoch", "--set", "schedule.length=1",
                         "--set", "schedule.val_interval=100%", "--set", "schedule.checkpoint_interval=100%",
                         "--launcher", "slurm", "--work-dir", str(wd)]
    env = {k: v for k, v in _env(tmp_path).items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    procs = [subprocess.Popen(args, env={**env, "SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                                         "SLURM_NODELIST": "node[1]", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                                         "PATH": f"{stub}:{os.environ['PATH']}"},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    rec = json.loads((wd / "result.json").read_text())
    sched = rec["config"]["schedule_resolved"]
    assert rec["config"]["world_size"] == 2
    assert sched["per_gpu_batch"] == 2 and sched["eff_batch"] == 4
    assert sched["max_iters"] == round(1 * rec["dataset"]["n_train_images"] / 4)
    assert "after training vs step 0" in outs[0][0] and outs[1][0].strip() == ""  # rank 1 stays quiet
    assert len(list(wd.glob("run.json"))) == 1 and not list(wd.glob(".*.partial"))
