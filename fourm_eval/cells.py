"""Cells: which result records measure the same thing.

A *cell* is one run identity without its seed: the task, the backbone identity (registered
name, checkpoint sha256, pretrained or random init), the profile, and every resolved setting
the run used (the record's ``config``, its dataset fingerprint, the weights it started from).
Runs that differ in any setting are different cells. Within a cell each seed counts once:
records of the same seed are *repeats*, merged into one value per metric, and how much they
disagree is measured non-determinism.

``report``, ``results ls`` / ``export`` and ``regress`` all group with :func:`group_records`.

What is *not* a setting (it changes how a run executes, not what it measures): paths (the
profile file, the data root, the checkpoint path), the number of processes and data-loader
workers, logging and checkpoint cadence, the profile's time estimate, the loggers. Everything
else in ``config`` is, including values that merely *could* change a number; two runs are
pooled only when nothing they record says they differ.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable

# dotted keys of a record's ``config`` that describe execution, not the measurement
EXECUTION_KEYS = frozenset({
    "profile_file", "world_size", "num_workers", "log_interval", "max_keep_ckpts", "s_per_image_estimate",
    "loggers", "schedule.checkpoint_interval", "per_gpu_batch", "schedule_resolved.per_gpu_batch",
    "schedule_resolved.accumulation",
    "schedule_resolved.checkpoint_interval",
})
# dotted keys of a record's ``dataset`` that are where the data lies, not what it is
DATASET_LOCATION_KEYS = frozenset({"root"})


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted key: value}; lists and scalars are values (JSON-canonical)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            out.update(flatten(obj[k], f"{prefix}{k}."))
        if not obj and prefix:
            out[prefix[:-1]] = {}
        return out
    out[prefix[:-1]] = json.loads(json.dumps(obj, default=str))
    return out


def _is_abs_path(v: Any) -> bool:
    return isinstance(v, str) and v.startswith("/")


def backbone_identity(rec: dict[str, Any]) -> dict[str, Any]:
    """Registered name, checkpoint sha256 (None without a checkpoint) and init of a record's backbone."""
    bb = rec.get("backbone") or {}
    sha = bb.get("sha256")
    init = bb.get("init") or ("checkpoint" if sha or bb.get("checkpoint") else "random")
    return {"name": str(bb.get("name", "?")), "sha256": sha, "init": init}


def settings_of(rec: dict[str, Any]) -> dict[str, Any]:
    """Every setting of a record that could change its numbers, flattened to dotted keys:
    ``config.*`` (less :data:`EXECUTION_KEYS`), ``dataset.*`` (less its location and absolute
    paths), the backbone's architecture and options, the weights a chained run started from (for a staged run: its pre-stage's task, profile and settings hash),
    and for an evaluation-only record: the weights' sha256 when they come from a file outside a
    run, else the iteration when it is not the run's last."""
    out: dict[str, Any] = {}
    for k, v in flatten(rec.get("config") or {}).items():
        if k not in EXECUTION_KEYS:
            out[f"config.{k}"] = v
    for k, v in flatten(rec.get("dataset") or {}).items():
        if k.split(".")[0] not in DATASET_LOCATION_KEYS and not _is_abs_path(v):
            out[f"dataset.{k}"] = v
    bb = rec.get("backbone") or {}
    for part in ("architecture", "options"):
        for k, v in flatten(bb.get(part) or {}).items():
            out[f"backbone.{part}.{k}"] = v
    init_from = (rec.get("provenance") or {}).get("init_from") or {}
    stage = init_from.get("stage") or {}
    if stage.get("settings_sha256"):  # a pre-stage: what it is (task, profile, the hash of its settings), not
        out["init_from.stage"] = f"{stage.get('task')}/{stage.get('profile')}"  # its weights' hash, so the seeds
        out["init_from.stage_settings"] = stage["settings_sha256"]  # of a staged run share one cell (its
        # backbone is this run's own: the record's backbone identity covers it)
    elif init_from.get("sha256"):
        out["init_from.sha256"] = init_from["sha256"]
    ev = rec.get("eval_only") or {}
    final = ((rec.get("config") or {}).get("schedule_resolved") or {}).get("max_iters")
    if ev and ev.get("source_run") is None:  # weights from a file of unknown origin: they are the setting
        out["eval_only.weights_sha256"] = ev.get("weights_sha256")
    elif ev and ev.get("iteration") is not None and ev.get("iteration") != final:
        out["eval_only.iteration"] = ev["iteration"]
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def identity(rec: dict[str, Any]) -> dict[str, Any]:
    """The cell identity of a record: task, backbone identity, profile, settings and their hashes.
    ``cell`` (12 hex digits) names the cell; ``settings_sha256`` is the hash of the settings alone."""
    bb = backbone_identity(rec)
    settings = settings_of(rec)
    settings_sha = _digest(settings)
    key = {"task": rec.get("task"), "backbone": bb, "profile": rec.get("profile"), "settings": settings_sha}
    return {"cell": _digest(key)[:12], "task": rec.get("task"), "profile": rec.get("profile"), "backbone": bb,
            "settings_sha256": settings_sha, "settings": settings}


