"""A frozen-feature probe run (profiles with ``mode: knn`` or ``mode: linear-grid``).

No mmengine training: the frozen encoder's features of both splits come from the feature cache
(``fourm_eval.features``: extracted once per weights x data x transform x blocks), the probe runs on
them (``fourm_eval.probes``), and the run writes what every run writes: the predictions in the task's
standard format and a result record (``metrics`` top-1 / top-5 of the scored head or k; ``probe``: every
k, or the whole grid with each head's held-out and validation top-1 and the head chosen on held-out
training images). Report, regress and the sweep treat it as any other run.

The features of the training split use the evaluation transform (centre crop, no augmentation), as
DINOv2's kNN and logistic-regression evaluations do; DINOv2's linear evaluation augments the training
images instead, which a cache cannot (recorded in the record's ``probe.deviations``).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

from fourm_eval.errors import ConfigError

PROBE_MODES = ("knn", "linear-grid", "patch-linear")


def is_probe(p: dict[str, Any]) -> bool:
    return p.get("mode") in PROBE_MODES


def _poolings(pools: str | list[str], has_cls: bool) -> list[str]:
    if pools == "auto":  # DINOv2: class tokens, with and without the mean patch token; 4M has no class token
        return ["cls", "cls+mean"] if has_cls else ["mean"]
    return [str(x) for x in pools]


def _frozen_backbone(name: str, ckpt_path: str | None, seed: int, allow_pickle: bool,
                     num_heads: int | None) -> torch.nn.Module:
    import torch  # lazily: the task scan imports this module, and must not import torch

    from fourm_eval.backbones import build_backbone

    torch.manual_seed(seed)  # a random init is the seed's
    kw: dict[str, Any] = {"allow_pickle": allow_pickle} if ckpt_path else {}
    if num_heads is not None:
        kw["num_heads"] = int(num_heads)
    bb = build_backbone(name, checkpoint=ckpt_path, **kw)
    return bb.eval().requires_grad_(False)


def _header(console: Any, task: Any, p: dict[str, Any], data: Any, wd: Any, *, name: str, info: dict[str, Any],
            ckpt_path: str | None, sha: str | None, seed: int, items: str, features: str) -> None:
    """The run's header lines (task, frozen backbone, data, profile, device, work dir)."""
    from fourm_eval.results import device_description

    console.header([
        ("task", f"{task.name}: {task.title}"),
        ("backbone", f"{name}, {info['params'] / 1e6:.1f}M params, frozen, "
                     + (f"{ckpt_path} (sha256 {sha[:12]})" if ckpt_path else f"random init (seed {seed})")),
        ("data", f"{data.root}: {data.n_train} training / {data.n_val} validation {items}"),
        ("profile", f"{p['profile']} ({p['profile_file']}), seed {seed}: {p['mode']} on {features}"),
        ("device", device_description()),
        ("work dir", str(wd.path)),
    ])


@contextlib.contextmanager
def _failure_noted(invocations: Any) -> Iterator[None]:
    """An error inside ends the run's invocation entry with it (then propagates)."""
    try:
        yield
    except BaseException as e:
        invocations.finish(f"error ({type(e).__name__}: {str(e)[:200]})", 0)
        raise


def _cache_record(feats: dict[str, Any]) -> dict[str, Any]:
    """Per split: the feature cache's key and folder, whether it was read back, the extraction time."""
    return {s: {"key": f.key, "path": str(f.path), "from_cache": f.from_cache, "extract_s": round(f.seconds, 2)}
            for s, f in feats.items()}


def _weights_id(sha: str | None, name: str, seed: int) -> str:
    """The feature cache's name for the weights: the checkpoint's sha256, or the random init and its seed."""
    return sha if sha else f"random-init:{name}:seed{seed}"


def split_features(bb: torch.nn.Module, p: dict[str, Any], data: Any, *, name: str, weights: str, blocks: list[int],
                   shard_size: int = 1024, batch_size: int = 64, say: Any = None,
                   splits: tuple[str, ...] = ("train", "val")) -> dict[str, Any]:
    """Each split's features (fourm_eval.features), keyed by the weights, the data's fingerprint, the
    centre-crop evaluation transform of the profile and the blocks."""
    from fourm_eval.features import cache_root, dataset_fingerprint, extract

    from .kits.classification import transform_cfg
    from .kits.classification_model import FourmImageFolder

    tcfg = transform_cfg(p, False)
    out = {}
    for split in splits:
        ds = FourmImageFolder(str(data.root), str(data.private["files"][split]), tcfg)
        parts = {"weights": weights, "backbone": name, "dataset": dataset_fingerprint(data.root, ds.samples),
                 "transform": tcfg}
        out[split] = extract(bb, ds, key_parts=parts, cache_root=cache_root(), blocks=blocks, shard_size=shard_size,
                             batch_size=batch_size, desc=f"{split} features", say=say)
    return out


