"""NYUv2 depth on disk: the layout mmsegmentation's ``NYUDataset`` reads, its files, its checks.

Layout (``ROOT`` is the data root)::

    ROOT/images/train/NAME.jpg|.png        RGB, 8-bit (one suffix per split)
    ROOT/images/test/NAME.jpg|.png
    ROOT/annotations/train/NAME.png        depth: 16-bit single-channel PNG, millimetres, 0 = no measurement
    ROOT/annotations/test/NAME.png

An image and its depth map share ``NAME`` and have the same size. ``fourm-eval data
convert nyu`` writes this layout from the official release (``nyu_convert``);
``fourm-eval data make-mini nyu`` writes a synthetic one (``nyu_mini``).

Every check failure is a :class:`NyuDataError` naming the file and what was expected.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .checks import DatasetError, check_samples, raising
from .pngmap import read_png_map, write_png_map

SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEPTH_SUFFIX = ".png"
MM_PER_M = 1000.0


class NyuDataError(DatasetError):
    """An NYUv2-layout dataset (or a depth file, or the official release files) is not as expected."""


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / "images" / split


def depth_dir(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / split


# ---------------------------------------------------------------- depth PNG files
def read_depth_mm(path: Path) -> np.ndarray:
    """A depth PNG as an (H, W) uint16 array of millimetres; named errors for 8-bit, colour or corrupt files."""
    return read_png_map(path, bits=16, what="depth map", error=NyuDataError,
                        needs="in millimetres (8 bits cannot hold millimetres up to 10 m)")


def read_depth_m(path: Path) -> np.ndarray:
    """A depth PNG in metres (float64); 0 stays 0 (no measurement)."""
    return read_depth_mm(path).astype(np.float64) / MM_PER_M


def metres_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """Metres -> uint16 millimetres, rounded to the nearest millimetre; non-finite or non-positive -> 0
    (no measurement); above 65.535 m -> 65535."""
    d = np.asarray(depth_m, dtype=np.float64)
    mm = np.where(np.isfinite(d) & (d > 0), np.rint(d * MM_PER_M), 0.0)
    return np.clip(mm, 0, 65535).astype(np.uint16)


def write_depth_mm(path: Path, depth_mm: np.ndarray) -> None:
    """Write an (H, W) uint16 millimetre array as a 16-bit grayscale PNG (atomically)."""
    arr = np.asarray(depth_mm)
    if arr.dtype != np.uint16:
        raise ValueError(f"expected an (H, W) uint16 array, got {arr.dtype} {arr.shape}")
    write_png_map(path, arr)


# ------------------------------------------------------------------ the layout
def list_split(root: Path, split: str) -> tuple[list[str], str]:
    """Names (sorted) of a split's image/depth pairs and the split's image suffix; named errors for
    missing folders, mixed image suffixes and unpaired files."""
    idir, ddir = image_dir(root, split), depth_dir(root, split)
    for d, what in ((idir, "RGB images"), (ddir, "depth maps (16-bit PNG, millimetres)")):
        if not d.is_dir():
            raise NyuDataError(f"{d}: folder not found; the NYUv2 layout has images/{{train,test}}/ and "
                               f"annotations/{{train,test}}/ under the data root ({what} here)")
    images = {p.stem: p.suffix for p in idir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
    others = sorted(p.name for p in idir.iterdir() if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES
                    and not p.name.startswith("."))
    if others:
        raise NyuDataError(f"{idir}: {len(others)} file(s) that are not .jpg/.png images, e.g. {others[:3]}")
    suffixes = sorted(set(images.values()))
    if len(suffixes) > 1:
        raise NyuDataError(f"{idir}: images with several suffixes {suffixes}; one suffix per split is expected "
                           "(mmsegmentation's NYUDataset lists the images by one suffix)")
    depths = {p.stem for p in ddir.iterdir() if p.is_file() and p.suffix == DEPTH_SUFFIX}
    stray = sorted(p.name for p in ddir.iterdir() if p.is_file() and p.suffix != DEPTH_SUFFIX
                   and not p.name.startswith("."))
    if stray:
        raise NyuDataError(f"{ddir}: {len(stray)} file(s) that are not .png depth maps, e.g. {stray[:3]}")
    no_depth = sorted(set(images) - depths)
    if no_depth:
        raise NyuDataError(f"{idir}: {len(no_depth)} image(s) without a depth map in {ddir}, e.g. "
                           f"{[n + images[n] for n in no_depth[:3]]} (expected {no_depth[0]}{DEPTH_SUFFIX} there)")
    no_image = sorted(depths - set(images))
    if no_image:
        raise NyuDataError(f"{ddir}: {len(no_image)} depth map(s) without an image in {idir}, e.g. "
                           f"{[n + DEPTH_SUFFIX for n in no_image[:3]]}")
    if not images:
        raise NyuDataError(f"{idir}: no images")
    return sorted(images), suffixes[0]


def layout_digest(root: Path) -> str:
    """A cheap fingerprint of the dataset: sha256 over every file's split, folder, name and size."""
    h = hashlib.sha256()
    for split in SPLITS:
        for d in (image_dir(root, split), depth_dir(root, split)):
            if d.is_dir():
                for p in sorted(d.iterdir()):
                    if p.is_file():
                        h.update(f"{split}/{d.parent.name}/{p.name}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()


@dataclass
class SplitCheck:
    split: str
    names: list[str]                 # usable pairs, sorted
    img_suffix: str
    image_sizes: dict[str, int]      # "HxW" -> count
    bad: list[tuple[str, str]] = field(default_factory=list)   # (file, reason), skipped with --skip-bad-images
    depth_hist: np.ndarray | None = None  # count per millimetre value 0..65535 (train only)

    @property
    def n_images(self) -> int:
        return len(self.names)


def check_pair(root: Path, split: str, name: str, img_suffix: str, *, need_crop_pixels: bool) -> np.ndarray:
    """Validate one image/depth pair; returns the depth in millimetres."""
    from PIL import Image, UnidentifiedImageError

    from fourm_eval.metrics_depth import eval_mask

    ipath = image_dir(root, split) / (name + img_suffix)
    dpath = depth_dir(root, split) / (name + DEPTH_SUFFIX)
    try:
        with Image.open(ipath) as im:
            im.load()
            size, mode = im.size, im.mode
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise NyuDataError(f"{ipath}: does not decode as an image ({type(e).__name__}: {e})") from None
    if mode not in ("RGB", "L", "P", "RGBA", "CMYK", "YCbCr"):
        raise NyuDataError(f"{ipath}: image mode {mode}; expected an 8-bit RGB (or grayscale) image")
    depth = read_depth_mm(dpath)
    if (depth.shape[1], depth.shape[0]) != size:
        raise NyuDataError(f"{dpath}: depth map is {depth.shape[1]}x{depth.shape[0]} (width x height) but its image "
                           f"{ipath.name} is {size[0]}x{size[1]}; they must be the same size")
    if not depth.any():
        raise NyuDataError(f"{dpath}: every pixel is 0 (no measurement); a depth map needs valid pixels")
    if need_crop_pixels and not eval_mask(depth.astype(np.float64) / MM_PER_M).any():
        raise NyuDataError(f"{dpath}: no pixel in (0.001, 10] m inside the Eigen crop; the metric cannot score it")
    return depth


def check_split(root: Path, split: str, *, skip_bad: bool = False, histogram: bool = False,
                progress: Callable[[int, int], None] | None = None) -> SplitCheck:
    """Check every pair of a split (every image decodes, depth format and size, valid pixels)."""
    names, suffix = list_split(root, split)
    sizes: dict[str, int] = {}
    hist = np.zeros(65536, dtype=np.int64) if histogram else None

    def count(_: str, depth: np.ndarray) -> None:  # in name order, from the checking threads' results
        key = f"{depth.shape[0]}x{depth.shape[1]}"
        sizes[key] = sizes.get(key, 0) + 1
        if hist is not None:
            np.add(hist, np.bincount(depth.ravel(), minlength=65536), out=hist)

    check = raising(lambda n: check_pair(root, split, n, suffix, need_crop_pixels=split == "test"), NyuDataError)
    ok, bad = check_samples(names, check, skip_bad=skip_bad, where=f"NYUv2 {split} ({root})", error=NyuDataError,
                            on_ok=count, progress=progress, workers=1)
    return SplitCheck(split, ok, suffix, sizes, bad, hist)


def median_depth_m(hist: np.ndarray) -> float:
    """The median of the valid training depths (in (1e-3, 10] m) from a per-millimetre histogram:
    the lower median, i.e. the value at position ceil(n / 2) of the sorted valid values."""
    from fourm_eval.metrics_depth import MAX_DEPTH, MIN_DEPTH

    mm = np.arange(hist.size, dtype=np.float64)
    valid = (mm / MM_PER_M > MIN_DEPTH) & (mm / MM_PER_M <= MAX_DEPTH)
    counts = np.where(valid, hist, 0)
    n = int(counts.sum())
    if n == 0:
        raise NyuDataError("the training depth maps hold no pixel in (0.001, 10] m")
    k = (n + 1) // 2  # 1-based position of the lower median
    return float(np.searchsorted(np.cumsum(counts), k) / MM_PER_M)


def split_record(c: SplitCheck) -> dict[str, Any]:
    return {"n_images": c.n_images, "image_suffix": c.img_suffix, "image_sizes": c.image_sizes,
            "skipped": [{"file": f, "reason": r} for f, r in c.bad]}


__all__ = ["DEPTH_SUFFIX", "MM_PER_M", "NyuDataError", "SPLITS", "SplitCheck", "check_pair", "check_split",
           "depth_dir", "image_dir", "layout_digest", "list_split", "median_depth_m", "metres_to_mm",
           "read_depth_m", "read_depth_mm", "split_record", "write_depth_mm"]
