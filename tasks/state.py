"""Run state on disk and in the process: checkpoint files, RNG state, the weights-only
allow-list for mmengine's checkpoints, and CPU process groups.

* mmengine 0.10.7 reloads its checkpoints with plain ``torch.load``, which torch >= 2.6
  runs with ``weights_only=True``. Instead of disabling that, the few non-tensor types
  mmengine stores are allow-listed for the weights-only unpickler.
* A checkpoint is complete when its zip central directory (written last by
  ``torch.save``) reads; incomplete ones are never resumed from.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fourm_eval.errors import ConfigError


def complete_checkpoints(work_dir: Path) -> list[Path]:
    """``iter_N.pth`` files whose zip central directory reads, newest first."""
    import zipfile

    found = []
    for f in work_dir.glob("iter_*.pth"):
        m = re.fullmatch(r"iter_(\d+)\.pth", f.name)
        if not m:
            continue
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            continue
        found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found, reverse=True)]


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(work_dir)[keep:]:
        old.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """python / numpy / torch (and CUDA) RNG state in plain types (loadable with weights_only=True)."""
    out = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
           "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
           "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["torch_cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])
    if s.get("torch_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["torch_cuda"])


def allow_mmengine_checkpoint_types() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own training checkpoints."""
    import collections

    safe: list[Any] = [collections.OrderedDict, collections.defaultdict, np.dtype, np.ndarray,
                       np.core.multiarray._reconstruct if hasattr(np, "core") else None]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        safe += [_reconstruct, scalar]
    except ImportError:  # numpy < 2
        pass
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8", "uint32")]
    torch.serialization.add_safe_globals([s for s in safe if s is not None])


def launcher_env(launcher: str) -> tuple[int, int]:
    """(rank, world size) of this process, from the launcher's own variables, set before anything
    else reads them: the schedule (per-process batch, iterations), the run directory (one writer)
    and the record. torchrun sets RANK / WORLD_SIZE itself; under Slurm they are derived from
    SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (mmengine would set them only when its runner is
    built, too late), and MASTER_ADDR from the first host of SLURM_NODELIST (``scontrol``)."""
    if launcher == "slurm":
        missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS") if v not in os.environ]
        if missing:
            raise ConfigError(f"--launcher slurm, but {', '.join(missing)} is not set: start the command with "
                              "srun (or sbatch + srun)")
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in os.environ:
            os.environ["MASTER_ADDR"] = _first_slurm_host()
        os.environ.setdefault("MASTER_PORT", "29500")
    elif launcher == "pytorch":
        missing = [v for v in ("RANK", "WORLD_SIZE") if v not in os.environ]
        if missing:
            raise ConfigError(f"--launcher pytorch, but {', '.join(missing)} is not set: start the command with "
                              "torchrun")
    elif launcher != "none":
        raise ConfigError(f"--launcher must be none, pytorch or slurm, not {launcher!r}")
    if launcher == "none":
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _first_slurm_host() -> str:
    import subprocess

    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodes:
        return "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"cannot resolve the Slurm node list {nodes!r} with scontrol ({e}); set MASTER_ADDR") \
            from None
    hosts = out.stdout.split()
    if out.returncode or not hosts:
        raise ConfigError(f"scontrol show hostnames {nodes} failed ({out.stderr.strip()[:200]}); set MASTER_ADDR")
    return hosts[0]


def init_distributed_cpu(launcher: str) -> dict[str, Any] | None:
    """mmengine's launchers pin a CUDA device; on CPU-only machines start gloo ourselves.

    Returns a model_wrapper_cfg for the runner (DDP without device_ids) or None on GPUs."""
    if launcher == "none" or torch.cuda.is_available():
        return None
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    launcher_env(launcher)
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    from .mmreg import register as mm_register

    class CPUDistributedDataParallel(MMDistributedDataParallel):
        def __init__(self, module, device_ids=None, **kwargs):  # CPU modules take no device_ids
            super().__init__(module=module, device_ids=None, **kwargs)

    mm_register(MODEL_WRAPPERS)(CPUDistributedDataParallel)
    return dict(type="CPUDistributedDataParallel", broadcast_buffers=False, find_unused_parameters=False)
