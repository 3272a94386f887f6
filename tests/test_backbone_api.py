"""The backbone API that tasks rely on."""

import pytest
import torch

from fourm_eval.backbones import build_backbone
from fourm_eval.fixtures import write_fourm_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_fourm_checkpoint(tmp_path_factory.mktemp("ck") / "t.safetensors", dim=64, depth=4, num_heads=4,
                                  seed=3)
    return build_backbone("4m", checkpoint=path).eval()


def test_shapes_and_attributes(tiny):
    x = torch.randn(2, 3, 64, 96)
    assert tiny(x).shape == (2, 4 * 6, 64)
    assert tiny.grid_size(x) == (4, 6)
    assert (tiny.embed_dim, tiny.num_layers, tiny.patch_size) == (64, 4, 16)


def test_last_intermediate_with_norm_equals_output(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tiny(x)
        last, = tiny.get_intermediate_layers(x, [3], norm=True)
        raw, = tiny.get_intermediate_layers(x, [-1])
    assert torch.allclose(out, last, atol=1e-6)
    assert not torch.allclose(out, raw, atol=1e-3)  # before the final norm
    assert torch.allclose(tiny.encoder_norm(raw), out, atol=1e-6)


def test_bad_inputs(tiny):
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        tiny(torch.randn(1, 3, 100, 96))
    with pytest.raises(ValueError, match="out of range"):
        tiny.get_intermediate_layers(torch.randn(1, 3, 32, 32), [4])


def test_layer_id_protocol():
    bb = build_backbone("4m-b")
    ids = {n: bb.layer_id(n) for n, _ in bb.named_parameters()}
    assert ids["patch_embed.weight"] == 0 and ids["mod_emb"] == 0
    assert ids["encoder.0.attn.qkv.weight"] == 1 and ids["encoder.11.mlp.fc2.weight"] == 12
    assert ids["encoder_norm.weight"] == 13
    assert bb.layer_id("backbone.encoder.5.norm1.weight") == 6  # name as seen from a detector
    assert bb.layer_id("neck.fpn.0.weight") == 13
    assert sorted(set(ids.values())) == list(range(14))


def test_named_sizes_match_released_encoders():
    # encoder params of docs/fourm-checkpoints.md (86M, 303M, 1.2B) from a meta-device build
    expected = {"4m-b": 86e6, "4m-l": 303e6, "4m-xl": 1.2e9}
    for name, n in expected.items():
        with torch.device("meta"):
            bb = build_backbone(name)
        got = sum(p.numel() for p in bb.parameters())
        assert abs(got - n) / n < 0.01, (name, got)


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = build_backbone("4m-tiny")
    b = build_backbone("4m-tiny", grad_checkpointing=True)
    b.load_state_dict(a.state_dict())
    a.train(), b.train()
    x = torch.randn(2, 3, 64, 64)
    a(x).pow(2).mean().backward()
    b(x).pow(2).mean().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_drop_path_only_in_training():
    bb = build_backbone("4m-tiny", drop_path_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    bb.eval()
    with torch.no_grad():
        assert torch.equal(bb(x), bb(x))
    bb.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(bb(x), bb(x))


def test_window_attention_with_whole_grid_window_equals_global():
    torch.manual_seed(0)
    glob = build_backbone("4m-tiny").eval()
    win = build_backbone("4m-tiny", window_size=4, global_blocks=[]).eval()
    win.load_state_dict(glob.state_dict())
    x = torch.randn(1, 3, 64, 64)  # 4x4 grid == one window
    with torch.no_grad():
        assert torch.allclose(glob(x), win(x), atol=1e-5)
        small = build_backbone("4m-tiny", window_size=2, global_blocks=[]).eval()
        small.load_state_dict(glob.state_dict())
        assert not torch.allclose(glob(x), small(x), atol=1e-3)


def test_bf16_autocast_close_to_fp32(tiny):
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = tiny(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x)
    assert torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.15
