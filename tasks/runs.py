"""Run directories: one per (task, backbone, profile, seed), resumable, never mixed up.

Layout of a run directory::

    run.json            what the run is (task, backbone, checkpoint, data, resolved profile, seed)
    result.json         the final record (written last, atomically)
    eval_step0.json     metrics before training (when the profile evaluates at step 0)
    eval_history.jsonl  every periodic evaluation: {"iter": N, "metrics": {...}}
    invocations.json    every invocation of the run: start, end, wall time, iterations reached, how it
                        ended (finished, interrupted, error, or killed: its last heartbeat)
    param_groups.csv    the resolved per-group lr / weight-decay table
    iter_N.pth, last_checkpoint, <timestamp>/...   mmengine checkpoints and logs

Running the same command again resumes from the last checkpoint; a directory
that holds a *different* run is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fourm_eval.errors import ConfigError, FourmEvalError
from fourm_eval.results import SCHEMA, SCHEMA_VERSION, atomic_write_json, provenance

ALIASES = {"deit3": "deit3-{size}", "mae": "mae-{size}"}


def rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_backbone_name(backbone: str, size: str | None, checkpoint: str | None,
                          random_init: bool) -> tuple[str, str | None]:
    """(registered backbone name, checkpoint path or None).

    ``4m`` without a checkpoint is the tiny 4M pre-trained by this project (shipped in the package,
    the smoke runs' default); ``4m --random-init`` is the same architecture from random init
    (``4m-tiny``, or the ``--model-size`` given)."""
    from fourm_eval.backbones import list_backbones
    from fourm_eval.fixtures import default_tiny_checkpoint

    name = backbone.lower()
    if random_init and checkpoint is not None:
        raise ConfigError("--random-init and --checkpoint contradict each other: pass one of them")
    if random_init and name == "4m":
        name = f"4m-{(size or 'tiny').lower()}"
    if name in ALIASES:
        name = ALIASES[name].format(size=(size or "b").lower())
    known = {s.name for s in list_backbones()}
    if name not in known:
        raise ConfigError(f"unknown backbone {backbone!r}; use 4m, deit3, mae or one of: {', '.join(sorted(known))}")
    if checkpoint is not None and str(checkpoint) in ("hub", "cache") and not name.startswith("4m"):
        from fourm_eval.baselines.timm_vit import weights_spec
        checkpoint = str(weights_spec(name, checkpoint))  # timm's own hub id for the baseline
    if checkpoint is None and not random_init:
        if name == "4m":
            return name, str(default_tiny_checkpoint())  # the smoke default: the shipped pre-trained tiny 4M
        if not name.startswith("4m"):
            raise ConfigError(f"{name} needs --checkpoint (a local weights file, a hub id, or `hub` for timm's "
                              "own weights); pass --random-init to train it from scratch on purpose")
    return name, checkpoint


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint, cached by (path, size, mtime) since XL files are several GB."""
    from fourm_eval.checkpoints import cached_sha256
    return cached_sha256(path)


@dataclass
class RunDir:
    path: Path

    @classmethod
    def create(cls, work_dir: str | Path | None, task: str, backbone: str, profile: str, seed: int) -> "RunDir":
        path = Path(work_dir) if work_dir else Path("runs") / task / f"{backbone}-{profile}-seed{seed}"
        path = path.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path)

    def read_json(self, name: str) -> Any:
        f = self.path / name
        if not f.exists():
            return None
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return None

    def finished_result(self) -> dict[str, Any] | None:
        rec = self.read_json("result.json")
        return rec if isinstance(rec, dict) and rec.get("status") == "complete" else None

    def claim(self, identity: dict[str, Any]) -> None:
        """Record what this run is; refuse a directory that holds a different run."""
        ident = json.loads(json.dumps(identity, default=str))
        old = self.read_json("run.json")
        has_progress = (self.path / "result.json").exists() or any(self.path.glob("iter_*.pth"))
        if old is not None and has_progress and rank_zero():  # a run that never trained may be redefined
            diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
            if diff:
                detail = []
                for k in diff:
                    if isinstance(old.get(k), dict) and isinstance(ident.get(k), dict):
                        sub = sorted(s for s in set(old[k]) | set(ident[k]) if old[k].get(s) != ident[k].get(s))
                        detail.append(f"{k}.{{{', '.join(sub)}}}")
                    else:
                        detail.append(k)
                raise FourmEvalError(f"{self.path} holds a different run (differs in: {', '.join(detail)}). "
                                     "Use another --work-dir, or delete that directory to start over.")
        if rank_zero():
            atomic_write_json(self.path / "run.json", ident)

    def resume_checkpoint(self) -> Path | None:
        """The newest complete ``iter_N.pth``, or None.

        mmengine's ``last_checkpoint`` pointer is not trusted: a kill can land while
        ``torch.save`` is still writing (the pointer moves only afterwards). Incomplete
        files (unreadable zip central directory) are renamed ``*.incomplete`` and skipped."""
        from .state import complete_checkpoints

        done = complete_checkpoints(self.path)
        if rank_zero():
            for f in self.path.glob("iter_*.pth"):
                if f not in done:
                    f.rename(f.with_suffix(".pth.incomplete"))
        return done[0] if done else None

    def write_json(self, name: str, data: Any, fsync: bool = True) -> None:
        if rank_zero():
            atomic_write_json(self.path / name, data, fsync=fsync)

    def eval_history(self) -> list[dict[str, Any]]:
        f = self.path / "eval_history.jsonl"
        if not f.exists():
            return []
        by_iter: dict[int, dict] = {}
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            by_iter[int(row["iter"])] = row
        return [by_iter[k] for k in sorted(by_iter)]


