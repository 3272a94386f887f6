"""The 4M backbone against the official implementation's output (shared fixture)."""

import torch
from safetensors.torch import load_file

from fourm_eval.backbones import build_backbone, sincos_2d
from reference_impl import reference_forward, sincos_literal


def test_matches_official_output(official_ckpt, official_ref):
    bb = build_backbone("4m", checkpoint=official_ckpt).eval()
    with torch.no_grad():
        out = bb(official_ref["input"])
    assert out.shape == official_ref["output"].shape == (2, 196, 64)
    assert (out - official_ref["output"]).abs().max().item() <= 1e-4


def test_config_read_from_file(official_ckpt):
    bb = build_backbone("4m", checkpoint=official_ckpt)
    assert (bb.embed_dim, bb.num_layers, bb.patch_size, bb.num_heads) == (64, 2, 16, 4)
    assert bb.cfg.gated_mlp and bb.cfg.act_layer == "SiLU" and not bb.cfg.qkv_bias
    assert bb.encoder[0].mlp.fc1.out_features == 170  # int(2 * 4.0 * 64 / 3)


def test_sincos_equals_buffer_written_by_official_code(official_ckpt):
    stored = load_file(str(official_ckpt))["encoder_embeddings.rgb@224.pos_emb"]
    assert torch.allclose(sincos_2d(14, 14, 64), stored, atol=1e-6)
    # the literal formula of the doc agrees with the stored buffer too
    assert torch.allclose(sincos_literal(14, 14, 64), stored, atol=1e-6)


def test_literal_reference_matches_official(official_ckpt, official_ref):
    """The test-side reference implementation is itself validated against official output."""
    sd = load_file(str(official_ckpt))
    cfg = dict(dim=64, num_heads=4, depth=2, gated_mlp=True, act="SiLU")
    out = reference_forward(sd, cfg, official_ref["input"])
    assert (out - official_ref["output"]).abs().max().item() <= 1e-4


def test_nonsquare_grid_rows_and_columns():
    pe = sincos_2d(2, 3, 8)[0]  # token (r, c) at index r*3 + c
    assert torch.allclose(pe, sincos_literal(2, 3, 8)[0], atol=1e-6)
    # column-only change leaves the row half untouched
    assert torch.allclose(pe[0, :4], pe[2, :4]) and not torch.allclose(pe[0, 4:], pe[2, 4:])
