"""Backbone registry: one ``build_backbone`` for 4M and the baselines.

    from fourm_eval.backbones import build_backbone
    bb = build_backbone("4m", checkpoint="model.safetensors")   # config from the file
    bb = build_backbone("4m-b")                                  # random init, named size
    tokens = bb(x)                                               # (B, N, D), final norm applied
    feats = bb.get_intermediate_layers(x, [3, 5, 7, 11])         # after those blocks, no final norm
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ..errors import ConfigError
from .fourm import NAMED_SIZES, FourMBackbone, FourMConfig, build_fourm, sincos_2d


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    source: str
    needs_checkpoint: bool = False


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> None:
    _REGISTRY[spec.name] = spec


def _register_builtin() -> None:
    register_backbone(BackboneSpec("4m", lambda checkpoint=None, **kw: build_fourm("4m", checkpoint, **kw),
                                   "4M encoder, architecture read from the checkpoint (4M-7 / 4M-21, any size)",
                                   "fourm_eval.backbones.fourm (from the 4M checkpoint format)",
                                   needs_checkpoint=True))
    for size, arch in NAMED_SIZES.items():
        register_backbone(BackboneSpec(
            size, (lambda s: lambda checkpoint=None, **kw: build_fourm(s, checkpoint, **kw))(size),
            f"4M encoder, dim {arch['dim']}, {arch['depth']} blocks, {arch['num_heads']} heads, SwiGLU, no biases",
            "fourm_eval.backbones.fourm"))
    from ..baselines import BASELINES, build_timm_baseline
    for name, (arch, tag, desc) in BASELINES.items():
        register_backbone(BackboneSpec(
            name, (lambda n: lambda checkpoint=None, **kw: build_timm_baseline(n, checkpoint, **kw))(name),
            desc, f"timm {arch}.{tag}"))


def list_backbones() -> list[BackboneSpec]:
    if not _REGISTRY:
        _register_builtin()
    return list(_REGISTRY.values())


def build_backbone(name: str, checkpoint: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered backbone; ``checkpoint`` is a path, a model folder or a cached hub id."""
    if not _REGISTRY:
        _register_builtin()
    key = name.lower()
    if key not in _REGISTRY:
        raise ConfigError(f"unknown backbone {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[key].builder(checkpoint=checkpoint, **kwargs)


__all__ = ["BackboneSpec", "FourMBackbone", "FourMConfig", "NAMED_SIZES", "build_backbone", "list_backbones",
           "register_backbone", "sincos_2d"]


def backbone_info(name: str, checkpoint: str | Path | None = None, allow_pickle: bool = False,
                  num_heads: int | None = None) -> dict[str, Any]:
    """Architecture facts of a backbone without building its weights (a meta-device model).

    For 4M files: the file's kind, where the config came from ('metadata' or
    'shapes') and, for shapes, what was guessed; these go into result records."""
    import torch

    from ..checkpoints import resolve_checkpoint
    from .fourm import config_for_file, guess_notes, read_fourm_file

    extra: dict[str, Any] = {}
    if name.lower() == "4m":
        if checkpoint is None:
            raise ConfigError("backbone '4m' needs a checkpoint")
        path = resolve_checkpoint(checkpoint)
        notes: list[str] = []
        shapes, meta, getter, fmt = read_fourm_file(path, allow_pickle=allow_pickle, notes=notes)
        cfg = config_for_file(shapes, meta, str(path), getter=getter, num_heads=num_heads)
        with torch.device("meta"):
            bb = FourMBackbone(cfg)
        extra = {"file_format": fmt, "config_source": cfg._provenance,  # type: ignore[attr-defined]
                 "config_guessed": dict(cfg._guessed),  # type: ignore[attr-defined]
                 "load_notes": notes + guess_notes(cfg, str(path))}
    else:
        with torch.device("meta"):
            bb = build_backbone(name, **({"num_heads": num_heads} if num_heads and name.startswith("4m") else {}))
        extra = {"config_source": "named size" if checkpoint is None or name.startswith("4m") else "timm architecture"}
    return {"embed_dim": bb.embed_dim, "num_layers": bb.num_layers, "patch_size": bb.patch_size,
            "params": sum(p.numel() for p in bb.parameters()), "family": bb.family,
            "config": bb.describe().get("config"), **extra}
