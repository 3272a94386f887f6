"""`fourm-eval inspect`: what a checkpoint holds and what the backbone would use."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .checkpoints import resolve_checkpoint, sha256_file
from .errors import CheckpointError


def _group(key: str) -> str:
    parts = key.split(".")
    if parts[0] in ("encoder_embeddings", "decoder_embeddings") and len(parts) > 1:
        return ".".join(parts[:2])
    if parts[0] in ("encoder", "decoder") and len(parts) > 1 and parts[1].isdigit():
        return parts[0] + ".*"
    return parts[0]


def inspect_checkpoint(spec: str | Path, allow_pickle: bool = False, num_heads: int | None = None) -> dict[str, Any]:
    import torch

    from .backbones.fourm import (FourMBackbone, config_for_file, read_fourm_file, sincos_2d,
                                  split_keys)

    path = resolve_checkpoint(spec)
    shapes, meta, getter, fmt = read_fourm_file(path, allow_pickle=allow_pickle)
    if not any(k.startswith(("encoder.", "encoder_embeddings.")) for k in shapes):
        raise CheckpointError(f"{path}: no 4M encoder keys ('encoder.N.*', 'encoder_embeddings.*'); "
                              f"first keys: {sorted(shapes)[:5]}")
    cfg = config_for_file(shapes, meta, str(path), getter=getter, num_heads=num_heads)
    used, ignored = split_keys(shapes, cfg.rgb_domain, cfg.depth)

    def numel(keys: list[str]) -> int:
        n = 0
        for k in keys:
            c = 1
            for s in shapes[k]:
                c *= s
            n += c
        return n

    with torch.device("meta"):
        model = FourMBackbone(cfg)
    expected = model.expected_state_keys("")
    missing = [k for k in expected if k not in shapes]
    mismatched = [k for k in expected if k in shapes and tuple(shapes[k]) != expected[k]]
    from .checkpoints import read_safetensors_header
    if fmt == "safetensors":
        dtypes = Counter(t.dtype for t in read_safetensors_header(path).tensors.values())
    else:
        dtypes = Counter(str(v.dtype).removeprefix("torch.") for v in getter(list(shapes)).values())
    pos_key = f"encoder_embeddings.{cfg.rgb_domain}.pos_emb"
    pos_check = None
    if pos_key in shapes and len(shapes[pos_key]) == 3:
        n = shapes[pos_key][1]
        g = int(round(n ** 0.5))
        if g * g == n:
            stored = getter([pos_key])[pos_key].float()
            pos_check = float((stored - sincos_2d(g, g, cfg.dim)).abs().max())
    return {
        "path": str(path),
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "format": fmt,
        "config_source": cfg._provenance,  # type: ignore[attr-defined]
        "config_guessed": dict(cfg._guessed),  # type: ignore[attr-defined]
        "config": asdict(cfg),
        "metadata": meta,
        "dtypes": dict(dtypes),
        "params_total": numel(list(shapes)),
        "params_encoder": sum(p.numel() for p in model.parameters()),
        "keys_total": len(shapes),
        "keys_used": sorted(used),
        "keys_ignored": sorted(ignored),
        "ignored_groups": dict(Counter(_group(k) for k in ignored)),
        "missing_encoder_keys": missing,
        "shape_mismatches": mismatched,
        "pos_emb_max_abs_diff_vs_sincos": pos_check,
        "loadable": not missing and not mismatched,
    }
