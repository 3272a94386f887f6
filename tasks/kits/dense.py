"""The dense-prediction kit: tasks that map an image to a per-pixel map (semantic segmentation,
depth), run by mmsegmentation.

A dense task (a :class:`DenseTask`) declares, as data and small functions:

* its splits and mmseg fields: ``train_split``, ``scored_split``, ``pred_field`` (the data-sample
  field holding the prediction) and ``gt_path_key`` (the meta key holding the ground-truth file);
* its model, pipelines and datasets: :meth:`DenseTask.model_cfg`, :meth:`DenseTask.pipelines`,
  :meth:`DenseTask.dataset_cfg`;
* its prediction encoding: ``map_bits`` (8 or 16: single-channel PNGs, one per image,
  ``<image stem>.png``, the image's size), ``map_max`` and :meth:`DenseTask.encode` (the model's
  map -> the stored integers);
* its metric: :meth:`DenseTask.ground_truth_files`, :meth:`DenseTask.read_ground_truth`,
  :meth:`DenseTask.score_image` (on the *stored* prediction) and :meth:`DenseTask.summarize`.

Built on it: :class:`~.segmentation.SegmentationTask` (label maps, mIoU) and
:class:`~.depth.DepthTask` (depth in metres, the Eigen metrics).

The kit supplies the rest of the contract: runner parts, the evaluator (every validation writes
each prediction as stored and scores exactly what it wrote, so ``fourm-eval evaluate`` on the folder
gives the run's numbers), folder scoring with named errors, the record's metric names and mmseg's
registration. A prediction folder's ``meta.json`` names the images a run scored (a subset, or
images skipped as bad); without it every image of the scored split needs its prediction.
"""

from __future__ import annotations

import json
from abc import abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from fourm_eval.errors import PredictionsError

from ..base import RunContext, Task
from ..mmreg import register as mm_register
from ..schema import S, floats


