"""The CI regression gate: its two rules (hand-computed), expectations keyed by run cell, the
refusals (too few seeds, version-1 files, runs without expectations), and exit codes 1 / 0 / 2."""

import json
import math

import pytest
from typer.testing import CliRunner

from fourm_eval.cli import app
from fourm_eval.regress import judge, judge_paired
from records_factory import write_record

runner = CliRunner()


def test_unpaired_rule_needs_both_k_standard_errors_and_the_floor():
    # SE = 0.02 * sqrt(1/4 + 1/4) = 0.01414; k=3 -> 0.0424
    assert judge(0.50, 0.02, 4, [0.45, 0.45, 0.45, 0.45], k=3, floor=0.01)[0] is True     # drop 0.05
    assert judge(0.50, 0.02, 4, [0.47, 0.47, 0.47, 0.47], k=3, floor=0.01)[0] is False    # drop 0.03 < 3 SE
    assert judge(0.50, 0.0, 1, [0.495], k=3, floor=0.01)[0] is False                      # within the floor
    assert judge(0.50, 0.0, 1, [0.48], k=3, floor=0.01)[0] is True                        # zero spread: floor rules
    assert judge(0.50, 0.02, 4, [0.60], k=3, floor=0.01)[0] is False                      # improvements pass
    reg, drop, thr = judge(0.30, 0.01, 2, [0.25, 0.27], k=2, floor=0.001)
    assert drop == pytest.approx(0.04) and thr == pytest.approx(2 * 0.01) and reg
    assert judge(1.0, 0.1, 2, [1.5], k=1, floor=0.0, higher_is_better=False)[0] is True  # e.g. RMSE rising


def test_paired_rule_by_hand():
    exp = {0: 0.50, 1: 0.40}
    # per-seed drops 0.02 and -0.01: mean 0.005; SE = 0.01 * sqrt(2/2) = 0.01; allowed 3 * 0.01 = 0.03
    reg, drop, thr = judge_paired(exp, {0: 0.48, 1: 0.41}, noise_std=0.01, k=3, floor=0.001)
    assert (reg, drop, thr) == (False, pytest.approx(0.005), pytest.approx(0.03))
    reg, drop, thr = judge_paired(exp, {0: 0.46, 1: 0.37}, noise_std=0.01, k=3, floor=0.001)
    assert reg and drop == pytest.approx(0.035)
    # one seed: SE = 0.01 * sqrt(2); the floor rules when the noise is tiny
    assert judge_paired(exp, {1: 0.38}, 0.01, 3, 0.001)[2] == pytest.approx(3 * 0.01 * math.sqrt(2))
    assert judge_paired(exp, {0: 0.4985}, 1e-9, 3, 0.001) == (True, pytest.approx(0.0015), pytest.approx(0.001))
    # lower is better: a rise is a drop
    assert judge_paired({0: 0.20}, {0: 0.25}, 0.001, 3, 0.001, higher_is_better=False)[0] is True
    assert judge_paired({0: 0.20}, {0: 0.15}, 0.001, 3, 0.001, higher_is_better=False)[0] is False
    from fourm_eval.regress import UnusableInput
    with pytest.raises(UnusableInput, match="every current seed"):
        judge_paired(exp, {2: 0.5}, 0.01, 3, 0.001)


def _runs(root, values, **kw):
    for s, v in enumerate(values):
        write_record(root, f"s{s}", seed=s, metrics={"box_AP": v, "mask_AP": v / 2, "box_AP50": 2 * v}, **kw)


def _invoke(*args):
    return runner.invoke(app, ["regress", *map(str, args)])


def test_update_paired_gate_and_its_detectable_drop(tmp_path):
    exp = tmp_path / "expected.json"
    _runs(tmp_path / "base", [0.30, 0.32, 0.34])
    # noise runs: the same settings from a perturbed copy of the checkpoint (another sha256)
    for s, v in ((0, 0.302), (1, 0.318)):
        write_record(tmp_path / "noise", f"n{s}", seed=s, sha256="1" * 64,
                     metrics={"box_AP": v, "mask_AP": v / 2, "box_AP50": 2 * v})
    r = _invoke(tmp_path / "base", "--expected", exp, "--update", "--noise-runs", tmp_path / "noise")
    assert r.exit_code == 0, r.output
    data = json.loads(exp.read_text())
    assert data["version"] == 2
    e = next(x for x in data["entries"] if x["metric"] == "box_AP")
    assert e["per_seed"] == {"0": 0.30, "1": 0.32, "2": 0.34} and e["n"] == 3
    assert e["mean"] == pytest.approx(0.32) and e["std"] == pytest.approx(0.02)
    # pooled within-seed std: seed 0 {0.300, 0.302}, seed 1 {0.320, 0.318}: SS = 2e-6 + 2e-6 over 2 df
    assert e["noise_std"] == pytest.approx(math.sqrt(4e-6 / 2)) and e["noise_df"] == 2
    assert {x["metric"] for x in data["entries"]} == {"box_AP", "box_AP50", "mask_AP"}  # the gated ones
    # the CI's two seeds, unchanged: paired, drop 0, allowed max(3 * 0.001414 * sqrt(2/2), 0.001) = 0.0042;
    # the unpaired rule would allow 3 * 0.02 * sqrt(1/3 + 1/2) = 0.0548
    _runs(tmp_path / "same", [0.30, 0.32])
    r = _invoke(tmp_path / "same", "--expected", exp)
    assert r.exit_code == 0, r.output
    line = next(l for l in r.output.splitlines() if l.startswith("ok") and " box_AP [" in l)
    assert "[paired" in line and "allowed 0.0042" in line and "(unpaired rule: 0.0548)" in line
    assert "smallest detectable drop" in r.output and "coco-det box_AP 0.0042 (paired, n=2)" in r.output
    # a drop of 0.01 on each seed: far below the unpaired rule's 3 * 0.02 * sqrt(1/3 + 1/2) = 0.0548, caught by the paired one
    _runs(tmp_path / "drop", [0.29, 0.31])
    r = _invoke(tmp_path / "drop", "--expected", exp)
    assert r.exit_code == 1 and "REGRESSION coco-det" in r.output, r.output
    # a seed without a per-seed expectation: the unpaired rule, said so
    _runs(tmp_path / "other", [0.30, 0.32, 0.34, 0.33])
    r = _invoke(tmp_path / "other", "--expected", exp)
    assert r.exit_code == 0 and "[unpaired" in r.output and "have no per-seed expectation" in r.output


