"""DINOv2's linear heads for dense tasks (frozen-backbone linear probes), written here from DINOv2's code
(facebookresearch/dinov2; read for its facts, not copied):

* features (:func:`linear_features`): the (B, D, h, w) token maps of one block or of several, each optionally
  followed by a global token broadcast over the grid (DINOv2's depth head concatenates the block's CLS token,
  ``dinov2/eval/depth/models/decode_heads/linear_head.py`` ``BNHead._forward_feature``; 4M has no CLS token, so
  the mean of the block's patch tokens stands in for it), every map bilinearly resized
  (``align_corners=False``) to the first map's grid times ``upsample`` and concatenated along the channels
  (``input_transform='resize_concat'``);
* segmentation (:class:`FourmLinearSegHead`, ``dinov2/eval/segmentation/models/decode_heads/linear_head.py``
  ``BNHead``): a BatchNorm (SyncBN with several processes) on those features, then mmseg's ``cls_seg``
  (dropout 0, a 1x1 convolution to the classes); mmseg upsamples the logits to the label size;
* depth (:class:`FourmLinearDepthHead`, DINOv2's depth ``BNHead`` on ``DepthBaseDecodeHead``,
  ``dinov2/eval/depth/models/decode_heads/decode_head.py``): a 1x1 convolution to ``n_bins`` logits (no
  BatchNorm: DINOv2's depth ``BNHead`` has its ``self.bn`` commented out), turned into a distribution over
  uniform bins between ``min_depth`` and ``max_depth`` (:func:`bins_to_depth`) whose mean is the depth; the
  loss is DINOv2's ``SigLoss`` (:func:`dinov2_sigloss`, with its warm-up) plus, with a weight, the
  ``GradientLoss`` (:func:`gradient_loss`), on the prediction resized to the ground truth.

Imported when a dense task registers its mm modules (``DenseTask.register_mm``), not by the task scan.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmengine.registry import MODELS
from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from mmseg.registry import MODELS as MMSEG_MODELS

from fourm_eval.errors import ConfigError

from ..mmreg import register as mm_register

BIN_NORMS = ("linear", "softmax", "sigmoid")
SIGLOSS_EPS = 1e-3  # DINOv2 SigLoss / GradientLoss: self.eps = 0.001 inside the logs


# ---------------------------------------------------------------- features
def linear_features(maps: Sequence[torch.Tensor], global_token: bool = False, upsample: int = 1) -> torch.Tensor:
    """Block token maps (each (B, D, h, w)) -> (B, C, h * upsample, w * upsample): per block its tokens, then
    (``global_token``) the mean of its tokens broadcast over the grid; every map bilinearly resized to the first
    map's grid x ``upsample``; concatenated along the channels in block order."""
    parts = []
    for x in maps:
        if global_token:
            x = torch.cat([x, x.mean(dim=(2, 3), keepdim=True).expand_as(x)], dim=1)
        parts.append(x)
    size = [int(s) * int(upsample) for s in parts[0].shape[-2:]]
    parts = [p if list(p.shape[-2:]) == size else F.interpolate(p, size=size, mode="bilinear", align_corners=False)
             for p in parts]
    return torch.cat(parts, dim=1)


def feature_channels(embed_dim: int, num_blocks: int, global_token: bool) -> int:
    return int(embed_dim) * int(num_blocks) * (2 if global_token else 1)


def _norm(batch_norm: bool, channels: int, norm_cfg: dict | None) -> nn.Module:
    if not batch_norm:
        return nn.Identity()
    from mmcv.cnn import build_norm_layer
    return build_norm_layer(norm_cfg or dict(type="BN", requires_grad=True), channels)[1]


# ------------------------------------------------------------ segmentation
@mm_register(MMSEG_MODELS)
class FourmLinearSegHead(BaseDecodeHead):
    """DINOv2's linear segmentation head: :func:`linear_features` of the backbone's maps (all of them, in
    order) -> BatchNorm -> dropout (0) -> 1x1 convolution to the classes (mmseg's ``conv_seg``, initialised
    normal std 0.01 as every mmseg decode head). ``in_channels``: the backbone's width per block."""

    def __init__(self, in_channels: int, num_classes: int, num_blocks: int = 1, batch_norm: bool = True,
                 global_token: bool = False, norm_cfg: dict | None = None, **kwargs: Any):
        c = feature_channels(in_channels, num_blocks, global_token)
        kwargs.setdefault("dropout_ratio", 0.0)  # DINOv2 linear configs: dropout_ratio 0
        super().__init__(in_channels=c, channels=c, num_classes=num_classes, norm_cfg=norm_cfg, **kwargs)
        self.num_blocks, self.global_token = int(num_blocks), bool(global_token)
        self.bn = _norm(batch_norm, c, norm_cfg)

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(inputs) != self.num_blocks:
            raise ValueError(f"FourmLinearSegHead reads {self.num_blocks} block map(s), got {len(inputs)}")
        return self.cls_seg(self.bn(linear_features(inputs, self.global_token)))


