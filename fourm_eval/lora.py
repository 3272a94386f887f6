"""LoRA as a fine-tuning mode (profile section ``finetune``), through peft.

The semantics are ml-4m's (apple/ml-4m, ``fourm/models/lora_utils.py`` at commit cda590f), value by value:

* an adapted linear computes ``W0 x + scale * B A x`` (``LoRAWrapper.forward``); the profile's
  ``finetune.scale`` is that ``scale``. peft scales by ``lora_alpha / r``, so ``lora_alpha = scale * r``
  is passed for every adapted linear (the ``r`` of that linear, see the next point);
* a packed linear gets a bottleneck as many times wider as it packs projections: ``qkv`` 3 x rank
  (ml-4m's ``num_packed_linear``; ``kv``, ``qk``, ``qv``: 2 x rank), with its A initialised as for a
  single projection (std 1 / rank, not 1 / (3 rank)); ml-4m also requires
  ``num_packed_linear * rank <= min(in_features, out_features)``, checked here with a named error;
* initialisation: ``A ~ N(0, (1 / rank)^2)`` (``nn.init.normal_(lora_down.weight, std=1/rank)``) and
  ``B = 0``, so the adapted model equals the pre-trained one at step 0. This is applied here after
  peft has built the layers (peft's own "gaussian" init would give the packed qkv std 1 / (3 rank));
* targets: ``all`` is ml-4m's ``TRANSFORMER_MODULES``: every ``nn.Linear`` inside an attention or MLP
  module of the encoder blocks (4M: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2`` and the SwiGLU
  gate ``mlp.fc3``; timm's ViTs: ``attn.qkv``, ``attn.proj``, ``mlp.fc1``, ``mlp.fc2``); ``attn`` and
  ``mlp`` are ml-4m's ``attention`` and ``mlp`` ids; any other entry is a module-name suffix;
* everything of the backbone except the adapters is frozen (ml-4m's ``unfreeze_all_LoRA_layers``
  unfreezes only ``lora`` parameters); heads and necks train in full;
* merging: ``W = W0 + scale * B @ A`` (``fuse_LoRA_into_linear``); biases unchanged.

What peft adds that ml-4m lacks: ``finetune.dropout`` (peft's ``lora_dropout`` on the adapter's input;
ml-4m has none, so the default 0.0 is ml-4m's behaviour).

torch and peft are imported inside the functions (the CLI imports this module's profile helpers).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODES = ("full", "lora")
GROUPS = ("all", "attn", "mlp")
# ml-4m lora_utils: SELF/CROSS_ATTENTION_MODULES and MLP_MODULES, by class name
ATTENTION_CLASSES = ("Attention", "NormAttention", "CrossAttention", "NormCrossAttention")
MLP_CLASSES = ("Mlp", "GatedMlp", "SwiGLUFFNFused", "SwiGLU", "GluMlp", "SwiGLUPacked")
MERGED_FILE = "backbone_merged.safetensors"
ADAPTER = "default"  # peft's adapter name


# ------------------------------------------------------------------ profile
def resolve_finetune(p: dict[str, Any], source: str = "the profile") -> dict[str, Any]:
    """The profile with its ``finetune`` section checked (per-size values already resolved).

    Full fine-tuning (the default) removes the section: its other keys only matter to LoRA, and a
    full run's record stays what it was before LoRA existed (no ``config.finetune``; ``finetune_mode``
    reads an absent section as full). A LoRA section gets its defaults written in, so the record
    holds every value the run used."""
    ft = p.get("finetune")
    if ft is None:
        return p
    if not isinstance(ft, dict):
        raise ConfigError(f"{source}: finetune must be a section (mode, rank, scale, dropout, targets), not {ft!r}")
    mode = ft.get("mode", "full")
    if mode not in MODES:
        raise ConfigError(f"{source}: finetune.mode = {mode!r}; one of {', '.join(MODES)}")
    out = dict(p)
    if mode == "full":
        out.pop("finetune")
        return out
    rank = ft.get("rank")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"{source}: finetune.rank = {rank!r}; LoRA needs a positive integer rank")
    scale = ft.get("scale", 1.0)
    dropout = ft.get("dropout", 0.0)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ConfigError(f"{source}: finetune.scale = {scale!r}; expected a number")
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= float(dropout) < 1.0:
        raise ConfigError(f"{source}: finetune.dropout = {dropout!r}; expected a probability in [0, 1)")
    targets = ft.get("targets", "all")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets or not all(isinstance(t, str) and t.strip() for t in targets):
        raise ConfigError(f"{source}: finetune.targets = {ft.get('targets')!r}; all, attn, mlp, or a list of "
                          "module-name suffixes (e.g. [attn.qkv, mlp.fc2])")
    if p.get("mode") == "linear":
        raise ConfigError(f"{source}: mode linear (a frozen backbone) and finetune.mode lora exclude each other")
    out["finetune"] = {"mode": "lora", "rank": int(rank), "scale": float(scale), "dropout": float(dropout),
                       "targets": targets}
    return out


def is_lora(p: dict[str, Any]) -> bool:
    ft = p.get("finetune")
    return isinstance(ft, dict) and ft.get("mode") == "lora"


def describe(ft: dict[str, Any] | None) -> str:
    """The run's fine-tuning mode in words, for footnotes and the console."""
    if not ft or ft.get("mode", "full") == "full":
        return "full fine-tuning"
    return (f"LoRA rank {ft['rank']}, scale {float(ft['scale'])} (backbone frozen; adapters on "
            f"{', '.join(ft.get('targets', ['all']))} linears)")


