"""The smoke runs of the test session: `fourm-eval run TASK --profile smoke --seed S`, as a user types it
(built-in mini data, the shipped tiny 4M), each made once and shared.

The CI gate (test_ci_gate.py) needs every task's smoke at seeds 0 and 1, and each task's end-to-end tests
need its seed-0 run: the same command, so it runs once. Tests declare the runs they use with
``@pytest.mark.smoke_runs((task, seed), ...)``; when collection is done (conftest.py) the declared runs
start, one after another, in a background thread at the lowest CPU priority, so they overlap with the
tests that need none (those run first; conftest.py orders them). A test asks for a run with the
``smoke_runs`` fixture (``smoke_runs.get(task, seed)``), which waits for it. A run's numbers do not depend on what else the machine is doing (it keeps its
threads; only its wall time grows).
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cli_runner import run_cli


@dataclass
class SmokeRun:
    task: str
    seed: int
    base: Path            # the folder the command ran in; its cache/ holds the mini dataset
    work_dir: Path
    record: dict
    proc: subprocess.CompletedProcess


class SmokeRuns:
    def __init__(self, root: Path):
        self.root = root
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smoke-runs")
        self._jobs: dict[tuple[str, int], Future] = {}
        self._lock = threading.Lock()

    def start(self, keys) -> None:
        for task, seed in keys:
            self._submit(task, int(seed))

    def _submit(self, task: str, seed: int) -> Future:
        with self._lock:
            if (task, seed) not in self._jobs:
                self._jobs[(task, seed)] = self._pool.submit(self._run, task, seed)
            return self._jobs[(task, seed)]

    def _run(self, task: str, seed: int) -> SmokeRun:
        base = self.root / task
        base.mkdir(parents=True, exist_ok=True)
        wd = base / f"{task}-smoke-seed{seed}"
        # at the lowest CPU priority: the tests in the foreground keep their speed, the smoke runs take
        # what is left (their numbers do not depend on it: same threads, same arithmetic)
        r = run_cli(["run", task, "--profile", "smoke", "--seed", str(seed), "--work-dir", str(wd)], base,
                    timeout=3600, preexec_fn=lambda: os.nice(19))
        if r.returncode != 0:
            raise RuntimeError(f"fourm-eval run {task} --profile smoke --seed {seed} failed "
                               f"(exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        return SmokeRun(task, seed, base, wd, json.loads((wd / "result.json").read_text()), r)

    def get(self, task: str, seed: int = 0) -> SmokeRun:
        return self._submit(task, int(seed)).result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
