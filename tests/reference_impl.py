"""A deliberately literal re-implementation of the 4M RGB encoder forward pass.

Independent of fourm_eval's code: it reads the raw 4M state dict (file naming),
flattens patches with an explicit Linear in (row-in-patch, column-in-patch,
channel) order, builds the sin-cos table element by element from the formula
in docs/fourm-checkpoints.md, and computes attention with an explicit softmax.
It is itself checked against the official fixture output (test_reference.py),
so it can serve as ground truth for the variants the fixture does not cover
(GELU with biases, QK-norm, register tokens, other input sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_literal(rows: int, cols: int, dim: int) -> torch.Tensor:
    q = dim // 4
    out = torch.empty(rows * cols, dim, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            n = r * cols + c
            for k in range(q):
                w = 1.0 / (10000.0 ** (k / q))
                out[n, k] = math.sin(r * w)
                out[n, q + k] = math.cos(r * w)
                out[n, 2 * q + k] = math.sin(c * w)
                out[n, 3 * q + k] = math.cos(c * w)
    return out.float()[None]


def _ln(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + 1e-6) * sd[prefix + ".weight"]
    b = sd.get(prefix + ".bias")
    return y + b if b is not None else y


def _lin(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    y = x @ sd[prefix + ".weight"].T
    b = sd.get(prefix + ".bias")
    return y + b if b is not None else y


def reference_forward(sd: dict, cfg: dict, x: torch.Tensor, return_blocks: bool = False):
    """cfg: dim, num_heads, depth, gated_mlp, act ('SiLU'/'GELU'), qk_norm, patch (16)."""
    p = cfg.get("patch", 16)
    dim, heads = cfg["dim"], cfg["num_heads"]
    B, C, H, W = x.shape
    rows, cols = H // p, W // p
    # patches flattened as (row-in-patch, column-in-patch, channel)
    patches = x.reshape(B, C, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(B, rows * cols, p * p * C)
    t = patches @ sd["encoder_embeddings.rgb@224.proj.weight"].T
    t = t + sincos_literal(rows, cols, dim) + sd["encoder_embeddings.rgb@224.mod_emb"]
    n_reg = 0
    if "register_tokens" in sd:
        reg = sd["register_tokens"]
        n_reg = reg.shape[1]
        t = torch.cat([reg.expand(B, -1, -1), t], dim=1)
    act = {"SiLU": F.silu, "GELU": F.gelu}[cfg["act"]]
    hd = dim // heads
    blocks = []
    for i in range(cfg["depth"]):
        pre = f"encoder.{i}"
        h = _ln(t, sd, pre + ".norm1")
        qkv = _lin(h, sd, pre + ".attn.qkv").reshape(B, -1, 3, heads, hd)
        q, k, v = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if cfg.get("qk_norm"):
            q = _ln(q, sd, pre + ".attn.q_norm")
            k = _ln(k, sd, pre + ".attn.k_norm")
        a = torch.softmax((q @ k.transpose(-1, -2)) * hd ** -0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(B, -1, dim)
        t = t + _lin(o, sd, pre + ".attn.proj")
        h = _ln(t, sd, pre + ".norm2")
        if cfg["gated_mlp"]:
            m = act(_lin(h, sd, pre + ".mlp.fc1")) * _lin(h, sd, pre + ".mlp.fc3")
        else:
            m = act(_lin(h, sd, pre + ".mlp.fc1"))
        t = t + _lin(m, sd, pre + ".mlp.fc2")
        blocks.append(t[:, n_reg:])
    out = _ln(t, sd, "encoder_norm")[:, n_reg:]
    return (out, blocks) if return_blocks else out
