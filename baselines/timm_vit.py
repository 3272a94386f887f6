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
pickled files only with ``allow_pickle``) or from the hub: ``checkpoint="hub"``
is the hub id timm's own pretrained config names for the model
(``timm/<model>.<tag>``, file ``model.safetensors``, as ``timm.create_model(...,
pretrained=True)`` fetches it), resolved like every hub id by ``fourm_eval.hub``
(cache first, downloaded when missing unless offline, commit and sha256 recorded).
"""

from __future__ import annotations

import math
import re
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

    def __init__(self, name: str, model: nn.Module, source: str | None, layout: str | None = None,
                 load_notes: Iterable[str] = ()):
        super().__init__()
        self.name = name
        self.vit = model
        self.embed_dim = model.embed_dim
        self.num_layers = len(model.blocks)
        self.patch_size = model.patch_embed.patch_size[0]
        self.num_prefix_tokens = model.num_prefix_tokens
        self.source = source
        # Which checkpoint layout was recognised ("timm", "deit", "mae"; None: random init) and what was
        # changed to load it, so result records say how the weights got in.
        self.layout = layout
        self.load_notes = list(load_notes)

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
        return {"family": self.family, "name": self.name, "source": self.source, "layout": self.layout,
                "load_notes": list(self.load_notes),
                "params": sum(p.numel() for p in self.parameters())}


def timm_hub_id(name: str) -> str:
    """The hub repository timm's pretrained config names for a baseline (what ``pretrained=True`` reads)."""
    import timm

    arch, tag, _ = BASELINES[name]
    cfg = timm.models.get_pretrained_cfg(f"{arch}.{tag}")
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        raise CheckpointError(f"{name}: timm {timm.__version__} names no hub weights for {arch}.{tag}; pass the "
                              "weights file with --checkpoint")
    return hub_id


def weights_spec(name: str, checkpoint: str | Path | None) -> str | Path | None:
    """``hub`` / ``cache`` -> timm's hub id for the baseline; anything else as given."""
    if checkpoint is not None and str(checkpoint) in ("hub", "cache"):
        return timm_hub_id(name)
    return checkpoint


def _weights_file(name: str, checkpoint: str | Path | None) -> Path | None:
    from fourm_eval.checkpoints import resolve_checkpoint

    arch, tag, _ = BASELINES[name]
    if checkpoint is None:
        return None
    try:
        return resolve_checkpoint(weights_spec(name, checkpoint))
    except CheckpointError as e:
        raise CheckpointError(f"{name}: weights not found. Expected a local file (timm's "
                              f"'{arch}.{tag}' model.safetensors) or a hub id (`hub` for timm's own, "
                              f"timm/{arch}.{tag}). Details: {e}") from None


