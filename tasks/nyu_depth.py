"""NYUv2 monocular depth, on mmsegmentation 1.2's depth path.

Model: backbone (4M / DeiT III / MAE through ``build_backbone``) -> a dense head ->
one channel -> softplus: depth in metres, always positive. mmseg's ``DepthEstimator``
runs it (data preprocessing, whole-image inference, padding removed, prediction resized
to the image's full size).

Heads (``head`` in the profile, recorded):

* ``convnext`` (default; 4M-21 Appendix G uses a ConvNeXt head for NYUv2): MultiMAE's
  ConvNeXt adapter on the last block's tokens (``tasks/dense_heads.py``, shared with the
  segmentation task), 1 output channel at stride 4;
* ``dpt`` (MultiMAE's NYUv2 head): DPT's reassemble (tokens of the last block of each
  quarter of the encoder, projected and resampled x4, x2, x1, x0.5) and fusion blocks,
  mmseg's ``DPTHead`` with 1 output channel, without batch norm (DPT's depth heads use none).

Losses (``loss``, recorded): ``silog`` (default): the scale-invariant log loss
sqrt(mean d^2 - 0.5 (mean d)^2), d = log g - log p, per image, averaged over the batch
(mmseg's ``silog_loss``); ``berhu`` (MultiMAE's): the reversed Huber loss with threshold
c = ``berhu_threshold`` x the batch's largest absolute error, |d| below c, (d^2 + c^2) / 2c
above, averaged over the batch's valid pixels. Both use only pixels whose ground truth lies in
(1e-3, 10] m, the metric's range.

Data: the layout of ``fourm_eval.data.nyu`` (mmseg's NYUDataset: images/ + annotations/,
16-bit PNG depth in millimetres). Training: the image's short side resized to
``image_size``, a random ``image_size`` square crop, colour jitter (4M-21 Table 10), an
optional horizontal flip. Test: the short side resized to ``image_size`` and padded to a
multiple of the patch size (0 after normalisation); the prediction is resized back to the
image's full size.

Metric: ``fourm_eval.metrics_depth`` (Eigen crop scaled to the image size, ground truth in
(1e-3, 10] m, predictions clipped to it, per image then averaged over images).
Predictions: one 16-bit PNG per test image in millimetres, full size, named like the image
(``NAME.png``); they are what is scored, in the run and by ``fourm-eval evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import BaseModule
from mmengine.registry import DATASETS, METRICS, MODELS

from fourm_eval.errors import ConfigError

from .mmreg import register as mm_register
from .base import Log, Metric, PreparedData, Progress, RunContext, Task

HEADS = ("convnext", "dpt")
LOSSES = ("silog", "berhu")
PATCH = 16  # every backbone here has 16-pixel patches; test inputs are padded to a multiple of it
METRIC_PREFIX = "depth"


# ------------------------------------------------------------------ losses
def valid_mask(gt: torch.Tensor) -> torch.Tensor:
    from fourm_eval.metrics_depth import MAX_DEPTH, MIN_DEPTH
    return (gt > MIN_DEPTH) & (gt <= MAX_DEPTH)


def silog(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Scale-invariant log loss (lambda 0.5) per image over its valid pixels, mean over the images
    that have any (mmseg's ``silog_loss``); 0 (with a graph) for a batch without valid pixels."""
    from mmseg.models.losses.silog_loss import silog_loss

    from fourm_eval.metrics_depth import MIN_DEPTH

    mask = valid_mask(gt)
    keep = mask.flatten(1).any(1)
    if not keep.any():
        return pred.sum() * 0.0
    target = torch.where(mask, gt, torch.zeros_like(gt))  # silog_loss scores target > eps only
    return silog_loss(pred[keep], target[keep], eps=MIN_DEPTH, reduction="mean")


