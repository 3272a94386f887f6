"""`fourm-eval regress`: fail CI when transfer scores drop for real.

Expectations (JSON, ``reports/ci/expected.json`` for this project's CI) hold,
per (task, backbone, profile, metric), the mean, standard deviation and count
of the metric over seeds, measured by ``regress --update``.

Rule, for a metric where higher is better (mirrored for lower-is-better):

    drop      = expected_mean - current_mean
    SE        = expected_std * sqrt(1 / n_expected + 1 / n_current)
    REGRESSION  iff  drop > k * SE  and  drop > floor

k (default 3) and each entry's absolute floor are stored in the file. The
floor keeps a tiny or zero measured spread (one seed, deterministic CPU runs)
from turning noise-level changes into failures; ``--update`` sets it to
max(0.005, 5% of |mean|) in the metric's own units.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FourmEvalError
from .results import atomic_write_json, records_frame

EXPECTED_SCHEMA = "fourm-eval/expected"
DEFAULT_K = 3.0


class UnusableInput(FourmEvalError):
    """Expectations or runs cannot be compared (exit code 2)."""


@dataclass
class Verdict:
    key: tuple[str, str, str, str]
    exp_mean: float
    exp_std: float
    exp_n: int
    cur_mean: float
    cur_n: int
    drop: float
    threshold: float
    regression: bool


def judge(exp_mean: float, exp_std: float, exp_n: int, values: list[float], k: float, floor: float,
          higher_is_better: bool = True) -> tuple[bool, float, float]:
    """(regression?, drop, threshold) for current ``values`` against an expectation."""
    if not values:
        raise UnusableInput("no current values to compare")
    cur = sum(values) / len(values)
    drop = (exp_mean - cur) if higher_is_better else (cur - exp_mean)
    se = exp_std * math.sqrt(1.0 / max(exp_n, 1) + 1.0 / len(values))
    threshold = max(k * se, floor)
    return (drop > k * se and drop > floor), drop, threshold


def load_expected(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnusableInput(f"{path}: expectations file not found (create it with `fourm-eval regress "
                            f"--update RUNS... --expected {path}`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnusableInput(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != EXPECTED_SCHEMA or not isinstance(data.get("entries"), list):
        raise UnusableInput(f"{path}: not a fourm-eval expectations file (schema {EXPECTED_SCHEMA!r} "
                            "with an 'entries' list)")
    for i, e in enumerate(data["entries"]):
        missing = [k for k in ("task", "backbone", "profile", "metric", "mean", "std", "n", "floor") if k not in e]
        if missing:
            raise UnusableInput(f"{path}: entry {i} lacks {missing}")
    return data


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """(task, backbone, profile, metric) -> values over runs, the metric's direction and gate flag."""
    out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    df = records_frame(records)
    for key, g in df.groupby(["task", "backbone", "profile", "metric"], sort=True):
        out[tuple(key)] = {"values": [float(v) for v in g["value"]], "higher_is_better": g["higher_is_better"].iloc[0],
                           "gated": g["gated"].iloc[0]}
    return out


def compare(records: list[dict[str, Any]], expected: dict[str, Any], k: float | None = None) -> list[Verdict]:
    k = float(k if k is not None else expected.get("k", DEFAULT_K))
    groups = _groups(records)
    verdicts = []
    missing = []
    for e in expected["entries"]:
        key = (e["task"], e["backbone"], e["profile"], e["metric"])
        group = groups.get(key)
        if not group:
            missing.append("/".join(key))
            continue
        values = group["values"]
        if group["higher_is_better"] is None:
            raise UnusableInput(f"{'/'.join(key)}: the task {e['task']!r} is not registered here, so the "
                                "metric's direction is unknown")
        reg, drop, thr = judge(float(e["mean"]), float(e["std"]), int(e["n"]), values, k, float(e["floor"]),
                               higher_is_better=bool(group["higher_is_better"]))
        verdicts.append(Verdict(key, float(e["mean"]), float(e["std"]), int(e["n"]), sum(values) / len(values),
                                len(values), drop, thr, reg))
    if missing:
        raise UnusableInput(f"no runs found for {len(missing)} expectation(s): {', '.join(missing)}")
    return verdicts


def build_expected(records: list[dict[str, Any]], metrics: str = "main", k: float = DEFAULT_K) -> dict[str, Any]:
    if not records:
        raise UnusableInput("no valid result.json found to build expectations from")
    entries = []
    for (task, backbone, profile, metric), group in sorted(_groups(records).items()):
        values = group["values"]
        if metrics == "main" and not group["gated"]:  # the metrics each task marks for the gate
            continue
        if metrics not in ("main", "all") and metric not in metrics.split(","):
            continue
        mean = sum(values) / len(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        entries.append({"task": task, "backbone": backbone, "profile": profile, "metric": metric, "mean": mean,
                        "std": std, "n": len(values), "floor": max(0.005, 0.05 * abs(mean)), "values": values})
    return {"schema": EXPECTED_SCHEMA, "version": 1, "k": k,
            "rule": "regression iff drop > k * std * sqrt(1/n_expected + 1/n_current) and drop > floor",
            "entries": entries}


def write_expected(path: str | Path, data: dict[str, Any]) -> None:
    atomic_write_json(path, data)