def run_probe(task: Any, p: dict[str, Any], data: Any, wd: Any, *, name: str, ckpt_path: str | None, sha: str | None,
              info: dict[str, Any], seed: int, warns: list[str], console: Any, started: float,
              hub_record: dict[str, Any] | None, allow_pickle: bool, num_heads: int | None) -> dict[str, Any]:
    from fourm_eval.probes import knn_predict, linear_grid, topk_rows

    from .kits.classification import PRED_FILE, topk_accuracy, write_predictions_csv
    from .runs import Invocations

    from .schema import settings_of
    pr = {k.split(".", 1)[1]: st.default for k, st in settings_of(task).items() if k.startswith("probe.")}
    pr.update(p.get("probe") or {})  # the profile's values over the schema's defaults
    mode = p["mode"]
    if mode == "patch-linear":
        return run_patch_probe(task, p, pr, data, wd, name=name, ckpt_path=ckpt_path, sha=sha, info=info, seed=seed,
                               warns=warns, console=console, started=started, hub_record=hub_record,
                               allow_pickle=allow_pickle, num_heads=num_heads)
    classes = data.private["classes"]
    bb = _frozen_backbone(name, ckpt_path, seed, allow_pickle, num_heads)
    n_last = [int(n) for n in pr["n_last_blocks"]] if mode == "linear-grid" else [1]
    if max(n_last) > bb.num_layers:
        raise ConfigError(f"probe.n_last_blocks {n_last}: the encoder has {bb.num_layers} blocks")
    weights = _weights_id(sha, name, seed)
    _header(console, task, p, data, wd, name=name, info=info, ckpt_path=ckpt_path, sha=sha, seed=seed,
            items="images", features="cached features")
    invocations = Invocations(wd, 0, started)
    with _failure_noted(invocations):
        feats = split_features(bb, p, data, name=name, weights=weights, blocks=list(range(-max(n_last), 0)),
                               shard_size=int(pr["shard_size"]), batch_size=int(pr["batch_size_extract"]),
                               say=console.line)
        tr, va = feats["train"], feats["val"]
        has_cls = tr.cls is not None  # the encoder gave class tokens (DeiT III, MAE; 4M has none)
        n_cls = len(classes)
        deviations = ["training-split features use the evaluation transform (cached, no augmentation)"]
        if not has_cls:
            deviations.append("the encoder has no class token: the mean patch token of the last block stands in "
                              "for it (kNN), pooling 'mean' of the last n blocks (linear grid)")
        if mode == "knn":
            ks = [int(k) for k in pr["ks"]]
            too_many = [k for k in ks if k > len(tr.files)]
            if too_many:
                raise ConfigError(f"probe.ks {too_many}: more neighbours than the {len(tr.files)} training images")
            pool = "cls" if has_cls else "mean"
            votes = knn_predict(tr.pooled(pool, 1), tr.labels, va.pooled(pool, 1), n_cls, ks=ks,
                                temperature=float(pr["temperature"]))
            per_k = {k: topk_accuracy([r[1] for r in topk_rows(va.files, v)], va.labels.tolist()) for k, v in votes.items()}
            report_k = int(pr["report_k"])
            if report_k not in votes:
                raise ConfigError(f"probe.report_k {report_k} is not one of probe.ks {ks}")
            probs = votes[report_k]
            probe = {"mode": "knn", "features": pool + " token of the last block, L2-normalised",
                     "temperature": float(pr["temperature"]), "reported_k": report_k,
                     "k": {str(k): {kk: round(vv, 6) for kk, vv in m.items()} for k, m in per_k.items()}}
            for k, m in per_k.items():
                console.line(f"kNN k={k}: top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f}")
        else:
            pools = _poolings(pr["poolings"], has_cls)
            inputs = {(n, pl): (tr.pooled(pl, n), va.pooled(pl, n)) for n in n_last for pl in pools}
            heads, best, sched = linear_grid(inputs, tr.labels, n_cls, lrs=[float(x) for x in pr["lrs"]],
                                             epochs=int(pr["epochs"]), batch_size=int(pr["batch_size"]),
                                             holdout=float(pr["holdout"]), seed=seed,
                                             val_labels=va.labels, log=console.line)
            probs = best.val_probs
            probe = {"mode": "linear-grid", "heads": len(heads), "chosen": best.entry(),
                     "chosen_on": f"held-out {sched['holdout_fraction']:.0%} of the training split (never validation)",
                     "schedule": sched, "grid": [h.entry() for h in heads]}
            console.line(f"linear grid: {len(heads)} heads; chosen on held-out training images: {best.name} "
                         f"(held-out top-1 {best.heldout_top1:.4f}); its validation top-1 {best.val_top1:.4f}")
        probe["deviations"] = deviations
        probe["feature_cache"] = _cache_record(feats)
        rows = topk_rows(va.files, probs)
        pred_dir = wd.path / "predictions"
        write_predictions_csv(pred_dir / PRED_FILE, rows)
        metrics = topk_accuracy([r[1] for r in rows], va.labels.tolist())
    return _write_probe_record(task, p, data, wd, metrics=metrics, probe=probe, name=name, ckpt_path=ckpt_path,
                               sha=sha, info=info, seed=seed, warns=warns, console=console, started=started,
                               hub_record=hub_record, invocations=invocations)


