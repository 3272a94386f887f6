"""The benchmark command runs end to end (numbers are read from benchmarks, not asserted here)."""

import json

from typer.testing import CliRunner

from fourm_eval.cli import app


def test_bench_backbone_runs(tmp_path):
    out = tmp_path / "bench.json"
    r = CliRunner().invoke(app, ["bench", "backbone", "--sizes", "32", "--batch", "1", "--iters", "1",
                                 "--device", "cpu", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert {(x["model"], x["size"]) for x in data["results"]} == {
        (m, s) for m in ("4m-b (GELU, biases)", "timm vit_base_patch16_224") for s in (32,)}
    # saved activations are exact and scale with the token count: timm has one CLS token more
    for size in (32,):
        n = (size // 16) ** 2
        assert abs(data["ratios"][str(size)]["activations"] - (n + 1) / n) < 0.05
