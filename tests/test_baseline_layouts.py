"""DeiT III and MAE weights in the layouts their own repositories release, loaded exactly.

Each test builds a timm model with random weights, rewrites its state dict the way
facebookresearch/deit (models_v2.py) or facebookresearch/mae (models_mae.py) store it,
loads that file through ``build_backbone`` and requires the outputs to be *identical*
(``torch.equal``) to timm's own model with the same weights, at 224 and at 256. The models keep
ViT-B's width and names but 4 of its 12 blocks (every key pattern of a layout is there; CI time).
"""

import argparse
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from fourm_eval.backbones import build_backbone
from fourm_eval.errors import CheckpointError

DEIT3, VIT = "deit3_base_patch16_224", "vit_base_patch16_224"
DEPTH = 4  # blocks of the test models (timm's and fourm-eval's builds alike)


def _reference(arch: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A timm model whose every parameter is random (LayerScale at 1e-6 or zero biases would hide bugs)."""
    torch.manual_seed(seed)
    kw.setdefault("depth", DEPTH)
    model = timm.create_model(arch, pretrained=False, num_classes=1000, dynamic_img_size=True, **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _deit_repo_layout(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch/deit saves DeiT III: LayerScale as gamma_1/gamma_2, head included."""
    sd = {}
    for k, v in model.state_dict().items():
        k = re.sub(r"^blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.gamma_\2", k)
        sd[k] = v.clone()
    assert "blocks.0.gamma_1" in sd and "head.weight" in sd and not any(".ls1." in k for k in sd)
    return sd


def _mae_repo_layout(model: torch.nn.Module, dec_dim: int = 64) -> dict[str, torch.Tensor]:
    """The state dict as facebookresearch/mae saves a pre-training checkpoint: encoder + decoder + mask token."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("head.")}
    n_pos, dim = model.pos_embed.shape[1], model.embed_dim
    g = torch.Generator().manual_seed(1)
    sd["mask_token"] = torch.randn(1, 1, dec_dim, generator=g)
    sd["decoder_embed.weight"] = torch.randn(dec_dim, dim, generator=g)
    sd["decoder_embed.bias"] = torch.randn(dec_dim, generator=g)
    sd["decoder_pos_embed"] = torch.randn(1, n_pos, dec_dim, generator=g)
    for name, shape in [("norm1.weight", (dec_dim,)), ("attn.qkv.weight", (3 * dec_dim, dec_dim)),
                        ("attn.proj.weight", (dec_dim, dec_dim)), ("mlp.fc1.weight", (4 * dec_dim, dec_dim))]:
        sd[f"decoder_blocks.0.{name}"] = torch.randn(*shape, generator=g)
    sd["decoder_norm.weight"] = torch.ones(dec_dim)
    sd["decoder_norm.bias"] = torch.zeros(dec_dim)
    sd["decoder_pred.weight"] = torch.randn(16 * 16 * 3, dec_dim, generator=g)
    sd["decoder_pred.bias"] = torch.randn(16 * 16 * 3, generator=g)
    return sd


def _assert_same_outputs(bb: torch.nn.Module, ref: torch.nn.Module, sizes=(224, 256)) -> None:
    bb.eval()
    torch.manual_seed(123)
    for i, s in enumerate(sizes):
        x = torch.randn(1, 3, s, s)
        with torch.no_grad():
            want = ref.forward_features(x)
            got = bb.forward_with_prefix(x) if i else bb(x)
            assert torch.equal(got, want if i else want[:, ref.num_prefix_tokens:]), f"outputs differ at {s}"


def test_deit_repository_layout_loads_exactly(tmp_path):
    ref = _reference(DEIT3)
    assert ref.no_embed_class and ref.pos_embed.shape == (1, 196, 768)  # what the DeiT repo stores, too
    path = tmp_path / "deit_3_base_224_21k.pth"
    torch.save({"model": _deit_repo_layout(ref)}, path)
    bb = build_backbone("deit3-b", checkpoint=path, depth=DEPTH)  # a plain {"model": tensors} loads without allow_pickle
    _assert_same_outputs(bb, ref)
    info = bb.describe()
    assert info["layout"] == "deit" and info["source"] == str(path)
    assert any("gamma_1" in n for n in info["load_notes"])


def test_deit_layout_with_class_position_is_folded_not_dropped(tmp_path):
    # A DeiT III file whose pos-embed has a class position first (1, 197, D): the model that made it
    # added pos[0] to the class token. Dropping or shifting that row would change every output.
    ref = _reference(DEIT3, seed=1, no_embed_class=False)
    assert ref.pos_embed.shape == (1, 197, 768)
    path = tmp_path / "deit3_cls_pos.pth"
    torch.save({"model": _deit_repo_layout(ref)}, path)
    bb = build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    assert bb.vit.no_embed_class and bb.vit.pos_embed.shape == (1, 196, 768)
    _assert_same_outputs(bb, ref)
    assert any("folded into cls_token" in n for n in bb.load_notes)


def test_deit_layout_at_another_grid_is_resampled_on_patch_positions(tmp_path):
    # e.g. deit_3_base_384: 24x24 positions for a 224 model; resampled once at load, as timm does at run time.
    ref = _reference(DEIT3, seed=2, img_size=384)
    path = tmp_path / "deit3_384.pth"
    torch.save({"model": _deit_repo_layout(ref)}, path)
    bb = build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    assert bb.vit.pos_embed.shape == (1, 196, 768)
    _assert_same_outputs(bb, ref, sizes=(224,))


def test_mae_pretraining_layout_loads_exactly(tmp_path):
    ref = _reference(VIT, seed=3)
    path = tmp_path / "mae_visualize_vit_base.pth"
    torch.save({"model": _mae_repo_layout(ref)}, path)
    bb = build_backbone("mae-b", checkpoint=path, depth=DEPTH)
    _assert_same_outputs(bb, ref)
    info = bb.describe()
    assert info["layout"] == "mae"
    assert any("decoder" in n for n in info["load_notes"])


def test_mae_layout_without_class_position(tmp_path):
    # A file whose pos-embed has no class row for a model that adds one: the class token got no position.
    ref = _reference(VIT, seed=4, no_embed_class=True)
    assert ref.pos_embed.shape == (1, 196, 768)
    path = tmp_path / "mae_no_cls_pos.pth"
    torch.save({"model": _mae_repo_layout(ref)}, path)
    bb = build_backbone("mae-b", checkpoint=path, depth=DEPTH)
    assert bb.vit.pos_embed.shape == (1, 197, 768) and not bb.vit.pos_embed[0, 0].any()
    _assert_same_outputs(bb, ref)


def test_timm_safetensors_records_timm_layout(tmp_path):
    ref = _reference(DEIT3, seed=5)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    _assert_same_outputs(bb, ref, sizes=(224,))
    assert bb.describe()["layout"] == "timm"


@pytest.fixture(scope="module")
def deit_sd():
    return _deit_repo_layout(_reference(DEIT3, seed=6))


@pytest.fixture(scope="module")
def mae_sd():
    return _mae_repo_layout(_reference(VIT, seed=7))


def test_deit_file_missing_gamma_names_the_key(tmp_path, deit_sd):
    sd = dict(deit_sd)
    del sd["blocks.3.gamma_2"]
    path = tmp_path / "deit_missing.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"blocks\.3\.gamma_2") as e:
        build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    assert str(path) in str(e.value) and "deit3_base_patch16_224" in str(e.value) and "1 missing" in str(e.value)


def test_deit_file_with_junk_key_fails(tmp_path, deit_sd):
    sd = dict(deit_sd)
    sd["blocks.0.attn.junk"] = torch.zeros(3)
    path = tmp_path / "deit_junk.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.junk") as e:
        build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    assert "does not use" in str(e.value)


def test_mae_file_unknown_decoder_like_key_is_not_dropped(tmp_path, mae_sd):
    # Only MAE's known decoder modules are dropped; a near miss or other junk is reported.
    for junk in ("decoder_extra.weight", "foo.bar"):
        sd = dict(mae_sd)
        sd[junk] = torch.zeros(2)
        path = tmp_path / "mae_junk.pth"
        torch.save({"model": sd}, path)
        with pytest.raises(CheckpointError, match=re.escape(junk)):
            build_backbone("mae-b", checkpoint=path, depth=DEPTH)


def test_mae_finetuned_global_pool_file_is_explained(tmp_path, mae_sd):
    # MAE fine-tuned files (models_vit.py, global_pool) delete norm.* and carry fc_norm.* instead.
    sd = {k.replace("norm.", "fc_norm.") if k.startswith("norm.") else k: v for k, v in mae_sd.items()}
    path = tmp_path / "mae_finetuned.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"fc_norm.*no norm"):
        build_backbone("mae-b", checkpoint=path, depth=DEPTH)


def test_mae_file_shape_mismatch_fails(tmp_path, mae_sd):
    sd = dict(mae_sd)
    sd["blocks.2.mlp.fc1.bias"] = torch.zeros(5)
    path = tmp_path / "mae_shape.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"blocks\.2\.mlp\.fc1\.bias: file \(5,\)"):
        build_backbone("mae-b", checkpoint=path, depth=DEPTH)


def test_training_checkpoint_needs_allow_pickle(tmp_path, deit_sd):
    # Training checkpoints also hold argparse args: not loadable with weights_only, so opt-in only.
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": deit_sd, "args": argparse.Namespace(lr=1e-3), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="allow-pickle"):
        build_backbone("deit3-b", checkpoint=path, depth=DEPTH)
    assert build_backbone("deit3-b", checkpoint=path, allow_pickle=True, depth=DEPTH).layout == "deit"
