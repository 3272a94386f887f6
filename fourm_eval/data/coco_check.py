"""Validate a COCO 2017 layout before training; optionally drop bad images.

Checks, each failing with a message that names the file and what was expected:

* ``annotations/instances_{split}2017.json`` exists and is a COCO instances
  file (``images``, ``annotations``, ``categories`` lists with their fields);
* every annotation references an existing image and category, has a
  4-number bbox with non-negative size, and a polygon or RLE segmentation;
* every image file of ``{split}2017/`` exists and decodes (JPEG is decoded in
  draft mode, at reduced scale, which reads the whole entropy-coded stream
  and so catches truncated files at a fraction of the cost).

With ``skip_bad_images`` a missing or undecodable image is not an error: it
is dropped with its annotations, counted, and a cleaned annotation file is
written into the run directory and used instead.

Class order: mmdet numbers labels in the order the file lists its
``categories`` (pycocotools' ``getCatIds``), while the metric and the record
map label k to the k-th smallest category id. A file whose categories are not
listed in id order (legal COCO) is therefore also rewritten, categories sorted
by id, into the run directory, so train, val, metric and record share one
order. Train and val must declare the same categories (:func:`check_same_categories`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..checkpoints import sha256_file
from .checks import DatasetError, check_image, check_samples, seeded_subset
from ..results import atomic_write_json


@dataclass
class SplitCheck:
    split: str
    ann_file: Path
    img_dir: Path
    n_images: int
    n_annotations: int
    categories: list[dict[str, Any]]
    ann_sha256: str
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    used_ann_file: Path | None = None  # the cleaned copy, when images were skipped
    subset_ids: list[int] | None = None  # the seeded random subset's image ids, when a subset was asked for


def annotation_file(root: Path, split: str) -> Path:
    """``annotations/instances_{split}2017.json`` under ``root``; a named error when it is missing."""
    ann = Path(root) / "annotations" / f"instances_{split}2017.json"
    if not ann.is_file():
        raise DatasetError(f"{ann}: annotation file not found (expected the COCO 2017 layout "
                           "annotations/instances_{train,val}2017.json under the data root)")
    return ann


def annotation_digest(root: Path, split: str) -> str:
    """sha256 of ``annotations/instances_{split}2017.json`` (no image is read), computed once per
    process for a file that has not changed (train2017's is 450 MB; a run asks twice)."""
    ann = annotation_file(root, split)
    st = ann.stat()
    return _digest(str(ann.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found (expected the COCO 2017 layout "
                           "annotations/instances_{train,val}2017.json under the data root)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a JSON object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: missing the '{key}' list of a COCO instances file")
    return data


def _validate_structure(path: Path, data: dict[str, Any]) -> None:
    cats = set()
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise DatasetError(f"{path}: category entry {c!r} lacks 'id' or 'name'")
        if not isinstance(c["id"], int) or isinstance(c["id"], bool):  # ids are sorted into the class order
            raise DatasetError(f"{path}: category id {c['id']!r} is not an integer")
        if c["id"] in cats:  # the id -> label map would be ambiguous
            raise DatasetError(f"{path}: category id {c['id']!r} is listed twice")
        cats.add(c["id"])
    if not cats:
        raise DatasetError(f"{path}: no categories")
    images = set()
    for im in data["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if not isinstance(im, dict) or k not in im]
        if missing:
            raise DatasetError(f"{path}: image entry {str(im)[:120]} lacks {missing}")
        images.add(im["id"])
    for a in data["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a or "category_id" not in a or "bbox" not in a:
            raise DatasetError(f"{path}: annotation {str(a)[:120]} lacks image_id, category_id or bbox")
        aid = a.get("id", "?")
        if a["image_id"] not in images:
            raise DatasetError(f"{path}: annotation {aid} references image_id {a['image_id']}, "
                               "which is not in 'images'")
        if a["category_id"] not in cats:
            raise DatasetError(f"{path}: annotation {aid} has category_id {a['category_id']}, "
                               f"not one of the {len(cats)} categories")
        b = a["bbox"]
        if (not isinstance(b, list) or len(b) != 4 or not all(isinstance(v, (int, float)) for v in b)
                or b[2] < 0 or b[3] < 0):
            raise DatasetError(f"{path}: annotation {aid} has bbox {b!r}; expected [x, y, w, h] with w, h >= 0")
        seg = a.get("segmentation")
        if seg is not None and not (
                (isinstance(seg, list) and all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in seg))
                or (isinstance(seg, dict) and "counts" in seg and "size" in seg)):
            raise DatasetError(f"{path}: annotation {aid} has a malformed segmentation; expected polygons "
                               "[[x1, y1, x2, y2, x3, y3, ...]] or an RLE {counts, size}")


def check_split(root: Path, split: str, skip_bad_images: bool, out_dir: Path | None,
                progress: Callable[[int, int], None] | None = None, workers: int | None = None,
                ann_sha256: str | None = None, subset: int | None = None, subset_seed: int = 0) -> SplitCheck:
    """Validate one split; ``ann_sha256`` skips re-hashing an annotation file already hashed.

    ``categories`` of the result are sorted by id; with ``out_dir``, ``used_ann_file`` is set
    whenever the file mmdet should read differs from the original (bad images dropped, categories
    not listed in id order)."""
    ann = root / "annotations" / f"instances_{split}2017.json"
    img_dir = root / f"{split}2017"
    data = _load_json(ann)
    _validate_structure(ann, data)
    if not img_dir.is_dir():
        raise DatasetError(f"{img_dir}: image folder not found (expected {split}2017/ next to annotations/)")
    subset_ids = None
    if subset is not None and int(subset) < len(data["images"]):
        # a seeded random subset (not the first N, which follow the file's order), chosen before the
        # image check so that only the images used are decoded; the ids are written beside the copy
        subset_ids, _ = seeded_subset(sorted(im["id"] for im in data["images"]), subset, subset_seed)
        keep = set(subset_ids)
        data["images"] = [im for im in data["images"] if im["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    files = {im["file_name"]: img_dir / im["file_name"] for im in data["images"]}

    def one(name: str) -> tuple[list[tuple[str, str]], None]:
        reason = check_image(files[name])
        return ([(str(files[name]), reason)] if reason else []), None

    _, bad = check_samples(list(files), one, skip_bad=skip_bad_images, where=f"COCO {split}2017 ({root})",
                           progress=progress, workers=workers)
    by_id = sorted(data["categories"], key=lambda c: c["id"])
    reorder = by_id != data["categories"]
    data["categories"] = by_id
    result = SplitCheck(split, ann, img_dir, len(data["images"]), len(data["annotations"]), by_id,
                        ann_sha256 or sha256_file(ann), bad)
    if bad:
        bad_names = {Path(f).name for f, _ in bad}
        keep_ids = {im["id"] for im in data["images"] if im["file_name"] not in bad_names}
        data["images"] = [im for im in data["images"] if im["id"] in keep_ids]
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep_ids]
        result.n_images, result.n_annotations = len(data["images"]), len(data["annotations"])
    # the copy mmdet reads: without the bad images, categories in id order (see the module docstring);
    # no out_dir is a check only (``fourm-eval data check``), which writes nothing
    if subset_ids is not None:
        result.subset_ids = [i for i in subset_ids if i in {im["id"] for im in data["images"]}]
    if (bad or reorder or subset_ids is not None) and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.used_ann_file = atomic_write_json(out_dir / f"instances_{split}2017.cleaned.json", data)
        if subset_ids is not None:
            atomic_write_json(out_dir / f"{split}_subset_ids.json",
                              {"split": split, "n": len(result.subset_ids), "seed": int(subset_seed),
                               "image_ids": result.subset_ids})
    return result


def check_same_categories(train: SplitCheck, val: SplitCheck) -> None:
    """Train and val must declare the same id -> name categories (in any order): the model's
    classes come from one, the metric's from the other, and label k must mean one class in both."""
    a = {c["id"]: c["name"] for c in train.categories}
    b = {c["id"]: c["name"] for c in val.categories}
    if a == b:
        return
    diffs = []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        diffs.append(f"only in {train.split}: " + ", ".join(f"{i} ({a[i]!r})" for i in only_a))
    if only_b:
        diffs.append(f"only in {val.split}: " + ", ".join(f"{i} ({b[i]!r})" for i in only_b))
    renamed = [i for i in sorted(set(a) & set(b)) if a[i] != b[i]]
    if renamed:
        diffs.append("same id, different name: " + ", ".join(f"{i} ({a[i]!r} vs {b[i]!r})" for i in renamed))
    raise DatasetError(f"{train.ann_file} and {val.ann_file} declare different categories (the same ids with "
                       "the same names are needed, in any order):\n  " + "\n  ".join(diffs))
