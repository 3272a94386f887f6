"""ImageNet-1K classification: full fine-tuning (the 4M-21 protocol) and linear probing (MAE's).

On the classification kit (``tasks/kits/classification.py``: the predictions CSV and top-k;
``classification_model.py``: ``FourmClassifier`` on the shared backbone adapter ``FourmEvalViT``,
so the shared layer-decay optimiser, hooks, resume and evaluation apply):

* ``mode: finetune``: tokens of the last block (after the encoder's final norm with
  ``final_norm: true``, as ml-4m's FourMViT; before it with false) -> mean over the patch
  tokens -> LayerNorm -> Linear (4M has no CLS token; DeiT III and MAE use the same pooling
  by default; ``pool: cls`` takes their normed CLS token, recorded).
* ``mode: linear``: the backbone is frozen (no parameter trains, it stays in eval mode):
  mean-pooled tokens of the last ``probe_blocks`` blocks, each after the encoder's final
  norm (with ``final_norm: true``, MAE's), averaged -> BatchNorm without affine -> Linear
  (MAE's linear probe).

Training: timm's ``create_transform`` (random-resized crop, flip, RandAugment, random
erasing), ``Mixup`` (mixup / cutmix / label smoothing as soft targets) with
``SoftTargetCrossEntropy`` (``LabelSmoothingCrossEntropy`` without mixing), and optionally
``ModelEmaV3`` (evaluated with and without EMA). Evaluation: the standard centre crop
(resize the short side to ``image_size / eval_crop_pct``, crop ``image_size``; 256 / 224).

Data: the ImageFolder layout ``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``, checked by
``fourm_eval.data.imagenet_check``; class index = position of the wnid in sorted order.
Metric: top-1 / top-5 accuracy as fractions. Predictions: ``predictions/val_predictions.csv``
(``file,top5,scores``; ``val_predictions_ema.csv`` too with EMA), re-scored exactly by
``fourm-eval evaluate in1k-cls``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import Log, PreparedData, Progress
from .kits.classification import (ImageClassificationTask, build_model_cfg, read_predictions_csv,  # noqa: F401
                                  score_predictions, transform_cfg)


# --------------------------------------------------------------------- task
class In1kCls(ImageClassificationTask):
    name = "in1k-cls"
    title = "ImageNet-1K classification (full fine-tuning, 4M-21 recipe; linear probe, MAE recipe)"
    data_kind = "imagenet"
    data_title = "ImageNet-1K"
    mini_data = "fourm_eval.data.imagenet_mini"
    reference_train_images = 1281167   # ImageNet-1K (ILSVRC-2012) train
    prediction_format = ("CSV with header file,top5,scores: one row per val image, file relative to the data root, "
                         "top5 = class indices best first (index = position of the wnid in sorted order), "
                         "scores = their probabilities")

    # data
    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.imagenet_check import listing_digest
        return {"listing_sha256": {s: listing_digest(root, s) for s in ("train", "val")}}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data import imagenet_check as ic

        root = Path(root)
        classes = ic.classes_of(root)
        listings = {s: ic.list_split(root, s, classes) for s in ("train", "val")}
        subsets = self.apply_subsets(listings, p)
        for split, lst in listings.items():
            label = f"checking {split}/"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            ic.check_images(root, lst, skip_bad_images, progress=cb)
            n_bad = len(lst.bad_images)
            log(f"{lst.folder}: {len(lst.samples)} images in {len(lst.classes_present)} class folders, every image "
                "decodes" + (f"; {n_bad} unusable image(s) skipped" if n_bad else "")
                + (f"; {len(lst.other_files)} non-image file(s) ignored, e.g. {lst.other_files[0]}"
                   if lst.other_files else ""))
        missing_val = sorted(set(classes) - set(listings["val"].classes_present))
        if missing_val:
            log(f"val/ has no images of {len(missing_val)} train class(es), e.g. {missing_val[:3]}")
        files = self.write_listings(out_dir, listings)
        ident = self.data_identity(root)
        record = {"root": str(root), "listing_sha256": ident["listing_sha256"],
                  "n_train_images": len(listings["train"].samples), "n_val_images": len(listings["val"].samples),
                  "num_classes": len(classes), "classes": classes,
                  "class_order": "sorted wnid (class index = position in this list)",
                  "skipped_bad_images": sum(len(lst.bad_images) for lst in listings.values()),
                  "ignored_non_image_files": sum(len(lst.other_files) for lst in listings.values()),
                  "val_classes_without_images": missing_val, "subsets": subsets}
        return PreparedData(root, len(listings["train"].samples), len(listings["val"].samples), record,
                            private={"classes": classes, "files": files})

    # metrics and predictions
    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        self.note_protocol(protocol, log)
        from fourm_eval.data import imagenet_check as ic
        root = Path(data_root)
        classes = ic.classes_of(root)
        truth = ic.list_split(root, "val", classes).samples
        preds = read_predictions_csv(Path(predictions), len(classes))
        return score_predictions(preds, truth, Path(predictions))


TASK = In1kCls()
