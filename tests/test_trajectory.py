"""Transfer along pre-training (fourm_eval/trajectory.py, `fourm-eval analyze trajectory`) on real checkpoints
of the tiny 4M, saved along its pre-training by the shipped script's code (fourm_eval/pretrain.py)."""

import json

import torch

from cli_runner import run_cli

from fourm_eval.trajectory import DROP_POINTS, summarise


def _pt(model, order, value, higher=True, tokens=None):
    return {"model": model, "probe": "t:p", "metric": "m", "higher_is_better": higher, "order": order,
            "tokens_seen": tokens, "value": value, "checkpoint": f"c{order}"}


def test_peaks_by_hand():
    """The peak is the best checkpoint by the metric's direction (the earliest of equals); 'peaked early'
    when the last is worse by more than DROP_POINTS points."""
    pts = [_pt("B", 0, 0.50, tokens=1e9), _pt("B", 1, 0.60, tokens=2e9), _pt("B", 2, 0.55, tokens=3e9),
           _pt("L", 2, 0.70), _pt("L", 0, 0.60), _pt("L", 1, 0.70),                      # ties: the earliest
           _pt("XL", 0, 2.0, higher=False), _pt("XL", 1, 1.5, higher=False), _pt("XL", 2, 1.496, higher=False)]
    by = {k["model"]: k for k in summarise(pts)}
    assert by["B"]["peak_checkpoint"] == "c1" and round(by["B"]["drop_points"], 6) == 5.0 and by["B"]["peaked_early"]
    assert by["L"]["peak_checkpoint"] == "c1" and by["L"]["drop_points"] == 0 and not by["L"]["peaked_early"]
    assert by["XL"]["peak_checkpoint"] == "c2" and not by["XL"]["peaked_early"]  # lower is better: the last
    assert DROP_POINTS == 1.0


def test_trajectory_on_checkpoints_saved_along_pretraining(tmp_path):
    """The tiny 4M pre-trained briefly with checkpoints every 10 steps (steps and tokens seen in their
    headers; the final weights the same as without saving), then `analyze trajectory` with the kNN probe
    on each: the table, the peak equal to the best of the probe runs' own records, the figure, and the
    report's section."""
    from safetensors.torch import load_file

    from fourm_eval.checkpoints import read_safetensors_header
    from fourm_eval.pretrain import main

    small = dict(steps=20, n_scenes=48, batch_size=16, warmup=5, image_size=64)
    main(tmp_path / "plain.safetensors", **small)
    final = main(tmp_path / "final.safetensors", save_every=10, save_dir=tmp_path / "ckpts", **small)
    a, b = load_file(str(tmp_path / "plain.safetensors")), load_file(str(final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # saving takes nothing from training
    ckpts = sorted((tmp_path / "ckpts").glob("checkpoint-*.safetensors"))
    assert [c.name for c in ckpts] == ["checkpoint-10.safetensors", "checkpoint-20.safetensors"]
    metas = [read_safetensors_header(c).metadata for c in ckpts]
    assert [m["step"] for m in metas] == ["10", "20"] and 0 < int(metas[0]["tokens_seen"]) < int(metas[1]["tokens_seen"])
    assert torch.equal(load_file(str(ckpts[-1]))["encoder.0.mlp.fc1.weight"], b["encoder.0.mlp.fc1.weight"])

    out = tmp_path / "traj"
    r = run_cli(["analyze", "trajectory", *map(str, reversed(ckpts)), "--probe", "in1k-cls:knn-smoke", "--out",
                 str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "trajectory.json").read_text())
    assert [p["step"] for p in res["points"]] == [10, 20] and res["x"] == "tokens_seen"  # sorted by step
    values = [json.loads((out / "runs" / p["run_dir"].split("/runs/")[1] / "result.json").read_text())["metrics"]["top1"]
              for p in res["points"]]
    assert [p["value"] for p in res["points"]] == values
    (peak,) = res["peaks"]
    best = max(range(2), key=lambda i: values[i])
    assert peak["peak_checkpoint"] == res["points"][best]["checkpoint"]
    assert peak["peaked_early"] == ((values[best] - values[-1]) * 100 > DROP_POINTS)
    assert "checkpoint-10.safetensors" in r.stdout and "peak at" in r.stdout
    assert (out / "trajectory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rep = run_cli(["report", str(out), "--out", str(tmp_path / "report")], tmp_path)
    assert rep.returncode == 0, rep.stdout[-2000:] + rep.stderr[-2000:]
    md = (tmp_path / "report" / "report.md").read_text()
    assert "Overfitting analysis: transfer along pre-training" in md and "figures/trajectory_0.png" in md
    assert (tmp_path / "report" / "figures" / "trajectory_0.png").is_file()
