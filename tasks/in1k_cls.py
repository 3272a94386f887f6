"""ImageNet-1K classification: full fine-tuning (the 4M-21 protocol) and linear probing (MAE's).

Model (``FourmClassifier``, an mmengine ``BaseModel`` around the shared backbone adapter
``FourmEvalViT``, so the shared layer-decay optimiser, hooks, resume and evaluation apply):

* ``mode: finetune``: tokens of the last block (before the encoder's final norm) ->
  mean over the patch tokens -> LayerNorm -> Linear (4M has no CLS token; DeiT III and
  MAE use the same pooling by default; ``pool: cls`` takes their normed CLS token, recorded).
* ``mode: linear``: the backbone is frozen (no parameter trains, it stays in eval mode):
  mean-pooled tokens of the last ``probe_blocks`` blocks, each after the encoder's final
  norm, averaged -> BatchNorm without affine -> Linear (MAE's linear probe).

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

import csv
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

from fourm_eval.data.checks import DatasetError
from fourm_eval.errors import ConfigError

from .mmreg import register as mm_register
from .schema import S, SUBSET_SETTINGS
from .base import Log, Metric, PreparedData, Progress, RunContext, Task

PRED_FILE = "val_predictions.csv"
PRED_FILE_EMA = "val_predictions_ema.csv"
CSV_HEADER = ["file", "top5", "scores"]
TOPK = 5


class PredictionsError(DatasetError):
    """A predictions CSV is missing, malformed, or does not cover the validation images."""


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
    if path.is_dir():
        path = path / PRED_FILE
    if not path.is_file():
        raise PredictionsError(f"{path}: predictions file not found (expected a CSV with the header "
                               f"{','.join(CSV_HEADER)}, or a run's predictions folder holding {PRED_FILE})")
    out: dict[str, list[int]] = {}
    need = min(TOPK, num_classes)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != CSV_HEADER:
            raise PredictionsError(f"{path}: the first line must be the header {','.join(CSV_HEADER)}, got {header}")
        for line_no, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{path}, line {line_no}"
            if len(row) != 3:
                raise PredictionsError(f"{where}: expected 3 fields (file, top5, scores), got {len(row)}")
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
                                       "(index = position of the wnid in sorted order)")
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
        raise PredictionsError(f"{path}: no prediction rows")
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


@mm_register(METRICS)
class FourmTopKMetric(BaseMetric):
    """Top-1 / top-5 of the model (and of its EMA when present); writes the predictions CSV(s)."""

    default_prefix = "cls"

    def __init__(self, num_classes: int, predictions_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.predictions_dir = predictions_dir

    def process(self, data_batch: Any, data_samples: list) -> None:
        k = min(TOPK, self.num_classes)
        for s in data_samples:
            item = {"file": s["file"], "label": int(s["label"])}
            for key in ("probs", "probs_ema"):
                if s.get(key) is not None:
                    p, i = s[key].float().topk(k)
                    item[key] = (i.tolist(), p.tolist())
            self.results.append(item)

    def compute_metrics(self, results: list) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, suffix, fname in (("probs", "", PRED_FILE), ("probs_ema", "_ema", PRED_FILE_EMA)):
            have = [r for r in results if key in r]
            if not have:
                continue
            rows = [(r["file"], r[key][0], r[key][1]) for r in have]
            if self.predictions_dir:
                write_predictions_csv(Path(self.predictions_dir) / fname, rows)
            rows.sort(key=lambda r: r[0])  # the order the saved file has, for an identical score
            by_file = {r["file"]: r["label"] for r in have}
            acc = topk_accuracy([r[1] for r in rows], [by_file[r[0]] for r in rows])
            out.update({name + suffix: v for name, v in acc.items()})
        return out


# ------------------------------------------------------------------- data
@mm_register(DATASETS)
class FourmImageFolder(Dataset):
    """The images of one split (a list of (relative path, class index)) with a timm transform."""

    def __init__(self, root: str, samples_file: str, transform: dict, **_: Any):
        import json
        self.root = Path(root)
        self.samples = [(str(f), int(y)) for f, y in json.loads(Path(samples_file).read_text())]
        self.transform_cfg = dict(transform)
        self.transform = build_transform(**self.transform_cfg)
        self.metainfo = {"n": len(self.samples)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from PIL import Image
        rel, label = self.samples[i]
        with Image.open(self.root / rel) as im:  # by content: CMYK, grayscale and PNG '.JPEG' files
            img = im.convert("RGB")
        return {"inputs": self.transform(img), "label": label, "file": rel}


def build_transform(is_training: bool, image_size: int, crop_pct: float, interpolation: str,
                    rrc_scale: list | None = None, rrc_ratio: list | None = None, hflip: float = 0.5,
                    rand_augment: str | None = None, random_erasing: float = 0.0) -> Any:
    """timm's ImageNet transforms: training (random-resized crop, flip, RandAugment, erasing) or the
    centre-crop evaluation (short side to ``image_size / crop_pct``, centre crop ``image_size``)."""
    from timm.data import create_transform
    if is_training:
        return create_transform(image_size, is_training=True, scale=tuple(rrc_scale), ratio=tuple(rrc_ratio),
                                hflip=hflip, vflip=0.0, color_jitter=None, auto_augment=rand_augment or None,
                                interpolation=interpolation, re_prob=random_erasing, re_mode="pixel", re_count=1)
    return create_transform(image_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation)


# ------------------------------------------------------------------ model
@mm_register(MODELS)
class FourmClsDataPreprocessor(BaseDataPreprocessor):
    """Stacks the per-image tensors of mmengine's ``pseudo_collate`` batches; moves them to the device."""

    def forward(self, data: dict, training: bool = False) -> dict:
        inputs = data["inputs"]
        x = torch.stack(list(inputs)) if isinstance(inputs, (list, tuple)) else inputs
        y = torch.as_tensor(data["label"], dtype=torch.long)
        files = list(data["file"])
        return {"inputs": self.cast_data(x), "label": self.cast_data(y), "file": files}


