"""Profiles: `base:` inheritance, unambiguous intervals, per-size values."""

import pytest

from fourm_eval.errors import ConfigError
from fourm_eval.tasks.profiles import apply_overrides, load_profile, resolve_interval, resolve_per_size


def test_base_inheritance_merges_sections(tmp_path):
    paper = load_profile("coco-det", "paper")
    child = tmp_path / "mine.yaml"
    child.write_text("base: paper\nlr: 3.0e-4\nschedule:\n  length: 7\nhead:\n  mask_convs: 1\n")
    p = load_profile("coco-det", str(child))
    assert p["lr"] == 3e-4 and p["schedule"]["length"] == 7 and p["head"]["mask_convs"] == 1
    # everything not stated comes from the base, nested keys included
    assert p["schedule"]["milestones"] == paper["schedule"]["milestones"]
    assert p["head"]["fc_channels"] == paper["head"]["fc_channels"]
    assert p["layer_decay"] == paper["layer_decay"] and p["profile"] == "mine"


def test_base_chain_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\nlr: 1\n")
    b.write_text("base: a.yaml\nlr: 2\n")
    with pytest.raises(ConfigError, match="loops"):
        load_profile("coco-det", str(a))
    c = tmp_path / "c.yaml"
    c.write_text("base: nosuch\n")
    with pytest.raises(ConfigError, match="no profile 'nosuch'"):
        load_profile("coco-det", str(c))


def test_per_size_values_replace_not_merge(tmp_path):
    child = tmp_path / "x.yaml"
    child.write_text("base: paper\nlayer_decay: 0.5\ndrop_path: {b: 0.3, default: 0.0}\n")
    p = load_profile("coco-det", str(child))
    assert p["layer_decay"] == 0.5 and p["drop_path"] == {"b": 0.3, "default": 0.0}
    assert resolve_per_size(p, "b")["drop_path"] == 0.3 and resolve_per_size(p, "l")["drop_path"] == 0.0


@pytest.mark.parametrize("value,iters", [(300, 300), (1, 1), ("10%", 100), ("2.5%", 25), ("100%", 1000)])
def test_intervals(value, iters):
    assert resolve_interval(value, 1000, "schedule.val_interval") == iters


@pytest.mark.parametrize("value", [1.0, 0.1, "0.1", True, None, 0, "150%"])
def test_ambiguous_intervals_are_refused(value):
    with pytest.raises(ConfigError, match="schedule.val_interval"):
        resolve_interval(value, 1000, "schedule.val_interval")


def test_set_overrides_reach_nested_keys_and_refuse_typos():
    p = apply_overrides(load_profile("coco-det", "smoke"), ["schedule.val_interval='50%'", "lr=1e-3"])
    assert p["schedule"]["val_interval"] == "50%" and p["lr"] == 1e-3
    with pytest.raises(ConfigError, match="unknown setting"):
        apply_overrides(p, ["schedule.val_intervall=3"])
