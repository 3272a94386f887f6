"""The CI regression gate: its rule, and exit codes 1 / 0 / 2."""

import json

import pytest
from typer.testing import CliRunner

from fourm_eval.cli import app
from fourm_eval.regress import judge
from records_factory import write_record

runner = CliRunner()


def test_rule_needs_both_k_standard_errors_and_the_floor():
    # SE = 0.02 * sqrt(1/4 + 1/4) = 0.01414; k=3 -> 0.0424
    assert judge(0.50, 0.02, 4, [0.45, 0.45, 0.45, 0.45], k=3, floor=0.01)[0] is True     # drop 0.05
    assert judge(0.50, 0.02, 4, [0.47, 0.47, 0.47, 0.47], k=3, floor=0.01)[0] is False    # drop 0.03 < 3 SE
    assert judge(0.50, 0.0, 1, [0.495], k=3, floor=0.01)[0] is False                      # within the floor
    assert judge(0.50, 0.0, 1, [0.48], k=3, floor=0.01)[0] is True                        # zero spread: floor rules
    assert judge(0.50, 0.02, 4, [0.60], k=3, floor=0.01)[0] is False                      # improvements pass
    reg, drop, thr = judge(0.30, 0.01, 2, [0.25, 0.27], k=2, floor=0.001)
    assert drop == pytest.approx(0.04) and thr == pytest.approx(2 * 0.01) and reg
    assert judge(1.0, 0.1, 2, [1.5], k=1, floor=0.0, higher_is_better=False)[0] is True  # e.g. RMSE rising


def _runs(root, values):
    for s, v in enumerate(values):
        write_record(root, f"s{s}", seed=s, metrics={"box_AP": v, "mask_AP": v / 2, "box_AP50": 2 * v})


def test_update_then_gate(tmp_path):
    exp = tmp_path / "expected.json"
    _runs(tmp_path / "base", [0.30, 0.32])
    r = runner.invoke(app, ["regress", str(tmp_path / "base"), "--expected", str(exp), "--update"])
    assert r.exit_code == 0, r.output
    data = json.loads(exp.read_text())
    entry = next(e for e in data["entries"] if e["metric"] == "box_AP")
    assert entry["mean"] == pytest.approx(0.31) and entry["n"] == 2 and entry["std"] == pytest.approx(0.0141421356)
    _runs(tmp_path / "same", [0.305, 0.318])
    r = runner.invoke(app, ["regress", str(tmp_path / "same"), "--expected", str(exp)])
    assert r.exit_code == 0, r.output
    _runs(tmp_path / "drop", [0.20, 0.21])  # planted drop far beyond tolerance
    r = runner.invoke(app, ["regress", str(tmp_path / "drop"), "--expected", str(exp)])
    assert r.exit_code == 1 and "REGRESSION" in r.output


def test_unusable_input_exits_2(tmp_path):
    _runs(tmp_path / "runs", [0.3])
    r = runner.invoke(app, ["regress", str(tmp_path / "runs"), "--expected", str(tmp_path / "missing.json")])
    assert r.exit_code == 2 and "not found" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert runner.invoke(app, ["regress", str(tmp_path / "runs"), "--expected", str(bad)]).exit_code == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "fourm-eval/expected", "version": 1, "entries": [
        {"task": "coco-det", "backbone": "deit3-l", "profile": "paper", "metric": "box_AP", "mean": 0.5,
         "std": 0.01, "n": 3, "floor": 0.01}]}))
    r = runner.invoke(app, ["regress", str(tmp_path / "runs"), "--expected", str(other)])
    assert r.exit_code == 2 and "no runs found" in r.output
