"""COCO detection + instance segmentation, ViTDet style, on mmdet 3.3 / mmengine.

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
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from fourm_eval.errors import ConfigError

from . import common

TASK = "coco-det"
_REGISTERED = False


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of an NCHW map."""

    def __init__(self, num_features: int, eps: float = 1e-6, **_: Any):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def register() -> None:
    """Register our backbone, neck and norm into mmdet's registries (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.model import BaseModule

    register_all_modules(init_default_scope=True)
    common.register_mmengine_components()
    MODELS.register_module("FourmLN2d", module=LayerNorm2d, force=True)

    @MODELS.register_module(force=True)
    class FourmEvalViT(BaseModule):
        """Any fourm-eval backbone as an mmdet backbone: the last block's tokens as a (B, D, h, w) map."""

        def __init__(self, name: str, checkpoint: str | None = None, allow_pickle: bool = False,
                     out_index: int = -1, **kwargs: Any):
            super().__init__()
            from fourm_eval.backbones import build_backbone
            self.net = build_backbone(name, checkpoint=checkpoint, allow_pickle=allow_pickle, **kwargs)
            self.out_index = out_index
            # ViTDet reads the last block without the encoder's final norm: freeze what lies after
            # the blocks (layer_id L+1 inside the backbone), so it is neither trained nor decayed
            # and DDP sees no unused parameters.
            for n, p in self.net.named_parameters():
                if self.net.layer_id(n) == self.net.num_layers + 1:
                    p.requires_grad_(False)

        def init_weights(self) -> None:  # weights come from build_backbone; never re-initialise
            pass

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
            rows, cols = self.net.grid_size(x)
            t, = self.net.get_intermediate_layers(x, [self.out_index])
            return (t.transpose(1, 2).reshape(t.shape[0], -1, rows, cols).contiguous(),)

    @MODELS.register_module(force=True)
    class SimpleFeaturePyramid(BaseModule):
        """ViTDet's neck: multi-scale maps from the single stride-16 map."""

        def __init__(self, in_channels: int, out_channels: int, scale_factors=(4.0, 2.0, 1.0, 0.5),
                     num_outs: int = 5, init_cfg=None):
            super().__init__(init_cfg=init_cfg)
            self.stages = nn.ModuleList()
            C = in_channels
            for s in scale_factors:
                if s == 4.0:
                    layers: list[nn.Module] = [nn.ConvTranspose2d(C, C // 2, 2, 2), LayerNorm2d(C // 2), nn.GELU(),
                                               nn.ConvTranspose2d(C // 2, C // 4, 2, 2)]
                    dim = C // 4
                elif s == 2.0:
                    layers, dim = [nn.ConvTranspose2d(C, C // 2, 2, 2)], C // 2
                elif s == 1.0:
                    layers, dim = [], C
                elif s == 0.5:
                    layers, dim = [nn.MaxPool2d(2, 2)], C
                else:
                    raise ConfigError(f"unsupported pyramid scale {s}")
                layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                           nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
                self.stages.append(nn.Sequential(*layers))
            self.num_outs = num_outs

        def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = inputs[0]
            outs = [stage(x) for stage in self.stages]
            while len(outs) < self.num_outs:  # ViTDet's extra level: stride-2 subsampling of the coarsest map
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            return tuple(outs)

    from mmdet.registry import METRICS
    from mmengine.evaluator import BaseMetric

    @METRICS.register_module(force=True)
    class FourmCocoMetric(BaseMetric):
        """Box and mask AP at full precision (pycocotools' COCOeval; see fourm_eval.metrics_coco)."""

        default_prefix = "coco"

        def __init__(self, ann_file: str, cat_ids: list[int], with_masks: bool = True, **kwargs: Any):
            super().__init__(**kwargs)
            self.ann_file = ann_file
            self.cat_ids = list(cat_ids)
            self.with_masks = with_masks
            self._gt = None

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
            return evaluate(self.ann_file, dets, segs, img_ids=[i for i, _, _ in results])

    _REGISTERED = True


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
    mask_head = dict(type="FCNMaskHead", num_convs=head["mask_convs"], in_channels=ch, conv_out_channels=ch,
                     num_classes=num_classes, norm_cfg=_norm(),
                     loss_mask=dict(type="CrossEntropyLoss", use_mask=True, loss_weight=1.0))
    roi_extract = lambda size: dict(type="SingleRoIExtractor",  # noqa: E731
                                    roi_layer=dict(type="RoIAlign", output_size=size, sampling_ratio=0),
                                    out_channels=ch, featmap_strides=strides[:4])
    rcnn_train = lambda thr: dict(  # noqa: E731
        assigner=dict(type="MaxIoUAssigner", pos_iou_thr=thr, neg_iou_thr=thr, min_pos_iou=thr,
                      match_low_quality=False, ignore_iof_thr=-1),
        sampler=dict(type="RandomSampler", num=head["rcnn_samples"], pos_fraction=0.25, neg_pos_ub=-1,
                     add_gt_as_proposals=True),
        mask_size=28, pos_weight=-1, debug=False)
    if p["detector"] == "mask_rcnn":
        roi_head = dict(type="StandardRoIHead", bbox_roi_extractor=roi_extract(7), bbox_head=bbox_head,
                        mask_roi_extractor=roi_extract(14), mask_head=mask_head)
        rcnn_cfg: Any = rcnn_train(0.5)
        rcnn_cfg["assigner"]["match_low_quality"] = True
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
                               pad_size_divisor=p["image_size"]),
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
        dict(type="Pad", size=(s, s), pad_val=dict(img=(114, 114, 114))),
        dict(type="PackDetInputs"),
    ]
    test = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(s, s), keep_ratio=True),  # padded to s x s by the data preprocessor
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    return train, test


# --------------------------------------------------------------------- run
METRIC_MAP = {f"coco/{src}_{n}": f"{dst}_{n}" for src, dst in (("box", "box"), ("mask", "mask"))
              for n in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def _global_blocks(depth: int) -> list[int]:
    """ViTDet's global blocks: the last of each quarter (2, 5, 8, 11 for 12 blocks)."""
    return sorted({depth * k // 4 - 1 for k in range(1, 5)})


def _schedule(p: dict[str, Any], n_train: int, world: int) -> dict[str, Any]:
    sch = p["schedule"]
    per_gpu = max(1, p["batch_size"] // world)
    eff_batch = per_gpu * world
    if sch["unit"] == "epoch":
        max_iters = max(1, round(sch["length"] * n_train / eff_batch))
    elif sch["unit"] == "iter":
        max_iters = int(sch["length"])
    else:
        raise ConfigError(f"schedule.unit must be 'epoch' or 'iter', not {sch['unit']!r}")
    val_every = sch.get("val_interval", max_iters)
    val_every = max(1, round(val_every * max_iters) if isinstance(val_every, float) and val_every <= 1 else int(val_every))
    ckpt_every = sch.get("checkpoint_interval", val_every)
    ckpt_every = max(1, round(ckpt_every * max_iters) if isinstance(ckpt_every, float) and ckpt_every <= 1
                     else int(ckpt_every))
    return dict(per_gpu_batch=per_gpu, eff_batch=eff_batch, max_iters=max_iters, val_interval=val_every,
                checkpoint_interval=ckpt_every, warmup=min(int(sch.get("warmup_iters", 0)), max_iters),
                milestones=[int(m * max_iters) for m in sch.get("milestones", [])])


def build_runner_cfg(p: dict[str, Any], *, backbone_cfg: dict, embed_dim: int, data_root: Path,
                     train_ann: Path, val_ann: Path, classes: list[str], cat_ids: list[int], work_dir: Path,
                     seed: int, n_train: int, world: int, launcher: str) -> dict[str, Any]:
    sched = _schedule(p, n_train, world)
    train_pipe, test_pipe = build_pipelines(p)
    meta = dict(classes=tuple(classes))
    subset = p.get("train_subset")
    train_ds = dict(type="CocoDataset", data_root=str(data_root), ann_file=str(train_ann),
                    data_prefix=dict(img="train2017/"), metainfo=meta,
                    filter_cfg=dict(filter_empty_gt=True, min_size=1), pipeline=train_pipe, backend_args=None)
    if subset:
        train_ds["indices"] = int(subset)
    val_ds = dict(type="CocoDataset", data_root=str(data_root), ann_file=str(val_ann),
                  data_prefix=dict(img="val2017/"), metainfo=meta, test_mode=True, pipeline=test_pipe,
                  backend_args=None)
    if p.get("val_subset"):
        val_ds["indices"] = int(p["val_subset"])
    nw = int(p["num_workers"])
    loader = lambda ds, bs, shuffle, sampler: dict(  # noqa: E731
        batch_size=bs, num_workers=nw, persistent_workers=nw > 0, pin_memory=torch.cuda.is_available(),
        sampler=dict(type=sampler, shuffle=shuffle, seed=seed) if sampler == "InfiniteSampler"
        else dict(type=sampler, shuffle=shuffle), dataset=ds)
    amp = p.get("amp", "auto")
    use_bf16 = (amp == "bf16" or (amp == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    optim_wrapper = dict(
        type="AmpOptimWrapper" if use_bf16 else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=float(p["lr"]), betas=tuple(p["betas"]), weight_decay=float(p["weight_decay"])),
        constructor="LayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=float(p["layer_decay"]), backbone_attr="backbone.net",
                           table_path=str(work_dir / "param_groups.csv")),
        clip_grad=dict(max_norm=float(p["clip_grad"])) if p.get("clip_grad") else None)
    if use_bf16:
        optim_wrapper["dtype"] = "bfloat16"
    schedulers: list[dict] = []
    if sched["warmup"]:
        schedulers.append(dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=sched["warmup"]))
    if sched["milestones"]:
        schedulers.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=sched["max_iters"],
                               milestones=sched["milestones"], gamma=0.1))
    hooks_custom = [dict(type="FiniteLossHook"), dict(type="CheckpointStateHook", keep=int(p.get("max_keep_ckpts", 2))),
                    dict(type="EvalHistoryHook", out_file=str(work_dir / "eval_history.jsonl"))]
    if p.get("eval_at_start", False):
        hooks_custom.append(dict(type="EvalAtStartHook", out_file=str(work_dir / "eval_step0.json")))
    cuda = torch.cuda.is_available()
    return dict(
        default_scope="mmdet",
        work_dir=str(work_dir),
        model=build_model_cfg(p, backbone_cfg, embed_dim, len(classes)),
        train_dataloader=loader(train_ds, sched["per_gpu_batch"], True, "InfiniteSampler"),
        val_dataloader=loader(val_ds, int(p.get("val_batch_size", 1)), False, "DefaultSampler"),
        val_evaluator=dict(type="FourmCocoMetric", ann_file=str(val_ann), cat_ids=cat_ids, with_masks=True),
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=sched["max_iters"], val_interval=sched["val_interval"]),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=int(p.get("log_interval", 50)), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # keeps every checkpoint; CheckpointStateHook prunes old ones once a newer one is complete
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=sched["checkpoint_interval"],
                            max_keep_ckpts=-1, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=hooks_custom,
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if cuda else "gloo")),
        log_processor=dict(type="LogProcessor", window_size=int(p.get("log_interval", 50)), by_epoch=False),
        visualizer=dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")], name="fourm_eval_vis"),
        log_level="INFO",
        load_from=None,
        resume=True,
        launcher=launcher,
        randomness=dict(seed=seed, deterministic=False),
        _schedule=sched,
    )


