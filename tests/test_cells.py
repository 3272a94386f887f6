"""The one grouping of records into cells (fourm_eval.cells): what splits a cell and what does not,
repeats merged, and metrics without a value kept out of every mean and export."""

import json
import math

import pandas as pd
import pytest
from typer.testing import CliRunner

from fourm_eval.cells import group_records, identity
from fourm_eval.cli import app
from fourm_eval.results import load_records, records_frame
from records_factory import write_record


def _load(root):
    return load_records([root])[0]


def test_execution_details_do_not_split_a_cell_and_settings_do(tmp_path):
    # same settings, different paths / workers / processes / loggers / checkpoint location: one cell
    write_record(tmp_path, "a", seed=0, config={"num_workers": 0, "world_size": 1, "loggers": ["tensorboard"]},
                 checkpoint="/mnt/a/4M-7_B_CC12M.safetensors")
    write_record(tmp_path, "b", seed=1, config={"num_workers": 8, "world_size": 4,
                                                "schedule_resolved": {"max_iters": 100, "eff_batch": 4,
                                                                      "per_gpu_batch": 1}},
                 checkpoint="/home/u/4M-7_B_CC12M.safetensors")
    # any setting, the data, the weights or the init: another cell
    write_record(tmp_path, "lr", seed=0, config={"lr": 3e-4})
    write_record(tmp_path, "data", seed=0, dataset={"root": "/d", "annotations_sha256": {"val": "b" * 64}})
    write_record(tmp_path, "sha", seed=0, sha256="f" * 64)
    write_record(tmp_path, "rand", seed=0, checkpoint=None)
    cells = group_records(_load(tmp_path))
    by_run = {r.split("/")[-1]: g for g in cells for r in g.runs}
    assert by_run["a"] is by_run["b"] and by_run["a"].n == 2
    assert len(cells) == 5  # {a, b}, lr, data, sha, rand
    assert by_run["lr"].differing["config.lr"] == 3e-4 and by_run["a"].differing["config.lr"] == 1e-4
    assert "lr=0.0003" in by_run["lr"].variant()
    assert by_run["sha"].differing["backbone.sha256"] == "f" * 64 and "sha256=ffffffffffff" in by_run["sha"].variant()
    assert by_run["rand"].model["pretrain"] == "random init" and by_run["rand"].differing == {}  # its own label


def test_identity_does_not_depend_on_key_order(tmp_path):
    rec = json.loads((write_record(tmp_path, "a", config={"head": {"x": 1, "y": [1, 2]}}) / "result.json").read_text())
    shuffled = json.loads(json.dumps(rec))
    shuffled["config"] = dict(reversed(list(rec["config"].items())))
    shuffled["config"]["head"] = {"y": [1, 2], "x": 1}
    assert identity(rec)["cell"] == identity(shuffled)["cell"]
    shuffled["config"]["head"]["y"] = [2, 1]  # a list is ordered: another setting
    assert identity(rec)["cell"] != identity(shuffled)["cell"]


def test_repeats_merge_and_their_disagreement_is_measured(tmp_path):
    write_record(tmp_path, "s0", seed=0, metrics={"box_AP": 0.30, "mask_AP": 0.2, "box_AP50": 0.5})
    write_record(tmp_path, "s0-other-machine", seed=0, metrics={"box_AP": 0.32, "mask_AP": 0.2, "box_AP50": 0.5})
    write_record(tmp_path, "s1", seed=1, metrics={"box_AP": 0.40, "mask_AP": 0.3, "box_AP50": 0.6})
    (g,) = group_records(_load(tmp_path))
    assert g.n == 2 and g.per_seed("box_AP") == {0: pytest.approx(0.31), 1: 0.40}
    mean, std, n = g.stats("box_AP")
    assert (mean, n) == (pytest.approx(0.355), 2) and std == pytest.approx(abs(0.31 - 0.40) / math.sqrt(2))
    assert g.nondeterminism("box_AP") == pytest.approx(0.02) and g.nondeterminism("mask_AP") == 0.0
    df = records_frame(_load(tmp_path))
    assert set(df.repeats_of_seed[df.seed == 0]) == {2} and df.cell.nunique() == 1


def test_no_value_never_enters_a_mean_or_an_export(tmp_path):
    """COCO's 'no value' (null in the record, -1 in pycocotools) is missing, not a number."""
    write_record(tmp_path, "s0", seed=0, metrics={"box_AP": 0.3, "box_APl": None})
    write_record(tmp_path, "s1", seed=1, metrics={"box_AP": 0.5, "box_APl": 0.4})
    (g,) = group_records(_load(tmp_path))
    assert g.stats("box_APl") == (pytest.approx(0.4), None, 1) and g.stats("box_AP")[2] == 2
    out = tmp_path / "t.csv"
    r = CliRunner().invoke(app, ["results", "export", str(tmp_path), "--out", str(out)])
    assert r.exit_code == 0, r.output
    df = pd.read_csv(out)
    apl = df[df.metric == "box_APl"].set_index("seed")
    assert math.isnan(apl.value[0]) and math.isnan(apl.display[0]) and apl.value[1] == 0.4
    assert ",box_APl,," in out.read_text()  # an empty field, not -1 or 0
    pq = tmp_path / "t.parquet"
    assert CliRunner().invoke(app, ["results", "export", str(tmp_path), "--out", str(pq)]).exit_code == 0
    assert pd.read_parquet(pq).query("metric == 'box_APl'").value.isna().sum() == 1


def test_evaluation_only_records_and_their_cells(tmp_path):
    """The final checkpoint of a run evaluated again is a repeat of that run's seed; an earlier
    checkpoint, or weights from a file outside any run, is a cell of its own."""
    def eval_only(name, **ev):
        run = write_record(tmp_path, name, seed=0)
        rec = json.loads((run / "result.json").read_text())
        rec["eval_only"] = {"source_run": "/runs/a", "checkpoint": "/runs/a/iter_100.pth", "weights_sha256": "c" * 64,
                            "iteration": 100, "final": True, **ev}
        (run / "result.json").write_text(json.dumps(rec))

    write_record(tmp_path, "trained", seed=0)
    eval_only("final")
    eval_only("earlier", iteration=50, final=False, checkpoint="/runs/a/iter_50.pth")
    eval_only("file", source_run=None, checkpoint="/elsewhere/model.pth")
    eval_only("other-file", source_run=None, checkpoint="/elsewhere/m2.pth", weights_sha256="d" * 64)
    by_run = {r.split("/")[-1]: g for g in group_records(_load(tmp_path)) for r in g.runs}
    assert by_run["trained"] is by_run["final"] and by_run["trained"].seeds[0].repeats == 2
    assert len({id(by_run[n]) for n in ("trained", "earlier", "file", "other-file")}) == 4
    assert "eval_only.iteration=50" in by_run["earlier"].variant()
