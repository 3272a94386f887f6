"""ImageNet-1K classification: full fine-tuning (the 4M-21 protocol) and linear probing (MAE's).

On the classification kit (``tasks/kits/classification.py``: the predictions CSV and top-k;
``classification_model.py``: ``FourmClassifier`` on the shared backbone adapter ``FourmEvalViT``,
so the shared layer-decay optimiser, hooks, resume and evaluation apply):

* ``mode: finetune``: tokens of the last block (after the encoder's final norm with
  ``final_norm: true``, as ml-4m's FourMViT; before it with false) -> mean over the patch
  tokens -> LayerNorm -> Linear (4M has no CLS token; DeiT III and MAE use the same pooling
  by default; ``pool: cls`` takes their normed CLS token, recorded).
* ``mode: linear``: the backbone is frozen (no parameter trains, it stays in eval mode):
  mean-pooled tokens of the last ``probe_blocks`` blocks, each after the encoder's final
  norm (with ``final_norm: true``, MAE's), averaged -> BatchNorm without affine -> Linear
  (MAE's linear probe).

Training: timm's ``create_transform`` (random-resized crop, flip, RandAugment, random
erasing), ``Mixup`` (mixup / cutmix / label smoothing as soft targets) with
``SoftTargetCrossEntropy`` (``LabelSmoothingCrossEntropy`` without mixing), and optionally
``ModelEmaV3`` (evaluated with and without EMA). Evaluation: the standard centre crop
(resize the short side to ``image_size / eval_crop_pct``, crop ``image_size``; 256 / 224).

Data: the ImageFolder layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, checked by
``fourm_eval.data.imagenet_check``; class index = position of the wnid in sorted order.
Metric: top-1 / top-5 accuracy as fractions. Predictions: ``predictions/val_predictions.csv``
(``file,top5,scores``; ``val_predictions_ema.csv`` too with EMA), re-scored exactly by
``fourm-eval evaluate in1k-cls``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fourm_eval.data.checks import DatasetError
from fourm_eval.errors import ConfigError

from .base import Log, PreparedData, Progress, RunContext, Task
from .kits.classification import CLASSIFICATION_METRICS, read_predictions_csv, score_predictions
from .schema import S, SUBSET_SETTINGS


# --------------------------------------------------------------------- task
class In1kCls(Task):
    name = "in1k-cls"
    title = "ImageNet-1K classification (full fine-tuning, 4M-21 recipe; linear probe, MAE recipe)"
    data_kind = "imagenet"
    mini_data = "fourm_eval.data.imagenet_mini"
    reference_train_images = 1281167   # ImageNet-1K (ILSVRC-2012) train
    base_scaled_lr = True  # ml-4m, MAE and MultiMAE write a base lr x total batch / 256
    metrics = CLASSIFICATION_METRICS
    requires = ("torch", "timm", "mmengine")
    prediction_format = ("CSV with header file,top5,scores: one row per val image, file relative to the data root, "
                         "top5 = class indices best first (index = position of the wnid in sorted order), "
                         "scores = their probabilities")
    mm_scope = "mmengine"
    settings = SUBSET_SETTINGS + (
        S("image_size", "int", "square crop", unit="px"),
        S("mode", "str", "finetune, or linear (frozen backbone, BN + linear head)", choices=("finetune", "linear")),
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

    # data
    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.imagenet_check import listing_digest
        return {"listing_sha256": {s: listing_digest(root, s) for s in ("train", "val")}}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data import imagenet_check as ic
        from fourm_eval.data.checks import seeded_subset
        from fourm_eval.results import atomic_write_json

        root = Path(root)
        classes = ic.classes_of(root)
        listings = {s: ic.list_split(root, s, classes) for s in ("train", "val")}
        subsets: dict[str, Any] = {}
        seed = int(p.get("subset_seed", 0))
        for split, lst in listings.items():
            keep, n = seeded_subset([f for f, _ in lst.samples], p.get(f"{split}_subset"), seed)
            if n is not None:
                kept = set(keep)
                lst.samples = [s for s in lst.samples if s[0] in kept]  # listing order kept
                subsets[split] = {"n": n, "seed": seed, "files": f"data/{split}_samples.json"}
        for split, lst in listings.items():
            label = f"checking {split}/"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            ic.check_images(root, lst, skip_bad_images, progress=cb)
            n_bad = len(lst.bad_images)
            log(f"{lst.folder}: {len(lst.samples)} images in {len(lst.classes_present)} class folders, every image "
                "decodes" + (f"; {n_bad} unusable image(s) skipped" if n_bad else "")
                + (f"; {len(lst.other_files)} non-image file(s) ignored, e.g. {lst.other_files[0]}"
                   if lst.other_files else ""))
        missing_val = sorted(set(classes) - set(listings["val"].classes_present))
        if missing_val:
            log(f"val/ has no images of {len(missing_val)} train class(es), e.g. {missing_val[:3]}")
        files = {}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            for split, lst in listings.items():
                files[split] = atomic_write_json(out_dir / f"{split}_samples.json", lst.samples)
            if any(lst.bad_images for lst in listings.values()):
                atomic_write_json(out_dir / "bad_images.json",
                                  {s: lst.bad_images for s, lst in listings.items() if lst.bad_images})
        ident = self.data_identity(root)
        record = {"root": str(root), "listing_sha256": ident["listing_sha256"],
                  "n_train_images": len(listings["train"].samples), "n_val_images": len(listings["val"].samples),
                  "num_classes": len(classes), "classes": classes,
                  "class_order": "sorted wnid (class index = position in this list)",
                  "skipped_bad_images": sum(len(lst.bad_images) for lst in listings.values()),
                  "ignored_non_image_files": sum(len(lst.other_files) for lst in listings.values()),
                  "val_classes_without_images": missing_val, "subsets": subsets}
        return PreparedData(root, len(listings["train"].samples), len(listings["val"].samples), record,
                            private={"classes": classes, "files": files})

    # model and runner
    def register_mm(self) -> None:
        from . import mm  # noqa: F401 - FourmEvalViT, the optimiser constructor and the hooks
        from .kits import classification_model  # noqa: F401 - the classifier, dataset and metric

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

    # metrics and predictions
    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("cls/"): float(v) for k, v in evaluator_out.items()}

    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        if protocol is not None and log:
            log(f"{self.name}: every protocol scores alike (top-k accuracy); --protocol {protocol} changes nothing")
        from fourm_eval.data import imagenet_check as ic
        root = Path(data_root)
        classes = ic.classes_of(root)
        truth = ic.list_split(root, "val", classes).samples
        preds = read_predictions_csv(Path(predictions), len(classes))
        return score_predictions(preds, truth, Path(predictions))

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
        if c.get("mode") == "linear":
            how = (f"linear probe (frozen backbone, mean-pooled tokens of the last {c.get('probe_blocks', '?')} "
                   f"block(s){normed}, BatchNorm without affine + Linear); {c.get('optimizer', '?')} "
                   f"{lr}")
        else:
            how = (f"full fine-tuning ({c.get('pool', '?')}-pooled last-block tokens{normed}, LayerNorm + Linear); AdamW "
                   f"{lr}, layer decay {c.get('layer_decay', '?')}, drop path {c.get('drop_path', '?')}, "
                   f"mixup {aug.get('mixup', '?')} / cutmix {aug.get('cutmix', '?')}, label smoothing "
                   f"{aug.get('label_smoothing', '?')}")
        return (f"{self.name} / {record.get('profile')}: {how}; {sch.get('max_iters', '?')} iterations at batch "
                f"{sch.get('eff_batch', '?')}, {size} px; top-1/top-5 on val, centre crop {size} of {resize} "
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


TASK = In1kCls()
