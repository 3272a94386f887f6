"""NYUv2 depth metrics, losses and heads against hand computations and mmsegmentation's DepthMetric."""

import math

import numpy as np
import pytest
import torch

from fourm_eval.metrics_depth import DepthMetricError, aggregate, eigen_crop, image_metrics


def test_eigen_crop_scales_with_the_image_size():
    assert eigen_crop(480, 640) == (45, 471, 41, 601)        # the published crop
    assert eigen_crop(120, 160) == (11, 118, 10, 150)        # 11.25, 117.75, 10.25, 150.25 rounded
    assert eigen_crop(240, 320) == (23, 236, 21, 301)        # 22.5, 235.5, 20.5, 300.5: halves round up
    assert eigen_crop(960, 1280) == (90, 942, 82, 1202)


def _hand_image():
    """Five scored pixels inside the crop plus pixels the metric must ignore."""
    gt = np.zeros((480, 640))
    pred = np.ones((480, 640))
    scored = {(100, 100): (2.0, 2.4),    # ratio 1.2     -> delta1
              (200, 300): (4.0, 3.0),    # ratio 4/3     -> delta2 only
              (250, 250): (1.0, 1.8),    # ratio 1.8     -> delta3 only
              (300, 500): (1.0, 20.0),   # p clipped to 10: ratio 10
              (45, 41): (10.0, 0.0)}     # first crop pixel, g at the 10 m bound; p clipped to 1e-3
    for (r, c), (g, p) in scored.items():
        gt[r, c], pred[r, c] = g, p
    ignored = {(10, 10): 3.0, (471, 300): 5.0, (200, 40): 5.0, (200, 601): 5.0,   # outside the crop
               (150, 150): 10.5, (160, 160): 0.001}                                 # out of (1e-3, 10]
    for (r, c), g in ignored.items():
        gt[r, c], pred[r, c] = g, 50.0
    return pred, gt


def test_image_metrics_by_hand():
    pred, gt = _hand_image()
    got = image_metrics(pred, gt)
    assert got["delta1"] == pytest.approx(1 / 5)
    assert got["delta2"] == pytest.approx(2 / 5)
    assert got["delta3"] == pytest.approx(3 / 5)
    # |p - g| / g: 0.4/2, 1/4, 0.8/1, 9/1, 9.999/10
    assert got["abs_rel"] == pytest.approx((0.2 + 0.25 + 0.8 + 9 + 0.9999) / 5)
    # squares: 0.16, 1, 0.64, 81, 99.980001
    assert got["rmse"] == pytest.approx(math.sqrt((0.16 + 1 + 0.64 + 81 + 99.980001) / 5))
    # |log10 p/g|: log10 1.2 + log10 4/3 + log10 1.8 + 1 + 4 = log10 2.88 + 5
    assert got["log10"] == pytest.approx((math.log10(2.88) + 5) / 5)


def test_average_is_per_image_then_over_images():
    pred, gt = _hand_image()
    small_gt, small_pred = np.zeros((120, 160)), np.ones((120, 160))
    small_gt[117, 149] = small_pred[117, 149] = 2.0    # last pixel of the scaled crop: exact
    small_gt[118, 50] = small_gt[50, 150] = small_gt[10, 50] = 3.0   # just outside the scaled crop: ignored
    per = {"b": image_metrics(small_pred, small_gt), "a": image_metrics(pred, gt)}
    assert per["b"] == {"delta1": 1.0, "delta2": 1.0, "delta3": 1.0, "abs_rel": 0.0, "rmse": 0.0, "log10": 0.0}
    agg = aggregate(per)
    assert agg["delta1"] == pytest.approx((0.2 + 1.0) / 2)   # pooled over pixels it would be 2/6
    assert agg["rmse"] == pytest.approx(math.sqrt((0.16 + 1 + 0.64 + 81 + 99.980001) / 5) / 2)


def test_matches_mmsegmentation_depth_metric():
    """Inside (1e-3, 10) with predictions in range (no clipping), the crop and formulas agree with
    mmseg's DepthMetric (per image) at NYUv2's 480 x 640."""
    from mmseg.evaluation.metrics import DepthMetric

    rng = np.random.default_rng(0)
    ref = DepthMetric(min_depth_eval=1e-3, max_depth_eval=10.0, crop_type="nyu_crop")
    for _ in range(3):
        gt = rng.uniform(0.5, 9.9, (480, 640))
        gt[rng.random(gt.shape) < 0.2] = 0.0
        pred = np.clip(gt * rng.lognormal(0, 0.3, gt.shape), 0.01, 9.99)
        g = torch.from_numpy(gt)
        mask = ref._get_eval_mask(g)
        want = DepthMetric._calc_all_metrics(g[mask], torch.from_numpy(pred)[mask])
        got = image_metrics(pred, gt)
        for ours, theirs in (("delta1", "d1"), ("delta2", "d2"), ("delta3", "d3"), ("abs_rel", "abs_rel"),
                             ("rmse", "rmse"), ("log10", "log10")):
            assert got[ours] == pytest.approx(want[theirs], rel=1e-6), ours  # mmseg counts in float32


