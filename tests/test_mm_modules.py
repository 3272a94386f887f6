"""The shared OpenMMLab modules feed mmcv's ops what they expect."""

import pytest
import torch
import torchvision

from fourm_eval.tasks.mm import LayerNorm2d, SimpleFeaturePyramid


def test_layernorm2d_matches_layernorm_over_channels_and_is_contiguous():
    torch.manual_seed(0)
    ln = LayerNorm2d(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 8, 5, 7)
    ref = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), ln.weight, ln.bias, 1e-6).permute(0, 3, 1, 2)
    y = ln(x)
    assert y.is_contiguous() and torch.allclose(y, ref, atol=1e-6)


@pytest.mark.parametrize("size", [(64, 64), (96, 128)])
def test_roi_features_of_the_pyramid_equal_torchvision_roi_align(size):
    """mmcv's RoIAlign (what mmdet's RoI extractor runs) on every pyramid level gives exactly
    torchvision's roi_align, an independent implementation. It did not when the neck handed out
    channels-last views: the kernels read raw memory as NCHW, and the RoI heads got scrambled features."""
    from mmcv.ops import RoIAlign

    torch.manual_seed(0)
    neck = SimpleFeaturePyramid(32, 16)
    h, w = size
    feats = neck((torch.randn(2, 32, h // 16, w // 16),))
    rois = torch.tensor([[0, 3.0, 5.0, 40.0, 30.0], [1, 10.0, 2.0, 60.0, 50.0], [1, 0.0, 0.0, w - 1.0, h - 1.0]])
    for level, stride in zip(feats[:4], (4, 8, 16, 32)):
        ours = RoIAlign((7, 7), spatial_scale=1 / stride, sampling_ratio=0, aligned=True)(level, rois)
        ref = torchvision.ops.roi_align(level.contiguous(), rois, (7, 7), 1 / stride, 0, True)
        assert torch.allclose(ours, ref, atol=1e-5), (stride, (ours - ref).abs().max())


def test_rcnn_low_quality_matches_follow_the_profile():
    """head.rcnn_match_low_quality reaches every R-CNN stage's assigner (the vitdet profile records mmdet's true;
    detectron2's ViTDet uses false); the RPN's stays true, as in both libraries."""
    from fourm_eval.tasks import coco_det
    from fourm_eval.tasks.profiles import load_profile, resolve_per_size

    p = resolve_per_size(load_profile("coco-det", "vitdet"), "b")
    assert p["head"]["rcnn_match_low_quality"] is True and p["weight_decay_biases"] is False
    for detector in ("mask_rcnn", "cascade_mask_rcnn"):
        for value in (True, False):
            q = {**p, "detector": detector, "head": {**p["head"], "rcnn_match_low_quality": value}}
            cfg = coco_det.build_model_cfg(q, dict(name="4m-b"), embed_dim=768, num_classes=3)
            stages = cfg["train_cfg"]["rcnn"] if detector == "cascade_mask_rcnn" else [cfg["train_cfg"]["rcnn"]]
            assert [s["assigner"]["match_low_quality"] for s in stages] == [value] * len(stages)
            assert cfg["train_cfg"]["rpn"]["assigner"]["match_low_quality"] is True
