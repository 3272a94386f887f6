"""Per-pixel maps stored as single-channel PNGs (label maps, depth in millimetres): read with
named errors, written atomically.

One reader for every dense format of the suite (ADE20K's 8-bit label PNGs, NYUv2's 16-bit
millimetre PNGs, any task's predictions): the header is read first, so a file of the wrong kind
(colour, another bit depth, not a PNG) is named as such before any decoding.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from ..errors import FourmEvalError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale + alpha", 6: "RGBA"}


def png_header(path: Path, what: str, error: type[FourmEvalError]) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from the IHDR chunk; ``error`` for a missing or non-PNG file."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] == _SIGNATURE and len(head) < 33:
        raise error(f"{path}: {what} does not decode (a PNG cut short: {len(head)} bytes)")
    if len(head) < 33 or head[:8] != _SIGNATURE or head[12:16] != b"IHDR":
        raise error(f"{path}: not a PNG file; {what}s are single-channel PNGs")
    width, height, bit_depth, colour = struct.unpack(">IIBB", head[16:26])
    return width, height, bit_depth, colour


def read_png_map(path: Path, *, bits: int, what: str, error: type[FourmEvalError], palette_ok: bool = False,
                 max_value: int | None = None, needs: str = "") -> np.ndarray:
    """An (H, W) uint8 (``bits`` 8) or uint16 (``bits`` 16) array from a single-channel PNG of that
    bit depth (grayscale; with ``palette_ok`` also a palette PNG, read as its indices). Named errors
    for another colour type or bit depth, a file that does not decode, values above ``max_value``.
    ``needs`` completes the messages (e.g. "in millimetres")."""
    width, height, bit_depth, colour = png_header(path, what, error)
    kinds = "grayscale" + (" or palette" if palette_ok else "")
    rule = f"{what}s must be single-channel {bits}-bit PNGs ({kinds}){' ' + needs if needs else ''}"
    if colour not in ((0, 3) if palette_ok else (0,)):
        raise error(f"{path}: a {COLOUR_TYPES.get(colour, f'colour type {colour}')} PNG; {rule}")
    if bit_depth != bits:
        raise error(f"{path}: a {bit_depth}-bit PNG; {rule}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise error(f"{path}: {what} does not decode ({type(e).__name__}: {e})") from None
    if arr.shape != (height, width):
        raise error(f"{path}: decodes to shape {arr.shape}, expected ({height}, {width})")
    arr = arr.astype(np.uint8 if bits == 8 else np.uint16, copy=False)
    if max_value is not None and arr.size and int(arr.max()) > max_value:
        bad = sorted(int(v) for v in np.unique(arr[arr > max_value]))[:10]
        raise error(f"{path}: {what} has values {bad} above {max_value} (expected 0..{max_value})")
    return arr


def write_png_map(path: Path, arr: np.ndarray) -> None:
    """Write an (H, W) uint8 or uint16 array as an 8- or 16-bit grayscale PNG, atomically (a reader
    never sees half a file)."""
    from PIL import Image

    arr = np.ascontiguousarray(arr)
    if arr.ndim != 2 or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected an (H, W) uint8 or uint16 array, got {arr.dtype} {arr.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    Image.fromarray(arr).save(tmp, format="PNG")
    tmp.replace(path)


__all__ = ["COLOUR_TYPES", "png_header", "read_png_map", "write_png_map"]
