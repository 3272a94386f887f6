"""The per-run result record (``result.json``) and its provenance.

Schema (``schema_version`` 1; documented in docs/results.md):

    schema            "fourm-eval/result"
    schema_version    1
    task              a registered task's name (`fourm-eval tasks`)
    profile, seed     the run's profile name and seed
    status            "complete"
    metrics           {name: value}, in the units the task declares (fractions in [0, 1] for
                      AP, IoU, accuracy; SI units otherwise); null where the metric has no
                      value (COCO's APs/APm/APl without ground truth of that size)
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

from .errors import FourmEvalError

SCHEMA = "fourm-eval/result"
SCHEMA_VERSION = 1
REQUIRED = ("schema", "schema_version", "task", "profile", "seed", "status", "metrics", "backbone", "dataset",
            "config", "provenance")
_PACKAGES = ("torch", "torchvision", "timm", "mmengine", "mmcv", "mmdet", "mmsegmentation", "pycocotools",
             "numpy", "safetensors")


def atomic_write_json(path: str | Path, obj: Any, fsync: bool = True) -> Path:
    """Write JSON by temp file + rename (a reader never sees half a file); ``fsync=False`` for
    frequent small state (heartbeats) where surviving a power cut does not matter."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        if fsync:
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
    if not isinstance(m, dict) or not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                                          for v in m.values()):
        problems.append("metrics must map names to numbers (or null: no value)")
    return problems


def clean_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Metric values as stored in records: floats, and None ("no value") for NaN, None and COCO's
    -1 sentinel where the caller has already mapped it to NaN (see metrics_coco)."""
    from .cells import clean_value
    return {k: clean_value(v) for k, v in metrics.items()}


# ---------------------------------------------------------------- collection
def finetune_mode(settings: dict[str, Any]) -> str:
    """A run's fine-tuning mode: full, lora or linear. ``settings``: a resolved profile (nested: its
    ``finetune.mode``, else the classification ``mode``) or a cell's flattened settings
    (``config.finetune.mode``, ``config.mode``). Absent: full (every profile before LoRA existed)."""
    ft = settings.get("finetune")
    mode = ft.get("mode") if isinstance(ft, dict) else settings.get("config.finetune.mode")
    if mode == "lora":
        return "lora"
    cls_mode = settings.get("mode", settings.get("config.mode"))
    return "linear" if cls_mode == "linear" else "full"


ENCODER_PARAMS = {"B": 86e6, "L": 303e6, "XL": 1.2e9}  # docs/fourm-checkpoints.md (4M); ViT-B/L alike


class NoRecordsError(FourmEvalError):
    """A path given as run directories matches no result record (exit code 2)."""


def find_records(paths: list[str | Path]) -> list[Path]:
    """Every result.json under the given files/folders (recursively), sorted, unique.
    A path that does not exist, or holds no result.json, is an error naming it: a typo must
    never become a report of zero runs."""
    out: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file() and p.name.endswith(".json"):
            out.add(p.resolve())
        elif p.is_dir():
            found = [q.resolve() for q in p.rglob("result.json")]
            if not found:
                raise NoRecordsError(f"{p}: no result.json below this folder (not a run directory, or no run in "
                                     "it has finished)")
            out.update(found)
        elif p.exists():
            raise NoRecordsError(f"{p}: not a run directory or a result.json file")
        else:
            raise NoRecordsError(f"{p}: no such file or directory")
    return sorted(out)


def load_records(paths: list[str | Path], require: bool = True) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(valid records, [(path, problem)]); a bad record is reported, never fatal. With ``require``,
    finding no valid record at all is an error (every one found is named with its problem)."""
    good, bad = [], []
    for f in find_records(paths):
        try:
            rec = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            bad.append((str(f), f"unreadable JSON ({type(e).__name__}: {e})"))
            continue
        problems = validate_record(rec)
        if problems:
            bad.append((str(f), "; ".join(problems)))
            continue
        rec["_path"] = str(f)
        rec["_run_dir"] = str(f.parent)
        good.append(rec)
    if require and not good:
        listing = "; ".join(f"{p}: {why}" for p, why in bad[:5]) + (f"; ... ({len(bad) - 5} more)" if len(bad) > 5
                                                                   else "")
        raise NoRecordsError(f"no valid result.json in {', '.join(map(str, paths))} ({listing})")
    return good, bad


