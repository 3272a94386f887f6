"""LoRA adapters (fourm_eval/lora.py) on the tiny 4M and a tiny timm ViT, unit level: which linears are
adapted and with which rank and scale (ml-4m's lora_utils semantics), that only adapters train, that the
adapted model equals the pre-trained one at initialisation (B = 0), that adapters keep their block's layer
id in the optimiser, that the merged export loads through the plain backbone loader (no peft) and
reproduces the adapted model, and the profile section's checks."""

import re

import pytest
import torch
from safetensors import safe_open

from fourm_eval.backbones import build_backbone
from fourm_eval.errors import ConfigError
from fourm_eval.fixtures import default_tiny_checkpoint
from fourm_eval.lora import export_merged, inject, resolve_finetune

LORA = {"mode": "lora", "rank": 8, "scale": 1.0, "dropout": 0.0, "targets": ["all"]}
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _tiny_4m():
    return build_backbone("4m", checkpoint=str(default_tiny_checkpoint())).eval()


def _tiny_timm(checkpoint=None):  # MAE ViT-B's architecture at width 64, 2 blocks, 64 px
    return build_backbone("mae-b", checkpoint=checkpoint, embed_dim=64, depth=2, num_heads=4, img_size=64).eval()


def _train_adapters(net, seed=1):
    """Stand-in for training: every adapter weight set to random values (B no longer 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_tiny_4m_adapters_rank_scale_init_and_freezing():
    net = _tiny_4m()
    with torch.no_grad():
        before = net(X)
    torch.manual_seed(0)
    info = inject(net, dict(LORA, scale=2.0))
    # ml-4m 'all' on a 4M block: every linear of Attention and (gated) Mlp, the SwiGLU gate fc3 included
    expected = {f"encoder.{i}.{s}" for i in range(4) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                                               "mlp.fc3")}
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in net.named_parameters() if ".lora_A." in n}
    assert adapted == expected and info["n_adapted"] == 20
    mods = dict(net.named_modules())
    for n in expected:
        m = mods[n]
        r = 3 * 8 if n.endswith("qkv") else 8  # ml-4m num_packed_linear: qkv gets 3 x rank
        assert m.r["default"] == r and m.lora_alpha["default"] == 2.0 * r and m.scaling["default"] == 2.0
        assert torch.count_nonzero(m.lora_B["default"].weight) == 0
    a = mods["encoder.0.attn.qkv"].lora_A["default"].weight
    assert a.shape == (24, 128) and abs(a.std().item() - 1 / 8) < 0.01  # std 1/rank, not 1/(3 rank)
    assert info["alpha"] == 16.0 and info["packed_rank"] == {"attn.qkv": 24}
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.default\.weight$", n) for n in trainable)
    assert len(trainable) == 2 * 20
    with torch.no_grad():
        assert torch.equal(net(X), before)  # B = 0: exactly the pre-trained model


def test_adapters_keep_their_block_layer_id_and_frozen_weights_leave_the_optimiser():
    from fourm_eval.tasks import mm

    vit = mm.FourmEvalViT("4m", checkpoint=str(default_tiny_checkpoint()), final_norm=True, finetune=LORA)
    groups = mm.layer_decay_groups(vit, vit.net, "net.", 1e-3, 0.05, 0.9)
    seen = set()
    for g in groups:
        for n in g["param_names"]:
            block = int(re.match(r"net\.encoder\.(\d+)\.", n).group(1))  # blocks.3 / encoder.3 -> layer 4
            assert g["layer_id"] == block + 1 and g["lr"] == pytest.approx(1e-3 * 0.9 ** (4 + 1 - (block + 1)))
            seen.add(n)
    assert seen == {"net." + n for n, p in vit.net.named_parameters() if ".lora_" in n}


@pytest.mark.parametrize("family", ["4m", "timm"])
def test_merged_export_loads_without_peft_and_reproduces_the_adapted_model(tmp_path, family):
    net = _tiny_4m() if family == "4m" else _tiny_timm()
    targets = ["all"] if family == "4m" else ["attn", "mlp.fc2"]
    info = inject(net, dict(LORA, rank=4, scale=1.5, targets=targets))
    if family == "timm":  # timm's ViT block: qkv, proj in Attention; fc2 only of the MLP
        assert info["adapted_linears"] == ["attn.proj", "attn.qkv", "mlp.fc2"] and info["n_adapted"] == 6
    _train_adapters(net)
    with torch.no_grad():
        adapted = net(X)
    out = export_merged(net, tmp_path / "merged.safetensors")
    again = export_merged(net, tmp_path / "again.safetensors")  # the recorded sha256 is reproducible
    assert again["sha256"] == out["sha256"]
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert not any("lora" in k or "base_layer" in k for k in keys)
    if family == "4m":
        with safe_open(str(default_tiny_checkpoint()), "pt") as f:  # the released file it came from
            original = {k for k in f.keys() if k.startswith(("encoder.", "encoder_norm.", "encoder_embeddings.rgb"))}
        assert keys == original and meta["encoder_depth"] == "4" and meta["gated_mlp"] == "True"
        loaded = build_backbone("4m", checkpoint=str(tmp_path / "merged.safetensors")).eval()
        assert loaded.config_source == "metadata"
    else:
        assert "blocks.0.attn.qkv.weight" in keys and out["layout"] == "timm"
        loaded = _tiny_timm(str(tmp_path / "merged.safetensors"))
        assert loaded.layout == "timm"
    with torch.no_grad():
        merged = loaded(X)
    assert (merged - adapted).abs().max().item() <= 1e-5
    assert not torch.allclose(merged, (_tiny_4m() if family == "4m" else _tiny_timm())(X), atol=1e-3) or \
        family == "timm"  # the merge did change the 4M (the random-init timm model differs anyway)


def test_profile_section_checks():
    assert "finetune" not in resolve_finetune({"finetune": {"mode": "full", "rank": 64}})  # full: no section
    assert resolve_finetune({"finetune": {"mode": "lora", "rank": 64}})["finetune"] == {
        "mode": "lora", "rank": 64, "scale": 1.0, "dropout": 0.0, "targets": ["all"]}
    with pytest.raises(ConfigError, match="p.yaml: finetune.rank = None; LoRA needs a positive integer rank"):
        resolve_finetune({"finetune": {"mode": "lora"}}, "p.yaml")
    with pytest.raises(ConfigError, match="mode linear .* and finetune.mode lora exclude each other"):
        resolve_finetune({"mode": "linear", "finetune": {"mode": "lora", "rank": 4}})
    net = _tiny_4m()
    with pytest.raises(ConfigError, match=r"encoder.0.attn.qkv \(128 -> 384\) would get a bottleneck of 192"):
        inject(net, dict(LORA, rank=64))  # ml-4m's assertion: 3 x 64 > 128
    with pytest.raises(ConfigError, match="'attn.qvk' names no linear of the backbone's blocks"):
        inject(_tiny_4m(), dict(LORA, targets=["attn.qvk"]))


def test_full_profiles_record_no_finetune_section():
    """The smoke profiles inherit the paper profiles' per-size finetune (XL: LoRA); at any other size the
    resolved profile, hence the record's config and the run's cell, has no finetune section."""
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.runner import resolve_run_profile

    tiny, xl = {"embed_dim": 128, "num_layers": 4}, {"embed_dim": 2048, "num_layers": 24}
    for task, rank in (("ade20k-seg", 64), ("nyu-depth", 8)):
        p, _ = resolve_run_profile(get_task(task), "smoke", None, tiny, None)
        assert "finetune" not in p and "tuning" not in p
        p, _ = resolve_run_profile(get_task(task), "paper", None, xl, None)
        assert p["finetune"] == {"mode": "lora", "rank": rank, "scale": 1.0, "dropout": 0.0, "targets": ["all"]}
    p, _ = resolve_run_profile(get_task("nyu-depth"), "eigen", None, xl, None)
    assert p["finetune"]["rank"] == 8
    # the protocol footnote says the run's own mode, and where an XL run departs from 4M-21's
    ade = get_task("ade20k-seg")
    p, _ = resolve_run_profile(ade, "paper", None, xl, None)
    assert "; LoRA rank 64, scale 1.0 (backbone frozen; adapters on all linears)," in ade.footnote({"config": p})
    p, _ = resolve_run_profile(ade, "paper", ["finetune.mode=full"], xl, None)
    assert "; full fine-tuning (4M-21 fine-tunes XL with LoRA rank 64)," in ade.footnote({"config": p})


@pytest.mark.parametrize("family", ["4m", "timm"])
def test_activation_checkpointing_still_trains_every_adapter(family):
    """With the patch embedding frozen no block input requires grad; a re-entrant checkpoint would then
    give the adapters inside it no gradient. Both backbones checkpoint non-re-entrantly."""
    kw = dict(grad_checkpointing=True)
    net = (build_backbone("4m", checkpoint=str(default_tiny_checkpoint()), **kw) if family == "4m" else
           build_backbone("mae-b", embed_dim=64, depth=2, num_heads=4, img_size=64, **kw))
    inject(net, dict(LORA, rank=4))
    _train_adapters(net)
    net.train()
    net.get_intermediate_layers(X, [-1])[0].square().mean().backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
