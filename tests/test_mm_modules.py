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
