"""The depth kit's model parts: the losses (``silog``, ``berhu``) and ``FourmDepthHead`` (a head with
one output channel and a softplus), described in ``depth.py``. They need torch and mmengine, so
this module is imported when a depth task registers its mm modules (``DepthTask.register_mm``),
not by the task scan.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS

from fourm_eval.errors import ConfigError

from ..mmreg import register as mm_register
from .depth import HEADS, LOSSES, PATCH


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
        if head not in HEADS or head == "linear":  # linear: FourmLinearDepthHead (tasks/kits/linear_head.py)
            raise ConfigError(f"FourmDepthHead is the convnext or dpt head, not {head!r}")
        if loss not in LOSSES or loss == "sigloss":  # sigloss: DINOv2's, only with its linear head
            raise ConfigError(f"loss must be silog or berhu with head {head}, not {loss!r}")
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


__all__ = ["FourmDepthHead", "berhu", "silog", "valid_mask"]
