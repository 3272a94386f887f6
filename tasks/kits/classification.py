"""The classification kit: tasks that give an image one class (ImageNet-1K and its kin).

Light (no torch): the prediction format and the metric, shared by runs and ``fourm-eval evaluate``.
Predictions are a CSV (``val_predictions.csv``; ``val_predictions_ema.csv`` for the EMA weights)
with the header ``file,top5,scores``: one row per scored image, ``file`` relative to the data root,
``top5`` the class indices best first (space-separated), ``scores`` their probabilities; every
malformed line is a named error. The metric is top-1 / top-5 accuracy as fractions
(:func:`topk_accuracy`; with fewer than five classes top-5 ranks them all).

The model parts (the classifier on the shared backbone adapter, its data preprocessor, the
image-list dataset with timm's transforms, the run's metric) are in ``classification_model.py``,
imported when a run registers its mm modules.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from fourm_eval.data.checks import DatasetError
from fourm_eval.errors import ConfigError, PredictionsError

from typing import Any, ClassVar

from ..base import Metric, PreparedData, RunContext, Task
from ..schema import S, SUBSET_SETTINGS

CLASSIFICATION_METRICS = (
    Metric("top1", main=True, gated=True, description="top-1 accuracy, centre-crop evaluation"),
    Metric("top5", description="top-5 accuracy, centre-crop evaluation"),
    Metric("top1_ema", description="top-1 accuracy of the EMA weights (profiles with ema.enabled)"),
    Metric("top5_ema", description="top-5 accuracy of the EMA weights (profiles with ema.enabled)"),
)
PRED_FILE = "val_predictions.csv"
PRED_FILE_EMA = "val_predictions_ema.csv"
CSV_HEADER = ["file", "top5", "scores"]
TOPK = 5


# ------------------------------------------------------------------ metric
def topk_accuracy(topk: list[list[int]], labels: list[int]) -> dict[str, float]:
    """top-1 / top-5 accuracy (fractions) from each image's ranked class indices (best first)."""
    n = len(labels)
    if n == 0 or len(topk) != n:
        raise ValueError("topk and labels must be non-empty and of the same length")
    top1 = sum(1 for t, y in zip(topk, labels) if t and t[0] == y)
    top5 = sum(1 for t, y in zip(topk, labels) if y in t[:TOPK])
    return {"top1": top1 / n, "top5": top5 / n}