# ------------------------------------------------------------------- depth
def bins_to_depth(logits: torch.Tensor, min_depth: float, max_depth: float, norm_strategy: str = "linear"
                  ) -> torch.Tensor:
    """(B, n_bins, H, W) logits -> (B, 1, H, W) depth: the bins uniform in [min_depth, max_depth] (DINOv2's
    ``bins_strategy='UD'``: torch.linspace), the logits normalised per pixel into weights (``linear``: relu + 0.1,
    divided by their sum (AdaBins'); ``softmax``; ``sigmoid``, divided by the sum), the depth their weighted sum."""
    bins = torch.linspace(float(min_depth), float(max_depth), logits.shape[1], device=logits.device,
                          dtype=logits.dtype)
    if norm_strategy == "linear":
        w = torch.relu(logits) + 0.1
        w = w / w.sum(dim=1, keepdim=True)
    elif norm_strategy == "softmax":
        w = torch.softmax(logits, dim=1)
    elif norm_strategy == "sigmoid":
        w = torch.sigmoid(logits)
        w = w / w.sum(dim=1, keepdim=True)
    else:
        raise ConfigError(f"linear.norm_strategy must be one of {', '.join(BIN_NORMS)}, not {norm_strategy!r}")
    return (w * bins.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)


def dinov2_sigloss(pred: torch.Tensor, gt: torch.Tensor, warm_up: bool = False) -> torch.Tensor:
    """DINOv2's SigLoss (AdaBins'): g = log(p + 1e-3) - log(t + 1e-3) over the batch's pixels with t > 0 (pooled,
    not per image); sqrt(var(g) + 0.15 mean(g)^2) (var unbiased, as torch.var); during the warm-up
    sqrt(0.15 mean(g)^2). 0 (with a graph) without valid pixels."""
    mask = gt > 0
    if not mask.any():
        return pred.sum() * 0.0
    g = torch.log(pred[mask] + SIGLOSS_EPS) - torch.log(gt[mask] + SIGLOSS_EPS)
    if warm_up:
        return torch.sqrt(0.15 * g.mean() ** 2)
    var = torch.var(g) if g.numel() > 1 else g.new_zeros(())
    return torch.sqrt(var + 0.15 * g.mean() ** 2)


