"""Transfer tasks, installed as ``fourm_eval.tasks``.

The registry: every module of this package that defines ``TASK`` (an instance
of :class:`fourm_eval.tasks.base.Task`) is a task. Adding a task means adding
one module and its profiles in ``configs/``; nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Metric, Task

# modules of this package that hold shared machinery, not tasks (not imported by the scan)
_SHARED = {"base", "dense_heads", "kits", "mask_paste", "mm", "mmreg", "profiles", "runner", "runs", "state"}
_TASKS: dict[str, "Task"] | None = None


def all_tasks() -> dict[str, "Task"]:
    """name -> Task, in module order."""
    global _TASKS
    if _TASKS is None:
        from .base import Task

        found: dict[str, Task] = {}
        for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            if mod.name.startswith("_") or mod.name in _SHARED:
                continue
            task = getattr(importlib.import_module(f"{__name__}.{mod.name}"), "TASK", None)
            if isinstance(task, Task):
                if task.name in found:
                    raise RuntimeError(f"two modules register the task {task.name!r}")
                found[task.name] = task
        _TASKS = found
    return _TASKS


def get_task(name: str) -> "Task":
    from fourm_eval.errors import ConfigError

    tasks = all_tasks()
    key = name.strip().lower()
    if key in tasks:
        return tasks[key]
    by_data = [t for t in tasks.values() if t.data_kind == key]
    if len(by_data) == 1:
        return by_data[0]
    raise ConfigError(f"unknown task {name!r}; available: {', '.join(tasks)}")


def metric_info(task: str, metric: str) -> "Metric | None":
    """The registered description of a record's metric (None: task or metric not registered)."""
    t = all_tasks().get(task)
    return t.metric(metric) if t else None


__all__ = ["all_tasks", "get_task", "metric_info"]