def write_result(wd: RunDir, *, task: str, profile: str, seed: int, metrics: dict[str, float | None],
                 metrics_step0: dict[str, float | None] | None, backbone: dict, dataset: dict, config: dict,
                 eval_history: list[dict], started: float, warnings: list[str] | None = None,
                 predictions: str | None = None, train_end: dict[str, Any] | None = None,
                 provenance_extra: dict[str, Any] | None = None, invocations: "Invocations | None" = None,
                 eval_only: dict[str, Any] | None = None, finetune: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record, atomically. With ``invocations``, ``provenance.wall_time_s`` is the total over
    every invocation of the run (a resumed run's first attempts included) and
    ``provenance.invocations`` lists them."""
    from fourm_eval.results import clean_metrics

    logs = sorted(str(p.relative_to(wd.path)) for p in wd.path.glob("*/vis_data/scalars.json"))
    prov = {**provenance(started), **(provenance_extra or {})}
    if invocations is not None:
        runs = invocations.finish("finished")
        prov["wall_time_s_this_invocation"] = prov["wall_time_s"]
        prov["wall_time_s"] = round(sum(r["wall_time_s"] for r in runs), 1)
        prov["invocations"] = runs
        prov["resumed"] = len(runs) > 1
    record = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task": task, "profile": profile, "seed": seed,
        "status": "complete", "metrics": clean_metrics(metrics),
        "metrics_step0": None if metrics_step0 is None else clean_metrics(metrics_step0),
        "eval_history": [{**h, "metrics": clean_metrics(h["metrics"])} for h in eval_history],
        "backbone": backbone, "dataset": dataset, "config": config, "provenance": prov,
        "warnings": list(warnings or []),
        "train_end": train_end or {},
        "files": {"scalars": logs, "param_groups": "param_groups.csv", "run": "run.json",
                  **({"predictions": predictions} if predictions else {})},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if finetune is not None:  # a LoRA run's adapters, parameter counts and merged backbone (absent: full)
        record["finetune"] = finetune
        record["files"]["merged_backbone"] = finetune["merged"]["path"]
    if eval_only is not None:
        record["eval_only"] = eval_only
        record["files"].pop("param_groups")
    if extra:  # a mode's own section (a probe run's ``probe``)
        record.update(extra)
        if "probe" in extra:  # no optimiser over the backbone: no param_groups.csv
            record["files"].pop("param_groups", None)
    atomic_write_json(wd.path / "result.json", record)
    return record


class Invocations:
    """``invocations.json``: one entry per time the run's command ran in this directory.

    An invocation writes its entry when it starts and refreshes it (iteration reached, last seen)
    at most every ``interval`` seconds and at every evaluation, so a run killed without warning
    (SIGKILL, a preempted node) still leaves its start, its last heartbeat and the iteration it
    reached; the next invocation marks such an entry ``killed``. Wall time of a killed invocation
    is up to its last heartbeat (an underestimate by at most ``interval``); every checkpoint and evaluation forces a beat, so
    the iteration reached is at least the last checkpoint's."""

    FILE = "invocations.json"

    def __init__(self, wd: RunDir, start_iter: int, started: float, interval: float = 2.0):
        self.wd, self.interval = wd, interval
        self.path = wd.path / self.FILE
        self.entries = [e for e in (wd.read_json(self.FILE) or []) if isinstance(e, dict)]
        for e in self.entries:
            if e.get("status") == "running":  # a process that ended without writing its end
                e["status"] = "killed"
                e["ended_at"] = e.get("last_seen")
        self.current = {"started_at": _stamp(started), "started": started, "iter_start": int(start_iter),
                        "iter_reached": int(start_iter), "status": "running", "last_seen": _stamp(started),
                        "last_seen_t": started, "ended_at": None, "pid": os.getpid()}
        self.entries.append(self.current)
        self._last = 0.0
        self._write()

    def _write(self, fsync: bool = True) -> list[dict[str, Any]]:
        out = []
        for e in self.entries:
            e = dict(e)
            end_t = e.get("ended_t", e.get("last_seen_t", e.get("started")))
            e["wall_time_s"] = round(max(0.0, float(end_t) - float(e.get("started", end_t))), 1)
            out.append(e)
        self.wd.write_json(self.FILE, out, fsync=fsync)
        return out

    def heartbeat(self, iteration: int, force: bool = False) -> None:
        now = time.time()
        self.current["iter_reached"] = max(int(iteration), int(self.current["iter_reached"]))
        if force or now - self._last >= self.interval:
            self._last = now
            self.current["last_seen_t"], self.current["last_seen"] = now, _stamp(now)
            self._write(fsync=force)

    def finish(self, status: str, iteration: int | None = None) -> list[dict[str, Any]]:
        """End the current invocation; returns every invocation as the record keeps it."""
        now = time.time()
        if iteration is not None:
            self.current["iter_reached"] = max(int(iteration), int(self.current["iter_reached"]))
        self.current.update(status=status, ended_at=_stamp(now), ended_t=now, last_seen_t=now, last_seen=_stamp(now))
        return [{k: v for k, v in e.items() if k in ("started_at", "ended_at", "wall_time_s", "iter_start",
                                                       "iter_reached", "status")}
                for e in self._write()]


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t))


