"""The image geometry of a scoring procedure: which pixels of a ground-truth map are scored, at
what size (numpy only: ``fourm-eval evaluate`` and the runs use the same functions).

Two single-pass procedures (MultiMAE's; EPFL-VILAB/MultiMAE ``utils/datasets_semseg.py``,
``utils/dataset_regression.py``, both albumentations) predict at a resized input and score there:

* ``long-side``: the long side resized to ``size`` (``A.LongestMaxSize``), the input padded to
  ``size`` x ``size`` at the bottom and right; scored on the unpadded ``h' x w'`` region;
* ``short-side-crop``: the short side resized to ``size`` (``A.SmallestMaxSize``), then the centre
  ``size`` x ``size`` crop (``A.CenterCrop``); scored on that crop.

Ground-truth maps follow the image as albumentations moves a mask: nearest-neighbour resize
(OpenCV's ``INTER_NEAREST``: output pixel x reads input pixel floor(x * in / out)). New sizes are
``round(side * size / long_or_short_side)`` with Python's ``round`` (albumentations' rule), the crop
offset ``(side - size) // 2``. ``original`` is the identity (scored at the file's own size).
"""

from __future__ import annotations

import numpy as np

PROCEDURES = ("original", "long-side", "short-side-crop")


def scaled_size(height: int, width: int, size: int, side: str) -> tuple[int, int]:
    """(height, width) after resizing the ``side`` ("long" or "short") to ``size``, aspect kept."""
    ref = max(height, width) if side == "long" else min(height, width)
    scale = size / float(ref)
    if scale == 1.0:
        return height, width
    return round(height * scale), round(width * scale)


def resize_nearest(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """OpenCV's INTER_NEAREST on a 2-d map: output (y, x) reads input (floor(y * H / h), floor(x * W / w))."""
    h0, w0 = arr.shape[:2]
    if (h0, w0) == (height, width):
        return arr
    rows = np.minimum(np.floor(np.arange(height) * (h0 / height)).astype(np.int64), h0 - 1)
    cols = np.minimum(np.floor(np.arange(width) * (w0 / width)).astype(np.int64), w0 - 1)
    return arr[rows[:, None], cols[None, :]]


def scored_shape(height: int, width: int, procedure: str, size: int | None) -> tuple[int, int]:
    """The size at which a map of ``height`` x ``width`` is scored under ``procedure``."""
    if procedure == "original":
        return height, width
    if procedure == "long-side":
        return scaled_size(height, width, int(size), "long")
    if procedure == "short-side-crop":
        return int(size), int(size)
    raise ValueError(f"unknown scoring procedure {procedure!r}; one of {', '.join(PROCEDURES)}")


def scored_view(arr: np.ndarray, procedure: str, size: int | None) -> np.ndarray:
    """A full-size map as ``procedure`` scores it (nearest-resized, cropped)."""
    h, w = arr.shape[:2]
    if procedure == "original":
        return arr
    if procedure == "long-side":
        return resize_nearest(arr, *scaled_size(h, w, int(size), "long"))
    if procedure == "short-side-crop":
        s = int(size)
        nh, nw = scaled_size(h, w, s, "short")
        r = resize_nearest(arr, nh, nw)
        y0, x0 = (nh - s) // 2, (nw - s) // 2
        return r[y0:y0 + s, x0:x0 + s]
    raise ValueError(f"unknown scoring procedure {procedure!r}; one of {', '.join(PROCEDURES)}")


__all__ = ["PROCEDURES", "resize_nearest", "scaled_size", "scored_shape", "scored_view"]
