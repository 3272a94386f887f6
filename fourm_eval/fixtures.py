"""Tiny 4M checkpoints in the released file format, for tests and smoke runs.

The files follow docs/fourm-checkpoints.md: a full FM (encoder + decoder)
state dict with the RGB and one tokenised modality, zero ``.bias`` buffers
for bias-free norms, fixed sin-cos ``pos_emb`` buffers, and the model config
in the safetensors ``__metadata__`` as Python ``str()`` values. No network,
no randomness beyond the given seed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


def _linear(g: torch.Generator, out_f: int, in_f: int) -> torch.Tensor:
    bound = math.sqrt(6.0 / (in_f + out_f))
    return (torch.rand(out_f, in_f, generator=g) * 2 - 1) * bound


def make_fourm_state_dict(*, dim: int = 64, depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.0,
                          gated_mlp: bool = True, act_layer: str = "SiLU", qkv_bias: bool = False,
                          proj_bias: bool = False, mlp_bias: bool = False, norm_bias: bool = False,
                          qk_norm: bool = False, num_register_tokens: int = 0, decoder_depth: int = 1,
                          patch_size: int = 16, image_size: int = 224, encoder_only: bool = False,
                          vocab: int = 256, seed: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A randomly initialised 4M state dict and its header metadata."""
    from .backbones.fourm import sincos_2d

    g = torch.Generator().manual_seed(seed)
    grid = image_size // patch_size
    hidden = int(dim * mlp_ratio)
    hidden = int(2 * hidden / 3) if gated_mlp else hidden
    head_dim = dim // num_heads
    sd: dict[str, torch.Tensor] = {}

    def rnd(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    def norm(prefix: str, n: int) -> None:
        # trained-looking norms: weight near 1, bias near 0 (exactly 0 when bias-free)
        sd[prefix + ".weight"] = 1.0 + rnd(n, std=0.1)
        sd[prefix + ".bias"] = rnd(n, std=0.1) if norm_bias else torch.zeros(n)

    def lin(prefix: str, out_f: int, in_f: int, bias: bool) -> None:
        sd[prefix + ".weight"] = _linear(g, out_f, in_f)
        if bias:
            sd[prefix + ".bias"] = rnd(out_f, std=0.05)

    def norm2_mlp(prefix: str) -> None:
        norm(prefix + ".norm2", dim)
        lin(prefix + ".mlp.fc1", hidden, dim, mlp_bias)
        lin(prefix + ".mlp.fc2", dim, hidden, mlp_bias)
        if gated_mlp:
            lin(prefix + ".mlp.fc3", hidden, dim, mlp_bias)

    def block(prefix: str) -> None:
        norm(prefix + ".norm1", dim)
        lin(prefix + ".attn.qkv", 3 * dim, dim, qkv_bias)
        if qk_norm:
            norm(prefix + ".attn.q_norm", head_dim)
            norm(prefix + ".attn.k_norm", head_dim)
        lin(prefix + ".attn.proj", dim, dim, proj_bias)
        norm2_mlp(prefix)

    rgb = f"encoder_embeddings.rgb@{image_size}"
    sd[rgb + ".proj.weight"] = _linear(g, dim, 3 * patch_size * patch_size)
    sd[rgb + ".mod_emb"] = rnd(1, 1, dim)
    sd[rgb + ".pos_emb"] = sincos_2d(grid, grid, dim)
    for i in range(depth):
        block(f"encoder.{i}")
    norm("encoder_norm", dim)
    if num_register_tokens:
        sd["register_tokens"] = rnd(1, num_register_tokens, dim)
    domains_in = [f"rgb@{image_size}"]
    domains_out: list[str] = []
    if not encoder_only:
        seg = f"tok_semseg@{image_size}"
        domains_in.append(seg)
        domains_out.append(seg)
        sd[f"encoder_embeddings.{seg}.token_emb.weight"] = rnd(vocab, dim)
        sd[f"encoder_embeddings.{seg}.mod_emb"] = rnd(1, 1, dim)
        sd[f"encoder_embeddings.{seg}.pos_emb"] = sincos_2d(grid, grid, dim)
        sd[f"decoder_embeddings.{seg}.token_emb.weight"] = rnd(vocab, dim)
        sd[f"decoder_embeddings.{seg}.to_logits.weight"] = rnd(vocab, dim)
        sd[f"decoder_embeddings.{seg}.mod_emb"] = rnd(1, 1, dim)
        sd[f"decoder_embeddings.{seg}.pos_emb"] = sincos_2d(grid, grid, dim)
        lin("decoder_proj_context", dim, dim, True)
        for i in range(decoder_depth):
            p = f"decoder.{i}"
            norm(p + ".norm1", dim)
            lin(p + ".self_attn.qkv", 3 * dim, dim, qkv_bias)
            lin(p + ".self_attn.proj", dim, dim, proj_bias)
            norm(p + ".query_norm", dim)
            norm(p + ".context_norm", dim)
            lin(p + ".cross_attn.q", dim, dim, qkv_bias)
            lin(p + ".cross_attn.kv", 2 * dim, dim, qkv_bias)
            lin(p + ".cross_attn.proj", dim, dim, proj_bias)
            norm2_mlp(p)
        norm("decoder_norm", dim)
        sd["mask_token"] = rnd(1, 1, dim)
    config: dict[str, Any] = dict(
        domains_in=domains_in, domains_out=domains_out, encoder_depth=depth,
        decoder_depth=0 if encoder_only else decoder_depth, dim=dim, num_heads=num_heads,
        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias, mlp_bias=mlp_bias,
        norm_bias=norm_bias, act_layer=act_layer, gated_mlp=gated_mlp, qk_norm=qk_norm,
        image_size=image_size, patch_size=patch_size)
    if num_register_tokens:
        config["num_register_tokens"] = num_register_tokens
    meta = {k: str(v) for k, v in config.items()}
    return {k: v.contiguous().float() for k, v in sd.items()}, meta


def write_fourm_checkpoint(path: str | Path, **kwargs: Any) -> Path:
    """Write a tiny 4M checkpoint (safetensors with config metadata); returns the path."""
    from safetensors.torch import save_file

    sd, meta = make_fourm_state_dict(**kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import os
    tmp = path.with_name(f"{path.name}.{os.getpid()}.partial")
    save_file(sd, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def default_tiny_checkpoint() -> Path:
    """The tiny 4M a run or ``inspect`` uses when given no checkpoint: pre-trained by this project
    (``scripts/pretrain_tiny_4m.py``) and shipped in the package; see ``fourm_eval.pretrain``."""
    from .errors import CheckpointError
    from .pretrain import shipped_checkpoint

    path = shipped_checkpoint()
    if not path.is_file():
        raise CheckpointError(f"{path}: the shipped tiny pre-trained 4M is missing from this installation "
                              "(re-install fourm-eval, or re-create it with scripts/pretrain_tiny_4m.py)")
    return path

