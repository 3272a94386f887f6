"""``fourm-eval data convert nyu nyu_depth_v2_labeled.mat splits.mat OUT``: the official NYUv2
release -> the layout of ``fourm_eval.data.nyu`` (mmsegmentation's ``NYUDataset``).

The official files (facts in docs/dataset-quirks.md):

* ``nyu_depth_v2_labeled.mat``: MATLAB v7.3, i.e. HDF5 behind a 512-byte header. Read with
  h5py the axes are reversed from MATLAB's: ``images`` is (N, 3, W, H) uint8 and ``depths``
  (N, W, H) float32 metres (N = 1449, W = 640, H = 480). Image ``i`` is
  ``images[i].transpose(2, 1, 0)`` (H, W, 3) and its depth ``depths[i].T`` (H, W).
* ``splits.mat``: MATLAB v5 (scipy), ``trainNdxs`` (795 x 1) and ``testNdxs`` (654 x 1),
  1-based indices into the labelled set.

Written: ``images/{train,test}/nyu_NNNN.png`` (lossless RGB) and
``annotations/{train,test}/nyu_NNNN.png`` (16-bit, millimetres rounded to the nearest mm,
0 where the source has no positive finite depth), ``NNNN`` being the 1-based index of
splits.mat, at the source's full size (480 x 640: the Eigen crop belongs to the metric),
plus ``NYU_CONVERTED`` (a JSON summary). The output is built beside OUT and renamed into
place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .nyu import MM_PER_M, NyuDataError, depth_dir, image_dir, metres_to_mm, write_depth_mm

MARKER = "NYU_CONVERTED"


def read_splits(path: Path, n_images: int) -> dict[str, list[int]]:
    """``trainNdxs`` / ``testNdxs`` (1-based) from splits.mat, checked: integers in 1..n_images, no
    repeats, the two splits disjoint."""
    import scipy.io

    path = Path(path)
    if not path.is_file():
        raise NyuDataError(f"{path}: splits file not found (the official splits.mat)")
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy reads MATLAB v4-v7.2 only
        raise NyuDataError(f"{path}: a MATLAB v7.3 file; the official splits.mat is MATLAB v5 (save -v7)") from None
    except (ValueError, TypeError, OSError) as e:
        raise NyuDataError(f"{path}: not a MATLAB .mat file ({type(e).__name__}: {e})") from None
    out: dict[str, list[int]] = {}
    for split, key in (("train", "trainNdxs"), ("test", "testNdxs")):
        if key not in mat:
            raise NyuDataError(f"{path}: no variable {key!r} (found {sorted(k for k in mat if not k.startswith('__'))})")
        raw = np.asarray(mat[key], dtype=np.float64).ravel()
        if raw.size == 0 or not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
            raise NyuDataError(f"{path}: {key} must hold integer image indices")
        idx = [int(v) for v in raw]
        if min(idx) < 1 or max(idx) > n_images:
            raise NyuDataError(f"{path}: {key} holds indices {min(idx)}..{max(idx)}; expected 1-based indices in "
                               f"1..{n_images} (the labelled file's image count)")
        if len(set(idx)) != len(idx):
            raise NyuDataError(f"{path}: {key} repeats indices")
        out[split] = idx
    both = sorted(set(out["train"]) & set(out["test"]))
    if both:
        raise NyuDataError(f"{path}: {len(both)} index(es) in both trainNdxs and testNdxs, e.g. {both[:5]}")
    return out


def _open_labelled(path: Path) -> tuple[Any, Any, Any]:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise NyuDataError(f"{path}: labelled file not found (the official nyu_depth_v2_labeled.mat)")
    try:
        f = h5py.File(str(path), "r")
    except OSError:
        raise NyuDataError(f"{path}: not an HDF5 file; the official nyu_depth_v2_labeled.mat is MATLAB v7.3 "
                           "(HDF5)") from None
    for key in ("images", "depths"):
        if key not in f or not hasattr(f[key], "shape"):
            f.close()
            raise NyuDataError(f"{path}: no dataset {key!r} (found {sorted(f.keys())}); expected the NYUv2 labelled "
                               "file's 'images' and 'depths'")
    images, depths = f["images"], f["depths"]
    if images.ndim != 4 or images.shape[1] != 3 or images.dtype != np.uint8:
        f.close()
        raise NyuDataError(f"{path}: 'images' is {images.dtype} {images.shape}; expected uint8 (N, 3, W, H) as h5py "
                           "shows MATLAB's H x W x 3 x N array")
    if depths.ndim != 3 or depths.dtype.kind != "f":
        f.close()
        raise NyuDataError(f"{path}: 'depths' is {depths.dtype} {depths.shape}; expected float (N, W, H) metres")
    if depths.shape != (images.shape[0], images.shape[2], images.shape[3]):
        f.close()
        raise NyuDataError(f"{path}: 'depths' {depths.shape} does not match 'images' {images.shape} "
                           "(expected (N, W, H) for images (N, 3, W, H))")
    return f, images, depths


def convert_nyu(labelled: Path, splits: Path, out: Path, log: Callable[[str], None] = print,
                progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert the official files to the layout under ``out`` (which must not hold files yet)."""
    from PIL import Image

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NyuDataError(f"{out}: already exists and is not an empty folder; choose a new output folder")
    f, images, depths = _open_labelled(labelled)
    try:
        n, _, width, height = images.shape
        idx = read_splits(splits, n)
        digits = max(4, len(str(n)))
        tmp = out.with_name(f"{out.name}.partial{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        stats = {"no_measurement_pixels": 0, "clipped_above_65535_mm": 0}
        total, done = sum(len(v) for v in idx.values()), 0
        for split in ("train", "test"):
            image_dir(tmp, split).mkdir(parents=True)
            depth_dir(tmp, split).mkdir(parents=True)
            for i in idx[split]:
                rgb = np.ascontiguousarray(images[i - 1].transpose(2, 1, 0))   # (H, W, 3)
                depth = np.asarray(depths[i - 1], dtype=np.float64).T           # (H, W) metres
                mm = metres_to_mm(depth)
                stats["no_measurement_pixels"] += int((mm == 0).sum())
                stats["clipped_above_65535_mm"] += int((np.nan_to_num(depth) * MM_PER_M > 65535.5).sum())
                name = f"nyu_{i:0{digits}d}"
                Image.fromarray(rgb).save(image_dir(tmp, split) / f"{name}.png")
                write_depth_mm(depth_dir(tmp, split) / f"{name}.png", mm)
                done += 1
                if progress:
                    progress(done, total)
        summary = {"source": {"labelled": str(Path(labelled).resolve()), "splits": str(Path(splits).resolve()),
                              "n_images": int(n), "width": int(width), "height": int(height)},
                   "n_train": len(idx["train"]), "n_test": len(idx["test"]),
                   "naming": f"nyu_<1-based index, {digits} digits>", "depth": "16-bit PNG, millimetres, 0 = none",
                   **stats}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2))
    finally:
        f.close()
    if out.exists():
        out.rmdir()  # checked empty above
    tmp.rename(out)
    log(f"{out}: {summary['n_train']} training and {summary['n_test']} test pairs written "
        f"({height} x {width}); {stats['no_measurement_pixels']} pixel(s) without a measurement stored as 0")
    return out


__all__ = ["MARKER", "convert_nyu", "read_splits"]