def test_unscorable_images_are_named_errors():
    with pytest.raises(DepthMetricError, match="b.png: prediction is"):
        image_metrics(np.ones((4, 5)), np.ones((5, 4)), name="b.png")
    gt = np.zeros((480, 640))
    gt[:40] = 2.0  # only outside the crop
    with pytest.raises(DepthMetricError, match="inside the Eigen crop"):
        image_metrics(np.ones_like(gt), gt, name="c.png")


# ------------------------------------------------------------------ losses
def test_silog_by_hand_and_images_without_valid_pixels():
    from fourm_eval.tasks.kits.depth_head import silog

    pred = torch.tensor([[[[1.0, 2.0], [4.0, 3.0]]], [[[1.0, 1.0], [1.0, 1.0]]]], requires_grad=True)
    gt = torch.tensor([[[[2.0, 2.0], [2.0, 0.0]]], [[[0.0, 11.0], [0.0, 0.0]]]])  # image 2: nothing valid
    loss = silog(pred, gt)
    # image 1: d = log g - log p = log 2, 0, -log 2 -> mean d^2 = 2 log^2 2 / 3, mean d = 0
    assert float(loss.detach()) == pytest.approx(math.sqrt(2 / 3) * math.log(2), rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all() and float(pred.grad[1].abs().sum()) == 0.0
    # scale invariance (lambda 0.5 keeps half of the scale term): 2x every prediction changes it by a known amount
    d = torch.tensor([math.log(2), 0.0, -math.log(2)]) - math.log(2)
    assert float(silog(pred.detach()[:1] * 2, gt[:1])) == pytest.approx(
        math.sqrt(float((d ** 2).mean()) - 0.5 * float(d.mean()) ** 2), rel=1e-6)
    empty = silog(pred, torch.zeros_like(gt))
    empty.backward()
    assert float(empty) == 0.0


def test_berhu_by_hand():
    from fourm_eval.tasks.kits.depth_head import berhu

    pred = torch.tensor([[[[2.1, 1.5], [4.0, 7.0]]]])
    gt = torch.tensor([[[[2.0, 2.0], [3.0, 0.0]]]])  # errors on valid pixels: 0.1, -0.5, 1.0
    c = 0.2 * 1.0
    want = (0.1 + (0.25 + c * c) / (2 * c) + (1.0 + c * c) / (2 * c)) / 3
    assert float(berhu(pred, gt, 0.2)) == pytest.approx(want, rel=1e-6)
    assert float(berhu(gt.clone(), gt, 0.2)) == 0.0


# ------------------------------------------------------------------- heads
@pytest.mark.parametrize("head", ["convnext", "dpt"])
@pytest.mark.parametrize("hw", [(6, 8), (5, 5)])
def test_heads_give_positive_depth_at_their_stride(head, hw):
    from fourm_eval.tasks.kits.depth_head import FourmDepthHead

    torch.manual_seed(0)
    h = FourmDepthHead(head, 32, convnext=dict(decoder_dim=64, preds_per_patch=16, depth=1),
                       dpt=dict(channels=8, post_process_channels=[4, 8, 16, 32]))
    maps = [torch.randn(2, 32, *hw) for _ in range(4)]
    out = h(maps)
    assert out.ndim == 4 and out.shape[:2] == (2, 1) and (out > 0).all()
    if head == "convnext" or hw[0] % 2 == hw[1] % 2 == 0:
        # ConvNeXt: 4 x 4 sub-patches per token; DPT: fusion ends at stride 2 (an odd grid's stride-2
        # level is rounded up, and the skip maps are resized to it)
        stride = 4 if head == "convnext" else 2
        assert out.shape[2:] == (hw[0] * 16 // stride, hw[1] * 16 // stride)
    pred = h.predict(maps, [dict(img_shape=(hw[0] * 16 - 3, hw[1] * 16), pad_shape=(hw[0] * 16, hw[1] * 16))])
    assert pred.shape == (2, 1, hw[0] * 16, hw[1] * 16)


def test_dpt_head_builds_whatever_the_default_scope():
    """A process that ran another task first (mmdet as the global default scope) still builds the DPT
    head, whose loss comes from mmseg's registry."""
    from mmengine.registry import DefaultScope

    from fourm_eval.tasks.kits.depth_head import FourmDepthHead

    with DefaultScope.overwrite_default_scope("mmdet"):
        h = FourmDepthHead("dpt", 32, dpt=dict(channels=8, post_process_channels=[4, 8, 16, 32]))
    assert h(tuple(torch.randn(1, 32, 4, 4) for _ in range(4))).shape[:2] == (1, 1)


def test_final_norm_is_the_profiles_choice_for_the_convnext_head():
    """convnext.final_norm reaches the backbone (ml-4m's FourMViT: applied; MultiMAE: none); the DPT
    head reads intermediate blocks without it, whatever the profile says."""
    from fourm_eval.tasks.kits.depth import build_model_cfg
    from fourm_eval.tasks.profiles import load_profile, resolve_per_size

    p = resolve_per_size(load_profile("nyu-depth", "smoke"), "tiny")
    assert p["convnext"]["final_norm"] is True  # inherited from the paper profile
    for value in (True, False):
        q = {**p, "convnext": {**p["convnext"], "final_norm": value}}
        assert build_model_cfg(q, {"name": "4m-tiny"}, 128)["backbone"]["final_norm"] is value
        assert build_model_cfg({**q, "head": "dpt"}, {"name": "4m-tiny"}, 128, 4)["backbone"]["final_norm"] is False


# ------------------------------------------------------------- the two protocols' scoring
def test_multimae_scoring_by_hand_and_switching_protocols_changes_the_number(tmp_path):
    """MultiMAE's NYUv2 scoring (run_finetuning_depth.py, masked_nyu_metrics + MetricLogger) on three 4 x 6
    images at size 4: the centre 4 x 4 (columns 1..4), valid = ground truth > 0, pixels pooled within each
    batch of 2 images (sorted names: [a, b], [c]), the batch values averaged; by hand. The same stored
    predictions scored by the eigen protocol (full size, Eigen crop, per image) give another delta1."""
    from fourm_eval.data.pngmap import write_png_map
    from fourm_eval.tasks import get_task
    from fourm_eval.tasks.kits.dense import score_folder

    nyu = get_task("nyu-depth")
    assert nyu.protocol_scoring("eigen") == {"procedure": "original", "metric": "eigen"}
    assert nyu.protocol_scoring("multimae") == {"procedure": "short-side-crop", "size": 256, "metric": "multimae",
                                                "batch": 96}
    gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
    gt_dir.mkdir(), pred_dir.mkdir()
    rng = np.random.default_rng(3)
    g_all, p_all = {}, {}
    for stem in ("c", "a", "b"):
        g = rng.uniform(1.0, 4.0, (4, 6)).round(3)
        g[rng.random((4, 6)) < 0.25] = 0.0                          # holes: not valid
        p = (g * rng.choice([0.9, 1.1, 1.3, 1.6, 2.0], size=(4, 6))).round(3)
        p[0, 2] = 0.0 if stem == "a" else p[0, 2]                   # a zero prediction: clamped to 1e-6
        g[1, 1] = 2.0 if g[1, 1] == 0 else g[1, 1]                  # every crop holds a valid pixel
        write_png_map(gt_dir / f"{stem}.png", np.rint(g * 1000).astype(np.uint16))
        write_png_map(pred_dir / f"{stem}.png", (p * 1000).round().astype(np.uint16))
        g_all[stem], p_all[stem] = g, p
    gt_files = {s: gt_dir / f"{s}.png" for s in g_all}

    def batch_value(stems):
        gs = np.concatenate([g_all[s][:, 1:5].ravel() for s in stems])
        ps = np.concatenate([p_all[s][:, 1:5].ravel() for s in stems])
        v = gs > 0
        g, p = gs[v], ps[v]
        ratio = np.maximum(p / g, g / np.maximum(p, 1e-6))
        return {"delta1": np.mean(ratio < 1.25), "abs_rel": np.mean(np.abs(p - g) / g),
                "rmse": math.sqrt(np.mean((p - g) ** 2)),
                "rmse_log": math.sqrt(np.mean((np.log(np.maximum(p, 1e-6)) - np.log(g)) ** 2))}

    want = {k: (batch_value(["a", "b"])[k] + batch_value(["c"])[k]) / 2 for k in ("delta1", "abs_rel", "rmse",
                                                                                  "rmse_log")}
    got = score_folder(nyu, pred_dir, gt_files, {"procedure": "short-side-crop", "size": 4, "metric": "multimae",
                                                 "batch": 2})[0]
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-9), k
    assert "log10" not in got  # MultiMAE's "log10" is rmse_log; no other log metric is claimed
    eigen = score_folder(nyu, pred_dir, gt_files, {"procedure": "original", "metric": "eigen"})[0]
    assert eigen["delta1"] == pytest.approx(np.mean([image_metrics(p_all[s], g_all[s])["delta1"]
                                                     for s in ("a", "b", "c")]))
    assert abs(eigen["delta1"] - got["delta1"]) > 1e-3, (eigen["delta1"], got["delta1"])
