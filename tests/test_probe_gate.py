"""The CI gate notices the encoder: the scene-probe smoke (frozen features of the shipped tiny 4M on held-out
generated scenes) run by a *broken copy* of the package, then `fourm-eval regress` against the shipped
expectations (reports/ci/expected.json), must fail.

Each case copies the installed package (fourm_eval with its tasks, baselines and configs) into the test's
folder, edits one line of the copy's model code, and runs the gate's own commands with the copy first on
PYTHONPATH: `fourm-eval run scene-probe --profile smoke --seed 0` (the CI cell) and `fourm-eval regress`.
The breaks are the loader bugs a transfer smoke does not notice (its heads learn the mini tasks from any
tokens): the position table transposed; a checkpoint read with the wrong config (the head count taken as
dim / 64, 2 for the tiny 4M's 4: the tensors' shapes are the same), which the record shows, so the run is
another cell and regress names the setting; and the attention splitting into half the configured heads,
which no record shows and the decoder readout catches. An unedited copy passes: the copying is not what
fails. The checkpoint is the shipped file (same bytes, same sha256, same cell), and each run has its own
feature cache."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fourm_eval
import fourm_eval.baselines
import fourm_eval.configs
import fourm_eval.tasks

from cli_runner import FOURM_EVAL, cli_env

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = ROOT / "reports" / "ci" / "expected.json"
FOURM = "backbones/fourm.py"

# (file in the package, the line as shipped, the broken line)
BREAKS = {
    "intact copy": None,
    "position table transposed": (
        FOURM, "cached = sincos_2d(rows, cols, self.embed_dim).to(device=device, dtype=dtype)",
        "cached = sincos_2d(cols, rows, self.embed_dim).reshape(1, cols, rows, -1).transpose(1, 2)"
        ".reshape(1, rows * cols, -1).to(device=device, dtype=dtype)"),
    "head count read wrong (dim / 64 for the header's)": (
        FOURM, 'kw[i] = int(kw[i])', 'kw[i] = int(kw[i]) if i != "num_heads" else int(kw["dim"]) // 64'),
    "attention splits into half the configured heads": (
        FOURM, "self.num_heads = cfg.num_heads\n        self.qkv = nn.Linear",
        "self.num_heads = cfg.num_heads // 2\n        self.qkv = nn.Linear"),
}
# a config value read wrong is recorded (backbone.architecture): the run is another cell, and regress names
# the setting that differs (exit 2, unusable input); a bug below the config shows in the numbers (exit 1)
RECORDED = {"head count read wrong (dim / 64 for the header's)": "backbone.architecture.num_heads: 4 -> 2"}


def broken_copy(dest: Path, edit: tuple[str, str, str] | None) -> Path:
    """The installed package copied to ``dest/fourm_eval`` (its mapped sub-packages included), with one
    line of one file replaced; the edited line must occur exactly once."""
    pkg = dest / "fourm_eval"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(fourm_eval.__file__).parent, pkg, ignore=ignore)
    for sub in (fourm_eval.tasks, fourm_eval.baselines, fourm_eval.configs):
        name = sub.__name__.split(".")[-1]
        if not (pkg / name).is_dir():  # an editable install maps them from the repository's top level
            shutil.copytree(Path(sub.__path__[0]), pkg / name, ignore=ignore)
    if edit is not None:
        f, good, bad = edit
        text = (pkg / f).read_text()
        assert text.count(good) == 1, f"{f}: the line to break is not there once: {good!r}"
        (pkg / f).write_text(text.replace(good, bad))
    return dest


def scene_probe_expectations(out: Path) -> Path:
    exp = json.loads(EXPECTED.read_text())
    exp["entries"] = [e for e in exp["entries"] if e["task"] == "scene-probe"]
    exp["cells"] = {c: v for c, v in exp.get("cells", {}).items() if any(e["cell"] == c for e in exp["entries"])}
    assert {e["metric"] for e in exp["entries"]} >= {"patch_acc", "decoder_acc"}
    out.write_text(json.dumps(exp))
    return out


@pytest.mark.parametrize("case", list(BREAKS))
def test_the_gate_fails_on_a_broken_loader(case, tmp_path):
    site = broken_copy(tmp_path / "site", BREAKS[case])
    env = {**cli_env(tmp_path), "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import fourm_eval; print(fourm_eval.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr
    run = subprocess.run(FOURM_EVAL + ["run", "scene-probe", "--profile", "smoke", "--seed", "0", "--work-dir",
                                       str(tmp_path / "runs" / "scene-probe")],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    gate = subprocess.run(FOURM_EVAL + ["regress", str(tmp_path / "runs"), "--expected",
                                        str(scene_probe_expectations(tmp_path / "expected.json"))],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    print(case, gate.stdout)
    if BREAKS[case] is None:
        assert gate.returncode == 0 and "0 regression(s)" in gate.stdout, gate.stdout + gate.stderr
    elif case in RECORDED:
        assert gate.returncode == 2 and RECORDED[case] in gate.stderr, gate.stdout + gate.stderr
    else:
        assert gate.returncode == 1, gate.stdout + gate.stderr
        assert any(line.startswith("REGRESSION scene-probe/") and " decoder_acc " in line
                   for line in gate.stdout.splitlines()), gate.stdout
