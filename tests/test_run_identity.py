"""Which runs measure the same thing, with real records: a repeated seed does not raise n, other
settings and random init are other rows and other gate keys, `--update` needs seeds; output is
never cut in files; paths that match nothing fail; a killed, interrupted and resumed run keeps
every invocation and says what its predictions are."""

import json
import signal
import subprocess

import pytest

from fourm_eval.data.nyu_mini import make_mini_nyu

from cli_runner import FOURM_EVAL, cli_env, run_cli

# a few-second configuration of the real pipeline
QUICK = ["--set", "image_size=32", "--set", "batch_size=2", "--set", "schedule.warmup_epochs=0.5",
         "--set", "schedule.length=2", "--set", "schedule.val_interval=2", "--set", "schedule.checkpoint_interval=2",
         "--set", "log_interval=1", "--set", "eval_at_start=false", "--set", "val_batch_size=2"]
# a deep run directory: tables in files and CI logs must show such paths whole
DEEP = "a-run-directory-with-a-long-name-as-clusters-have/" * 3


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    data = make_mini_nyu(tmp / "nyu", n_train=4, n_test=2, size=(48, 64), seed=2)
    root = tmp / "runs" / DEEP
    base = ["run", "nyu-depth", "--data-root", str(data), *QUICK]
    runs = {"s0": ["--seed", "0", "--logger", "tensorboard"],   # a logger is not a setting: same cell as s0-again
            "s0-again": ["--seed", "0"], "s1": ["--seed", "1"],
            "silog": ["--seed", "0", "--set", "loss=silog", "--set", "lr=2e-3"],
            "random": ["--seed", "0", "--random-init"]}
    for name, extra in runs.items():
        r = run_cli(base + extra + ["--work-dir", str(root / name)], tmp)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    recs = {n: json.loads((root / n / "result.json").read_text()) for n in runs}
    return tmp, root, recs, data


def test_a_repeated_seed_does_not_raise_n(real_runs):
    tmp, root, recs, _ = real_runs
    assert recs["s0"]["metrics"] == recs["s0-again"]["metrics"]  # deterministic on one machine
    dirs = [str(root / n) for n in ("s0", "s0-again", "s1")]
    r = run_cli(["report", *dirs, "--out", str(tmp / "rep")], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp / "rep" / "report.md").read_text()
    vals = [recs[n]["metrics"]["delta1"] * 100 for n in ("s0", "s1")]
    mean = sum(vals) / 2
    std = abs(vals[0] - vals[1]) / 2 ** 0.5
    assert f"| {mean:.1f} ± {std:.1f} (n=2, +1 repeat) |" in md, md
    assert "## Repeated seeds (measured non-determinism)" in md and "delta1: identical" in md
    ls = run_cli(["results", "ls", *dirs], tmp)
    assert "3 run(s) in 1 cell(s)" in ls.stdout and "seed 0: 2 runs agree exactly; counted once" in ls.stdout
    exp = tmp / "exp-repeat.json"
    r = run_cli(["regress", *dirs, "--expected", str(exp), "--update", "--min-seeds", "2"], tmp)
    assert r.returncode == 0, r.stdout + r.stderr
    e = next(x for x in json.loads(exp.read_text())["entries"] if x["metric"] == "delta1")
    assert e["n"] == 2 and sorted(e["per_seed"]) == ["0", "1"] and e["repeats"] == {"0": 2}
    assert e["nondeterminism"] == 0.0


