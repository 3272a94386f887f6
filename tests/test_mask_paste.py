"""The batched CPU mask paste gives mmdet's own binary masks, pixel for pixel (mmdet's FCNMaskHead is the truth)."""

import pytest
import torch
from mmengine.config import ConfigDict

from fourm_eval.tasks.mask_paste import paste_masks_cpu, register


def _heads(num_classes=3, class_agnostic=False):
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    from mmdet.registry import MODELS
    register()
    kw = dict(num_convs=0, in_channels=4, conv_out_channels=4, num_classes=num_classes,
              class_agnostic=class_agnostic)
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope("mmdet"):  # whatever scope an earlier test left as the default
        return FCNMaskHead(**kw), MODELS.build(dict(type="FourmFCNMaskHead", **kw))


def _boxes(g, n, h, w):
    """Boxes of every kind a detector emits: inside, across and on the borders, sub-pixel, one pixel wide,
    zero width or height (clipped at a border), fractional and integer corners, one covering the image."""
    x0 = torch.rand(n, generator=g) * (w + 10) - 5
    y0 = torch.rand(n, generator=g) * (h + 10) - 5
    bw = torch.rand(n, generator=g) ** 2 * w * 1.2
    bh = torch.rand(n, generator=g) ** 2 * h * 1.2
    b = torch.stack([x0, y0, x0 + bw, y0 + bh], 1)
    b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
    special = torch.tensor([[w, 3.0, w, 9.0], [2.0, h, 7.0, h], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, w, h],
                            [3.0, 4.0, 4.0, 5.0], [10.25, 2.5, 10.75, 30.0], [1.0, 1.0, 2.0, 2.0]])
    return torch.cat([b, special])[:n]


@pytest.mark.parametrize("h,w,scale,rescale", [(128, 96, 1.0, True), (75, 131, 1.0, True), (64, 64, 0.5, True),
                                               (100, 80, 1.6, False), (33, 200, 1.0, False)])
def test_same_masks_as_mmdet_one_by_one_paste(h, w, scale, rescale):
    g = torch.Generator().manual_seed(h * w)
    mmdet_head, ours = _heads()
    n = 120
    logits = torch.randn(n, 3, 28, 28, generator=g) * 4
    logits[:3] = 40.0        # saturated: sigmoid is exactly 1.0, a pixel can sit at exactly 0.5
    boxes = _boxes(g, n, h, w)
    labels = torch.randint(0, 3, (n,), generator=g)
    meta = {"ori_shape": (h, w), "scale_factor": (scale, scale)}
    cfg = ConfigDict(mask_thr_binary=0.5)
    want = mmdet_head._predict_by_feat_single(logits.clone(), boxes.clone() * (scale if rescale else 1), labels,
                                              meta, cfg, rescale=rescale)
    got = ours._predict_by_feat_single(logits.clone(), boxes.clone() * (scale if rescale else 1), labels, meta, cfg,
                                       rescale=rescale)
    assert got.dtype == want.dtype == torch.bool and got.shape == want.shape
    assert want.any() and not want.all()
    assert torch.equal(got, want), int((got != want).sum())


def test_chunks_and_thresholds_agree():
    """Any chunk size gives the same masks, at any binary threshold; no detections give an empty stack."""
    g = torch.Generator().manual_seed(7)
    h, w, n = 90, 70, 37
    probs = torch.rand(n, 1, 28, 28, generator=g)
    boxes = _boxes(g, n, h, w)
    mmdet_head, ours = _heads(num_classes=1, class_agnostic=True)
    for thr in (0.0, 0.3, 0.5, 0.9):
        want = mmdet_head._predict_by_feat_single(probs, boxes.clone(), torch.zeros(n, dtype=torch.long),
                                                  {"ori_shape": (h, w), "scale_factor": (1.0, 1.0)},
                                                  ConfigDict(mask_thr_binary=thr), rescale=True, activate_map=True)
        for chunk in (h * w, 5 * h * w, 1 << 24):
            assert torch.equal(paste_masks_cpu(probs, boxes, h, w, thr, max_chunk_elems=chunk), want), (thr, chunk)
    assert paste_masks_cpu(probs[:0], boxes[:0], h, w, 0.5).shape == (0, h, w)


def test_soft_masks_are_mmdets_path():
    """A negative threshold (soft uint8 masks, for visualisation) is left to mmdet's code."""
    mmdet_head, ours = _heads()
    g = torch.Generator().manual_seed(1)
    logits, boxes = torch.randn(5, 3, 28, 28, generator=g), _boxes(g, 5, 40, 40)
    args = (torch.zeros(5, dtype=torch.long), {"ori_shape": (40, 40), "scale_factor": (1.0, 1.0)},
            ConfigDict(mask_thr_binary=-1))
    got = ours._predict_by_feat_single(logits, boxes.clone(), *args, rescale=True)
    assert got.dtype == torch.uint8
    assert torch.equal(got, mmdet_head._predict_by_feat_single(logits, boxes.clone(), *args, rescale=True))
