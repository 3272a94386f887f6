"""The segmentation kit: semantic segmentation over a fixed class list on the dense kit.

A segmentation task declares ``num_classes``, its label encoding (``reduce_zero_label``: ADE20K's
files store class k as k + 1 and 0 = ignored; otherwise class k is stored as k and 255 is
ignored), its data (check, datasets, pipelines) and its footnote. The kit supplies the label-map
predictions (stored as the labels are), mmseg's counting (``fourm_eval.metrics_seg``), the
ConvNeXt and UperNet heads, sliding-window inference and the checks of the built runner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fourm_eval.errors import ConfigError

from ..base import Metric, RunContext
from ..schema import S, size_hw
from .dense import (CONVNEXT_SETTINGS, LINEAR_SETTINGS, MODE_SETTING, DenseTask, batch_norm, frozen, head_section,
                    linear_blocks, quarter_blocks)

SEG_HEADS = ("convnext", "upernet", "linear")
TEST_PROCEDURES = ("slide", "single")


def _square(size: Any, what: str) -> int:
    h, w = size_hw(size)
    if h != w:
        raise ConfigError(f"{what} needs a square image_size, not {h} x {w}")
    return h



class SegmentationTask(DenseTask):
    """Semantic segmentation over ``num_classes`` classes, scored by mIoU / mAcc / aAcc (mmseg's
    counting). Profile keys it reads: ``head`` (convnext | upernet | linear) and its section, ``mode`` (linear:
    the backbone frozen), ``image_size``,
    ``slide_stride``, ``test_pad_divisor``. Label files are 8-bit PNGs; with ``reduce_zero_label``
    (ADE20K) 0 is ignored and class k is stored as k + 1, else class k is stored as k and 255 is
    ignored. Predictions are stored the same way."""

    num_classes: ClassVar[int]
    reduce_zero_label: ClassVar[bool] = True
    metric_prefix = "seg"
    metrics = (  # mmseg's counting (fourm_eval.metrics_seg)
        Metric("mIoU", main=True, gated=True,
               description="mean IoU over the classes present in predictions or ground truth of the scored split"),
        Metric("mAcc", description="mean per-class pixel accuracy over the classes present in the ground truth"),
        Metric("aAcc", description="pixel accuracy over all labelled pixels"),
    )

    @property
    def metric_words(self) -> str:  # type: ignore[override]
        return (f"mIoU over the classes present in predictions or ground truth of the {self.scored_split} set "
                "(mmseg's rule)")

    def footnote_head(self, c: dict[str, Any]) -> str:
        if c.get("head") == "upernet":
            return "UperNet + auxiliary FCN head on blocks at depth 1/4, 1/2, 3/4, 1 (multi-level neck)"
        return super().footnote_head(c)
    pred_field = "pred_sem_seg"
    gt_path_key = "seg_map_path"
    map_bits = 8
    settings = (
        S("head", "str", "decode head", choices=SEG_HEADS),
        MODE_SETTING,
        *CONVNEXT_SETTINGS,
        *LINEAR_SETTINGS,
        S("upernet", "section", "UperNet + auxiliary FCN head (needed with head upernet)", default=None, null=True,
          per_size=False),
        S("upernet.blocks", "list", "the four blocks (0-based) the neck reads (null: the last of each quarter)",
          default=None, null=True, item="int", length=4),
        S("upernet.channels", "int", "UPerHead channels"),
        S("upernet.pool_scales", "list", "PPM pool scales", item="int"),
        S("upernet.dropout", "float", "dropout before the classifiers"),
        S("upernet.aux_channels", "int", "auxiliary FCN head channels"),
        S("upernet.aux_weight", "float", "auxiliary loss weight"),
        S("test_procedure", "str", "slide: resized to test_scale, sliding windows of image_size, scored at the "
          "original size (mmseg); single: long side to image_size, padded to a square, one pass, scored at that size "
          "on nearest-resized labels (MultiMAE)", choices=TEST_PROCEDURES),
        S("slide_stride", "int", "slide: sliding-window stride (windows of image_size)", default=None, unit="px"),
        S("test_pad_divisor", "int", "slide: test images padded to a multiple of this", default=16, unit="px"),
    )

    def scoring(self, p: dict[str, Any]) -> dict[str, Any]:
        if p["test_procedure"] == "single":
            return {"procedure": "long-side", "size": _square(p["image_size"], "test_procedure single")}
        return {"procedure": "original"}

    @property
    def map_max(self) -> int:  # type: ignore[override]
        return self.num_classes if self.reduce_zero_label else 255

    def encode(self, pred: np.ndarray) -> np.ndarray:
        return (pred.astype(np.int64) + int(self.reduce_zero_label)).astype(np.uint8)

    def read_ground_truth(self, path: Path) -> np.ndarray:
        from fourm_eval.data.checks import DatasetError
        from fourm_eval.data.pngmap import read_png_map
        from fourm_eval.metrics_seg import reduce_zero_label

        raw = read_png_map(path, bits=8, what="ground-truth annotation", error=DatasetError, palette_ok=True,
                           max_value=self.map_max)
        return reduce_zero_label(raw) if self.reduce_zero_label else raw.astype(np.int64)

    def score_image(self, stored: np.ndarray, gt: np.ndarray, name: str, scoring: dict[str, Any]) -> Any:
        from fourm_eval.metrics_seg import image_areas
        return image_areas(stored.astype(np.int64) - int(self.reduce_zero_label), gt, self.num_classes)

    def summarize(self, per_image: dict[str, Any], scoring: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        from fourm_eval.metrics_seg import summarize

        total = np.zeros((4, self.num_classes))
        for stem in sorted(per_image):
            total += per_image[stem]
        s = summarize(total)
        return ({k: s[k] for k in ("mIoU", "mAcc", "aAcc")},
                {k: s[k] for k in ("per_class_iou", "classes_in_miou", "classes_in_macc")})

    def backbone_options(self, p: dict[str, Any], backbone: str, info: dict[str, Any]) -> dict[str, Any]:
        opts = self._backbone_blocks(p, info)
        return {**opts, "frozen": True} if frozen(p) else opts  # mode: linear (absent otherwise: records unchanged)

    def _backbone_blocks(self, p: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        head = p.get("head")
        if head == "linear":  # DINOv2: the last block, or four blocks, each through the final norm (recorded)
            return {"out_indices": linear_blocks(p, int(info["num_layers"])),
                    "final_norm": bool(head_section(p, "linear")["final_norm"])}
        if head == "convnext":  # the last block, with or without the encoder's final norm (recorded)
            return {"out_indices": [info["num_layers"] - 1],
                    "final_norm": bool(head_section(p, "convnext")["final_norm"])}
        if head == "upernet":  # intermediate blocks, none normed (mmseg's MAE configs: final_norm False)
            n, blocks = int(info["num_layers"]), head_section(p, "upernet").get("blocks")
            blocks = quarter_blocks(n) if blocks is None else [int(b) for b in blocks]
            if blocks != sorted(set(blocks)) or not all(0 <= b < n for b in blocks):
                raise ConfigError(f"upernet.blocks = {blocks}: four increasing block indices of the backbone's "
                                  f"{n} blocks (0..{n - 1})")
            return {"out_indices": blocks, "final_norm": False}
        raise ConfigError(f"head must be one of {', '.join(SEG_HEADS)}, not {head!r}")

    def model_cfg(self, ctx: RunContext) -> dict:
        """``EncoderDecoder``: the ConvNeXt head on the last block, or UperNet (mmseg's
        ``Feature2Pyramid`` neck x4, x2, x1, x0.5 + ``UPerHead`` + auxiliary ``FCNHead`` on the third
        level) on the quarter blocks; sliding-window inference; cross-entropy over labelled pixels."""
        p, embed_dim, k = ctx.profile, ctx.embed_dim, self.num_classes
        backbone_cfg = dict(ctx.backbone_cfg)
        if "out_indices" not in backbone_cfg:  # the runner passes backbone_options; direct callers may not
            backbone_cfg.update(self.backbone_options(p, backbone_cfg.get("name", ""), {"num_layers": ctx.num_layers}))
        (h, w) = size_hw(p["image_size"])
        if p["test_procedure"] == "slide":
            if not p.get("slide_stride"):
                raise ConfigError("test_procedure slide needs slide_stride")
            stride = int(p["slide_stride"])
            test_cfg = dict(mode="slide", crop_size=(h, w), stride=(stride, stride))
        else:
            test_cfg = dict(mode="whole")
        ce = lambda w: dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=w,  # noqa: E731
                            avg_non_ignore=True)  # mean over labelled pixels (PyTorch's / MultiMAE's)
        model: dict[str, Any] = dict(
            type="EncoderDecoder",
            data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53],
                                   std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_val=0, seg_pad_val=255,
                                   size=(h, w), test_cfg=dict(size_divisor=int(p.get("test_pad_divisor") or 16))),
            backbone=dict(type="FourmEvalViT", **backbone_cfg), train_cfg=dict(), test_cfg=test_cfg)
        if p["head"] == "linear":  # DINOv2's BNHead: BatchNorm + 1x1 conv on the block(s), no auxiliary head
            c = head_section(p, "linear")
            model["decode_head"] = dict(type="FourmLinearSegHead", in_channels=embed_dim, num_classes=k,
                                        num_blocks=len(backbone_cfg["out_indices"]), batch_norm=bool(c["batch_norm"]),
                                        global_token=bool(c.get("global_token", False)), norm_cfg=batch_norm(),
                                        dropout_ratio=0.0, align_corners=False, loss_decode=ce(1.0))
        elif p["head"] == "convnext":
            c = head_section(p, "convnext")
            model["decode_head"] = dict(type="FourmConvNeXtHead", in_channels=embed_dim, in_index=0, num_classes=k,
                                        decoder_dim=int(c["decoder_dim"]), preds_per_patch=int(c["preds_per_patch"]),
                                        depth=int(c["depth"]), align_corners=False, loss_decode=ce(1.0))
        elif p["head"] == "upernet":
            u = head_section(p, "upernet")
            model["neck"] = dict(type="Feature2Pyramid", embed_dim=embed_dim, rescales=[4, 2, 1, 0.5],
                                 norm_cfg=batch_norm())
            model["decode_head"] = dict(type="UPerHead", in_channels=[embed_dim] * 4, in_index=[0, 1, 2, 3],
                                        pool_scales=tuple(u["pool_scales"]), channels=int(u["channels"]),
                                        dropout_ratio=float(u["dropout"]), num_classes=k, norm_cfg=batch_norm(),
                                        align_corners=False, loss_decode=ce(1.0))
            model["auxiliary_head"] = dict(type="FCNHead", in_channels=embed_dim, in_index=2,
                                           channels=int(u["aux_channels"]), num_convs=1, concat_input=False,
                                           dropout_ratio=float(u["dropout"]), num_classes=k, norm_cfg=batch_norm(),
                                           align_corners=False, loss_decode=ce(float(u["aux_weight"])))
        else:
            raise ConfigError(f"head must be one of {', '.join(SEG_HEADS)}, not {p['head']!r}")
        return model

    def verify_runner(self, runner: Any, data: Any) -> None:
        """Crop and padding fit the patch grid; the mmseg datasets hold the checked samples and classes."""
        from fourm_eval.data.checks import DatasetError

        model = getattr(runner.model, "module", runner.model)
        patch = int(model.backbone.net.patch_size)
        h, w = size_hw(list(runner.cfg.model.data_preprocessor.size))
        div = int(runner.cfg.model.data_preprocessor.test_cfg.size_divisor)
        if h % patch or w % patch or div % patch:
            raise ConfigError(f"image_size ({h} x {w}) and test_pad_divisor ({div}) must be multiples of the "
                              f"backbone's patch size ({patch})")
        for split, loader in (("train", runner.train_dataloader), ("val", runner.val_dataloader)):
            dset = loader.dataset
            n_want = data.n_train if split == "train" else data.n_val
            n_cls = len(dset.metainfo["classes"])
            if len(dset) != n_want or n_cls != self.num_classes or dset.reduce_zero_label != self.reduce_zero_label:
                raise DatasetError(f"{split}: the mmseg dataset holds {len(dset)} samples and {n_cls} classes "
                                   f"(reduce_zero_label {dset.reduce_zero_label}); the check found {n_want} samples "
                                   f"of {self.num_classes} classes (reduce_zero_label {self.reduce_zero_label})")



__all__ = ["SEG_HEADS", "SegmentationTask", "TEST_PROCEDURES"]
