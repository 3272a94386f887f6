"""The task seam: every registered task honours the contract, and shared code knows no task by name."""

import re
from pathlib import Path

import pytest

from fourm_eval.tasks import all_tasks, get_task
from fourm_eval.tasks.base import Task
from fourm_eval.tasks.profiles import list_profiles, load_profile
from task_context import run_context_for

ROOT = Path(__file__).resolve().parent.parent
TASKS = list(all_tasks().values())


def test_registry_finds_tasks():
    assert TASKS and all(isinstance(t, Task) for t in TASKS)
    for t in TASKS:
        assert get_task(t.name) is t and get_task(t.data_kind) is t


def test_registry_loads_without_torch():
    """The task scan (results, report, evaluate, data check) imports no torch, mm model or evaluator
    code: a task module defines its mm classes where ``register_mm`` reaches them."""
    import subprocess
    import sys

    code = ("import sys; from fourm_eval.tasks import all_tasks; ts = all_tasks(); "
            "[t.metric(t.main_metrics[0]) for t in ts.values()]; "
            "print(len(ts), sorted(m for m in ('torch', 'mmengine.model', 'mmengine.evaluator', 'mmdet', 'mmseg', "
            "'timm', 'mmcv') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 1) == [str(len(TASKS)), "[]\n"], r.stdout


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_metrics_are_described(task):
    names = [m.name for m in task.metrics]
    assert len(names) == len(set(names))
    assert task.main_metrics and task.gated_metrics
    assert all(m.unit and isinstance(m.higher_is_better, bool) for m in task.metrics)
    assert set(task.requires) and task.prediction_format and task.mm_scope


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_profiles_name_their_protocol(task):
    """Every profile resolves to a named protocol; a protocol's own file (<task>.<protocol>.yaml) declares that
    name and holds every key its derived profiles set (they state only what differs); `paper` is one of the
    task's protocols, and each protocol with its own file has a smoke on the mini data (the paper protocol's
    is `smoke`, another's `<protocol>-smoke`)."""
    profiles = list_profiles(task.name)
    assert {"paper", "short", "smoke"} <= set(profiles)

    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            if isinstance(v, dict) and not (v and set(v) <= {"tiny", "b", "l", "xl", "default"}):
                out |= keys(v, prefix + k + ".")
            else:
                out.add(prefix + k)
        return out - {"profile_file", "profile"}

    loaded = {p: load_profile(task.name, p) for p in profiles}
    own = {p for p in profiles if loaded[p]["protocol"] == p}
    assert loaded["paper"]["protocol"] in own, "paper must be one of the task's protocols"
    for p, cfg in loaded.items():
        proto = cfg["protocol"]
        if proto in own:
            assert keys(loaded[proto]) <= keys(cfg), (p, keys(loaded[proto]) - keys(cfg))
    smokes = {loaded[p]["protocol"] for p in profiles if p == "smoke" or p.endswith("-smoke")}
    assert own <= smokes, f"protocols without a smoke profile: {sorted(own - smokes)}"


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.name)
def test_model_builds_and_record_holds_main_metrics(task, tmp_path):
    """The task's model config builds, and evaluator output maps onto every main metric."""
    from mmengine.config import ConfigDict
    from mmengine.registry import MODELS, DefaultScope

    root = task.make_mini(tmp_path / "mini", seed=1)
    p = load_profile(task.name, "smoke")
    data = task.check_data(root, p, skip_bad_images=False, out_dir=tmp_path / "data", log=lambda _: None)
    assert data.n_train > 0 and data.n_val > 0 and data.record
    if task.probe_only:  # a frozen-feature probe: no model to build, no training (tasks/probe_run.py)
        from fourm_eval.errors import ConfigError
        from fourm_eval.tasks.probe_run import is_probe
        assert is_probe(p)
        with pytest.raises(ConfigError, match="frozen-feature probe"):
            task.runner_parts(None)
        assert task.footnote({"task": task.name, "profile": "smoke", "config": p})
        return
    task.register_mm()
    parts = task.runner_parts(run_context_for(task, p, data, tmp_path / "pred"))
    assert {"model", "train_dataset", "val_dataset", "val_evaluator"} <= set(parts)
    with DefaultScope.overwrite_default_scope(task.mm_scope):
        model = MODELS.build(ConfigDict(parts["model"]))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert task.footnote({"task": task.name, "profile": "smoke", "config": p})


def test_regress_uses_registered_directions():
    """A lower-is-better metric registered by a task flips the gate's drop."""
    from fourm_eval.regress import judge

    assert judge(0.5, 0.0, 2, [0.4], 3.0, 0.01, higher_is_better=True)[0]
    assert not judge(0.5, 0.0, 2, [0.4], 3.0, 0.01, higher_is_better=False)[0]


SHARED = ["fourm_eval/cli.py", "fourm_eval/results.py", "fourm_eval/report.py", "fourm_eval/regress.py",
          "fourm_eval/doctor.py", "tasks/runner.py", "tasks/runs.py", "tasks/mm.py", "tasks/profiles.py"]


@pytest.mark.parametrize("path", SHARED)
def test_shared_code_names_no_task_or_task_metric(path):
    text = (ROOT / path).read_text()
    for t in TASKS:
        for word in {t.name, t.data_kind, *(m.name for m in t.metrics)}:
            assert not re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text), f"{path} names {word!r}"


def test_makefile_gate_names_no_task():
    text = (ROOT / "Makefile").read_text()
    gate = text[text.index("ci-gate:"):text.index("bench:")]
    for t in TASKS:
        assert t.name not in gate
