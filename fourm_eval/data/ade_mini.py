"""A deterministic synthetic ADE20K (``ADEChallengeData2016`` layout) for smoke runs and tests.

Writes exactly ADE20K's layout under ``OUT`` (which is then the data root)::

    OUT/images/training/ADE_train_00000001.jpg ...   OUT/annotations/training/ADE_train_00000001.png ...
    OUT/images/validation/ADE_val_00000001.jpg ...   OUT/annotations/validation/ADE_val_00000001.png ...

Each image (128-160 px a side, any aspect) is cut into 3-5 regions (a power-weighted Voronoi
partition); each region shows one of six ADE20K classes, drawn so that the class can be told
from the pixels, but only from colour *and* texture together: two classes share a blue family
(sky: smooth gradient; water: horizontal waves), two a green one (tree: blotches; grass: fine
vertical stripes), and wall (horizontal courses) and road (grain) share muted tones. Colours are
jittered per region. About a third of the images also hold a patch of label 0 ("other", ignored).
Annotations are 8-bit single-channel PNGs with ADE20K's values (class v at value v); one training
image is a grayscale JPEG, as some of ADE20K's are. The other 144 classes never appear.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MINI_VERSION = 1
# ADE20K label value -> name (value v is the model's class v - 1)
MINI_CLASSES = {1: "wall", 3: "sky", 5: "tree", 7: "road", 10: "grass", 22: "water"}


def _texture(value: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) float image in [0, 1] of one class's appearance."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    jitter = rng.uniform(0.85, 1.15, size=3)

    def base(rgb: tuple[float, float, float], lo: float, hi: float) -> np.ndarray:
        return np.asarray(rgb) * jitter * rng.uniform(lo, hi)

    if value == 3:    # sky: light blue, smooth vertical gradient
        img = base((0.62, 0.78, 1.0), 0.7, 1.0) + 0.15 * (yy / h)[..., None] * np.array([-0.5, -0.3, 0.0])
    elif value == 22:  # water: deeper blue, horizontal waves
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * yy / rng.uniform(5, 8) + 0.8 * np.sin(2 * np.pi * xx / 23 + phase))
        img = base((0.35, 0.55, 0.95), 0.6, 0.95) + 0.12 * wave[..., None]
    elif value == 5:  # tree: dark green blotches (coarse noise upsampled by 4)
        coarse = rng.uniform(-1, 1, size=(h // 4 + 2, w // 4 + 2))
        blot = np.kron(coarse, np.ones((4, 4)))[:h, :w]
        img = base((0.25, 0.55, 0.2), 0.6, 1.0) + 0.15 * blot[..., None]
    elif value == 10:  # grass: lighter green, fine vertical stripes
        stripes = np.sin(2 * np.pi * xx / 3.0 + rng.uniform(0, 6))
        img = base((0.35, 0.65, 0.25), 0.7, 1.1) + 0.12 * stripes[..., None]
    elif value == 1:  # wall: beige with darker horizontal courses every 8 px
        courses = ((yy + rng.integers(0, 8)) % 8 < 1.5).astype(float)
        img = base((0.78, 0.72, 0.6), 0.7, 1.05) - 0.2 * courses[..., None]
    elif value == 7:  # road: grey grain
        img = base((0.5, 0.5, 0.52), 0.6, 1.1) + rng.normal(0, 0.08, size=(h, w, 1))
    else:
        raise ValueError(value)
    return img + rng.normal(0, 0.02, size=(h, w, 3))


def _sample(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(rng.integers(3, 6))
    values = rng.choice(sorted(MINI_CLASSES), size=n, replace=True)
    seeds = np.stack([rng.uniform(0, h, n), rng.uniform(0, w, n)], axis=1)
    weights = rng.uniform(0, 0.15 * min(h, w), n) ** 2
    yy, xx = np.mgrid[0:h, 0:w]
    d = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2 - weights
    region = d.argmin(axis=2)
    img = np.zeros((h, w, 3))
    label = np.zeros((h, w), dtype=np.uint8)
    for r in range(n):
        m = region == r
        if m.any():
            img[m] = _texture(int(values[r]), rng, h, w)[m]
            label[m] = values[r]
    if rng.random() < 0.35:  # an "other" patch: label 0, ignored by training and metric
        ph, pw = int(rng.integers(14, 36)), int(rng.integers(14, 36))
        y0, x0 = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        img[y0:y0 + ph, x0:x0 + pw] = rng.uniform(0, 1, size=3) + rng.normal(0, 0.05, size=(ph, pw, 3))
        label[y0:y0 + ph, x0:x0 + pw] = 0
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), label


def make_mini_ade20k(out: str | Path, n_train: int = 160, n_val: int = 32, seed: int = 0,
                     size_range: tuple[int, int] = (128, 160)) -> Path:
    """Write the mini dataset to ``out`` (deterministic for a given seed); returns ``out``."""
    from PIL import Image

    out = Path(out)
    rng = np.random.default_rng(seed)
    for split, sub, prefix, n in (("train", "training", "ADE_train", n_train),
                                  ("val", "validation", "ADE_val", n_val)):
        img_dir, ann_dir = out / "images" / sub, out / "annotations" / sub
        img_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
            img, label = _sample(rng, h, w)
            stem = f"{prefix}_{i + 1:08d}"
            im = Image.fromarray(img)
            if split == "train" and i == 0:
                im = im.convert("L")  # ADE20K has some grayscale JPEGs
            im.save(img_dir / f"{stem}.jpg", quality=92)
            Image.fromarray(label, mode="L").save(ann_dir / f"{stem}.png")
    (out / "MINI_ADE20K").write_text(json.dumps({"version": MINI_VERSION, "seed": seed, "n_train": n_train,
                                                 "n_val": n_val, "size_range": list(size_range),
                                                 "classes": MINI_CLASSES}))
    return out


def default_mini_ade20k() -> Path:
    """The cached default mini dataset (generated on first use)."""
    from ..paths import cached_build

    return cached_build(f"ade20k-mini-v{MINI_VERSION}", "MINI_ADE20K", make_mini_ade20k)


# the interface of a built-in mini dataset (a task names this module as its ``mini_data``)
make, default = make_mini_ade20k, default_mini_ade20k