class _Scenes:
    """Scene images (relative paths under ``root``) as encoder inputs: RGB, resized to ``size`` when they
    are not, normalised with ImageNet's mean and std (the tiny 4M's pre-training input)."""

    def __init__(self, root: Any, rels: list[str], size: int):
        self.root, self.rels, self.size = root, rels, int(size)

    def __len__(self) -> int:
        return len(self.rels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(self.root / self.rels[i]) as im:
            im = im.convert("RGB")
            if im.size != (self.size, self.size):
                im = im.resize((self.size, self.size), Image.BICUBIC)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
        return {"inputs": (x - mean) / std, "label": 0, "file": self.rels[i]}


def run_patch_probe(task: Any, p: dict[str, Any], pr: dict[str, Any], data: Any, wd: Any, *, name: str,
                    ckpt_path: str | None, sha: str | None, info: dict[str, Any], seed: int, warns: list[str],
                    console: Any, started: float, hub_record: dict[str, Any] | None, allow_pickle: bool,
                    num_heads: int | None) -> dict[str, Any]:
    """The per-patch probe of a probe-only dense task (``task.truth`` gives each scene's patch classes)."""
    import numpy as np  # noqa: F401 - lazily: the task scan imports this module, and must not import torch
    import torch  # noqa: F401

    from fourm_eval.features import cache_root, dataset_fingerprint, extract
    from fourm_eval.probes import linear_grid

    from .runs import Invocations

    bb = _frozen_backbone(name, ckpt_path, seed, allow_pickle, num_heads)
    n_last = [int(n) for n in pr["n_last_blocks"]]
    if max(n_last) > bb.num_layers:
        raise ConfigError(f"probe.n_last_blocks {n_last}: the encoder has {bb.num_layers} blocks")
    size = int(p["image_size"])
    weights = _weights_id(sha, name, seed)
    _header(console, task, p, data, wd, name=name, info=info, ckpt_path=ckpt_path, sha=sha, seed=seed,
            items="scenes", features="cached patch features")
    invocations = Invocations(wd, 0, started)
    listing = data.private["listing"]
    classes = data.private["classes"]
    with _failure_noted(invocations):
        feats, truth = {}, {}
        for split in ("train", "val"):
            rels = [im for im, _ in listing[split]]
            ds = _Scenes(data.root, rels, size)
            parts = {"weights": weights, "backbone": name,
                     "dataset": dataset_fingerprint(data.root, [(r, 0) for r in rels]),
                     "transform": {"size": size, "resize": "bicubic", "normalise": "imagenet"}}
            feats[split] = extract(bb, ds, key_parts=parts, cache_root=cache_root(), blocks=list(range(-max(n_last), 0)),
                                   patch=True, shard_size=int(pr["shard_size"]), batch_size=int(pr["batch_size_extract"]),
                                   desc=f"{split} features", say=console.line)
            truth[split] = task.truth(data.root, listing[split])
        tr, va = feats["train"], feats["val"]
        n_tok = tr.patch.shape[2]
        grid = next(iter(truth["val"].values())).shape
        if grid[0] * grid[1] != n_tok:
            raise ConfigError(f"the encoder gives {n_tok} patch tokens per scene at {size} px, the annotations "
                              f"{grid[0]}x{grid[1]} patches: encode at the scenes' own size")

        def tokens(fs: Any, n: int) -> torch.Tensor:  # (images x tokens, n x D), blocks concatenated per token
            x = fs.patch[:, -n:].permute(0, 2, 1, 3)
            return x.reshape(x.shape[0] * x.shape[1], -1).float()

        def token_labels(fs: Any, t: dict) -> torch.Tensor:
            return torch.from_numpy(np.stack([t[f].ravel() for f in fs.files])).reshape(-1)

        y_tr, y_va = token_labels(tr, truth["train"]), token_labels(va, truth["val"])
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(tr.files), generator=g)
        n_held = max(1, int(round(float(pr["holdout"]) * len(tr.files))))
        held_img, fit_img = order[:n_held], order[n_held:]
        rows = lambda imgs: (imgs[:, None] * n_tok + torch.arange(n_tok)).reshape(-1).sort().values  # noqa: E731
        inputs = {(n, "tokens"): (tokens(tr, n), tokens(va, n)) for n in n_last}
        heads, best, sched = linear_grid(inputs, y_tr, len(classes), lrs=[float(x) for x in pr["lrs"]],
                                         epochs=int(pr["epochs"]), batch_size=int(pr["batch_size"]),
                                         holdout=float(pr["holdout"]), seed=seed, val_labels=y_va, log=console.line,
                                         split=(rows(fit_img), rows(held_img)))
        sched.update(heldout_images=int(n_held), fit_images=int(len(fit_img)), unit="patch tokens",
                     heldout_tokens=int(n_held * n_tok))
        pred = best.val_probs.argmax(1).reshape(len(va.files), *grid).numpy()
        pred_rows = [(f, pred[i]) for i, f in enumerate(va.files)]
        task.write_predictions(wd.path / "predictions", pred_rows)
        readout_note = _decoder_readout(task, bb, info, ckpt_path, data.root, va.files, size, grid,
                                        wd.path / "predictions", console)
        metrics = task.evaluate(wd.path / "predictions", data.root)
        console.line(f"patch grid: {len(heads)} heads; chosen on held-out training scenes: {best.name} (held-out "
                     f"accuracy {best.heldout_top1:.4f}); validation patch_acc {metrics['patch_acc']:.4f}")
        if "decoder_acc" in metrics:
            console.line(f"the checkpoint's own decoder over the frozen encoder: decoder_acc {metrics['decoder_acc']:.4f}")
        probe = {"mode": "patch-linear", "heads": len(heads), "chosen": best.entry(),
                 "chosen_on": f"held-out {n_held} of {len(tr.files)} training scenes (never validation)",
                 "schedule": sched, "grid": [h.entry() for h in heads],
                 "features": "patch tokens after the final norm, last n blocks concatenated per token",
                 "decoder_readout": readout_note,
                 "feature_cache": _cache_record(feats)}
    return _write_probe_record(task, p, data, wd, metrics=metrics, probe=probe, name=name, ckpt_path=ckpt_path,
                               sha=sha, info=info, seed=seed, warns=warns, console=console, started=started,
                               hub_record=hub_record, invocations=invocations)


