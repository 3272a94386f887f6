"""Dense prediction heads on ViT tokens, shared by every dense task (segmentation, depth, ...).

:class:`ConvNeXtTokenHead` is the ConvNeXt output adapter of MultiMAE (Bachmann et al., 2022,
``multimae/output_adapters.py``, ``ConvNeXtAdapter``), which 4M and 4M-21 use for ADE20K and NYUv2.
Written here from its description; the facts it follows:

1. every token of the last block (no final encoder norm: MultiMAE's ``MultiViT`` hands the
   blocks' output straight to its adapters) goes through one linear layer to ``decoder_dim``
   features (6144 in MultiMAE's ADE20K config, for ViT-B);
2. those features are cut into ``preds_per_patch`` (16) groups of ``decoder_dim / preds_per_patch``
   channels, and the groups are laid out as a ``k x k`` grid of sub-patches (k = sqrt(16) = 4)
   inside the token's patch, row by row: group ``p = r * k + c`` (features ``p*C .. p*C + C - 1``)
   becomes the sub-patch in row ``r``, column ``c``. A grid of ``h x w`` tokens becomes a
   ``C x (h*k) x (w*k)`` map (stride 4 for 16-pixel patches);
3. ``depth`` (4) ConvNeXt blocks at that resolution (depth-wise 7x7 conv, LayerNorm, MLP x4 with
   GELU, residual; no layer scale, no drop path), here timm's ``ConvNeXtBlock``;
4. a 1x1 convolution to the output channels (classes for segmentation, 1 for depth);
5. bilinear upsampling to the input resolution (``align_corners=False``) -- done here only when
   ``out_size`` is given, because mmseg's decode heads upsample their logits themselves.

Initialisation as MultiMAE: linear layers truncated-normal (std 0.02) with zero bias,
LayerNorms one/zero, convolutions PyTorch's default.

Nothing here knows a task: the output channels are a parameter. ``register_mmseg()`` adds an
mmseg decode head around it (``FourmConvNeXtHead``) for tasks that run on mmsegmentation.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm_eval.errors import ConfigError

from .mmreg import once, register as mm_register


class ConvNeXtTokenHead(nn.Module):
    """Tokens as a (B, D, h, w) map -> (B, out_channels, h*k, w*k) with k = sqrt(preds_per_patch).

    ``forward(x, out_size=(H, W))`` also upsamples bilinearly to (H, W)."""

    def __init__(self, in_channels: int, out_channels: int, decoder_dim: int = 6144, preds_per_patch: int = 16,
                 depth: int = 4, drop_path: float = 0.0, interpolate_mode: str = "bilinear"):
        super().__init__()
        k = math.isqrt(int(preds_per_patch))
        if preds_per_patch < 1 or k * k != preds_per_patch:
            raise ConfigError(f"preds_per_patch must be a square number (1, 4, 16, 64, ...), not {preds_per_patch}")
        if decoder_dim % preds_per_patch:
            raise ConfigError(f"decoder_dim ({decoder_dim}) must be a multiple of preds_per_patch ({preds_per_patch})")
        from timm.models.convnext import ConvNeXtBlock

        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.decoder_dim, self.preds_per_patch, self.sub = int(decoder_dim), int(preds_per_patch), k
        self.channels = self.decoder_dim // self.preds_per_patch  # per sub-patch
        self.interpolate_mode = interpolate_mode
        self.proj = nn.Linear(self.in_channels, self.decoder_dim)
        rates = [float(r) for r in torch.linspace(0, drop_path, depth)] if depth else []
        self.blocks = nn.Sequential(*[ConvNeXtBlock(self.channels, ls_init_value=None, drop_path=r) for r in rates])
        self.final = nn.Conv2d(self.channels, self.out_channels, 1)
        self.apply(_init_weights)

    def tokens_to_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) token map -> (B, C, h*k, w*k): the linear projection and the sub-patch layout."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a (B, {self.in_channels}, h, w) token map, got {tuple(x.shape)}")
        b, _, h, w = x.shape
        k, c = self.sub, self.channels
        y = self.proj(x.permute(0, 2, 3, 1))               # (B, h, w, k*k*C): group p = r*k + col
        y = y.reshape(b, h, w, k, k, c)                    # (B, h, w, r, col, C)
        y = y.permute(0, 1, 3, 2, 4, 5).reshape(b, h * k, w * k, c)  # (B, H, W, C), pixel (i*k + r, j*k + col)
        # returned as NCHW in channels-last memory: the ConvNeXt blocks work channels-last inside, and
        # PyTorch's depth-wise convolution is about 10x faster on CPU in that layout (backward pass)
        return y.permute(0, 3, 1, 2)

    def forward(self, x: torch.Tensor, out_size: Sequence[int] | None = None) -> torch.Tensor:
        # contiguous NCHW out (the blocks run channels-last): consumers that read raw memory as NCHW
        # (mmcv ops) must never see a channels-last view
        y = self.final(self.blocks(self.tokens_to_map(x))).contiguous()
        if out_size is not None:
            y = F.interpolate(y, size=tuple(int(s) for s in out_size), mode=self.interpolate_mode,
                              align_corners=False)
        return y


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


@once
def register_mmseg() -> None:
    """Register ``FourmConvNeXtHead`` (an mmseg ``BaseDecodeHead`` around :class:`ConvNeXtTokenHead`)
    in mmseg's MODELS registry (idempotent; imports mmseg only when called)."""
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.registry import MODELS

    class FourmConvNeXtHead(BaseDecodeHead):
        """mmseg decode head: ``ConvNeXtTokenHead`` on ``inputs[in_index]`` (a (B, D, h, w) token map).

        The logits stay at stride patch/k; mmseg upsamples them (bilinear) to the label size for the
        loss and to the image size for prediction, as MultiMAE's adapter does inside itself.
        BaseDecodeHead's own ``conv_seg`` is replaced by the head's final 1x1 convolution."""

        def __init__(self, in_channels: int, num_classes: int, decoder_dim: int = 6144, preds_per_patch: int = 16,
                     depth: int = 4, drop_path: float = 0.0, **kwargs: Any):
            kwargs.setdefault("dropout_ratio", 0.0)  # MultiMAE: no dropout before the classifier
            kwargs.setdefault("init_cfg", None)      # initialised as MultiMAE, in ConvNeXtTokenHead
            super().__init__(in_channels=in_channels, channels=decoder_dim // preds_per_patch,
                             num_classes=num_classes, **kwargs)
            self.head = ConvNeXtTokenHead(in_channels, self.out_channels, decoder_dim, preds_per_patch, depth,
                                          drop_path)
            del self.conv_seg

        def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
            x = self._transform_inputs(inputs)
            y = self.head.blocks(self.head.tokens_to_map(x))
            if self.dropout is not None:
                y = self.dropout(y)
            return self.head.final(y).contiguous()  # NCHW memory, as ConvNeXtTokenHead.forward

    mm_register(MODELS, "FourmConvNeXtHead")(FourmConvNeXtHead)


__all__ = ["ConvNeXtTokenHead", "register_mmseg"]
