"""The ImageNet-1K ImageFolder layout: listing, validation with named errors, identity.

Expected layout (val after the usual re-foldering into class folders)::

    ROOT/train/<wnid>/*.JPEG
    ROOT/val/<wnid>/*.JPEG

* Classes are the folder names of ``train/``, in sorted order: class index k is the
  k-th wnid in sorted order (the standard ImageNet index), for training, the metric,
  the predictions and the record alike.
* Errors name the file or folder: a missing split folder, val delivered flat (images
  directly in ``val/``), an empty class folder, a val class that train does not have,
  an image that does not decode (or ``--skip-bad-images``: dropped and counted).
* Files are decoded by content, not by suffix: ImageNet's ``.JPEG`` files include CMYK
  and grayscale JPEGs and a PNG; all are read and converted to RGB.
* Files with other suffixes are not images of the dataset; they are counted and named
  in the log and the record, never read.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checks import DatasetError, check_image, check_samples

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff")
SPLITS = ("train", "val")


@dataclass
class SplitListing:
    split: str
    folder: Path
    samples: list[tuple[str, int]]                 # (path relative to the root, class index)
    classes_present: list[str]                     # class folders of this split (sorted)
    other_files: list[str] = field(default_factory=list)  # files with non-image suffixes (not used)
    bad_images: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _class_folders(folder: Path) -> tuple[list[str], list[str]]:
    """(class folder names, loose files) directly under ``folder``; hidden entries ignored."""
    dirs, files = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            (dirs if e.is_dir() else files).append(e.name)
    return sorted(dirs), sorted(files)


def split_folder(root: Path, split: str) -> Path:
    folder = Path(root) / split
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found (expected the ImageFolder layout {split}/<wnid>/*.JPEG "
                           "under the data root)")
    return folder


def classes_of(root: Path) -> list[str]:
    """The class order of a dataset: the sorted folder names of ``train/``."""
    folder = split_folder(root, "train")
    dirs, files = _class_folders(folder)
    if not dirs:
        raise DatasetError(f"{folder}: no class folders (expected train/<wnid>/*.JPEG)"
                           + (f"; it holds {len(files)} loose file(s) such as {files[0]!r}" if files else ""))
    return dirs


def list_split(root: Path, split: str, classes: list[str]) -> SplitListing:
    """Every image of a split with its class index; layout errors are named."""
    folder = split_folder(root, split)
    dirs, loose = _class_folders(folder)
    loose_images = [f for f in loose if f.lower().endswith(IMAGE_SUFFIXES)]
    if loose_images:
        hint = (" ImageNet's val images come flat with a separate label list; move them into one folder per "
                "wnid (the usual val re-foldering) first." if split == "val" else "")
        raise DatasetError(f"{folder}: {len(loose_images)} image(s) directly in {split}/ (e.g. {loose_images[0]!r}); "
                           f"expected {split}/<wnid>/<image>.{hint}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise DatasetError(f"{folder}: class folder(s) {unknown[:10]} are not classes of train/ "
                           f"({len(classes)} classes); every {split} class must also be a train class")
    samples: list[tuple[str, int]] = []
    other: list[str] = [f"{split}/{f}" for f in loose]
    for d in dirs:
        names, others = scan_class_folder(folder / d, f"{split}/{d}")
        other += others
        samples += [(f"{split}/{d}/{n}", index[d]) for n in names]
    return SplitListing(split, folder, samples, dirs, sorted(other))


def scan_class_folder(folder: Path, rel: str) -> tuple[list[str], list[str]]:
    """(image file names of one class folder, sorted; its other entries as ``rel/<name>``, never read);
    hidden entries ignored, a folder without images a named error."""
    names, other = [], []
    with os.scandir(folder) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES):
                names.append(e.name)
            else:
                other.append(f"{rel}/{e.name}")
    if not names:
        raise DatasetError(f"{folder}: class folder without images (expected *.JPEG files)")
    return sorted(names), other


def check_images(root: Path, listing: SplitListing, skip_bad_images: bool,
                 progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> None:
    """Decode every image (by content). A failure is a named error listing every unusable image, or
    (``skip_bad_images``) the image is dropped from the samples and kept in ``listing.bad_images``."""
    root = Path(root)

    def one(rel: str) -> tuple[list[tuple[str, str]], None]:
        reason = check_image(root / rel)
        return ([(str(root / rel), reason)] if reason else []), None

    rels = [rel for rel, _ in listing.samples]
    ok, problems = check_samples(rels, one, skip_bad=skip_bad_images, where=f"{listing.split}/ of {root}",
                                 progress=progress, workers=workers)
    kept = set(ok)
    listing.bad_images = [(str(Path(f).relative_to(root)), r) for f, r in problems]
    listing.samples = [s for s in listing.samples if s[0] in kept]


def listing_digest(root: Path, split: str) -> str:
    """sha256 of the split's sorted ``relative-path size`` lines (no image is read): the
    dataset's cheap identity for the run directory; computed once per process per state."""
    folder = split_folder(root, split)
    return _listing_digest(str(folder.resolve()), folder.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _listing_digest(folder: str, _mtime_ns: int) -> str:
    h = hashlib.sha256()
    base = Path(folder)
    lines = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, base)
        for f in filenames:
            if not f.startswith("."):
                lines.append(f"{rel}/{f} {os.path.getsize(os.path.join(dirpath, f))}")
    for line in sorted(lines):
        h.update(line.encode() + b"\n")
    return h.hexdigest()
