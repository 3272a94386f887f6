"""A deterministic synthetic ImageNet-style dataset for smoke runs and tests.

Writes the ImageFolder layout of ImageNet-1K after the usual re-foldering of val::

    OUT/train/<wnid>/<wnid>_<k>.JPEG
    OUT/val/<wnid>/ILSVRC2012_val_<k>.JPEG

Ten classes with WordNet-id-like folder names (``n`` + 8 digits, drawn from the
seed, so the sorted class order is not the generation order). A class is a
shape (circle, square, triangle, cross, ring) with one of two fills (solid or
striped); position, size, rotation, colours and the textured background vary
per image, so the class is in the shape and its fill, not in colour. Image
sides vary (64-96 px, not square).

Like the real dataset, a few ``.JPEG`` files are not plain RGB JPEGs: one
grayscale JPEG, one CMYK JPEG (both in train and in val) and one PNG named
``.JPEG`` in train; loaders decode by content and convert to RGB.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np

MINI_VERSION = 1
SHAPES = ("circle", "square", "triangle", "cross", "ring")
FILLS = ("solid", "striped")
N_CLASSES = len(SHAPES) * len(FILLS)


def mini_wnids(seed: int = 0) -> list[str]:
    """The classes' folder names in generation order (class k = shape k // 2, fill k % 2)."""
    rng = np.random.default_rng(10_000 + seed)
    ids: list[int] = []
    while len(ids) < N_CLASSES:
        i = int(rng.integers(1_000_000, 15_000_000))
        if i not in ids:
            ids.append(i)
    return [f"n{i:08d}" for i in ids]


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    coarse = rng.uniform(0.2, 0.8, size=(3, 3, 3))
    ys, xs = np.linspace(0, 2, h), np.linspace(0, 2, w)
    y0, x0 = np.floor(ys).astype(int).clip(0, 1), np.floor(xs).astype(int).clip(0, 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
         + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    return np.clip(c + rng.normal(0, 0.04, size=(h, w, 1)), 0, 1)


def _shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    u = dx * math.cos(angle) + dy * math.sin(angle)   # rotated coordinates
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return (np.abs(u) <= 0.8 * r) & (np.abs(v) <= 0.8 * r)
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    # triangle: inside all three edges of an equilateral triangle of circumradius r
    inside = np.ones((h, w), bool)
    for k in range(3):
        a = angle + 2 * math.pi * k / 3
        inside &= dx * math.cos(a) + dy * math.sin(a) <= 0.5 * r
    return inside


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    import colorsys
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float64)


def make_image(cls: int, rng: np.random.Generator, size_range: tuple[int, int] = (64, 96)) -> np.ndarray:
    """One (H, W, 3) uint8 image of class ``cls`` (shape ``cls // 2``, fill ``cls % 2``)."""
    return draw(SHAPES[cls // 2], FILLS[cls % 2], rng, size_range)


def draw(shape: str, fill: str, rng: np.random.Generator, size_range: tuple[int, int] = (64, 96)) -> np.ndarray:
    """One (H, W, 3) uint8 image of ``shape`` with ``fill``: solid, striped, or outline (only the
    shape's rim, the outer quarter of its radius, painted: the mini ImageNet-21K's extra classes)."""
    w = int(rng.integers(size_range[0], size_range[1] + 1))
    h = int(rng.integers(size_range[0], size_range[1] + 1))
    img = _background(rng, h, w)
    side = min(h, w)
    r = float(rng.uniform(0.28, 0.42) * side)
    cx = float(rng.uniform(0.4 * side, w - 0.4 * side))
    cy = float(rng.uniform(0.4 * side, h - 0.4 * side))
    angle = float(rng.uniform(0, 2 * math.pi))
    mask = _shape_mask(shape, h, w, cx, cy, r, angle)
    if fill == "outline":
        mask &= ~_shape_mask(shape, h, w, cx, cy, 0.75 * r, angle)
    hue = float(rng.uniform(0, 1))
    colour = _hsv(hue, rng.uniform(0.5, 0.95), rng.uniform(0.6, 1.0))
    if fill == "striped":
        period = float(rng.uniform(4.0, 7.0))
        a = float(rng.uniform(0, math.pi))
        yy, xx = np.mgrid[0:h, 0:w]
        on = np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) > 0
        dark = colour * 0.25
        paint = np.where(on[..., None], colour[None, None, :], dark[None, None, :])
    else:
        paint = np.broadcast_to(colour, (h, w, 3))
    img = np.where(mask[..., None], paint, img)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path, kind: str = "rgb") -> None:
    """Write a ``.JPEG`` file: an RGB JPEG, or (as in real ImageNet) grayscale / CMYK JPEG or a PNG."""
    from PIL import Image

    im = Image.fromarray(arr)
    buf = io.BytesIO()
    if kind == "gray":
        im.convert("L").save(buf, format="JPEG", quality=92)
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, format="JPEG", quality=92)
    elif kind == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=92)
    path.write_bytes(buf.getvalue())


def make_mini_imagenet(out: str | Path, n_train_per_class: int = 40, n_val_per_class: int = 20, seed: int = 0,
                       size_range: tuple[int, int] = (64, 96)) -> Path:
    """Write the mini dataset to ``out`` (same seed, same bytes); returns ``out``."""
    out = Path(out)
    wnids = mini_wnids(seed)
    rng = np.random.default_rng(seed)
    specials = {("train", 0, 1): "gray", ("train", 1, 2): "cmyk", ("train", 2, 3): "png",
                ("val", 3, 0): "gray", ("val", 4, 1): "cmyk"}
    val_index = 0
    for split, n in (("train", n_train_per_class), ("val", n_val_per_class)):
        for cls, wnid in enumerate(wnids):
            d = out / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                arr = make_image(cls, rng, size_range)
                if split == "train":
                    name = f"{wnid}_{k + 1}.JPEG"
                else:
                    val_index += 1
                    name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                _save(arr, d / name, specials.get((split, cls, k), "rgb"))
    (out / "MINI_IMAGENET").write_text(json.dumps({
        "version": MINI_VERSION, "seed": seed, "classes": sorted(wnids),
        "class_content": {w: f"{SHAPES[i // 2]} ({FILLS[i % 2]})" for i, w in enumerate(wnids)},
        "n_train_per_class": n_train_per_class, "n_val_per_class": n_val_per_class,
        "size_range": list(size_range)}, indent=1))
    return out


def default_mini_imagenet() -> Path:
    """The cached default mini dataset (generated on first use)."""
    from ..paths import cached_build

    return cached_build(f"imagenet-mini-v{MINI_VERSION}", "MINI_IMAGENET", make_mini_imagenet)


# the interface of a built-in mini dataset (a task names this module as its ``mini_data``)
make, default = make_mini_imagenet, default_mini_imagenet
