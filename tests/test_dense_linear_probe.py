"""DINOv2's dense linear probes (protocol `linear` of ade20k-seg and nyu-depth, tasks/kits/linear_head.py):
the heads against hand computations, the frozen backbone (no gradient, no optimiser state, eval mode), and one
end-to-end smoke run per task (the record names protocol linear and mode linear, the checkpoint's backbone equals
the 4M file bit for bit, the metric beats step 0)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fourm_eval.tasks import get_task
from fourm_eval.tasks.profiles import load_profile, resolve_per_size

from cli_runner import cli_env

SEG, DEPTH = get_task("ade20k-seg"), get_task("nyu-depth")


@pytest.fixture(scope="module")
def lh():
    SEG.register_mm()
    DEPTH.register_mm()
    from fourm_eval.tasks.kits import linear_head
    return linear_head


# ------------------------------------------------------------------ heads
@pytest.mark.parametrize("blocks", [1, 4])
def test_seg_head_is_batchnorm_then_1x1_conv_on_the_concatenated_tokens(lh, blocks):
    """Training mode (batch statistics) and eval mode (running statistics) against F.batch_norm + F.conv2d on the
    tokens concatenated by hand."""
    torch.manual_seed(0)
    D, K = 6, 5
    head = lh.FourmLinearSegHead(in_channels=D, num_classes=K, num_blocks=blocks, norm_cfg=dict(type="BN"))
    with torch.no_grad():
        head.bn.weight.uniform_(0.5, 1.5)
        head.bn.bias.uniform_(-0.5, 0.5)
        head.conv_seg.bias.uniform_(-0.1, 0.1)
    maps = [torch.randn(3, D, 4, 5) for _ in range(blocks)]
    x = torch.cat(maps, dim=1)  # channel order: block 0's D channels, block 1's, ...
    conv = head.conv_seg
    head.train()
    want = F.conv2d(F.batch_norm(x, None, None, head.bn.weight, head.bn.bias, training=True, eps=head.bn.eps),
                    conv.weight, conv.bias)
    assert conv.kernel_size == (1, 1) and conv.weight.shape == (K, D * blocks, 1, 1)
    torch.testing.assert_close(head(maps), want, rtol=1e-5, atol=1e-5)
    head.eval()
    want = F.conv2d(F.batch_norm(x, head.bn.running_mean, head.bn.running_var, head.bn.weight, head.bn.bias,
                                 training=False, eps=head.bn.eps), conv.weight, conv.bias)
    torch.testing.assert_close(head(maps), want, rtol=1e-5, atol=1e-5)


def test_depth_bins_by_hand(lh):
    """Uniform bins [1, 2, 3, 4] (min 1, max 4, 4 bins); DINOv2's linear normalisation relu(l) + 0.1 over the sum,
    softmax and sigmoid, on one pixel written out."""
    logits = torch.tensor([0.0, 1.0, -1.0, 2.0]).view(1, 4, 1, 1)
    lin = lh.bins_to_depth(logits, 1.0, 4.0, "linear")
    assert lin.shape == (1, 1, 1, 1)
    assert lin.item() == pytest.approx((0.1 * 1 + 1.1 * 2 + 0.1 * 3 + 2.1 * 4) / 3.4)  # 11 / 3.4
    e = [2.718281828459045 ** v for v in (0.0, 1.0, -1.0, 2.0)]
    assert lh.bins_to_depth(logits, 1.0, 4.0, "softmax").item() == pytest.approx(
        sum(w * b for w, b in zip(e, (1, 2, 3, 4))) / sum(e), rel=1e-6)
    s = [1 / (1 + 2.718281828459045 ** -v) for v in (0.0, 1.0, -1.0, 2.0)]
    assert lh.bins_to_depth(logits, 1.0, 4.0, "sigmoid").item() == pytest.approx(
        sum(w * b for w, b in zip(s, (1, 2, 3, 4))) / sum(s), rel=1e-6)


def test_depth_head_against_a_hand_computation(lh):
    """Two blocks, each with its global token (the mean of its patch tokens), upsampled x2 (bilinear,
    align_corners False), concatenated, 1x1 conv to 3 bins in [0.5, 2.5] (0.5, 1.5, 2.5), linear weights, no BN."""
    torch.manual_seed(1)
    D = 3
    head = lh.FourmLinearDepthHead(in_channels=D, num_blocks=2, batch_norm=False, global_token=True, upsample=2,
                                   n_bins=3, min_depth=0.5, max_depth=2.5, norm_strategy="linear")
    assert isinstance(head.bn, torch.nn.Identity)  # DINOv2's depth BNHead has its BN commented out
    maps = [torch.randn(2, D, 2, 3) for _ in range(2)]
    parts = []
    for m in maps:
        g = m.mean(dim=(2, 3), keepdim=True).expand(-1, -1, 2, 3)
        parts.append(F.interpolate(torch.cat([m, g], 1), size=(4, 6), mode="bilinear", align_corners=False))
    x = torch.cat(parts, 1)
    assert head.conv_depth.weight.shape == (3, 4 * D, 1, 1)
    logit = torch.einsum("bchw,kc->bkhw", x, head.conv_depth.weight[:, :, 0, 0]) + head.conv_depth.bias.view(1, 3, 1, 1)
    w = torch.relu(logit) + 0.1
    w = w / w.sum(1, keepdim=True)
    want = (w * torch.tensor([0.5, 1.5, 2.5]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    got = head(maps)
    assert got.shape == (2, 1, 4, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dinov2_sigloss_by_hand(lh):
    """g = log(p + 1e-3) - log(t + 1e-3) on pixels with t > 0, pooled over the batch; sqrt(unbiased var +
    0.15 mean^2); the warm-up form sqrt(0.15 mean^2)."""
    import math
    p = torch.tensor([[[[1.0, 2.0], [3.0, 9.0]]], [[[0.5, 4.0], [1.0, 1.0]]]])
    t = torch.tensor([[[[2.0, 2.0], [0.0, 3.0]]], [[[1.0, 0.0], [2.0, 0.5]]]])
    gs = [math.log(a + 1e-3) - math.log(b + 1e-3) for a, b in
          [(1, 2), (2, 2), (9, 3), (0.5, 1), (1, 2), (1, 0.5)]]
    mean = sum(gs) / len(gs)
    var = sum((g - mean) ** 2 for g in gs) / (len(gs) - 1)
    assert lh.dinov2_sigloss(p, t).item() == pytest.approx(math.sqrt(var + 0.15 * mean ** 2), rel=1e-5)
    assert lh.dinov2_sigloss(p, t, warm_up=True).item() == pytest.approx(math.sqrt(0.15 * mean ** 2), rel=1e-5)


# ---------------------------------------------------------- frozen backbone
def _model(task, profile, **linear):
    from mmengine.registry import MODELS
    p = resolve_per_size(load_profile(task.name, profile), "tiny")
    p["linear"].update(linear)
    ctx = type("Ctx", (), dict(profile=p, embed_dim=128, num_layers=4))()
    ctx.backbone_cfg = dict(name="4m-tiny", drop_path_rate=0.1, **task.backbone_options(p, "4m-tiny", {"num_layers": 4}))
    return MODELS.build(task.model_cfg(ctx))


@pytest.mark.parametrize("task,layers", [(SEG, 1), (DEPTH, 4)], ids=["ade20k-seg", "nyu-depth-4-blocks"])
def test_backbone_gets_no_gradient_no_optimiser_state_and_stays_in_eval(lh, task, layers):
    from mmengine.optim import build_optim_wrapper
    model = _model(task, "linear-smoke", layers=layers)  # the depth probe's 4-block concat variant
    assert model.backbone.out_indices == ([3] if layers == 1 else [0, 1, 2, 3])
    assert model.decode_head.num_blocks == layers
    bb = model.backbone
    assert bb.frozen and not any(q.requires_grad for q in bb.parameters())
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    ow = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=0.5, weight_decay=0.1),
                                         constructor="LayerDecayOptimWrapperConstructor",
                                         paramwise_cfg=dict(layer_decay_rate=0.5, backbone_attr="backbone.net")))
    in_opt = {id(q) for g in ow.optimizer.param_groups for q in g["params"]}
    assert in_opt and not in_opt & {id(q) for q in bb.parameters()}
    model.train()
    assert model.decode_head.training and not any(m.training for m in bb.net.modules())
    x = torch.randn(2, 3, 64, 64)
    for _ in range(2):
        feats = bb(x)
        assert not any(f.requires_grad for f in feats)  # computed without autograd
        loss = model.decode_head(feats).square().mean()
        ow.update_params(loss)
    assert all(q.grad is None for q in bb.parameters())
    assert len(ow.optimizer.state) == len(in_opt)  # optimiser state for the head's parameters only
    after = bb.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---------------------------------------------------------------- end to end
def _run(tmp_path, task):
    """`fourm-eval run TASK --profile linear-smoke` on the built-in mini data, one torch thread (on the shared
    2-core machine two threads made the small matmuls ~10x slower)."""
    wd = tmp_path / task
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "run", task, "--profile", "linear-smoke",
                        "--work-dir", str(wd)], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                       env={**cli_env(tmp_path), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((wd / "result.json").read_text())
    from fourm_eval.backbones import build_backbone
    from fourm_eval.results import finetune_mode
    c = rec["config"]
    assert c["protocol"] == "linear" and c["mode"] == "linear" and c["head"] == "linear"
    assert finetune_mode(c) == "linear" and rec["status"] == "complete"
    ck = torch.load(wd / f"iter_{c['schedule_resolved']['max_iters']}.pth", map_location="cpu", weights_only=False)
    ref = build_backbone("4m", checkpoint=rec["backbone"]["checkpoint"]).state_dict()
    got = {k.removeprefix("backbone.net."): v for k, v in ck["state_dict"].items() if k.startswith("backbone.net.")}
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    n_head = sum(1 for k in ck["state_dict"] if k.startswith("decode_head.") and "running" not in k
                 and "num_batches" not in k and "sigloss_calls" not in k)
    assert len(ck["optimizer"]["state"]) == n_head  # no optimiser state for the backbone
    assert "linear probe" in get_task(task).footnote(rec)
    return rec


def test_ade20k_linear_smoke_runs_frozen_and_learns(tmp_path):
    rec = _run(tmp_path, "ade20k-seg")
    assert rec["metrics"]["mIoU"] > rec["metrics_step0"]["mIoU"] + 0.2, (rec["metrics"], rec["metrics_step0"])


def test_nyu_linear_smoke_runs_frozen_and_learns(tmp_path):
    rec = _run(tmp_path, "nyu-depth")
    m, m0 = rec["metrics"], rec["metrics_step0"]
    assert m["delta1"] > m0["delta1"] and m["abs_rel"] < m0["abs_rel"] - 0.1, (m, m0)
