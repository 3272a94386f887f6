"""ImageNet-21K as released (the winter 2021 release, ``winter21_whole``): listing, the held-out
validation split, validation with named errors, identity.

Expected layout: the release's per-class archives unpacked, one folder per WordNet id, no split::

    ROOT/<wnid>/<wnid>_<k>.JPEG          (19,167 class folders, 13,153,500 images in the release)

* Classes are the folder names, in sorted order (class index k = the k-th wnid), as for ImageNet-1K.
* The release ships no validation split. The held-out split is a pure function of the file names:
  from each class, the ``val_per_class`` files (fewer for a small class: at most half of it) whose
  ``sha256(f"{seed}:{file name}")`` is smallest. Adding or removing images of one class never moves
  the split of another; the lists are written to the run directory and recorded by count.
* Errors name the file or folder: the release's per-class ``<wnid>.tar`` archives still packed (with
  the command that unpacks them), the parent folder of ``winter21_whole/`` given as the root, a
  folder that is not a WordNet id (``train/`` / ``val/``: an ImageNet-1K or ImageNet-21K-P layout,
  which this task does not read), an empty class folder, an image that does not decode
  (``--skip-bad-images``: dropped and counted).
* Files are decoded by content (the release's ``.JPEG`` files include CMYK and grayscale JPEGs and
  PNGs, as ImageNet-1K's do); files with other suffixes are counted and named, never read.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .checks import DatasetError
from .imagenet_check import SplitListing, _class_folders, _listing_digest, scan_class_folder

WNID = re.compile(r"^n\d{8}$")
RELEASE_FOLDER = "winter21_whole"
UNPACK_HINT = ("unpack every class archive into a folder of its name first, e.g. in the root: "
               "for f in n*.tar; do mkdir -p \"${f%.tar}\" && tar -xf \"$f\" -C \"${f%.tar}\" && rm \"$f\"; done")


def classes_of(root: Path) -> list[str]:
    """The sorted wnid folders of the root; every layout mistake a named error."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: folder not found (expected the ImageNet-21K winter21 release unpacked: "
                           "ROOT/<wnid>/*.JPEG)")
    dirs, files = _class_folders(root)
    wnids = [d for d in dirs if WNID.match(d)]
    if not wnids and RELEASE_FOLDER in dirs:
        raise DatasetError(f"{root}: holds {RELEASE_FOLDER}/; pass {root / RELEASE_FOLDER} as the data root")
    others = [d for d in dirs if not WNID.match(d)]
    if others:
        hint = ""
        if set(others) & {"train", "val", "imagenet21k_train", "imagenet21k_val"}:
            hint = (" (a train/ + val/ layout: ImageNet-1K, or the processed ImageNet-21K-P; this task reads the "
                    "winter21 release, one folder per wnid, and holds its validation images out itself)")
        raise DatasetError(f"{root}: folder(s) {others[:5]} are not WordNet ids (n + 8 digits); expected only "
                           f"class folders <wnid>/{hint}")
    tars = sorted(f for f in files if f.endswith(".tar") and WNID.match(f[:-4]))
    packed = [t for t in tars if t[:-4] not in set(wnids)]
    if packed:
        raise DatasetError(f"{root}: {len(packed)} class archive(s) still packed (e.g. {packed[:3]}); {UNPACK_HINT}")
    if not wnids:
        raise DatasetError(f"{root}: no class folders (expected <wnid>/*.JPEG, e.g. n01440764/n01440764_10026.JPEG)"
                           + (f"; it holds {len(files)} file(s) such as {files[0]!r}" if files else ""))
    return wnids


def list_classes(root: Path, classes: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """class -> its image file names (sorted), and every other file (relative paths, never read)."""
    root = Path(root)
    by_class: dict[str, list[str]] = {}
    other = [f for f in _class_folders(root)[1] if not f.startswith(".")]
    for wnid in classes:
        by_class[wnid], others = scan_class_folder(root / wnid, wnid)
        other += others
    return by_class, sorted(other)


def holdout_key(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def split(root: Path, classes: list[str], by_class: dict[str, list[str]], val_per_class: int,
          seed: int) -> tuple[SplitListing, SplitListing, int]:
    """(train, val, number of classes that gave fewer than val_per_class validation images)."""
    index = {c: i for i, c in enumerate(classes)}
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    short = 0
    for wnid in classes:
        names = by_class[wnid]
        k = min(int(val_per_class), len(names) // 2)
        short += k < val_per_class
        held = set(sorted(names, key=lambda n: holdout_key(seed, n))[:k])
        for n in names:  # name order within a class, classes in sorted order
            (val if n in held else train).append((f"{wnid}/{n}", index[wnid]))
    root = Path(root)
    return (SplitListing("train", root, train, list(classes)),
            SplitListing("val", root, val, sorted({s.split("/")[0] for s, _ in val})), short)


def listing_digest(root: Path) -> str:
    """sha256 of the root's sorted ``relative-path size`` lines (no image is read)."""
    root = Path(root)
    return _listing_digest(str(root.resolve()), root.stat().st_mtime_ns)