def gradient_loss(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """The MegaDepth gradient loss of DINOv2's ``GradientLoss``, per image: at strides 1, 2, 4, 6 of the map,
    d = (log(p + 1e-3) - log(t + 1e-3)) on pixels with t > 0, the sum of |d[i] - d[i + 2]| over vertical and
    horizontal pairs whose pixels are both valid, divided by the valid pixels; summed over the strides, averaged
    over the batch's images. (DINOv2's code indexes a (B, 1, H, W) tensor as if it were (H, W): its differences
    run over the batch and channel axes instead, which with its 2 images per GPU leaves no pair and adds 0.)"""
    out = []
    for p, t in zip(pred.reshape(-1, *pred.shape[-2:]), gt.reshape(-1, *gt.shape[-2:])):
        total = p.sum() * 0.0
        for s in (1, 2, 4, 6):
            ps, ts = p[::s, ::s], t[::s, ::s]
            mask = (ts > 0).to(ps.dtype)
            n = mask.sum()
            if n == 0:
                continue
            d = (torch.log(ps + SIGLOSS_EPS) - torch.log(ts + SIGLOSS_EPS)) * mask
            v = (d[:-2, :] - d[2:, :]).abs() * mask[:-2, :] * mask[2:, :]
            h = (d[:, :-2] - d[:, 2:]).abs() * mask[:, :-2] * mask[:, 2:]
            total = total + (v.sum() + h.sum()) / n
        out.append(total)
    return torch.stack(out).mean()


@mm_register(MODELS)
class FourmLinearDepthHead(BaseModule):
    """DINOv2's linear depth head (see the module docstring), with the interface mmseg's ``DepthEstimator``
    calls (``loss``, ``predict``, ``align_corners``, ``num_classes``, ``out_channels``), as ``FourmDepthHead``.

    ``loss``: ``sigloss`` (DINOv2's, warm-up over the first ``sigloss_warmup_iters`` loss calls, counted in a
    buffer so a resumed run continues the count) plus ``grad_loss_weight`` x :func:`gradient_loss`; or the depth
    kit's ``silog`` / ``berhu``."""

    def __init__(self, in_channels: int, num_blocks: int = 1, batch_norm: bool = False, global_token: bool = True,
                 upsample: int = 4, n_bins: int = 256, min_depth: float = 1e-3, max_depth: float = 10.0,
                 norm_strategy: str = "linear", loss: str = "sigloss", berhu_threshold: float = 0.2,
                 grad_loss_weight: float = 0.0, sigloss_warmup_iters: int = 100, norm_cfg: dict | None = None,
                 init_cfg: Any = None):
        super().__init__(init_cfg=init_cfg)
        if norm_strategy not in BIN_NORMS:
            raise ConfigError(f"linear.norm_strategy must be one of {', '.join(BIN_NORMS)}, not {norm_strategy!r}")
        if not 0 < float(min_depth) < float(max_depth):
            raise ConfigError(f"linear.min_depth ({min_depth}) and linear.max_depth ({max_depth}): 0 < min < max")
        if int(n_bins) < 2 or int(upsample) < 1:
            raise ConfigError(f"linear.n_bins ({n_bins}) must be at least 2 and linear.upsample ({upsample}) at least 1")
        if loss not in ("sigloss", "silog", "berhu"):
            raise ConfigError(f"loss must be sigloss, silog or berhu with head linear, not {loss!r}")
        c = feature_channels(in_channels, num_blocks, global_token)
        self.num_blocks, self.global_token, self.upsample = int(num_blocks), bool(global_token), int(upsample)
        self.n_bins, self.min_depth, self.max_depth = int(n_bins), float(min_depth), float(max_depth)
        self.norm_strategy, self.loss_kind = norm_strategy, loss
        self.berhu_threshold, self.grad_loss_weight = float(berhu_threshold), float(grad_loss_weight)
        self.sigloss_warmup_iters = int(sigloss_warmup_iters)
        self.align_corners, self.num_classes, self.out_channels = False, 1, 1
        self.bn = _norm(batch_norm, c, norm_cfg)
        self.conv_depth = nn.Conv2d(c, self.n_bins, kernel_size=1)  # PyTorch's default init, as DINOv2's
        self.register_buffer("sigloss_calls", torch.zeros((), dtype=torch.long))

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> (B, 1, h * upsample, w * upsample) depth in metres."""
        if len(inputs) != self.num_blocks:
            raise ValueError(f"FourmLinearDepthHead reads {self.num_blocks} block map(s), got {len(inputs)}")
        x = self.bn(linear_features(inputs, self.global_token, self.upsample))
        return bins_to_depth(self.conv_depth(x), self.min_depth, self.max_depth, self.norm_strategy)

    def loss(self, inputs: Sequence[torch.Tensor], batch_data_samples: list, train_cfg: Any = None) -> dict:
        gt = torch.stack([ds.gt_depth_map.data for ds in batch_data_samples]).float()
        pred = F.interpolate(self.forward(inputs), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        if self.loss_kind != "sigloss":
            from .depth_head import berhu, silog
            return {"loss_depth": silog(pred, gt) if self.loss_kind == "silog"
                    else berhu(pred, gt, self.berhu_threshold)}
        warm = int(self.sigloss_calls) < self.sigloss_warmup_iters
        self.sigloss_calls += 1
        out = {"loss_depth": dinov2_sigloss(pred, gt, warm_up=warm)}
        if self.grad_loss_weight > 0:
            out["loss_grad"] = self.grad_loss_weight * gradient_loss(pred, gt)
        return out

    def predict(self, inputs: Sequence[torch.Tensor], batch_img_metas: list[dict], test_cfg: Any = None
                ) -> torch.Tensor:
        """Depth resized to the (padded) network input; ``DepthEstimator`` removes the padding and resizes to the
        image's full size."""
        meta = batch_img_metas[0]
        size = meta.get("pad_shape", meta["img_shape"])[:2]
        return F.interpolate(self.forward(inputs), size=tuple(int(s) for s in size), mode="bilinear",
                             align_corners=False)


__all__ = ["BIN_NORMS", "FourmLinearDepthHead", "FourmLinearSegHead", "bins_to_depth", "dinov2_sigloss",
           "feature_channels", "gradient_loss", "linear_features"]