def _decoder_readout(task: Any, bb: Any, info: dict[str, Any], ckpt_path: str | None, root: Any, files: list[str],
                     size: int, grid: tuple[int, int], pred_dir: Any, console: Any) -> str:
    """The checkpoint's own pre-trained decoder reading the frozen encoder (as the suite loaded it): its
    semantic token at every validation patch, written beside the probe's predictions. No training: a
    change in the encoder's function that the probe's re-fitted head absorbs still moves this. Returns
    the record's note (what was read out, or why nothing was)."""
    import torch

    from fourm_eval.pretrain import decoder_readout, semantic_readout

    if not ckpt_path:
        note = "random init: no pre-trained decoder to read out"
    elif info.get("family") != "4m":
        note = f"{info.get('family')} backbone: no 4M decoder to read out"
    else:
        model, note = decoder_readout(ckpt_path, bb)
        if model is not None:
            ds = _Scenes(root, files, size)
            rows = []
            for lo in range(0, len(ds), 32):
                x = torch.stack([ds[i]["inputs"] for i in range(lo, min(len(ds), lo + 32))])
                rows.append(semantic_readout(model, x))
            pred = torch.cat(rows).reshape(len(files), *grid).numpy()
            task.write_predictions(pred_dir, [(f, pred[i]) for i, f in enumerate(files)], decoder=True)
            return note
    console.line(f"decoder readout: none ({note})")
    return note