# ----------------------------------------------------------------- adapters
def _packed(name: str) -> int:
    """ml-4m's num_packed_linear from the linear's own name (sorted letters, as ml-4m compares)."""
    last = sorted(name.rsplit(".", 1)[-1])
    if last == sorted("qkv"):
        return 3
    if last in (sorted("kv"), sorted("qk"), sorted("qv")):
        return 2
    return 1


def target_linears(net: Any, targets: list[str]) -> list[str]:
    """Full module names (inside ``net``) of the block linears the targets name, in module order."""
    import torch.nn as nn

    L = int(net.num_layers)
    in_block: list[tuple[str, str]] = []  # (name, parent class)
    modules = dict(net.named_modules())
    for name, m in modules.items():
        if not isinstance(m, nn.Linear) or "." not in name:
            continue
        if not 1 <= net.layer_id(name + ".weight") <= L:
            continue
        parent = modules[name.rsplit(".", 1)[0]]
        in_block.append((name, type(parent).__name__))
    chosen: set[str] = set()
    for t in targets:
        t = t.strip()
        if t in GROUPS:
            classes = {"all": ATTENTION_CLASSES + MLP_CLASSES, "attn": ATTENTION_CLASSES, "mlp": MLP_CLASSES}[t]
            hit = {n for n, cls in in_block if cls in classes}
        else:
            hit = {n for n, _ in in_block if n == t or n.endswith("." + t)}
        if not hit:
            known = sorted({n.split(".", 2)[-1] if n.startswith("encoder.") else n.split(".", 3)[-1]
                            for n, _ in in_block})
            raise ConfigError(f"finetune.targets: {t!r} names no linear of the backbone's blocks; "
                              f"the blocks' linears: {', '.join(known)} (or all, attn, mlp)")
        chosen |= hit
    return [n for n, _ in in_block if n in chosen]