def check_data(root: Path, skip_bad_images: bool, out_dir: Path, ann_sha256: dict[str, str] | None = None,
               log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[str], list[int]]:
    """Check both splits; returns the checks, the class names and their category ids, label order.

    The one class order of a run is ascending category id: ``check_split`` rewrites any file that
    lists its categories otherwise, so the mmdet datasets (which number labels in file order), the
    metric (label k -> ``cat_ids[k]``) and the record all agree; :func:`check_label_order` verifies
    it on the built datasets.
    """
    from fourm_eval.data.coco_check import check_same_categories, check_split

    checks = {}
    for split in ("train", "val"):
        log(f"checking {root} ({split}2017) ...")
        checks[split] = check_split(root, split, skip_bad_images, out_dir,
                                    ann_sha256=(ann_sha256 or {}).get(split))
        c = checks[split]
        log(f"  {c.n_images} images, {c.n_annotations} annotations"
            + (f", {len(c.bad_images)} unusable image(s) skipped" if c.bad_images else ""))
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


def run(*, backbone: str = "4m", checkpoint: str | None = None, data_root: str | Path | None = None,
        profile: str = "smoke", work_dir: str | Path | None = None, seed: int = 0, sets: list[str] | None = None,
        skip_bad_images: bool = False, allow_pickle: bool = False, launcher: str = "none",
        size: str | None = None, random_init: bool = False, num_heads: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune and evaluate on COCO; returns the result record (also written to result.json)."""
    import os

    from fourm_eval.backbones import backbone_info
    from fourm_eval.checkpoints import resolve_checkpoint
    from fourm_eval.data.coco_check import annotation_digest

    from .runs import (RunDir, checkpoint_digest, resolve_backbone_name, rank_zero, write_result)

    started = time.time()
    p = common.apply_overrides(common.load_profile(TASK, profile), sets or [])
    name, checkpoint = resolve_backbone_name(backbone, size, checkpoint, random_init)
    ckpt_path = str(resolve_checkpoint(checkpoint)) if checkpoint else None
    if num_heads is not None and not name.startswith("4m"):
        raise ConfigError("--num-heads applies to 4M checkpoints without config metadata only")
    info = backbone_info(name, ckpt_path, allow_pickle, num_heads=num_heads)
    for note in info.get("load_notes") or []:
        log(f"WARNING: {note}")
    bsize, size_note = common.resolve_size(info["embed_dim"], info["num_layers"], size)
    if size_note:
        log(f"WARNING: {size_note}")
        info["load_notes"] = list(info.get("load_notes") or []) + [size_note]
    for key in ("layer_decay", "drop_path", "lr"):
        p[key] = common.per_size(p[key], bsize)
    p["model_size"] = bsize
    if p.get("attention", "global") == "window" and not name.startswith("4m"):
        raise ConfigError("attention: window is implemented for 4M backbones only (timm's ViT has no "
                          "windowed blocks); use attention: global for the baselines")

    if data_root is None:
        from fourm_eval.data.coco_mini import default_mini_coco
        data_root = default_mini_coco()
        log(f"no --data-root: using the built-in mini COCO at {data_root}")
    root = Path(data_root).expanduser().resolve()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wd = RunDir.create(work_dir, TASK, name, p["profile"], seed)
    identity = {"task": TASK, "backbone": name, "checkpoint": ckpt_path, "data_root": str(root),
                "profile": p, "seed": seed, "world_size": world, "skip_bad_images": skip_bad_images,
                "annotations_sha256": {s: annotation_digest(root, s) for s in ("train", "val")}}
    if num_heads is not None:
        identity["num_heads"] = int(num_heads)
    wd.claim(identity)  # refuses a directory that holds a different run
    done = wd.finished_result()
    if done is not None:
        log(f"{wd.path} already holds a finished run; result.json left as it is")
        return done
    checks, classes, cat_ids = check_data(root, skip_bad_images, wd.path / "data",
                                          ann_sha256=identity["annotations_sha256"], log=log)
    train_ann = checks["train"].used_ann_file or checks["train"].ann_file
    val_ann = checks["val"].used_ann_file or checks["val"].ann_file

    backbone_cfg = dict(name=name, checkpoint=ckpt_path, allow_pickle=allow_pickle,
                        drop_path_rate=float(p["drop_path"]), grad_checkpointing=bool(p.get("grad_checkpointing")))
    if num_heads is not None:
        backbone_cfg["num_heads"] = int(num_heads)
    if p.get("attention", "global") == "window":
        backbone_cfg.update(window_size=int(p["window_size"]), global_blocks=_global_blocks(info["num_layers"]))
    elif p.get("attention", "global") != "global":
        raise ConfigError(f"attention must be 'global' or 'window', not {p['attention']!r}")
    if not name.startswith("4m"):
        backbone_cfg["img_size"] = int(p["image_size"])

    register()
    common.allow_mmengine_checkpoint_types()
    from mmengine.config import Config
    from mmengine.runner import Runner

    n_train = min(checks["train"].n_images, int(p.get("train_subset") or 10**12))
    cfg = build_runner_cfg(p, backbone_cfg=backbone_cfg, embed_dim=info["embed_dim"], data_root=root,
                           train_ann=train_ann, val_ann=val_ann, classes=classes, cat_ids=cat_ids,
                           work_dir=wd.path, seed=seed, n_train=n_train, world=world, launcher=launcher)
    sched = cfg.pop("_schedule")
    wrapper = common.init_distributed_cpu(launcher)
    if wrapper:
        cfg["model_wrapper_cfg"] = wrapper
    resume_from = wd.resume_checkpoint()
    if resume_from is not None:
        cfg["resume"], cfg["load_from"] = True, str(resume_from)
        log(f"resuming from the last checkpoint in {wd.path} ({resume_from.name})")
    else:
        cfg["resume"] = False
    log(f"{TASK}: {name} ({info['params'] / 1e6:.1f}M params), {sched['max_iters']} iterations at batch "
        f"{sched['eff_batch']}, {p['image_size']} px, layer decay {p['layer_decay']}, work dir {wd.path}")
    runner = Runner.from_cfg(Config(cfg))
    check_label_order(runner.train_dataloader.dataset, cat_ids, "train")  # builds the loops train() would build
    check_label_order(runner.val_dataloader.dataset, cat_ids, "val")
    runner.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written the evaluation history; all ranks now agree on it
    history = wd.eval_history()
    if not history or history[-1]["iter"] != sched["max_iters"]:
        runner.val_loop.run()
        history = wd.eval_history()
    final = history[-1]["metrics"]
    step0 = wd.read_json("eval_step0.json")
    rename = lambda m: {METRIC_MAP.get(k, k): v for k, v in m.items()}  # noqa: E731
    record = None
    if rank_zero():
        record = write_result(
            wd, task=TASK, profile=p["profile"], seed=seed, metrics=rename(final),
            metrics_step0=rename(step0) if step0 else None,
            backbone={"name": name, "family": info["family"], "checkpoint": ckpt_path,
                      "sha256": checkpoint_digest(ckpt_path) if ckpt_path else None,
                      "params": info["params"], "architecture": info["config"],
                      "file_format": info.get("file_format"), "config_source": info.get("config_source"),
                      "config_guessed": info.get("config_guessed") or {},
                      "attention": p.get("attention", "global")},
            warnings=list(info.get("load_notes") or []),
            dataset={"root": str(root), "annotations_sha256": {s: c.ann_sha256 for s, c in checks.items()},
                     "n_train_images": n_train, "n_val_images": checks["val"].n_images,
                     "skipped_bad_images": sum(len(c.bad_images) for c in checks.values()),
                     "classes": classes},
            config={**p, "schedule_resolved": sched, "world_size": world},
            eval_history=[{"iter": h["iter"], "metrics": rename(h["metrics"])} for h in history],
            started=started)
        log(f"box AP {final['coco/box_AP']:.4f}  AP50 {final['coco/box_AP50']:.4f}  "
            f"mask AP {final['coco/mask_AP']:.4f}  -> {wd.path / 'result.json'}")
    return record or {}