def _write_probe_record(task: Any, p: dict[str, Any], data: Any, wd: Any, *, metrics: dict[str, float],
                        probe: dict[str, Any], name: str, ckpt_path: str | None, sha: str | None,
                        info: dict[str, Any], seed: int, warns: list[str], console: Any, started: float,
                        hub_record: dict[str, Any] | None, invocations: Any) -> dict[str, Any]:
    from .runs import write_result

    for w in warns:
        console.warn(w)
    record = write_result(
        wd, task=task.name, profile=p["profile"], seed=seed, metrics=metrics, metrics_step0=None,
        backbone={"name": name, "family": info["family"], "init": "checkpoint" if ckpt_path else "random",
                  "checkpoint": ckpt_path, "sha256": sha, **({"hub": hub_record} if hub_record else {}),
                  "params": info["params"], "architecture": info["config"], "file_format": info.get("file_format"),
                  "config_source": info.get("config_source"), "config_guessed": info.get("config_guessed") or {},
                  "frozen": True},
        warnings=warns, dataset=data.record, config={**p, "schedule_resolved": {}},
        eval_history=[], predictions="predictions", started=started, invocations=invocations,
        provenance_extra={"sweep_cell": os.environ["FOURM_EVAL_SWEEP_CELL"]}
        if os.environ.get("FOURM_EVAL_SWEEP_CELL") else None,
        extra={"probe": probe})
    words = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    console.line(f"{task.name} {p['profile']}: {words} ({time.time() - started:.0f} s); record {wd.path / 'result.json'}")
    return record


def extract_command(task_name: str, *, backbone: str, checkpoint: str | None, data_root: str | None, profile: str,
                    blocks: list[int], seed: int, splits: tuple[str, ...], random_init: bool, size: str | None,
                    console: Any) -> dict[str, Any]:
    """``fourm-eval features extract``: the features a probe of ``profile`` would read, into the cache."""
    import hashlib
    from pathlib import Path

    from fourm_eval.backbones import backbone_info
    from fourm_eval.checkpoints import cached_sha256, locate_checkpoint
    from fourm_eval.paths import cache_dir

    from . import get_task
    from .kits.classification import ImageClassificationTask
    from .runner import checked_data, resolve_run_profile
    from .runs import resolve_backbone_name

    task = get_task(task_name)
    if not isinstance(task, ImageClassificationTask):
        from . import all_tasks
        have = [t.name for t in all_tasks().values() if isinstance(t, ImageClassificationTask)]
        raise ConfigError(f"features extract: {task.name} has no image-level labels to probe; tasks with them: "
                          f"{', '.join(have)}")
    name, checkpoint = resolve_backbone_name(backbone, size, checkpoint, random_init)
    ckpt_path = str(locate_checkpoint(checkpoint, say=console.line)[0]) if checkpoint else None
    info = backbone_info(name, ckpt_path)
    p, _ = resolve_run_profile(task, profile, [], info, size)
    root = Path(data_root).expanduser().resolve() if data_root else task.default_data_root()
    lists = cache_dir() / "features" / "lists" / hashlib.sha256(f"{task.name}|{root}|{p['profile']}".encode()).hexdigest()[:16]
    data = checked_data(task, Path(root), p, skip_bad_images=False, out_dir=lists, console=console)
    bb = _frozen_backbone(name, ckpt_path, seed, False, None)
    weights = _weights_id(cached_sha256(ckpt_path) if ckpt_path else None, name, seed)
    feats = split_features(bb, p, data, name=name, weights=weights, blocks=blocks, say=console.line, splits=splits)
    for split, f in feats.items():
        shape = tuple(f.mean.shape)
        console.line(f"{split}: {len(f.files)} image(s), blocks {f.blocks}, mean tokens {shape} fp16"
                     + (", class tokens" if f.cls is not None else "") + f"; key {f.key} ({f.path})")
    return feats


__all__ = ["PROBE_MODES", "extract_command", "is_probe", "run_probe", "split_features"]
