"""DeiT III / MAE through the same API, checked against timm itself."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from fourm_eval.backbones import build_backbone
from fourm_eval.errors import CheckpointError


@pytest.mark.parametrize("name,arch", [("mae-b", "vit_base_patch16_224"), ("deit3-b", "deit3_base_patch16_224")])
def test_weights_from_local_file_reproduce_timm(tmp_path, name, arch):
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False, num_classes=1000).eval()
    path = tmp_path / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))  # head included, as released
    bb = build_backbone(name, checkpoint=path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = ref.forward_features(x)[:, ref.num_prefix_tokens:]
        assert torch.allclose(bb(x), want, atol=1e-5)
        blk, = bb.get_intermediate_layers(x, [5])
        t = ref.patch_embed(x)
        t = ref._pos_embed(t)
        t = ref.norm_pre(t)
        for b in ref.blocks[:6]:
            t = b(t)
        assert torch.allclose(blk, t[:, ref.num_prefix_tokens:], atol=1e-5)
        assert bb(torch.randn(1, 3, 256, 256)).shape == (1, 256, 768)  # other sizes: pos-embed resampled
    assert bb.describe()["layout"] == "timm" and bb.describe()["source"] == str(path)
    assert bb.layer_id("vit.blocks.3.attn.qkv.weight") == 4
    assert bb.layer_id("vit.cls_token") == 0 and bb.layer_id("vit.norm.weight") == 13


def test_missing_weights_name_the_expected_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"deit3_large_patch16_224\.fb_in22k_ft_in1k"):
        build_backbone("deit3-l", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match="vit_large_patch16_224.mae"):
        build_backbone("mae-l", checkpoint="hub")


def test_wrong_file_for_baseline(tmp_path, official_ckpt):
    with pytest.raises(CheckpointError, match="does not fit vit_base_patch16_224"):
        build_backbone("mae-b", checkpoint=official_ckpt)
