"""The feature cache: a frozen encoder's features of a dataset split, extracted once, read many times.

Frozen-feature evaluations (kNN, a grid of linear heads, dense linear probes; DINOv2's
``dinov2/eval``) need the encoder's output for every image, not the encoder. Extracting it is the
expensive part, so it is done once per (weights, data, transform, blocks) and kept:

    <cache>/features/<key>/shard-00000.safetensors ...   fp16 tensors of ``shard_size`` images each
    <cache>/features/<key>/index.json                    written last: the key's parts, counts, shards

The key is the sha256 of: the checkpoint's sha256 (or the random init and its seed), the dataset's
fingerprint (each listed file's path, size and mtime, and its label), the transform, the blocks, and
whether patch tokens are kept, and the encoder's *function*: a digest of its output on a fixed input
(:func:`encoder_fingerprint`), so features cached before a change to the model code (a loader fixed
or broken: a position table, a config value read another way) are not read back as the new code's.
Anything else is a new key, so a stale cache cannot be read.

Per image and per requested block (0-based; negative counts from the end), after the encoder's final
norm (as DINOv2's ``get_intermediate_layers(..., norm=True)``):

* ``mean``  (n, blocks, D): the mean of the patch tokens;
* ``cls``   (n, blocks, D): the class token, for encoders that have one (DeiT III, MAE; 4M has none);
* ``patch`` (n, blocks, N, D): every patch token, only when asked for (``patch=True``: dense probes).

Extraction is resumable (each shard is written whole, then renamed; a rerun starts after the last
complete shard), shows a progress bar with rate and ETA, and holds at most one shard in memory. A
second call with the same key reads the cache back without opening an image.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .errors import ConfigError

INDEX = "index.json"
FORMAT = "fourm-eval-features/1"


def dataset_fingerprint(root: Path, samples: Sequence[tuple[str, int]]) -> str:
    """sha256 over every sample's relative path, label, file size and mtime (no image is read)."""
    h = hashlib.sha256()
    for rel, label in samples:
        st = os.stat(Path(root) / rel)
        h.update(f"{rel}\t{int(label)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def feature_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def encoder_fingerprint(bb: torch.nn.Module, device: str | torch.device = "cpu") -> str:
    """sha256 (16 hex) of the encoder's last-block tokens, rounded to 3 decimals, on a fixed seeded input
    of 4 x 6 patches (not square: a swapped axis changes it). The same weights under other model code
    give another digest; on one machine the same code gives the same digest (the rounding absorbs
    reordered sums; a rare value on a rounding edge only costs a re-extraction)."""
    p = int(getattr(bb, "patch_size", 16))
    x = torch.randn(1, 3, 4 * p, 6 * p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = _block_outputs(bb, x.to(device), [int(bb.num_layers) - 1], True)["patch"]
    q = torch.round(out.float().cpu() * 1000).to(torch.int64)
    return hashlib.sha256(q.numpy().tobytes()).hexdigest()[:16]


@dataclass
class FeatureSet:
    """Features of one split, read from the cache (tensors in memory, fp16 as stored)."""
    key: str
    path: Path
    files: list[str]
    labels: torch.Tensor                 # (n,) int64
    mean: torch.Tensor                   # (n, blocks, D)
    cls: torch.Tensor | None = None      # (n, blocks, D)
    patch: torch.Tensor | None = None    # (n, blocks, N, D)
    blocks: list[int] = field(default_factory=list)
    seconds: float = 0.0                 # extraction time (0: read from the cache)
    from_cache: bool = False

    def pooled(self, pooling: str, n_last: int) -> torch.Tensor:
        """(n, features) fp32, as DINOv2's ``create_linear_input`` builds a linear head's input
        (dinov2/eval/linear.py): ``cls``: the class tokens of the last ``n_last`` blocks,
        concatenated; ``cls+mean``: those and the mean patch token of the last block (DINOv2's
        ``avgpool``). For encoders without a class token (4M), ``mean``: the mean patch tokens of the
        last ``n_last`` blocks, concatenated."""
        if n_last > len(self.blocks):
            raise ConfigError(f"{n_last} last blocks asked for, the cache holds {len(self.blocks)} ({self.blocks})")
        if pooling in ("cls", "cls+mean") and self.cls is None:
            raise ConfigError(f"pooling {pooling!r}: this encoder has no class token (4M has none); use mean")
        if pooling == "cls":
            parts = [self.cls[:, -n_last:].flatten(1)]
        elif pooling == "cls+mean":
            parts = [self.cls[:, -n_last:].flatten(1), self.mean[:, -1]]
        elif pooling == "mean":
            parts = [self.mean[:, -n_last:].flatten(1)]
        else:
            raise ConfigError(f"pooling {pooling!r}: one of mean, cls, cls+mean")
        return torch.cat(parts, dim=1).float()


def _block_outputs(bb: torch.nn.Module, x: torch.Tensor, blocks: list[int], patch: bool) -> dict[str, torch.Tensor]:
    """mean / cls / patch features of the given blocks after the final norm, for 4M and timm ViTs."""
    if hasattr(bb, "vit") and getattr(bb, "num_prefix_tokens", 0):  # timm ViT with a class token
        outs = bb.vit.forward_intermediates(x, indices=blocks, norm=True, output_fmt="NLC", intermediates_only=True,
                                            return_prefix_tokens=True)
        toks = torch.stack([o[0] for o in outs], dim=1)             # (B, blocks, N, D)
        cls = torch.stack([o[1][:, 0] for o in outs], dim=1)        # (B, blocks, D)
    else:
        toks = torch.stack(bb.get_intermediate_layers(x, blocks, norm=True), dim=1)
        cls = None
    out = {"mean": toks.mean(dim=2)}
    if cls is not None:
        out["cls"] = cls
    if patch:
        out["patch"] = toks
    return out


def read_cache(path: Path) -> FeatureSet | None:
    """The finished cache at ``path`` (its index), or None."""
    from safetensors.torch import load_file

    idx_file = path / INDEX
    if not idx_file.is_file():
        return None
    idx = json.loads(idx_file.read_text())
    chunks: dict[str, list[torch.Tensor]] = {}
    for name in idx["shards"]:
        t = load_file(str(path / name))
        for k, v in t.items():
            chunks.setdefault(k, []).append(v)
    cat = {k: torch.cat(v) for k, v in chunks.items()}
    return FeatureSet(key=idx["key"], path=path, files=list(idx["files"]), labels=cat["labels"].long(),
                      mean=cat["mean"], cls=cat.get("cls"), patch=cat.get("patch"), blocks=list(idx["blocks"]),
                      seconds=0.0, from_cache=True)


def extract(bb: torch.nn.Module, dataset: Any, *, key_parts: dict[str, Any], cache_root: Path, blocks: Sequence[int],
            patch: bool = False, shard_size: int = 1024, batch_size: int = 64, num_workers: int = 0,
            desc: str = "features", say: Callable[[str], None] | None = None, progress: bool | None = None,
            device: str | torch.device = "cpu") -> FeatureSet:
    """The features of ``dataset`` (items ``{"inputs", "label", "file"}`` in order) by ``bb`` (frozen,
    eval mode), from the cache when its key is there, else extracted shard by shard into it."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    from .backbones.fourm import block_indices

    n_layers = int(bb.num_layers)
    blocks = block_indices(blocks, n_layers)
    bb.eval()
    parts = {**key_parts, "blocks": blocks, "patch": bool(patch), "format": FORMAT,
             "encoder_function": encoder_fingerprint(bb, device)}
    key = feature_key(parts)
    path = Path(cache_root) / key
    done = read_cache(path)
    if done is not None:
        if say:
            say(f"{desc}: {len(done.files)} image(s) read from the feature cache {path} (key {key})")
        return done
    path.mkdir(parents=True, exist_ok=True)
    n = len(dataset)
    if shard_size % batch_size:
        shard_size = max(batch_size, shard_size // batch_size * batch_size)
    n_shards = (n + shard_size - 1) // shard_size
    first = 0
    while first < n_shards and (path / f"shard-{first:05d}.safetensors").is_file():
        first += 1
    if first and say:
        say(f"{desc}: resuming the extraction after {first} complete shard(s) of {n_shards}")
    bb.eval()
    started = time.time()
    bar = tqdm(total=n, initial=min(n, first * shard_size), desc=desc, unit="img", disable=progress is False,
               dynamic_ncols=True, mininterval=1.0)
    try:
        for s in range(first, n_shards):
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(lo, hi)), batch_size=batch_size,
                                                 shuffle=False, num_workers=num_workers, collate_fn=_collate)
            acc: dict[str, list[torch.Tensor]] = {}
            files: list[str] = []
            for x, y, f in loader:
                with torch.no_grad():
                    out = _block_outputs(bb, x.to(device), blocks, patch)
                for k, v in out.items():
                    acc.setdefault(k, []).append(v.to("cpu", torch.float16))
                acc.setdefault("labels", []).append(y)
                files += f
                bar.update(len(f))
            tensors = {k: torch.cat(v).contiguous() for k, v in acc.items()}
            if not all(torch.isfinite(v.float()).all() for k, v in tensors.items() if k != "labels"):
                raise FloatingPointError(f"{desc}: non-finite features in images {lo}..{hi - 1} (fp16 overflow or a "
                                         "broken checkpoint); nothing cached")
            tmp = path / f"shard-{s:05d}.safetensors.partial"
            save_file(tensors, str(tmp), metadata={"files": json.dumps(files)})
            tmp.replace(path / f"shard-{s:05d}.safetensors")
    finally:
        bar.close()
    files_all: list[str] = []
    from safetensors import safe_open
    for s in range(n_shards):
        with safe_open(str(path / f"shard-{s:05d}.safetensors"), framework="pt") as fh:
            files_all += json.loads(fh.metadata()["files"])
    seconds = time.time() - started
    from .results import atomic_write_json
    atomic_write_json(path / INDEX, {"format": FORMAT, "key": key, "parts": parts, "n": n, "files": files_all,
                                     "blocks": blocks, "shards": [f"shard-{s:05d}.safetensors" for s in range(n_shards)],
                                     "seconds": round(seconds, 2), "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    fs = read_cache(path)
    assert fs is not None
    fs.seconds, fs.from_cache = seconds, False
    if say:
        say(f"{desc}: {n} image(s) in {seconds:.1f} s ({n / max(seconds, 1e-9):.0f} img/s) -> {path}")
    return fs


def _collate(items: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (torch.stack([it["inputs"] for it in items]), torch.tensor([int(it["label"]) for it in items]),
            [str(it["file"]) for it in items])


def cache_root() -> Path:
    from .paths import cache_dir
    return cache_dir() / "features"


__all__ = ["FeatureSet", "cache_root", "dataset_fingerprint", "extract", "feature_key", "read_cache"]
