"""Sweeps: a comparison table as one resumable command (`fourm-eval sweep FILE`).

A sweep file (``configs/sweeps/*.yaml``) names backbones, tasks (with profile, ``--set`` overrides and
data roots) and seeds; the matrix of their combinations is the sweep's *cells*. Each cell is one
``fourm-eval run`` process with its own run directory under the sweep's output folder, keyed by a
hash of everything that defines the run (task, backbone and weights, the profile as resolved from its
files with the overrides applied, data roots, seed): an edited profile is a new cell in a new folder,
an unchanged one finds its folder again. Hence:

* a finished cell (its ``result.json``) is skipped, a partial one resumes (the run's own resume), a
  failing one does not stop the others (its exit code, last error line and log are kept);
* ``sweep status`` reads the same folders: done (main metric), running (iteration, from the run's
  heartbeat), failed (error, log), pending;
* launchers: ``local`` (one cell after another), ``local-gpus`` (one cell per GPU, N at a time),
  ``slurm`` (submitit: one job per cell, requeued on preemption or time-out and resumed).

Layout of a sweep's output folder::

    OUT/sweep.json                      the sweep file as read, and its cells (key, folder, command)
    OUT/<task>/<backbone>/<profile>-s<seed>-<key>/   a cell: the run directory, plus
        sweep_cell.json                 the cell's key and command, its attempts (start, end, exit code,
                                        last error line)
        sweep.log                       the run's console output, every attempt appended
    OUT/submitit/                       the Slurm launcher's job files
    OUT/report/                         the report of the finished cells (after every sweep)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import ConfigError

SWEEP_KEYS = {"name", "description", "backbones", "tasks", "seeds", "launcher", "expected", "out"}
BACKBONE_KEYS = {"backbone", "checkpoint", "revision", "model_size", "random_init"}
TASK_KEYS = {"task", "profile", "set", "data_root", "stage_data_root"}
LAUNCHER_KEYS = {"kind", "gpus", "gpus_per_cell", "cluster", "partition", "account", "qos", "constraint",
                 "timeout_min", "cpus_per_task", "mem_gb", "max_requeues", "signal_delay_s", "setup"}
LAUNCHERS = ("local", "local-gpus", "slurm")
CELL_FILE = "sweep_cell.json"
CELL_LOG = "sweep.log"
STALE_S = 180.0  # a heartbeat older than this, with its process gone, is a killed run


@dataclass
class Sweep:
    name: str
    path: Path
    backbones: dict[str, dict[str, Any]]
    tasks: list[dict[str, Any]]
    seeds: list[int]
    launcher: dict[str, Any]
    expected: Path | None
    out: Path | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)


@dataclass
class Cell:
    key: str                        # 12 hex digits: the hash of the resolved run
    task: str
    label: str                      # the sweep's name for the backbone
    backbone: dict[str, Any]        # backbone, checkpoint, revision, model_size, random_init
    profile: str
    sets: list[str]
    seed: int
    data_root: str | None
    stage_data_root: str | None
    dir: Path
    resolved: dict[str, Any] = field(repr=False, default_factory=dict)
    pinned: str | None = None       # OWNER/NAME@COMMIT the cell runs (the sweep's weights lock), once fetched

    @property
    def name(self) -> str:
        return f"{self.task}/{self.label}/{self.profile}-s{self.seed}"

    def argv(self, extra: list[str] | None = None) -> list[str]:
        """The `fourm-eval run` command of the cell (the Python of this process runs it)."""
        b = self.backbone
        cmd = [sys.executable, "-m", "fourm_eval.cli", "run", self.task, "--backbone", b["backbone"],
               "--profile", self.profile, "--seed", str(self.seed), "--work-dir", str(self.dir)]
        if self.pinned or b.get("checkpoint"):
            cmd += ["--checkpoint", self.pinned or checkpoint_spec(b)]
        if b.get("model_size"):
            cmd += ["--model-size", str(b["model_size"])]
        if b.get("random_init"):
            cmd += ["--random-init"]
        for s in self.sets:
            cmd += ["--set", s]
        if self.data_root:
            cmd += ["--data-root", self.data_root]
        if self.stage_data_root:
            cmd += ["--stage-data-root", self.stage_data_root]
        return cmd + list(extra or [])


# ------------------------------------------------------------------ reading a sweep file
def _unknown(where: str, got: dict[str, Any], known: set[str]) -> None:
    bad = sorted(set(got) - known)
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {bad}; known: {', '.join(sorted(known))}")


def sweep_path(spec: str | Path) -> Path:
    """A sweep file by path, or by name among the shipped ones (``ci`` = configs/sweeps/ci.yaml)."""
    p = Path(spec)
    if p.is_file():
        return p
    from fourm_eval.configs import CONFIG_DIR
    shipped = CONFIG_DIR / "sweeps" / f"{spec}.yaml"
    if shipped.is_file():
        return shipped
    names = sorted(q.stem for q in (CONFIG_DIR / "sweeps").glob("*.yaml"))
    raise ConfigError(f"sweep file {spec} not found (a path, or a shipped sweep: {', '.join(names)})")


def load_sweep(spec: str | Path) -> Sweep:
    """Read and check a sweep file; every mistake is a ConfigError naming the file and the key."""
    path = sweep_path(spec)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with backbones, tasks, seeds")
    _unknown(str(path), raw, SWEEP_KEYS)
    for k in ("backbones", "tasks", "seeds"):
        if not raw.get(k):
            raise ConfigError(f"{path}: {k} is required and must not be empty")
    from .tasks import get_task
    from .tasks.profiles import list_profiles

    backbones: dict[str, dict[str, Any]] = {}
    if not isinstance(raw["backbones"], dict):
        raise ConfigError(f"{path}: backbones must map a label to its settings ({', '.join(sorted(BACKBONE_KEYS))})")
    for label, b in raw["backbones"].items():
        b = dict(b or {})
        _unknown(f"{path}: backbones.{label}", b, BACKBONE_KEYS)
        b.setdefault("backbone", str(label))
        if b.get("revision") is not None:
            from .hub import parse_hub_spec
            ck = b.get("checkpoint")
            ref = parse_hub_spec(str(ck)) if ck and str(ck) not in ("hub", "cache") else None
            if ck is None or (ref is None and str(ck) not in ("hub", "cache")):
                raise ConfigError(f"{path}: backbones.{label}.revision applies to a hub checkpoint (OWNER/NAME, or "
                                  f"`hub` for a timm baseline); checkpoint is {ck!r}")
            if ref is not None and ref.revision:
                raise ConfigError(f"{path}: backbones.{label}: the revision is given twice ({ck!r} and revision: "
                                  f"{b['revision']!r}); keep one")
            b["revision"] = str(b["revision"])
        backbones[str(label)] = b
    tasks: list[dict[str, Any]] = []
    items = raw["tasks"]
    if isinstance(items, dict):  # {task: {profile: ...}} or {task: profile}
        items = [{"task": k, **(v if isinstance(v, dict) else {"profile": v})} for k, v in items.items()]
    for i, t in enumerate(items):
        t = dict(t if isinstance(t, dict) else {"task": t})
        _unknown(f"{path}: tasks[{i}]", t, TASK_KEYS)
        if "task" not in t:
            raise ConfigError(f"{path}: tasks[{i}] names no task")
        name = get_task(str(t["task"])).name
        t["task"] = name
        t.setdefault("profile", "paper")
        if t["profile"] not in list_profiles(name) and not str(t["profile"]).endswith((".yaml", ".yml")):
            raise ConfigError(f"{path}: tasks[{i}]: no profile {t['profile']!r} for {name}; available: "
                              f"{', '.join(list_profiles(name))}")
        sets = t.get("set") or []
        t["set"] = [sets] if isinstance(sets, str) else [str(s) for s in sets]
        tasks.append(t)
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"{path}: seeds must be a list of integers, got {seeds!r}")
    launcher = dict(raw.get("launcher") or {"kind": "local"})
    _unknown(f"{path}: launcher", launcher, LAUNCHER_KEYS)
    launcher.setdefault("kind", "local")
    if launcher["kind"] not in LAUNCHERS:
        raise ConfigError(f"{path}: launcher.kind = {launcher['kind']!r}; one of {', '.join(LAUNCHERS)}")
    expected = raw.get("expected")
    exp_path = (path.parent / expected).resolve() if expected else None
    out = raw.get("out")
    return Sweep(name=str(raw.get("name") or path.stem), path=path, backbones=backbones, tasks=tasks,
                 seeds=[int(s) for s in seeds], launcher=launcher, expected=exp_path,
                 out=Path(out).expanduser() if out else None, raw=raw)


# ------------------------------------------------------------------ weights
def checkpoint_spec(b: dict[str, Any]) -> str:
    """The backbone's ``--checkpoint`` as written: a path, or a hub id with its revision (``OWNER/NAME@REV``)."""
    ck = str(b["checkpoint"])
    return f"{ck}@{b['revision']}" if b.get("revision") and ck not in ("hub", "cache") else ck


