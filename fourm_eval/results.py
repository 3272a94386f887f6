"""The per-run result record (``result.json``) and its provenance.

Schema (``schema_version`` 1; documented in docs/results.md):

    schema            "fourm-eval/result"
    schema_version    1
    task              "coco-det" | "ade20k-seg" | "nyu-depth" | "in1k-cls"
    profile, seed     the run's profile name and seed
    status            "complete"
    metrics           {name: value}; COCO AP values are fractions in [0, 1]
    metrics_step0     the same metrics before any training (when evaluated)
    backbone          name, family, checkpoint path, sha256, architecture, params
    dataset           root, annotation sha256 per file, image counts, skipped images
    config            the resolved profile (every value the run used)
    provenance        git commit, fourm-eval and package versions, python, platform,
                      device, command line, start/end time, wall time, peak memory
    files             paths (relative to the run dir) of logs and curves

Writes are atomic (temp file + rename), so a killed run never leaves a
half-written record.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SCHEMA = "fourm-eval/result"
SCHEMA_VERSION = 1
REQUIRED = ("schema", "schema_version", "task", "profile", "seed", "status", "metrics", "backbone", "dataset",
            "config", "provenance")
_PACKAGES = ("torch", "torchvision", "timm", "mmengine", "mmcv", "mmdet", "mmsegmentation", "pycocotools",
             "numpy", "safetensors")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the fourm-eval source tree, when it is a git checkout."""
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def package_versions() -> dict[str, str | None]:
    import importlib.metadata as md
    out: dict[str, str | None] = {}
    for p in _PACKAGES:
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def device_description() -> str:
    import torch
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return f"{n}x {torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_memory_mb() -> dict[str, float]:
    import torch
    out = {"cpu_max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["gpu_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def provenance(started: float) -> dict[str, Any]:
    from . import __version__
    commit, dirty = git_commit()
    return {
        "fourm_eval_version": __version__, "git_commit": commit, "git_dirty": dirty,
        "packages": package_versions(), "python": platform.python_version(), "platform": platform.platform(),
        "hostname": socket.gethostname(), "device": device_description(), "command": sys.argv,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_time_s": round(time.time() - started, 1),
        "peak_memory": peak_memory_mb(),
    }


def validate_record(rec: Any) -> list[str]:
    """Problems with a result record (empty list = valid)."""
    if not isinstance(rec, dict):
        return ["not a JSON object"]
    problems = [f"missing '{k}'" for k in REQUIRED if k not in rec]
    if rec.get("schema") != SCHEMA:
        problems.append(f"schema is {rec.get('schema')!r}, expected {SCHEMA!r}")
    if rec.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version {rec.get('schema_version')!r} is not {SCHEMA_VERSION}")
    m = rec.get("metrics")
    if not isinstance(m, dict) or not all(isinstance(v, (int, float)) for v in m.values()):
        problems.append("metrics must map names to numbers")
    return problems
