"""`fourm-eval regress`: fail CI when transfer scores drop for real, and say how big a drop it can see.

Expectations (JSON, ``reports/ci/expected.json`` for this project's CI, schema version 2) are
keyed by *cell* (``fourm_eval.cells``: task, backbone identity, profile and the hash of every
resolved setting, without the seed), and hold per gated metric:

* ``per_seed``: the expected value of each seed (each seed once; repeats merged);
* ``mean``, ``std``, ``n``: over those seeds (``std`` null below two seeds: never a made-up 0);
* ``noise_std``, ``noise_df``: the *within-seed* noise, i.e. how much one seed's result moves when
  only the floating-point rounding differs (measured from noise runs: the same cell started
  from copies of its checkpoint perturbed by about one unit in the last place; see
  ``benchmarks/gate_noise.py``), or null when not measured.

Two rules, direction from the task's metric (a drop is a fall for higher-is-better metrics and
a rise otherwise):

* **paired** (every current seed has a per-seed expectation and the noise is measured):
  ``drop = mean over seeds s of (expected_s - current_s)``,
  ``SE = noise_std * sqrt(2 / n_current)`` (each side one draw of that noise),
  ``REGRESSION iff drop > max(k * SE, floor)``;
* **unpaired** (otherwise): ``drop = expected_mean - current_mean``,
  ``SE = std * sqrt(1 / n_expected + 1 / n_current)``, ``REGRESSION iff drop > max(k * SE, floor)``.

The allowed drop is also the smallest drop the gate can detect at that seed count; ``regress``
prints it for both rules. ``floor`` (per entry, in the metric's units) keeps a zero measured
spread from turning the last digit into a failure.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import CellGroup, group_records, settings_diff
from .errors import FourmEvalError
from .results import atomic_write_json

EXPECTED_SCHEMA = "fourm-eval/expected"
EXPECTED_VERSION = 2
DEFAULT_K = 3.0
MIN_SEEDS = 3
RULE = ("paired (per-seed expectations and a measured within-seed noise): regression iff mean_s(expected_s - "
        "current_s) > max(k * noise_std * sqrt(2 / n_current), floor); otherwise unpaired: regression iff "
        "expected_mean - current_mean > max(k * std * sqrt(1/n_expected + 1/n_current), floor); drops signed by "
        "the metric's direction")


class UnusableInput(FourmEvalError):
    """Expectations or runs cannot be compared (exit code 2)."""


@dataclass
class Verdict:
    cell: str
    task: str
    backbone: str
    profile: str
    metric: str
    rule: str                   # "paired" or "unpaired"
    exp_mean: float
    exp_std: float | None
    exp_n: int
    cur_mean: float
    cur_n: int
    drop: float
    threshold: float            # the allowed drop = the smallest drop this rule detects at cur_n seeds
    unpaired_threshold: float | None  # what the unpaired rule would allow at cur_n seeds (None: no std)
    regression: bool
    note: str = ""
    per_seed: dict[int, tuple[float, float]] = field(default_factory=dict)  # seed -> (expected, current)

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.task, self.backbone, self.profile, self.metric)


# ------------------------------------------------------------------ rules
def judge(exp_mean: float, exp_std: float, exp_n: int, values: list[float], k: float, floor: float,
          higher_is_better: bool = True) -> tuple[bool, float, float]:
    """Unpaired rule: (regression?, drop, allowed drop) for current ``values`` against an expectation."""
    if not values:
        raise UnusableInput("no current values to compare")
    cur = sum(values) / len(values)
    drop = (exp_mean - cur) if higher_is_better else (cur - exp_mean)
    threshold = max(k * unpaired_se(exp_std, exp_n, len(values)), floor)
    return drop > threshold, drop, threshold


def unpaired_se(exp_std: float, exp_n: int, cur_n: int) -> float:
    return exp_std * math.sqrt(1.0 / max(exp_n, 1) + 1.0 / max(cur_n, 1))


def paired_se(noise_std: float, n: int) -> float:
    return noise_std * math.sqrt(2.0 / max(n, 1))


def judge_paired(expected: dict[int, float], current: dict[int, float], noise_std: float, k: float, floor: float,
                 higher_is_better: bool = True) -> tuple[bool, float, float]:
    """Paired rule: (regression?, mean per-seed drop, allowed drop); every current seed needs an
    expected value."""
    missing = sorted(set(current) - set(expected))
    if not current or missing:
        raise UnusableInput(f"paired comparison needs an expected value for every current seed (missing: {missing})")
    drops = [(expected[s] - current[s]) if higher_is_better else (current[s] - expected[s]) for s in current]
    drop = sum(drops) / len(drops)
    threshold = max(k * paired_se(noise_std, len(drops)), floor)
    return drop > threshold, drop, threshold


# ------------------------------------------------------------ expectations
def load_expected(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnusableInput(f"{path}: expectations file not found (create it with `fourm-eval regress "
                            f"RUNS... --update --expected {path}`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnusableInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != EXPECTED_SCHEMA or not isinstance(data.get("entries"), list):
        raise UnusableInput(f"{path}: not a fourm-eval expectations file (schema {EXPECTED_SCHEMA!r} "
                            "with an 'entries' list)")
    if data.get("version") != EXPECTED_VERSION:
        raise UnusableInput(f"{path}: expectations version {data.get('version')!r}; this fourm-eval reads version "
                            f"{EXPECTED_VERSION} (keyed by run cell, per-seed values). Version 1 pooled runs of "
                            "different settings and seeds; re-create it from runs with `regress --update`")
    need = ("cell", "task", "backbone", "profile", "metric", "higher_is_better", "per_seed", "mean", "std", "n",
            "noise_std", "floor")
    for i, e in enumerate(data["entries"]):
        missing = [k for k in need if k not in e]
        if missing:
            raise UnusableInput(f"{path}: entry {i} lacks {missing}")
    return data


def _gated(g: CellGroup) -> list[str]:
    from .tasks import get_task

    try:
        t = get_task(g.task)
    except FourmEvalError:
        return []
    return [m for m in t.gated_metrics if m in g.metrics]


def _direction(task: str, metric: str) -> bool | None:
    from .tasks import metric_info

    info = metric_info(task, metric)
    return None if info is None else info.higher_is_better


def _bb_text(g_or_entry: Any) -> str:
    if isinstance(g_or_entry, CellGroup):
        name, sha, init = g_or_entry.backbone["name"], g_or_entry.backbone["sha256"], g_or_entry.backbone["init"]
    else:
        name, sha, init = g_or_entry["backbone"], g_or_entry.get("checkpoint_sha256"), g_or_entry.get("init")
    return f"{name}@{sha[:8]}" if sha else f"{name}({init or 'random'})"


def noise_from_runs(cells: list[CellGroup], noise_cells: list[CellGroup]) -> dict[str, dict[str, tuple[float, int]]]:
    """cell -> metric -> (pooled within-seed std, degrees of freedom), from noise runs: runs of the
    same task, profile, backbone name and init and the same settings as a cell, started from a
    perturbed copy of its checkpoint (so only their checkpoint sha256 differs). Per seed, the
    cell's value and the noise runs' values form one sample; the variances are pooled over seeds."""
    by_settings: dict[tuple, CellGroup] = {}
    for g in cells:
        by_settings[(g.task, g.profile, g.backbone["name"], g.backbone["init"], g.settings_sha256)] = g
    samples: dict[str, dict[str, dict[int, list[float]]]] = {}
    unmatched = []
    for n in noise_cells:
        g = by_settings.get((n.task, n.profile, n.backbone["name"], n.backbone["init"], n.settings_sha256))
        if g is None or n.cell == g.cell:
            unmatched.append(f"{n.task}/{_bb_text(n)}/{n.profile} (cell {n.cell})")
            continue
        for metric in _gated(g):
            for seed, v in n.per_seed(metric).items():
                base = g.per_seed(metric).get(seed)
                if base is None:
                    continue
                per = samples.setdefault(g.cell, {}).setdefault(metric, {})
                per.setdefault(seed, [base]).append(v)
    if unmatched:
        raise UnusableInput("noise runs that match no expected cell's settings (a noise run is the same task, "
                            "profile and settings, started from a perturbed copy of the checkpoint): "
                            + "; ".join(unmatched))
    out: dict[str, dict[str, tuple[float, int]]] = {}
    for cell, metrics in samples.items():
        for metric, per_seed in metrics.items():
            groups = [v for v in per_seed.values() if len(v) > 1]
            df = sum(len(v) - 1 for v in groups)
            if df:
                ss = sum(sum((x - statistics.fmean(v)) ** 2 for x in v) for v in groups)
                out.setdefault(cell, {})[metric] = (math.sqrt(ss / df), df)
    return out


def default_floor(mean: float, unit: str | None) -> float:
    """The entry's floor: 0.001 for dimensionless metrics (fractions: 0.1 points; ratios such as
    AbsRel), else 0.1% of |mean|. A drop at or below it is never a regression, whatever the
    measured noise: a different last digit is not a finding."""
    return 0.001 if unit in ("fraction", "ratio") else max(1e-6, 0.001 * abs(mean))


def build_expected(records: list[dict[str, Any]], *, k: float = DEFAULT_K, min_seeds: int = MIN_SEEDS,
                   noise_records: list[dict[str, Any]] | None = None, metrics: str = "main") -> dict[str, Any]:
    """Expectations from runs: each cell's gated metrics (``metrics='main'``; 'all' or a comma list
    for others), per-seed values, mean / std over distinct seeds, and the within-seed noise from
    ``noise_records`` when given. Refuses a cell with fewer than ``min_seeds`` distinct seeds."""
    from .tasks import metric_info

    if not records:
        raise UnusableInput("no valid result.json found to build expectations from")
    cells = group_records(records)
    noise = noise_from_runs(cells, group_records(noise_records)) if noise_records else {}
    few = [f"{g.task}/{_bb_text(g)}/{g.profile} (cell {g.cell}): {g.n} seed(s) {sorted(g.seeds)}"
           for g in cells if g.n < min_seeds]
    if few:
        raise UnusableInput(f"expectations need at least {min_seeds} distinct seeds per cell (repeats of a seed "
                            "count once); too few in: " + "; ".join(few) + ". Run more seeds, or pass "
                            "--min-seeds N to accept fewer (a single seed then has no std and is judged only "
                            "with measured noise, --noise-runs)")
    entries, cell_info = [], {}
    for g in cells:
        wanted = _gated(g) if metrics == "main" else g.metrics if metrics == "all" else \
            [m for m in metrics.split(",") if m in g.metrics]
        for metric in wanted:
            per_seed = g.per_seed(metric)
            if not per_seed:
                continue
            mean, std, n = g.stats(metric)
            noise_std, noise_df = noise.get(g.cell, {}).get(metric, (None, 0))
            if std is None and noise_std is None:
                raise UnusableInput(f"{g.task}/{_bb_text(g)}/{g.profile} {metric}: one seed and no noise runs: "
                                    "nothing to judge a drop against (no std is written from one seed)")
            info = metric_info(g.task, metric)
            entries.append({
                "cell": g.cell, "task": g.task, "backbone": g.backbone["name"],
                "checkpoint_sha256": g.backbone["sha256"], "init": g.backbone["init"], "profile": g.profile,
                "settings_sha256": g.settings_sha256, "metric": metric,
                "higher_is_better": _direction(g.task, metric) if info else True,
                "per_seed": {str(s): v for s, v in per_seed.items()}, "mean": mean, "std": std, "n": n,
                "noise_std": noise_std, "noise_df": noise_df,
                "floor": default_floor(mean, info.unit if info else None),
                "repeats": {str(s.seed): s.repeats for s in g.repeated_seeds()},
                "nondeterminism": g.nondeterminism(metric),
            })
            cell_info[g.cell] = {"task": g.task, "profile": g.profile, "backbone": g.backbone,
                                 "settings": g.settings}
    return {"schema": EXPECTED_SCHEMA, "version": EXPECTED_VERSION, "k": k, "rule": RULE, "entries": entries,
            "cells": cell_info}


def write_expected(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)


# --------------------------------------------------------------- compare
def compare(records: list[dict[str, Any]], expected: dict[str, Any], k: float | None = None,
            ignore_unexpected: bool = False) -> list[Verdict]:
    """One verdict per expectation entry. Expectations without matching runs, and (unless
    ``ignore_unexpected``) gated runs without an expectation, are unusable input, named."""
    k = float(k if k is not None else expected.get("k", DEFAULT_K))
    cells = {g.cell: g for g in group_records(records)}
    verdicts: list[Verdict] = []
    missing: list[str] = []
    for e in expected["entries"]:
        g = cells.get(e["cell"])
        if g is None or not g.per_seed(e["metric"]):
            missing.append(_explain_missing(e, expected, cells))
            continue
        hib = bool(e["higher_is_better"])
        if _direction(e["task"], e["metric"]) not in (None, hib):
            raise UnusableInput(f"{e['task']}/{e['metric']}: the expectations file says "
                                f"{'higher' if hib else 'lower'} is better, the task says the opposite")
        cur = g.per_seed(e["metric"])
        exp_seeds = {int(s): float(v) for s, v in e["per_seed"].items()}
        cur_mean = sum(cur.values()) / len(cur)
        unp = (k * unpaired_se(float(e["std"]), int(e["n"]), len(cur))) if e["std"] is not None else None
        unp_thr = None if unp is None else max(unp, float(e["floor"]))
        note = ""
        if e["noise_std"] is not None and set(cur) <= set(exp_seeds):
            reg, drop, thr = judge_paired(exp_seeds, cur, float(e["noise_std"]), k, float(e["floor"]), hib)
            rule = "paired"
        elif e["std"] is not None:
            reg, drop, thr = judge(float(e["mean"]), float(e["std"]), int(e["n"]), list(cur.values()), k,
                                   float(e["floor"]), hib)
            rule = "unpaired"
            if e["noise_std"] is not None:
                note = f"seeds {sorted(set(cur) - set(exp_seeds))} have no per-seed expectation: unpaired rule"
        else:
            raise UnusableInput(f"{e['task']}/{e['metric']} (cell {e['cell']}): the expectation has one seed and "
                                f"no per-seed value for current seeds {sorted(set(cur) - set(exp_seeds))}")
        verdicts.append(Verdict(
            cell=e["cell"], task=e["task"], backbone=_bb_text(e), profile=e["profile"], metric=e["metric"],
            rule=rule, exp_mean=float(e["mean"]), exp_std=None if e["std"] is None else float(e["std"]),
            exp_n=int(e["n"]), cur_mean=cur_mean, cur_n=len(cur), drop=drop, threshold=thr,
            unpaired_threshold=unp_thr, regression=reg, note=note,
            per_seed={s: (exp_seeds.get(s, float("nan")), v) for s, v in cur.items()}))
    if missing:
        raise UnusableInput(f"no runs found for {len(missing)} expectation(s): " + " | ".join(missing))
    ungated = ungated_cells(records, expected)
    if ungated and not ignore_unexpected:
        raise UnusableInput("runs with gated metrics but no expectation (they would pass unchecked): "
                            + "; ".join(ungated) + ". Add them with --update, or let them pass as new with "
                            "--allow-new")
    return verdicts


def ungated_cells(records: list[dict[str, Any]], expected: dict[str, Any]) -> list[str]:
    """The cells of these runs that have gated metrics but no expectation (a new task, profile or
    setting), one line each: task/backbone/profile, cell and the gated metrics."""
    expected_cells = {e["cell"] for e in expected["entries"]}
    return [f"{g.task}/{_bb_text(g)}/{g.profile} (cell {g.cell}; {', '.join(_gated(g))})"
            for g in group_records(records) if g.cell not in expected_cells and _gated(g)]


def _explain_missing(e: dict[str, Any], expected: dict[str, Any], cells: dict[str, CellGroup]) -> str:
    what = f"{e['task']}/{_bb_text(e)}/{e['profile']} {e['metric']} (cell {e['cell']})"
    near = [g for g in cells.values() if g.task == e["task"] and g.profile == e["profile"]
            and g.backbone["name"] == e["backbone"]]
    if not near:
        return f"{what}: no run of this task, backbone and profile"
    want = (expected.get("cells") or {}).get(e["cell"], {}).get("settings")
    parts = []
    for g in near:
        if g.backbone["sha256"] != e.get("checkpoint_sha256") or g.backbone["init"] != e.get("init"):
            parts.append(f"cell {g.cell} has backbone {_bb_text(g)}, the expectation {_bb_text(e)}")
        elif want is not None:
            parts.append(f"cell {g.cell} differs in settings: {settings_diff(want, g.settings)}")
        else:
            parts.append(f"cell {g.cell} has other settings")
    return f"{what}: runs of this task, backbone and profile measure something else ({'; '.join(parts)})"
