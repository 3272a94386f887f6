"""A deterministic synthetic NYUv2-layout dataset for smoke runs and tests.

Each image is a ray-cast indoor scene: a pinhole camera (NYU's Kinect focal length,
0.81 x the width) inside a box-shaped room (floor, ceiling, back and side walls, each
plane its own colour, the floor tiled) with one to four boxes standing on the floor.
The camera's height, pitch, yaw and the room's size vary per scene. Pixels are shaded
by a point light near the ceiling (Lambertian, falling off with distance) over an
ambient term, with a little grain. The depth map is the exact z-depth of the first
surface each ray hits, in millimetres, so depth is learnable from the pixels
(perspective of the floor tiles and walls, shading, occlusion by the boxes).

Like the real files: RGB images with a thin white frame (NYUv2's border, outside the
Eigen crop), 16-bit PNG depth in millimetres with a few holes (0 = no measurement),
images 120 x 160 by default (the 3:4 of NYUv2's 480 x 640, four times smaller, so the
Eigen crop scales by 1/4: rows 11:118, columns 10:150), JPEG images as mmsegmentation's
NYUDataset expects by default, names ``mini_NNNN`` keeping the scene index.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .nyu import depth_dir, image_dir, metres_to_mm, write_depth_mm

MINI_VERSION = 1
MARKER = "MINI_NYU"


def _rotation(yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world rotation: pitch about x (positive looks up), then yaw about y."""
    cp, sp, cy, sy = math.cos(pitch), math.sin(pitch), math.cos(yaw), math.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx


def _slabs(o: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, ...]:
    """Ray / axis-aligned box: entry and exit distances and the entry/exit axes, for every ray."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / d
        t1 = (lo - o) * inv
        t2 = (hi - o) * inv
    tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
    tn = np.nan_to_num(tn, nan=-np.inf)
    tf = np.nan_to_num(tf, nan=np.inf)
    return tn.max(-1), tn.argmax(-1), tf.min(-1), tf.argmin(-1)


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB and (H, W) float64 z-depth in metres."""
    f = 0.81 * width
    room_w, room_h, room_d = rng.uniform(3.0, 6.0), rng.uniform(2.4, 3.2), rng.uniform(4.0, 8.0)
    cam = np.array([rng.uniform(-0.3, 0.3) * room_w, rng.uniform(1.0, 1.6), 0.3])
    rot = _rotation(math.radians(rng.uniform(-15, 15)), math.radians(rng.uniform(-20, 2)))
    v, u = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    d_cam = np.stack([(u - width / 2) / f, -(v - height / 2) / f, np.ones_like(u)], -1)   # z = 1: t is z-depth
    d = d_cam @ rot.T
    o = np.broadcast_to(cam, d.shape)

    lo_room, hi_room = np.array([-room_w / 2, 0.0, 0.0]), np.array([room_w / 2, room_h, room_d])
    _, _, t_room, axis = _slabs(o, d, lo_room, hi_room)
    hit = o + t_room[..., None] * d
    # surface ids: 0 floor, 1 ceiling, 2 left wall, 3 right wall, 4 back wall (5 front wall, behind the camera)
    surf = np.where(axis == 1, np.where(d[..., 1] < 0, 0, 1),
                    np.where(axis == 0, np.where(d[..., 0] < 0, 2, 3), np.where(d[..., 2] > 0, 4, 5)))
    normal = np.zeros_like(d)
    for s, n in ((0, (0, 1, 0)), (1, (0, -1, 0)), (2, (1, 0, 0)), (3, (-1, 0, 0)), (4, (0, 0, -1)), (5, (0, 0, 1))):
        normal[surf == s] = n
    t = t_room.copy()
    colours = {0: rng.uniform(0.35, 0.75, 3), 1: rng.uniform(0.75, 0.95, 3), 2: rng.uniform(0.4, 0.9, 3),
               3: rng.uniform(0.4, 0.9, 3), 4: rng.uniform(0.4, 0.9, 3), 5: np.full(3, 0.6)}
    base = np.zeros_like(d)
    for s, c in colours.items():
        base[surf == s] = c
    tiles = ((np.floor(hit[..., 0] / 0.5) + np.floor(hit[..., 2] / 0.5)) % 2 == 0) & (surf == 0)
    base[tiles] *= 0.7

    for _ in range(int(rng.integers(1, 5))):
        sx, sy, sz = rng.uniform(0.4, 1.4), rng.uniform(0.4, 1.5), rng.uniform(0.4, 1.4)
        cx = rng.uniform(-room_w / 2 + sx / 2, room_w / 2 - sx / 2)
        cz = rng.uniform(1.5, room_d - sz / 2)
        lo, hi = np.array([cx - sx / 2, 0.0, cz - sz / 2]), np.array([cx + sx / 2, sy, cz + sz / 2])
        t_in, ax, t_out, _ = _slabs(o, d, lo, hi)
        inside = (t_in <= t_out) & (t_in > 0) & (t_in < t)
        t = np.where(inside, t_in, t)
        n = np.zeros_like(d)
        n[np.arange(3)[None, None, :] == ax[..., None]] = 1.0
        n *= -np.sign(d)
        normal[inside] = n[inside]
        base[inside] = rng.uniform(0.15, 0.95, 3)

    p = o + t[..., None] * d
    light = np.array([cam[0] + rng.uniform(-0.5, 0.5), room_h - 0.1, rng.uniform(1.0, 3.0)])
    to_light = light - p
    dist = np.linalg.norm(to_light, axis=-1)
    lambert = np.clip((normal * to_light).sum(-1) / np.maximum(dist, 1e-6), 0, 1)
    shade = 0.25 + 0.9 * lambert / (1.0 + 0.08 * dist ** 2)
    img = base * shade[..., None] + rng.normal(0, 0.015, base.shape)
    rgb = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return rgb, t