def hub_ref(b: dict[str, Any]) -> Any:
    """The backbone's hub file (fourm_eval.hub.HubRef), or None for a local file / no weights. ``hub`` names
    timm's own hub id for a baseline."""
    from .hub import HubRef, parse_hub_spec

    ck = b.get("checkpoint")
    if not ck or b.get("random_init"):
        return None
    if str(ck) in ("hub", "cache"):  # the run's own translation: timm's pretrained config's hub id
        from .tasks.runs import resolve_backbone_name
        _, hub_id = resolve_backbone_name(str(b["backbone"]), b.get("model_size"), str(ck), False)
        if str(hub_id) in ("hub", "cache"):
            raise ConfigError(f"backbone {b['backbone']}: checkpoint `{ck}` names timm's weights of a baseline; "
                              "a 4M backbone needs a hub id (OWNER/NAME) or a file")
        return HubRef(str(hub_id), b.get("revision"))
    return parse_hub_spec(checkpoint_spec(b))


def lock_path(out: Path) -> Path:
    from .hub import LOCK_FILE
    return Path(out) / LOCK_FILE


def fetch_weights(sweep: Sweep, out: Path, say: Callable[[str], None], offline: bool | None = None,
                  labels: list[str] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Every hub file the sweep's backbones name, fetched (unless offline) and checked against the sweep's
    weights lock, which pins new entries. Returns ({label: HubFile}, {label: error}); every backbone is
    tried, so one call names every missing file."""
    from .errors import CheckpointError
    from .hub import WeightsLock, fetch

    lock = WeightsLock(lock_path(out))
    got: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for label, b in sweep.backbones.items():
        if labels is not None and label not in labels:
            continue
        try:
            ref = hub_ref(b)
            if ref is None:
                continue
            f = fetch(ref, offline=offline, say=say, lock=lock)
            lock.add(f, ref)
            got[label] = f
        except (CheckpointError, ConfigError) as e:
            errors[label] = str(e)
    if got:
        lock.save()
    return got, errors


def pin_cells(cells: list[Cell], fetched: dict[str, Any]) -> None:
    """Run each cell with the commit its weights resolved to (so a sweep is one model per name)."""
    for c in cells:
        f = fetched.get(c.label)
        if f is not None:
            c.pinned = f"{f.repo_id}@{f.commit}"


# ------------------------------------------------------------------ cells
def resolved_run(task: str, profile: str, sets: list[str]) -> dict[str, Any]:
    """The profile as its files say, the overrides applied (no checkpoint read: per-size values stay
    mappings), less where the files lie: what an edit to a profile changes."""
    from .tasks import get_task
    from .tasks.profiles import apply_overrides, load_profile
    from .tasks.schema import settings_of

    p = apply_overrides(load_profile(task, profile), sets, declared=settings_of(get_task(task)))
    p.pop("profile_file", None)
    stage = p.get("pre_stage")
    if stage:  # the stage's profile is part of the run
        p["pre_stage_resolved"] = resolved_run(stage["task"], stage["profile"], [])
    return p


def cell_key(task: str, backbone: dict[str, Any], resolved: dict[str, Any], seed: int, data_root: str | None,
             stage_data_root: str | None) -> str:
    blob = {"task": task, "backbone": {k: backbone.get(k) for k in sorted(BACKBONE_KEYS)}, "profile": resolved,
            "seed": seed, "data_root": data_root, "stage_data_root": stage_data_root}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expand(sweep: Sweep, out: Path) -> list[Cell]:
    """Every cell of the sweep, in file order: backbones x tasks x seeds."""
    cells = []
    for label, b in sweep.backbones.items():
        for t in sweep.tasks:
            res = resolved_run(t["task"], str(t["profile"]), t["set"])
            for seed in sweep.seeds:
                dr = str(Path(t["data_root"]).expanduser()) if t.get("data_root") else None
                sdr = str(Path(t["stage_data_root"]).expanduser()) if t.get("stage_data_root") else None
                key = cell_key(t["task"], b, res, seed, dr, sdr)
                profile_name = Path(str(t["profile"])).stem if str(t["profile"]).endswith((".yaml", ".yml")) \
                    else str(t["profile"])
                d = Path(out) / t["task"] / label / f"{profile_name}-s{seed}-{key}"
                cells.append(Cell(key, t["task"], label, b, str(t["profile"]), t["set"], seed, dr, sdr, d, res))
    keys = [c.key for c in cells]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"{sweep.path}: two cells are the same run (key {dup[0]}); remove the repeated entry")
    return cells


# ------------------------------------------------------------------ state
def _pid_alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (a killed run whose parent died first may stay one)."""
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, PermissionError, OSError):
        return False
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def read_json(p: Path) -> Any:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def finished(run_dir: Path) -> dict[str, Any] | None:
    """The cell's record when its run finished, by the run's own rule (the runner skips it too)."""
    from .tasks.runs import RunDir
    return RunDir(Path(run_dir)).finished_result()