def _load_state_dict(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    from fourm_eval.checkpoints import detect_format, load_pickled_state_dict, read_safetensors_header

    if detect_format(path) == "safetensors":
        read_safetensors_header(path)  # clear errors for truncated or foreign files
        from safetensors.torch import load_file
        return load_file(str(path))
    return load_pickled_state_dict(path, allow_pickle=allow_pickle)


# --- released layouts -> timm's names ------------------------------------------------------------
# DeiT III (facebookresearch/deit, models_v2.py) names LayerScale ``blocks.N.gamma_1/_2``; timm names
# the same vectors ``blocks.N.ls1.gamma/ls2.gamma``. Every other encoder name is shared with timm.
_DEIT_GAMMA = re.compile(r"^blocks\.(\d+)\.gamma_([12])$")
_TIMM_LS = re.compile(r"^blocks\.(\d+)\.ls([12])\.gamma$")
# MAE pre-training files (facebookresearch/mae, models_mae.py) carry the decoder and the mask token;
# they are dropped by name, never by "anything the model does not know", so junk still fails.
MAE_DECODER_MODULES = ("decoder_embed", "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred",
                       "mask_token")
# Classifier-side modules the backbone does not contain (num_classes=0): released with the weights.
CLASSIFIER_MODULES = ("head", "head_dist")


def _under(key: str, modules: Iterable[str]) -> bool:
    return any(key == m or key.startswith(m + ".") for m in modules)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def detect_layout(keys: Iterable[str]) -> str:
    """'deit', 'mae' or 'timm', from the key names (after a ``module.`` prefix is removed).

    'timm' means timm's own names; MAE's encoder-only files already use them and are reported so.
    """
    keys = list(keys)
    deit = any(_DEIT_GAMMA.match(k) for k in keys)
    mae = any(_under(k, MAE_DECODER_MODULES) for k in keys)
    if deit and mae:
        raise ValueError("mixes DeiT III LayerScale names (blocks.N.gamma_1) with MAE decoder keys")
    if deit and any(_TIMM_LS.match(k) for k in keys):
        raise ValueError("mixes DeiT III (blocks.N.gamma_1) and timm (blocks.N.ls1.gamma) LayerScale names")
    return "deit" if deit else "mae" if mae else "timm"


def _pos_embed_split(n_tokens: int, grid: tuple[int, int], n_prefix: int) -> tuple[int, tuple[int, int]] | None:
    """How many leading class positions a file's pos-embed of ``n_tokens`` rows has, and its grid.

    The model's own grid is preferred (no guessing); otherwise the rest must be a square grid.
    Returns None when neither 0 nor ``n_prefix`` class positions explain the length.
    """
    options = [n_prefix, 0] if n_prefix else [0]
    for p in options:
        if n_tokens - p == grid[0] * grid[1]:
            return p, grid
    fits = []
    for p in options:
        side = math.isqrt(max(n_tokens - p, 0))
        if side > 0 and side * side == n_tokens - p:
            fits.append((p, (side, side)))
    return fits[0] if len(fits) == 1 else None


def _fit_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module, path: Path, arch: str, notes: list[str]) -> None:
    """Bring the file's ``pos_embed`` to the model's layout, exactly where that is possible.

    timm's DeiT III (``no_embed_class=True``) and the DeiT repository keep one position per patch and
    none for the class token; MAE/ViT keep a class position first. A file with a class position for
    a model without one has it folded into ``cls_token`` (the class token is only ever used as
    ``cls_token + pos``, so outputs are unchanged at every input size); a file without one for a model
    that has one gets a zero class position (what that file's model added). A different patch grid is
    resampled bicubically on the patch positions only, so class positions are never mixed in.
    """
    pe = sd.get("pos_embed")
    own = model.pos_embed
    if pe is None or own is None:
        return
    grid = tuple(model.patch_embed.grid_size)
    n_prefix_model = 0 if model.no_embed_class else model.num_prefix_tokens
    if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != own.shape[2]:
        raise CheckpointError(f"{path}: does not fit {arch}: pos_embed has shape {_shape(pe)}, expected "
                              f"(1, tokens, {own.shape[2]})")
    split = _pos_embed_split(pe.shape[1], grid, model.num_prefix_tokens)
    if split is None:
        raise CheckpointError(
            f"{path}: does not fit {arch}: pos_embed has {pe.shape[1]} positions, which is neither a square "
            f"patch grid nor a square grid plus {model.num_prefix_tokens} class position(s); the model expects "
            f"{grid[0]}x{grid[1]} patch "
            f"positions{' plus the class position' if n_prefix_model else ' (no class position)'}")
    n_prefix_file, file_grid = split
    if n_prefix_file == n_prefix_model and file_grid == grid:
        return  # already the model's layout: keep the tensor bit for bit
    prefix, patches = pe[:, :n_prefix_file], pe[:, n_prefix_file:]
    if file_grid != grid:
        from timm.layers import resample_abs_pos_embed
        patches = resample_abs_pos_embed(patches, new_size=list(grid), old_size=list(file_grid),
                                         num_prefix_tokens=0)
        notes.append(f"pos_embed: patch grid {file_grid[0]}x{file_grid[1]} resampled to {grid[0]}x{grid[1]} "
                     "(bicubic)")
    if n_prefix_file > n_prefix_model:
        if model.num_prefix_tokens != 1 or model.cls_token is None:
            raise CheckpointError(f"{path}: does not fit {arch}: pos_embed has a class position but the model "
                                  f"adds none, and it has {model.num_prefix_tokens} prefix tokens, so it cannot "
                                  "be folded into cls_token")
        if "cls_token" in sd:  # a missing cls_token is reported with the other missing keys
            dtype = own.dtype
            sd["cls_token"] = sd["cls_token"].to(dtype) + prefix.to(dtype)
            notes.append("pos_embed: the file's class position was folded into cls_token (the model adds no "
                         "position to the class token; outputs are unchanged)")
        new = patches
    elif n_prefix_file < n_prefix_model:
        new = torch.cat([patches.new_zeros(1, n_prefix_model, patches.shape[2]), patches], dim=1)
        notes.append("pos_embed: the file has no class position; a zero one was added (the file's model added "
                     "none, so outputs are unchanged)")
    else:
        new = torch.cat([prefix, patches], dim=1)
    sd["pos_embed"] = new


