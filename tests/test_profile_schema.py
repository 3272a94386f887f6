"""The profile schema (tasks/schema.py, each kit's and task's ``settings``): every shipped profile
holds only declared keys of the declared types; a typo, a wrong type, a value outside the allowed
ones or a missing required key is an error naming the file and the key; --set may give a declared
key the profile leaves out; configs/README.md shows exactly the declared schema."""

import pytest
import yaml

from fourm_eval.configs import CONFIG_DIR
from fourm_eval.errors import ConfigError
from fourm_eval.tasks import all_tasks, get_task
from fourm_eval.tasks.profiles import list_profiles, load_profile
from fourm_eval.tasks.runner import resolve_run_profile
from fourm_eval.tasks.schema import readme_with_schema, settings_of

INFO = {"embed_dim": 128, "num_layers": 4}  # the tiny 4M


def test_every_shipped_profile_validates():
    n = 0
    for name in all_tasks():
        for prof in list_profiles(name):
            load_profile(name, prof)
            n += 1
    assert n >= 12


def _profile(tmp_path, body, name="p.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump({"base": str(CONFIG_DIR / "ade20k-seg.smoke.yaml"), **body}))
    return str(f)


@pytest.mark.parametrize("body,msg", [
    ({"lr_": 0.1}, r"unknown setting 'lr_' for ade20k-seg; known here: .*\blr\b"),
    ({"schedule": {"lenght": 3}}, r"unknown setting 'schedule.lenght' .* schedule.length"),
    ({"lr": "fast"}, r"lr = 'fast'; expected float"),
    ({"lr": {"tiny": 1e-3, "b": "x"}}, r"lr \(size b\) = 'x'; expected float"),
    ({"schedule": {"decay": "linear"}}, r"schedule.decay = 'linear'; one of step, cosine, poly"),
    ({"head": "fpn"}, r"head = 'fpn'; one of convnext, upernet"),
    ({"image_size": [64, 0]}, r"image_size = \[64, 0\]; expected px: int or \[height, width\]"),
    ({"betas": [0.9]}, r"betas = \[0.9\]; expected list of float \(2\)"),
    ({"upernet": {"channels": 1.5}}, r"upernet.channels = 1.5; expected int"),
])
def test_bad_profiles_name_the_file_and_the_key(tmp_path, body, msg):
    path = _profile(tmp_path, body)
    with pytest.raises(ConfigError, match=msg) as e:
        load_profile("ade20k-seg", path)
    assert path in str(e.value)


def test_a_missing_required_key_is_named(tmp_path):
    p = yaml.safe_load((CONFIG_DIR / "nyu-depth.eigen.yaml").read_text())
    del p["loss"]
    f = tmp_path / "no-loss.yaml"
    f.write_text(yaml.safe_dump(p))
    with pytest.raises(ConfigError, match=r"no-loss.yaml: loss is required for nyu-depth"):
        load_profile("nyu-depth", str(f))


def test_set_is_checked_and_may_give_a_declared_key():
    task = get_task("ade20k-seg")
    with pytest.raises(ConfigError, match=r"with --set lr=abc: lr = 'abc'; expected float"):
        resolve_run_profile(task, "smoke", ["lr=abc"], INFO, None)
    with pytest.raises(ConfigError, match=r"--set schedule.poly_pwr: unknown setting; known here: .*poly_power"):
        resolve_run_profile(task, "smoke", ["schedule.poly_pwr=0.9"], INFO, None)
    with pytest.raises(ConfigError, match=r"--set protocol=mae-upernet: the protocol is the profile's own"):
        resolve_run_profile(task, "smoke", ["protocol=mae-upernet"], INFO, None)  # a label never moves alone
    p, _ = resolve_run_profile(task, "smoke", ["schedule.decay=poly", "schedule.poly_power=0.9",
                                               "image_size=[32, 64]"], INFO, None)
    assert p["schedule"]["poly_power"] == 0.9 and p["image_size"] == [32, 64]
    # a task narrows a runner key: nyu-depth takes square crops only
    with pytest.raises(ConfigError, match=r"image_size = \[32, 64\]; expected int"):
        resolve_run_profile(get_task("nyu-depth"), "smoke", ["image_size=[32, 64]"], INFO, None)


def test_kit_and_task_keys_are_declared_in_their_places():
    ade, nyu = settings_of(get_task("ade20k-seg")), settings_of(get_task("nyu-depth"))
    assert ade["upernet.channels"].kind == "int" and ade["color_jitter"].kind == "section"    # kit, task
    assert nyu["color_jitter.saturation"].kind == "range" and nyu["loss"].choices == ("silog", "berhu", "sigloss")
    assert ade["mode"] is nyu["mode"] and ade["linear.layers"].choices == (1, 4)                # the dense kit's
    assert "linear.n_bins" in nyu and "linear.n_bins" not in ade                              # the depth kit's
    assert ade["schedule.decay"].choices == ("step", "cosine", "poly")                      # the runner's


def test_configs_readme_shows_the_declared_schema():
    text = (CONFIG_DIR / "README.md").read_text()
    assert readme_with_schema(text, all_tasks().values()) == text, \
        "configs/README.md is out of date: python -m fourm_eval.tasks.schema --write"
    assert "| `schedule.poly_power` | float | 1.0 |" in text


def test_learning_rates_say_what_they_are(tmp_path):
    """lr is absolute, blr is per 256 images (x total batch / 256, ml-4m's and MAE's rule); a profile gives
    one; in1k-cls, whose protocols write a base lr, refuses a bare lr, naming the key."""
    from fourm_eval.tasks.schema import effective_lr

    task = get_task("in1k-cls")
    p, _ = resolve_run_profile(task, "paper", [], {"embed_dim": 768, "num_layers": 12}, "b")
    assert p["blr"] == 1e-4 and p.get("lr") is None
    # 4M-21's 1e-4 at batch 1024, read as ml-4m reads it (apple/ml-4m run_training_4m.py)
    assert effective_lr(p, 1024) == {"blr": 1e-4, "total_batch": 1024, "lr": 1e-4 * 1024 / 256,
                                     "rule": "blr x total batch / 256"}
    assert effective_lr(resolve_per_size_lin(), 16384)["lr"] == 6.4  # MAE linear probe: 0.1 x 16384 / 256
    with pytest.raises(ConfigError, match=r"with --set lr=0.001: lr = 0.001 and blr = .* are both set"):
        resolve_run_profile(task, "paper", ["lr=0.001"], INFO, "b")
    base = yaml.safe_load((CONFIG_DIR / "in1k-cls.4m-21.yaml").read_text())
    del base["blr"]
    (tmp_path / "paper-lr.yaml").write_text(yaml.safe_dump({**base, "lr": 1e-4}))
    with pytest.raises(ConfigError, match=r"paper-lr.yaml: lr = 0.0001, but in1k-cls's protocols write a base lr"):
        load_profile("in1k-cls", str(tmp_path / "paper-lr.yaml"))
    # a task that takes an absolute lr as written: lr stays; blr is also understood (never both, never neither)
    ade, _ = resolve_run_profile(get_task("ade20k-seg"), "smoke", [], INFO, None)
    assert effective_lr(ade, 8)["lr"] == ade["lr"]
    with pytest.raises(ConfigError, match=r"lr or blr is required for ade20k-seg"):
        resolve_run_profile(get_task("ade20k-seg"), "smoke", ["lr=null"], INFO, None)


def resolve_per_size_lin():
    from fourm_eval.tasks.profiles import resolve_per_size
    return resolve_per_size(load_profile("in1k-cls", "linear"), "b")