@mm_register(MODELS)
class FourmClassifier(BaseModel):
    """Backbone (``FourmEvalViT``) + classification head; see the module docstring."""

    def __init__(self, backbone: dict, num_classes: int, mode: str = "finetune", pool: str = "mean",
                 probe_blocks: int = 1, mixup: dict | None = None, label_smoothing: float = 0.0,
                 ema: dict | None = None, data_preprocessor: dict | None = None, init_cfg: Any = None):
        super().__init__(data_preprocessor=data_preprocessor or dict(type="FourmClsDataPreprocessor"),
                         init_cfg=init_cfg)
        if mode not in ("finetune", "linear"):
            raise ConfigError(f"mode must be 'finetune' or 'linear', not {mode!r}")
        if pool not in ("mean", "cls"):
            raise ConfigError(f"pool must be 'mean' or 'cls', not {pool!r}")
        self.mode, self.pool = mode, pool
        bcfg = dict(backbone)
        if mode == "linear":
            k = int(probe_blocks)
            bcfg.update(out_indices=list(range(-k, 0)), final_norm=True)
            bcfg["drop_path_rate"] = 0.0  # frozen and in eval mode: drop path never applies
        else:
            # cls pooling takes the CLS token after the encoder's final norm, which then trains
            bcfg.update(out_indices=[-1], final_norm=pool == "cls")
        self.backbone = MODELS.build(dict(type="FourmEvalViT", **bcfg))
        net = self.backbone.net
        if pool == "cls" and not (getattr(net, "num_prefix_tokens", 0) and hasattr(net, "forward_with_prefix")):
            raise ConfigError(f"pool: cls needs a backbone with a CLS token (DeiT III, MAE); {bcfg['name']} has "
                              "none (4M): use pool: mean")
        if pool == "cls" and mode == "linear":
            raise ConfigError("pool: cls is for fine-tuning; the linear probe averages mean-pooled blocks")
        dim = net.embed_dim
        self.num_classes = int(num_classes)
        if mode == "linear":
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
            nn.init.trunc_normal_(self.head[1].weight, std=0.01)  # MAE linear probe
        else:
            self.head = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, num_classes))
            nn.init.trunc_normal_(self.head[1].weight, std=2e-5)  # MAE / BEiT fine-tuning
        nn.init.zeros_(self.head[1].bias)
        self.mixup_cfg = dict(mixup or {})
        self.label_smoothing = float(label_smoothing)
        self._mixup = None
        if self.mixup_cfg and (self.mixup_cfg.get("mixup_alpha", 0) > 0 or self.mixup_cfg.get("cutmix_alpha", 0) > 0):
            from timm.data import Mixup
            self._mixup = Mixup(**self.mixup_cfg, label_smoothing=self.label_smoothing, num_classes=num_classes)
        self.ema = None
        if ema and ema.get("enabled"):
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(nn.ModuleDict({"backbone": self.backbone, "head": self.head}),
                                  decay=float(ema["decay"]), use_warmup=bool(ema.get("warmup", False)))
            self.ema.requires_grad_(False)  # a copy of the model, never trained by the optimiser
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))

    def init_weights(self) -> None:  # the backbone's weights come from build_backbone; the head is set above
        pass

    def train(self, mode: bool = True) -> "FourmClassifier":
        super().train(mode)
        if self.mode == "linear":
            self.backbone.eval()  # a frozen backbone stays in eval mode (no drop path, no dropout)
        if self.ema is not None:
            self.ema.eval()
        return self

    # features and logits
    def features(self, x: torch.Tensor, backbone: nn.Module | None = None) -> torch.Tensor:
        bb = backbone if backbone is not None else self.backbone
        if self.mode == "linear":
            with torch.no_grad():
                maps = bb(x)
                return torch.stack([m.mean(dim=(2, 3)) for m in maps]).mean(0)
        if self.pool == "cls":
            return bb.net.forward_with_prefix(x)[:, 0]
        return bb(x)[0].mean(dim=(2, 3))

    def logits(self, x: torch.Tensor, use_ema: bool = False) -> torch.Tensor:
        if use_ema:
            m = self.ema.module
            return m["head"](self.features(x, m["backbone"]))
        return self.head(self.features(x))

    def forward(self, inputs: torch.Tensor, label: torch.Tensor | None = None, file: list | None = None,
                mode: str = "tensor") -> Any:
        if mode == "loss":
            return {"loss": self.loss(inputs, label)}
        if mode == "predict":
            probs = self.logits(inputs).softmax(-1)
            probs_ema = self.logits(inputs, use_ema=True).softmax(-1) if self.ema is not None else None
            return [{"file": f, "label": int(y), "probs": probs[i].detach().cpu(),
                     "probs_ema": None if probs_ema is None else probs_ema[i].detach().cpu()}
                    for i, (f, y) in enumerate(zip(file, label.tolist()))]
        return self.logits(inputs)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._mixup is not None:
            from timm.loss import SoftTargetCrossEntropy
            if x.shape[0] % 2:
                raise ConfigError(f"mixup / cutmix need an even batch per process, got {x.shape[0]}")
            x, target = self._mixup(x, y)
            return SoftTargetCrossEntropy()(self.logits(x), target)
        if self.label_smoothing > 0:
            from timm.loss import LabelSmoothingCrossEntropy
            return LabelSmoothingCrossEntropy(self.label_smoothing)(self.logits(x), y)
        return nn.functional.cross_entropy(self.logits(x), y)

    def train_step(self, data: Any, optim_wrapper: Any) -> dict[str, torch.Tensor]:
        out = super().train_step(data, optim_wrapper)
        if self.ema is not None:
            live = nn.ModuleDict({"backbone": self.backbone, "head": self.head})
            self.ema.update(live, step=int(self.ema_updates))
            self.ema_updates += 1
        return out

    def after_init_from(self) -> None:
        """Weights were loaded from another run (``--init-from``): the EMA starts from them."""
        if self.ema is not None and int(self.ema_updates) == 0:
            self.ema.module.load_state_dict(nn.ModuleDict({"backbone": self.backbone,
                                                           "head": self.head}).state_dict())


