"""Image loading with clear errors, ImageNet normalisation, a built-in sample image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import FourmEvalError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageError(FourmEvalError):
    """An image file is missing or does not decode."""


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to an (H, W, 3) uint8 RGB array."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: does not decode as an image ({type(e).__name__}: {e})") from None


def normalize(img: np.ndarray, size: int | None = None) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float tensor, ImageNet mean/std."""
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float() / 255.0
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = torch.nn.functional.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False,
                                            antialias=True)[0]
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def sample_image(size: int = 224, seed: int = 0) -> np.ndarray:
    """A deterministic synthetic RGB image: a smooth gradient with a disc and a square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([0.6 * xx + 0.2, 0.5 * yy + 0.3, 0.4 * (1 - xx) + 0.2], axis=-1)
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    cy, cx, r = 0.35, 0.4, 0.18
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.9, 0.2, 0.1)
    img[(yy > 0.55) & (yy < 0.85) & (xx > 0.55) & (xx < 0.85)] = (0.1, 0.3, 0.9)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
