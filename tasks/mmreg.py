"""Registering the project's OpenMMLab modules: once, under names no one else uses.

mmengine's registries are process-wide, and the task scan imports every task module, so a
class registered with ``force=True`` silently replaces any other of the same name, from any
module (two tasks each defining a ``SegMetric`` would both build the last one imported).
``register`` refuses that: a name already taken by another definition, in the registry or
in any of its children (mmdet's and mmseg's scopes), is an error naming both modules.
Registering the same definition again (a module imported again, or under another module name,
a function that defines its class each call) is allowed and keeps the newest class object.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from fourm_eval.errors import FourmEvalError

T = TypeVar("T")


class RegistryClashError(FourmEvalError):
    """Two different classes want one name in an OpenMMLab registry."""


def _origin(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _definition(obj: Any) -> tuple[str, str]:
    """What makes two class objects one definition: the source file (one file imported under two
    module names, e.g. ``tasks.x`` from a checkout and ``fourm_eval.tasks.x``, is one definition)
    and the qualified name."""
    import inspect
    import os

    try:
        where = os.path.realpath(inspect.getsourcefile(obj) or "")
    except TypeError:
        where = ""
    return where or getattr(obj, "__module__", "?"), getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))


def _taken(registry: Any, name: str) -> list[tuple[str, Any]]:
    """(scope, object) of every registration of ``name`` in the registry and its descendants."""
    out, todo = [], [registry]
    while todo:
        r = todo.pop()
        if name in r.module_dict:
            out.append((r.scope, r.module_dict[name]))
        todo.extend(r.children.values())
    return out


def register(registry: Any, name: str | None = None) -> Callable[[T], T]:
    """Decorator (or ``register(REG, "Name")(cls)``): put ``cls`` into ``registry`` under ``name``
    (default: the class name). A different definition under that name is a RegistryClashError."""

    def do(cls: T) -> T:
        key = name or cls.__name__
        for scope, old in _taken(registry, key):
            if old is not cls and _definition(old) != _definition(cls):
                raise RegistryClashError(
                    f"OpenMMLab registry {registry.name!r} (scope {scope!r}): the name {key!r} is taken by "
                    f"{_origin(old)}, and {_origin(cls)} wants it too; give one of them another name "
                    "(the project's modules use names of their own, e.g. a Fourm prefix)")
        registry.register_module(key, module=cls, force=key in registry.module_dict)
        return cls

    return do


def once(fn: Callable[[], None]) -> Callable[[], None]:
    """A registration function that runs its body once per process (later calls return at once);
    a body that raises runs again next time."""
    done = False

    @functools.wraps(fn)
    def wrapper() -> None:
        nonlocal done
        if not done:
            fn()
            done = True

    return wrapper
