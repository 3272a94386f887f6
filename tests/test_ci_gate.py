"""The CI regression gate: the CI sweep (configs/sweeps/ci.yaml: every task's smoke profile at seeds 0 and
1) compared with the shipped expectations (reports/ci/expected.json) by `fourm-eval regress`, then
reported, all by `fourm-eval sweep ci`.

The cells are the session's shared smoke runs (tests/smoke_runs.py runs them with the sweep's own cell
runner, in the sweep's folders), so the sweep finds every cell finished and goes straight to regress and
report; that a second invocation skips finished cells is checked here too. The expectations hold the
numbers measured on this machine kind, per seed: a drop larger than the allowed drop that `regress`
prints fails CI."""

import time
from pathlib import Path

import pytest

from fourm_eval import sweep as sw
from fourm_eval.tasks import all_tasks

from cli_runner import run_cli
from smoke_runs import CI_SWEEP, ci_cells

ROOT = Path(__file__).resolve().parents[1]
RUNS = [(c.task, c.seed) for c in ci_cells(Path("/nonexistent"))]


def test_every_registered_task_is_in_the_ci_sweep():
    """A new task enters CI by one line in configs/sweeps/ci.yaml; a registered task missing there would
    be silently ungated, so it is an error here. The sweep's expectations file is the shipped one."""
    spec = sw.load_sweep(CI_SWEEP)
    assert sorted({t["task"] for t in spec.tasks}) == sorted(all_tasks())
    assert all(t["profile"] == "smoke" for t in spec.tasks) and spec.seeds == [0, 1]
    assert spec.expected == ROOT / "reports" / "ci" / "expected.json"


@pytest.mark.gate
@pytest.mark.smoke_runs(*RUNS)
def test_ci_gate(smoke_runs, tmp_path):
    for t, s in RUNS:
        smoke_runs.get(t, s)
    t0 = time.perf_counter()
    r = run_cli(["sweep", CI_SWEEP, "--out", str(smoke_runs.root)], tmp_path)
    wall = time.perf_counter() - t0
    print(r.stdout, f"sweep over finished cells: {wall:.1f} s")
    assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
    assert f"{len(RUNS)} finished (skipped), 0 to run" in r.stdout
    assert "0 regression(s)" in r.stdout and "REGRESSION" not in r.stdout
    assert (smoke_runs.root / "report" / "report.md").exists()
