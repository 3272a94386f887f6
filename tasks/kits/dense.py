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

from fourm_eval.errors import ConfigError, PredictionsError

from ..base import RunContext, Task
from ..mmreg import once, register as mm_register
from ..schema import S


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
    xl_tuning_published: ClassVar[str | None] = None  # how 4M-21 tunes XL on this task, when not fully (named in
    # the footnote of an XL run that tunes otherwise)

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
    def score_image(self, stored: np.ndarray, gt: np.ndarray, name: str, scoring: dict[str, Any]) -> Any:
        """Per-image statistics of a stored prediction against its ground truth, both as ``scoring``
        views them (same size)."""

    @abstractmethod
    def summarize(self, per_image: dict[str, Any], scoring: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """The metrics (each ``metrics`` name) from every image's statistics, and extra entries
        for the predictions' ``meta.json`` (e.g. per-class values)."""

    @abstractmethod
    def scoring(self, p: dict[str, Any]) -> dict[str, Any]:
        """How a profile's protocol scores (JSON): ``procedure`` (``fourm_eval.data.geometry``:
        original, long-side, short-side-crop), ``size`` where it resizes, and the kit's own keys.
        Written to the predictions' ``meta.json``; ``fourm-eval evaluate`` scores by it."""

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
        from . import linear_head  # noqa: F401 - DINOv2's linear heads into mmseg's MODELS
        _register_transforms()
        _register_metric()
        self.register_extra()

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        train, test = self.pipelines(ctx.profile)
        return dict(model=self.model_cfg(ctx), train_dataset=self.dataset_cfg(ctx, self.train_split, train, False),
                    val_dataset=self.dataset_cfg(ctx, self.scored_split, test, True),
                    val_evaluator=dict(type="FourmDenseMetric", task=self.name, scoring=self.scoring(ctx.profile),
                                       predictions_dir=str(ctx.predictions_dir) if ctx.predictions_dir else None))

    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k.removeprefix(self.metric_prefix + "/"): float(v) for k, v in evaluator_out.items()}

    def footnote_head(self, c: dict[str, Any]) -> str:
        """The head in words (a kit adds its own heads)."""
        head = c.get("head", "?")
        if head == "linear":
            return linear_head_words(c)
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
        from fourm_eval.lora import describe, is_lora
        tuning = describe(c.get("finetune"))  # the run's own mode (no finetune section: full)
        if frozen(c):
            tuning = "linear probe (backbone frozen, in eval mode; only the head trains)"
        if c.get("model_size") == "xl" and self.xl_tuning_published and not is_lora(c):
            tuning += f" (4M-21 fine-tunes XL with {self.xl_tuning_published})"
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

    def score(self, stored: np.ndarray, gt: np.ndarray, pred_file: Path | str, gt_file: Path | str,
              scoring: dict[str, Any]) -> Any:
        """One stored prediction against its ground truth file's map, as ``scoring`` views them: the
        prediction is at the scored size (as a run stores it) or at the ground truth's full size
        (then viewed like the ground truth: nearest-resized, cropped); any other size is an error."""
        from fourm_eval.data.geometry import scored_shape, scored_view

        proc, size = scoring["procedure"], scoring.get("size")
        want = scored_shape(gt.shape[0], gt.shape[1], proc, size)
        if stored.shape != want:
            if stored.shape != gt.shape:
                sizes = f"{want[1]}x{want[0]}" + ("" if want == gt.shape else f" (scored by {proc} {size}) or "
                                                                               f"{gt.shape[1]}x{gt.shape[0]}")
                raise PredictionsError(f"{pred_file}: prediction is {stored.shape[1]}x{stored.shape[0]} (width x "
                                       f"height); for its ground truth {gt_file} ({gt.shape[1]}x{gt.shape[0]}) "
                                       f"a prediction is {sizes}")
            stored = scored_view(stored, proc, size)
        return self.score_image(stored, scored_view(gt, proc, size), str(pred_file), scoring)

    def protocol_scoring(self, protocol: str) -> dict[str, Any]:
        """The scoring of one of the task's protocols (its profile ``configs/<task>.<protocol>.yaml``)."""
        from ..profiles import load_profile, resolve_per_size
        return self.scoring(resolve_per_size(load_profile(self.name, protocol), "b"))

    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        """Score a folder of stored predictions against the scored split of ``data_root`` (only the
        images its ``meta.json`` names, when it names them), by the scoring its ``meta.json`` names,
        or ``protocol``'s (which wins); with neither, by the ``paper`` protocol's, said through ``log``."""
        gt = self.ground_truth_files(Path(data_root))
        stems, scoring = _read_meta(Path(predictions))
        if protocol is not None:
            theirs, scoring = scoring, self.protocol_scoring(protocol)
            if log and theirs is not None and theirs != scoring:
                log(f"scored by protocol {protocol} ({scoring}), not the run's ({theirs})")
        elif scoring is None:
            scoring = self.protocol_scoring("paper")
            if log:
                log(f"WARNING: {predictions} does not say how it is scored (no 'scoring' in a meta.json); scored by "
                    f"the paper protocol's procedure {scoring}; name one with --protocol")
        if stems is not None:
            unknown = sorted(set(stems) - set(gt))
            if unknown:
                raise PredictionsError(f"{Path(predictions) / 'meta.json'} names {len(unknown)} image(s) without "
                                       f"ground truth in the {self.scored_split} split of {data_root}: {unknown[:5]}")
            gt = {s: gt[s] for s in stems}
        return score_folder(self, Path(predictions), gt, scoring)[0]