class DenseTask(Task):
    mm_scope = "mmseg"
    requires = ("torch", "timm", "mmengine", "mmcv", "mmcv ops", "mmsegmentation")
    train_split: ClassVar[str] = "train"
    scored_split: ClassVar[str]      # the split validation scores ("val", "test")
    metric_prefix: ClassVar[str]     # the evaluator's prefix ("seg" -> "seg/mIoU")
    pred_field: ClassVar[str]        # mmseg data-sample field of the prediction ("pred_sem_seg")
    gt_path_key: ClassVar[str]       # data-sample meta key of the ground-truth file ("seg_map_path")
    map_bits: ClassVar[int]          # stored PNG bit depth, 8 or 16
    map_max: ClassVar[int | None] = None  # largest valid stored value (None: the bit depth's)
    metric_words: ClassVar[str]      # the footnote's words for the metric (the kit of the kind says)
    xl_tuning_published: ClassVar[str | None] = None  # how 4M-21 tunes XL on this task, when not fully

    # ------------------------------------------------------- declared by the task
    @abstractmethod
    def pipelines(self, p: dict[str, Any]) -> tuple[list, list]:
        """mmseg's train and test pipelines."""

    @abstractmethod
    def model_cfg(self, ctx: RunContext) -> dict:
        """The mmseg model config (``EncoderDecoder``, ``DepthEstimator``, ...)."""

    @abstractmethod
    def dataset_cfg(self, ctx: RunContext, split: str, pipeline: list, test_mode: bool) -> dict:
        """The mmseg dataset of ``split`` (the images the data check kept)."""

    @abstractmethod
    def encode(self, pred: np.ndarray) -> np.ndarray:
        """The model's (H, W) map -> the stored uint8 / uint16 values."""

    @abstractmethod
    def ground_truth_files(self, root: Path) -> dict[str, Path]:
        """Image stem -> ground-truth file of the scored split."""

    @abstractmethod
    def read_ground_truth(self, path: Path) -> np.ndarray:
        """A ground-truth file as the array :meth:`score_image` takes (named errors)."""

    @abstractmethod
    def score_image(self, stored: np.ndarray, gt: np.ndarray, name: str) -> Any:
        """Per-image statistics of a stored prediction against its ground truth (same size)."""

    @abstractmethod
    def summarize(self, per_image: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """The metrics (each ``metrics`` name) from every image's statistics, and extra entries
        for the predictions' ``meta.json`` (e.g. per-class values)."""

    def register_extra(self) -> None:
        """Register the task's own mm modules (transforms, datasets, heads); idempotent."""

    @abstractmethod
    def footnote_training(self, c: dict[str, Any]) -> str:
        """The footnote's words for the training crops and augmentation (``c``: the record's config)."""

    @abstractmethod
    def footnote_test(self, c: dict[str, Any]) -> str:
        """The footnote's words for how the scored split is predicted (resize, windows)."""

    # ------------------------------------------------------- supplied by the kit
    def register_mm(self) -> None:
        from mmseg.utils import register_all_modules

        from .. import mm  # noqa: F401 - the backbone adapter, optimiser constructor and hooks
        from ..dense_heads import register_mmseg

        register_all_modules(init_default_scope=True)
        register_mmseg()
        _register_color_jitter()
        _register_metric()
        self.register_extra()

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        train, test = self.pipelines(ctx.profile)
        return dict(model=self.model_cfg(ctx), train_dataset=self.dataset_cfg(ctx, self.train_split, train, False),
                    val_dataset=self.dataset_cfg(ctx, self.scored_split, test, True),
                    val_evaluator=dict(type="FourmDenseMetric", task=self.name,
                                       predictions_dir=str(ctx.predictions_dir) if ctx.predictions_dir else None))

    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix(self.metric_prefix + "/"): float(v) for k, v in evaluator_out.items()}

    def footnote_head(self, c: dict[str, Any]) -> str:
        """The head in words (a kit adds its own heads)."""
        head = c.get("head", "?")
        if head == "convnext":
            h = c.get("convnext") if isinstance(c.get("convnext"), dict) else {}
            return (f"ConvNeXt head (MultiMAE; decoder dim {h.get('decoder_dim', '?')}, {h.get('preds_per_patch', '?')} "
                    f"predictions per patch, {h.get('depth', '?')} blocks) on the last block"
                    + {True: " after the encoder's final norm", False: " without the encoder's final norm"}.get(
                        h.get("final_norm"), ""))
        return f"{head} head"

    def footnote(self, record: dict[str, Any]) -> str:
        """The protocol from the record: head; training crops; schedule; tuning; test; metric."""
        c = record.get("config") or {}
        sch = c.get("schedule_resolved") or {}
        tuning = f"{c.get('tuning', 'full')} fine-tuning"
        if c.get("model_size") == "xl" and self.xl_tuning_published and c.get("tuning", "full") == "full":
            tuning += f" (4M-21 fine-tunes XL with {self.xl_tuning_published}; not implemented here yet)"
        parts = [self.footnote_head(c), self.footnote_training(c),
                 f"{sch.get('max_iters', '?')} iterations at batch {sch.get('eff_batch', '?')}, "
                 f"{sch.get('decay') or (c.get('schedule') or {}).get('decay', '?')} decay",
                 f"{tuning}, layer decay {c.get('layer_decay', '?')}, drop path {c.get('drop_path', '?')}",
                 self.footnote_test(c), self.metric_words,
                 f"final model (not best-on-{self.scored_split})"]
        return f"{self.name} / {record.get('profile')}: " + "; ".join(parts)

    def read_prediction(self, path: Path) -> np.ndarray:
        from fourm_eval.data.pngmap import read_png_map
        return read_png_map(path, bits=self.map_bits, what="prediction", error=PredictionsError,
                            palette_ok=self.map_bits == 8, max_value=self.map_max)

    def score(self, stored: np.ndarray, gt: np.ndarray, pred_file: Path | str, gt_file: Path | str) -> Any:
        if stored.shape != gt.shape:
            raise PredictionsError(f"{pred_file}: prediction is {stored.shape[1]}x{stored.shape[0]} (width x height), "
                                   f"its ground truth {gt_file} {gt.shape[1]}x{gt.shape[0]}; predictions are at the "
                                   "image's full size")
        return self.score_image(stored, gt, str(pred_file))

    def evaluate(self, predictions: Path, data_root: Path) -> dict[str, float]:
        """Score a folder of stored predictions against the scored split of ``data_root`` (only the
        images its ``meta.json`` names, when it names them)."""
        gt = self.ground_truth_files(Path(data_root))
        stems = _meta_stems(Path(predictions))
        if stems is not None:
            unknown = sorted(set(stems) - set(gt))
            if unknown:
                raise PredictionsError(f"{Path(predictions) / 'meta.json'} names {len(unknown)} image(s) without "
                                       f"ground truth in the {self.scored_split} split of {data_root}: {unknown[:5]}")
            gt = {s: gt[s] for s in stems}
        return score_folder(self, Path(predictions), gt)[0]


