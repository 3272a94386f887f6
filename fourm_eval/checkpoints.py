"""Reading checkpoint files safely.

* safetensors is the default format. Its JSON header is read and validated here
  first, so a truncated download or a file that is not safetensors gives a
  message naming the file and the problem instead of a low-level parse error.
* The header's ``__metadata__`` holds the 4M model configuration as strings of
  Python ``str()`` values. They are parsed with a YAML *safe* loader, as the
  official reader does (``None`` -> ``null``, strings over 10,000 characters
  left as they are). Nothing read from a file is ever evaluated.
* Pickled checkpoints (``.pth``/``.pt``/``.bin``) are first tried with
  ``torch.load(weights_only=True)``, which runs no code. Only when that fails
  and the caller opted in with ``allow_pickle=True`` is full unpickling used.
* Hub ids (``EPFL-VILAB/4M-7_B_CC12M``) are resolved from the local Hugging
  Face cache only; there is never a download.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import CheckpointError, FourmEvalWarning

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt"}
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


def read_safetensors_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and validate a safetensors header without loading any tensor."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short to be a safetensors file "
                                  "(expected an 8-byte header length, then a JSON header)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            hint = "truncated (an incomplete download?)" if 0 < n <= _MAX_HEADER else "not a safetensors file"
            raise CheckpointError(f"{path}: the first 8 bytes declare a {n}-byte header but the file has "
                                  f"{size} bytes; the file is {hint}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); "
                              "the file is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} lacks dtype/shape/data_offsets") from None
        t = TensorInfo(dtype, shape)
        if dtype in _DTYPE_BYTES and end - start != t.numel * _DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{path}: tensor {name!r} declares {end - start} bytes for shape "
                                  f"{list(shape)} {dtype}; the header is corrupt")
        tensors[name] = t
        data_end = max(data_end, end)
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: the header declares {8 + n + data_end} bytes of data but the file "
                              f"has {size} bytes; the file is truncated (an incomplete download or copy?)")
    return SafetensorsHeader(path=path, tensors=tensors, metadata=dict(meta))


def parse_metadata(meta: dict[str, str]) -> dict[str, Any]:
    """Parse 4M header metadata: each value is Python ``str()`` of a config value.

    Follows the official reader: YAML safe-load after ``None`` -> ``null``;
    values longer than 10,000 characters stay strings. Never evaluates text.
    """
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(value, str) or len(value) > 10_000:
            out[key] = value
            continue
        try:
            out[key] = yaml.safe_load(value.replace("None", "null"))
        except yaml.YAMLError:
            out[key] = value
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def cached_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached by (path, size, mtime) since XL checkpoints are several GB."""
    from .paths import cache_dir
    from .results import atomic_write_json

    st = os.stat(path)
    key = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir() / "sha256-cache.json"
    try:
        table = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        table = {}
    if key not in table:
        table[key] = sha256_file(path)
        atomic_write_json(cache, table)
    return table[key]


def locate_checkpoint(spec: str | os.PathLike, filename: str = "model.safetensors",
                      say: Any = None) -> tuple[Path, dict[str, Any] | None]:
    """(local file, hub record or None) of a path, a model folder or a hub id ``OWNER/NAME[@REVISION]``.

    A hub id is fetched into the Hugging Face cache when it is not there (``fourm_eval.hub.fetch``;
    offline: the cache only); its record holds the repository, revision, commit and sha256."""
    p = Path(os.path.expanduser(str(spec)))
    if p.is_file():
        return p, None
    if p.is_dir():
        for cand in (filename, "model.safetensors", "pytorch_model.bin", "checkpoint-final.pth"):
            if (p / cand).is_file():
                return p / cand, None
        raise CheckpointError(f"{p} is a folder without {filename}; pass the checkpoint file itself")
    from .hub import fetch, parse_hub_spec

    ref = parse_hub_spec(spec, filename)
    if ref is not None:
        got = fetch(ref, say=say)
        return Path(got.path), got.record()
    raise CheckpointError(f"checkpoint {str(spec)!r} not found: no such file, and not a hub id (OWNER/NAME or "
                          "OWNER/NAME@REVISION)")


def resolve_checkpoint(spec: str | os.PathLike, filename: str = "model.safetensors") -> Path:
    """The local file of a path, a model folder or a hub id (see :func:`locate_checkpoint`)."""
    return locate_checkpoint(spec, filename)[0]