def init_from_source(run_dir: str | Path) -> dict[str, Any]:
    """What ``--init-from RUN_DIR`` starts from: a finished run's final weights (its newest complete
    checkpoint, which is the final iteration's), described for the record's provenance."""
    from fourm_eval.checkpoints import sha256_file

    from .state import complete_checkpoints

    path = Path(run_dir).expanduser().resolve()
    rec_file = path / "result.json"
    try:
        rec = json.loads(rec_file.read_text())
    except (OSError, json.JSONDecodeError):
        rec = None
    if not isinstance(rec, dict) or rec.get("status") != "complete":
        raise ConfigError(f"--init-from {path}: not a finished run (no complete result.json); run it to the end first")
    ckpts = complete_checkpoints(path)
    final = int((rec.get("config") or {}).get("schedule_resolved", {}).get("max_iters", -1))
    if not ckpts or ckpts[0].name != f"iter_{final}.pth":
        raise ConfigError(f"--init-from {path}: its final checkpoint iter_{final}.pth is missing "
                          f"(found: {', '.join(c.name for c in ckpts) or 'none'})")
    return {"run_dir": str(path), "checkpoint": str(ckpts[0]), "sha256": sha256_file(ckpts[0]),
            "task": rec.get("task"), "profile": rec.get("profile"), "seed": rec.get("seed"),
            "backbone": (rec.get("backbone") or {}).get("name"), "metrics": rec.get("metrics")}