def cell_state(cell: Cell) -> dict[str, Any]:
    """``state``: done | running | failed | partial | pending, with what the table shows of it."""
    from .tasks import get_task

    d = cell.dir
    rec = finished(d)
    info = read_json(d / CELL_FILE) or {}
    attempts = info.get("attempts") or []
    last = attempts[-1] if attempts else {}
    out: dict[str, Any] = {"cell": cell.key, "name": cell.name, "dir": str(d), "log": str(d / CELL_LOG),
                           "attempts": len(attempts)}
    if rec is not None:
        t = get_task(cell.task)
        main = (t.main_metrics or t.gated_metrics or list(rec["metrics"]))[0]
        out.update(state="done", metric=main, value=rec["metrics"].get(main))
        return out
    inv = read_json(d / "invocations.json") or []  # the run's own heartbeat (tasks/runs.py Invocations)
    inv = [i for i in inv if isinstance(i, dict)] if isinstance(inv, list) else []
    reached = max((int(i.get("iter_reached") or 0) for i in inv), default=0)
    out["iteration"] = reached
    if last and last.get("end") is None:
        beat = max((float(i.get("last_seen_t") or 0) for i in inv), default=0.0)
        alive = _pid_alive(last.get("pid")) if last.get("host") == os.uname().nodename else \
            (time.time() - beat < STALE_S)  # a job on another node: its heartbeat is fresh
        if alive:
            out.update(state="running", since=last.get("start"), job=last.get("job"))
            return out
    if last and last.get("exit_code") not in (None, 0):
        out.update(state="failed", exit_code=last.get("exit_code"), error=last.get("error"))
        return out
    out["state"] = "partial" if reached or (d / "run.json").exists() else "pending"
    return out