def berhu(pred: torch.Tensor, gt: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """Reversed Huber loss over the batch's valid pixels, c = threshold x max |pred - gt| (no gradient
    through c)."""
    mask = valid_mask(gt)
    if not mask.any():
        return pred.sum() * 0.0
    d = (pred - gt)[mask].abs()
    c = (threshold * d.max()).detach()
    if float(c) <= 0:  # every error is 0
        return d.mean()
    return torch.where(d <= c, d, (d * d + c * c) / (2 * c)).mean()


# -------------------------------------------------------------------- head
@mm_register(MODELS)
class FourmDepthHead(BaseModule):
    """A dense head with one output channel and a softplus: depth in metres.

    The interface mmseg's ``DepthEstimator`` calls (``loss``, ``predict``, ``align_corners``,
    ``num_classes``, ``out_channels``); the head itself is ``ConvNeXtTokenHead``
    (``tasks/dense_heads.py``) or mmseg's ``DPTHead``."""

    def __init__(self, head: str, in_channels: int, loss: str = "silog", berhu_threshold: float = 0.2,
                 convnext: dict | None = None, dpt: dict | None = None, init_cfg: Any = None):
        super().__init__(init_cfg=init_cfg)
        if head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
        if loss not in LOSSES:
            raise ConfigError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
        self.kind, self.loss_kind, self.berhu_threshold = head, loss, float(berhu_threshold)
        self.align_corners, self.num_classes, self.out_channels = False, 1, 1
        if head == "convnext":
            from .dense_heads import ConvNeXtTokenHead
            c = dict(convnext or {})
            self.head = ConvNeXtTokenHead(in_channels, 1, decoder_dim=int(c["decoder_dim"]),
                                          preds_per_patch=int(c["preds_per_patch"]), depth=int(c["depth"]))
        else:
            from mmengine.registry import DefaultScope
            from mmseg.models.decode_heads.dpt_head import DPTHead
            c = dict(dpt or {})
            # DPTHead builds its loss from mmseg's registry; a process whose default scope is another
            # library's (e.g. after a coco-det run in the same process) must not redirect that lookup
            with DefaultScope.overwrite_default_scope("mmseg"):
                self.head = DPTHead(in_channels=[in_channels] * 4, in_index=[0, 1, 2, 3],
                                    input_transform="multiple_select", channels=int(c["channels"]),
                                    embed_dims=in_channels, post_process_channels=[int(v) for v in
                                                                                  c["post_process_channels"]],
                                    readout_type="ignore", patch_size=PATCH, num_classes=1, out_channels=1,
                                    threshold=0.5, norm_cfg=None, dropout_ratio=0.0, align_corners=False,
                                    loss_decode=dict(type="SiLogLoss"))  # unused: the loss is computed here

    def forward(self, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Backbone maps -> (B, 1, h, w) depth in metres at the head's resolution."""
        if self.kind == "convnext":
            raw = self.head(inputs[-1])
        else:  # DPTHead takes (feature map, class token) pairs; the token is unused ("ignore" readout)
            raw = self.head([[x, None] for x in inputs])
        return F.softplus(raw)

    def loss(self, inputs: Sequence[torch.Tensor], batch_data_samples: list, train_cfg: Any = None) -> dict:
        gt = torch.stack([ds.gt_depth_map.data for ds in batch_data_samples]).float()
        pred = F.interpolate(self.forward(inputs), size=gt.shape[-2:], mode="bilinear", align_corners=False)
        if self.loss_kind == "silog":
            return {"loss_depth": silog(pred, gt)}
        return {"loss_depth": berhu(pred, gt, self.berhu_threshold)}

    def predict(self, inputs: Sequence[torch.Tensor], batch_img_metas: list[dict], test_cfg: Any = None) -> torch.Tensor:
        """Depth resized to the (padded) network input; ``DepthEstimator`` removes the padding and
        resizes to the image's full size."""
        meta = batch_img_metas[0]
        size = meta.get("pad_shape", meta["img_shape"])[:2]
        return F.interpolate(self.forward(inputs), size=tuple(int(s) for s in size), mode="bilinear",
                             align_corners=False)


# ---------------------------------------------------------------- dataset
def _register_dataset() -> None:
    from mmseg.datasets import NYUDataset

    class FourmNYUDataset(NYUDataset):
        """mmseg's NYUDataset restricted to the checked pairs (``names``: the file stems the data check
        kept; pairs it skipped with --skip-bad-images are left out)."""

        def __init__(self, names: Sequence[str] | None = None, **kwargs: Any):
            self._names = set(names) if names is not None else None
            super().__init__(**kwargs)

        def load_data_list(self) -> list[dict]:
            items = super().load_data_list()
            if self._names is None:
                return items
            return [d for d in items if Path(d["img_path"]).stem in self._names]

    mm_register(DATASETS, "FourmNYUDataset")(FourmNYUDataset)


# ------------------------------------------------------------------ metric
@mm_register(METRICS)
class FourmDepthMetric(BaseMetric):
    """The Eigen-convention metrics of ``fourm_eval.metrics_depth`` on the saved predictions.

    Each prediction is rounded to whole millimetres as the 16-bit PNG stores it, written to
    ``predictions_dir`` (when given) and scored from those millimetres against the ground-truth
    file, so ``fourm-eval evaluate`` on the folder gives the same numbers."""

    default_prefix = METRIC_PREFIX

    def __init__(self, predictions_dir: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.predictions_dir = predictions_dir

    def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
        from fourm_eval.data.nyu import MM_PER_M, metres_to_mm, read_depth_m, write_depth_mm
        from fourm_eval.metrics_depth import image_metrics

        for ds in data_samples:
            pred = ds["pred_depth_map"]["data"].squeeze(0).float().cpu().numpy()
            mm = metres_to_mm(pred)
            name = Path(ds["img_path"]).stem
            if self.predictions_dir:
                write_depth_mm(Path(self.predictions_dir) / f"{name}.png", mm)
            gt = read_depth_m(ds["depth_map_path"])
            self.results.append((name, image_metrics(mm.astype(np.float64) / MM_PER_M, gt, name=name)))

    def compute_metrics(self, results: list) -> dict[str, float]:
        from fourm_eval.metrics_depth import aggregate
        return aggregate(dict(results))


def evaluate_folder(predictions: Path, data_root: Path) -> dict[str, float]:
    """Score a folder of 16-bit millimetre PNGs (one per test image, ``NAME.png``) against
    ``data_root``'s test split; named errors for missing, extra, 8-bit or mis-sized files."""
    from fourm_eval.data.nyu import DEPTH_SUFFIX, MM_PER_M, NyuDataError, depth_dir, list_split, read_depth_m, \
        read_depth_mm
    from fourm_eval.metrics_depth import aggregate, image_metrics

    predictions = Path(predictions)
    if not predictions.is_dir():
        raise NyuDataError(f"{predictions}: not a folder; NYUv2 predictions are a folder of 16-bit PNGs in "
                           "millimetres, one per test image, named like the image (NAME.png)")
    names, _ = list_split(Path(data_root), "test")
    # meta.json: what the files are (the run's iteration, final or not), written beside them by fourm-eval
    have = {p.stem: p for p in predictions.iterdir() if p.is_file() and not p.name.startswith(".")
            and p.name != "meta.json"}
    not_png = sorted(p.name for p in have.values() if p.suffix != DEPTH_SUFFIX)
    if not_png:
        raise NyuDataError(f"{predictions}: {len(not_png)} file(s) that are not .png predictions, e.g. {not_png[:3]}")
    missing = sorted(set(names) - set(have))
    if missing:
        raise NyuDataError(f"{predictions}: no prediction for {len(missing)} of the {len(names)} test images, e.g. "
                           f"{[n + DEPTH_SUFFIX for n in missing[:3]]}")
    extra = sorted(set(have) - set(names))
    if extra:
        raise NyuDataError(f"{predictions}: {len(extra)} prediction(s) for no test image of {data_root}, e.g. "
                           f"{[n + DEPTH_SUFFIX for n in extra[:3]]}")
    per = {}
    for name in names:
        gt = read_depth_m(depth_dir(Path(data_root), "test") / f"{name}{DEPTH_SUFFIX}")
        pred = read_depth_mm(have[name])
        if pred.shape != gt.shape:
            raise NyuDataError(f"{have[name]}: prediction is {pred.shape[1]}x{pred.shape[0]} (width x height), the "
                               f"test image {gt.shape[1]}x{gt.shape[0]}; predictions are at the image's full size")
        per[name] = image_metrics(pred.astype(np.float64) / MM_PER_M, gt, name=str(have[name]))
    return aggregate(per)


# ------------------------------------------------------------------ config
def dpt_blocks(depth: int) -> list[int]:
    """DPT's four blocks: the last of each quarter of the encoder (2, 5, 8, 11 for 12 blocks)."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def build_pipelines(p: dict[str, Any]) -> tuple[list, list]:
    s = int(p["image_size"])
    big = 1 << 16  # no cap on the long side: the short side alone sets the scale
    train: list[dict] = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadDepthAnnotation", depth_rescale_factor=1e-3),  # millimetres -> metres
        dict(type="ResizeShortestEdge", scale=s, max_size=big),       # depth resized nearest (no blending of holes)
        dict(type="RandomCrop", crop_size=s),
    ]
    if p.get("hflip"):
        train.append(dict(type="RandomFlip", prob=0.5, direction="horizontal"))
    if p.get("color_jitter"):
        train.append(dict(type="PhotoMetricDistortion"))
    train.append(dict(type="PackSegInputs"))
    test = [dict(type="LoadImageFromFile"),
            dict(type="ResizeShortestEdge", scale=s, max_size=big),
            dict(type="PackSegInputs", meta_keys=("img_path", "depth_map_path", "ori_shape", "img_shape",
                                                  "scale_factor"))]
    return train, test


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], embed_dim: int,
                    num_layers: int | None = None) -> dict:
    head = p["head"]
    if head not in HEADS:
        raise ConfigError(f"head must be one of {', '.join(HEADS)}, not {head!r}")
    if head == "convnext":
        out_indices = [-1]  # the last block, without the encoder's final norm (MultiMAE's adapters)
    else:
        if not num_layers:
            raise ConfigError("the dpt head needs the backbone's number of blocks")
        out_indices = dpt_blocks(num_layers)
    return dict(
        type="DepthEstimator",
        data_preprocessor=dict(type="SegDataPreProcessor", mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375],
                               bgr_to_rgb=True, pad_val=0, seg_pad_val=0, size_divisor=PATCH,
                               test_cfg=dict(size_divisor=PATCH)),  # 0 after normalisation, as everywhere here
        backbone=dict(type="FourmEvalViT", out_indices=out_indices, final_norm=False, **backbone_cfg),
        decode_head=dict(type="FourmDepthHead", head=head, in_channels=embed_dim, loss=p["loss"],
                         berhu_threshold=float(p["berhu_threshold"]), convnext=dict(p["convnext"]),
                         dpt=dict(p["dpt"])),
        test_cfg=dict(mode="whole"),
    )


# --------------------------------------------------------------------- task
class NyuDepth(Task):
    name = "nyu-depth"
    title = "NYUv2 monocular depth (ConvNeXt or DPT head, Eigen-crop metrics, mmseg)"
    data_kind = "nyu"
    metrics = (
        Metric("delta1", main=True, gated=True, description="share of pixels with max(p/g, g/p) < 1.25"),
        Metric("delta2", description="share of pixels with max(p/g, g/p) < 1.25^2"),
        Metric("delta3", description="share of pixels with max(p/g, g/p) < 1.25^3"),
        Metric("abs_rel", unit="ratio", higher_is_better=False, gated=True, description="mean |p - g| / g"),
        Metric("rmse", unit="m", higher_is_better=False, description="root mean squared error (metres), per image"),
        Metric("log10", unit="log10 units", higher_is_better=False, description="mean |log10 p - log10 g|"),
    )
    requires = ("torch", "timm", "mmengine", "mmcv", "mmcv ops", "mmsegmentation")
    prediction_format = ("one 16-bit PNG per test image, depth in millimetres (0 = none), at the image's full size, "
                         "named like the image (NAME.png)")
    mm_scope = "mmseg"

    # data
    def make_mini(self, out: Path, seed: int = 0) -> Path:
        from fourm_eval.data.nyu_mini import make_mini_nyu
        return make_mini_nyu(out, seed=seed)

    def default_data_root(self) -> Path:
        from fourm_eval.data.nyu_mini import default_mini_nyu
        return default_mini_nyu()

    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.nyu import layout_digest
        return {"files_sha256": layout_digest(root)}

    def convert(self, sources: list[Path], out: Path, log: Log) -> Path:
        from fourm_eval.data.nyu_convert import convert_nyu
        if len(sources) != 2:
            raise ConfigError("nyu: expected two source files, nyu_depth_v2_labeled.mat and splits.mat "
                              f"(got {len(sources)})")
        return convert_nyu(sources[0], sources[1], out, log=log)

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data.nyu import DEPTH_SUFFIX, NyuDataError, check_split, depth_dir, median_depth_m, \
            read_depth_m, split_record
        from fourm_eval.metrics_depth import constant_prediction_metrics

        checks = {}
        for split in ("train", "test"):
            label = f"checking {split}"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            checks[split] = c = check_split(root, split, skip_bad=skip_bad_images, histogram=split == "train",
                                            progress=cb)
            log(f"{root / 'images' / split}: {c.n_images} image/depth pairs ({', '.join(c.image_sizes)}), every file "
                "decodes" + (f"; {len(c.bad)} unusable pair(s) skipped" if c.bad else ""))
        test = checks["test"]
        if len(test.image_sizes) > 1 and int(p.get("val_batch_size", 1)) > 1:
            raise NyuDataError(f"{root / 'images' / 'test'}: test images of several sizes {sorted(test.image_sizes)} "
                               f"cannot share a batch; use --set val_batch_size=1")
        median = median_depth_m(checks["train"].depth_hist)
        gts = ((n, read_depth_m(depth_dir(root, "test") / f"{n}{DEPTH_SUFFIX}")) for n in test.names)
        baseline = constant_prediction_metrics(median, gts)
        log(f"predicting the training median ({median:.3f} m) everywhere scores delta1 {baseline['delta1']:.4f} "
            "on the test split (the baseline a trained model must beat)")
        record = {"root": str(root), "files_sha256": self.data_identity(root)["files_sha256"],
                  "n_train_images": checks["train"].n_images, "n_val_images": test.n_images,
                  "splits": {s: split_record(c) for s, c in checks.items()},
                  "skipped_bad_images": sum(len(c.bad) for c in checks.values()),
                  "train_median_baseline": {"median_depth_m": median, "metrics": baseline,
                                            "what": "predicting the median of the valid training depths at every "
                                                    "pixel, scored with the task's metric on the test split"}}
        return PreparedData(root, checks["train"].n_images, test.n_images, record, private={"checks": checks})

    # model and runner
    def register_mm(self) -> None:
        register()

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        p, data, backbone_cfg, embed_dim = ctx.profile, ctx.data, ctx.backbone_cfg, ctx.embed_dim
        predictions_dir = ctx.predictions_dir
        checks = data.private["checks"]
        train_pipe, test_pipe = build_pipelines(p)
        bcfg = dict(backbone_cfg)
        n_layers = ctx.num_layers if p["head"] == "dpt" else None  # DPT's blocks depend on the depth
        root = str(data.root)

        def ds(split: str, pipe: list, test_mode: bool) -> dict:
            c = checks[split]
            return dict(type="FourmNYUDataset", data_root=root, img_suffix=c.img_suffix, depth_map_suffix=".png",
                        data_prefix=dict(img_path=f"images/{split}", depth_map_path=f"annotations/{split}"),
                        names=list(c.names), test_mode=test_mode, pipeline=pipe, backend_args=None)

        return dict(model=build_model_cfg(p, bcfg, embed_dim, n_layers), train_dataset=ds("train", train_pipe, False),
                    val_dataset=ds("test", test_pipe, True),
                    val_evaluator=dict(type="FourmDepthMetric",
                                       predictions_dir=str(predictions_dir) if predictions_dir else None))

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        from fourm_eval.data.nyu import NyuDataError
        for loader, split in ((runner.train_dataloader, "train"), (runner.val_dataloader, "test")):
            got = sorted(Path(d["img_path"]).stem for d in loader.dataset.load_data_list())
            if got != data.private["checks"][split].names:
                raise NyuDataError(f"{split}: mmseg's dataset lists {len(got)} pairs, the data check kept "
                                   f"{len(data.private['checks'][split].names)}; they must be the same")

    # metrics and predictions
    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix(METRIC_PREFIX + "/"): float(v) for k, v in evaluator_out.items()}

    def evaluate(self, predictions: Path, data_root: Path) -> dict[str, float]:
        return evaluate_folder(predictions, data_root)

    def footnote(self, record: dict[str, Any]) -> str:
        c = record.get("config", {})
        sch = c.get("schedule_resolved", {})
        head = c.get("head", "?")
        hd = c.get(head, {}) if isinstance(c.get(head), dict) else {}
        head_txt = (f"ConvNeXt head (decoder dim {hd.get('decoder_dim', '?')}, {hd.get('preds_per_patch', '?')} "
                    f"predictions per patch, {hd.get('depth', '?')} blocks) on the last block" if head == "convnext"
                    else f"DPT head ({hd.get('channels', '?')} channels) over four blocks" if head == "dpt"
                    else f"{head} head")
        aug = ["random crop"] + (["colour jitter"] if c.get("color_jitter") else []) + \
            (["horizontal flip"] if c.get("hflip") else [])
        return (f"{self.name} / {record.get('profile')}: {head_txt}, softplus output in metres, {c.get('loss', '?')} "
                f"loss; {c.get('image_size', '?')} px crops ({', '.join(aug)}), tested at short side "
                f"{c.get('image_size', '?')}; {sch.get('max_iters', '?')} iterations at batch {sch.get('eff_batch', '?')}"
                f", {c.get('schedule', {}).get('decay', 'step')} decay; full fine-tuning; layer decay "
                f"{c.get('layer_decay', '?')}, drop path {c.get('drop_path', '?')}; Eigen crop, ground truth in "
                "(0.001, 10] m, per-image mean; final model (not best-on-test)")


def register() -> None:
    """mmseg's modules in its registries, the shared mm modules, the dataset (idempotent)."""
    from mmseg.utils import register_all_modules

    from . import mm  # noqa: F401 - the backbone adapter, optimiser constructor and hooks

    register_all_modules(init_default_scope=True)
    _register_dataset()


TASK = NyuDepth()