def clean_value(v: Any) -> float | None:
    """A metric value as a number, or None for "no value" (null, NaN, or COCO's -1 sentinel is
    mapped to None where the metric is produced; here null and NaN)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


@dataclass
class SeedResult:
    """One seed of a cell: its runs (repeats) and one value per metric."""

    seed: int
    records: list[dict[str, Any]] = field(default_factory=list)
    raw: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def runs(self) -> list[str]:
        return [str(r.get("_run_dir") or r.get("_path") or "?") for r in self.records]

    @property
    def repeats(self) -> int:
        return len(self.records)

    def value(self, metric: str) -> float | None:
        """The seed's value: the mean over its repeats that have one (they agree when the run is
        deterministic; when they do not, :meth:`spread` says by how much)."""
        vals = [v for v in self.raw.get(metric, []) if v is not None]
        return sum(vals) / len(vals) if vals else None

    def spread(self, metric: str) -> float | None:
        """max - min over the repeats (0.0: they agree exactly; None: fewer than two values)."""
        vals = [v for v in self.raw.get(metric, []) if v is not None]
        return (max(vals) - min(vals)) if len(vals) > 1 else None


@dataclass
class CellGroup:
    cell: str
    task: str
    profile: str
    backbone: dict[str, Any]
    settings_sha256: str
    settings: dict[str, Any]
    model: dict[str, str]                        # family, size, pretrain, label (results.model_identity)
    seeds: dict[int, SeedResult] = field(default_factory=dict)
    differing: dict[str, Any] = field(default_factory=dict)  # settings that set it apart from its siblings

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def runs(self) -> list[str]:
        return [r for s in self.seeds.values() for r in s.runs]

    @property
    def metrics(self) -> list[str]:
        names: dict[str, None] = {}
        for s in self.seeds.values():
            names.update(dict.fromkeys(s.raw))
        return list(names)

    def per_seed(self, metric: str) -> dict[int, float]:
        """seed -> value, for the seeds that have a value of ``metric``."""
        out = {}
        for seed in sorted(self.seeds):
            v = self.seeds[seed].value(metric)
            if v is not None:
                out[seed] = v
        return out

    def stats(self, metric: str) -> tuple[float | None, float | None, int]:
        """(mean, sample std, n) over distinct seeds; std is None for fewer than two seeds."""
        vals = list(self.per_seed(metric).values())
        if not vals:
            return None, None, 0
        return (sum(vals) / len(vals), statistics.stdev(vals) if len(vals) > 1 else None, len(vals))

    def repeated_seeds(self) -> list[SeedResult]:
        return [s for s in self.seeds.values() if s.repeats > 1]

    def nondeterminism(self, metric: str) -> float | None:
        """The largest disagreement between repeats of one seed (None: no seed was repeated)."""
        spreads = [s.spread(metric) for s in self.repeated_seeds()]
        spreads = [x for x in spreads if x is not None]
        return max(spreads) if spreads else None

    def variant(self, max_keys: int = 4) -> str:
        """The settings that tell this cell from its siblings, as ``key=value`` text ('' if none)."""
        if not self.differing:
            return ""
        items = [f"{_short_key(k)}={_short_value(v)}" for k, v in sorted(self.differing.items())]
        text = ", ".join(items[:max_keys])
        if len(items) > max_keys:
            text += f", +{len(items) - max_keys} more"
        return text


def _short_key(k: str) -> str:
    return k.removeprefix("config.")


def _short_value(v: Any) -> str:
    if v is _ABSENT:
        return "(unset)"
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v[:12]
    return json.dumps(v) if not isinstance(v, str) else v


class _Absent:
    def __repr__(self) -> str:
        return "(unset)"


_ABSENT = _Absent()


def group_records(records: Iterable[dict[str, Any]]) -> list[CellGroup]:
    """Records -> cells, each seed once (repeats merged), sorted by task, model, profile, cell.

    ``differing``: for cells that share task, profile and model label with another cell, the
    settings (and backbone sha256 / init) whose values differ among them."""
    from .results import model_identity

    cells: dict[str, CellGroup] = {}
    for rec in records:
        ident = identity(rec)
        g = cells.get(ident["cell"])
        if g is None:
            g = cells[ident["cell"]] = CellGroup(
                cell=ident["cell"], task=str(rec.get("task")), profile=str(rec.get("profile")),
                backbone=ident["backbone"], settings_sha256=ident["settings_sha256"], settings=ident["settings"],
                model=model_identity(rec))
        seed = int(rec.get("seed", 0))
        sr = g.seeds.setdefault(seed, SeedResult(seed))
        sr.records.append(rec)
        for metric, value in (rec.get("metrics") or {}).items():
            sr.raw.setdefault(metric, []).append(clean_value(value))
    siblings: dict[tuple[str, str, str], list[CellGroup]] = {}
    for g in cells.values():
        siblings.setdefault((g.task, g.profile, g.model["label"]), []).append(g)
    for group in siblings.values():
        if len(group) < 2:
            continue
        views = [{**g.settings, "backbone.sha256": g.backbone["sha256"], "backbone.init": g.backbone["init"]}
                 for g in group]
        keys = sorted(set().union(*views))
        diff = [k for k in keys if len({json.dumps(v.get(k, _ABSENT), default=repr) for v in views}) > 1]
        for g, v in zip(group, views):
            g.differing = {k: v.get(k, _ABSENT) for k in diff}
    return sorted(cells.values(), key=lambda g: (g.task, g.model["label"], g.profile, g.variant(), g.cell))


def settings_diff(a: dict[str, Any], b: dict[str, Any], limit: int = 8) -> str:
    """Human-readable difference of two flattened settings dicts: 'key: A -> B; ...'."""
    keys = sorted(k for k in set(a) | set(b) if a.get(k, _ABSENT) != b.get(k, _ABSENT))
    parts = [f"{_short_key(k)}: {_short_value(a.get(k, _ABSENT))} -> {_short_value(b.get(k, _ABSENT))}"
             for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"... ({len(keys) - limit} more)")
    return "; ".join(parts)
