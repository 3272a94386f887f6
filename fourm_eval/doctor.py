"""`fourm-eval doctor`: is this machine able to run each task, and if not, how to fix it."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

SETUP_FIX = "run `make setup` (scripts/setup.sh) in the fourm-eval checkout"
TESTED = {"torch": "2.14.1", "torchvision": "0.29.1", "timm": "1.0.31", "mmengine": "0.10.7", "mmcv": "2.1.0",
          "mmdet": "3.3.0", "mmsegmentation": "1.2.2"}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False  # works, but differs from the tested stack


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    tasks: dict[str, tuple[bool, list[str]]] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pkg_check(dist: str, module: str | None = None) -> Check:
    v = _version(dist)
    if v is None:
        return Check(dist, False, "not installed", SETUP_FIX)
    try:
        mod = importlib.import_module(module or dist)
        v = str(getattr(mod, "__version__", v))  # e.g. torch's '+cu130' build tag
    except Exception as e:  # noqa: BLE001 - report any import failure
        return Check(dist, False, f"{v} installed but import fails: {type(e).__name__}: {e}", SETUP_FIX)
    tested = TESTED.get(dist)
    if tested and v.split("+")[0] != tested:
        return Check(dist, True, f"{v} (tested: {tested})", f"pin {dist}=={tested} for the tested stack", warn=True)
    return Check(dist, True, v)


def run_checks() -> Report:
    r = Report()
    py_ok = sys.version_info[:2] >= (3, 10)
    r.checks.append(Check("python", py_ok, platform.python_version() + f" ({sys.executable})",
                          "" if py_ok else "use Python 3.11 (PYTHON=python3.11 scripts/setup.sh)",
                          warn=sys.version_info[:2] != (3, 11)))
    torch_c = _pkg_check("torch")
    r.checks.append(torch_c)
    if torch_c.ok:
        import torch
        cuda = torch.cuda.is_available()
        devs = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
        bf16 = bool(cuda and torch.cuda.is_bf16_supported())
        r.info.update(cuda=cuda, cuda_version=torch.version.cuda, devices=devs, bf16=bf16,
                      threads=torch.get_num_threads())
        r.checks.append(Check("accelerator", True,
                              f"CUDA {torch.version.cuda}: {', '.join(devs)}; bf16 {'yes' if bf16 else 'no'}" if cuda
                              else f"none (CPU, {torch.get_num_threads()} threads); runs work on CPU, slowly"))
    for dist, mod in (("torchvision", None), ("timm", None), ("safetensors", None), ("mmengine", None),
                      ("mmcv", None), ("mmdet", None), ("mmsegmentation", "mmseg"), ("pycocotools", None),
                      ("pandas", None), ("matplotlib", None)):
        r.checks.append(_pkg_check(dist, mod))
    ops = Check("mmcv ops", False, "mmcv missing", SETUP_FIX)
    if _version("mmcv"):
        try:
            from mmcv.utils import ext_loader
            ext_loader.load_ext("_ext", ["nms", "roi_align_forward", "roi_align_backward"])
            ops = Check("mmcv ops", True, "compiled ops load (nms, roi_align)")
        except Exception as e:  # noqa: BLE001
            ops = Check("mmcv ops", False, f"compiled ops missing ({type(e).__name__}); mmcv was installed "
                        "without MMCV_WITH_OPS (e.g. the 'mmcv-lite' build)", SETUP_FIX + " to build mmcv with ops")
    r.checks.append(ops)
    by = {c.name: c.ok for c in r.checks}
    from .tasks import all_tasks

    need = {t.name: list(t.requires) for t in all_tasks().values()}
    need["report"] = ["pandas", "matplotlib"]  # `fourm-eval report`, not a task
    for task, deps in need.items():
        missing = [d for d in deps if not by.get(d, False)]
        r.tasks[task] = (not missing, missing)
    return r