def _last_error(log: Path) -> str:
    """The line that says why a run stopped: its `error:` line, else the last non-empty line."""
    try:
        lines = log.read_text(errors="replace").splitlines()[-400:]
    except OSError:
        return ""
    for line in reversed(lines):
        s = line.strip()
        if s.startswith(("error:", "Error:")) or "Error:" in s[:80]:
            return s[:400]
    return next((s.strip()[:400] for s in reversed(lines) if s.strip()), "")


def _update_cell_file(cell: Cell, **attempt: Any) -> None:
    from .results import atomic_write_json

    cell.dir.mkdir(parents=True, exist_ok=True)
    info = read_json(cell.dir / CELL_FILE) or {"key": cell.key, "name": cell.name, "attempts": []}
    info.update(key=cell.key, name=cell.name, command=cell.argv()[2:])
    if attempt.get("new"):
        attempt.pop("new")
        info["attempts"].append(attempt)
    elif info["attempts"]:
        info["attempts"][-1].update(attempt)
    atomic_write_json(cell.dir / CELL_FILE, info)


def run_cell(cell: Cell, env: dict[str, str] | None = None, job: str | None = None,
             on_start: Callable[[subprocess.Popen], None] | None = None, nice: int = 0) -> int:
    """One attempt at a cell: `fourm-eval run` in a child process, its output appended to the cell's
    log; returns the exit code (0: finished). The attempt is recorded in the cell's file. ``nice``:
    the child's CPU priority offset (its numbers do not depend on it)."""
    cell.dir.mkdir(parents=True, exist_ok=True)
    log = cell.dir / CELL_LOG
    child_env = {**os.environ, **(env or {}), "FOURM_EVAL_SWEEP_CELL": cell.key, "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"\n===== fourm-eval sweep: cell {cell.key} ({cell.name}), attempt at "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} =====\n")
        f.flush()
        proc = subprocess.Popen(cell.argv(), stdout=f, stderr=subprocess.STDOUT, env=child_env,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None)
        _update_cell_file(cell, new=True, start=time.strftime("%Y-%m-%dT%H:%M:%S"), end=None, pid=proc.pid,
                          launcher_pid=os.getpid(), host=os.uname().nodename, job=job, exit_code=None, error=None)
        if on_start:
            on_start(proc)
        try:
            rc = proc.wait()
        except BaseException:  # the sweep interrupted, or its job preempted (the handler recorded why)
            _stop(proc)
            info = read_json(cell.dir / CELL_FILE) or {}
            why = ((info.get("attempts") or [{}])[-1].get("error")) or "the sweep was interrupted"
            _update_cell_file(cell, end=time.strftime("%Y-%m-%dT%H:%M:%S"), exit_code=proc.returncode, error=why)
            raise
    _update_cell_file(cell, end=time.strftime("%Y-%m-%dT%H:%M:%S"), exit_code=rc,
                      error=None if rc == 0 else _last_error(log))
    return rc


