"""DeiT III and MAE baselines, built with timm, behind the backbone API of fourm-eval.

Conventions shared with the 4M backbone (so heads and tasks treat all alike):

* ``bb(x)`` returns the *patch* tokens (B, N, D) after the final norm. The
  CLS token (and any other prefix token) is dropped, because 4M has none and
  dense heads need exactly one token per patch. ``bb.forward_with_prefix(x)``
  keeps it for users who want a CLS-pooled classifier.
* ``get_intermediate_layers(x, idx)`` -> patch tokens right after those
  0-based blocks, before the final norm (timm's ``forward_intermediates``).
* ``layer_id(name)``: cls/pos/patch embeddings -> 0, ``blocks.i`` -> i+1,
  everything else -> L+1.
* Other input sizes: timm's ``dynamic_img_size`` resamples the learned
  position embedding (bicubic), the standard practice for these models.

Weights come from a local file (``checkpoint=PATH``: safetensors by default,
pickled files only with ``allow_pickle``) or from the local Hugging Face cache
under timm's hub id (``timm/<model>.<tag>``); nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn as nn

from fourm_eval.backbones.fourm import block_indices, patch_grid
from fourm_eval.errors import CheckpointError

# name -> (timm architecture, pretrained tag, description)
BASELINES: dict[str, tuple[str, str, str]] = {
    "deit3-b": ("deit3_base_patch16_224", "fb_in22k_ft_in1k", "DeiT III ViT-B/16 (IN-21K, ft IN-1K)"),
    "deit3-l": ("deit3_large_patch16_224", "fb_in22k_ft_in1k", "DeiT III ViT-L/16 (IN-21K, ft IN-1K)"),
    "mae-b": ("vit_base_patch16_224", "mae", "MAE ViT-B/16 (IN-1K, pre-trained only)"),
    "mae-l": ("vit_large_patch16_224", "mae", "MAE ViT-L/16 (IN-1K, pre-trained only)"),
}


class TimmViTBackbone(nn.Module):
    family = "timm-vit"

    def __init__(self, name: str, model: nn.Module, source: str | None):
        super().__init__()
        self.name = name
        self.vit = model
        self.embed_dim = model.embed_dim
        self.num_layers = len(model.blocks)
        self.patch_size = model.patch_embed.patch_size[0]
        self.num_prefix_tokens = model.num_prefix_tokens
        self.source = source

    def forward_with_prefix(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(x)[:, self.num_prefix_tokens:]

    def get_intermediate_layers(self, x: torch.Tensor, indices: Iterable[int],
                                norm: bool = False) -> list[torch.Tensor]:
        idx = block_indices(indices, self.num_layers)
        order = sorted(set(idx))
        feats = self.vit.forward_intermediates(x, indices=order, norm=norm, output_fmt="NLC",
                                               intermediates_only=True)
        by = dict(zip(order, feats))
        return [by[i] for i in idx]

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        return patch_grid(x, self.patch_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)

    def layer_id(self, name: str) -> int:
        name = name.removeprefix("backbone.").removeprefix("module.").removeprefix("vit.")
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token", "dist_token")):
            return 0
        if name.startswith("blocks."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay_names(self) -> set[str]:
        return {"vit.cls_token", "vit.pos_embed", "vit.reg_token"}

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "name": self.name, "source": self.source,
                "params": sum(p.numel() for p in self.parameters())}


def _weights_file(name: str, checkpoint: str | Path | None) -> Path | None:
    from fourm_eval.checkpoints import resolve_checkpoint

    arch, tag, _ = BASELINES[name]
    if checkpoint is None:
        return None
    spec = str(checkpoint)
    if spec in ("hub", "cache"):
        spec = f"timm/{arch}.{tag}"
    try:
        return resolve_checkpoint(spec)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: weights not found. Expected a local file (timm's "
                              f"'{arch}.{tag}' model.safetensors) or the hub id timm/{arch}.{tag} in the "
                              f"local Hugging Face cache. Details: {e}") from None


def _load_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from fourm_eval.checkpoints import detect_format, load_pickled_state_dict, read_safetensors_header

    if detect_format(path) == "safetensors":
        read_safetensors_header(path)  # clear errors for truncated or foreign files
        from safetensors.torch import load_file
        return load_file(str(path))
    return load_pickled_state_dict(path, allow_pickle=allow_pickle)


def build_timm_baseline(name: str, checkpoint: str | Path | None = None, allow_pickle: bool = False,
                        drop_path_rate: float = 0.0, grad_checkpointing: bool = False, img_size: int = 224,
                        **overrides: Any) -> TimmViTBackbone:
    import timm

    if name not in BASELINES:
        raise KeyError(name)
    arch, tag, _ = BASELINES[name]
    model = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="",
                              drop_path_rate=drop_path_rate, dynamic_img_size=True, img_size=img_size,
                              **overrides)
    path = _weights_file(name, checkpoint)
    source = f"random init ({arch})"
    if path is not None:
        sd = _load_state_dict(path, allow_pickle)
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
        # Accept timm checkpoints and the original MAE/DeiT files (weights under 'model').
        drop = [k for k in sd if k.startswith(("head.", "fc_norm.", "decoder", "mask_token", "head_dist."))]
        for k in drop:
            sd.pop(k)
        if "pos_embed" in sd and sd["pos_embed"].shape != model.pos_embed.shape:
            from timm.layers import resample_abs_pos_embed
            sd["pos_embed"] = resample_abs_pos_embed(
                sd["pos_embed"], new_size=model.patch_embed.grid_size,
                num_prefix_tokens=0 if model.no_embed_class else model.num_prefix_tokens)
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        unexpected = [k for k in sd if k not in own]
        shape = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or shape:
            raise CheckpointError(f"{path}: does not fit {arch}: missing {missing[:10]}"
                                  f"{' ...' if len(missing) > 10 else ''}; shape mismatches {shape[:5]}")
        if unexpected:
            raise CheckpointError(f"{path}: has keys {arch} does not use: {unexpected[:10]}")
        model.load_state_dict(sd, strict=True)
        source = str(path)
    bb = TimmViTBackbone(name, model, source)
    if grad_checkpointing:
        bb.set_grad_checkpointing(True)
    return bb
