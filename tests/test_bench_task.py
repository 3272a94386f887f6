"""`fourm-eval bench task all`: a table row per task, each record's fields, and each backbone's FLOPs against
the analytic ViT formula."""

import json

import pytest
from typer.testing import CliRunner

from fourm_eval.bench_task import table_rows
from fourm_eval.cli import app
from fourm_eval.tasks import all_tasks

TRAINED = sorted(n for n, t in all_tasks().items() if not t.probe_only)  # a probe-only task has no iteration

@pytest.fixture(scope="module")
def bench_all(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # in this process (the default measures each in a fresh process: the same code, the CLI's subprocess)
    r = CliRunner().invoke(app, ["bench", "task", "all", "--iters", "1", "--warmup", "0", "--in-process",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    return r.output, json.loads(out.read_text())["records"]


def test_bench_task_all_prints_a_row_per_task(bench_all):
    output, records = bench_all
    assert sorted(r["task"] for r in records) == TRAINED
    cols, rows = table_rows(records)
    assert len(rows) == len(TRAINED) and all(len(row) == len(cols) for row in rows)
    for name in TRAINED:
        assert name in output
    for name in sorted(set(all_tasks()) - set(TRAINED)):
        assert f"not measured: {name}" in output
    assert "planner:" in output


@pytest.mark.parametrize("task", TRAINED)
def test_bench_task_record(bench_all, task):
    r = next(x for x in bench_all[1] if x["task"] == task)
    for k in ("s_per_iter", "iters_per_s", "images_per_s", "peak_memory_bytes", "flops_per_iter",
              "achieved_flops_per_s", "backbone_forward_flops"):
        assert r[k] > 0, k
    pl = r["planner"]
    for k in ("backbone_flops_per_iter", "peak_flops", "s_per_iter_estimate", "implied_utilisation"):
        assert pl[k] > 0, k
    # FlopCounterMode's count of the backbone's forward (batch x 3 x 96 x 96) vs the planner's formula
    # (2 FLOPs per multiply-add over the Linears and the patch embedding, 4 N^2 D per block for attention);
    # both count the same matmuls, so 1% covers only rounding
    batch = r["backbone_input_shape"][0]
    assert abs(r["backbone_forward_flops"] / (batch * pl["backbone_forward_flops_per_image"]) - 1) < 0.01
    # the whole iteration (heads, backward) costs more than the backbone's forward
    assert r["flops_per_iter"] > 2 * r["backbone_forward_flops"]