def write_predictions_csv(path: Path, rows: list[tuple[str, list[int], list[float]]]) -> None:
    """One row per image, sorted by file: ``file`` (relative to the data root), ``top5`` (class
    indices, best first, space-separated), ``scores`` (their probabilities)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for file, idx, probs in sorted(rows, key=lambda r: r[0]):
            w.writerow([file, " ".join(str(int(i)) for i in idx), " ".join(f"{p:.6g}" for p in probs)])
    tmp.replace(path)


def read_predictions_csv(path: Path, num_classes: int) -> dict[str, list[int]]:
    """file -> ranked class indices; every malformed line is a named error."""
    from .prediction_csv import csv_rows

    out: dict[str, list[int]] = {}
    need = min(TOPK, num_classes)
    for where, row in csv_rows(path, CSV_HEADER, PRED_FILE):
        file, top, scores = row[0].strip(), row[1].split(), row[2].split()
        try:
            idx = [int(t) for t in top]
        except ValueError:
            raise PredictionsError(f"{where}: top5 must be space-separated class indices, got {row[1]!r}") \
                from None
        if len(idx) < need:
            raise PredictionsError(f"{where}: {len(idx)} class indices; top-5 needs {need}")
        if len(set(idx)) != len(idx):
            raise PredictionsError(f"{where}: a class index repeats in {row[1]!r}")
        bad = [i for i in idx if not 0 <= i < num_classes]
        if bad:
            raise PredictionsError(f"{where}: class index {bad[0]} out of range 0..{num_classes - 1} "
                                   "(index = the class's position in the task's class list)")
        try:
            probs = [float(s) for s in scores]
        except ValueError:
            raise PredictionsError(f"{where}: scores must be space-separated numbers, got {row[2]!r}") from None
        if len(probs) != len(idx):
            raise PredictionsError(f"{where}: {len(probs)} scores for {len(idx)} class indices")
        if any(not math.isfinite(p) for p in probs):
            raise PredictionsError(f"{where}: a score is not finite ({row[2]!r})")
        if file in out:
            raise PredictionsError(f"{where}: {file!r} appears twice")
        out[file] = idx
    if not out:
        raise PredictionsError(f"{path / PRED_FILE if path.is_dir() else path}: no prediction rows")
    return out


def score_predictions(preds: dict[str, list[int]], truth: list[tuple[str, int]], path: Path) -> dict[str, float]:
    """Top-k of predictions against every val image; missing or extra images are named errors."""
    labels = dict(truth)
    extra = sorted(set(preds) - set(labels))
    if extra:
        raise PredictionsError(f"{path}: {len(extra)} row(s) name files that are not validation images of the data "
                               f"root, e.g. {extra[:3]} (file = path relative to the root, val/<wnid>/<name>)")
    missing = sorted(set(labels) - set(preds))
    if missing:
        raise PredictionsError(f"{path}: no prediction for {len(missing)} of {len(labels)} validation image(s), "
                               f"e.g. {missing[:3]}")
    files = sorted(labels)
    return topk_accuracy([preds[f] for f in files], [labels[f] for f in files])


# ------------------------------------------------------------ the task base
class ImageClassificationTask(Task):
    """What every image-classification task shares (ImageNet-1K, ImageNet-21K): the profile keys, the
    classifier on the shared backbone adapter (``classification_model.py``), timm's transforms, the
    run's metric and record mapping, the footnote. A task adds its data (layout check, identity,
    class list, the validation split) and its ``evaluate``. ``check_data`` must hand over
    ``private = {"classes": [...], "files": {"train": json, "val": json}}`` (the sample lists)."""

    data_title: ClassVar[str] = "ImageNet"
    val_words: ClassVar[str] = "val"
    base_scaled_lr = True  # ml-4m, MAE and MultiMAE write a base lr x total batch / 256
    metrics = CLASSIFICATION_METRICS
    requires = ("torch", "timm", "mmengine")
    mm_scope = "mmengine"
    settings = SUBSET_SETTINGS + (
        S("image_size", "int", "square crop", unit="px"),
        S("mode", "str", "finetune; linear (frozen backbone, BN + linear head, trained from images); knn or "
          "linear-grid (frozen features from the feature cache: DINOv2's weighted kNN, or a grid of linear heads "
          "chosen on held-out training images; tasks/probe_run.py)", choices=("finetune", "linear", "knn", "linear-grid")),
        S("probe", "section", "knn / linear-grid modes: the probe on cached features", per_size=False, default=None,
          null=True),
        S("probe.ks", "list", "knn: the k values scored", item="int", default=[10, 20, 100, 200]),
        S("probe.report_k", "int", "knn: the k whose predictions are the run's metrics and predictions file",
          default=20),
        S("probe.temperature", "float", "knn: the vote's softmax temperature", default=0.07),
        S("probe.lrs", "list", "linear-grid: learning rates (before the x batch / 256 scaling)", item="float",
          default=[1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]),
        S("probe.n_last_blocks", "list", "linear-grid: heads on the last n blocks' features, concatenated",
          item="int", default=[1, 4]),
        S("probe.poolings", "names", "linear-grid: cls, cls+mean, mean; auto: cls and cls+mean for encoders with "
          "a class token, mean for 4M", default="auto"),
        S("probe.epochs", "int", "linear-grid: passes over the fitting part of the training features",
          default=10),
        S("probe.batch_size", "int", "linear-grid: batch of cached features per step", default=128),
        S("probe.holdout", "float", "linear-grid: share of the training split held out to choose the head",
          default=0.1),
        S("probe.shard_size", "int", "feature cache: images per shard (memory bound of the extraction)",
          default=1024),
        S("probe.batch_size_extract", "int", "feature cache: images per encoder forward", default=64),
        S("pool", "str", "pooling of the final tokens (cls: DeiT III / MAE only)", choices=("mean", "cls")),
        S("probe_blocks", "int", "linear mode: average the pooled tokens of the last k blocks", default=1),
        S("final_norm", "bool", "the encoder's final norm on the tokens the head reads (ml-4m's FourMViT applies "
          "it; MAE's global-pool fine-tuning does not, its linear probe does)"),
        S("eval_crop_pct", "float", "centre-crop evaluation: short side to image_size / this"),
        S("interpolation", "str", "resize interpolation (timm's names)", choices=("bicubic", "bilinear", "nearest")),
        S("augment", "section", "training augmentation (timm)", per_size=False),
        S("augment.rrc_scale", "list", "random-resized-crop area range", item="float", length=2),
        S("augment.rrc_ratio", "list", "random-resized-crop aspect range", item="float", length=2),
        S("augment.hflip", "float", "horizontal flip probability"),
        S("augment.rand_augment", "str", "timm RandAugment policy (null: none)", null=True),
        S("augment.random_erasing", "float", "random erasing probability"),
        S("augment.mixup", "float", "mixup alpha (0: off)"),
        S("augment.cutmix", "float", "cutmix alpha (0: off)"),
        S("augment.mixup_prob", "float", "probability of mixing a batch"),
        S("augment.mixup_switch_prob", "float", "probability of cutmix instead of mixup"),
        S("augment.label_smoothing", "float", "label smoothing"),
        S("ema", "section", "model EMA (timm ModelEmaV3)", per_size=False),
        S("ema.enabled", "bool", "keep and evaluate an EMA of the weights"),
        S("ema.decay", "float", "EMA decay"),
        S("ema.warmup", "bool", "timm's EMA decay warm-up", default=False),
    )

    # data: what both datasets' checks do alike
    @staticmethod
    def apply_subsets(listings: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
        """The profile's ``<split>_subset``: a seeded random subset of each listing's samples (listing
        order kept); returns the record's ``subsets`` entry."""
        from fourm_eval.data.checks import seeded_subset

        subsets: dict[str, Any] = {}
        seed = int(p.get("subset_seed", 0))
        for split, lst in listings.items():
            keep, n = seeded_subset([f for f, _ in lst.samples], p.get(f"{split}_subset"), seed)
            if n is not None:
                kept = set(keep)
                lst.samples = [s for s in lst.samples if s[0] in kept]  # listing order kept
                subsets[split] = {"n": n, "seed": seed, "files": f"data/{split}_samples.json"}
        return subsets

    @staticmethod
    def write_listings(out_dir: Any, listings: dict[str, Any]) -> dict[str, Any]:
        """``<split>_samples.json`` (what the run reads) and ``bad_images.json`` into the run's data folder;
        returns split -> samples file (empty without ``out_dir``)."""
        from fourm_eval.results import atomic_write_json

        if out_dir is None:
            return {}
        out_dir.mkdir(parents=True, exist_ok=True)
        files = {split: atomic_write_json(out_dir / f"{split}_samples.json", lst.samples)
                 for split, lst in listings.items()}
        if any(lst.bad_images for lst in listings.values()):
            atomic_write_json(out_dir / "bad_images.json",
                              {s: lst.bad_images for s, lst in listings.items() if lst.bad_images})
        return files

    def note_protocol(self, protocol: str | None, log: Any) -> None:
        """``evaluate --protocol``: every protocol of a classification task scores alike."""
        if protocol is not None and log:
            log(f"{self.name}: every protocol scores alike (top-k accuracy); --protocol {protocol} changes nothing")

    # model and runner
    def register_mm(self) -> None:
        from .. import mm  # noqa: F401 - FourmEvalViT, the optimiser constructor and the hooks
        from . import classification_model  # noqa: F401 - the classifier, dataset and metric

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        p, data, backbone_cfg, predictions_dir = ctx.profile, ctx.data, ctx.backbone_cfg, ctx.predictions_dir
        classes = data.private["classes"]
        files = data.private["files"]
        if not files:
            raise ConfigError("the image lists are written by the data check into the run directory (out_dir)")
        return dict(model=build_model_cfg(p, backbone_cfg, len(classes)),
                    train_dataset=dict(type="FourmImageFolder", root=str(data.root), samples_file=str(files["train"]),
                                       transform=transform_cfg(p, True)),
                    val_dataset=dict(type="FourmImageFolder", root=str(data.root), samples_file=str(files["val"]),
                                     transform=transform_cfg(p, False)),
                    val_evaluator=dict(type="FourmTopKMetric", num_classes=len(classes),
                                       predictions_dir=str(predictions_dir) if predictions_dir else None))

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        model = getattr(runner.model, "module", runner.model)
        n = len(data.private["classes"])
        if model.num_classes != n:
            raise DatasetError(f"the model has {model.num_classes} outputs but the data root has {n} classes")

    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("cls/"): float(v) for k, v in evaluator_out.items()}

    def footnote(self, record: dict[str, Any]) -> str:
        c = record.get("config", {})
        sch = c.get("schedule_resolved", {})
        aug = c.get("augment", {})
        size = c.get("image_size", "?")
        crop = c.get("eval_crop_pct", "?")
        resize = round(size / crop) if isinstance(size, int) and isinstance(crop, float) else "?"
        lr = (f"blr {c['blr']} (peak lr {(c.get('lr_resolved') or {}).get('lr', '?')})" if c.get("blr") is not None
              else f"lr {c.get('lr', '?')}")
        normed = {True: " after the final norm", False: " before the final norm"}.get(c.get("final_norm"), "")
        st = ((record.get("provenance") or {}).get("init_from") or {}).get("stage") or {}
        stage = (f"after the pre-stage {st.get('task', '?')} / {st.get('profile', '?')} (its final weights; "
                 "the head for its classes not carried over), " if st else "")
        if c.get("mode") in ("knn", "linear-grid"):
            pr = record.get("probe") or {}
            if c.get("mode") == "knn":
                how = (f"weighted kNN on frozen features (k = {pr.get('reported_k', '?')}, T = "
                       f"{pr.get('temperature', '?')}, cosine; DINOv2 dinov2/eval/knn.py)")
            else:
                ch = pr.get("chosen") or {}
                how = (f"linear grid on frozen features ({pr.get('heads', '?')} heads, DINOv2 dinov2/eval/linear.py; "
                       f"chosen on held-out training images: {ch.get('name', '?')})")
            return (f"{self.name} / {record.get('profile')}: {how}; {c.get('image_size', '?')} px centre crop "
                    f"(train and val); top-1/top-5 on {self.val_words}")
        if c.get("mode") == "linear":
            how = (f"linear probe (frozen backbone, mean-pooled tokens of the last {c.get('probe_blocks', '?')} "
                   f"block(s){normed}, BatchNorm without affine + Linear); {c.get('optimizer', '?')} "
                   f"{lr}")
        else:
            how = (f"full fine-tuning ({c.get('pool', '?')}-pooled last-block tokens{normed}, LayerNorm + Linear); AdamW "
                   f"{lr}, layer decay {c.get('layer_decay', '?')}, drop path {c.get('drop_path', '?')}, "
                   f"mixup {aug.get('mixup', '?')} / cutmix {aug.get('cutmix', '?')}, label smoothing "
                   f"{aug.get('label_smoothing', '?')}")
        return (f"{self.name} / {record.get('profile')}: {stage}{how}; {sch.get('max_iters', '?')} iterations at batch "
                f"{sch.get('eff_batch', '?')}, {size} px; top-1/top-5 on {self.val_words}, centre crop {size} of {resize} "
                f"(ratio {crop}), final model (not best-on-val)"
                + ("; EMA evaluated too" if (c.get("ema") or {}).get("enabled") else ""))