def model_identity(rec: dict[str, Any]) -> dict[str, str]:
    """Family, size, pre-training data and a display label for a record's backbone."""
    import re

    bb = rec.get("backbone", {})
    name = str(bb.get("name", "?"))
    arch = bb.get("architecture") or {}
    ckpt = str(bb.get("checkpoint") or "")
    if name.startswith("4m"):
        family = "4M"
        dim, depth = arch.get("dim"), arch.get("depth")
        size = {(768, 12): "B", (1024, 24): "L", (2048, 24): "XL"}.get((dim, depth), "tiny" if dim and dim < 768 else "?")
        m = re.search(r"4M-(7|21)_(B|L|XL)(?:_([A-Za-z0-9]+))?", ckpt)
        if m:
            family = f"4M-{m.group(1)}"
            pretrain = m.group(3) or ("CC12M+COYO700M+C4" if m.group(1) == "21" else "?")
        else:
            pretrain = Path(ckpt).stem if ckpt else "random init"
    elif name.startswith("deit3"):
        family, size, pretrain = "DeiT III", name.split("-")[-1].upper(), "IN21K"
    elif name.startswith("mae"):
        family, size, pretrain = "MAE", name.split("-")[-1].upper(), "IN1K"
    else:
        family, size, pretrain = name, "?", "?"
    if not ckpt and name != "4m":
        pretrain = "random init"
    label = f"{family}-{size} ({pretrain})"
    return {"family": family, "size": size, "pretrain": pretrain, "label": label}


FRAME_COLUMNS = ["run_dir", "path", "task", "cell", "variant", "model", "family", "size", "pretrain", "backbone",
                 "checkpoint_sha256", "init", "profile", "settings_sha256", "seed", "repeats_of_seed", "eval_only",
                 "metric", "value", "value_step0", "unit", "higher_is_better", "main", "gated", "display", "git_commit",
                 "wall_time_s", "written_at"]


def records_frame(records: list[dict[str, Any]]):
    """The one tidy table of records: a row per (run, metric), with the run's cell (its identity
    without the seed, ``fourm_eval.cells``) and variant (the settings that set the cell apart from
    cells of the same task, model and profile), how many runs share its seed in that cell, the
    metric's unit, direction and roles from the task registry (None for a task not registered
    here) and ``display`` (fractions x100, as the published tables print them). A metric without a
    value (null in the record) is NaN here, never a number. `results export` writes this table;
    aggregation over seeds goes through ``fourm_eval.cells.group_records``."""
    import pandas as pd

    from .cells import backbone_identity, clean_value, group_records
    from .tasks import metric_info

    cell_of: dict[int, tuple[str, str, int, str]] = {}
    for g in group_records(records):
        for s in g.seeds.values():
            for r in s.records:
                cell_of[id(r)] = (g.cell, g.variant(), s.repeats, g.settings_sha256)
    rows = []
    for rec in records:
        ident = model_identity(rec)
        prov = rec.get("provenance", {})
        step0 = rec.get("metrics_step0") or {}
        cell, variant, repeats, settings_sha = cell_of[id(rec)]
        for metric, raw in rec["metrics"].items():
            info = metric_info(rec["task"], metric)
            value = clean_value(raw)
            v0 = clean_value(step0.get(metric))
            rows.append({
                "run_dir": rec.get("_run_dir"), "path": rec.get("_path"), "task": rec["task"], "cell": cell,
                "variant": variant, "model": ident["label"], "family": ident["family"], "size": ident["size"],
                "pretrain": ident["pretrain"], "backbone": rec["backbone"].get("name"),
                "checkpoint_sha256": rec["backbone"].get("sha256"), "init": backbone_identity(rec)["init"],
                "profile": rec["profile"], "settings_sha256": settings_sha, "seed": rec["seed"], "repeats_of_seed": repeats,
                "eval_only": bool(rec.get("eval_only")),
                "metric": metric, "value": float("nan") if value is None else value,
                "value_step0": float("nan") if v0 is None else v0,
                "unit": info.unit if info else None,
                "higher_is_better": info.higher_is_better if info else None,
                "main": info.main if info else None, "gated": info.gated if info else None,
                "display": float("nan") if value is None else value * (info.display_scale if info else 1.0),
                "git_commit": prov.get("git_commit"), "wall_time_s": prov.get("wall_time_s"),
                "written_at": rec.get("written_at"),
            })
    return pd.DataFrame(rows, columns=FRAME_COLUMNS)


def load_paper_results():
    """The published reference scores shipped with fourm-eval (percent), with source and `verified`."""
    import importlib.resources

    import pandas as pd

    with importlib.resources.files("fourm_eval.data").joinpath("paper_results.csv").open() as f:
        return pd.read_csv(f)
