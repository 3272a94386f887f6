"""The same loader on the other released families and at other input sizes.

Ground truth: tests/reference_impl.py, a literal implementation of the doc
that reproduces the official fixture (test_reference.py)."""

import pytest
import torch
from safetensors.torch import load_file

from fourm_eval.backbones import build_backbone
from fourm_eval.fixtures import write_fourm_checkpoint
from reference_impl import reference_forward

VARIANTS = {
    "swiglu-nobias": dict(gated_mlp=True, act_layer="SiLU"),
    "gelu-biases": dict(gated_mlp=False, act_layer="GELU", qkv_bias=True, proj_bias=True, mlp_bias=True,
                        norm_bias=True),
    "qknorm": dict(gated_mlp=True, act_layer="SiLU", qk_norm=True),
    "qknorm-gelu-biases": dict(gated_mlp=False, act_layer="GELU", qk_norm=True, qkv_bias=True, proj_bias=True,
                               mlp_bias=True, norm_bias=True),
    "registers": dict(gated_mlp=True, act_layer="SiLU", num_register_tokens=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("size", [224, 256, 512])
def test_variant_matches_reference(tmp_path, variant, size):
    kw = dict(dim=64, depth=3, num_heads=4, seed=7, **VARIANTS[variant])
    path = write_fourm_checkpoint(tmp_path / "m.safetensors", **kw)
    bb = build_backbone("4m", checkpoint=path).eval()
    sd = load_file(str(path))
    cfg = dict(dim=64, num_heads=4, depth=3, gated_mlp=kw["gated_mlp"], act=kw["act_layer"],
               qk_norm=kw.get("qk_norm", False))
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        out = bb(x)
        inter = bb.get_intermediate_layers(x, [0, 2])
    ref, ref_blocks = reference_forward(sd, cfg, x, return_blocks=True)
    n = (size // 16) ** 2
    assert out.shape == (2, n, 64)
    assert (out - ref).abs().max().item() <= 1e-4
    assert (inter[0] - ref_blocks[0]).abs().max().item() <= 1e-4
    assert (inter[1] - ref_blocks[2]).abs().max().item() <= 1e-4


def test_gelu_is_exact_not_tanh(tmp_path):
    path = write_fourm_checkpoint(tmp_path / "g.safetensors", dim=64, depth=1, num_heads=4, gated_mlp=False,
                                  act_layer="GELU", mlp_bias=True)
    bb = build_backbone("4m", checkpoint=path)
    assert isinstance(bb.encoder[0].mlp.act, torch.nn.GELU) and bb.encoder[0].mlp.act.approximate == "none"


def test_encoder_only_file(tmp_path):
    path = write_fourm_checkpoint(tmp_path / "enc.safetensors", dim=64, depth=2, num_heads=4, encoder_only=True)
    bb = build_backbone("4m", checkpoint=path).eval()
    sd = load_file(str(path))
    assert not any(k.startswith("decoder") for k in sd)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = reference_forward(sd, dict(dim=64, num_heads=4, depth=2, gated_mlp=True, act="SiLU"), x)
        assert (bb(x) - ref).abs().max() <= 1e-4
