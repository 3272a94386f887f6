"""`fourm-eval sweep`: sweep files, cell keys, the dry run of the paper's table, and real cells killed and
resumed: SIGKILL of the whole sweep mid-cell (local launcher) and a requeue through submitit's local
executor (the Slurm launcher's code path, no Slurm here). References are the CI sweep's own cells, made
by the session's smoke runs (tests/smoke_runs.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fourm_eval import sweep as sw
from fourm_eval.errors import ConfigError

from cli_runner import cli_env, run_cli


def _write(tmp: Path, name: str, data: dict) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


BASE = {"name": "t", "backbones": {"4m": {}}, "tasks": {"in21k-cls": "smoke"}, "seeds": [0]}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, "unknown key"),
    ({"tasks": {"no-such-task": "smoke"}}, "unknown task"),
    ({"tasks": {"in21k-cls": "nope"}}, "no profile 'nope' for in21k-cls"),
    ({"seeds": ["0"]}, "seeds must be a list of integers"),
    ({"backbones": {"4m-b": {"checkpoint": "EPFL-VILAB/4M-21_B@v1", "revision": "main"}}}, "revision is given twice"),
    ({"backbones": {"4m-b": {"revision": "main"}}}, "revision applies to a hub checkpoint"),
    ({"launcher": {"kind": "pbs"}}, "launcher.kind"),
    ({"seeds": []}, "seeds is required"),
])
def test_sweep_file_mistakes_are_named(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        sw.load_sweep(_write(tmp_path, "bad", {**BASE, **change}))


def test_cell_keys_follow_the_resolved_run(tmp_path):
    """The key changes with what defines the run (the profile's content, an override, the seed, the
    weights, the data) and with nothing else; an unchanged sweep finds the same folders."""
    from fourm_eval.configs import CONFIG_DIR
    prof = tmp_path / "my-smoke.yaml"
    prof.write_text((CONFIG_DIR / "in21k-cls.smoke.yaml").read_text())
    spec = {**BASE, "tasks": [{"task": "in21k-cls", "profile": str(prof)}], "seeds": [0, 1]}
    a = sw.expand(sw.load_sweep(_write(tmp_path, "a", spec)), tmp_path / "out")
    again = sw.expand(sw.load_sweep(_write(tmp_path, "a2", spec)), tmp_path / "out")
    assert [c.key for c in a] == [c.key for c in again] and a[0].key != a[1].key  # seeds
    assert a[0].dir == tmp_path / "out" / "in21k-cls" / "4m" / f"my-smoke-s0-{a[0].key}"
    prof.write_text(prof.read_text().replace("length: 120", "length: 121"))  # an edited profile: a new cell
    edited = sw.expand(sw.load_sweep(_write(tmp_path, "b", spec)), tmp_path / "out")
    assert edited[0].key != a[0].key
    sets = sw.expand(sw.load_sweep(_write(tmp_path, "c", {**spec, "tasks": [
        {"task": "in21k-cls", "profile": str(prof), "set": ["layer_decay=0.8"]}]})), tmp_path / "out")
    data = sw.expand(sw.load_sweep(_write(tmp_path, "d", {**spec, "tasks": [
        {"task": "in21k-cls", "profile": str(prof), "data_root": "/data/x"}]})), tmp_path / "out")
    assert len({edited[0].key, sets[0].key, data[0].key}) == 3
    # a staged profile's key holds its stage's profile too
    staged = sw.resolved_run("in1k-cls", "smoke", [])
    assert staged["pre_stage_resolved"]["batch_size"] == 32 and staged["pre_stage_resolved"]["val_per_class"] == 6


def test_table1_dry_run_lists_every_cell_and_reads_nothing(tmp_path):
    """The paper's table: 10 backbones x 4 tasks, each with the planner's GPU-hours, with an empty
    offline Hugging Face cache and no dataset on this machine (so nothing can have been read), and no
    folder written."""
    env = {**cli_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "table1"
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "sweep", "table1", "--dry-run", "--out", str(out)],
                       capture_output=True, text=True, env={**env, "COLUMNS": "250"}, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "40 cell(s)" in r.stdout and "40 pending" in r.stdout and not out.exists()
    assert "planned:" in r.stdout and "GPU-hours for 40 of 40 cell(s)" in r.stdout
    for label in ("4m-7-b", "4m-21-xl", "deit3-l", "mae-b"):
        assert label in r.stdout
    assert not Path("/data/coco").exists()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/*/children), children first."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k] + _descendants(k)
    return out


@pytest.mark.smoke_runs(("in1k-cls", 0))
def test_sweep_killed_mid_cell_resumes_to_the_uninterrupted_result(smoke_runs, tmp_path):
    """The in1k-cls smoke cell (both stages) in a sweep of its own: the whole sweep (sweep process and
    run) SIGKILLed once the second stage has evaluated and checkpointed at iteration 200; `sweep status`
    calls the cell partial; the same sweep command resumes it (the finished ImageNet-21K stage kept, the
    second stage from iteration 200) and ends with the CI cell's predictions byte for byte; a third
    invocation skips it in seconds."""
    ref = smoke_runs.get("in1k-cls", 0)
    f = _write(tmp_path, "one", {"name": "one", "backbones": {"4m": {}}, "tasks": {"in1k-cls": "smoke"},
                                 "seeds": [0]})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fourm_eval.cli", "sweep", str(f), "--out", str(out), "--no-report"]
    env = cli_env(ref.base)  # the CI cells' cache: the same mini datasets
    cell = sw.expand(sw.load_sweep(f), out)[0]
    assert cell.key == ref.cell.key  # the same run as the CI sweep's cell, in another folder
    # in the test session's own process group and session: a new session would be a scheduler autogroup of
    # its own, sharing the CPU half and half with the whole test session and its nice-19 smoke runs
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    hist = cell.dir / "eval_history.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if (cell.dir / "iter_200.pth").exists() and hist.exists() and '"iter": 200' in hist.read_text():
            break
        time.sleep(0.2)
    assert p.poll() is None, "the sweep ended before it could be killed"
    tree = [p.pid] + _descendants(p.pid)
    for pid in tree:  # the whole sweep at once, as a node failure would: the sweep process and its run
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    p.wait()
    assert not (cell.dir / "result.json").exists() and (cell.dir / "stage-in21k-cls" / "result.json").exists()
    st = run_cli(["sweep", "status", str(f), "--out", str(out), "--json", str(tmp_path / "status.json")], tmp_path)
    assert st.returncode == 0 and "partial" in st.stdout, st.stdout
    (row,) = json.loads((tmp_path / "status.json").read_text())
    assert row["state"] == "partial" and row["cell"] == cell.key and row["iteration"] >= 200, row
    stage_before = (cell.dir / "stage-in21k-cls" / "result.json").read_bytes()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 finished (skipped), 1 to run" in r.stdout
    log = (cell.dir / sw.CELL_LOG).read_text()
    assert "resuming from iter_200.pth" in log and "already holds a finished run" in log
    assert (cell.dir / "stage-in21k-cls" / "result.json").read_bytes() == stage_before
    got = (cell.dir / "predictions" / "val_predictions.csv").read_bytes()
    assert got == (ref.work_dir / "predictions" / "val_predictions.csv").read_bytes()
    rec = json.loads((cell.dir / "result.json").read_text())
    assert rec["metrics"] == ref.record["metrics"] and rec["provenance"]["sweep_cell"] == cell.key
    info = json.loads((cell.dir / sw.CELL_FILE).read_text())
    assert len(info["attempts"]) == 2 and info["attempts"][-1]["exit_code"] == 0
    t0 = time.perf_counter()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert again.returncode == 0 and "1 finished (skipped), 0 to run" in again.stdout
    assert time.perf_counter() - t0 < 60


@pytest.mark.smoke_runs(("in21k-cls", 0))
def test_submitit_launcher_requeues_a_preempted_cell(smoke_runs, tmp_path, monkeypatch):
    """The CI sweep's in21k-cls seed-0 cell through the Slurm launcher's code (submitit, its local
    executor): preempted (submitit's signal) after its first checkpoint, the job stops the run, is
    requeued, resumes from that checkpoint and ends with the CI cell's predictions byte for byte."""
    ref = smoke_runs.get("in21k-cls", 0)
    spec = sw.load_sweep("ci")
    spec.launcher = {"kind": "slurm", "cluster": "local", "timeout_min": 30}
    out = tmp_path / "out"
    (cell,) = sw.select(sw.expand(spec, out), ["in21k-cls/4m/smoke-s0"])
    assert cell.key == ref.cell.key
    for k, v in cli_env(ref.base).items():
        monkeypatch.setenv(k, v)
    ex = sw.slurm_executor(spec, out)
    job = ex.submit(sw.CellJob(cell))
    deadline = time.time() + 300
    while time.time() < deadline and not (cell.dir / "iter_60.pth").exists():
        time.sleep(0.2)
    assert (cell.dir / "iter_60.pth").exists() and not job.done()
    # what Slurm does before a preemption or the time limit (--signal): submitit's signal to the job's task
    job_pid = json.loads((cell.dir / sw.CELL_FILE).read_text())["attempts"][-1]["launcher_pid"]
    assert job_pid != os.getpid()
    os.kill(job_pid, signal.SIGUSR2)
    assert job.result() == 0
    info = json.loads((cell.dir / sw.CELL_FILE).read_text())
    assert [a["error"] for a in info["attempts"]] == ["preempted or timed out: requeued", None], info
    log = (cell.dir / sw.CELL_LOG).read_text()
    assert "resuming from iter_60.pth" in log
    got = (cell.dir / "predictions" / "val_predictions.csv").read_bytes()
    assert got == (ref.work_dir / "predictions" / "val_predictions.csv").read_bytes()