def inject(net: Any, ft: dict[str, Any]) -> dict[str, Any]:
    """Adapters on ``net``'s target linears (after its pre-trained weights are loaded); every other
    parameter of ``net`` frozen. Returns the facts for the record (without parameter counts)."""
    import re

    import peft
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    rank, scale = int(ft["rank"]), float(ft["scale"])
    names = target_linears(net, list(ft["targets"]))
    modules = dict(net.named_modules())
    ranks: dict[str, int] = {}
    for n in names:
        lin = modules[n]
        r = _packed(n) * rank
        if r > min(lin.in_features, lin.out_features):
            raise ConfigError(f"finetune.rank {rank}: {n} ({lin.in_features} -> {lin.out_features}) would get a "
                              f"bottleneck of {r} ({_packed(n)} packed x rank), more than min(in, out) = "
                              f"{min(lin.in_features, lin.out_features)} (ml-4m's LoRAWrapper refuses it too)")
        ranks[n] = r
    cfg = LoraConfig(r=rank, lora_alpha=scale * rank, lora_dropout=float(ft.get("dropout", 0.0)), bias="none",
                     target_modules=names, init_lora_weights=False,
                     rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items() if r != rank},
                     alpha_pattern={f"^{re.escape(n)}$": scale * r for n, r in ranks.items() if r != rank})
    for p in net.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(cfg, net, adapter_name=ADAPTER)
    adapted = {n: m for n, m in net.named_modules() if isinstance(m, LoraLayer)}
    if sorted(adapted) != sorted(names):
        raise RuntimeError(f"peft adapted {sorted(adapted)}, expected {sorted(names)}")
    for n, m in adapted.items():
        r = m.r[ADAPTER]
        if r != ranks[n] or not math_close(m.scaling[ADAPTER], scale):
            raise RuntimeError(f"peft gave {n} rank {r}, scaling {m.scaling[ADAPTER]}; expected {ranks[n]}, {scale}")
        with torch.no_grad():  # ml-4m: lora_down ~ N(0, 1/rank) (rank, not the packed width), lora_up = 0
            torch.nn.init.normal_(m.lora_A[ADAPTER].weight, std=1.0 / rank)
            torch.nn.init.zeros_(m.lora_B[ADAPTER].weight)
    for name, p in net.named_parameters():
        p.requires_grad_(".lora_" in name)
    suffixes = sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n in names})
    return {"mode": "lora", "rank": rank, "scale": scale, "alpha": scale * rank,
            "dropout": float(ft.get("dropout", 0.0)),
            "targets": list(ft["targets"]), "adapted_linears": suffixes, "n_adapted": len(names),
            "packed_rank": {s: _packed(s) * rank for s in suffixes if _packed(s) > 1},
            "init": "A ~ N(0, (1/rank)^2), B = 0 (ml-4m lora_utils.LoRAWrapper)",
            "peft_version": peft.__version__}


def math_close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))