_WEIGHT_ENTRIES = ("model", "state_dict", "model_ema", "module")


def load_pickled_state_dict(path: Path, allow_pickle: bool, key: str | None = None,
                            notes: list[str] | None = None) -> dict[str, Any]:
    """Load a ``.pth``-style checkpoint (zip or raw pickle); full unpickling only with ``allow_pickle``.

    Training checkpoints hold the weights under an entry; with ``key`` unset the first of
    ``model``, ``state_dict``, ``model_ema``, ``module`` is used, and when several are
    present a warning names the one taken (appended to ``notes`` for the record)."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:
        if not allow_pickle:
            raise CheckpointError(
                f"{path} is a pickled checkpoint with non-tensor content; loading it runs code from the "
                f"file. Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust "
                f"its source. ({type(safe_err).__name__}: {str(safe_err).splitlines()[0][:200]})") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointError(f"{path}: could not be unpickled ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict):
        if key:
            if not isinstance(obj.get(key), dict):
                raise CheckpointError(f"{path}: no entry {key!r} in the checkpoint (entries: {sorted(map(str, obj))[:20]})")
            obj = obj[key]
        else:
            present = [k for k in _WEIGHT_ENTRIES if isinstance(obj.get(k), dict)]
            if present:
                if len(present) > 1:
                    msg = (f"{path}: holds several weight entries {present}; using {present[0]!r} "
                           f"(the others are ignored)")
                    warn_once(f"entry:{path}", msg)
                    if notes is not None:
                        notes.append(msg)
                obj = obj[present[0]]
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    return obj


def _safetensors_structure(path: Path, head: bytes, size: int) -> str:
    """'valid', 'damaged' (a safetensors start that does not fit the file) or 'no'.

    A safetensors file is an 8-byte little-endian header length n, then n bytes
    of a JSON object. The first byte alone tells nothing: the library pads
    headers to a multiple of 8 bytes, so one header length in 32 starts with
    0x80, the first byte of a pickle."""
    if len(head) < 9 or head[8:9] != b"{":
        return "no"
    (n,) = struct.unpack("<Q", head[:8])
    if n < 2 or n > _MAX_HEADER:
        return "no"
    if 8 + n > size:
        return "damaged"
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(n)
    try:
        ok = isinstance(json.loads(raw), dict)
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    return "valid" if ok else "damaged"


def detect_format(path: str | os.PathLike) -> str:
    """The file's kind from its structure: 'safetensors', 'torch-zip' (``torch.save``'s
    zip archive), 'pickle' (a raw pickle stream, legacy ``torch.save``) or 'unknown'.

    The content decides, not the suffix: a valid safetensors header wins; then a
    zip local-file signature; then the pickle PROTO opcode (0x80) followed by a
    protocol number 2-5. A file that starts like safetensors but does not fit
    (truncated) is still called 'safetensors', so its reader names the damage."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    st = _safetensors_structure(path, head, size)
    if st == "valid":
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if st == "damaged" or path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return "safetensors"  # read_safetensors_header says what is wrong with it
    return "unknown"


def require_known_format(path: Path) -> str:
    """``detect_format`` that raises a named error for files of no known kind, and warns
    when the suffix promises another kind than the content holds."""
    fmt = detect_format(path)
    if fmt == "unknown":
        with open(path, "rb") as f:
            start = f.read(16)
        raise CheckpointError(f"{path}: not a checkpoint fourm-eval can read (first bytes {start!r}); expected "
                              "safetensors (8-byte header length + JSON header), a torch.save zip archive "
                              "(starts with PK\\x03\\x04) or a pickle (starts with \\x80 and a protocol 2-5)")
    suffix = path.suffix.lower()
    says = "safetensors" if suffix in SAFETENSORS_SUFFIXES else "pickle" if suffix in PICKLE_SUFFIXES else None
    if says is not None and (says == "safetensors") != (fmt == "safetensors"):
        warn_once(f"format:{path}", f"{path}: the suffix {suffix!r} says {says}, the content is {fmt}; "
                                    f"reading it as {fmt}")
    return fmt


_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """A loud warning (``FourmEvalWarning``), once per process and key. Callers that
    write records also keep the message, so that it reaches result.json."""
    import warnings

    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(message, FourmEvalWarning, stacklevel=3)
