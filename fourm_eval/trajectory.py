"""Transfer along pre-training: at which checkpoint did a probe of the encoder peak?

The 4M papers read XL's smaller-than-expected gain as overfitting CC12M. Pre-training losses show
where the held-out loss turns (``analyze pretrain``); the direct view is transfer itself, measured on
the checkpoints a pre-training run saved. ``fourm-eval analyze trajectory CKPTS... --probe TASK:PROFILE``
runs each probe (an ordinary run, e.g. ``in1k-cls:knn-smoke`` or ``in1k-cls:linear-grid``: frozen
features from the feature cache, so a checkpoint costs one encoding of the data) on every checkpoint
and tabulates the probe's main metric against the tokens the encoder had seen, per model size.

Method (stated in the output and the report, as the other analyses'): per model and probe, the peak is
the best checkpoint by the metric's own direction; the trajectory *peaked early* when the last
checkpoint is worse than the peak by more than ``DROP_POINTS`` points (x100 of a fraction metric). With
a pre-training log (``--pretrain-log``), the earliest held-out loss onset of ``analyze pretrain`` is
put beside it. Tokens seen come from the checkpoint's header metadata (``tokens_seen``, written by
``scripts/pretrain_tiny_4m.py --save-every``) or are given (``--tokens``), else the checkpoint's order.

Writes ``OUT/trajectory.json`` (every point, each run's directory, the peaks), ``OUT/trajectory.csv`` and
``OUT/trajectory.png``; ``fourm-eval report`` finds ``trajectory.json`` under its folders and shows both.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Sequence

from .errors import ConfigError

DROP_POINTS = 1.0
TRAJECTORY_FILE = "trajectory.json"
METHOD = (f"per model and probe, the peak is the checkpoint with the best probe score (the metric's own "
          f"direction); 'peaked early' when the last checkpoint scores worse than the peak by more than "
          f"{DROP_POINTS:g} point(s) (x100 of a fraction); x = tokens seen by the encoder (the checkpoint's "
          f"header metadata, or given), else the checkpoint's position. Each point is one ordinary probe run "
          f"(its record in the run folder).")


def checkpoint_progress(path: Path) -> dict[str, int]:
    """``step`` / ``tokens_seen`` from a safetensors checkpoint's header metadata (empty when absent or not
    safetensors), else the step number of a ``checkpoint-<N>`` file name."""
    from .checkpoints import detect_format, read_safetensors_header

    out: dict[str, int] = {}
    if detect_format(path) == "safetensors":
        meta = read_safetensors_header(path).metadata
        for k in ("step", "tokens_seen"):
            if str(meta.get(k, "")).isdigit():
                out[k] = int(meta[k])
    m = re.search(r"checkpoint-(\d+)", path.stem)
    if "step" not in out and m:
        out["step"] = int(m.group(1))
    return out


def _model_label(info: dict[str, Any]) -> str:
    from .tasks.profiles import resolve_size
    size, _ = resolve_size(info["embed_dim"], info["num_layers"], None)
    return f"4M-{size.upper() if size != 'tiny' else 'tiny'} (dim {info['embed_dim']}, {info['num_layers']} blocks)"


def parse_probe(text: str) -> tuple[str, str]:
    task, sep, profile = text.partition(":")
    if not sep or not task or not profile:
        raise ConfigError(f"--probe {text!r}: write TASK:PROFILE, e.g. in1k-cls:knn-smoke")
    return task, profile


def run_trajectory(ckpts: Sequence[Path], probes: Sequence[tuple[str, str]], out: Path, *,
                   tokens: Sequence[float] | None = None, pretrain_log: Path | None = None, seed: int = 0,
                   data_roots: dict[str, str] | None = None, allow_pickle: bool = False,
                   say: Callable[[str], None] = print, console: Any = None) -> dict[str, Any]:
    from .backbones import backbone_info
    from .checkpoints import cached_sha256
    from .tasks import get_task
    from .tasks.runner import run

    ckpts = [Path(c) for c in ckpts]
    missing = [str(c) for c in ckpts if not c.is_file()]
    if missing:
        raise ConfigError(f"checkpoint file(s) not found: {', '.join(missing)}")
    if tokens is not None and len(tokens) != len(ckpts):
        raise ConfigError(f"--tokens gives {len(tokens)} value(s) for {len(ckpts)} checkpoint(s)")
    out = Path(out)
    points: list[dict[str, Any]] = []
    for i, ck in enumerate(ckpts):
        prog = checkpoint_progress(ck)
        x = float(tokens[i]) if tokens is not None else prog.get("tokens_seen")
        info = backbone_info("4m", str(ck), allow_pickle)
        sha = cached_sha256(ck)
        model = _model_label(info)
        for task_name, profile in probes:
            task = get_task(task_name)
            wd = out / "runs" / f"{ck.stem}-{sha[:8]}" / f"{task.name}.{profile}"
            say(f"[{i + 1}/{len(ckpts)}] {ck.name} ({model}): {task.name} --profile {profile} in {wd}")
            rec = run(task, backbone="4m", checkpoint=str(ck), data_root=(data_roots or {}).get(task.name),
                      profile=profile, work_dir=wd, seed=seed, sets=[], skip_bad_images=False,
                      allow_pickle=allow_pickle, launcher="none", size=None, random_init=False, num_heads=None,
                      console=console)
            metric = task.main_metrics[0]
            m = task.metric(metric)
            points.append({"checkpoint": str(ck), "sha256": sha, "model": model, "step": prog.get("step"),
                           "tokens_seen": x, "order": i, "probe": f"{task.name}:{profile}", "metric": metric,
                           "higher_is_better": bool(m.higher_is_better) if m else True,
                           "value": rec["metrics"].get(metric), "run_dir": str(wd)})
    onset = None
    if pretrain_log is not None:
        from .analysis import parse_pretrain_log, pretrain_analysis
        res = pretrain_analysis(parse_pretrain_log(pretrain_log))
        onsets = [(i["onset"], mod) for mod, i in res["modalities"].items() if i["onset"] is not None]
        onset = {"x": res["x"], "log": str(pretrain_log), "earliest": min(onsets)[0] if onsets else None,
                 "modality": min(onsets)[1] if onsets else None}
    peaks = summarise(points)
    result = {"method": METHOD, "drop_points": DROP_POINTS, "points": points, "peaks": peaks,
              "x": "tokens_seen" if all(p["tokens_seen"] is not None for p in points) else "order",
              "pretrain_onset": onset}
    out.mkdir(parents=True, exist_ok=True)
    from .results import atomic_write_json
    atomic_write_json(out / TRAJECTORY_FILE, result)
    _write_csv(out / "trajectory.csv", points)
    (out / "trajectory.png").write_bytes(figure_png(result))
    return result


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, probe): the peak checkpoint, the last one, the drop in points, and the verdict."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in points:
        groups.setdefault((p["model"], p["probe"]), []).append(p)
    out = []
    for (model, probe), pts in groups.items():
        pts = sorted(pts, key=lambda p: (p["tokens_seen"] if p["tokens_seen"] is not None else p["order"]))
        valid = [p for p in pts if isinstance(p["value"], (int, float))]
        if not valid:
            continue
        sign = 1.0 if valid[0]["higher_is_better"] else -1.0
        peak = max(valid, key=lambda p: sign * p["value"])  # the first of equals: the earliest
        last = valid[-1]
        drop = sign * (peak["value"] - last["value"]) * 100.0
        out.append({"model": model, "probe": probe, "metric": peak["metric"], "peak_checkpoint": peak["checkpoint"],
                    "peak_tokens_seen": peak["tokens_seen"], "peak_value": peak["value"],
                    "last_checkpoint": last["checkpoint"], "last_value": last["value"], "drop_points": round(drop, 4),
                    "peaked_early": drop > DROP_POINTS, "n_checkpoints": len(valid)})
    return out


def _write_csv(path: Path, points: list[dict[str, Any]]) -> None:
    import csv
    cols = ["model", "probe", "metric", "checkpoint", "step", "tokens_seen", "value", "sha256", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for p in points:
            w.writerow(p)


def figure_png(result: dict[str, Any]) -> bytes:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = sorted({p["probe"] for p in result["points"]})
    fig, axes = plt.subplots(1, len(probes), figsize=(5.5 * len(probes), 4), squeeze=False)
    xkey = result["x"]
    for ax, probe in zip(axes[0], probes):
        for model in sorted({p["model"] for p in result["points"]}):
            pts = sorted([p for p in result["points"] if p["probe"] == probe and p["model"] == model
                          and isinstance(p["value"], (int, float))],
                         key=lambda p: p["tokens_seen"] if xkey == "tokens_seen" else p["order"])
            if not pts:
                continue
            xs = [p["tokens_seen"] if xkey == "tokens_seen" else p["order"] for p in pts]
            ys = [p["value"] * 100 for p in pts]
            ax.plot(xs, ys, marker="o", label=model)
            peak = next((k for k in result["peaks"] if k["probe"] == probe and k["model"] == model), None)
            if peak:
                px = peak["peak_tokens_seen"] if xkey == "tokens_seen" else \
                    next(p["order"] for p in pts if p["checkpoint"] == peak["peak_checkpoint"])
                ax.scatter([px], [peak["peak_value"] * 100], s=160, facecolors="none", edgecolors="red", zorder=3)
        onset = (result.get("pretrain_onset") or {}).get("earliest")
        if onset is not None and xkey == "tokens_seen":
            ax.axvline(onset, color="grey", ls="--", lw=1, label="held-out loss onset")
        ax.set_title(probe)
        ax.set_xlabel("tokens seen" if xkey == "tokens_seen" else "checkpoint (order)")
        ax.set_ylabel(f"{pts[0]['metric'] if pts else 'score'} (x100)")
        ax.legend(fontsize=8)
    fig.suptitle("Transfer along pre-training (peak circled)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def find_trajectories(dirs: Sequence[Path]) -> list[Path]:
    found: list[Path] = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == TRAJECTORY_FILE:
            found.append(d)
        elif d.is_dir():
            found += sorted(p for p in d.rglob(TRAJECTORY_FILE) if "runs" not in p.relative_to(d).parts[:-1])
    return found


__all__ = ["DROP_POINTS", "METHOD", "checkpoint_progress", "figure_png", "find_trajectories", "parse_probe",
           "run_trajectory", "summarise"]
