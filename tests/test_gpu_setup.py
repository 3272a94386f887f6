"""The GPU path of the setup, checked on CPU: the mmcv wheel's cache key and build plan
(fourm_eval/wheelkey.py, used by scripts/setup.sh), and the device-op checks of `doctor` and `run`
(fourm_eval/doctor.py) with an op replaced by one that raises, as a CPU-only mmcv does on a CUDA tensor."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest

from fourm_eval import wheelkey as wk
from fourm_eval.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
WHEEL = "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"


def plan(torch_cuda=None, toolkit=None, visible=(), arch=None, torch="2.14.1+cu128", py="cp311", home=None):
    return wk.plan_build(torch_version=torch, torch_cuda=torch_cuda, python_tag=py, toolkit=toolkit, cuda_home=home,
                         visible=list(visible), arch_env=arch)


def test_plans_and_keys():
    assert plan().key == "torch-2.14.1/cpu/cp311" and plan().env()["FORCE_CUDA"] == "0"
    p = plan("12.8", "12.8", visible=[(8, 0), (9, 0), (8, 0)])
    assert p.key == "torch-2.14.1/cu12.8-sm80+sm90/cp311" and p.words == "CUDA 12.8 ops for sm_80, sm_90"
    assert p.env() == {"MMCV_WITH_OPS": "1", "FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "8.0;9.0"}
    # the list given wins over the visible GPUs (a login node building for the cluster's)
    assert plan("12.8", "12.8", visible=[(7, 5)], arch="9.0+PTX;8.0").key == "torch-2.14.1/cu12.8-sm80+sm90ptx/cp311"
    assert plan("12.8", "12.8", arch="80, 90").arch == ["8.0", "9.0"]
    # no toolkit, or no GPU and no list: CPU-only ops, said in a note
    for p in (plan("12.8", None, visible=[(9, 0)]), plan("12.8", "12.8")):
        assert p.cuda is None and p.key.endswith("/cpu/cp311") and p.notes
    assert "TORCH_CUDA_ARCH_LIST" in plan("12.8", "12.8").notes[0]
    # another minor of the same major: torch's builder accepts it (noted); another major: a named error
    assert plan("12.8", "12.4", visible=[(9, 0)]).key == "torch-2.14.1/cu12.4-sm90/cp311"
    with pytest.raises(wk.PlanError, match=r"CUDA 11\.8, torch 2\.14\.1\+cu128 was built with CUDA 12\.8.*cuda/12\.8"):
        plan("12.8", "11.8", visible=[(9, 0)], home="/opt/cuda-11.8")
    with pytest.raises(wk.PlanError, match="not a compute capability"):
        plan("12.8", "12.8", arch="hopper")


def test_every_incompatible_combination_has_its_own_key():
    combos = list(itertools.product(["2.14.1", "2.13.0"], [None, "12.8", "13.0"], [None, "8.0", "8.0;9.0"],
                                    ["cp311", "cp312"]))
    keys = {}
    for torch, cuda, arch, py in combos:
        p = plan(cuda, cuda, arch=arch, torch=torch, py=py, visible=[(8, 6)])
        keys.setdefault(p.key, set()).add((torch, cuda, arch or "8.6", py))
    # one key per (torch, cuda, arch list, python) combination; a CPU build ignores the arch list
    assert len(keys) == 2 * 2 * (1 + 2 * 3)
    for key, members in keys.items():
        assert len({(t, c, a if c else None, y) for t, c, a, y in members}) == 1, (key, members)


def _wheel(folder: Path, key=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / WHEEL).write_bytes(b"PK\x03\x04 a wheel")
    if key is not None:
        (folder / wk.BUILD_FILE).write_text('{"key": "%s"}' % key)
    return folder / WHEEL


def test_a_cpu_only_wheel_is_never_picked_for_a_cuda_key(tmp_path):
    cpu, cuda = plan(), plan("12.8", "12.8", visible=[(9, 0)])
    other_arch = plan("12.8", "12.8", visible=[(8, 0)])
    house = tmp_path / "wheelhouse"
    flat = _wheel(house)                                          # unlabelled, as a plain wheelhouse holds them
    assert wk.pick_wheel(house, cpu, "mmcv-2.1.0-*.whl") == flat
    assert wk.pick_wheel(house, cuda, "mmcv-2.1.0-*.whl") is None
    mislabelled = _wheel(house / cuda.key, key=cpu.key)           # a CPU build under a CUDA key's folder
    assert wk.pick_wheel(house, cuda, "mmcv-2.1.0-*.whl") is None
    mislabelled.unlink()
    built = _wheel(house / cuda.key, key=cuda.key)
    assert wk.pick_wheel(house, cuda, "mmcv-2.1.0-*.whl") == built
    assert wk.pick_wheel(house, other_arch, "mmcv-2.1.0-*.whl") is None   # sm_80 is not sm_90's build
    # the label the setup writes beside a wheel it built
    (house / other_arch.key).mkdir(parents=True)
    wk.write_build_file(house / other_arch.key, other_arch)
    assert '"key": "torch-2.14.1/cu12.8-sm80/cp311"' in (house / other_arch.key / wk.BUILD_FILE).read_text()


def test_the_setup_reads_the_plan_as_shell_assignments():
    """setup.sh evaluates `python fourm_eval/wheelkey.py plan` (run as a script, before the package is installed)."""
    r = subprocess.run(["bash", "-c", f'eval "$({sys.executable} fourm_eval/wheelkey.py plan 2>/dev/null)"; '
                                      'echo "$MMCV_KEY|$MMCV_WORDS|$MMCV_BUILD_ENV"'],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    key, words, env = r.stdout.strip().split("|")
    assert r.returncode == 0 and key.startswith("torch-") and key.endswith("/cp311") and words and "MMCV_WITH_OPS=1" in env
    assert "wheelkey.py plan" in (ROOT / "scripts" / "setup.sh").read_text()


@pytest.mark.parametrize("op", ["nms", "roi_align"])
def test_a_failing_device_op_is_a_named_error_in_doctor_and_run(monkeypatch, op):
    import mmcv.ops

    from fourm_eval.doctor import device_ops_check, require_device_ops, run_checks

    assert device_ops_check("cpu").ok  # the real ops run here

    def broken(*a, **k):
        raise RuntimeError(f"{op}_impl: implementation for device cuda:0 not found.")

    monkeypatch.setattr(mmcv.ops, op, broken)
    c = device_ops_check("cpu")
    assert not c.ok and c.detail.startswith(f"{op} fails: RuntimeError: {op}_impl") and c.fix
    with pytest.raises(ConfigError, match=rf"coco-det needs mmcv's compiled ops on cpu, .* {op} fails.*Fix: "):
        require_device_ops("coco-det", "cpu")
    r = run_checks()
    assert not r.ok and any(x.name == "mmcv ops on cpu" and not x.ok for x in r.checks)
    assert not r.tasks["coco-det"][0] and "mmcv ops" in r.tasks["coco-det"][1]
    assert r.tasks["in1k-cls"][0]  # a task without mmcv ops still runs
