"""Run directories: one per (task, backbone, profile, seed), resumable, never mixed up.

Layout of a run directory::

    run.json            what the run is (task, backbone, checkpoint, data, resolved profile, seed)
    result.json         the final record (written last, atomically)
    eval_step0.json     metrics before training (when the profile evaluates at step 0)
    eval_history.jsonl  every periodic evaluation: {"iter": N, "metrics": {...}}
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
    if checkpoint is None and not random_init:
        if name == "4m":
            return name, str(default_tiny_checkpoint())  # the smoke default: the shipped pre-trained tiny 4M
        if not name.startswith("4m"):
            raise ConfigError(f"{name} needs --checkpoint (a local weights file or a hub id in the local "
                              "cache); pass --random-init to train it from scratch on purpose")
    return name, checkpoint


def checkpoint_digest(path: str) -> str:
    """sha256 of a checkpoint, cached by (path, size, mtime) since XL files are several GB."""
    from fourm_eval.checkpoints import sha256_file
    from fourm_eval.paths import cache_dir

    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir() / "sha256-cache.json"
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key not in table:
        table[key] = sha256_file(path)
        atomic_write_json(cache, table)
    return table[key]


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

    def write_json(self, name: str, data: Any) -> None:
        if rank_zero():
            atomic_write_json(self.path / name, data)

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


def write_result(wd: RunDir, *, task: str, profile: str, seed: int, metrics: dict[str, float],
                 metrics_step0: dict[str, float] | None, backbone: dict, dataset: dict, config: dict,
                 eval_history: list[dict], started: float, warnings: list[str] | None = None,
                 predictions: str | None = None, train_end: dict[str, Any] | None = None,
                 provenance_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    logs = sorted(str(p.relative_to(wd.path)) for p in wd.path.glob("*/vis_data/scalars.json"))
    record = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task": task, "profile": profile, "seed": seed,
        "status": "complete", "metrics": metrics, "metrics_step0": metrics_step0, "eval_history": eval_history,
        "backbone": backbone, "dataset": dataset, "config": config, "provenance": {**provenance(started), **(provenance_extra or {})},
        "warnings": list(warnings or []),
        "train_end": train_end or {},
        "files": {"scalars": logs, "param_groups": "param_groups.csv", "run": "run.json",
                  **({"predictions": predictions} if predictions else {})},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(wd.path / "result.json", record)
    return record


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