def load_init_weights(model: Any, source: dict[str, Any]) -> dict[str, Any]:
    """Copy every tensor of ``source``'s checkpoint whose name and shape the model has (heads for
    other classes, an EMA copy the source did not keep, are left as built, and named); the model's
    ``after_init_from()`` runs afterwards when it has one. Returns the counts for the record."""
    import torch

    from .state import allow_mmengine_checkpoint_types

    allow_mmengine_checkpoint_types()
    sd = torch.load(source["checkpoint"], map_location="cpu", weights_only=True).get("state_dict", {})
    own = model.state_dict()
    # a LoRA model (fourm_eval/lora.py) holds an adapted linear's weights under X.base_layer.*: a source
    # without adapters gives them under X.*
    alias = {k.replace(".base_layer.", "."): k for k in own if ".base_layer." in k}
    sd = {(alias[k] if k not in own and k in alias else k): v for k, v in sd.items()}
    take = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not take:
        raise ConfigError(f"--init-from {source['run_dir']}: no tensor of {source['checkpoint']} fits this model "
                          "(another backbone architecture?)")
    model.load_state_dict(take, strict=False)
    hook = getattr(model, "after_init_from", None)
    if callable(hook):
        hook()
    mismatched = sorted(k for k in sd if k in own and k not in take)
    return {"loaded_tensors": len(take), "shape_mismatch": mismatched,
            "not_in_source": sorted(k for k in own if k not in sd)[:50],
            "not_in_model": sorted(k for k in sd if k not in own)[:50]}


