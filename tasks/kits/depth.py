"""The depth kit: monocular depth in metres on the dense kit (mmseg's ``DepthEstimator``).

A depth task declares its data (check, datasets, pipelines, ground-truth files) and footnote.
The kit supplies the model (backbone -> ``convnext`` or ``dpt`` head -> one channel -> softplus:
depth in metres, always positive; profile keys ``head`` and its section, ``loss``,
``berhu_threshold``), the losses, predictions stored as 16-bit PNGs of millimetres (0 = none) at
the image's full size, and the metric of ``fourm_eval.metrics_depth`` on the stored millimetres.

Heads: ``convnext``: MultiMAE's ConvNeXt adapter on the last block's tokens
(``tasks/dense_heads.py``), 1 output channel at stride 4; ``dpt`` (MultiMAE's NYUv2 head): DPT's
reassemble and fusion blocks on the last block of each quarter of the encoder, mmseg's
``DPTHead`` with 1 output channel, without batch norm (DPT's depth heads use none).

Losses: ``silog``: the scale-invariant log loss sqrt(mean d^2 - 0.5 (mean d)^2), d = log g -
log p, per image, averaged over the batch (mmseg's ``silog_loss``); ``berhu`` (MultiMAE's): the
reversed Huber loss with threshold c = ``berhu_threshold`` x the batch's largest absolute error,
|d| below c, (d^2 + c^2) / 2c above, averaged over the batch's valid pixels. Both use only
pixels whose ground truth lies in (1e-3, 10] m, the metric's range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from fourm_eval.errors import ConfigError

from ..base import RunContext
from ..schema import S
from ..mmreg import register as mm_register
from .dense import CONVNEXT_SETTINGS, DenseTask, quarter_blocks

HEADS = ("convnext", "dpt")
LOSSES = ("silog", "berhu")
PATCH = 16  # every backbone here has 16-pixel patches; test inputs are padded to a multiple of it


# ------------------------------------------------------------------ losses
def valid_mask(gt: torch.Tensor) -> torch.Tensor:
    from fourm_eval.metrics_depth import MAX_DEPTH, MIN_DEPTH
    return (gt > MIN_DEPTH) & (gt <= MAX_DEPTH)


def silog(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Scale-invariant log loss (lambda 0.5) per image over its valid pixels, mean over the images
    that have any (mmseg's ``silog_loss``); 0 (with a graph) for a batch without valid pixels."""
    from mmseg.models.losses.silog_loss import silog_loss

    from fourm_eval.metrics_depth import MIN_DEPTH

    mask = valid_mask(gt)
    keep = mask.flatten(1).any(1)
    if not keep.any():
        return pred.sum() * 0.0
    target = torch.where(mask, gt, torch.zeros_like(gt))  # silog_loss scores target > eps only
    return silog_loss(pred[keep], target[keep], eps=MIN_DEPTH, reduction="mean")


