"""Mask pasting for Mask R-CNN inference on CPU, in batches.

mmdet's ``FCNMaskHead`` pastes each predicted 28 x 28 mask into the image one
detection at a time on CPU (``num_chunks = N``; ``_do_paste_mask`` with
``skip_empty=True``, sampling only the box's region plus one pixel). On small
images that loop costs more than the sampling: 170 ms per 128 x 128 image of
100 detections here, against 26 ms batched (``benchmarks/mask_paste.py``), and
an untrained or early detector emits the maximum 100 detections per image.

``FourmFCNMaskHead`` is that head with one change: on CPU it samples many masks
at once over the whole image (one ``grid_sample`` call per chunk of masks,
chunks bounded in memory) and keeps, of each mask, exactly the region
mmdet's one-by-one paste would have written, ``[floor(x0) - 1, ceil(x1) + 1)``
clipped to the image (and the same in y). Inside that region every pixel is
computed by the same float operations as mmdet's, so the binary masks are
mmdet's, bit for bit (tests/test_mask_paste.py compares them with mmdet's own
``_do_paste_mask`` path). On GPU, and for soft (non-binary) masks, the head is
mmdet's unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .mmreg import once, register as mm_register

# floats sampled per chunk (64 MiB of float32): bounds the memory of a batched paste on large images
MAX_CHUNK_ELEMS = 1 << 24


def paste_masks_cpu(masks: torch.Tensor, boxes: torch.Tensor, img_h: int, img_w: int,
                    threshold: float, max_chunk_elems: int = MAX_CHUNK_ELEMS) -> torch.Tensor:
    """Binary masks (N, img_h, img_w): ``masks`` (N, 1, h, w) probabilities pasted into ``boxes`` (N, 4, x0 y0 x1 y1)
    and thresholded with ``>= threshold``; pixel for pixel what mmdet's CPU paste gives."""
    n = int(masks.shape[0])
    out = torch.zeros(n, img_h, img_w, dtype=torch.bool)
    if n == 0 or img_h <= 0 or img_w <= 0:
        return out
    boxes = boxes.to(torch.float32)
    # each mask's own region, as mmdet's one-by-one paste computes it
    x0_int = torch.clamp(boxes[:, 0].floor() - 1, min=0).to(torch.int32)
    y0_int = torch.clamp(boxes[:, 1].floor() - 1, min=0).to(torch.int32)
    x1_int = torch.clamp(boxes[:, 2].ceil() + 1, max=img_w).to(torch.int32)
    y1_int = torch.clamp(boxes[:, 3].ceil() + 1, max=img_h).to(torch.int32)
    cols = torch.arange(0, img_w, dtype=torch.int32)
    rows = torch.arange(0, img_h, dtype=torch.int32)
    px = cols.to(torch.float32) + 0.5
    py = rows.to(torch.float32) + 0.5
    per_chunk = max(1, max_chunk_elems // (img_h * img_w))
    for s in range(0, n, per_chunk):
        b = boxes[s:s + per_chunk]
        k = b.shape[0]
        x0, y0, x1, y1 = torch.split(b, 1, dim=1)
        gx = (px - x0) / (x1 - x0) * 2 - 1          # (k, W)
        gy = (py - y0) / (y1 - y0) * 2 - 1          # (k, H)
        gx[torch.isinf(gx)] = 0
        gy[torch.isinf(gy)] = 0
        grid = torch.stack([gx[:, None, :].expand(k, img_h, img_w), gy[:, :, None].expand(k, img_h, img_w)], dim=3)
        vals = F.grid_sample(masks[s:s + k].to(torch.float32), grid, align_corners=False)[:, 0]
        in_x = (cols >= x0_int[s:s + k, None]) & (cols < x1_int[s:s + k, None])   # (k, W)
        in_y = (rows >= y0_int[s:s + k, None]) & (rows < y1_int[s:s + k, None])   # (k, H)
        out[s:s + k] = (vals >= threshold) & in_y[:, :, None] & in_x[:, None, :]
    return out


@once
def register() -> None:
    """Register ``FourmFCNMaskHead`` in mmdet's model registry (once)."""
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmdet.registry import MODELS

    class FourmFCNMaskHead(FCNMaskHead):
        """mmdet's FCNMaskHead; on CPU its binary masks are pasted in batches (same masks, see module doc)."""

        def _predict_by_feat_single(self, mask_preds: torch.Tensor, bboxes: torch.Tensor, labels: torch.Tensor,
                                    img_meta: dict, rcnn_test_cfg: Any, rescale: bool = False,
                                    activate_map: bool = False) -> torch.Tensor:
            threshold = rcnn_test_cfg.mask_thr_binary
            if bboxes.device.type != "cpu" or threshold < 0:
                return super()._predict_by_feat_single(mask_preds, bboxes, labels, img_meta, rcnn_test_cfg,
                                                       rescale=rescale, activate_map=activate_map)
            # the preamble of mmdet's method, unchanged in effect
            scale_factor = bboxes.new_tensor(img_meta["scale_factor"]).repeat((1, 2))
            img_h, img_w = img_meta["ori_shape"][:2]
            mask_preds = mask_preds.sigmoid() if not activate_map else bboxes.new_tensor(mask_preds)
            if rescale:
                bboxes /= scale_factor
            else:
                w_scale, h_scale = scale_factor[0, 0], scale_factor[0, 1]
                img_h = np.round(img_h * h_scale.item()).astype(np.int32)
                img_w = np.round(img_w * w_scale.item()).astype(np.int32)
            n = len(mask_preds)
            if not self.class_agnostic:
                mask_preds = mask_preds[range(n), labels][:, None]
            return paste_masks_cpu(mask_preds, bboxes, int(img_h), int(img_w), threshold)

    mm_register(MODELS, "FourmFCNMaskHead")(FourmFCNMaskHead)
