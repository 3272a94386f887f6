"""NYUv2 monocular depth, on the depth kit (``tasks/kits/depth.py``: mmseg's ``DepthEstimator``,
the ``convnext`` / ``dpt`` heads, ``silog`` / ``berhu`` losses, predictions and metric).

Data: the layout of ``fourm_eval.data.nyu`` (mmseg's NYUDataset: images/ + annotations/,
16-bit PNG depth in millimetres). Training: the image's short side resized to
``image_size``, a random ``image_size`` square crop, the profile's colour augmentation
(``color_jitter`` with optional grey, or mmseg's ``photometric_distortion``), an optional
horizontal flip.

Test (``test_procedure``, the protocol's): ``eigen``: the short side resized to ``image_size``
(padded to a multiple of the patch size), the prediction resized back to the image's full size,
scored by ``fourm_eval.metrics_depth`` in the Eigen crop (ground truth in (1e-3, 10] m,
predictions clipped to it, per image then averaged over images); ``center-crop`` (MultiMAE):
the short side to ``image_size``, the centre square, scored there against the depth resized
(nearest) and cropped the same way, pixels pooled per batch of ``score_batch_size`` images.
Predictions: one 16-bit PNG per test image in millimetres, at the size scored (the full size or
the crop), named like the image (``NAME.png``), with ``meta.json`` naming the scoring; they are
what is scored, in the run and by ``fourm-eval evaluate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from fourm_eval.errors import ConfigError

from .base import Log, PreparedData, Progress, RunContext
from .kits.dense import COLOR_SETTINGS, TEST_META_KEYS, color_transforms, color_words, single_pass_geometry
from .kits.depth import DepthTask
from .schema import S
from .mmreg import register as mm_register


# ---------------------------------------------------------------- dataset
def _register_dataset() -> None:
    from mmengine.registry import DATASETS
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


# ------------------------------------------------------------------ config
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
    train += color_transforms(p)
    train.append(dict(type="PackSegInputs"))
    if p["test_procedure"] == "center-crop":  # MultiMAE: SmallestMaxSize + CenterCrop, scored on the crop
        test = [dict(type="LoadImageFromFile"), *single_pass_geometry("short-side-crop", s),
                dict(type="PackSegInputs", meta_keys=TEST_META_KEYS)]
    else:  # predicted at the short side s, resized back to the full size (mmseg's postprocess)
        test = [dict(type="LoadImageFromFile"),
                dict(type="ResizeShortestEdge", scale=s, max_size=big),
                dict(type="PackSegInputs", meta_keys=("img_path", "depth_map_path", "ori_shape", "img_shape",
                                                      "scale_factor"))]
    return train, test


# --------------------------------------------------------------------- task
class NyuDepth(DepthTask):
    name = "nyu-depth"
    title = "NYUv2 monocular depth (ConvNeXt or DPT head, or DINOv2 linear probe; Eigen-crop metrics, mmseg)"
    data_kind = "nyu"
    mini_data = "fourm_eval.data.nyu_mini"
    reference_train_images = 795       # NYUv2 labelled set, Eigen split (transfer-protocols.md)
    prediction_format = ("one 16-bit PNG per test image, depth in millimetres (0 = none), named like the image "
                         "(NAME.png), at the image's full size (or at the size the protocol scores, named in "
                         "meta.json)")
    scored_split = "test"
    xl_tuning_published = "LoRA rank 8"
    settings = DepthTask.settings + COLOR_SETTINGS + (
        S("hflip", "bool", "random horizontal flip (p 0.5) of training images"),
    )

    # data
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
        scoring = self.scoring(p)  # scored as the run's protocol scores, so the two numbers compare
        per = {}
        for n in test.names:
            gt_file = depth_dir(root, "test") / f"{n}{DEPTH_SUFFIX}"
            gt = read_depth_m(gt_file)
            per[n] = self.score(self.encode(np.full(gt.shape, median)), gt, f"{n} (constant)", gt_file, scoring)
        baseline = self.summarize(per, scoring)[0]
        log(f"predicting the training median ({median:.3f} m) everywhere scores delta1 {baseline['delta1']:.4f} "
            "on the test split (the baseline a trained model must beat)")
        record = {"root": str(root), "files_sha256": self.data_identity(root)["files_sha256"],
                  "n_train_images": checks["train"].n_images, "n_val_images": test.n_images,
                  "splits": {s: split_record(c) for s, c in checks.items()},
                  "skipped_bad_images": sum(len(c.bad) for c in checks.values()),
                  "train_median_baseline": {"median_depth_m": median, "metrics": baseline,
                                            "what": "predicting the median of the valid training depths at every "
                                                    "pixel, scored as the run scores (its protocol's scoring) on "
                                                    "the test split"}}
        return PreparedData(root, checks["train"].n_images, test.n_images, record, private={"checks": checks})

    # model and runner
    def register_extra(self) -> None:
        _register_dataset()

    def pipelines(self, p: dict[str, Any]) -> tuple[list, list]:
        return build_pipelines(p)

    def dataset_cfg(self, ctx: RunContext, split: str, pipeline: list, test_mode: bool) -> dict:
        c = ctx.data.private["checks"][split]
        return dict(type="FourmNYUDataset", data_root=str(ctx.data.root), img_suffix=c.img_suffix,
                    depth_map_suffix=".png", data_prefix=dict(img_path=f"images/{split}",
                                                              depth_map_path=f"annotations/{split}"),
                    names=list(c.names), test_mode=test_mode, pipeline=pipeline, backend_args=None)

    def verify_runner(self, runner: Any, data: PreparedData) -> None:
        from fourm_eval.data.nyu import NyuDataError
        for loader, split in ((runner.train_dataloader, "train"), (runner.val_dataloader, "test")):
            got = sorted(Path(d["img_path"]).stem for d in loader.dataset.load_data_list())
            if got != data.private["checks"][split].names:
                raise NyuDataError(f"{split}: mmseg's dataset lists {len(got)} pairs, the data check kept "
                                   f"{len(data.private['checks'][split].names)}; they must be the same")

    def ground_truth_files(self, root: Path) -> dict[str, Path]:
        from fourm_eval.data.nyu import DEPTH_SUFFIX, depth_dir, list_split
        return {n: depth_dir(Path(root), "test") / f"{n}{DEPTH_SUFFIX}" for n in list_split(Path(root), "test")[0]}

    def footnote_training(self, c: dict[str, Any]) -> str:
        aug = ["random crop"] + color_words(c) + (["horizontal flip"] if c.get("hflip") else [])
        return f"{c.get('image_size', '?')} px crops ({', '.join(aug)})"

    def footnote_test(self, c: dict[str, Any]) -> str:
        if c.get("test_procedure") == "center-crop":
            return (f"the centre {c.get('image_size', '?')} px square at short side {c.get('image_size', '?')}, "
                    f"depth nearest-resized, pixels pooled per batch of {c.get('score_batch_size', '?')} (MultiMAE)")
        return f"tested at short side {c.get('image_size', '?')}, scored at the full size in the Eigen crop"


TASK = NyuDepth()
