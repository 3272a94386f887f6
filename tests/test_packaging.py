"""A regular (non-editable) install carries every part of the suite."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_top_level_folders_and_works(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wheel, = (tmp_path / "dist").glob("fourm_eval-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for mod in ("fourm_eval/cli.py", "fourm_eval/backbones/fourm.py", "fourm_eval/baselines/timm_vit.py",
                "fourm_eval/tasks/__init__.py", "fourm_eval/configs/__init__.py",
                "fourm_eval/assets/fourm-tiny-pretrained.safetensors", "fourm_eval/assets/fourm-tiny-pretrained.json",
                "fourm_eval/configs/sweeps/ci.yaml", "fourm_eval/configs/sweeps/table1.yaml"):
        assert mod in names, mod
    assert any(n.endswith("entry_points.txt") for n in names)
    # install into a bare folder and use it from outside the source tree
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    code = ("import fourm_eval, torch\n"
            "from fourm_eval.backbones import build_backbone\n"
            f"assert fourm_eval.__file__.startswith({str(target)!r}), fourm_eval.__file__\n"
            "from fourm_eval.fixtures import default_tiny_checkpoint\n"
            "assert str(default_tiny_checkpoint()).startswith(" + repr(str(target)) + ")\n"
            "bb = build_backbone('4m', checkpoint=default_tiny_checkpoint())\n"
            "from fourm_eval import sweep\n"
            "assert len(sweep.expand(sweep.load_sweep('table1'), sweep.Path('out'))) == 40\n"
            "print(tuple(bb(torch.zeros(1, 3, 32, 32)).shape), build_backbone('mae-b').num_layers)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 4, 128) 12"


def test_environment_has_no_conflicts():
    """The set-up environment is consistent (mmcv was built elsewhere; nothing was downgraded here)."""
    r = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
