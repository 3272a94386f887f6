"""ImageNet-21K classification: the intermediate fine-tuning stage of the 4M-21 ImageNet protocol.

4M-21 (arXiv 2406.09406, Appendix G) fine-tunes on ImageNet-21K before ImageNet-1K. This task is that
stage, usable alone (``fourm-eval run in21k-cls``) and run by ``in1k-cls``'s ``4m-21`` protocol as its
``pre_stage`` (one command, one record naming both; README "ImageNet-21K then ImageNet-1K").

On the classification kit (``tasks/kits/classification.py``): the same classifier, transforms,
metric, predictions and footnote as ``in1k-cls``. What is this task's own is the data: the winter21
release unpacked, one folder per wnid, no split (``fourm_eval.data.imagenet21k_check``); the
validation images are held out per class by a seeded hash of the file name (``val_per_class``), and
the lists go to the run directory (``data/train_samples.json``, ``data/val_samples.json``).

Predictions: ``predictions/val_predictions.csv`` as in1k-cls (``file`` = ``<wnid>/<name>``);
``fourm-eval evaluate in21k-cls`` re-scores them against the class of each file's folder, over the
run's held-out list (``RUN/data/val_samples.json``, found beside the predictions folder).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fourm_eval.errors import PredictionsError

from .base import Log, PreparedData, Progress
from .kits.classification import ImageClassificationTask, read_predictions_csv, score_predictions
from .schema import S


class In21kCls(ImageClassificationTask):
    name = "in21k-cls"
    title = "ImageNet-21K classification (winter21 release; the 4M-21 intermediate fine-tuning stage)"
    data_kind = "imagenet21k"
    data_title = "ImageNet-21K"
    val_words = "the held-out val (val_per_class per class)"
    mini_data = "fourm_eval.data.imagenet21k_mini"
    reference_train_images = 13153500   # the winter21 release's images (19,167 classes), before the held-out val
    prediction_format = ("CSV with header file,top5,scores (as in1k-cls): one row per held-out val image, file = "
                         "<wnid>/<name> relative to the data root, top5 = class indices best first (index = "
                         "position of the wnid in sorted order), scores = their probabilities")
    settings = ImageClassificationTask.settings + (
        S("val_per_class", "int", "validation images held out of each class (the release has no split; a class "
          "gives at most half of its images)", per_size=False),
    )

    # data
    def data_identity(self, root: Path) -> dict[str, Any]:
        from fourm_eval.data.imagenet21k_check import listing_digest
        return {"listing_sha256": listing_digest(root)}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from fourm_eval.data import imagenet21k_check as ic
        from fourm_eval.data.imagenet_check import check_images
        from fourm_eval.results import atomic_write_json

        root = Path(root)
        classes = ic.classes_of(root)
        by_class, other = ic.list_classes(root, classes)
        seed = int(p.get("subset_seed", 0))
        train, val, short = ic.split(root, classes, by_class, int(p["val_per_class"]), seed)
        log(f"{root}: {len(classes)} classes, {len(train.samples) + len(val.samples)} images; held out "
            f"{len(val.samples)} for validation ({p['val_per_class']} per class"
            + (f"; {short} small class(es) gave fewer" if short else "") + ")"
            + (f"; {len(other)} non-image file(s) ignored, e.g. {other[0]}" if other else ""))
        listings = {"train": train, "val": val}
        subsets = self.apply_subsets(listings, p)
        for split, lst in listings.items():
            label = f"checking {split} images"
            cb = (lambda i, n, label=label: progress(label, i, n)) if progress else None
            check_images(root, lst, skip_bad_images, progress=cb)
            if lst.bad_images:
                log(f"{split}: {len(lst.bad_images)} unusable image(s) skipped")
        files = self.write_listings(out_dir, listings)
        if out_dir is not None:
            atomic_write_json(out_dir / "classes.json", classes)
        record = {"root": str(root), "listing_sha256": self.data_identity(root)["listing_sha256"],
                  "n_train_images": len(train.samples), "n_val_images": len(val.samples),
                  "num_classes": len(classes),
                  "classes_sha256": hashlib.sha256(json.dumps(classes).encode()).hexdigest(),
                  "classes_file": "data/classes.json",
                  "class_order": "sorted wnid (class index = position in data/classes.json)",
                  "val_split": {"rule": "per class, the val_per_class files (at most half the class) with the "
                                        "smallest sha256('<seed>:<file name>')",
                                "val_per_class": int(p["val_per_class"]), "seed": seed,
                                "classes_with_fewer": short},
                  "skipped_bad_images": sum(len(lst.bad_images) for lst in listings.values()),
                  "ignored_non_image_files": len(other), "subsets": subsets}
        return PreparedData(root, len(train.samples), len(val.samples), record,
                            private={"classes": classes, "files": files})

    # metrics and predictions
    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        self.note_protocol(protocol, log)
        from fourm_eval.data import imagenet21k_check as ic
        predictions = Path(predictions)
        run_dir = (predictions if predictions.is_dir() else predictions.parent).parent
        listed = run_dir / "data" / "val_samples.json"
        if not listed.is_file():
            raise PredictionsError(f"{listed}: not found; ImageNet-21K has no official validation split, so "
                                   "predictions are scored over the held-out list of the run that made them "
                                   "(RUN/data/val_samples.json beside RUN/predictions)")
        classes = ic.classes_of(Path(data_root))
        index = {c: i for i, c in enumerate(classes)}
        truth = []
        for rel, _label in json.loads(listed.read_text()):
            wnid = rel.split("/")[0]
            if wnid not in index:
                raise PredictionsError(f"{listed}: {rel!r} names class {wnid!r}, which {data_root} does not have")
            truth.append((rel, index[wnid]))  # the label from the file's folder, not from the list
        preds = read_predictions_csv(predictions, len(classes))
        return score_predictions(preds, truth, predictions)


TASK = In21kCls()