CONVNEXT_SETTINGS = (
    S("convnext", "section", "the ConvNeXt head (MultiMAE's adapter, tasks/dense_heads.py; needed with head convnext)",
      default=None, null=True, per_size=False),
    S("convnext.decoder_dim", "int", "features per token after the first linear"),
    S("convnext.preds_per_patch", "int", "sub-patches per token (a square number)"),
    S("convnext.depth", "int", "ConvNeXt blocks"),
    S("convnext.final_norm", "bool", "the encoder's final norm on the last block's tokens before the head "
      "(ml-4m's FourMViT applies it; MultiMAE's MultiViT has none)"),
)


# the backbone's training mode: the key (and the meaning) of the classification kit's ``mode``, so a record's
# ``config.mode`` says "linear" for every frozen-backbone probe (fourm_eval.results.finetune_mode reads it)
MODE_SETTING = S("mode", "str", "finetune: the backbone trains (in full, or its LoRA adapters); linear: the backbone "
                 "is frozen and in eval mode (no gradient, no optimiser state, every weight unchanged), only the head "
                 "trains (a linear probe)", default="finetune", choices=("finetune", "linear"))

# DINOv2's linear heads (tasks/kits/linear_head.py): the tokens of one block, or of several concatenated, a
# BatchNorm (segmentation) and a 1x1 convolution; the depth kit adds its bins (tasks/kits/depth.py)
LINEAR_SETTINGS = (
    S("linear", "section", "DINOv2's linear head (tasks/kits/linear_head.py; needed with head linear)", default=None,
      null=True, per_size=False),
    S("linear.layers", "int", "1: the last block's tokens (DINOv2 'linear'); 4: four blocks' tokens concatenated "
      "(DINOv2 'ms' / 'linear4')", choices=(1, 4)),
    S("linear.blocks", "list", "with layers 4: the four blocks (0-based) whose tokens are concatenated (null: the "
      "last four)", default=None, null=True, item="int", length=4),
    S("linear.final_norm", "bool", "the encoder's final norm on each block's tokens before the head"),
    S("linear.batch_norm", "bool", "a BatchNorm (affine; SyncBN with several processes) on the concatenated "
      "features before the 1x1 convolution"),
    S("linear.global_token", "bool", "concatenate to each block's tokens a global token, broadcast over the grid "
      "(DINOv2: the CLS token; 4M has none: the mean of the block's patch tokens, a recorded deviation)",
      default=False),
)


def linear_blocks(p: dict[str, Any], num_layers: int) -> list[int]:
    """The 0-based blocks a linear head reads: the last one, or the four of ``linear.blocks`` (default: the last
    four); a named error for blocks the backbone does not have."""
    sec = head_section(p, "linear")
    n, k = int(num_layers), int(sec["layers"])
    if k == 1:
        return [n - 1]
    blocks = sec.get("blocks")
    blocks = list(range(n - 4, n)) if blocks is None else [int(b) for b in blocks]
    if len(blocks) != 4 or blocks != sorted(set(blocks)) or not all(0 <= b < n for b in blocks):
        raise ConfigError(f"linear.blocks = {blocks}: four increasing block indices of the backbone's {n} blocks "
                          f"(0..{n - 1})")
    return blocks