def test_update_refuses_too_few_seeds_and_never_writes_a_std_from_one(tmp_path):
    exp = tmp_path / "expected.json"
    _runs(tmp_path / "two", [0.30, 0.32])
    r = _invoke(tmp_path / "two", "--expected", exp, "--update")
    assert r.exit_code == 2 and "at least 3 distinct seeds" in r.output and not exp.exists()
    # a repeated seed is one seed
    write_record(tmp_path / "two", "s0-again", seed=0, metrics={"box_AP": 0.30, "mask_AP": 0.15, "box_AP50": 0.6})
    r = _invoke(tmp_path / "two", "--expected", exp, "--update")
    assert r.exit_code == 2 and "2 seed(s) [0, 1]" in r.output
    r = _invoke(tmp_path / "two", "--expected", exp, "--update", "--min-seeds", "2")
    assert r.exit_code == 0, r.output
    _runs(tmp_path / "one", [0.30])
    r = _invoke(tmp_path / "one", "--expected", tmp_path / "one.json", "--update", "--min-seeds", "1")
    assert r.exit_code == 2 and "nothing to judge a drop against" in r.output


def test_expectations_are_keyed_by_cell(tmp_path):
    """Other settings, another checkpoint or random init are other cells: their runs neither satisfy
    an expectation nor pass unchecked."""
    exp = tmp_path / "expected.json"
    _runs(tmp_path / "base", [0.30, 0.32, 0.34])
    assert _invoke(tmp_path / "base", "--expected", exp, "--update").exit_code == 0
    _runs(tmp_path / "lr", [0.30, 0.32], config={"lr": 2e-4})
    r = _invoke(tmp_path / "lr", "--expected", exp)
    assert r.exit_code == 2 and "no runs found for 3 expectation(s)" in r.output
    assert "differs in settings: lr: 0.0001 -> 0.0002" in r.output
    _runs(tmp_path / "rand", [0.30, 0.32], checkpoint=None)
    r = _invoke(tmp_path / "rand", "--expected", exp)
    assert r.exit_code == 2 and "has backbone 4m-b(random), the expectation 4m-b@00000000" in r.output
    # both together: the expected cell is found, the other one is named as unchecked
    _runs(tmp_path / "mix" / "a", [0.30, 0.32])
    _runs(tmp_path / "mix" / "b", [0.10, 0.12], config={"lr": 2e-4})
    r = _invoke(tmp_path / "mix", "--expected", exp)
    assert r.exit_code == 2 and "no expectation (they would pass unchecked)" in r.output
    assert "--allow-new" in r.output
    r = _invoke(tmp_path / "mix", "--expected", exp, "--allow-new")
    assert r.exit_code == 0, r.output
    assert "new, not gated (--allow-new): " in r.output and r.output.count("new, not gated") == 1


def test_unusable_input_exits_2(tmp_path):
    _runs(tmp_path / "runs", [0.3])
    r = _invoke(tmp_path / "runs", "--expected", tmp_path / "missing.json")
    assert r.exit_code == 2 and "not found" in r.output
    bad = tmp_path / "bad.json"
    bad.write_text("{oops")
    assert _invoke(tmp_path / "runs", "--expected", bad).exit_code == 2
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({"schema": "fourm-eval/expected", "version": 1, "entries": [
        {"task": "coco-det", "backbone": "4m-b", "profile": "smoke", "metric": "box_AP", "mean": 0.3,
         "std": 0.01, "n": 3, "floor": 0.01}]}))
    r = _invoke(tmp_path / "runs", "--expected", v1)
    assert r.exit_code == 2 and "version 1" in r.output and "re-create it" in r.output
    r = _invoke(tmp_path / "no-such-dir", "--expected", v1)
    assert r.exit_code == 2 and "no-such-dir: no such file or directory" in r.output
