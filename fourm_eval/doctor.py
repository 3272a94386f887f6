"""`fourm-eval doctor`: is this machine able to run each task, and if not, how to fix it."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from pathlib import Path
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
    if ops.ok and torch_c.ok:  # they load; do they run, on every device this machine has?
        import torch
        devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        dev_checks = [device_ops_check(d) for d in devices]
        r.checks += dev_checks
        r.info["mmcv_build"] = installed_build_key()
        if not all(c.ok for c in dev_checks):
            ops.ok = False
            ops.detail += "; but not on " + ", ".join(c.name.removeprefix("mmcv ops on ") for c in dev_checks if not c.ok)
            ops.fix = next(c.fix for c in dev_checks if not c.ok)
    by = {c.name: c.ok for c in r.checks}
    from .tasks import all_tasks

    need = {t.name: list(t.requires) for t in all_tasks().values()}
    need["report"] = ["pandas", "matplotlib"]  # `fourm-eval report`, not a task
    for task, deps in need.items():
        missing = [d for d in deps if not by.get(d, False)]
        r.tasks[task] = (not missing, missing)
    return r


def installed_build_key() -> str | None:
    """The key of the mmcv build the setup installed in this environment (fourm_eval/wheelkey.py), if known."""
    try:
        return (Path(sys.prefix) / ".mmcv-build-key").read_text().strip() or None
    except OSError:
        return None


def device_ops_check(device: str) -> Check:
    """Run mmcv's compiled ``nms`` and ``roi_align`` on a small input on ``device`` and compare them with
    torchvision's (an independent implementation) on the CPU; a failure names the op, the device and the fix."""
    import torch
    from mmcv import ops as mmcv_ops
    from torchvision import ops as tv_ops

    name = f"mmcv ops on {device}"
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [20.0, 20.0, 30.0, 30.0]])
    scores = torch.tensor([0.9, 0.8, 0.7])
    feat = torch.arange(2 * 6 * 6, dtype=torch.float32).view(1, 2, 6, 6)
    rois = torch.tensor([[0.0, 0.5, 0.5, 4.5, 3.5]])
    built = installed_build_key() or "unknown build"
    if device.startswith("cuda"):
        cap = torch.cuda.get_device_capability(torch.device(device))
        fix = (f"this mmcv ({built}) has no kernels for {torch.cuda.get_device_name(torch.device(device))} (sm_{cap[0]}{cap[1]}): "
               f"rerun `make setup` on a GPU node, or with TORCH_CUDA_ARCH_LIST including '{cap[0]}.{cap[1]}' and a CUDA "
               f"{torch.version.cuda} toolkit loaded (README 'Installing on a cluster')")
    else:
        fix = f"this mmcv ({built}) lacks working CPU ops: {SETUP_FIX}"
    step = "nms"
    try:
        _, keep = mmcv_ops.nms(boxes.to(device), scores.to(device), 0.5)
        want = tv_ops.nms(boxes, scores, 0.5)
        if keep.cpu().tolist() != want.tolist():
            return Check(name, False, f"nms kept {keep.cpu().tolist()}, torchvision {want.tolist()}", fix)
        step = "roi_align"
        got = mmcv_ops.roi_align(feat.to(device), rois.to(device), (2, 2), 1.0, 2, "avg", True).cpu()
        ref = tv_ops.roi_align(feat, rois, (2, 2), 1.0, 2, True)
        if not torch.allclose(got, ref, atol=1e-4):
            return Check(name, False, f"roi_align differs from torchvision's by {(got - ref).abs().max():.3g}", fix)
    except Exception as e:  # noqa: BLE001 - what the op raised is the detail
        return Check(name, False, f"{step} fails: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                     fix)
    return Check(name, True, "nms and roi_align run and agree with torchvision")


def require_device_ops(task_name: str, device: str) -> None:
    """Before a run builds its model on ``device``: a named error when mmcv's compiled ops do not run there
    (CPU-only ops on a GPU run, a missing architecture), instead of a failure at the first iteration."""
    from .errors import ConfigError

    c = device_ops_check(device)
    if not c.ok:
        raise ConfigError(f"{task_name} needs mmcv's compiled ops on {device}, and they do not run there: {c.detail}. "
                          f"Fix: {c.fix}")