def to_timm_state_dict(sd: dict[str, Any], model: nn.Module, path: Path,
                       arch: str) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map a checkpoint in timm's, the DeiT repository's or MAE's layout onto ``model``'s names.

    Returns (state dict, layout, notes). Raises CheckpointError naming the file for anything that does
    not fit: keys the model needs but the file lacks (in the file's own naming), keys nobody expects,
    shapes that differ. Only known extras are dropped: MAE's decoder and the classifier head.
    """
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}; expected a state dict of {arch}")
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}  # model key -> the file's key, for messages
    for k, v in sd.items():
        name = k.removeprefix("module.")
        if name in out:
            raise CheckpointError(f"{path}: {origin[name]!r} and {k!r} both give {name!r}")
        out[name], origin[name] = v, k
    try:
        layout = detect_layout(out)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}; cannot tell which layout it is") from None
    own = model.state_dict()
    notes: list[str] = []
    if layout == "deit":
        renamed: dict[str, torch.Tensor] = {}
        for k, v in out.items():
            m = _DEIT_GAMMA.match(k)
            new = f"blocks.{m.group(1)}.ls{m.group(2)}.gamma" if m else k
            renamed[new] = v
            if m:
                origin[new] = origin.pop(k)
        out = renamed
        notes.append("DeiT repository layout: blocks.N.gamma_1/gamma_2 -> blocks.N.ls1.gamma/ls2.gamma")
    dropped = [k for k in out if k not in own and _under(k, MAE_DECODER_MODULES)]
    if dropped:
        notes.append(f"MAE pre-training layout: dropped {len(dropped)} decoder/mask-token tensors")
    head = [k for k in out if k not in own and _under(k, CLASSIFIER_MODULES)]
    if head:
        notes.append(f"dropped the classifier ({', '.join(sorted({k.split('.')[0] for k in head}))})")
    fc_norm = [k for k in out if k not in own and _under(k, ("fc_norm",))]
    has_norm = any(_under(k, ("norm",)) for k in out)
    if fc_norm and not has_norm and any(_under(k, ("norm",)) for k in own):
        raise CheckpointError(
            f"{path}: has fc_norm.* but no norm.*: a global-pool fine-tuned checkpoint (MAE's models_vit.py "
            f"deletes the per-token final norm and normalises the pooled vector instead). {arch} returns "
            f"patch tokens after the final norm, which this file does not define; use the pre-training "
            f"checkpoint (e.g. mae_pretrain_vit_base.pth) or timm's weights")
    if fc_norm and has_norm:
        head += fc_norm
        notes.append("dropped fc_norm (it normalises the pooled vector for the classifier; norm.* is used)")
    for k in dropped + head:
        out.pop(k)
    _fit_pos_embed(out, model, path, arch, notes)

    missing = [k for k in own if k not in out]
    unexpected = [k for k in out if k not in own]
    shape = [f"{origin.get(k, k)}: file {_shape(out[k])} vs model {_shape(own[k])}"
             for k in own if k in out and out[k].shape != own[k].shape]
    if missing or shape:
        named = missing
        if layout == "deit":  # name what the file should have held, in its own naming
            named = [_TIMM_LS.sub(r"blocks.\1.gamma_\2 (timm: \g<0>)", k) for k in missing]
        parts = ([f"{len(missing)} missing {named[:10]}{' ...' if len(missing) > 10 else ''}"] if missing else [])
        parts += [f"{len(shape)} shape mismatches {shape[:5]}{' ...' if len(shape) > 5 else ''}"] if shape else []
        raise CheckpointError(f"{path}: does not fit {arch} (recognised the {layout} layout): {'; '.join(parts)}")
    if unexpected:
        raise CheckpointError(
            f"{path}: has {len(unexpected)} keys {arch} does not use (recognised the {layout} layout; only MAE "
            f"decoder keys {list(MAE_DECODER_MODULES)} and the classifier head are dropped): "
            f"{[origin.get(k, k) for k in unexpected[:10]]}{' ...' if len(unexpected) > 10 else ''}")
    return out, layout, notes


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
    layout, notes = None, []
    if path is not None:
        sd, layout, notes = to_timm_state_dict(_load_state_dict(path, allow_pickle), model, path, arch)
        model.load_state_dict(sd, strict=True)
        source = str(path)
    bb = TimmViTBackbone(name, model, source, layout=layout, load_notes=notes)
    if grad_checkpointing:
        bb.set_grad_checkpointing(True)
    return bb
