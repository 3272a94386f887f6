"""The classification kit's model parts (torch and mmengine; imported by a classification task's
``register_mm``, not by the task scan):

* ``FourmClassifier``: an mmengine ``BaseModel`` around the shared backbone adapter
  ``FourmEvalViT``, so the shared layer-decay optimiser, hooks, resume and evaluation apply.
  ``mode: finetune``: tokens of the last block (after the encoder's final norm with ``final_norm``,
  as ml-4m's FourMViT; before it without) -> mean over the patch tokens -> LayerNorm -> Linear
  (``pool: cls`` takes the normed CLS token of DeiT III / MAE).
  ``mode: linear``: the backbone frozen and in eval mode; mean-pooled tokens of the last
  ``probe_blocks`` blocks after the final norm, averaged -> BatchNorm without affine -> Linear
  (MAE's linear probe). timm's ``Mixup`` / ``SoftTargetCrossEntropy``, label smoothing, and
  ``ModelEmaV3`` (evaluated with and without EMA).
* ``FourmClsDataPreprocessor``: stacks the images of a batch.
* ``FourmImageFolder``: a list of (file relative to the root, class index) with timm's transforms
  (:func:`build_transform`).
* ``FourmTopKMetric``: top-1 / top-5 in a run, writing the predictions CSV(s) of ``classification.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseDataPreprocessor, BaseModel
from mmengine.registry import DATASETS, METRICS, MODELS
from torch.utils.data import Dataset

from fourm_eval.errors import ConfigError

from ..mmreg import register as mm_register
from .classification import PRED_FILE, PRED_FILE_EMA, TOPK, topk_accuracy, write_predictions_csv


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
                 ema: dict | None = None, data_preprocessor: dict | None = None, init_cfg: Any = None,
                 final_norm: bool = True):
        super().__init__(data_preprocessor=data_preprocessor or dict(type="FourmClsDataPreprocessor"),
                         init_cfg=init_cfg)
        if mode not in ("finetune", "linear"):
            raise ConfigError(f"mode must be 'finetune' or 'linear', not {mode!r}")
        if pool not in ("mean", "cls"):
            raise ConfigError(f"pool must be 'mean' or 'cls', not {pool!r}")
        self.mode, self.pool = mode, pool
        bcfg = dict(backbone)
        if pool == "cls" and not final_norm:
            raise ConfigError("pool: cls takes the CLS token after the encoder's final norm (MAE, DeiT III): "
                              "final_norm must be true")
        if mode == "linear":
            k = int(probe_blocks)
            bcfg.update(out_indices=list(range(-k, 0)), final_norm=bool(final_norm))
            bcfg["drop_path_rate"] = 0.0  # frozen and in eval mode: drop path never applies
        else:
            # the last block's tokens, after the encoder's final norm (which then trains) or before it
            bcfg.update(out_indices=[-1], final_norm=bool(final_norm))
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


__all__ = ["FourmClassifier", "FourmClsDataPreprocessor", "FourmImageFolder", "FourmTopKMetric", "build_transform"]