def _add_border_and_holes(rng: np.random.Generator, rgb: np.ndarray, depth_mm: np.ndarray) -> None:
    h, w = depth_mm.shape
    b = max(1, round(w / 80))  # NYUv2's white frame, about 8 px at 640 wide
    rgb[:b], rgb[-b:], rgb[:, :b], rgb[:, -b:] = 255, 255, 255, 255
    for _ in range(int(rng.integers(0, 4))):  # sensor holes
        hh, ww = int(rng.integers(2, max(3, h // 10))), int(rng.integers(2, max(3, w // 10)))
        y, x = int(rng.integers(0, h - hh)), int(rng.integers(0, w - ww))
        depth_mm[y:y + hh, x:x + ww] = 0


def make_mini_nyu(out: str | Path, n_train: int = 240, n_test: int = 60, seed: int = 0,
                  size: tuple[int, int] = (120, 160)) -> Path:
    """Write the mini dataset to ``out`` (deterministic for a given seed); returns ``out``."""
    from PIL import Image

    out = Path(out)
    height, width = size
    rng = np.random.default_rng(seed)
    index = 0
    for split, n in (("train", n_train), ("test", n_test)):
        image_dir(out, split).mkdir(parents=True, exist_ok=True)
        depth_dir(out, split).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            index += 1
            rgb, depth = render_scene(rng, height, width)
            depth_mm = metres_to_mm(depth)
            _add_border_and_holes(rng, rgb, depth_mm)
            name = f"mini_{index:04d}"
            Image.fromarray(rgb).save(image_dir(out, split) / f"{name}.jpg", quality=95)
            write_depth_mm(depth_dir(out, split) / f"{name}.png", depth_mm)
    (out / MARKER).write_text(json.dumps({"version": MINI_VERSION, "seed": seed, "n_train": n_train,
                                          "n_test": n_test, "size": [height, width]}))
    return out


def default_mini_nyu() -> Path:
    """The cached default mini dataset (generated on first use)."""
    from ..paths import cached_build
    return cached_build(f"nyu-mini-v{MINI_VERSION}", MARKER, make_mini_nyu)


# the interface of a built-in mini dataset (a task names this module as its ``mini_data``)
make, default = make_mini_nyu, default_mini_nyu


__all__ = ["MINI_VERSION", "default_mini_nyu", "make_mini_nyu", "render_scene"]
