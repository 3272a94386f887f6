"""The CI regression gate: the smoke profile of every registered task at seeds 0 and 1, compared with the
shipped expectations (reports/ci/expected.json) by `fourm-eval regress`, then reported.

Every registered task is in it (the list comes from the task registry, not from this file), and the
expectations hold the numbers measured on this machine kind, per seed: a drop larger than the allowed drop
that `regress` prints fails CI. The runs are the session's shared smoke runs (tests/smoke_runs.py)."""

from pathlib import Path

import pytest

from fourm_eval.tasks import all_tasks

from cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "reports" / "ci" / "expected.json"
SEEDS = (0, 1)
RUNS = [(t, s) for t in all_tasks() for s in SEEDS]


@pytest.mark.gate
@pytest.mark.smoke_runs(*RUNS)
def test_ci_gate(smoke_runs, tmp_path):
    records = [str(smoke_runs.get(t, s).work_dir / "result.json") for t, s in RUNS]
    r = run_cli(["regress", *records, "--expected", str(EXPECTED)], tmp_path)
    print(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rep = run_cli(["report", *records, "--out", str(tmp_path / "report")], tmp_path)
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert (tmp_path / "report" / "report.md").exists()
