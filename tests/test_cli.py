"""The command line: every command listed, inspect/doctor output checked against independent facts."""

import hashlib
import json

from safetensors import safe_open
from typer.testing import CliRunner

from fourm_eval.cli import app

runner = CliRunner()


def test_help_lists_commands():
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0
    for cmd in ("backbones", "inspect", "doctor", "forward", "bench"):
        assert cmd in r.output


def test_backbones_lists_all_with_params():
    r = runner.invoke(app, ["backbones", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert {"4m", "4m-b", "4m-l", "4m-xl", "deit3-b", "deit3-l", "mae-b", "mae-l"} <= set(rows)
    assert abs(rows["mae-b"]["params"] - 85.8e6) < 0.1e6  # ViT-B/16 without head
    assert "timm" in rows["deit3-l"]["source"]


def test_inspect_json_matches_file(official_ckpt):
    r = runner.invoke(app, ["inspect", str(official_ckpt), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["sha256"] == hashlib.sha256(official_ckpt.read_bytes()).hexdigest()
    with safe_open(str(official_ckpt), "pt") as f:
        keys = list(f.keys())
    used = [k for k in keys if k.startswith(("encoder.", "encoder_norm."))
            or (k.startswith("encoder_embeddings.rgb@224.") and not k.endswith("pos_emb"))]
    assert sorted(info["keys_used"]) == sorted(used)
    assert sorted(info["keys_ignored"]) == sorted(set(keys) - set(used))
    assert info["config"]["dim"] == 64 and info["config"]["gated_mlp"] is True
    assert info["dtypes"] == {"F32": len(keys)} and info["loadable"]
    assert info["pos_emb_max_abs_diff_vs_sincos"] < 1e-6


def test_inspect_human_output(official_ckpt):
    r = runner.invoke(app, ["inspect", str(official_ckpt)])
    assert r.exit_code == 0
    assert hashlib.sha256(official_ckpt.read_bytes()).hexdigest() in r.output
    assert "decoder.*" in r.output and "loadable" in r.output


def test_inspect_bad_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    r = runner.invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2
    assert "broken.safetensors" in r.output and "Traceback" not in r.output


def test_doctor_reports_versions_and_tasks():
    import torch
    r = runner.invoke(app, ["doctor", "--json"])
    info = json.loads(r.output)
    checks = {c["name"]: c for c in info["checks"]}
    assert checks["torch"]["detail"].startswith(torch.__version__)
    from fourm_eval.tasks import all_tasks
    assert set(info["tasks"]) == set(all_tasks()) | {"report"}  # every registered task, from the registry
    assert r.exit_code == (0 if info["ok"] else 1)
    for name, task in info["tasks"].items():
        assert task["ok"] == (not task["missing"])


def test_forward_on_builtin_data():
    r = runner.invoke(app, ["forward", "--layers", "0,3"])
    assert r.exit_code == 0, r.output
    assert "tokens (1, 196, 128)" in r.output and "finite True" in r.output
