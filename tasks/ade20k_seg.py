"""ADE20K semantic segmentation (150 classes) on mmsegmentation 1.2.

Protocols (profiles ``multimae`` = ``paper``, ``mae-upernet``; the profile's ``protocol``):

* ``convnext`` head (multimae): MultiMAE's ConvNeXt adapter (``tasks.dense_heads.ConvNeXtTokenHead``)
  on the tokens of the last block (with or without the encoder's final norm, ``convnext.final_norm``):
  linear to ``decoder_dim``, 16 sub-patches per token (stride 4), 4 ConvNeXt blocks, 1x1 to the
  classes, bilinear upsampling.
* ``upernet`` head (mae-upernet): the blocks ``upernet.blocks`` (none normed) through mmseg's
  ``Feature2Pyramid`` neck (x4, x2, x1, x0.5), mmseg's ``UPerHead`` on the four levels and mmseg's
  ``FCNHead`` on the third as the auxiliary head (loss weight 0.4); BN (SyncBN with several processes).

* ``linear`` head (protocol linear, with ``mode: linear``): DINOv2's linear probe on the frozen backbone
  (``tasks/kits/linear_head.py``): the last block's tokens (or four blocks' concatenated), BatchNorm, 1x1
  convolution to the classes, logits upsampled by mmseg.

Data: the ``ADEChallengeData2016`` layout, checked by ``fourm_eval.data.ade_check``; labels are
reduced as ADE20K requires (0 "other" ignored, value v -> class v - 1).

Training: crops of ``image_size`` with scale jitter (the image fitted into ``train_scale``, by default
the crop, x U(lsj_scale)), random crop (padded to the crop with 0 after normalisation, labels with
255), horizontal flip, the profile's colour augmentation; cross-entropy over the labelled pixels.
Test (``test_procedure``): ``single`` (MultiMAE): long side to ``image_size``, padded grey to a
square, one pass, stored and scored at the resized size on nearest-resized labels; ``slide`` (mmseg):
resized to ``test_scale``, padded to a multiple of the patch size, sliding windows of ``image_size``
with ``slide_stride``, logits upsampled to the original size and scored there.

Metric: mIoU / mAcc / aAcc as fractions (``fourm_eval.metrics_seg``, mmseg's counting): a class
absent from both predictions and ground truth of the whole validation set is excluded from mIoU,
as mmseg does. Predictions: one PNG per validation image (values 1..150, ADE20K's format),
named like the image, at the size scored, plus ``meta.json`` (naming the scoring).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fourm_eval.errors import ConfigError

from .base import Log, PreparedData, Progress, RunContext
from .kits.dense import COLOR_SETTINGS, TEST_META_KEYS, color_transforms, color_words, px, single_pass_geometry
from .kits.segmentation import SegmentationTask
from .schema import S, SUBSET_SETTINGS, size_hw


class Ade20kSeg(SegmentationTask):
    name = "ade20k-seg"
    title = "ADE20K semantic segmentation, 150 classes (ConvNeXt head, UperNet or DINOv2 linear probe, mmseg)"
    data_kind = "ade20k"
    mini_data = "fourm_eval.data.ade_mini"
    reference_train_images = 20210     # ADE20K (SceneParsing): 20,210 training images
    prediction_format = ("one 8-bit PNG per validation image, <image stem>.png, values 1..150 (class k as k + 1), "
                         "as the ADE20K benchmark server takes, at the image's size (or at the size the protocol "
                         "scores, named in meta.json)")
    num_classes = 150
    reduce_zero_label = True  # 0 "other" ignored, value v -> class v - 1
    scored_split = "val"
    xl_tuning_published = "LoRA rank 64"
    settings = SegmentationTask.settings + SUBSET_SETTINGS + (
        S("lsj_scale", "list", "large-scale jitter: the image resized to train_scale x U(lo, hi)", item="float",
          length=2),
        S("train_scale", "list", "the scale jitter's base scale as mmseg's RandomResize takes it (long side cap, "
          "short side), aspect kept (null: fitted into the crop: its long side to image_size)", default=None,
          null=True, item="int", length=2, unit="px"),
        *COLOR_SETTINGS,
        S("cat_max_ratio", "float", "mmseg RandomCrop: retry crops where one class covers more than this"),
        S("test_scale", "list", "slide: test resize (long side cap, short side), aspect kept", default=None,
          null=True, item="int", length=2, unit="px"),
        S("test_pad_value", "float", "single: the grey level (0-255) the test input is padded with", default=128.0),
    )

    # data
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

    def ground_truth_files(self, root: Path) -> dict[str, Path]:
        from fourm_eval.data.ade_check import annotation_files
        return annotation_files(Path(root), "val")

    # model and runner
    def pipelines(self, p: dict[str, Any]) -> tuple[list, list]:
        h, w = size_hw(p["image_size"])
        lo, hi = p["lsj_scale"]
        scale = tuple(int(v) for v in p["train_scale"]) if p.get("train_scale") else (w, h)
        train = [
            dict(type="LoadImageFromFile"),
            dict(type="LoadAnnotations", reduce_zero_label=True),
            # scale jitter: the image fitted into `scale` (mmseg's (long cap, short) rule; the crop's (w, h) box by
            # default: a square crop of s gets the long side s * U(lo, hi), MultiMAE's) x U(lo, hi), then a
            # random crop of (h, w)
            dict(type="RandomResize", scale=scale, ratio_range=(float(lo), float(hi)), keep_ratio=True),
            dict(type="RandomCrop", crop_size=(h, w), cat_max_ratio=float(p["cat_max_ratio"])),
            dict(type="RandomFlip", prob=0.5),
            *color_transforms(p),
            # no Pad here: the data preprocessor pads to h x w (image 0 after normalisation, labels 255)
            dict(type="PackSegInputs"),
        ]
        if p["test_procedure"] == "single":  # MultiMAE: long side to image_size, padded grey, one pass
            test = [dict(type="LoadImageFromFile"),
                    *single_pass_geometry("long-side", h, float(p.get("test_pad_value", 128.0))),
                    dict(type="PackSegInputs", meta_keys=TEST_META_KEYS)]
        else:
            if not p.get("test_scale"):
                raise ConfigError("test_procedure slide needs test_scale")
            test = [
                dict(type="LoadImageFromFile"),
                dict(type="Resize", scale=tuple(int(v) for v in p["test_scale"]), keep_ratio=True),
                dict(type="LoadAnnotations", reduce_zero_label=True),  # after Resize: scored at the original size
                dict(type="PackSegInputs"),
            ]
        return train, test

    def dataset_cfg(self, ctx: RunContext, split: str, pipeline: list, test_mode: bool) -> dict:
        c, root = ctx.data.private["checks"][split], ctx.data.root
        return dict(type="ADE20KDataset", data_root=str(root), ann_file=str(c.file_list) if c.file_list else "",
                    data_prefix=dict(img_path=str(c.img_dir.relative_to(root)),
                                     seg_map_path=str(c.ann_dir.relative_to(root))),
                    reduce_zero_label=True, test_mode=test_mode, pipeline=pipeline)

    # the protocol, in words
    def footnote_training(self, c: dict[str, Any]) -> str:
        aug = ", ".join([f"scale jitter {c.get('lsj_scale', '?')}"
                         + (f" of {c['train_scale']}" if c.get("train_scale") else "")] + color_words(c))
        return f"{px(c.get('image_size'))} px crops, {aug}"

    def footnote_test(self, c: dict[str, Any]) -> str:
        if c.get("test_procedure") == "single":
            return (f"one pass at long side {px(c.get('image_size'))} (padded), scored at that size on "
                    "nearest-resized labels")
        return (f"resized to {c.get('test_scale', '?')}, sliding window {px(c.get('image_size'))} / stride "
                f"{c.get('slide_stride', '?')}, scored at the original size")


def class_names() -> list[str]:
    """ADE20K's 150 class names in label order (mmseg's list; class k is stored as k + 1)."""
    from mmseg.datasets import ADE20KDataset
    return [n.strip() for n in ADE20KDataset.METAINFO["classes"]]


TASK = Ade20kSeg()