def transform_cfg(p: dict[str, Any], train: bool) -> dict[str, Any]:
    a = p["augment"]
    cfg = dict(is_training=train, image_size=int(p["image_size"]), crop_pct=float(p["eval_crop_pct"]),
               interpolation=str(p["interpolation"]))
    if train:
        cfg.update(rrc_scale=list(a["rrc_scale"]), rrc_ratio=list(a["rrc_ratio"]), hflip=float(a["hflip"]),
                   rand_augment=a["rand_augment"], random_erasing=float(a["random_erasing"]))
    return cfg


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], num_classes: int) -> dict[str, Any]:
    a = p["augment"]
    mixup = dict(mixup_alpha=float(a["mixup"]), cutmix_alpha=float(a["cutmix"]), prob=float(a["mixup_prob"]),
                 switch_prob=float(a["mixup_switch_prob"]), mode="batch")
    return dict(type="FourmClassifier", backbone=dict(backbone_cfg), num_classes=int(num_classes),
                mode=str(p["mode"]), pool=str(p["pool"]), probe_blocks=int(p["probe_blocks"]), mixup=mixup,
                label_smoothing=float(a["label_smoothing"]), ema=dict(p["ema"]), final_norm=bool(p["final_norm"]))


__all__ = ["CLASSIFICATION_METRICS", "ImageClassificationTask", "build_model_cfg", "transform_cfg", "CSV_HEADER", "PRED_FILE", "PRED_FILE_EMA", "PredictionsError", "TOPK", "read_predictions_csv",
           "score_predictions", "topk_accuracy", "write_predictions_csv"]