def test_other_settings_and_random_init_are_other_rows_and_keys(real_runs):
    tmp, root, recs, _ = real_runs
    r = run_cli(["report", str(root), "--out", str(tmp / "rep-all")], tmp)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp / "rep-all" / "report.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| tiny |")]
    assert len(rows) == 3, rows  # default settings, loss/lr overridden, random init
    silog = next(l for l in rows if "loss=silog" in l)
    assert "lr=0.002" in silog and f"| {recs['silog']['metrics']['delta1'] * 100:.1f} (n=1) |" in silog
    default = next(l for l in rows if "loss=berhu" in l)
    assert "(n=2, +1 repeat)" in default and "lr=0.0005" in default
    rand = next(l for l in rows if "random init" in l)
    assert f"| {recs['random']['metrics']['delta1'] * 100:.1f} (n=1) |" in rand
    # the gate: an expectation per cell; runs of other cells are named, never pooled into it
    exp = tmp / "exp.json"
    dirs = [str(root / n) for n in ("s0", "s0-again", "s1")]
    assert run_cli(["regress", *dirs, "--expected", str(exp), "--update", "--min-seeds", "2"], tmp).returncode == 0
    data = json.loads(exp.read_text())
    assert len(data["cells"]) == 1 and {e["cell"] for e in data["entries"]} == set(data["cells"])
    r = run_cli(["regress", str(root), "--expected", str(exp)], tmp)
    assert r.returncode == 2 and "no expectation (they would pass unchecked)" in r.stderr
    assert "nyu-depth/4m-tiny(random)/smoke" in r.stderr and r.stderr.count("(cell ") == 2
    r = run_cli(["regress", str(root), "--expected", str(exp), "--allow-new"], tmp)
    assert r.returncode == 0 and "[paired" not in r.stdout and "[unpaired" in r.stdout  # no noise runs given
    cur = [l for l in r.stdout.splitlines() if l.startswith("ok nyu-depth") and " delta1 " in l]
    assert len(cur) == 1 and "current" in cur[0] and "(n 2)" in cur[0]  # neither silog nor random entered
    # one seed is refused for --update: no std is made up from a single run
    r = run_cli(["regress", str(root / "silog"), "--expected", str(tmp / "one.json"), "--update"], tmp)
    assert r.returncode == 2 and "at least 3 distinct seeds" in r.stderr and not (tmp / "one.json").exists()


def test_tables_in_files_keep_whole_paths(real_runs):
    tmp, root, _, _ = real_runs
    out = tmp / "ls.txt"
    with open(out, "w") as f:
        r = subprocess.run(FOURM_EVAL + ["results", "ls", str(root)], stdout=f, stderr=subprocess.PIPE, text=True,
                           env=cli_env(tmp), cwd=tmp, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    for name in ("s0", "s0-again", "s1", "silog", "random"):
        assert str(root / name) in text, name
    assert "…" not in text
    assert all(len(line) > 250 for line in text.splitlines() if str(root) in line)  # one row per run, unwrapped


def test_paths_that_match_nothing_are_errors(real_runs, tmp_path):
    tmp, root, _, _ = real_runs
    (tmp_path / "empty").mkdir()
    for args in (["report", "/no/such/dir", "--out", str(tmp_path / "r")], ["results", "ls", "/no/such/dir"],
                 ["results", "export", "/no/such/dir", "--out", str(tmp_path / "x.csv")],
                 ["analyze", "finetune", "/no/such/dir"], ["analyze", "scaling", "/no/such/dir"],
                 ["results", "show", "/no/such/dir"],
                 ["regress", "/no/such/dir", "--expected", str(tmp_path / "e.json")],
                 ["report", str(root), "/no/such/dir", "--out", str(tmp_path / "r2")]):
        r = run_cli(args, tmp_path)
        assert r.returncode == 2 and "/no/such/dir: no such file or directory" in r.stderr, (args, r.stderr)
    r = run_cli(["results", "ls", str(tmp_path / "empty")], tmp_path)
    assert r.returncode == 2 and "no result.json below this folder" in r.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "x.csv").exists()


