"""No silent replacement in OpenMMLab's process-wide registries: a name taken by another definition is an
error naming both modules; the same definition registered again is fine; the project registers only
through tasks/mmreg.py."""

import re
import types
from pathlib import Path

import pytest
from mmengine.registry import Registry

from fourm_eval.tasks.mmreg import RegistryClashError, register

ROOT = Path(__file__).resolve().parents[1]


def _class_in_module(module_name: str, cls_name: str = "SegMetric") -> type:
    mod = types.ModuleType(module_name)
    exec(f"class {cls_name}:\n    pass\n", mod.__dict__)  # noqa: S102 - a literal class statement of the test's own
    return getattr(mod, cls_name)


def test_two_tasks_defining_one_name_is_an_error_naming_both():
    reg = Registry("metric-test")
    a = _class_in_module("fourm_eval.tasks.ade20k_seg")
    b = _class_in_module("fourm_eval.tasks.cityscapes_seg")
    register(reg)(a)
    with pytest.raises(RegistryClashError) as e:
        register(reg)(b)
    msg = str(e.value)
    assert "fourm_eval.tasks.ade20k_seg.SegMetric" in msg and "fourm_eval.tasks.cityscapes_seg.SegMetric" in msg
    assert reg.get("SegMetric") is a                      # the first stays


def test_a_name_taken_in_a_child_scope_is_a_clash_too():
    parent = Registry("model-test")
    child = Registry("model-test", parent=parent, scope="mmdet-like")
    register(child, "Neck")(_class_in_module("mmdet_like.necks", "Neck"))
    with pytest.raises(RegistryClashError, match="mmdet-like"):
        register(parent, "Neck")(_class_in_module("fourm_eval.tasks.mm", "Neck"))


def test_the_same_definition_again_is_allowed():
    reg = Registry("hook-test")
    first = _class_in_module("fourm_eval.tasks.mm", "EvalHook")
    again = _class_in_module("fourm_eval.tasks.mm", "EvalHook")  # the module executed a second time
    register(reg)(first)
    register(reg)(first)
    register(reg)(again)
    assert reg.get("EvalHook") is again


def test_the_project_registers_only_through_mmreg_and_every_task_registers_twice():
    """No `register_module(` call (with or without force) outside tasks/mmreg.py, and every task's
    modules register (twice: idempotent) with no clash among them."""
    calls = [f"{p.relative_to(ROOT)}:{i}" for d in ("tasks", "fourm_eval", "baselines") for p in (ROOT / d).rglob("*.py")
             if p.name != "mmreg.py"
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"\.register_module\(", line)]
    assert not calls, calls
    from fourm_eval.tasks import all_tasks
    for _ in range(2):
        for task in all_tasks().values():
            task.register_mm()
