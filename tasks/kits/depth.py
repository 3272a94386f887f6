"""The depth kit: monocular depth in metres on the dense kit (mmseg's ``DepthEstimator``).

A depth task declares its data (check, datasets, pipelines, ground-truth files) and footnote.
The kit supplies the model (backbone -> ``convnext`` or ``dpt`` head -> one channel -> softplus:
depth in metres, always positive; profile keys ``head`` and its section, ``loss``,
``berhu_threshold``), the losses, predictions stored as 16-bit PNGs of millimetres (0 = none) at
the image's full size, and the metric of ``fourm_eval.metrics_depth`` on the stored millimetres.
The head and the losses live in ``depth_head.py`` (torch; imported when a run registers them).

Heads: ``convnext``: MultiMAE's ConvNeXt adapter on the last block's tokens
(``tasks/dense_heads.py``), 1 output channel at stride 4; ``dpt`` (MultiMAE's NYUv2 head): DPT's
reassemble and fusion blocks on the last block of each quarter of the encoder, mmseg's
``DPTHead`` with 1 output channel, without batch norm (DPT's depth heads use none).

``linear`` (DINOv2's linear probe, with ``mode: linear``): ``tasks/kits/linear_head.py``: the last block's
tokens (or four blocks'), each with a global token (the mean of its patch tokens, in place of DINOv2's CLS),
upsampled x4, a 1x1 convolution to ``linear.n_bins`` bins uniform in [min_depth, max_depth]; the depth is the
mean of the bins under the normalised weights; loss ``sigloss`` (DINOv2's) with an optional gradient loss.

Losses: ``silog``: the scale-invariant log loss sqrt(mean d^2 - 0.5 (mean d)^2), d = log g -
log p, per image, averaged over the batch (mmseg's ``silog_loss``); ``berhu`` (MultiMAE's): the
reversed Huber loss with threshold c = ``berhu_threshold`` x the batch's largest absolute error,
|d| below c, (d^2 + c^2) / 2c above, averaged over the batch's valid pixels. Both use only
pixels whose ground truth lies in (1e-3, 10] m, the metric's range.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fourm_eval.errors import ConfigError

from ..base import Metric, RunContext
from ..schema import S
from .dense import (CONVNEXT_SETTINGS, LINEAR_SETTINGS, MODE_SETTING, DenseTask, batch_norm, frozen, head_section,
                    linear_blocks, quarter_blocks)

HEADS = ("convnext", "dpt", "linear")
DEPTH_TESTS = ("eigen", "center-crop")
LOSSES = ("silog", "berhu", "sigloss")  # sigloss: DINOv2's, with head linear (tasks/kits/linear_head.py)
PATCH = 16  # every backbone here has 16-pixel patches; test inputs are padded to a multiple of it


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], embed_dim: int,
                    num_layers: int | None = None) -> dict:
    head = p["head"]
    if head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if head == "linear":  # DINOv2's linear depth head on the last block or four blocks (tasks/kits/linear_head.py)
        if not num_layers:
            raise ConfigError("the linear head needs the backbone's number of blocks")
        out_indices = linear_blocks(p, num_layers)
        final_norm = bool(head_section(p, "linear")["final_norm"])
    elif head == "convnext":
        out_indices = [-1]  # the last block, with or without the encoder's final norm (recorded)
        final_norm = bool(head_section(p, "convnext")["final_norm"])
    else:
        if not num_layers:
            raise ConfigError("the dpt head needs the backbone's number of blocks")
        out_indices = quarter_blocks(num_layers)  # DPT: the last block of each quarter
        final_norm = False  # MultiMAE's DPT adapter reads the blocks without a norm
    if p["loss"] == "sigloss" and head != "linear":
        raise ConfigError("loss sigloss (DINOv2's) goes with head linear; the convnext and dpt heads take silog or "
                          "berhu")
    if head == "linear":
        c = head_section(p, "linear")
        decode_head = dict(type="FourmLinearDepthHead", in_channels=embed_dim, num_blocks=len(out_indices),
                           batch_norm=bool(c["batch_norm"]), global_token=bool(c.get("global_token", False)),
                           upsample=int(c["upsample"]), n_bins=int(c["n_bins"]), min_depth=float(c["min_depth"]),
                           max_depth=float(c["max_depth"]), norm_strategy=str(c["norm_strategy"]), loss=p["loss"],
                           berhu_threshold=float(p.get("berhu_threshold", 0.2)),
                           grad_loss_weight=float(p.get("grad_loss_weight", 0.0)),
                           sigloss_warmup_iters=int(p.get("sigloss_warmup_iters", 100)), norm_cfg=batch_norm())
    else:
        decode_head = dict(type="FourmDepthHead", head=head, in_channels=embed_dim, loss=p["loss"],
                           berhu_threshold=float(p.get("berhu_threshold", 0.2)), **{head: dict(head_section(p, head))})
    backbone = dict(type="FourmEvalViT", out_indices=out_indices, final_norm=final_norm, **backbone_cfg)
    if frozen(p):  # mode: linear (absent otherwise: the configs of earlier runs unchanged)
        backbone["frozen"] = True
    return dict(
        type="DepthEstimator",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=0, size_divisor=PATCH,
                               test_cfg=dict(size_divisor=PATCH)),  # 0 after normalisation, as everywhere here
        backbone=backbone,
        decode_head=decode_head,
        test_cfg=dict(mode="whole"),
    )



class DepthTask(DenseTask):
    """Monocular depth in metres, scored by the Eigen-convention metrics."""

    metric_prefix = "depth"
    pred_field = "pred_depth_map"
    gt_path_key = "depth_map_path"
    map_bits = 16
    metrics = (  # the Eigen-convention metrics (fourm_eval.metrics_depth)
        Metric("delta1", main=True, gated=True, description="share of pixels with max(p/g, g/p) < 1.25"),
        Metric("delta2", description="share of pixels with max(p/g, g/p) < 1.25^2"),
        Metric("delta3", description="share of pixels with max(p/g, g/p) < 1.25^3"),
        Metric("abs_rel", unit="ratio", higher_is_better=False, gated=True, description="mean |p - g| / g"),
        Metric("rmse", unit="m", higher_is_better=False, description="root mean squared error (metres), per image"),
        Metric("log10", unit="log10 units", higher_is_better=False,
               description="mean |log10 p - log10 g| (Eigen scoring only)"),
        Metric("rmse_log", unit="ln units", higher_is_better=False,
               description="sqrt(mean (ln p - ln g)^2), pixels pooled per batch (MultiMAE's scoring only, which "
                           "logs it as 'log10')"),
    )

    @property
    def metric_words(self) -> str:  # type: ignore[override]
        return "Eigen crop, ground truth in (0.001, 10] m, per-image mean (eigen) or MultiMAE's pooled-per-batch metric"
    settings = (
        S("image_size", "int", "training crop and test short side (square crops)", unit="px"),
        S("head", "str", "depth head", choices=HEADS),
        MODE_SETTING,
        *CONVNEXT_SETTINGS,
        *LINEAR_SETTINGS,
        S("linear.upsample", "int", "linear head: the features bilinearly upsampled by this factor before the 1x1 "
          "convolution (DINOv2: 4)", default=1),
        S("linear.n_bins", "int", "linear head: depth bins (the 1x1 convolution's outputs)"),
        S("linear.min_depth", "float", "linear head: the first bin's depth", unit="m"),
        S("linear.max_depth", "float", "linear head: the last bin's depth (bins uniform in between: DINOv2's 'UD')",
          unit="m"),
        S("linear.norm_strategy", "str", "linear head: logits -> bin weights (linear: relu + 0.1, normalised, "
          "AdaBins'; softmax; sigmoid, normalised)", choices=("linear", "softmax", "sigmoid")),
        S("dpt", "section", "the DPT head (mmseg's DPTHead, no batch norm; needed with head dpt)", default=None,
          null=True, per_size=False),
        S("dpt.channels", "int", "fusion channels"),
        S("dpt.post_process_channels", "list", "reassemble channels of the four levels", item="int", length=4),
        S("loss", "str", "training loss", choices=LOSSES),
        S("berhu_threshold", "float", "berHu: c = this x the batch's largest absolute error", default=0.2),
        S("sigloss_warmup_iters", "int", "sigloss: the first this many iterations use sqrt(0.15 mean(g)^2) only "
          "(DINOv2's warm_up, warm_iter)", default=100, unit="iter"),
        S("grad_loss_weight", "float", "sigloss: weight of the gradient loss added to it (DINOv2's GradientLoss, "
          "per image; 0: none)", default=0.0),
        S("test_procedure", "str", "eigen: short side to image_size, predicted at the full size, Eigen crop, per-image "
          "mean (BTS / mmseg); center-crop: short side to image_size, the centre square, scored there on "
          "nearest-resized depth, pixels pooled per batch of score_batch_size (MultiMAE)", choices=DEPTH_TESTS),
        S("score_batch_size", "int", "center-crop: images per scoring batch (MultiMAE: its validation batch)",
          default=None, null=True),
    )

    def scoring(self, p: dict[str, Any]) -> dict[str, Any]:
        if p["test_procedure"] == "center-crop":
            if not p.get("score_batch_size"):
                raise ConfigError("test_procedure center-crop needs score_batch_size (MultiMAE's: 96)")
            return {"procedure": "short-side-crop", "size": int(p["image_size"]), "metric": "multimae",
                    "batch": int(p["score_batch_size"])}
        return {"procedure": "original", "metric": "eigen"}

    def footnote_head(self, c: dict[str, Any]) -> str:
        if c.get("head") == "dpt":
            h = c.get("dpt") if isinstance(c.get("dpt"), dict) else {}
            head = f"DPT head ({h.get('channels', '?')} channels) over four blocks"
        elif c.get("head") == "linear":
            h = c.get("linear") if isinstance(c.get("linear"), dict) else {}
            grad = float(c.get("grad_loss_weight") or 0.0)
            return (f"{super().footnote_head(c)}: depth as the mean of {h.get('n_bins', '?')} uniform bins in "
                    f"[{h.get('min_depth', '?')}, {h.get('max_depth', '?')}] m ({h.get('norm_strategy', '?')} "
                    f"weights), features upsampled x{h.get('upsample', '?')}; {c.get('loss', '?')} loss"
                    + (f" + {grad} x gradient loss" if grad else ""))
        else:
            head = super().footnote_head(c)
        return f"{head}, softplus output in metres, {c.get('loss', '?')} loss"

    def register_mm(self) -> None:
        super().register_mm()
        from . import depth_head  # noqa: F401 - FourmDepthHead into mmseg's MODELS

    def model_cfg(self, ctx: RunContext) -> dict:
        n_layers = ctx.num_layers if ctx.profile["head"] in ("dpt", "linear") else None  # their blocks depend on it
        return build_model_cfg(ctx.profile, dict(ctx.backbone_cfg), ctx.embed_dim, n_layers)

    # predictions and metric: 16-bit PNGs of millimetres, scored as stored
    def encode(self, pred: np.ndarray) -> np.ndarray:
        from fourm_eval.data.nyu import metres_to_mm
        return metres_to_mm(pred)

    def read_ground_truth(self, path: Path) -> np.ndarray:
        from fourm_eval.data.nyu import read_depth_m
        return read_depth_m(path)

    def score_image(self, stored: np.ndarray, gt: np.ndarray, name: str, scoring: dict[str, Any]) -> dict[str, float]:
        from fourm_eval.data.nyu import MM_PER_M
        from fourm_eval.metrics_depth import image_metrics, multimae_sums
        pred = stored.astype(np.float64) / MM_PER_M
        if scoring.get("metric") == "multimae":
            return multimae_sums(pred, gt, name=name)
        return image_metrics(pred, gt, name=name)

    def summarize(self, per_image: dict[str, Any], scoring: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        from fourm_eval.metrics_depth import aggregate, multimae_aggregate
        if scoring.get("metric") == "multimae":
            return multimae_aggregate(per_image, int(scoring["batch"])), {}
        return aggregate(per_image), {}



__all__ = ["DEPTH_TESTS", "DepthTask", "HEADS", "LOSSES", "PATCH", "build_model_cfg"]