def test_tensorboard_and_wandb_loggers(real_runs, tmp_path):
    tmp, root, recs, data = real_runs
    events = list((root / "s0").glob("*/vis_data/events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert recs["s0"]["provenance"]["loggers"][0]["name"] == "tensorboard"
    assert "loggers" not in recs["s0-again"]["provenance"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert any("loss" in t for t in acc.Tags()["scalars"]), acc.Tags()
    # W&B: off unless installed and configured; asked for without either, a named error before any work
    env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc login
    r = subprocess.run(FOURM_EVAL + ["run", "nyu-depth", "--data-root", str(data), *QUICK, "--logger", "wandb",
                                     "--work-dir", str(tmp_path / "w")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 2 and "logger wandb: " in r.stderr and "WANDB_MODE=offline" in r.stderr
    assert not (tmp_path / "w" / "result.json").exists()


LONG = ["--set", "schedule.length=40", "--set", "schedule.val_interval=20", "--set", "schedule.checkpoint_interval=10",
        "--set", "eval_at_start=true"]


def test_killed_interrupted_and_resumed_run(real_runs, tmp_path):
    """Killed (SIGKILL) right after iteration 30's checkpoint, interrupted (SIGINT) in the resumed
    invocation, finished by the third: the predictions say they are iteration 20's until the end,
    the interrupt says where it stopped and how to resume, and the record keeps all three
    invocations and their total wall time."""
    _, _, _, data = real_runs
    wd = tmp_path / "run"
    args = FOURM_EVAL + ["run", "nyu-depth", "--data-root", str(data), *QUICK, *LONG, "--work-dir", str(wd)]
    killed = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**cli_env(tmp_path), "FOURM_EVAL_KILL_AT": "after_checkpoint:30"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    meta = json.loads((wd / "predictions" / "meta.json").read_text())["evaluation"]
    assert meta["iteration"] == 20 and meta["complete"] and not meta["final"]
    ev = run_cli(["evaluate", "nyu-depth", "--predictions", str(wd / "predictions")], tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert "predictions of iteration 20 of 40, not of the final model" in ev.stderr
    assert f"data root from the run ({wd / 'run.json'}): {data}" in ev.stderr

    # the resumed invocation gets a SIGINT (as from Ctrl-C) inside the training loop, at iteration 35 exactly
    # (sent by the process to itself: a signal from this test would race the 10 remaining iterations)
    # (SIGINT at its default disposition, as in a terminal: a test session started in the background, or
    # under nohup, inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler)
    second = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600,
                            env={**cli_env(tmp_path), "FOURM_EVAL_KILL_AT": "after_iter:35:SIGINT"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, err = second.stdout, second.stderr
    assert second.returncode == 128 + signal.SIGINT, out[-2000:] + err[-2000:]
    reached = int(next(l for l in out.splitlines() if l.startswith("interrupted (SIGINT) at iteration ")).split()[4])
    assert 30 < reached < 40, out[-2000:]
    line = next(l for l in out.splitlines() if l.startswith("interrupted (SIGINT) at iteration "))
    assert f"resume from {wd / 'iter_30.pth'} with: fourm-eval run nyu-depth" in line and "Traceback" not in err

    third = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=cli_env(tmp_path))
    assert third.returncode == 0, third.stderr[-3000:]
    rec = json.loads((wd / "result.json").read_text())
    inv = rec["provenance"]["invocations"]
    assert [i["status"] for i in inv] == ["killed", "interrupted (SIGINT)", "finished"]
    assert inv[0]["iter_start"] == 0 and inv[0]["iter_reached"] == 30
    # the signal came after iteration 35's update; the message counts the iterations the loop had closed
    # (34 or 35): a known off-by-one between the two, kept visible here
    assert inv[1]["iter_start"] == 30 and inv[1]["iter_reached"] == 35 and reached in (34, 35)
    assert inv[2]["iter_start"] == 30 and inv[2]["iter_reached"] == 40
    assert all(i["wall_time_s"] > 0 for i in inv) and rec["provenance"]["resumed"] is True
    assert rec["provenance"]["wall_time_s"] == pytest.approx(sum(i["wall_time_s"] for i in inv), abs=0.11)
    assert rec["provenance"]["wall_time_s"] > rec["provenance"]["wall_time_s_this_invocation"]
    assert "over 3 invocations" in third.stdout
    meta = json.loads((wd / "predictions" / "meta.json").read_text())["evaluation"]
    assert meta == {**meta, "iteration": 40, "complete": True, "final": True}
    ev = run_cli(["evaluate", "nyu-depth", "--predictions", str(wd / "predictions")], tmp_path)
    assert ev.returncode == 0 and "predictions of iteration 40 (the final model)" in ev.stderr
    assert "WARNING" not in ev.stderr
