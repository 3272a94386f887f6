"""ADE20K semantic segmentation (150 classes) on mmsegmentation 1.2.

Heads (profile ``head``, recorded with the whole profile in result.json):

* ``convnext`` (default; the 4M / MultiMAE protocol): MultiMAE's ConvNeXt adapter
  (``tasks.dense_heads.ConvNeXtTokenHead``) on the tokens of the last block, without the
  encoder's final norm (MultiMAE's ``MultiViT`` feeds the blocks' output to its adapters):
  linear to ``decoder_dim``, 16 sub-patches per token (stride 4), 4 ConvNeXt blocks, 1x1 to
  the classes, bilinear upsampling.
* ``upernet`` (the MAE / BEiT protocol): blocks at depth 1/4, 1/2, 3/4 and 1 (no final norm)
  through mmseg's ``Feature2Pyramid`` neck (x4: two stride-2 deconvolutions with norm + GELU
  between them; x2: one deconvolution; x1: identity; x0.5: 2x2 max-pool -- the MAE/BEiT neck),
  mmseg's ``UPerHead`` on the four levels, and mmseg's ``FCNHead`` on the third level as the
  auxiliary head (loss weight 0.4). BN in neck and heads (SyncBN when the run has several
  processes, as mmseg's MAE config).

Data: the ``ADEChallengeData2016`` layout, checked by ``fourm_eval.data.ade_check``; labels are
reduced as ADE20K requires (0 "other" ignored, value v -> class v - 1).

Training: crops of ``image_size`` with large-scale jitter (long side resized to image_size x
U(lsj_scale)), random crop (padded to the crop with 0 after normalisation, labels with 255),
horizontal flip, colour jitter (torchvision's, MultiMAE's values); cross-entropy over the labelled
pixels. Inference: each image resized to ``test_scale`` (mmseg's ADE20K rule: short side 512,
long side at most 2048, aspect kept), padded to a multiple of the patch size, sliding windows of
``image_size`` with ``slide_stride``; logits upsampled to the original size.

Metric: mIoU / mAcc / aAcc as fractions (``fourm_eval.metrics_seg``, mmseg's counting): a class
absent from both predictions and ground truth of the whole validation set is excluded from mIoU,
as mmseg does. Predictions: one PNG per validation image (values 1..150, ADE20K's format),
named and sized like the image, plus ``meta.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from mmengine.evaluator import BaseMetric
from mmengine.registry import METRICS

from fourm_eval.errors import ConfigError

from .mmreg import register as mm_register
from .base import Log, Metric, PreparedData, Progress, RunContext, Task

NUM_CLASSES = 150
HEADS = ("convnext", "upernet")
METRIC_PREFIX = "seg"


@mm_register(METRICS)
class FourmSegMetric(BaseMetric):
    """mIoU / mAcc / aAcc at full precision (``fourm_eval.metrics_seg``); with ``predictions_dir``
    every evaluation also writes the label PNGs (the last evaluation's stay)."""

    default_prefix = METRIC_PREFIX

    def __init__(self, num_classes: int = NUM_CLASSES, predictions_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.predictions_dir = predictions_dir

    def process(self, data_batch: dict, data_samples: list) -> None:
        from fourm_eval.metrics_seg import image_areas, write_prediction_png

        for ds in data_samples:
            pred = ds["pred_sem_seg"]["data"].squeeze(0).cpu().numpy()
            label = ds["gt_sem_seg"]["data"].squeeze(0).cpu().numpy()
            stem = Path(ds["img_path"]).stem
            if self.predictions_dir:
                out = Path(self.predictions_dir)
                out.mkdir(parents=True, exist_ok=True)
                write_prediction_png(out / f"{stem}.png", pred)
            self.results.append((stem, image_areas(pred, label, self.num_classes)))

    def compute_metrics(self, results: list) -> dict[str, float]:
        from fourm_eval.metrics_seg import summarize
        from fourm_eval.results import atomic_write_json

        total = np.zeros((4, self.num_classes))
        for _, areas in sorted(results, key=lambda r: r[0]):
            total += areas
        s = summarize(total)
        if self.predictions_dir:
            atomic_write_json(Path(self.predictions_dir) / "meta.json", {
                "format": "ADE20K label PNGs: <image stem>.png, 8-bit, class k stored as k + 1 (1..150)",
                "stems": sorted(r[0] for r in results), "per_class_iou": s["per_class_iou"],
                "classes_in_miou": s["classes_in_miou"], "classes_in_macc": s["classes_in_macc"]})
        return {k: s[k] for k in ("mIoU", "mAcc", "aAcc")}


# ------------------------------------------------------------------ config
def _norm() -> dict:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return dict(type="SyncBN" if world > 1 else "BN", requires_grad=True)


def quarter_blocks(depth: int) -> list[int]:
    """0-based blocks at depth 1/4, 1/2, 3/4, 1 (2, 5, 8, 11 for 12 blocks; 0, 1, 2, 3 for 4)."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], embed_dim: int,
                    num_classes: int = NUM_CLASSES) -> dict:
    s, stride = int(p["image_size"]), int(p["slide_stride"])
    ce = lambda w: dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=w,  # noqa: E731
                        avg_non_ignore=True)  # mean over labelled pixels (PyTorch's / MultiMAE's)
    model: dict[str, Any] = dict(
        type="EncoderDecoder",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                               size=(s, s), test_cfg=dict(size_divisor=int(p["test_pad_divisor"]))),
        backbone=dict(type="FourmEvalViT", **backbone_cfg),
        train_cfg=dict(),
        test_cfg=dict(mode="slide", crop_size=(s, s), stride=(stride, stride)))
    head = p["head"]
    if head == "convnext":
        c = p["convnext"]
        model["decode_head"] = dict(type="FourmConvNeXtHead", in_channels=embed_dim, in_index=0,
                                    num_classes=num_classes, decoder_dim=int(c["decoder_dim"]),
                                    preds_per_patch=int(c["preds_per_patch"]), depth=int(c["depth"]),
                                    align_corners=False, loss_decode=ce(1.0))
    elif head == "upernet":
        u = p["upernet"]
        model["neck"] = dict(type="Feature2Pyramid", embed_dim=embed_dim, rescales=[4, 2, 1, 0.5], norm_cfg=_norm())
        model["decode_head"] = dict(type="UPerHead", in_channels=[embed_dim] * 4, in_index=[0, 1, 2, 3],
                                    pool_scales=tuple(u["pool_scales"]), channels=int(u["channels"]),
                                    dropout_ratio=float(u["dropout"]), num_classes=num_classes, norm_cfg=_norm(),
                                    align_corners=False, loss_decode=ce(1.0))
        model["auxiliary_head"] = dict(type="FCNHead", in_channels=embed_dim, in_index=2,
                                       channels=int(u["aux_channels"]), num_convs=1, concat_input=False,
                                       dropout_ratio=float(u["dropout"]), num_classes=num_classes,
                                       norm_cfg=_norm(), align_corners=False,
                                       loss_decode=ce(float(u["aux_weight"])))
    else:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    return model


def build_pipelines(p: dict[str, Any]) -> tuple[list, list]:
    s = int(p["image_size"])
    lo, hi = p["lsj_scale"]
    cj = p["color_jitter"]
    train = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", reduce_zero_label=True),
        # large-scale jitter: the long side to s * U(lo, hi) (MultiMAE: longest side to s, then x U(lo, hi))
        dict(type="RandomResize", scale=(s, s), ratio_range=(float(lo), float(hi)), keep_ratio=True),
        dict(type="RandomCrop", crop_size=(s, s), cat_max_ratio=float(p["cat_max_ratio"])),
        dict(type="RandomFlip", prob=0.5),
        dict(type="FourmColorJitter", prob=float(cj["prob"]), brightness=float(cj["brightness"]),
             contrast=float(cj["contrast"]), saturation=float(cj["saturation"]), hue=float(cj["hue"])),
        # no Pad here: the data preprocessor pads to s x s (image 0 after normalisation, labels 255)
        dict(type="PackSegInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=tuple(int(v) for v in p["test_scale"]), keep_ratio=True),
        dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: scored at the original size
        dict(type="PackSegInputs"),
    ]
    return train, test


# --------------------------------------------------------------------- task
class Ade20kSeg(Task):
    name = "ade20k-seg"
    title = "ADE20K semantic segmentation, 150 classes (ConvNeXt head or UperNet, mmseg)"
    data_kind = "ade20k"
    metrics = (
        Metric("mIoU", main=True, gated=True,
               description="mean IoU over the classes present in predictions or ground truth of the val set"),
        Metric("mAcc", description="mean per-class pixel accuracy over the classes present in the ground truth"),
        Metric("aAcc", description="pixel accuracy over all labelled pixels"),
    )
    requires = ("torch", "timm", "mmengine", "mmcv", "mmcv ops", "mmsegmentation")
    prediction_format = ("one 8-bit PNG per validation image, <image stem>.png, the image's size, values 1..150 "
                         "(class k as k + 1), as the ADE20K benchmark server takes; plus meta.json")
    mm_scope = "mmseg"

    # data
    def make_mini(self, out: Path, seed: int = 0) -> Path:
        from fourm_eval.data.ade_mini import make_mini_ade20k
        return make_mini_ade20k(out, seed=seed)

    def default_data_root(self) -> Path:
        from fourm_eval.data.ade_mini import default_mini_ade20k
        return default_mini_ade20k()

    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.ade_check import annotation_digest
        return {"annotations_sha256": {s: annotation_digest(Path(root), s) for s in ("train", "val")}}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data.ade_check import SPLIT_DIRS, check_split

        root = Path(root)
        seed = int(p.get("subset_seed", 0))
        checks = {}
        for split in ("train", "val"):
            label = f"checking {SPLIT_DIRS[split]}"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            c = checks[split] = check_split(root, split, skip_bad_images, out_dir, progress=cb,
                                            subset=p.get(f"{split}_subset"), subset_seed=seed)
            log(f"{c.img_dir}: {c.n_images} image/annotation pairs, all decode, labels 0..150, sizes match"
                + (f"; {len(c.bad)} problem(s) skipped" if c.bad else ""))
        names = class_names()
        record = {"root": str(root), "annotations_sha256": self.data_identity(root)["annotations_sha256"],
                  "n_train_images": checks["train"].n_images, "n_val_images": checks["val"].n_images,
                  "skipped_bad_images": sum(len(c.bad) for c in checks.values()),
                  "skipped": [f"{f}: {r}" for c in checks.values() for f, r in c.bad][:50],
                  "classes": names,
                  "classes_present": {s: [names[i] for i in c.classes_present] for s, c in checks.items()},
                  "subsets": {s: {"n": c.n_images, "seed": seed, "files": f"data/{s}_files.txt"}
                              for s, c in checks.items() if c.subset is not None}}
        return PreparedData(root, checks["train"].n_images, checks["val"].n_images, record,
                            private={"checks": checks})

    # model and runner
    def backbone_options(self, p: dict[str, Any], backbone: str, info: dict[str, Any]) -> dict[str, Any]:
        head = p.get("head")
        if head == "convnext":
            return {"out_indices": [info["num_layers"] - 1], "final_norm": False}
        if head == "upernet":
            return {"out_indices": quarter_blocks(int(info["num_layers"])), "final_norm": False}
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")

    def register_mm(self) -> None:
        register()

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        p, data, backbone_cfg, embed_dim = ctx.profile, ctx.data, ctx.backbone_cfg, ctx.embed_dim
        predictions_dir = ctx.predictions_dir
        checks = data.private["checks"]
        train_pipe, test_pipe = build_pipelines(p)

        def ds(split: str, pipeline: list, test_mode: bool) -> dict:
            c = checks[split]
            return dict(type="ADE20KDataset", data_root=str(data.root),
                        ann_file=str(c.file_list) if c.file_list else "",
                        data_prefix=dict(img_path=str(c.img_dir.relative_to(data.root)),
                                         seg_map_path=str(c.ann_dir.relative_to(data.root))),
                        reduce_zero_label=True, test_mode=test_mode, pipeline=pipeline)

        backbone_cfg = dict(backbone_cfg)
        if "out_indices" not in backbone_cfg:  # the runner passes backbone_options; direct callers may not
            backbone_cfg.update(self.backbone_options(p, backbone_cfg.get("name", ""),
                                                      {"num_layers": _num_layers(backbone_cfg)}))
        return dict(model=build_model_cfg(p, backbone_cfg, embed_dim), train_dataset=ds("train", train_pipe, False),
                    val_dataset=ds("val", test_pipe, True),
                    val_evaluator=dict(type="FourmSegMetric", num_classes=NUM_CLASSES,
                                       predictions_dir=str(predictions_dir) if predictions_dir else None))

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        from fourm_eval.data.coco_check import DatasetError

        model = getattr(runner.model, "module", runner.model)
        patch = int(model.backbone.net.patch_size)
        cfg = runner.cfg
        s = int(cfg.model.test_cfg.crop_size[0])
        div = int(cfg.model.data_preprocessor.test_cfg.size_divisor)
        if s % patch or div % patch:
            raise ConfigError(f"image_size ({s}) and test_pad_divisor ({div}) must be multiples of the backbone's "
                              f"patch size ({patch})")
        for split, loader in (("train", runner.train_dataloader), ("val", runner.val_dataloader)):
            dset = loader.dataset
            n_want = data.n_train if split == "train" else data.n_val
            if len(dset) != n_want or len(dset.metainfo["classes"]) != NUM_CLASSES or not dset.reduce_zero_label:
                raise DatasetError(f"{split}: the mmseg dataset holds {len(dset)} samples and "
                                   f"{len(dset.metainfo['classes'])} classes (reduce_zero_label "
                                   f"{dset.reduce_zero_label}); the check found {n_want} samples of "
                                   f"{NUM_CLASSES} classes with label 0 ignored")

    # metrics and predictions
    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix(METRIC_PREFIX + "/"): float(v) for k, v in evaluator_out.items()}

    def evaluate(self, predictions: Path, data_root: Path) -> dict[str, float]:
        """Score a folder of label PNGs against ``annotations/validation``. With our ``meta.json``
        (a run's own predictions) the images it names are scored (a run may use a subset or skip
        bad files); without it, every validation annotation needs its prediction."""
        import json

        from fourm_eval.data.ade_check import annotation_files
        from fourm_eval.metrics_seg import PredictionsError, evaluate_folder

        gt = annotation_files(Path(data_root), "val")
        meta = Path(predictions) / "meta.json"
        stems = None
        if meta.is_file():
            try:
                data = json.loads(meta.read_text())
                stems = data.get("stems")  # absent while a run's first evaluation is being written
                if stems is not None and not (isinstance(stems, list) and all(isinstance(x, str) for x in stems)):
                    raise TypeError("'stems' is not a list of names")
            except (json.JSONDecodeError, AttributeError, TypeError) as e:
                raise PredictionsError(f"{meta}: not the meta.json of a fourm-eval run ({e}); remove it to score "
                                       "every validation image") from None
        if stems is not None:
            unknown = sorted(set(stems) - set(gt))
            if unknown:
                raise PredictionsError(f"{meta} names {len(unknown)} image(s) without an annotation in "
                                       f"{Path(data_root) / 'annotations' / 'validation'}: {unknown[:5]}")
            gt = {s: gt[s] for s in stems}
        s = evaluate_folder(Path(predictions), gt, NUM_CLASSES)
        return {k: s[k] for k in ("mIoU", "mAcc", "aAcc")}

    def footnote(self, record: dict[str, Any]) -> str:
        c = record.get("config", {})
        sch = c.get("schedule_resolved", {})
        head = c.get("head", "?")
        if head == "convnext":
            h = c.get("convnext", {})
            head_txt = (f"ConvNeXt head (MultiMAE; dim {h.get('decoder_dim', '?')}, {h.get('preds_per_patch', '?')} "
                        f"predictions per patch, {h.get('depth', '?')} blocks) on the last block")
        else:
            head_txt = "UperNet + auxiliary FCN head on blocks at depth 1/4, 1/2, 3/4, 1 (multi-level neck)"
        tuning = "full fine-tuning"
        if c.get("model_size") == "xl":
            tuning += " (4M-21 fine-tunes XL with LoRA rank 64; LoRA is not implemented yet)"
        return (f"{self.name} / {record.get('profile')}: {head_txt}; {c.get('image_size', '?')} px crops, large-scale "
                f"jitter {c.get('lsj_scale', '?')}, colour jitter; {sch.get('max_iters', '?')} iterations at batch "
                f"{sch.get('eff_batch', '?')}, cosine; {tuning}; layer decay {c.get('layer_decay', '?')}, drop path "
                f"{c.get('drop_path', '?')}; sliding window {c.get('image_size', '?')} / stride "
                f"{c.get('slide_stride', '?')}; mIoU over the classes present in predictions or ground truth of "
                "the val set (mmseg's rule), final model (not best-on-val)")


def _num_layers(backbone_cfg: dict[str, Any]) -> int:
    from fourm_eval.backbones import backbone_info
    return int(backbone_info(backbone_cfg["name"], backbone_cfg.get("checkpoint"))["num_layers"])


def class_names() -> list[str]:
    """ADE20K's 150 class names in label order (mmseg's list; class k is stored as k + 1)."""
    from mmseg.datasets import ADE20KDataset
    return [n.strip() for n in ADE20KDataset.METAINFO["classes"]]


_REGISTERED = False


def register() -> None:
    """mmseg's modules in its registries, the shared mm modules, the ConvNeXt head and the colour
    jitter transform (idempotent)."""
    global _REGISTERED
    import importlib

    from mmseg.utils import register_all_modules

    from .dense_heads import register_mmseg

    importlib.import_module(".mm", __package__)  # the backbone adapter, optimiser constructor and hooks

    register_all_modules(init_default_scope=True)
    register_mmseg()
    if _REGISTERED:
        return
    from mmcv.transforms import BaseTransform
    from mmseg.registry import TRANSFORMS

    class FourmColorJitter(BaseTransform):
        """torchvision's ColorJitter (brightness, contrast, saturation, hue; random order) applied
        with probability ``prob`` -- MultiMAE's colour jitter for ADE20K (albumentations' ColorJitter
        with the same values). Works on the BGR uint8 image of the mmseg pipeline."""

        def __init__(self, prob: float = 0.5, brightness: float = 0.4, contrast: float = 0.4,
                     saturation: float = 0.2, hue: float = 0.1):
            from torchvision.transforms import ColorJitter

            self.prob = prob
            self.jitter = ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

        def transform(self, results: dict) -> dict:
            import torch

            if self.prob <= 0 or torch.rand(()).item() >= self.prob:
                return results
            img = results["img"]
            rgb = torch.from_numpy(np.ascontiguousarray(img[..., ::-1])).permute(2, 0, 1)
            out = self.jitter(rgb).permute(1, 2, 0).numpy()
            results["img"] = np.ascontiguousarray(out[..., ::-1])
            return results

        def __repr__(self) -> str:
            return f"FourmColorJitter(prob={self.prob}, {self.jitter!r})"

    mm_register(TRANSFORMS, "FourmColorJitter")(FourmColorJitter)
    _REGISTERED = True


TASK = Ade20kSeg()