def frozen(p: dict[str, Any]) -> bool:
    """The profile's ``mode: linear``: the backbone frozen (FourmEvalViT's ``frozen``)."""
    return p.get("mode", "finetune") == "linear"


def linear_head_words(c: dict[str, Any]) -> str:
    """DINOv2's linear head in a footnote (``c``: the record's config)."""
    h = c.get("linear") if isinstance(c.get("linear"), dict) else {}
    layers = h.get("layers", "?")
    what = ("the last block's tokens" if layers == 1 else
            f"the tokens of blocks {h.get('blocks') or 'the last four'} concatenated")
    extra = ([" + a global token (mean of patch tokens, in place of DINOv2's CLS)"] if h.get("global_token") else [])
    norm = {True: " after the encoder's final norm", False: " without the encoder's final norm"}.get(
        h.get("final_norm"), "")
    return (f"DINOv2 linear head ({layers} block(s): {what}{norm}{''.join(extra)}, "
            + ("BatchNorm + " if h.get("batch_norm") else "") + "1x1 convolution)")


# the kit's colour augmentation: FourmColorJitter (+ FourmToGray) as the profile section ``color_jitter``,
# and mmseg's PhotoMetricDistortion
COLOR_SETTINGS = (
    S("color_jitter", "section", "colour jitter (torchvision's ColorJitter, MultiMAE's values; null: none)",
      default=None, null=True, per_size=False),
    S("color_jitter.prob", "float", "probability per image"),
    *(S(f"color_jitter.{k}", "range", f"{k}: a strength or a [lo, hi] range (torchvision's / albumentations' meaning)")
      for k in ("brightness", "contrast", "saturation", "hue")),
    S("color_jitter.to_gray", "float", "then grey with this probability (albumentations' ToGray)", default=0.0),
    S("photometric_distortion", "bool", "mmseg's PhotoMetricDistortion on training images (the mmseg configs' "
      "colour augmentation)", default=False),
)


def color_transforms(p: dict[str, Any]) -> list[dict]:
    """The training colour augmentation the profile names (``color_jitter``, ``photometric_distortion``)."""
    out: list[dict] = []
    cj = p.get("color_jitter")
    if cj:
        out.append(dict(type="FourmColorJitter", prob=float(cj["prob"]), brightness=cj["brightness"],
                        contrast=cj["contrast"], saturation=cj["saturation"], hue=cj["hue"]))
        if float(cj.get("to_gray", 0.0)) > 0:
            out.append(dict(type="FourmToGray", prob=float(cj["to_gray"])))
    if p.get("photometric_distortion"):
        out.append(dict(type="PhotoMetricDistortion"))
    return out


def color_words(p: dict[str, Any]) -> list[str]:
    """The colour augmentation in a footnote."""
    cj = p.get("color_jitter") if isinstance(p.get("color_jitter"), dict) else None
    out = ["colour jitter" + (" + grey" if cj and float(cj.get("to_gray") or 0) > 0 else "")] if cj else []
    return out + (["photometric distortion"] if p.get("photometric_distortion") else [])


def px(size: Any) -> str:
    """A crop size in a footnote: ``96`` or ``32 x 64`` (height x width)."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{size[0]} x {size[1]}"
    return str(size if size is not None else "?")


def head_section(p: dict[str, Any], head: str) -> dict[str, Any]:
    """The profile's section of ``head`` (a named error when the profile has none)."""
    sec = p.get(head)
    if not isinstance(sec, dict):
        raise ConfigError(f"head {head} needs the profile section {head!r} (configs/README.md lists its keys)")
    return sec