CONVNEXT_SETTINGS = (
    S("convnext", "section", "the ConvNeXt head (MultiMAE's adapter, tasks/dense_heads.py)", per_size=False),
    S("convnext.decoder_dim", "int", "features per token after the first linear"),
    S("convnext.preds_per_patch", "int", "sub-patches per token (a square number)"),
    S("convnext.depth", "int", "ConvNeXt blocks"),
    S("convnext.final_norm", "bool", "the encoder's final norm on the last block's tokens before the head "
      "(ml-4m's FourMViT applies it; MultiMAE's MultiViT has none)"),
)


# the kit's FourmColorJitter transform, as a task's profile section ``color_jitter``
COLOR_JITTER_SETTINGS = (
    S("color_jitter", "section", "colour jitter (torchvision's ColorJitter, MultiMAE's values)", per_size=False),
    *floats("color_jitter", prob="probability per image", brightness="brightness", contrast="contrast",
            saturation="saturation", hue="hue"),
)


def px(size: Any) -> str:
    """A crop size in a footnote: ``96`` or ``32 x 64`` (height x width)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{size[0]} x {size[1]}"
    return str(size if size is not None else "?")


def quarter_blocks(depth: int) -> list[int]:
    """0-based blocks at depth 1/4, 1/2, 3/4, 1 (2, 5, 8, 11 for 12 blocks; 0, 1, 2, 3 for 4): the
    levels of multi-level heads (UperNet, DPT)."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def batch_norm() -> dict:
    """BN, or SyncBN when the run has several processes (as mmseg's configs)."""
    import os
    return dict(type="SyncBN" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "BN", requires_grad=True)


_JITTER_REGISTERED = False


def _register_color_jitter() -> None:
    """``FourmColorJitter`` in mmseg's TRANSFORMS (idempotent)."""
    global _JITTER_REGISTERED
    if _JITTER_REGISTERED:
        return
    from mmcv.transforms import BaseTransform
    from mmseg.registry import TRANSFORMS

    class FourmColorJitter(BaseTransform):
        """torchvision's ColorJitter (brightness, contrast, saturation, hue; random order) applied
        with probability ``prob`` (MultiMAE's colour jitter: albumentations' ColorJitter with the
        same values), on the BGR uint8 image of an mmseg pipeline."""

        def __init__(self, prob: float = 0.5, brightness: float = 0.4, contrast: float = 0.4,
                     saturation: float = 0.2, hue: float = 0.1):
            from torchvision.transforms import ColorJitter

            self.prob = prob
            self.jitter = ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)

        def transform(self, results: dict) -> dict:
            import torch

            if self.prob <= 0 or torch.rand(()).item() >= self.prob:
                return results
            rgb = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])).permute(2, 0, 1)
            results["img"] = np.ascontiguousarray(self.jitter(rgb).permute(1, 2, 0).numpy()[..., ::-1])
            return results

        def __repr__(self) -> str:
            return f"FourmColorJitter(prob={self.prob}, {self.jitter!r})"

    mm_register(TRANSFORMS, "FourmColorJitter")(FourmColorJitter)
    _JITTER_REGISTERED = True


