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


def test_4m_b_table_matches_formula(tmp_path):
    model = _det_model("4m-b", tmp_path)
    base, decay, wd = 1e-4, 0.7, 0.1
    coco_det.register()
    from mmengine.optim import build_optim_wrapper
    table = tmp_path / "param_groups.csv"
    ow = build_optim_wrapper(model, dict(
        type="OptimWrapper", optimizer=dict(type="AdamW", lr=base, weight_decay=wd),
        constructor="LayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=decay, backbone_attr="backbone.net", table_path=str(table))))
    L = 12
    seen = 0
    for g in ow.optimizer.param_groups:
        for p in g["params"]:
            seen += 1
    assert seen == sum(1 for p in model.parameters() if p.requires_grad)
    # independent expectation from parameter names (the doc's rule), checked per parameter
    names = {id(p): n for n, p in model.named_parameters()}
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
            no_decay = p.ndim == 1 or n.endswith("mod_emb")
            assert g["weight_decay"] == (0.0 if no_decay else wd), n
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
