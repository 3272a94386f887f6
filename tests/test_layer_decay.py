"""Layer-wise lr decay for 4M-B: lr(l) = base_lr * decay**(L + 1 - l) (docs/transfer-protocols.md)."""

import csv
import re

import pytest

from fourm_eval.tasks import coco_det, mm
from fourm_eval.tasks.profiles import load_profile


def _det_model(backbone: str, tmp_path):
    coco_det.register()
    from mmdet.registry import MODELS
    p = load_profile("coco-det", "paper")
    cfg = coco_det.build_model_cfg(p, dict(name=backbone), embed_dim=768, num_classes=3)
    from mmengine.config import ConfigDict
    return MODELS.build(ConfigDict(cfg))


@pytest.mark.parametrize("decay_biases", [False, True])
def test_4m_b_table_matches_formula(tmp_path, decay_biases):
    """Per parameter: the layer's lr, and weight decay except on 1-d parameters (the default) or, with
    weight_decay_biases (detectron2's rule), except on the norm layers' parameters only (the 4M encoder's
    LayerNorms, the neck's and box head's LayerNorm2d); the modality embedding never."""
    model = _det_model("4m-b", tmp_path)
    base, decay, wd = 1e-4, 0.7, 0.1
    coco_det.register()
    from mmengine.optim import build_optim_wrapper
    table = tmp_path / "param_groups.csv"
    ow = build_optim_wrapper(model, dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=base, weight_decay=wd),
        constructor="LayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=decay, backbone_attr="backbone.net", table_path=str(table),
                           decay_biases=decay_biases)))
    L = 12
    seen = 0
    for g in ow.optimizer.param_groups:
        for p in g["params"]:
            seen += 1
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
    # independent expectation from parameter names (the doc's rule), checked per parameter
    names = {id(p): n for n, p in model.named_parameters()}
    module_of = {id(p): type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False)}
    decayed_biases = 0
    for g in ow.optimizer.param_groups:
        for p in g["params"]:
            n = names[id(p)]
            m = re.match(r"backbone\.net\.encoder\.(\d+)\.", n)
            if m:
                layer = int(m.group(1)) + 1
            elif n.startswith(("backbone.net.patch_embed", "backbone.net.mod_emb")):
                layer = 0
            else:
                layer = L + 1  # encoder_norm, neck, heads
            assert g["lr"] == pytest.approx(base * decay ** (L + 1 - layer)), n
            if decay_biases:
                no_decay = module_of[id(p)] in ("LayerNorm", "LayerNorm2d") or n.endswith("mod_emb")
                decayed_biases += n.endswith(".bias") and not no_decay
            else:
                no_decay = p.ndim == 1 or n.endswith("mod_emb")
            assert g["weight_decay"] == (0.0 if no_decay else wd), n
    assert (decayed_biases > 0) == decay_biases
    rows = list(csv.DictReader(open(table)))
    lids = sorted({int(r["layer_id"]) for r in rows})
    assert lids == list(range(L + 2))
    for r in rows:
        assert float(r["lr"]) == pytest.approx(base * decay ** (L + 1 - int(r["layer_id"])), rel=1e-5)
    assert float([r for r in rows if r["layer_id"] == "0"][0]["lr"]) == pytest.approx(1e-4 * 0.7 ** 13, rel=1e-5)


def test_baseline_uses_its_own_layer_ids(tmp_path):
    model = _det_model("mae-b", tmp_path)
    groups = mm.layer_decay_groups(model, model.backbone.net, "backbone.net.", 1.0, 0.05, 0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert by_name["backbone.net.vit.blocks.0.attn.qkv.weight"]["layer_id"] == 1
    assert by_name["backbone.net.vit.cls_token"]["layer_id"] == 0
    assert by_name["backbone.net.vit.cls_token"]["weight_decay"] == 0.0
    assert by_name["backbone.net.vit.pos_embed"]["weight_decay"] == 0.0
    assert by_name["neck.stages.0.0.weight"]["lr"] == 1.0


@pytest.mark.parametrize("backbone,block_re,embed", [
    ("4m-b", r"backbone\.net\.encoder\.(\d+)\.", ("backbone.net.patch_embed", "backbone.net.mod_emb")),
    ("deit3-b", r"backbone\.net\.vit\.blocks\.(\d+)\.", ("backbone.net.vit.patch_embed", "backbone.net.vit.cls_token",
                                                         "backbone.net.vit.pos_embed")),
    ("mae-b", r"backbone\.net\.vit\.blocks\.(\d+)\.", ("backbone.net.vit.patch_embed", "backbone.net.vit.cls_token",
                                                       "backbone.net.vit.pos_embed")),
])
def test_in1k_classifier_groups(backbone, block_re, embed):
    """ImageNet fine-tuning (4M-21 B values: decay 0.75, wd 0.05): every parameter's lr and weight decay
    from the doc's name rules; the encoder's final norm trains with final_norm (the paper's) and is frozen
    without it; the head (LayerNorm + Linear) is layer L+1; in linear mode only the head is in the optimiser."""
    from mmengine.registry import MODELS

    from fourm_eval.tasks import in1k_cls
    from fourm_eval.tasks.profiles import load_profile, resolve_per_size

    in1k_cls.TASK.register_mm()
    p = resolve_per_size(load_profile("in1k-cls", "paper"), "b")
    model = MODELS.build(in1k_cls.build_model_cfg(p, dict(name=backbone), num_classes=1000))
    base, decay, wd, L = 1e-4, p["layer_decay"], p["weight_decay"], 12
    assert decay == 0.75 and wd == 0.05
    groups = mm.layer_decay_groups(model, model.backbone.net, "backbone.net.", base, wd, decay)
    seen = {}
    for g in groups:
        for n in g["param_names"]:
            seen[n] = g
    trainable = {n for n, q in model.named_parameters() if q.requires_grad}
    assert set(seen) == trainable
    final_norm = [n for n in dict(model.named_parameters()) if n.startswith("backbone.net.")
                  and re.search(r"(encoder_norm|vit\.norm)\.", n)]
    assert final_norm and set(final_norm) <= trainable  # the paper's final_norm: true (ml-4m's FourMViT)
    unnormed = MODELS.build(in1k_cls.build_model_cfg({**p, "final_norm": False}, dict(name=backbone), num_classes=1000))
    assert not {n for n, q in unnormed.named_parameters() if q.requires_grad} & set(final_norm)
    for n, g in seen.items():
        m = re.match(block_re, n)
        layer = int(m.group(1)) + 1 if m else (0 if n.startswith(embed) else L + 1)
        assert g["lr"] == pytest.approx(base * decay ** (L + 1 - layer)), n
        q = dict(model.named_parameters())[n]
        no_decay = q.ndim == 1 or n.endswith(("mod_emb", "cls_token", "pos_embed"))
        assert g["weight_decay"] == (0.0 if no_decay else wd), n
    assert {"head.0.weight", "head.1.weight", "head.1.bias"} <= set(seen)
    # the linear probe: the frozen backbone has no group
    lin = resolve_per_size(load_profile("in1k-cls", "linear"), "b")
    probe = MODELS.build(in1k_cls.build_model_cfg(lin, dict(name=backbone), num_classes=1000))
    names = {n for g in mm.layer_decay_groups(probe, probe.backbone.net, "backbone.net.", 1.0, 0.0, 1.0)
             for n in g["param_names"]}
    assert names == {"head.1.weight", "head.1.bias"}
