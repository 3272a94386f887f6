"""Synthetic but schema-valid result records (for results/report/regress tests)."""

import json
from pathlib import Path

from fourm_eval.results import SCHEMA, SCHEMA_VERSION


# each task's paper protocol (that of the published comparison table), as the shipped profiles name it
PAPER_PROTOCOLS = {"coco-det": "vitdet", "ade20k-seg": "multimae", "nyu-depth": "multimae", "in1k-cls": "4m-21"}


def write_record(root: Path, name: str, *, task="coco-det", backbone="4m-b", checkpoint="/ckpt/4M-7_B_CC12M.safetensors",
                 arch=None, profile="smoke", seed=0, metrics=None, history=None, losses=None, config=None,
                 sha256="0" * 64, init=None, dataset=None) -> Path:
    """``config`` entries are merged into the default resolved profile (the run's settings);
    ``sha256`` / ``init`` are the backbone identity (``init`` defaults to checkpoint/random by
    whether there is a checkpoint)."""
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    metrics = metrics or {"box_AP": 0.2, "mask_AP": 0.1, "box_AP50": 0.4}
    cfg = {"image_size": 128, "detector": "mask_rcnn", "attention": "global", "layer_decay": 0.7, "drop_path": 0.1,
           "lr": 1e-4, "profile_file": f"/somewhere/{name}/{profile}.yaml", "num_workers": 2, "world_size": 1,
           "schedule_resolved": {"max_iters": 100, "eff_batch": 4, "per_gpu_batch": 4},
           "protocol": PAPER_PROTOCOLS.get(task)}
    cfg.update(config or {})
    rec = {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "task": task, "profile": profile, "seed": seed,
        "status": "complete", "metrics": metrics, "metrics_step0": {k: 0.0 for k in metrics},
        "eval_history": history if history is not None else [{"iter": 0, "metrics": {k: 0.0 for k in metrics}},
                                                             {"iter": 100, "metrics": metrics}],
        "backbone": {"name": backbone, "family": "4m" if backbone.startswith("4m") else "timm-vit",
                     "checkpoint": checkpoint, "sha256": sha256 if checkpoint else None,
                     "init": init or ("checkpoint" if checkpoint else "random"), "params": 1,
                     "architecture": arch if arch is not None else ({"dim": 768, "depth": 12} if backbone.startswith("4m") else None)},
        "dataset": dataset or {"root": f"/data/{name}", "annotations_sha256": {"val": "a" * 64}},
        "config": cfg,
        "provenance": {"git_commit": "abc"}, "files": {},
    }
    (run / "result.json").write_text(json.dumps(rec))
    if losses:
        vis = run / "20260101_000000" / "vis_data"
        vis.mkdir(parents=True)
        (vis / "scalars.json").write_text("\n".join(json.dumps({"step": i, "loss": v}) for i, v in losses))
    return run
