"""Per-patch semantic probe of frozen features on held-out generated scenes: the CI gate that notices the encoder.

The smokes of the transfer tasks train heads that learn the mini tasks even from random tokens, so a
broken checkpoint loader still passes them. This task probes what the tiny 4M learned in its
pre-training (``fourm_eval/pretrain.py``): from RGB patches, each 16 x 16 patch's semantic token (its
majority label among wall, floor and six shape kinds). The data are scenes of the same generator from
scene sets the pre-training never drew (``fourm_eval/data/scenes_mini.py``). The encoder is frozen;
its patch tokens (after the final norm, last 1 and last 4 blocks concatenated) are encoded once into the
feature cache (``fourm_eval/features.py``), and a grid of linear classifiers over the tokens (DINOv2's
grid, ``fourm_eval/probes.py``) is trained on them, the head chosen on held-out *training scenes*.

Metrics: ``patch_acc``, the share of validation patches whose semantic class the probe predicts right,
and ``mean_class_acc``, its mean over the eight classes (each class's patch recall). When the checkpoint
holds the tiny 4M's own decoder, also ``decoder_acc``: the share of validation patches whose semantic
token that decoder predicts right when it reads the frozen encoder as the suite loaded it (every token
visible; no training, so a change in the encoder's function that a re-fitted probe absorbs, such as a
transposed position table, still moves it). Predictions: ``predictions/val_patches.csv`` (the probe)
and ``predictions/val_patches_decoder.csv`` (the decoder), one row per validation scene,
``file,grid,classes``: the image path relative to the root, the patch grid ``ROWSxCOLS`` and the
predicted class of every patch, row-major; ``fourm-eval evaluate scene-probe`` re-scores them from the
annotation PNGs.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from fourm_eval.data.checks import DatasetError
from fourm_eval.errors import ConfigError, PredictionsError

from .base import Log, Metric, PreparedData, Progress, RunContext, Task
from .schema import S

PRED_FILE = "val_patches.csv"
DECODER_FILE = "val_patches_decoder.csv"   # the checkpoint's own decoder's predictions (same format)
CSV_HEADER = ["file", "grid", "classes"]
SPLITS = ("train", "val")
PATCH = 16
_UNUSED = "not used: a frozen-feature probe trains no encoder"


def patch_labels(annotation: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """(rows, cols) class of each patch: the most frequent class in it (ties: the lower), as the tiny 4M's
    semantic tokens (``fourm_eval.data.scenes.patch_tokens``). ``annotation`` holds class + 1."""
    from fourm_eval.data.scenes import LABELS

    lab = annotation.astype(np.int64) - 1
    H, W = lab.shape
    rows, cols = H // patch, W // patch
    cells = lab[:rows * patch, :cols * patch].reshape(rows, patch, cols, patch).transpose(0, 2, 1, 3)
    cells = cells.reshape(rows, cols, patch * patch)
    counts = np.stack([(cells == k).sum(axis=2) for k in range(len(LABELS))], axis=2)
    return counts.argmax(axis=2)


def score(pred: dict[str, np.ndarray], truth: dict[str, np.ndarray], num_classes: int, where: Path) -> dict[str, float]:
    """patch_acc and mean_class_acc over every validation scene; missing or extra scenes are named errors."""
    extra = sorted(set(pred) - set(truth))
    if extra:
        raise PredictionsError(f"{where}: {len(extra)} row(s) for files that are not validation scenes, e.g. {extra[:3]}")
    missing = sorted(set(truth) - set(pred))
    if missing:
        raise PredictionsError(f"{where}: no prediction for {len(missing)} of {len(truth)} validation scene(s), e.g. "
                               f"{missing[:3]}")
    correct = total = 0
    hit = np.zeros(num_classes)
    seen = np.zeros(num_classes)
    for f, t in truth.items():
        p = pred[f]
        if p.shape != t.shape:
            raise PredictionsError(f"{where}: {f}: a {p.shape[0]}x{p.shape[1]} grid, the scene has "
                                   f"{t.shape[0]}x{t.shape[1]} patches")
        correct += int((p == t).sum())
        total += t.size
        for c in range(num_classes):
            m = t == c
            seen[c] += m.sum()
            hit[c] += (p[m] == c).sum()
    present = seen > 0
    return {"patch_acc": correct / total, "mean_class_acc": float((hit[present] / seen[present]).mean())}


def write_predictions(path: Path, rows: list[tuple[str, np.ndarray]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_HEADER)
        for file, grid in sorted(rows, key=lambda r: r[0]):
            w.writerow([file, f"{grid.shape[0]}x{grid.shape[1]}", " ".join(str(int(c)) for c in grid.ravel())])
    tmp.replace(path)


def read_predictions(path: Path, num_classes: int) -> dict[str, np.ndarray]:
    from .kits.prediction_csv import csv_rows

    out: dict[str, np.ndarray] = {}
    for where, row in csv_rows(path, CSV_HEADER, PRED_FILE):
        try:
            r, c = (int(x) for x in row[1].lower().split("x"))
            cls = np.array([int(x) for x in row[2].split()], dtype=np.int64)
        except ValueError:
            raise PredictionsError(f"{where}: grid must be ROWSxCOLS and classes space-separated integers") from None
        if cls.size != r * c:
            raise PredictionsError(f"{where}: {cls.size} classes for a {r}x{c} grid")
        if cls.size and (cls.min() < 0 or cls.max() >= num_classes):
            raise PredictionsError(f"{where}: a class outside 0..{num_classes - 1}")
        if row[0] in out:
            raise PredictionsError(f"{where}: {row[0]!r} appears twice")
        out[row[0]] = cls.reshape(r, c)
    if not out:
        raise PredictionsError(f"{path / PRED_FILE if path.is_dir() else path}: no prediction rows")
    return out


class SceneProbe(Task):
    name = "scene-probe"
    title = "Per-patch semantic probe of frozen features on held-out generated scenes (what the tiny 4M learned)"
    data_kind = "scenes"
    mini_data = "fourm_eval.data.scenes_mini"
    probe_only = True
    metrics = (
        Metric("patch_acc", main=True, gated=True, description="share of validation patches whose semantic class "
               "(the patch's majority label) is predicted right"),
        Metric("mean_class_acc", description="patch recall averaged over the classes present"),
        Metric("decoder_acc", gated=True, description="share of validation patches whose semantic token the "
               "checkpoint's own pre-trained decoder predicts right over the frozen encoder (tiny 4M files only)"),
    )
    requires = ("torch", "timm")
    mm_scope = "mmengine"
    prediction_format = ("CSV with header file,grid,classes: one row per validation scene, file = its image path "
                         "relative to the data root, grid = ROWSxCOLS patches, classes = the predicted class per "
                         "patch, row-major (class index = annotation value - 1); val_patches.csv the probe's, "
                         "val_patches_decoder.csv the checkpoint decoder's")
    settings = (
        S("image_size", "int", "scenes are encoded at this size (square)", unit="px"),
        S("mode", "str", "patch-linear: a grid of linear classifiers over the frozen patch tokens",
          choices=("patch-linear",)),
        S("probe", "section", "the probe on cached patch features", per_size=False),
        S("probe.lrs", "list", "learning rates (before the x batch / 256 scaling)", item="float"),
        S("probe.n_last_blocks", "list", "heads on the last n blocks' patch tokens, concatenated", item="int"),
        S("probe.epochs", "int", "passes over the fitting patches"),
        S("probe.batch_size", "int", "patches per step"),
        S("probe.holdout", "float", "share of the training scenes held out to choose the head"),
        S("probe.shard_size", "int", "feature cache: scenes per shard", default=1024),
        S("probe.batch_size_extract", "int", "feature cache: scenes per encoder forward", default=64),
    ) + tuple(S(k, kind, _UNUSED, default=None, null=True, per_size=False) for k, kind in (
        ("batch_size", "int"), ("schedule", "section"), ("betas", "list"), ("weight_decay", "float"),
        ("layer_decay", "float"), ("drop_path", "float"), ("clip_grad", "float"), ("num_workers", "int")))

    # ---------------------------------------------------------------- data
    def _listing(self, root: Path) -> dict[str, list[tuple[str, str]]]:
        root = Path(root)
        if not (root / "images").is_dir() or not (root / "annotations").is_dir():
            raise DatasetError(f"{root}: expected images/{{train,val}}/*.png and annotations/{{train,val}}/*.png "
                               "(`fourm-eval data make-mini scene-probe OUT` writes them)")
        out = {}
        for split in SPLITS:
            imgs = sorted((root / "images" / split).glob("*.png"))
            if not imgs:
                raise DatasetError(f"{root / 'images' / split}: no .png scenes")
            pairs = []
            for im in imgs:
                ann = root / "annotations" / split / im.name
                if not ann.is_file():
                    raise DatasetError(f"{im}: no annotation {ann}")
                pairs.append((str(im.relative_to(root)), str(ann.relative_to(root))))
            out[split] = pairs
        return out

    def data_identity(self, root: Path) -> dict[str, Any]:
        h = hashlib.sha256()
        for split, pairs in self._listing(root).items():
            for im, ann in pairs:
                h.update(f"{im}\t{ann}\t{(Path(root) / ann).stat().st_size}\n".encode())
        return {"listing_sha256": h.hexdigest()}

    def check_data(self, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                   log: Log, progress: Progress | None = None) -> PreparedData:
        from PIL import Image

        from fourm_eval.data.scenes import LABELS
        from fourm_eval.results import atomic_write_json

        root = Path(root)
        listing = self._listing(root)
        n_cls = len(LABELS)
        files = {}
        for split, pairs in listing.items():
            for im, ann in pairs:
                try:
                    with Image.open(root / im) as a, Image.open(root / ann) as b:
                        size, lab = a.size, np.asarray(b)
                        a.convert("RGB").load()
                except OSError as e:
                    raise DatasetError(f"{root / im} or its annotation: cannot be decoded ({e})") from None
                if lab.ndim != 2 or lab.shape[::-1] != size:
                    raise DatasetError(f"{root / ann}: expected a single-channel {size[0]}x{size[1]} label image, "
                                       f"got shape {lab.shape}")
                if lab.min() < 1 or lab.max() > n_cls:
                    raise DatasetError(f"{root / ann}: label values {int(lab.min())}..{int(lab.max())}; expected "
                                       f"1..{n_cls} (value = class + 1: {', '.join(LABELS)})")
            log(f"{root}/images/{split}: {len(pairs)} scenes with annotations, every one decodes")
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                files[split] = atomic_write_json(out_dir / f"{split}_samples.json", [[im, ann] for im, ann in pairs])
        record = {"root": str(root), "listing_sha256": self.data_identity(root)["listing_sha256"],
                  "n_train_images": len(listing["train"]), "n_val_images": len(listing["val"]),
                  "num_classes": n_cls, "classes": list(LABELS), "patch": PATCH}
        return PreparedData(root, len(listing["train"]), len(listing["val"]), record,
                            private={"classes": list(LABELS), "files": files, "listing": listing})

    # ---------------------------------------------------------------- model (a probe: no mmengine model)
    def register_mm(self) -> None:
        return None

    def runner_parts(self, ctx: RunContext) -> dict[str, Any]:
        raise ConfigError(f"{self.name} is a frozen-feature probe (mode patch-linear): it has no trained model")

    def record_metrics(self, evaluator_out: dict[str, float]) -> dict[str, float]:
        return {k: float(v) for k, v in evaluator_out.items()}

    def write_predictions(self, pred_dir: Path, rows: list[tuple[str, np.ndarray]], decoder: bool = False) -> None:
        """A predictions file of a run (the probe's, or with ``decoder`` the checkpoint decoder's): one row
        per validation scene (file, grid, classes)."""
        write_predictions(Path(pred_dir) / (DECODER_FILE if decoder else PRED_FILE), rows)

    def truth(self, root: Path, rels: list[tuple[str, str]]) -> dict[str, np.ndarray]:
        from PIL import Image
        out = {}
        for im, ann in rels:
            with Image.open(Path(root) / ann) as b:
                out[im] = patch_labels(np.asarray(b))
        return out

    def evaluate(self, predictions: Path, data_root: Path, protocol: str | None = None,
                 log: Any = None) -> dict[str, float]:
        if protocol is not None and log:
            log(f"{self.name}: one scoring; --protocol {protocol} changes nothing")
        from fourm_eval.data.scenes import LABELS
        predictions = Path(predictions)
        truth = self.truth(data_root, self._listing(data_root)["val"])
        out = score(read_predictions(predictions, len(LABELS)), truth, len(LABELS), predictions)
        if predictions.is_dir() and (predictions / DECODER_FILE).is_file():
            dec = read_predictions(predictions / DECODER_FILE, len(LABELS))
            out["decoder_acc"] = score(dec, truth, len(LABELS), predictions / DECODER_FILE)["patch_acc"]
        return out

    def footnote(self, record: dict[str, Any]) -> str:
        pr = record.get("probe") or {}
        ch = pr.get("chosen") or {}
        c = record.get("config", {})
        return (f"{self.name} / {record.get('profile')}: frozen encoder, linear classifiers over its patch tokens "
                f"(grid of {pr.get('heads', '?')}, DINOv2 dinov2/eval/linear.py; chosen on held-out training scenes: "
                f"{ch.get('name', '?')}); {c.get('image_size', '?')} px held-out generated scenes; patch_acc over "
                "every validation patch")


TASK = SceneProbe()
__all__ = ["DECODER_FILE", "PRED_FILE", "SceneProbe", "TASK", "patch_labels", "read_predictions", "score", "write_predictions"]

