"""Validate an ADE20K (``ADEChallengeData2016``) layout before training.

Expected under the data root::

    images/training/*.jpg        annotations/training/*.png
    images/validation/*.jpg      annotations/validation/*.png

Annotations are single-channel 8-bit PNGs (mode L, or P read as its indices) of the image's size,
with 0 = "other" (ignored) and 1..150 the classes. Checks, each failing with a named error
(:class:`DatasetError`) that names the file and what was expected:

* the four folders exist and each split has at least one image;
* every image has its annotation (same stem) and every annotation its image;
* every image decodes (JPEG in draft mode, which still reads the whole entropy-coded stream);
* every annotation decodes, is 8-bit single-channel, has the image's size and no value above 150.

With ``skip_bad_images`` a sample that fails any per-file check (missing partner, undecodable,
size mismatch, bad values) is dropped and counted instead; folder-level problems stay errors.
The checked file list of each split is written into the run directory and is what the mmseg
dataset reads, so training and evaluation use exactly the checked samples.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .checks import DatasetError, check_image, check_samples, files_by_stem, pair_files, seeded_subset

SPLIT_DIRS = {"train": "training", "val": "validation"}
NUM_CLASSES = 150
IMG_SUFFIX, ANN_SUFFIX = ".jpg", ".png"


@dataclass
class SplitCheck:
    split: str
    img_dir: Path
    ann_dir: Path
    stems: list[str]                                   # usable samples, sorted
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    classes_present: list[int] = field(default_factory=list)  # class indices 0..149 labelled anywhere
    subset: int | None = None                          # the seeded subset's size, when one was asked for
    file_list: Path | None = None                      # the list the dataset reads (in the run dir)

    @property
    def n_images(self) -> int:
        return len(self.stems)


def split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    """(images/<split>, annotations/<split>); a named error when either folder is missing."""
    sub = SPLIT_DIRS[split]
    img_dir, ann_dir = Path(root) / "images" / sub, Path(root) / "annotations" / sub
    for d, what in ((img_dir, "image"), (ann_dir, "annotation")):
        if not d.is_dir():
            raise DatasetError(f"{d}: {what} folder not found (expected the ADEChallengeData2016 layout "
                               "images/{training,validation}/*.jpg and annotations/{training,validation}/*.png "
                               "under the data root)")
    return img_dir, ann_dir


def annotation_files(root: Path, split: str) -> dict[str, Path]:
    """stem -> annotation PNG of a split (no check beyond the folder's existence)."""
    return files_by_stem(split_dirs(root, split)[1], ANN_SUFFIX)


def annotation_digest(root: Path, split: str) -> str:
    """sha256 over the split's annotation files (names and bytes, sorted by name), computed once per
    process for an unchanged folder listing."""
    files = annotation_files(root, split)
    sig = tuple((s, p.stat().st_size, p.stat().st_mtime_ns) for s, p in sorted(files.items()))
    return _digest(str(Path(root).resolve()), split, sig)


@functools.lru_cache(maxsize=8)
def _digest(root: str, split: str, sig: tuple) -> str:
    h = hashlib.sha256()
    ann_dir = Path(root) / "annotations" / SPLIT_DIRS[split]
    for stem, _, _ in sig:
        h.update(stem.encode() + b"\0")
        h.update((ann_dir / (stem + ANN_SUFFIX)).read_bytes())
    return h.hexdigest()


def check_annotation(path: Path, image: Path) -> tuple[str | None, np.ndarray | None]:
    """(reason, classes present) for one annotation against its image's size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            img_size = im.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        img_size = None  # reported by the image check
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                return f"annotation is mode {im.mode}; expected a single-channel 8-bit PNG (mode L or P)", None
            if img_size is not None and im.size != img_size:
                return (f"annotation is {im.size[0]}x{im.size[1]} but its image {image.name} is "
                        f"{img_size[0]}x{img_size[1]} (w x h); they must be the same size"), None
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        return f"annotation does not decode ({type(e).__name__}: {e})", None
    counts = np.bincount(arr.ravel(), minlength=256)
    if counts[NUM_CLASSES + 1:].any():
        bad = [int(v) for v in np.flatnonzero(counts[NUM_CLASSES + 1:]) + NUM_CLASSES + 1][:10]
        return f"annotation has label values {bad} above {NUM_CLASSES} (expected 0 = other, 1..150)", None
    return None, np.flatnonzero(counts[1:NUM_CLASSES + 1])


def check_split(root: Path, split: str, skip_bad_images: bool, out_dir: Path | None = None,
                progress: Callable[[int, int], None] | None = None, subset: int | None = None,
                subset_seed: int = 0, workers: int | None = None) -> SplitCheck:
    img_dir, ann_dir = split_dirs(root, split)
    images, anns = files_by_stem(img_dir, IMG_SUFFIX), files_by_stem(ann_dir, ANN_SUFFIX)
    if not images:
        raise DatasetError(f"{img_dir}: no {IMG_SUFFIX} images")
    stems, unpaired = pair_files(images, anns, img_dir, ann_dir, IMG_SUFFIX, ANN_SUFFIX)
    stems, n_subset = seeded_subset(stems, subset, subset_seed)  # before the file checks: only those are read

    def one(stem: str) -> tuple[list[tuple[str, str]], np.ndarray | None]:
        errs = []
        reason = check_image(images[stem])
        if reason:
            errs.append((str(images[stem]), reason))
        a_reason, present = check_annotation(anns[stem], images[stem])
        if a_reason:
            errs.append((str(anns[stem]), a_reason))
        return errs, present

    present_any = np.zeros(NUM_CLASSES, dtype=bool)
    ok, bad = check_samples(stems, one, skip_bad=skip_bad_images, where=f"ADE20K {split} ({img_dir.parent.parent})",
                            bad=unpaired, on_ok=lambda _, present: present_any.__setitem__(present, True),
                            progress=progress, workers=workers)
    res = SplitCheck(split, img_dir, ann_dir, ok, bad, [int(c) for c in np.flatnonzero(present_any)], n_subset)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        res.file_list = write_file_list(out_dir / f"{split}_files.txt", ok)
    return res


def write_file_list(path: Path, stems: list[str]) -> Path:
    """The stems mmseg's dataset reads (one per line; its ``ann_file``), written atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(s + "\n" for s in stems))
    tmp.replace(path)
    return path