def berhu(pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Reversed Huber loss over the batch's valid pixels, c = threshold x max |pred - gt| (no gradient
    through c)."""
    mask = valid_mask(gt)
    if not mask.any():
        return pred.sum() * 0.0
    d = (pred - gt)[mask].abs()
    c = (threshold * d.max()).detach()
    if float(c) <= 0:  # every error is 0
        return d.mean()
    return torch.where(d <= c, d, (d * d + c * c) / (2 * c)).mean()


# -------------------------------------------------------------------- head
@mm_register(MODELS)
class FourmDepthHead(BaseModule):
    """A dense head with one output channel and a softplus: depth in metres.

    The interface mmseg's ``DepthEstimator`` calls (``loss``, ``predict``, ``align_corners``,
    ``num_classes``, ``out_channels``); the head itself is ``ConvNeXtTokenHead``
    (``tasks/dense_heads.py``) or mmseg's ``DPTHead``."""

    def __init__(self, head: str, in_channels: int, loss: str = "silog", berhu_threshold: float = 0.2,
                 convnext: dict | None = None, dpt: dict | None = None, init_cfg: Any = None):
        super().__init__(init_cfg=init_cfg)
        if head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        self.kind, self.loss_kind, self.berhu_threshold = head, loss, float(berhu_threshold)
        self.align_corners, self.num_classes, self.out_channels = False, 1, 1
        if head == "convnext":
            from ..dense_heads import ConvNeXtTokenHead
            c = dict(convnext or {})
            self.head = ConvNeXtTokenHead(in_channels, 1, decoder_dim=int(c["decoder_dim"]),
                                          preds_per_patch=int(c["preds_per_patch"]), depth=int(c["depth"]))
        else:
            from mmengine.registry import DefaultScope
            from mmseg.models.decode_heads.dpt_head import DPTHead
            c = dict(dpt or {})
            # DPTHead builds its loss from mmseg's registry; a process whose default scope is another
            # library's (e.g. after a coco-det run in the same process) must not redirect that lookup
            with DefaultScope.overwrite_default_scope("mmseg"):
                self.head = DPTHead(in_channels=[in_channels] * 4, in_index=[0, 1, 2, 3],
                                    input_transform="multiple_select", channels=int(c["channels"]),
                                    embed_dims=in_channels, post_process_channels=[int(v) for v in
                                                                                  c["post_process_channels"]],
                                    readout_type="ignore", patch_size=PATCH, num_classes=1, out_channels=1,
                                    threshold=0.5, norm_cfg=None, dropout_ratio=0.0, align_corners=False,
                                    loss_decode=dict(type="SiLogLoss"))  # unused: the loss is computed here

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> (B, 1, h, w) depth in metres at the head's resolution."""
        if self.kind == "convnext":
            raw = self.head(inputs[-1])
        else:  # DPTHead takes (feature map, class token) pairs; the token is unused ("ignore" readout)
            raw = self.head([[x, None] for x in inputs])
        return F.softplus(raw)

    def loss(self, inputs: Sequence[torch.Tensor], batch_data_samples: list, train_cfg: Any = None) -> dict:
        gt = torch.stack([ds.gt_depth_map.data for ds in batch_data_samples]).float()
        pred = F.interpolate(self.forward(inputs), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        if self.loss_kind == "silog":
            return {"loss_depth": silog(pred, gt)}
        return {"loss_depth": berhu(pred, gt, self.berhu_threshold)}

    def predict(self, inputs: Sequence[torch.Tensor], batch_img_metas: list[dict], test_cfg: Any = None) -> torch.Tensor:
        """Depth resized to the (padded) network input; ``DepthEstimator`` removes the padding and
        resizes to the image's full size."""
        meta = batch_img_metas[0]
        size = meta.get("pad_shape", meta["img_shape"])[:2]
        return F.interpolate(self.forward(inputs), size=tuple(int(s) for s in size), mode="bilinear",
                             align_corners=False)


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], embed_dim: int,
                    num_layers: int | None = None) -> dict:
    head = p["head"]
    if head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if head == "convnext":
        out_indices = [-1]  # the last block, without the encoder's final norm (MultiMAE's adapters)
    else:
        if not num_layers:
            raise ConfigError("the dpt head needs the backbone's number of blocks")
        out_indices = quarter_blocks(num_layers)  # DPT: the last block of each quarter
    return dict(
        type="DepthEstimator",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=0, size_divisor=PATCH,
                               test_cfg=dict(size_divisor=PATCH)),  # 0 after normalisation, as everywhere here
        backbone=dict(type="FourmEvalViT", out_indices=out_indices, final_norm=False, **backbone_cfg),
        decode_head=dict(type="FourmDepthHead", head=head, in_channels=embed_dim, loss=p["loss"],
                         berhu_threshold=float(p["berhu_threshold"]), convnext=dict(p["convnext"]),
                         dpt=dict(p["dpt"])),
        test_cfg=dict(mode="whole"),
    )



class DepthTask(DenseTask):
    """Monocular depth in metres, scored by the Eigen-convention metrics."""

    metric_prefix = "depth"
    pred_field = "pred_depth_map"
    gt_path_key = "depth_map_path"
    map_bits = 16
    settings = (
        S("image_size", "int", "training crop and test short side (square crops)", unit="px"),
        S("head", "str", "depth head", choices=HEADS),
        *CONVNEXT_SETTINGS,
        S("dpt", "section", "the DPT head (mmseg's DPTHead, no batch norm)", per_size=False),
        S("dpt.channels", "int", "fusion channels"),
        S("dpt.post_process_channels", "list", "reassemble channels of the four levels", item="int", length=4),
        S("loss", "str", "training loss", choices=LOSSES),
        S("berhu_threshold", "float", "berHu: c = this x the batch's largest absolute error", default=0.2),
    )

    def model_cfg(self, ctx: RunContext) -> dict:
        n_layers = ctx.num_layers if ctx.profile["head"] == "dpt" else None  # DPT's blocks depend on the depth
        return build_model_cfg(ctx.profile, dict(ctx.backbone_cfg), ctx.embed_dim, n_layers)

    # predictions and metric: 16-bit PNGs of millimetres, scored as stored
    def encode(self, pred: np.ndarray) -> np.ndarray:
        from fourm_eval.data.nyu import metres_to_mm
        return metres_to_mm(pred)

    def read_ground_truth(self, path: Path) -> np.ndarray:
        from fourm_eval.data.nyu import read_depth_m
        return read_depth_m(path)

    def score_image(self, stored: np.ndarray, gt: np.ndarray, name: str) -> dict[str, float]:
        from fourm_eval.data.nyu import MM_PER_M
        from fourm_eval.metrics_depth import image_metrics
        return image_metrics(stored.astype(np.float64) / MM_PER_M, gt, name=name)

    def summarize(self, per_image: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        from fourm_eval.metrics_depth import aggregate
        return aggregate(per_image), {}



__all__ = ["DepthTask", "FourmDepthHead", "HEADS", "LOSSES", "berhu", "build_model_cfg", "silog", "valid_mask"]