# ------------------------------------------------------------- evaluation only
def eval_source(path: str | Path, task: Any) -> dict[str, Any]:
    """What ``run --eval-only --from PATH`` evaluates.

    * a run directory of a finished run: its final checkpoint, with the run's own settings;
    * an ``iter_N.pth`` inside a run directory: that checkpoint, with the run's settings;
    * any other checkpoint file (an mmengine checkpoint or a plain state dict of the model this
      command builds, .pth or .safetensors): this command's own settings.
    """
    from .state import allow_mmengine_checkpoint_types, complete_checkpoints

    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ConfigError(f"--from {p}: no such run directory or checkpoint file")
    run_dir = p if p.is_dir() else (p.parent if (p.parent / "run.json").is_file() and p.name.startswith("iter_")
                                    else None)
    ident = rec = None
    if run_dir is not None:
        ident = _read(run_dir / "run.json")
        if not isinstance(ident, dict):
            raise ConfigError(f"--from {run_dir}: not a fourm-eval run directory (no readable run.json)")
        if ident.get("task") != task.name:
            raise ConfigError(f"--from {run_dir}: a {ident.get('task')} run, not {task.name}")
        if ident.get("eval_only"):
            raise ConfigError(f"--from {run_dir}: an evaluation-only run; give the run it evaluated "
                              f"({ident['eval_only'].get('checkpoint')})")
        rec = _read(run_dir / "result.json")
        rec = rec if isinstance(rec, dict) and rec.get("status") == "complete" else None
    if p.is_dir():
        if rec is None:
            have = ", ".join(c.name for c in complete_checkpoints(p)) or "none"
            raise ConfigError(f"--from {p}: the run has not finished, so it has no final weights; evaluate one of "
                              f"its checkpoints explicitly (--from {p}/iter_N.pth; complete ones: {have})")
        final = int(rec["config"]["schedule_resolved"]["max_iters"])
        ckpt = p / f"iter_{final}.pth"
        if ckpt not in complete_checkpoints(p):
            raise ConfigError(f"--from {p}: its final checkpoint {ckpt.name} is missing or incomplete")
    else:
        ckpt = p
    iteration = None
    if ckpt.suffix != ".safetensors":
        import re
        m = re.fullmatch(r"iter_(\d+)\.pth", ckpt.name)
        if m:
            iteration = int(m.group(1))
        else:
            import torch
            allow_mmengine_checkpoint_types()
            try:
                meta = torch.load(ckpt, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
                raise ConfigError(f"--from {ckpt}: not a readable weights file ({type(e).__name__}: {e})") from None
            if isinstance(meta, dict) and isinstance(meta.get("meta"), dict) and "iter" in meta["meta"]:
                iteration = int(meta["meta"]["iter"])
    if run_dir is not None:
        final_iter = int(ident["profile"].get("schedule", {}).get("length", -1)) if rec is None else \
            int(rec["config"]["schedule_resolved"]["max_iters"])
        is_final = rec is not None and iteration == final_iter
        default = run_dir / ("eval-only" if is_final else f"eval-only-iter{iteration}")
    else:
        default = Path("runs") / task.name / f"{ckpt.stem}-eval-only"
    return {"run": ident, "run_dir": str(run_dir) if run_dir else None, "record": rec, "checkpoint": str(ckpt),
            "sha256": checkpoint_digest(str(ckpt)), "iteration": iteration, "default_work_dir": default}


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_trained_weights(model: Any, source: dict[str, Any]) -> None:
    """Every tensor of the model from ``source['checkpoint']``, strictly: a missing, unexpected or
    mis-shaped tensor is an error naming them (evaluation-only must evaluate exactly those weights)."""
    import torch

    from .state import allow_mmengine_checkpoint_types

    path = Path(source["checkpoint"])
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        allow_mmengine_checkpoint_types()
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise ConfigError(f"{path}: expected an mmengine checkpoint (with 'state_dict') or a state dict of tensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return f"{len(xs)} ({', '.join(xs[:5])}{', ...' if len(xs) > 5 else ''})"
        raise ConfigError(f"{path}: does not fit the model this run builds: missing {few(missing)}, unexpected "
                          f"{few(unexpected)}, other shapes {few(shapes)} (another task, head or backbone?)")
    model.load_state_dict(sd, strict=True)


# ----------------------------------------------------------- prediction state
PREDICTIONS_META = "meta.json"


def _meta_file(predictions: str | Path) -> Path:
    p = Path(predictions)
    return p / PREDICTIONS_META if p.is_dir() or not p.suffix else p.parent / PREDICTIONS_META


def read_predictions_meta(f: Path) -> dict[str, Any] | None:
    """A predictions ``meta.json`` as a dict: None when there is no such file, {} when it does not
    read as a JSON object (a run killed while writing it: atomic writes make that rare)."""
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def predictions_state(predictions: str | Path) -> dict[str, Any] | None:
    """The ``evaluation`` section of a predictions folder's meta.json (iteration, complete, final,
    eval_only); {} when meta.json exists but does not say (an older fourm-eval, or a run killed
    while writing it); None without meta.json (another project's predictions)."""
    meta = read_predictions_meta(_meta_file(predictions))
    if meta is None:
        return None
    ev = meta.get("evaluation")
    return dict(ev) if isinstance(ev, dict) else {}


def update_predictions_meta(pred_dir: str | Path, entries: dict[str, Any],
                            evaluation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge top-level ``entries`` (and ``evaluation`` into the ``evaluation`` section) into
    ``pred_dir/meta.json``, created if absent; everything else is kept. Returns the new content."""
    f = Path(pred_dir) / PREDICTIONS_META
    meta = read_predictions_meta(f) or {}
    meta.update(entries)
    if evaluation:
        ev = meta.get("evaluation")
        meta["evaluation"] = {**(ev if isinstance(ev, dict) else {}), **evaluation}
    atomic_write_json(f, meta)
    return meta


def mark_predictions(pred_dir: str | Path, **fields: Any) -> None:
    """Merge ``fields`` into the ``evaluation`` section of ``pred_dir/meta.json`` (created if absent;
    whatever else the task wrote there is kept)."""
    update_predictions_meta(pred_dir, {}, {**fields, "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})