def param_counts(model: Any, net: Any) -> dict[str, int]:
    """Trainable and frozen parameters of the whole model, and of the backbone's adapters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    adapters = sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
    backbone_frozen = sum(p.numel() for p in net.parameters() if not p.requires_grad)
    return {"trainable_params": trainable, "frozen_params": total - trainable, "adapter_params": adapters,
            "backbone_frozen_params": backbone_frozen}


# ------------------------------------------------------------------- merging
def merged_state_dict(net: Any) -> dict[str, Any]:
    """``net``'s state dict in its own (un-adapted) names, every adapter merged:
    ``W = W0 + scaling * B @ A`` (ml-4m's fuse_LoRA_into_linear), computed in float64 and stored in the
    base weight's dtype; biases as they are."""
    import torch
    from peft.tuners.lora import LoraLayer

    sd = {k: v.detach() for k, v in net.state_dict().items() if ".lora_" not in k}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        out[k.replace(".base_layer.", ".")] = v.clone()
    for name, m in net.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        w0 = m.base_layer.weight.detach()
        a = m.lora_A[ADAPTER].weight.detach().double()
        b = m.lora_B[ADAPTER].weight.detach().double()
        out[f"{name}.weight"] = (w0.double() + float(m.scaling[ADAPTER]) * (b @ a)).to(w0.dtype)
    return {k: v.contiguous() for k, v in out.items()}


def fourm_file_tensors(net: Any, sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """A 4M backbone's (merged) state dict in the released 4M safetensors layout, with its config
    metadata (docs/fourm-checkpoints.md): ``encoder_embeddings.<rgb>.proj.weight`` as the Linear over
    (row, column, channel)-flattened patches, ``mod_emb``, the fixed ``pos_emb`` of the config's
    image size, ``encoder.*``, ``encoder_norm.*`` (zero ``.bias`` buffers for bias-free norms, as the
    released files hold them), ``register_tokens``; metadata values are Python ``str()`` values."""
    import torch

    from .backbones.fourm import sincos_2d

    c = net.cfg
    emb = f"encoder_embeddings.{c.rgb_domain}."
    p = c.patch_size
    w = sd["patch_embed.weight"]  # (D, 3, p, p) -> (D, p, p, 3) -> (D, p*p*3)
    out = {emb + "proj.weight": w.permute(0, 2, 3, 1).reshape(c.dim, p * p * 3).contiguous(),
           emb + "mod_emb": sd["mod_emb"]}
    if "patch_embed.bias" in sd:
        out[emb + "proj.bias"] = sd["patch_embed.bias"]
    grid = c.image_size // p
    out[emb + "pos_emb"] = sincos_2d(grid, grid, c.dim)
    if "register_tokens" in sd:
        out["register_tokens"] = sd["register_tokens"]
    for k, v in sd.items():
        if k.startswith(("encoder.", "encoder_norm.")):
            out[k] = v
    for name, m in net.named_modules():  # bias-free norms: zero bias buffers, as in the released files
        if isinstance(m, torch.nn.LayerNorm) and m.bias is None and name.startswith(("encoder", "encoder_norm")):
            out[f"{name}.bias"] = torch.zeros(m.normalized_shape[0], dtype=m.weight.dtype)
    meta = {"domains_in": [c.rgb_domain], "domains_out": [], "encoder_depth": c.depth, "decoder_depth": 0,
            "dim": c.dim, "num_heads": c.num_heads, "mlp_ratio": c.mlp_ratio, "qkv_bias": c.qkv_bias,
            "proj_bias": c.proj_bias, "mlp_bias": c.mlp_bias, "norm_bias": c.norm_bias, "act_layer": c.act_layer,
            "gated_mlp": c.gated_mlp, "qk_norm": c.qk_norm, "image_size": c.image_size, "patch_size": c.patch_size}
    if c.num_register_tokens:
        meta["num_register_tokens"] = c.num_register_tokens
    return {k: v.contiguous() for k, v in out.items()}, {k: str(v) for k, v in meta.items()}


_ST_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def write_safetensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """A safetensors file with its header in sorted key order, so equal tensors and metadata give equal
    bytes (the recorded sha256 is reproducible; safetensors' own writer orders the metadata by a hash
    map, which differs between processes). Layout per the format: 8-byte little-endian header length,
    the JSON header padded with spaces to a multiple of 8, the tensors' bytes back to back."""
    import json
    import struct

    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = _ST_DTYPES.get(str(t.dtype).removeprefix("torch."))
        if dtype is None:
            raise ConfigError(f"merged export: {name} has dtype {t.dtype}, which safetensors does not store")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for b in blobs:
            f.write(b)


def export_merged(net: Any, path: str | Path) -> dict[str, Any]:
    """Write ``net`` with its adapters merged, loadable without peft through ``--checkpoint``: the
    released 4M layout for 4M backbones, timm's layout (the ``vit.`` module's own names) for the
    DeiT III / MAE baselines. Returns path, sha256 and layout for the record."""
    import os

    sd = merged_state_dict(net)
    family = getattr(net, "family", None)
    if family == "4m":
        tensors, meta = fourm_file_tensors(net, sd)
        layout = "4m (released safetensors layout, config in the header)"
    elif family == "timm-vit":
        tensors = {k.removeprefix("vit."): v for k, v in sd.items()}
        meta = {"format": "pt"}
        layout = "timm"
    else:
        raise ConfigError(f"merged export: no file layout for backbone family {family!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    write_safetensors(tmp, tensors, meta)
    tmp.replace(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return {"path": path.name, "sha256": h.hexdigest(), "layout": layout, "n_tensors": len(tensors)}


# ------------------------------------------------------------ runner hooks
def backbone_cfg_extra(p: dict[str, Any]) -> dict[str, Any]:
    """What ``FourmEvalViT`` gets from the profile's ``finetune`` section (nothing for full runs)."""
    return {"finetune": dict(p["finetune"])} if is_lora(p) else {}


def finish_run(runner: Any, work_dir: Path) -> dict[str, Any] | None:
    """After training: the record's ``finetune`` entry of a LoRA run (its settings, peft version,
    parameter counts) with the merged backbone written beside it; None for a full run."""
    model = getattr(runner.model, "module", runner.model)
    vit = getattr(model, "backbone", None)
    info = getattr(vit, "lora_info", None)
    if info is None:
        return None
    out = dict(info)
    out.update(param_counts(model, vit.net))
    out["merged"] = export_merged(vit.net, Path(work_dir) / MERGED_FILE)
    return out
