"""COCO detection + instance segmentation, ViTDet style, on mmdet 3.3.

Model: backbone (4M / DeiT III / MAE through ``build_backbone``) -> tokens of
the last block as a stride-16 map -> simple feature pyramid (ViTDet: deconv x4,
deconv x2, identity, max-pool x1/2, each followed by 1x1 and 3x3 convs with
LayerNorm, plus a stride-64 level by max-pooling the coarsest output) ->
mmdet Mask R-CNN (or Cascade Mask R-CNN) with ViTDet's normed heads
(RPN with 2 convs, 4-conv + 1-fc box head, LayerNorm in convs).

Attention default: global in every block, for every backbone. ViTDet uses
windowed blocks with relative position biases; 4M has an absolute sin-cos
embedding and no rel-pos tables, and timm's ViTs have no windowed blocks, so
global attention is the one choice that keeps the recipe identical for 4M,
DeiT III and MAE. ``attention: window`` (4M only) is recorded in result.json.

Data: the COCO 2017 layout, checked by ``fourm_eval.data.coco_check``.
Metric: box / mask AP with pycocotools' COCOeval (``fourm_eval.metrics_coco``).
Predictions: the COCO results format the evaluation server takes, one file per
IoU type (``coco_results.bbox.json``, ``coco_results.segm.json``, RLE masks),
plus ``meta.json`` naming the evaluated image ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fourm_eval.errors import ConfigError

from .mmreg import once, register as mm_register
from .schema import S, SUBSET_SETTINGS
from .base import Log, Metric, PreparedData, Progress, RunContext, Task

STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
RESULT_FILES = {"bbox": "coco_results.bbox.json", "segm": "coco_results.segm.json"}


def write_predictions(out: Path, dets: list[dict], segs: list[dict] | None, img_ids: list[int]) -> None:
    from fourm_eval.results import atomic_write_json

    from .runs import update_predictions_meta
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RESULT_FILES["bbox"], dets)
    if segs is not None:
        atomic_write_json(out / RESULT_FILES["segm"], segs)
    # merged: the run's ``evaluation`` section (iteration, complete) is kept
    update_predictions_meta(out, {"format": "COCO results (one file per IoU type)", "image_ids": img_ids})


# ------------------------------------------------------------------ config
def _norm() -> dict:
    return dict(type="FourmLN2d", requires_grad=True)


def build_model_cfg(p: dict[str, Any], backbone_cfg: dict[str, Any], embed_dim: int, num_classes: int) -> dict:
    ch = p["neck_channels"]
    head = p["head"]
    strides = [4, 8, 16, 32, 64]
    # ViTDet's box head: 4 convs (LayerNorm) + 1 fc; "2fc" is the lighter classic head (smoke runs)
    if head.get("bbox_head", "4conv1fc") == "4conv1fc":
        box_type = dict(type="Shared4Conv1FCBBoxHead", conv_out_channels=ch, norm_cfg=_norm())
    elif head["bbox_head"] == "2fc":
        box_type = dict(type="Shared2FCBBoxHead")
    else:
        raise ConfigError(f"head.bbox_head must be 4conv1fc or 2fc, not {head['bbox_head']!r}")
    bbox_head = dict(**box_type, in_channels=ch,
                     fc_out_channels=head["fc_channels"], roi_feat_size=7, num_classes=num_classes,
                     bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4,
                                     target_stds=[0.1, 0.1, 0.2, 0.2]),
                     reg_class_agnostic=False,
                     loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
                     loss_bbox=dict(type="L1Loss", loss_weight=1.0))  # smooth-L1 with beta 0 (ViTDet) == L1
    # mmdet's FCNMaskHead, its CPU mask pasting batched (same masks; tasks/mask_paste.py)
    mask_head = dict(type="FourmFCNMaskHead", num_convs=head["mask_convs"], in_channels=ch, conv_out_channels=ch,
                     num_classes=num_classes, norm_cfg=_norm(),
                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    roi_extract = lambda size: dict(type="SingleRoIExtractor",  # noqa: E731
                                    roi_layer=dict(type="RoIAlign", output_size=size, sampling_ratio=0),
                                    out_channels=ch, featmap_strides=strides[:4])
    # RoIs with IoU in [rcnn_neg_iou, thr) are ignored (neither positive nor background); paper: none
    neg_gap = float(head["rcnn_neg_iou_gap"])
    rcnn_train = lambda thr: dict(  # noqa: E731
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=thr, neg_iou_thr=thr - neg_gap, min_pos_iou=thr,
                      match_low_quality=bool(head["rcnn_match_low_quality"]), ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=head["rcnn_samples"], pos_fraction=float(head["rcnn_pos_fraction"]),
                     neg_pos_ub=-1,
                     add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False)
    if p["detector"] == "mask_rcnn":
        roi_head = dict(type="StandardRoIHead", bbox_roi_extractor=roi_extract(7), bbox_head=bbox_head,
                        mask_roi_extractor=roi_extract(14), mask_head=mask_head)
        rcnn_cfg: Any = rcnn_train(0.5)
        det_type = "MaskRCNN"
    elif p["detector"] == "cascade_mask_rcnn":
        stages = []
        for stds in ([0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]):
            h = json.loads(json.dumps(bbox_head))
            h["bbox_coder"]["target_stds"] = stds
            h["reg_class_agnostic"] = True
            stages.append(h)
        roi_head = dict(type="CascadeRoIHead", num_stages=3, stage_loss_weights=[1, 0.5, 0.25],
                        bbox_roi_extractor=roi_extract(7), bbox_head=stages,
                        mask_roi_extractor=roi_extract(14), mask_head=mask_head)
        rcnn_cfg = [rcnn_train(t) for t in (0.5, 0.6, 0.7)]
        det_type = "CascadeRCNN"
    else:
        raise ConfigError(f"detector must be mask_rcnn or cascade_mask_rcnn, not {p['detector']!r}")
    return dict(
        type=det_type,
        data_preprocessor=dict(type="DetDataPreprocessor", mean=[123.675, 116.28, 103.53],
                               std=[58.395, 57.12, 57.375], bgr_to_rgb=True, pad_mask=True,
                               pad_size_divisor=p["image_size"], pad_value=0),  # 0 after normalisation
        backbone=dict(type="FourmEvalViT", **backbone_cfg),
        neck=dict(type="SimpleFeaturePyramid", in_channels=embed_dim, out_channels=ch, num_outs=5),
        rpn_head=dict(type="RPNHead", in_channels=ch, feat_channels=ch, num_convs=2,
                      anchor_generator=dict(type="AnchorGenerator", scales=[8], ratios=[0.5, 1.0, 2.0],
                                            strides=strides),
                      bbox_coder=dict(type="DeltaXYWHBBoxCoder", target_means=[0.0] * 4, target_stds=[1.0] * 4),
                      loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=1.0),
                      loss_bbox=dict(type="L1Loss", loss_weight=1.0)),
        roi_head=roi_head,
        train_cfg=dict(
            rpn=dict(assigner=dict(type="MaxIoUAssigner", pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                                   match_low_quality=True, ignore_iof_thr=-1),
                     sampler=dict(type="RandomSampler", num=head["rpn_samples"], pos_fraction=0.5, neg_pos_ub=-1,
                                  add_gt_as_proposals=False),
                     allowed_border=-1, pos_weight=-1, debug=False),
            rpn_proposal=dict(nms_pre=head["rpn_pre_nms"], max_per_img=head["rpn_post_nms"],
                              nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=rcnn_cfg),
        test_cfg=dict(
            rpn=dict(nms_pre=head["rpn_pre_nms_test"], max_per_img=head["rpn_post_nms_test"],
                     nms=dict(type="nms", iou_threshold=0.7), min_bbox_size=0),
            rcnn=dict(score_thr=0.05, nms=dict(type="nms", iou_threshold=0.5), max_per_img=100,
                      mask_thr_binary=0.5)),
    )


def build_pipelines(p: dict[str, Any]) -> tuple[list, list]:
    s = p["image_size"]
    lo, hi = p["lsj_scale"]
    train = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomFlip", prob=0.5),
        # large-scale jitter: resize the long side to s * U(lo, hi), crop/pad to s x s
        dict(type="RandomResize", scale=(s, s), ratio_range=(lo, hi), keep_ratio=True),
        dict(type="RandomCrop", crop_type="absolute_range", crop_size=(s, s), recompute_bbox=True,
             allow_negative_crop=True),
        dict(type="FilterAnnotations", min_gt_bbox_wh=(1e-2, 1e-2)),
        # no Pad here: train and test are padded alike by the data preprocessor, to s x s with 0
        # after normalisation (ViTDet's rule)
        dict(type="PackDetInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(s, s), keep_ratio=True),  # padded to s x s by the data preprocessor
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    return train, test


def _global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks: the last of each quarter (2, 5, 8, 11 for 12 blocks)."""
    return sorted({depth * k // 4 - 1 for k in range(1, 5)})


# --------------------------------------------------------------------- task
class CocoDet(Task):
    name = "coco-det"
    title = "COCO detection + instance segmentation (ViTDet-style Mask R-CNN, mmdet)"
    data_kind = "coco"
    mini_data = "fourm_eval.data.coco_mini"
    reference_train_images = 118287    # COCO train2017
    metrics = tuple(
        [Metric(f"box_{s}", main=s == "AP", gated=s in ("AP", "AP50"), description=f"box {s} (COCOeval)")
         for s in STATS]
        + [Metric(f"mask_{s}", main=s == "AP", gated=s == "AP", description=f"mask {s} (COCOeval)") for s in STATS])
    requires = ("torch", "timm", "mmengine", "mmcv", "mmcv ops", "mmdet", "pycocotools")
    prediction_format = ("COCO results json per IoU type (coco_results.bbox.json, coco_results.segm.json with RLE "
                         "masks; original category ids), as the COCO evaluation server takes")
    mm_scope = "mmdet"
    settings = SUBSET_SETTINGS + (
        S("image_size", "int", "square input (LSJ crop, padded test images)", unit="px"),
        S("detector", "str", "ViTDet's detector", choices=("mask_rcnn", "cascade_mask_rcnn")),
        S("lsj_scale", "list", "large-scale jitter scale range", item="float", length=2),
        S("attention", "str", "backbone attention: global in every block, or ViTDet's windows with global "
          "blocks at each quarter", default="global", choices=("global", "window")),
        S("window_size", "int", "window attention: window side", unit="tokens"),
        S("neck_channels", "int", "simple feature pyramid channels"),
        S("head", "section", "the R-CNN heads", per_size=False),
        S("head.bbox_head", "str", "box head", choices=("4conv1fc", "2fc")),
        S("head.fc_channels", "int", "box head fc width"),
        S("head.mask_convs", "int", "mask head convolutions"),
        S("head.rpn_samples", "int", "RPN anchors sampled per image"),
        S("head.rcnn_samples", "int", "RoIs sampled per image"),
        S("head.rcnn_pos_fraction", "float", "share of positives among sampled RoIs", default=0.25),
        S("head.rcnn_neg_iou_gap", "float", "RoIs with IoU in [0.5 - gap, 0.5) are ignored", default=0.0),
        S("head.rcnn_match_low_quality", "bool", "R-CNN assigner: a ground-truth box with no RoI above the IoU "
          "threshold takes its best RoI as positive (mmdet's Mask R-CNN: true; detectron2: false)"),
        S("head.rpn_pre_nms", "int", "training proposals before NMS"),
        S("head.rpn_post_nms", "int", "training proposals after NMS"),
        S("head.rpn_pre_nms_test", "int", "test proposals before NMS"),
        S("head.rpn_post_nms_test", "int", "test proposals after NMS"),
    )

    # data
    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.coco_check import annotation_digest
        return {"annotations_sha256": {s: annotation_digest(root, s) for s in ("train", "val")}}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        subsets = {s: p.get(f"{s}_subset") for s in ("train", "val")}
        checks, classes, cat_ids = check_data(root, skip_bad_images, out_dir,
                                              ann_sha256=self.data_identity(root)["annotations_sha256"], log=log,
                                              progress=progress, subsets=subsets,
                                              subset_seed=int(p.get("subset_seed", 0)))
        n_train = checks["train"].n_images
        record = {"root": str(root), "annotations_sha256": {s: c.ann_sha256 for s, c in checks.items()},
                  "n_train_images": n_train, "n_val_images": checks["val"].n_images,
                  "skipped_bad_images": sum(len(c.bad_images) for c in checks.values()), "classes": classes,
                  "subsets": {s: {"n": len(c.subset_ids), "seed": int(p.get("subset_seed", 0)),
                                  "ids_file": f"data/{s}_subset_ids.json"}
                              for s, c in checks.items() if c.subset_ids is not None}}
        return PreparedData(root, n_train, checks["val"].n_images, record,
                            private={"checks": checks, "classes": classes, "cat_ids": cat_ids})

    # model and runner
    def backbone_options(self, p: dict[str, Any], backbone: str, info: dict[str, Any]) -> dict[str, Any]:
        attention = p.get("attention", "global")
        if attention == "global":
            return {}
        if attention != "window":
            raise ConfigError(f"attention must be 'global' or 'window', not {attention!r}")
        if not backbone.startswith("4m"):
            raise ConfigError("attention: window is implemented for 4M backbones only (timm's ViT has no "
                              "windowed blocks); use attention: global for the baselines")
        return {"window_size": int(p["window_size"]), "global_blocks": _global_blocks(info["num_layers"])}

    def register_mm(self) -> None:
        register()

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        p, data, backbone_cfg, embed_dim = ctx.profile, ctx.data, ctx.backbone_cfg, ctx.embed_dim
        predictions_dir = ctx.predictions_dir
        checks, classes, cat_ids = (data.private[k] for k in ("checks", "classes", "cat_ids"))
        train_ann = checks["train"].used_ann_file or checks["train"].ann_file
        val_ann = checks["val"].used_ann_file or checks["val"].ann_file
        return datasets_and_model(p, backbone_cfg=backbone_cfg, embed_dim=embed_dim, data_root=data.root,
                                  train_ann=train_ann, val_ann=val_ann, classes=classes, cat_ids=cat_ids,
                                  predictions_dir=predictions_dir)

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        cat_ids = data.private["cat_ids"]
        check_label_order(runner.train_dataloader.dataset, cat_ids, "train")
        check_label_order(runner.val_dataloader.dataset, cat_ids, "val")

    # metrics and predictions
    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix("coco/"): float(v) for k, v in evaluator_out.items()}

    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        if protocol is not None and log:
            log(f"{self.name}: every protocol scores alike (COCO AP); --protocol {protocol} changes nothing")
        from fourm_eval.metrics_coco import evaluate_files
        from fourm_eval.data.coco_check import annotation_file
        return evaluate_files(predictions, annotation_file(Path(data_root), "val"), RESULT_FILES)

    def footnote(self, record: dict[str, Any]) -> str:
        c = record.get("config", {})
        sch = c.get("schedule_resolved", {})
        return (f"{self.name} / {record.get('profile')}: {c.get('detector', '?')} + ViTDet simple feature pyramid "
                f"({c.get('attention', 'global')} attention); {c.get('image_size', '?')} px, large-scale jitter "
                f"{c.get('lsj_scale', '?')}; {sch.get('max_iters', '?')} iterations at batch "
                f"{sch.get('eff_batch', '?')}; full fine-tuning; layer decay {c.get('layer_decay', '?')}, drop path "
                f"{c.get('drop_path', '?')}; box/mask AP by pycocotools COCOeval on the final model "
                "(not best-on-val)")


def register() -> None:
    """mmdet's modules in its registries, and the shared mm modules (idempotent)."""
    from mmdet.utils import register_all_modules

    from . import mm  # noqa: F401 - the backbone adapter, neck, LN2d, optimiser constructor and hooks
    from .mask_paste import register as register_mask_head

    register_all_modules(init_default_scope=True)
    register_mask_head()
    _register_metric()


@once
def _register_metric() -> None:
    """``FourmCocoMetric`` in mmengine's METRICS (idempotent; defined here, not at import, so that the
    task scan does not import mmengine's evaluator and torch)."""
    from mmengine.evaluator import BaseMetric
    from mmengine.registry import METRICS

    class FourmCocoMetric(BaseMetric):
        """Box and mask AP at full precision (pycocotools' COCOeval; see fourm_eval.metrics_coco).

        With ``predictions_dir`` every evaluation also writes its results in the COCO
        results format (the last one stays: the final model's)."""

        default_prefix = "coco"

        def __init__(self, ann_file: str, cat_ids: list[int], with_masks: bool = True,
                     predictions_dir: str | None = None, **kwargs: Any):
            super().__init__(**kwargs)
            self.ann_file = ann_file
            self.cat_ids = list(cat_ids)
            self.with_masks = with_masks
            self.predictions_dir = predictions_dir

        def process(self, data_batch: dict, data_samples: list) -> None:
            from fourm_eval.metrics_coco import encode_masks, to_coco_results
            for ds in data_samples:
                pred = ds["pred_instances"]
                masks = pred.get("masks") if self.with_masks else None
                rles = encode_masks(masks.cpu().numpy()) if masks is not None else None
                dets, segs = to_coco_results(ds["img_id"], pred["bboxes"].cpu().numpy(),
                                             pred["scores"].cpu().numpy(), pred["labels"].cpu().numpy(),
                                             self.cat_ids, rles)
                self.results.append((ds["img_id"], dets, segs if rles is not None else None))

        def compute_metrics(self, results: list) -> dict[str, float]:
            from fourm_eval.metrics_coco import evaluate
            dets = [d for _, ds, _ in results for d in ds]
            segs = [s for _, _, ss in results if ss is not None for s in ss] if self.with_masks else None
            img_ids = sorted({int(i) for i, _, _ in results})
            if self.predictions_dir:
                write_predictions(Path(self.predictions_dir), dets, segs, img_ids)
            return evaluate(self.ann_file, dets, segs, img_ids=img_ids)

    mm_register(METRICS, "FourmCocoMetric")(FourmCocoMetric)


def datasets_and_model(p: dict[str, Any], *, backbone_cfg: dict, embed_dim: int, data_root: Path,
                       train_ann: Path, val_ann: Path, classes: list[str], cat_ids: list[int],
                       predictions_dir: Path | None = None) -> dict[str, Any]:
    """The task's part of the mmengine config: model, datasets, evaluator."""
    train_pipe, test_pipe = build_pipelines(p)
    meta = dict(classes=tuple(classes))
    # subsets (train_subset / val_subset) are already in the annotation files: seeded, recorded by id
    train_ds = dict(type="CocoDataset", data_root=str(data_root), ann_file=str(train_ann),
                    data_prefix=dict(img="train2017/"), metainfo=meta,
                    filter_cfg=dict(filter_empty_gt=True, min_size=1), pipeline=train_pipe, backend_args=None)
    val_ds = dict(type="CocoDataset", data_root=str(data_root), ann_file=str(val_ann),
                  data_prefix=dict(img="val2017/"), metainfo=meta, test_mode=True, pipeline=test_pipe,
                  backend_args=None)
    return dict(model=build_model_cfg(p, backbone_cfg, embed_dim, len(classes)), train_dataset=train_ds,
                val_dataset=val_ds,
                val_evaluator=dict(type="FourmCocoMetric", ann_file=str(val_ann), cat_ids=cat_ids, with_masks=True,
                                   predictions_dir=str(predictions_dir) if predictions_dir else None))


def check_data(root: Path, skip_bad_images: bool, out_dir: Path, ann_sha256: dict[str, str] | None = None,
               log: Log = print, progress: Progress | None = None, subsets: dict[str, int | None] | None = None,
               subset_seed: int = 0) -> tuple[dict[str, Any], list[str], list[int]]:
    """Check both splits; returns the checks, the class names and their category ids, label order.

    The one class order of a run is ascending category id: ``check_split`` rewrites any file that
    lists its categories otherwise, so the mmdet datasets (which number labels in file order), the
    metric (label k -> ``cat_ids[k]``) and the record all agree; :func:`check_label_order` verifies
    it on the built datasets.
    """
    from fourm_eval.data.coco_check import check_same_categories, check_split

    checks = {}
    for split in ("train", "val"):
        label = f"checking {split}2017"
        cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
        checks[split] = check_split(root, split, skip_bad_images, out_dir, progress=cb,
                                    ann_sha256=(ann_sha256 or {}).get(split),
                                    subset=(subsets or {}).get(split), subset_seed=subset_seed)
        c = checks[split]
        log(f"{root / (split + '2017')}: {c.n_images} images, {c.n_annotations} annotations, every image decodes"
            + (f"; {len(c.bad_images)} unusable image(s) skipped" if c.bad_images else ""))
    check_same_categories(checks["train"], checks["val"])
    cats = checks["val"].categories  # sorted by id, as in the annotation files mmdet reads
    return checks, [c["name"] for c in cats], [c["id"] for c in cats]


def check_label_order(dataset: Any, cat_ids: list[int], split: str) -> None:
    """mmdet's label k must be category ``cat_ids[k]`` (the metric's and the record's order);
    otherwise every prediction would be scored as another class, so refuse to go on."""
    got = [int(i) for i in getattr(dataset, "cat_ids", None) or []]
    if got != [int(i) for i in cat_ids]:
        from fourm_eval.data.coco_check import DatasetError
        raise DatasetError(f"{split} dataset ({getattr(dataset, 'ann_file', '?')}): mmdet numbers the classes as "
                           f"category ids {got}, but the metric and the record use {list(cat_ids)}; "
                           "the class order must be the same")



TASK = CocoDet()
