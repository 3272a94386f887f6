"""The smoke runs of the test session: the cells of the CI sweep (configs/sweeps/ci.yaml: every task's
smoke profile at seeds 0 and 1, `fourm-eval run TASK --profile smoke --seed S` as a user types it, built-in
mini data, the shipped tiny 4M), each made once and shared, in the folders the sweep itself uses.

The CI gate (test_ci_gate.py) runs `fourm-eval sweep ci --out ROOT` over them at the end: every cell is
found finished, then regress and report. Each task's end-to-end tests use its seed-0 cell. Tests declare
the runs they use with ``@pytest.mark.smoke_runs((task, seed), ...)``; when collection is done
(conftest.py) the declared cells start, one after another, in a background thread, each a child process
at the lowest CPU priority (``fourm_eval.sweep.run_cell``, the sweep's own cell runner), so they overlap
with the tests that need none (those run first; conftest.py orders them). A test asks for a run with the
``smoke_runs`` fixture (``smoke_runs.get(task, seed)``), which waits for it. A run's numbers do not
depend on what else the machine is doing (it keeps its threads; only its wall time grows).
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fourm_eval import sweep as sw

from cli_runner import cli_env

CI_SWEEP = "ci"


@dataclass
class Output:
    returncode: int
    stdout: str          # the run's console output: the cell's log, which holds both streams
    stderr: str = ""     # the same log (set below), for checks written against a process's stderr

    def __post_init__(self) -> None:
        self.stderr = self.stdout


@dataclass
class SmokeRun:
    task: str
    seed: int
    base: Path            # the sweep's folder; its cache/ holds the mini datasets
    work_dir: Path
    record: dict
    proc: Output
    cell: sw.Cell


def ci_cells(root: Path) -> list[sw.Cell]:
    return sw.expand(sw.load_sweep(CI_SWEEP), root)


class SmokeRuns:
    def __init__(self, root: Path):
        self.root = root
        self.cells = {(c.task, c.seed): c for c in ci_cells(root)}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smoke-runs")
        self._jobs: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()

    def start(self, keys) -> None:
        for task, seed in keys:
            self._submit(task, int(seed))

    def _submit(self, task: str, seed: int) -> Future:
        with self._lock:
            if (task, seed) not in self.cells:
                raise KeyError(f"({task}, {seed}) is not a cell of configs/sweeps/{CI_SWEEP}.yaml")
            if (task, seed) not in self._jobs:
                self._jobs[(task, seed)] = self._pool.submit(self._run, task, seed)
            return self._jobs[(task, seed)]

    def _run(self, task: str, seed: int) -> SmokeRun:
        cell = self.cells[(task, seed)]
        # at the lowest CPU priority: the tests in the foreground keep their speed, the smoke runs take
        # what is left (their numbers do not depend on it: same threads, same arithmetic)
        rc = sw.run_cell(cell, env=cli_env(self.root), nice=19)
        log = (cell.dir / sw.CELL_LOG).read_text(errors="replace")
        if rc != 0:
            raise RuntimeError(f"cell {cell.name} ({cell.key}) failed (exit {rc}):\n{log[-6000:]}")
        return SmokeRun(task, seed, self.root, cell.dir, json.loads((cell.dir / "result.json").read_text()),
                        Output(rc, log), cell)

    def get(self, task: str, seed: int = 0) -> SmokeRun:
        return self._submit(task, int(seed)).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
