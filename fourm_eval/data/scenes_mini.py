"""Held-out generated scenes on disk, for the probe of what the tiny 4M learned (task ``scene-probe``).

The tiny 4M shipped in ``fourm_eval/assets`` was pre-trained to predict, from RGB patches, each
patch's semantic token (the majority label of the 16 x 16 patch among wall, floor and six shape
kinds) of the scenes of ``fourm_eval.data.scenes`` (scene set 0, indices 0..8191; its card's
held-out check uses set 1000). This writes scenes of the same generator from sets it never saw
(training split: set ``2000 + seed``; validation: set ``3000 + seed``) in a segmentation layout::

    OUT/images/{train,val}/scene_00000.png        RGB, 128 x 128, lossless
    OUT/annotations/{train,val}/scene_00000.png   8-bit labels: value v = class v - 1 (1 wall, 2 floor,
                                                  3.. the shape kinds); 0 never occurs
    OUT/SCENES.json                               generator, scene sets, sizes, class names

Same seed, same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .scenes import LABELS, make_scene

MINI_VERSION = 2
MARKER = "SCENES.json"
SPLIT_SETS = {"train": 2000, "val": 3000}   # scene sets the pre-training never drew (it used set 0)


def make_mini_scenes(out: str | Path, n_train: int = 768, n_val: int = 96, seed: int = 0, size: int = 128) -> Path:
    from PIL import Image

    out = Path(out)
    counts = {"train": n_train, "val": n_val}
    for split, n in counts.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        (out / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rgb, lab, _ = make_scene(SPLIT_SETS[split] + seed, i, size)
            Image.fromarray(rgb).save(out / "images" / split / f"scene_{i:05d}.png")
            Image.fromarray((lab + 1).astype(np.uint8)).save(out / "annotations" / split / f"scene_{i:05d}.png")
    (out / MARKER).write_text(json.dumps({
        "version": MINI_VERSION, "generator": "fourm_eval.data.scenes.make_scene", "size": size,
        "scene_sets": {s: SPLIT_SETS[s] + seed for s in counts}, "counts": counts,
        "classes": list(LABELS), "label_values": "annotation value v = class v - 1",
        "pretraining_scene_set": 0}, indent=1))
    return out


def default_mini_scenes() -> Path:
    from ..paths import cached_build

    return cached_build(f"scenes-mini-v{MINI_VERSION}", MARKER, make_mini_scenes)


make, default = make_mini_scenes, default_mini_scenes