def score_folder(task: DenseTask, pred_dir: Path, gt_files: dict[str, Path]) -> tuple[dict[str, float], dict]:
    """Score ``pred_dir`` (one ``<stem>.png`` per entry of ``gt_files``, nothing else but
    ``meta.json``) with the task's metric: (metrics, meta extras)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise PredictionsError(f"{pred_dir}: predictions folder not found; expected {task.prediction_format}")
    have = {p.stem: p for p in pred_dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name != "meta.json"}
    other = sorted(p.name for p in have.values() if p.suffix.lower() != ".png")
    if other:
        raise PredictionsError(f"{pred_dir}: {len(other)} file(s) that are not .png predictions, e.g. {other[:3]}")
    missing, extra = sorted(set(gt_files) - set(have)), sorted(set(have) - set(gt_files))
    if missing:
        raise PredictionsError(f"{pred_dir}: no prediction for {len(missing)} of the {len(gt_files)} "
                               f"{task.scored_split} images, e.g. {[m + '.png' for m in missing[:3]]}")
    if extra:
        raise PredictionsError(f"{pred_dir}: {len(extra)} prediction(s) for no {task.scored_split} image, e.g. "
                               f"{[e + '.png' for e in extra[:3]]}")
    per = {stem: task.score(task.read_prediction(have[stem]), task.read_ground_truth(gt_files[stem]), have[stem],
                            gt_files[stem]) for stem in sorted(gt_files)}
    return task.summarize(per)


def _meta_stems(pred_dir: Path) -> list[str] | None:
    """The image stems a run's ``meta.json`` names (None: no meta.json, or one without stems yet)."""
    meta = pred_dir / "meta.json"
    if not meta.is_file():
        return None
    try:
        stems = json.loads(meta.read_text()).get("stems")
        if stems is not None and not (isinstance(stems, list) and all(isinstance(x, str) for x in stems)):
            raise TypeError("'stems' is not a list of names")
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise PredictionsError(f"{meta}: not the meta.json of a fourm-eval run ({e}); remove it to score every "
                               "image") from None
    return stems


_METRIC_REGISTERED = False


def _register_metric() -> None:
    """``FourmDenseMetric`` in mmengine's METRICS (idempotent; imports mmengine's evaluator, and so
    torch, only when a run registers its modules: the task scan stays light)."""
    global _METRIC_REGISTERED
    if _METRIC_REGISTERED:
        return
    from mmengine.evaluator import BaseMetric
    from mmengine.registry import METRICS

    class FourmDenseMetric(BaseMetric):
        """A dense task's metric in a run: each prediction is encoded as the task stores it, written to
        ``predictions_dir`` (when given) and scored from the stored values, as ``fourm-eval evaluate``
        scores the folder."""

        def __init__(self, task: str, predictions_dir: str | None = None, **kwargs: Any):
            from .. import get_task

            self.task: DenseTask = get_task(task)  # type: ignore[assignment]
            super().__init__(prefix=self.task.metric_prefix, **kwargs)
            self.predictions_dir = Path(predictions_dir) if predictions_dir else None

        def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
            from fourm_eval.data.pngmap import write_png_map

            t = self.task
            for ds in data_samples:
                stored = t.encode(ds[t.pred_field]["data"].squeeze(0).float().cpu().numpy())
                name = Path(ds["img_path"]).stem
                if self.predictions_dir:
                    write_png_map(self.predictions_dir / f"{name}.png", stored)
                gt_file = Path(ds[t.gt_path_key])
                self.results.append((name, t.score(stored, t.read_ground_truth(gt_file), name, gt_file)))

        def compute_metrics(self, results: list) -> dict[str, float]:
            metrics, extras = self.task.summarize(dict(results))
            if self.predictions_dir:
                from ..runs import update_predictions_meta
                update_predictions_meta(self.predictions_dir, {"format": self.task.prediction_format,
                                                               "stems": sorted(r[0] for r in results), **extras})
            return metrics

    mm_register(METRICS, "FourmDenseMetric")(FourmDenseMetric)
    _METRIC_REGISTERED = True


__all__ = ["COLOR_JITTER_SETTINGS", "CONVNEXT_SETTINGS", "DenseTask", "batch_norm", "px", "quarter_blocks", "score_folder"]