def quarter_blocks(depth: int) -> list[int]:
    """0-based blocks at depth 1/4, 1/2, 3/4, 1 (2, 5, 8, 11 for 12 blocks; 0, 1, 2, 3 for 4): the
    levels of multi-level heads (UperNet, DPT)."""
    return [depth * k // 4 - 1 for k in range(1, 5)]


def batch_norm() -> dict:
    """BN, or SyncBN when the run has several processes (as mmseg's configs)."""
    import os
    return dict(type="SyncBN" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "BN", requires_grad=True)


@once
def _register_transforms() -> None:
    """The kit's ``FourmColorJitter``, ``FourmToGray`` and ``FourmTestGeometry`` in mmseg's TRANSFORMS
    (idempotent)."""
    from mmcv.transforms import BaseTransform
    from mmseg.registry import TRANSFORMS

    class FourmColorJitter(BaseTransform):
        """torchvision's ColorJitter (brightness, contrast, saturation, hue; random order) applied
        with probability ``prob`` (MultiMAE's colour jitter: albumentations' ColorJitter with the
        same values; a value is a strength or a [lo, hi] range, as both libraries take it), on the
        BGR uint8 image of an mmseg pipeline."""

        def __init__(self, prob: float = 0.5, brightness: Any = 0.4, contrast: Any = 0.4,
                     saturation: Any = 0.2, hue: Any = 0.1):
            from torchvision.transforms import ColorJitter

            self.prob = prob
            r = lambda v: tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)  # noqa: E731
            self.jitter = ColorJitter(brightness=r(brightness), contrast=r(contrast), saturation=r(saturation),
                                      hue=r(hue))

        def transform(self, results: dict) -> dict:
            import torch

            if self.prob <= 0 or torch.rand(()).item() >= self.prob:
                return results
            rgb = torch.from_numpy(np.ascontiguousarray(results["img"][..., ::-1])).permute(2, 0, 1)
            results["img"] = np.ascontiguousarray(self.jitter(rgb).permute(1, 2, 0).numpy()[..., ::-1])
            return results

        def __repr__(self) -> str:
            return f"FourmColorJitter(prob={self.prob}, {self.jitter!r})"

    class FourmToGray(BaseTransform):
        """The image to grey (ITU-R 601 luma, 3 channels) with probability ``prob`` (albumentations'
        ToGray, MultiMAE's NYUv2 augmentation)."""

        def __init__(self, prob: float = 0.3):
            self.prob = prob

        def transform(self, results: dict) -> dict:
            import cv2
            import torch

            if self.prob <= 0 or torch.rand(()).item() >= self.prob:
                return results
            grey = cv2.cvtColor(results["img"], cv2.COLOR_BGR2GRAY)
            results["img"] = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
            return results

    class FourmTestGeometry(BaseTransform):
        """A single-pass test input as ``fourm_eval.data.geometry`` defines it: ``long-side`` (long side
        to ``size``, bilinear, then padded to ``size`` x ``size`` at the bottom and right with
        ``pad_value`` in pixel values) or ``short-side-crop`` (short side to ``size``, the centre square
        crop). The model's output is brought back to the unpadded input, the size scored (``ori_shape``
        set to it; the padding recorded as ``img_padding_size``, which mmseg's segmentors crop)."""

        def __init__(self, procedure: str, size: int, pad_value: float = 0.0):
            self.procedure, self.size, self.pad_value = procedure, int(size), float(pad_value)

        def transform(self, results: dict) -> dict:
            import cv2

            from fourm_eval.data.geometry import scaled_size

            img, s = results["img"], self.size
            h, w = img.shape[:2]
            side = "long" if self.procedure == "long-side" else "short"
            nh, nw = scaled_size(h, w, s, side)
            if (nh, nw) != (h, w):
                img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
            pad = [0, 0, 0, 0]
            if self.procedure == "short-side-crop":
                y0, x0 = (nh - s) // 2, (nw - s) // 2
                img = img[y0:y0 + s, x0:x0 + s]
                nh = nw = s
            elif self.procedure == "long-side":
                pad = [0, s - nw, 0, s - nh]  # left, right, top, bottom (mmseg's order)
                img = cv2.copyMakeBorder(img, 0, s - nh, 0, s - nw, cv2.BORDER_CONSTANT, value=[self.pad_value] * 3)
            else:
                raise ValueError(f"FourmTestGeometry: unknown procedure {self.procedure!r}")
            results["img"] = np.ascontiguousarray(img)
            results["img_shape"] = img.shape[:2]
            results["ori_shape"] = (nh, nw)
            results["img_padding_size"] = pad
            results["scale_factor"] = (nw / w, nh / h)
            return results

    for cls in (FourmColorJitter, FourmToGray, FourmTestGeometry):
        mm_register(TRANSFORMS, cls.__name__)(cls)


TEST_META_KEYS = ("img_path", "seg_map_path", "depth_map_path", "ori_shape", "img_shape", "scale_factor",
                  "img_padding_size", "reduce_zero_label")


