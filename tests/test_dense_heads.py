"""The generic ConvNeXt dense head (MultiMAE's ConvNeXt adapter): geometry, shapes, gradients."""

import pytest
import torch

from fourm_eval.errors import ConfigError
from fourm_eval.tasks.dense_heads import ConvNeXtTokenHead


def _probe_head(in_ch, decoder_dim, ppp):
    """A head whose projection writes 1000 * (token's channel 0) + feature index into each feature."""
    head = ConvNeXtTokenHead(in_ch, 3, decoder_dim=decoder_dim, preds_per_patch=ppp, depth=0)
    with torch.no_grad():
        head.proj.weight.zero_()
        head.proj.weight[:, 0] = 1000.0
        head.proj.bias.copy_(torch.arange(decoder_dim, dtype=torch.float32))
    return head


@pytest.mark.parametrize("h,w,ppp", [(2, 3, 4), (3, 2, 16), (1, 1, 1), (2, 2, 9)])
def test_sub_patch_layout_matches_hand_built_map(h, w, ppp):
    """Feature group p = r*k + c of token (i, j) is the sub-patch at pixel (i*k + r, j*k + c)."""
    D, decoder_dim, B = 5, 6 * ppp, 2
    k, C = int(round(ppp ** 0.5)), decoder_dim // ppp
    head = _probe_head(D, decoder_dim, ppp)
    x = torch.zeros(B, D, h, w)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                x[b, 0, i, j] = b * 100 + i * w + j  # token id
    with torch.no_grad():
        got = head.tokens_to_map(x)
    assert got.shape == (B, C, h * k, w * k)
    want = torch.empty(B, C, h * k, w * k)
    for b in range(B):
        for i in range(h):
            for j in range(w):
                for r in range(k):
                    for c in range(k):
                        for ch in range(C):
                            want[b, ch, i * k + r, j * k + c] = 1000.0 * (b * 100 + i * w + j) + (r * k + c) * C + ch
    assert torch.equal(got, want)


def test_one_explicit_pixel():
    """2x2 tokens, 4 sub-patches of 2 channels: the sub-patch in row 1, column 0 of token (0, 1)
    is output pixel (1, 2) and holds features 4 and 5 of that token."""
    head = _probe_head(in_ch=3, decoder_dim=8, ppp=4)
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 1] = 7.0
    with torch.no_grad():
        m = head.tokens_to_map(x)
    assert m[0, :, 1, 2].tolist() == [7004.0, 7005.0]
    assert m[0, :, 0, 0].tolist() == [0.0, 1.0]        # token (0, 0), sub-patch (0, 0): features 0, 1
    assert m[0, :, 3, 3].tolist() == [6.0, 7.0]        # token (1, 1), sub-patch (1, 1): features 6, 7


@pytest.mark.parametrize("out_ch", [1, 7])
def test_shapes_and_upsampling(out_ch):
    head = ConvNeXtTokenHead(16, out_ch, decoder_dim=64, preds_per_patch=16, depth=2)
    x = torch.randn(3, 16, 4, 6)   # a 64 x 96 image in 16-px patches
    assert head(x).shape == (3, out_ch, 16, 24)                     # stride 4
    assert head(x).is_contiguous()    # NCHW memory, whatever layout the blocks use inside
    assert head(x, out_size=(64, 96)).shape == (3, out_ch, 64, 96)
    assert head(x, out_size=(50, 70)).shape == (3, out_ch, 50, 70)


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    head = ConvNeXtTokenHead(8, 3, decoder_dim=32, preds_per_patch=4, depth=3, drop_path=0.1)
    head.train()
    x = torch.randn(2, 8, 3, 5, requires_grad=True)
    loss = head(x, out_size=(48, 80)).square().mean()
    loss.backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert len(head.blocks) == 3 and head.channels == 8


def test_initialisation_follows_multimae():
    torch.manual_seed(0)
    head = ConvNeXtTokenHead(64, 5, decoder_dim=1024, preds_per_patch=16, depth=1)
    assert torch.all(head.proj.bias == 0)
    assert 0.018 < head.proj.weight.std().item() < 0.022  # truncated normal, std 0.02
    assert head.blocks[0].gamma is None  # no layer scale


@pytest.mark.parametrize("dim,ppp", [(48, 8), (50, 16)])
def test_bad_geometry_is_a_config_error(dim, ppp):
    with pytest.raises(ConfigError):
        ConvNeXtTokenHead(8, 2, decoder_dim=dim, preds_per_patch=ppp)


def test_wrong_input_is_refused():
    head = ConvNeXtTokenHead(8, 2, decoder_dim=16, preds_per_patch=4, depth=0)
    with pytest.raises(ValueError, match="token map"):
        head(torch.randn(2, 9, 3, 3))


def test_mmseg_decode_head_wraps_it():
    """The mmseg head: logits at stride 4 for mmseg to upsample; no unused conv_seg left behind."""
    from mmseg.registry import MODELS

    from fourm_eval.tasks.dense_heads import register_mmseg

    from mmengine.registry import DefaultScope

    register_mmseg()
    with DefaultScope.overwrite_default_scope("mmseg"):  # whatever scope an earlier test left behind
        head = MODELS.build(dict(type="FourmConvNeXtHead", in_channels=16, num_classes=6, decoder_dim=64,
                                 preds_per_patch=16, depth=1))
    assert not hasattr(head, "conv_seg")
    feats = (torch.randn(2, 16, 3, 4),)
    assert head(feats).shape == (2, 6, 12, 16) and head(feats).is_contiguous()
    n = sum(p.numel() for p in head.parameters())
    assert n == sum(p.numel() for p in head.head.parameters())