# --------------------------------------------------------------------- task
class In1kCls(Task):
    name = "in1k-cls"
    title = "ImageNet-1K classification (full fine-tuning, 4M-21 recipe; linear probe, MAE recipe)"
    data_kind = "imagenet"
    metrics = (
        Metric("top1", main=True, gated=True, description="top-1 accuracy, centre-crop evaluation"),
        Metric("top5", description="top-5 accuracy, centre-crop evaluation"),
        Metric("top1_ema", description="top-1 accuracy of the EMA weights (profiles with ema.enabled)"),
        Metric("top5_ema", description="top-5 accuracy of the EMA weights (profiles with ema.enabled)"),
    )
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
    def make_mini(self, out: Path, seed: int = 0) -> Path:
        from fourm_eval.data.imagenet_mini import make_mini_imagenet
        return make_mini_imagenet(out, seed=seed)

    def default_data_root(self) -> Path:
        from fourm_eval.data.imagenet_mini import default_mini_imagenet
        return default_mini_imagenet()

    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.imagenet_check import listing_digest
        return {"listing_sha256": {s: listing_digest(root, s) for s in ("train", "val")}}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data import imagenet_check as ic
        from fourm_eval.results import atomic_write_json

        root = Path(root)
        classes = ic.classes_of(root)
        listings = {s: ic.list_split(root, s, classes) for s in ("train", "val")}
        subsets: dict[str, Any] = {}
        seed = int(p.get("subset_seed", 0))
        for split, lst in listings.items():
            n = p.get(f"{split}_subset")
            if n is not None and int(n) < len(lst.samples):
                import numpy as np
                pick = np.random.default_rng(seed).choice(len(lst.samples), size=int(n), replace=False)
                lst.samples = [lst.samples[i] for i in sorted(pick)]
                subsets[split] = {"n": int(n), "seed": seed, "files": f"data/{split}_samples.json"}
        for split, lst in listings.items():
            label = f"checking {split}/"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            ic.check_images(root, lst, progress=cb)
            n_bad = len(lst.bad_images)
            ic.drop_bad(lst, skip_bad_images)
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
        import importlib
        importlib.import_module(".mm", __package__)  # FourmEvalViT, the optimiser constructor and the hooks

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

    def evaluate(self, predictions: Path, data_root: Path) -> dict[str, float]:
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
        if c.get("mode") == "linear":
            how = (f"linear probe (frozen backbone, mean-pooled tokens of the last {c.get('probe_blocks', '?')} "
                   f"block(s) after the final norm, BatchNorm without affine + Linear); {c.get('optimizer', '?')} "
                   f"lr {c.get('lr', '?')}")
        else:
            how = (f"full fine-tuning ({c.get('pool', '?')}-pooled last-block tokens, LayerNorm + Linear); AdamW lr "
                   f"{c.get('lr', '?')}, layer decay {c.get('layer_decay', '?')}, drop path {c.get('drop_path', '?')}, "
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
                label_smoothing=float(a["label_smoothing"]), ema=dict(p["ema"]))


TASK = In1kCls()