def single_pass_geometry(procedure: str, size: int, pad_value: float = 0.0) -> list[dict]:
    """The test pipeline's resize (and crop or pad) of a single-pass procedure."""
    return [dict(type="FourmTestGeometry", procedure=procedure, size=int(size), pad_value=float(pad_value))]


def score_folder(task: DenseTask, pred_dir: Path, gt_files: dict[str, Path],
                 scoring: dict[str, Any]) -> tuple[dict[str, float], dict]:
    """Score ``pred_dir`` (one ``<stem>.png`` per entry of ``gt_files``, nothing else but
    ``meta.json``) with the task's metric as ``scoring`` says: (metrics, meta extras)."""
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
                            gt_files[stem], scoring) for stem in sorted(gt_files)}
    return task.summarize(per, scoring)


def _read_meta(pred_dir: Path) -> tuple[list[str] | None, dict[str, Any] | None]:
    """The image stems and the scoring a run's ``meta.json`` names (None for each it does not name, or
    without a meta.json); read once, a malformed file or entry a named error."""
    meta = pred_dir / "meta.json"
    if not meta.is_file():
        return None, None
    try:
        data = json.loads(meta.read_text())
        stems = data.get("stems")
        if stems is not None and not (isinstance(stems, list) and all(isinstance(x, str) for x in stems)):
            raise TypeError("'stems' is not a list of names")
    except (json.JSONDecodeError, AttributeError, TypeError) as e:
        raise PredictionsError(f"{meta}: not the meta.json of a fourm-eval run ({e}); remove it to score every "
                               "image") from None
    scoring = data.get("scoring")
    if scoring is not None and not (isinstance(scoring, dict) and isinstance(scoring.get("procedure"), str)):
        raise PredictionsError(f"{meta}: 'scoring' is {scoring!r}, not a scoring of a fourm-eval run; remove it and "
                               "name the protocol with --protocol")
    return stems, scoring


@once
def _register_metric() -> None:
    """``FourmDenseMetric`` in mmengine's METRICS (idempotent; imports mmengine's evaluator, and so
    torch, only when a run registers its modules: the task scan stays light)."""
    from mmengine.evaluator import BaseMetric
    from mmengine.registry import METRICS

    class FourmDenseMetric(BaseMetric):
        """A dense task's metric in a run: each prediction is encoded as the task stores it, written to
        ``predictions_dir`` (when given) and scored from the stored values, as ``fourm-eval evaluate``
        scores the folder."""

        def __init__(self, task: str, scoring: dict[str, Any], predictions_dir: str | None = None, **kwargs: Any):
            from .. import get_task

            self.task: DenseTask = get_task(task)  # type: ignore[assignment]
            super().__init__(prefix=self.task.metric_prefix, **kwargs)
            self.predictions_dir = Path(predictions_dir) if predictions_dir else None
            self.scoring = dict(scoring)

        def process(self, data_batch: dict, data_samples: Sequence[dict]) -> None:
            from fourm_eval.data.pngmap import write_png_map

            t = self.task
            for ds in data_samples:
                stored = t.encode(ds[t.pred_field]["data"].squeeze(0).float().cpu().numpy())
                name = Path(ds["img_path"]).stem
                if self.predictions_dir:
                    write_png_map(self.predictions_dir / f"{name}.png", stored)
                gt_file = Path(ds[t.gt_path_key])
                self.results.append((name, t.score(stored, t.read_ground_truth(gt_file), name, gt_file,
                                                   self.scoring)))

        def compute_metrics(self, results: list) -> dict[str, float]:
            metrics, extras = self.task.summarize(dict(results), self.scoring)
            if self.predictions_dir:
                from ..runs import update_predictions_meta
                update_predictions_meta(self.predictions_dir, {"format": self.task.prediction_format,
                                                               "scoring": self.scoring,
                                                               "stems": sorted(r[0] for r in results), **extras})
            return metrics

    mm_register(METRICS, "FourmDenseMetric")(FourmDenseMetric)


__all__ = ["COLOR_SETTINGS", "CONVNEXT_SETTINGS", "DenseTask", "LINEAR_SETTINGS", "MODE_SETTING", "frozen",
           "linear_blocks", "linear_head_words", "TEST_META_KEYS", "batch_norm", "color_transforms", "color_words", "head_section", "px",
           "quarter_blocks", "score_folder", "single_pass_geometry"]
