"""A deterministic synthetic ImageNet-21K (winter21 release layout) for smoke runs and tests.

Writes one folder per class, no split, as the release unpacks::

    OUT/<wnid>/<wnid>_<k>.JPEG

Fifteen classes: the ten classes of the mini ImageNet-1K (same wnids and content, as ImageNet-21K
holds ImageNet-1K's classes) and five more, the five shapes drawn as outlines (only the rim painted).
The sorted class order therefore differs from the mini ImageNet-1K's, and a model fine-tuned here
has a 15-way head (the ImageNet-1K stage re-initialises it). Images vary in side (64-96 px). As in
the release, a few ``.JPEG`` files are grayscale or CMYK JPEGs or PNGs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .imagenet_mini import FILLS, SHAPES, _save, draw, mini_wnids

MINI_VERSION = 1
MARKER = "MINI_IMAGENET21K"


def mini_classes(seed: int = 0) -> list[tuple[str, str, str]]:
    """(wnid, shape, fill) in generation order: the mini ImageNet-1K's ten, then five outlines."""
    base = mini_wnids(seed)
    out = [(w, SHAPES[i // 2], FILLS[i % 2]) for i, w in enumerate(base)]
    rng = np.random.default_rng(20_000 + seed)
    taken = set(base)
    for shape in SHAPES:
        while True:
            w = f"n{int(rng.integers(1_000_000, 15_000_000)):08d}"
            if w not in taken:
                taken.add(w)
                out.append((w, shape, "outline"))
                break
    return out


def make_mini_imagenet21k(out: str | Path, n_per_class: int = 30, seed: int = 0,
                          size_range: tuple[int, int] = (64, 96)) -> Path:
    """Write the mini dataset to ``out`` (same seed, same bytes); returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(100 + seed)
    specials = {(0, 1): "gray", (3, 2): "cmyk", (12, 4): "png"}
    classes = mini_classes(seed)
    for c, (wnid, shape, fill) in enumerate(classes):
        d = out / wnid
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n_per_class):
            _save(draw(shape, fill, rng, size_range), d / f"{wnid}_{k + 1}.JPEG", specials.get((c, k), "rgb"))
    (out / MARKER).write_text(json.dumps({
        "version": MINI_VERSION, "seed": seed, "classes": sorted(w for w, _, _ in classes),
        "class_content": {w: f"{s} ({f})" for w, s, f in classes}, "n_per_class": n_per_class,
        "size_range": list(size_range)}, indent=1))
    return out


def default_mini_imagenet21k() -> Path:
    """The cached default mini dataset (generated on first use)."""
    from ..paths import cached_build

    return cached_build(f"imagenet21k-mini-v{MINI_VERSION}", MARKER, make_mini_imagenet21k)


# the interface of a built-in mini dataset (a task names this module as its ``mini_data``)
make, default = make_mini_imagenet21k, default_mini_imagenet21k