def _stop(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM (the run says where it stopped and how to resume; its checkpoints stay), then SIGKILL
    after a grace. Safe inside a signal handler that interrupted ``proc.wait()`` (submitit's preemption
    handler): it never calls into Popen's wait, whose lock the interrupted wait holds, but watches the
    process id (an exited child stays a zombie until its parent reaps it)."""
    if proc.returncode is not None:
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.kill(proc.pid, sig)
        except OSError:
            return
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if not _pid_alive(proc.pid):
                return
            time.sleep(0.1)


# ------------------------------------------------------------------ launchers
class CellJob:
    """A cell as a submitit job: runs the cell (resuming its run directory); on preemption or time-out
    (submitit calls :meth:`checkpoint`) stops the run (it keeps its checkpoints) and asks to be
    requeued as the same job, which then resumes."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> int:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
        if finished(self.cell.dir) is not None:
            return 0
        rc = run_cell(self.cell, job=job, on_start=lambda p: setattr(self, "_proc", p))
        if rc != 0:
            raise RuntimeError(f"cell {self.cell.name} failed (exit {rc}): {_last_error(self.cell.dir / CELL_LOG)}; "
                               f"log: {self.cell.dir / CELL_LOG}")
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        if self._proc is not None:
            _stop(self._proc)
            _update_cell_file(self.cell, end=time.strftime("%Y-%m-%dT%H:%M:%S"), exit_code=None,
                              error="preempted or timed out: requeued")
        return submitit.helpers.DelayedSubmission(CellJob(self.cell))

    def __getstate__(self) -> dict[str, Any]:
        return {"cell": self.cell}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cell, self._proc = state["cell"], None


def slurm_executor(sweep: Sweep, out: Path) -> Any:
    """submitit's executor for the sweep's launcher settings (``cluster: local`` runs the same job files
    on this machine, as submitit's LocalExecutor does: the tests use it)."""
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher slurm needs submitit (pip install submitit; scripts/setup.sh installs it)") from None
    la = sweep.launcher
    ex = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"), cluster=la.get("cluster"))
    gpus = int(la.get("gpus_per_cell", 1))
    params: dict[str, Any] = {"timeout_min": int(la.get("timeout_min", 60 * 24)), "name": f"fourm-eval-{sweep.name}"}
    if ex.cluster != "local":
        params.update(gpus_per_node=gpus, tasks_per_node=1, nodes=1, cpus_per_task=int(la.get("cpus_per_task", 10)),
                      slurm_signal_delay_s=int(la.get("signal_delay_s", 120)))
        for k in ("partition", "account", "qos", "constraint"):
            if la.get(k):
                params[f"slurm_{k}"] = la[k]
        if la.get("mem_gb"):
            params["mem_gb"] = int(la["mem_gb"])
        if la.get("setup"):
            params["slurm_setup"] = list(la["setup"])
    ex.update_parameters(**params)
    return ex


# ------------------------------------------------------------------ the sweep
def default_out(sweep: Sweep) -> Path:
    return sweep.out if sweep.out is not None else Path("runs") / "sweeps" / sweep.name


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose key starts with, or whose name (task/backbone/profile-sSEED) contains, one of ``only``."""
    if not only:
        return cells
    keep = [c for c in cells if any(c.key.startswith(o) or o in c.name for o in only)]
    if not keep:
        raise ConfigError(f"--only {' '.join(only)}: no cell matches (cells: {', '.join(c.name for c in cells[:8])}"
                          + (", ..." if len(cells) > 8 else "") + ")")
    return keep


def write_manifest(sweep: Sweep, out: Path, cells: list[Cell]) -> None:
    from .results import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", {
        "name": sweep.name, "file": str(sweep.path), "file_sha256": hashlib.sha256(sweep.path.read_bytes()).hexdigest(),
        "sweep": sweep.raw, "cells": [{"key": c.key, "name": c.name, "dir": str(c.dir.relative_to(out)),
                                       "command": c.argv()[2:]} for c in cells]})


def plan_hours(cell: Cell, gpus: int) -> tuple[float | None, str]:
    """The planner's GPU-hours of a cell, from the backbone's name alone (no checkpoint opened); None and
    why where that is not possible (a plain ``4m`` reads its checkpoint's header for its size)."""
    b = cell.backbone
    if b["backbone"].lower() == "4m":
        return None, "size from the checkpoint"
    try:
        from .plan import plan_for
        from .tasks import get_task
        est = plan_for(get_task(cell.task), b["backbone"], cell.profile, gpus=gpus, gpu_memory=None,
                       sets=list(cell.sets), size=b.get("model_size"))
    except Exception as e:  # the planner's refusal is shown, not raised: a dry run lists every cell
        return None, f"{type(e).__name__}: {str(e)[:80]}"
    return float(est.get("total_gpu_hours", est["time"]["gpu_hours"])), ""


def state_words(st: dict[str, Any]) -> str:
    s = st["state"]
    if s == "done":
        v = st.get("value")
        return f"done: {st['metric']} {v:.4f}" if isinstance(v, (int, float)) else f"done: {st['metric']} -"
    if s == "running":
        return f"running (iteration {st.get('iteration', 0)}" + (f", job {st['job']}" if st.get("job") else "") + ")"
    if s == "failed":
        return f"FAILED (exit {st.get('exit_code')}): {st.get('error') or '?'}"
    if s == "partial":
        return f"partial (reached iteration {st.get('iteration', 0)}; resumes from its last checkpoint)"
    return "pending"


def status_rows(cells: list[Cell]) -> list[tuple[Cell, dict[str, Any]]]:
    return [(c, cell_state(c)) for c in cells]


def counts(rows: list[tuple[Cell, dict[str, Any]]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _, st in rows:
        out[st["state"]] = out.get(st["state"], 0) + 1
    return out


def run_local(cells: list[Cell], say: Callable[[str], None], gpus: int = 0) -> dict[str, int]:
    """Run the cells here: one after another (``gpus`` 0), or one per GPU, ``gpus`` at a time. Returns
    the exit code per cell key; a failing cell does not stop the others."""
    rcs: dict[str, int] = {}
    n = len(cells)
    if gpus <= 0:
        for i, c in enumerate(cells, 1):
            say(f"[{i}/{n}] {c.name} (cell {c.key}): running, log {c.dir / CELL_LOG}")
            t = time.time()
            rcs[c.key] = run_cell(c)
            say(f"[{i}/{n}] {c.name}: {state_words(cell_state(c))} ({time.time() - t:.0f} s)")
        return rcs
    import threading
    from concurrent.futures import ThreadPoolExecutor

    free = list(range(gpus))
    lock = threading.Lock()

    def one(i_c: tuple[int, Cell]) -> None:
        i, c = i_c
        with lock:
            gpu = free.pop(0)
        try:
            say(f"[{i}/{n}] {c.name} (cell {c.key}): running on GPU {gpu}, log {c.dir / CELL_LOG}")
            rcs[c.key] = run_cell(c, env={"CUDA_VISIBLE_DEVICES": str(gpu)})
            say(f"[{i}/{n}] {c.name}: {state_words(cell_state(c))}")
        finally:
            with lock:
                free.append(gpu)

    with ThreadPoolExecutor(gpus) as pool:
        list(pool.map(one, enumerate(cells, 1)))
    return rcs


def run_slurm(sweep: Sweep, out: Path, cells: list[Cell], say: Callable[[str], None], wait: bool = True) -> dict[str, Any]:
    """One submitit job per cell; with ``wait``, until every job ended (requeues included)."""
    ex = slurm_executor(sweep, out)
    jobs = {}
    for c in cells:
        job = ex.submit(CellJob(c))
        jobs[c.key] = job
        say(f"{c.name} (cell {c.key}): submitted as job {job.job_id}, log {c.dir / CELL_LOG}")
    if not wait:
        return jobs
    for c in cells:
        try:
            jobs[c.key].result()
        except Exception as e:  # a failed job: its error line is in the cell file; the others go on
            say(f"{c.name}: job {jobs[c.key].job_id} failed: {str(e).splitlines()[0][:300]}")
    return jobs


__all__ = ["Cell", "CellJob", "Sweep", "cell_state", "expand", "load_sweep", "resolved_run", "run_cell",
           "slurm_executor", "sweep_path"]
