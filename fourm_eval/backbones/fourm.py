"""The 4M RGB encoder as a plain ViT backbone.

Written from the facts in docs/fourm-checkpoints.md (the official
implementation's behaviour):

* patch embedding: a bias-free Linear over 16x16 patches flattened
  (row-in-patch, column-in-patch, channel). We hold it as an equivalent
  Conv2d (weight reshaped to (D, p, p, 3) and permuted to (D, 3, p, p)),
  which is one fused op instead of an unfold + matmul;
* tokens = proj(patches) + sincos_pos_emb(grid) + mod_emb; the sin-cos
  grid is rebuilt for the actual input grid (never interpolated);
* optional register tokens are prepended with zero positional embedding and
  removed from every output;
* pre-norm blocks, LayerNorm eps 1e-6 (bias-free when ``norm_bias`` is false),
  attention scale head_dim**-0.5 through ``scaled_dot_product_attention``,
  optional per-head QK LayerNorm, SwiGLU (fc1/fc3 -> act -> fc2) or plain MLP;
* output = encoder_norm(x); there is no class token.

Parameter names follow the 4M state dict (``encoder.{i}.*``, ``encoder_norm``)
so a file maps onto the module one to one; only the patch embedding, the
modality embedding and the register tokens are renamed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..errors import CheckpointError, ConfigError

LN_EPS = 1e-6


@dataclass
class FourMConfig:
    """Architecture of a 4M encoder (the subset the RGB backbone needs)."""

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    proj_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    act_layer: str = "SiLU"
    gated_mlp: bool = True
    qk_norm: bool = False
    allow_zero_attn: bool = False
    patch_size: int = 16
    image_size: int = 224
    num_register_tokens: int = 0
    patch_embed_bias: bool = False
    # provenance only
    domains_in: list[str] = field(default_factory=lambda: ["rgb@224"])
    rgb_domain: str = "rgb@224"

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.dim * self.mlp_ratio)
        return int(2 * hidden / 3) if self.gated_mlp else hidden

    def validate(self) -> "FourMConfig":
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.dim % 4:
            raise ConfigError(f"dim {self.dim} must be divisible by 4 for the 2D sin-cos embedding")
        if self.act_layer not in _ACTIVATIONS:
            raise ConfigError(f"act_layer {self.act_layer!r} is not supported (known: {sorted(_ACTIVATIONS)})")
        return self

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> "FourMConfig":
        """Build from parsed safetensors ``__metadata__`` (see checkpoints.parse_metadata)."""
        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in meta.items():
            if key == "encoder_depth":
                kw["depth"] = int(value)
            elif key in names and key not in ("rgb_domain",):
                kw[key] = value
        required = {"dim", "num_heads"}
        missing = [k for k in sorted(required) if k not in kw] + ([] if "depth" in kw else ["encoder_depth"])
        if missing:
            raise ConfigError(f"4M metadata lacks {missing}")
        for b in ("qkv_bias", "proj_bias", "mlp_bias", "norm_bias", "gated_mlp", "qk_norm", "allow_zero_attn"):
            if b in kw:
                kw[b] = _as_bool(kw[b], b)
        for i in ("dim", "depth", "num_heads", "patch_size", "image_size", "num_register_tokens"):
            if i in kw and kw[i] is not None:
                kw[i] = int(kw[i])
        if kw.get("num_register_tokens") is None:
            kw.pop("num_register_tokens", None)
        if "mlp_ratio" in kw:
            kw["mlp_ratio"] = float(kw["mlp_ratio"])
        if isinstance(kw.get("act_layer"), str):
            kw["act_layer"] = kw["act_layer"].split(".")[-1]
        if "domains_in" in kw and not isinstance(kw["domains_in"], list):
            kw["domains_in"] = [str(kw["domains_in"])]
        return cls(**kw).validate()


def _as_bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(f"metadata {name}={v!r} is not a boolean")


_ACTIVATIONS = {"SiLU": nn.SiLU, "GELU": nn.GELU, "ReLU": nn.ReLU}

# Named sizes. The released 4M encoders are all SwiGLU without biases.
NAMED_SIZES: dict[str, dict[str, Any]] = {
    "4m-tiny": dict(dim=128, depth=4, num_heads=4),
    "4m-b": dict(dim=768, depth=12, num_heads=12),
    "4m-l": dict(dim=1024, depth=24, num_heads=16),
    "4m-xl": dict(dim=2048, depth=24, num_heads=32),
}


@lru_cache(maxsize=32)
def _sincos_2d_cpu(rows: int, cols: int, dim: int, temperature: float) -> torch.Tensor:
    k = torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)
    omega = 1.0 / (temperature ** k)
    r, c = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                          torch.arange(cols, dtype=torch.float32), indexing="ij")
    a = r.reshape(-1, 1) * omega  # (rows*cols, D/4), row-major token order
    b = c.reshape(-1, 1) * omega
    return torch.cat([a.sin(), a.cos(), b.sin(), b.cos()], dim=1).unsqueeze(0)


def sincos_2d(rows: int, cols: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """4M's fixed 2D sin-cos embedding, shape (1, rows*cols, dim), row-major tokens.

    Token (r, c) gets [sin(r*w), cos(r*w), sin(c*w), cos(c*w)] with
    w_k = 1 / temperature**(k / (dim/4)). This equals the official function
    for square grids; for non-square grids we keep a = row, b = column
    (the official meshgrid over (w, h) would mix the two axes).
    """
    return _sincos_2d_cpu(rows, cols, dim, float(temperature)).clone()


def patch_grid(x: torch.Tensor, patch: int) -> tuple[int, int]:
    """(rows, cols) of patches for an NCHW input; sides must be multiples of the patch size."""
    H, W = x.shape[-2:]
    if H % patch or W % patch:
        raise ValueError(f"input size {H}x{W} is not divisible by the patch size {patch}")
    return H // patch, W // patch


def block_indices(indices: Iterable[int], num_layers: int) -> list[int]:
    """0-based block indices (negative counts from the end), checked against the depth."""
    idx = [int(i) + num_layers if int(i) < 0 else int(i) for i in indices]
    bad = [i for i in idx if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"block indices {bad} out of range for {num_layers} blocks")
    return idx


class Attention(nn.Module):
    def __init__(self, cfg: FourMConfig, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=cfg.proj_bias)
        if cfg.qk_norm:
            self.q_norm = nn.LayerNorm(cfg.head_dim, eps=LN_EPS, bias=cfg.norm_bias)
            self.k_norm = nn.LayerNorm(cfg.head_dim, eps=LN_EPS, bias=cfg.norm_bias)
        else:
            self.q_norm = self.k_norm = None
        self.allow_zero_attn = cfg.allow_zero_attn
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.allow_zero_attn:
            # softmax1 (an extra "attend to nothing" slot) == one extra key with
            # logit 0 and value 0, which keeps the fused SDPA kernel usable.
            k = F.pad(k, (0, 0, 0, 1))
            v = F.pad(v, (0, 0, 0, 1))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, cfg: FourMConfig):
        super().__init__()
        hidden = cfg.mlp_hidden
        self.fc1 = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias)
        self.act = _ACTIVATIONS[cfg.act_layer]()
        self.fc2 = nn.Linear(hidden, cfg.dim, bias=cfg.mlp_bias)
        self.fc3 = nn.Linear(cfg.dim, hidden, bias=cfg.mlp_bias) if cfg.gated_mlp else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.fc3 is not None:
            h = h * self.fc3(x)
        return self.fc2(h)


class DropPath(nn.Module):
    """Per-sample stochastic depth."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Block(nn.Module):
    def __init__(self, cfg: FourMConfig, drop_path: float = 0.0, window_size: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=LN_EPS, bias=cfg.norm_bias)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=LN_EPS, bias=cfg.norm_bias)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # window attention (ViTDet style, no relative position bias); 0 = global
        self.window_size = window_size

    def _attend(self, x: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
        if not self.window_size:
            return self.attn(x)
        # Windowed attention over the patch grid; prefix (register) tokens attend globally
        # to themselves only, which keeps them out of every window.
        B, N, C = x.shape
        rows, cols = grid
        ws = self.window_size
        prefix, patches = x[:, :n_prefix], x[:, n_prefix:]
        p = patches.reshape(B, rows, cols, C)
        pad_r, pad_c = (-rows) % ws, (-cols) % ws
        if pad_r or pad_c:
            p = F.pad(p, (0, 0, 0, pad_c, 0, pad_r))
        R, Cc = rows + pad_r, cols + pad_c
        w = p.reshape(B, R // ws, ws, Cc // ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)
        w = self.attn(w)
        p = w.reshape(B, R // ws, Cc // ws, ws, ws, C).permute(0, 1, 3, 2, 4, 5).reshape(B, R, Cc, C)
        p = p[:, :rows, :cols].reshape(B, rows * cols, C)
        if n_prefix:
            prefix = self.attn(prefix)
        return torch.cat([prefix, p], dim=1) if n_prefix else p

    def forward(self, x: torch.Tensor, grid: tuple[int, int], n_prefix: int) -> torch.Tensor:
        x = x + self.drop_path(self._attend(self.norm1(x), grid, n_prefix))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class FourMBackbone(nn.Module):
    """4M RGB encoder. ``forward(x)`` -> (B, N, D) patch tokens after the final norm."""

    family = "4m"

    def __init__(self, cfg: FourMConfig, drop_path_rate: float = 0.0, grad_checkpointing: bool = False,
                 window_size: int = 0, global_blocks: Sequence[int] | None = None):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_dim = cfg.dim
        self.num_layers = cfg.depth
        self.patch_size = cfg.patch_size
        self.num_heads = cfg.num_heads
        self.num_prefix_tokens = cfg.num_register_tokens
        self.grad_checkpointing = grad_checkpointing
        p = cfg.patch_size
        self.patch_embed = nn.Conv2d(3, cfg.dim, kernel_size=p, stride=p, bias=cfg.patch_embed_bias)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.register_tokens = (nn.Parameter(torch.zeros(1, cfg.num_register_tokens, cfg.dim))
                                if cfg.num_register_tokens else None)
        dpr = [drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]  # linear, as timm/4M
        global_set = set(range(cfg.depth)) if global_blocks is None else set(global_blocks)
        self.window_size = window_size
        self.encoder = nn.ModuleList([
            Block(cfg, drop_path=dpr[i], window_size=0 if (not window_size or i in global_set) else window_size)
            for i in range(cfg.depth)
        ])
        self.encoder_norm = nn.LayerNorm(cfg.dim, eps=LN_EPS, bias=cfg.norm_bias)
        self.source: str | None = None
        self.file_format: str | None = None      # 'safetensors' | 'torch-zip' | 'pickle' (from the content)
        self.config_source = "named size"        # 'metadata' | 'shapes' | 'named size'
        self.config_guessed: dict[str, str] = {}  # values the file did not determine (shapes only)
        self.load_notes: list[str] = []          # warnings raised while loading, for the record
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self._init_weights()

    # ---------------------------------------------------------------- init
    def _init_weights(self) -> None:
        # Same scheme as 4M training: xavier-uniform linears (qkv split in three),
        # truncated-normal embeddings. Only matters for randomly initialised models.
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                if name.endswith("attn.qkv"):
                    bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
                    nn.init.uniform_(m.weight, -bound, bound)
                else:
                    nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.trunc_normal_(self.mod_emb, std=0.02)
        if self.register_tokens is not None:
            nn.init.trunc_normal_(self.register_tokens, std=0.02)

    # --------------------------------------------------------------- API
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def grid_size(self, x: torch.Tensor) -> tuple[int, int]:
        return patch_grid(x, self.patch_size)

    def pos_embed(self, rows: int, cols: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        # Fixed (not learned): built once per grid/device/dtype and kept out of the state dict.
        key = (rows, cols, str(device), dtype)
        cached = self._pos_cache.get(key)
        if cached is None:
            cached = sincos_2d(rows, cols, self.embed_dim).to(device=device, dtype=dtype)
            if len(self._pos_cache) > 8:
                self._pos_cache.clear()
            self._pos_cache[key] = cached
        return cached

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        rows, cols = self.grid_size(x)
        # contiguous once here: otherwise the transposed strides of the conv output propagate through
        # the residual stream and every LayerNorm (forward and backward) makes its own copy
        t = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()
        t = t + self.pos_embed(rows, cols, t.device, t.dtype) + self.mod_emb.to(t.dtype)
        if self.register_tokens is not None:
            t = torch.cat([self.register_tokens.to(t.dtype).expand(t.shape[0], -1, -1), t], dim=1)
        return t, (rows, cols)

    def _run_block(self, i: int, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        blk = self.encoder[i]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return activation_checkpoint(blk, x, grid, self.num_prefix_tokens, use_reentrant=False)
        return blk(x, grid, self.num_prefix_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, grid = self.embed(x)
        for i in range(self.num_layers):
            t = self._run_block(i, t, grid)
        t = self.encoder_norm(t)
        return t[:, self.num_prefix_tokens:] if self.num_prefix_tokens else t

    def get_intermediate_layers(self, x: torch.Tensor, indices: Iterable[int],
                                norm: bool = False) -> list[torch.Tensor]:
        """Tokens (B, N, D) right after the given 0-based blocks, before the final norm
        (``norm=True`` applies ``encoder_norm`` to each). Register tokens are removed."""
        idx = block_indices(indices, self.num_layers)
        wanted, last = set(idx), max(idx)
        t, grid = self.embed(x)
        found: dict[int, torch.Tensor] = {}
        for i in range(last + 1):
            t = self._run_block(i, t, grid)
            if i in wanted:
                found[i] = self.encoder_norm(t) if norm else t
        return [found[i][:, self.num_prefix_tokens:] for i in idx]

    def layer_id(self, name: str) -> int:
        """Layer index for layer-wise lr decay: 0 embeddings, i+1 block i, L+1 the rest."""
        name = name.removeprefix("backbone.").removeprefix("module.")
        if name.startswith(("patch_embed", "mod_emb", "register_tokens", "pos_emb")):
            return 0
        if name.startswith("encoder."):
            return int(name.split(".")[1]) + 1
        return self.num_layers + 1

    def no_weight_decay_names(self) -> set[str]:
        return {"mod_emb", "register_tokens"}

    def describe(self) -> dict[str, Any]:
        return {"family": self.family, "config": asdict(self.cfg), "source": self.source,
                "file_format": self.file_format, "config_source": self.config_source,
                "config_guessed": self.config_guessed, "params": sum(p.numel() for p in self.parameters())}

    # ---------------------------------------------------------- loading
    def expected_state_keys(self, prefix: str) -> dict[str, tuple[int, ...]]:
        """Keys (in the 4M file's naming) this encoder needs, with their shapes."""
        c = self.cfg
        emb = f"encoder_embeddings.{c.rgb_domain}."
        keys = {emb + "proj.weight": (c.dim, 3 * c.patch_size ** 2), emb + "mod_emb": (1, 1, c.dim)}
        if c.patch_embed_bias:
            keys[emb + "proj.bias"] = (c.dim,)
        if c.num_register_tokens:
            keys["register_tokens"] = (1, c.num_register_tokens, c.dim)
        for name, t in self.state_dict().items():
            if name.startswith(("encoder.", "encoder_norm.")):
                keys[name] = tuple(t.shape)
        return {prefix + k: v for k, v in keys.items()}

    def load_fourm_state_dict(self, sd: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Load encoder weights given in the 4M file's naming; strict, with a clear report."""
        c = self.cfg
        emb = f"encoder_embeddings.{c.rgb_domain}."
        expected = self.expected_state_keys("")
        missing = [k for k in expected if k not in sd]
        mism = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
                for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
        if missing or mism:
            lines = []
            if missing:
                lines.append(f"missing encoder keys ({len(missing)}): " + ", ".join(missing[:12])
                             + (" ..." if len(missing) > 12 else ""))
            if mism:
                lines.append(f"shape mismatches ({len(mism)}): " + "; ".join(mism[:12]))
            raise CheckpointError(f"{source}: does not match the 4M encoder config "
                                  f"(dim {c.dim}, depth {c.depth}):\n  " + "\n  ".join(lines))
        # Bias entries of bias-free norms exist in the files as zero buffers.
        for k, v in sd.items():
            if (k.startswith(("encoder.", "encoder_norm.")) and k.endswith(".bias") and k not in expected
                    and "norm" in k.rsplit(".", 2)[-2] and not c.norm_bias and torch.count_nonzero(v)):
                raise CheckpointError(f"{source}: {k} is non-zero but the config says norm_bias=False")
        w = sd[emb + "proj.weight"]
        p = c.patch_size
        conv_w = w.reshape(c.dim, p, p, 3).permute(0, 3, 1, 2)
        own = {"patch_embed.weight": conv_w, "mod_emb": sd[emb + "mod_emb"]}
        if c.patch_embed_bias:
            own["patch_embed.bias"] = sd[emb + "proj.bias"]
        if c.num_register_tokens:
            own["register_tokens"] = sd["register_tokens"]
        for k in expected:
            if k.startswith(("encoder.", "encoder_norm.")):
                own[k] = sd[k]
        result = self.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in own.items()},
                                      strict=False)
        left = [k for k in result.missing_keys]
        if left or result.unexpected_keys:  # cannot happen unless the module and the key map disagree
            raise CheckpointError(f"{source}: internal key map incomplete: missing {left}, "
                                  f"unexpected {result.unexpected_keys}")
        self.source = source


# -------------------------------------------------------------------- files
def find_rgb_domain(keys: Iterable[str], preferred: str | None = None) -> str:
    doms = sorted({k.split(".")[1] for k in keys
                   if k.startswith("encoder_embeddings.rgb") and k.endswith(".proj.weight")})
    if preferred and preferred in doms:
        return preferred
    if len(doms) == 1:
        return doms[0]
    if not doms:
        raise CheckpointError("no RGB patch embedding (encoder_embeddings.rgb@<size>.proj.weight); "
                              "this is not a 4M checkpoint with an RGB input")
    # Several RGB embeddings (e.g. rgb@224 and rgb@448): which one a transfer should use is the
    # user's call, not ours.
    raise CheckpointError(f"several RGB patch embeddings {doms}; cannot choose one silently. Convert the "
                          "file to keep the one you want (the others' encoder_embeddings.* keys removed).")


def split_keys(keys: Iterable[str], rgb_domain: str, depth: int) -> tuple[list[str], list[str]]:
    """(used, ignored) keys of a 4M state dict for the RGB encoder."""
    used, ignored = [], []
    for k in keys:
        if (k.startswith(f"encoder_embeddings.{rgb_domain}.") and not k.endswith(".pos_emb")) \
                or k.startswith("encoder_norm.") or k == "register_tokens" \
                or (k.startswith("encoder.") and k.split(".")[1].isdigit() and int(k.split(".")[1]) < depth):
            used.append(k)
        else:
            ignored.append(k)
    return used, ignored


def infer_config_from_shapes(shapes: dict[str, tuple[int, ...]], rgb_domain: str,
                             getter: Any = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Config for files without metadata (old ``.pth`` training checkpoints).

    Returns ``(config, guessed)``: ``guessed`` names each value the shapes do not
    determine and how it was chosen. Heads: from the QK-norm size when the model
    has one, else dim/64 (true of every released 4M model). The activation: SiLU
    for gated MLPs, GELU for plain ones (the released families). Norm biases
    exist in every file (as zeros when unused): with ``getter`` their values
    decide, else they count as used."""
    w = shapes[f"encoder_embeddings.{rgb_domain}.proj.weight"]
    dim, patch_area = w[0], w[1] // 3
    depth = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("encoder.") and k.split(".")[1].isdigit())
    gated = "encoder.0.mlp.fc3.weight" in shapes
    hidden = shapes["encoder.0.mlp.fc1.weight"][0]
    mlp_ratio = (hidden * 3 / 2 if gated else hidden) / dim
    mlp_ratio = round(mlp_ratio * 4) / 4 if gated else mlp_ratio
    guessed: dict[str, str] = {}
    qk = "encoder.0.attn.q_norm.weight" in shapes
    if qk:
        heads = dim // shapes["encoder.0.attn.q_norm.weight"][0]
    else:
        heads = max(1, dim // 64)
        guessed["num_heads"] = f"{heads} (dim / 64; the shapes cannot tell the number of heads)"
    act = "SiLU" if gated else "GELU"
    guessed["act_layer"] = f"{act} ({'gated' if gated else 'plain'} MLP; the shapes cannot tell the activation)"
    bias_keys = sorted(k for k in shapes if (k.startswith("encoder.") or k.startswith("encoder_norm."))
                       and k.endswith(".bias") and "norm" in k.rsplit(".", 2)[-2])
    if bias_keys and getter is not None:
        import torch
        nb = any(bool(torch.count_nonzero(v)) for v in getter(bias_keys).values())
    else:
        nb = bool(bias_keys)
        if nb:
            guessed["norm_bias"] = "True (norm bias tensors present; their values were not read)"
    cfg = dict(dim=dim, depth=depth, num_heads=heads, mlp_ratio=mlp_ratio,
               qkv_bias="encoder.0.attn.qkv.bias" in shapes, proj_bias="encoder.0.attn.proj.bias" in shapes,
               mlp_bias="encoder.0.mlp.fc1.bias" in shapes, norm_bias=nb, gated_mlp=gated,
               act_layer=act, qk_norm=qk, patch_size=int(round(math.sqrt(patch_area))))
    return cfg, guessed


# metadata keys that mark a file as carrying a 4M config
_CONFIG_KEYS = {"dim", "encoder_depth", "num_heads", "mlp_ratio", "gated_mlp", "qkv_bias", "act_layer"}


def check_metadata_against_shapes(cfg: FourMConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every architecture fact the tensors determine must agree with the metadata."""
    rgb = cfg.rgb_domain
    problems: list[str] = []
    pe = shapes.get(f"encoder_embeddings.{rgb}.proj.weight")
    if pe is not None and (pe[0] != cfg.dim or pe[1] != 3 * cfg.patch_size ** 2):
        problems.append(f"RGB patch embedding {list(pe)} vs dim {cfg.dim}, patch {cfg.patch_size} "
                        f"(expected [{cfg.dim}, {3 * cfg.patch_size ** 2}])")
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("encoder.") and k.split(".")[1].isdigit()}
    if blocks and max(blocks) + 1 != cfg.depth:
        problems.append(f"encoder_depth {cfg.depth} but the file has encoder blocks 0..{max(blocks)}")
    flags = {"gated_mlp": "encoder.0.mlp.fc3.weight", "qkv_bias": "encoder.0.attn.qkv.bias",
             "proj_bias": "encoder.0.attn.proj.bias", "mlp_bias": "encoder.0.mlp.fc1.bias",
             "qk_norm": "encoder.0.attn.q_norm.weight"}
    if "encoder.0.attn.qkv.weight" in shapes:
        for attr, key in flags.items():
            if bool(getattr(cfg, attr)) != (key in shapes):
                problems.append(f"{attr}={getattr(cfg, attr)} but {key} is {'present' if key in shapes else 'absent'}")
        fc1 = shapes.get("encoder.0.mlp.fc1.weight")
        if fc1 is not None and fc1[0] != cfg.mlp_hidden:
            problems.append(f"mlp_ratio {cfg.mlp_ratio} gives a hidden size of {cfg.mlp_hidden}, "
                            f"encoder.0.mlp.fc1.weight has {fc1[0]}")
        qn = shapes.get("encoder.0.attn.q_norm.weight")
        if qn is not None and qn[0] != cfg.head_dim:
            problems.append(f"num_heads {cfg.num_heads} gives head_dim {cfg.head_dim}, "
                            f"encoder.0.attn.q_norm.weight has {qn[0]}")
    if problems:
        raise CheckpointError(f"{source}: the header metadata contradicts the tensors:\n  " + "\n  ".join(problems))


def config_for_file(shapes: dict[str, tuple[int, ...]], meta: dict[str, Any], source: str,
                    getter: Any = None, num_heads: int | None = None) -> FourMConfig:
    """The encoder config of a 4M file: from its metadata when it has one (checked against
    the tensors), else inferred from shapes with a loud warning naming every guess.

    ``num_heads`` states the head count for files without metadata (and must agree with
    the metadata otherwise). The result carries ``_provenance`` ('metadata' | 'shapes')
    and ``_guessed`` ({field: how it was chosen})."""
    from ..checkpoints import warn_once

    rgb = find_rgb_domain(shapes, None)
    guessed: dict[str, str] = {}
    if meta and _CONFIG_KEYS & set(meta):
        try:
            cfg = FourMConfig.from_metadata(meta)
        except ConfigError as e:
            raise CheckpointError(f"{source}: {e}") from None
        if "act_layer" not in meta:
            guessed["act_layer"] = f"{cfg.act_layer} (absent from the metadata; the default of the released models)"
            warn_once(f"act:{source}", f"{source}: the metadata has no act_layer; assuming {cfg.act_layer}. "
                      "If the model was trained with another activation the features are wrong.")
        if num_heads is not None and int(num_heads) != cfg.num_heads:
            raise CheckpointError(f"{source}: the metadata says num_heads {cfg.num_heads}, "
                                  f"but {num_heads} was requested")
        provenance = "metadata"
    else:
        inferred, guessed = infer_config_from_shapes(shapes, rgb, getter)
        if num_heads is not None:
            if "num_heads" not in guessed and int(num_heads) != inferred["num_heads"]:
                raise CheckpointError(f"{source}: the QK-norm size gives {inferred['num_heads']} heads, "
                                      f"but {num_heads} was requested")
            inferred["num_heads"] = int(num_heads)
            guessed.pop("num_heads", None)
        try:
            cfg = FourMConfig(**inferred).validate()
        except ConfigError as e:
            raise CheckpointError(f"{source}: {e}") from None
        provenance = "shapes"
        if guessed:
            warn_once(f"shapes:{source}", f"{source} has no 4M config metadata; the architecture was inferred "
                      "from tensor shapes, with guesses: " + "; ".join(f"{k} = {v}" for k, v in guessed.items())
                      + ". If a guess is wrong the features are wrong: state the head count with --num-heads "
                      "(num_heads=...), or use the released safetensors file.")
    cfg.rgb_domain = rgb
    if "register_tokens" in shapes:
        n = shapes["register_tokens"][1]
        if cfg.num_register_tokens and cfg.num_register_tokens != n:
            raise CheckpointError(f"{source}: metadata says {cfg.num_register_tokens} register tokens, "
                                  f"the tensor holds {n}")
        cfg.num_register_tokens = n
    elif cfg.num_register_tokens:
        raise CheckpointError(f"{source}: metadata declares {cfg.num_register_tokens} register tokens "
                              "but the file has no 'register_tokens' tensor")
    cfg.patch_embed_bias = f"encoder_embeddings.{rgb}.proj.bias" in shapes
    check_metadata_against_shapes(cfg, shapes, source)
    cfg._provenance = provenance  # type: ignore[attr-defined]
    cfg._guessed = guessed  # type: ignore[attr-defined]
    return cfg


def read_fourm_file(path: Path, allow_pickle: bool = False, notes: list[str] | None = None
                    ) -> tuple[dict[str, tuple[int, ...]], dict[str, Any], Any, str]:
    """Return (shapes, parsed metadata, tensor getter, file kind) without loading all tensors.

    The file's kind comes from its content (``checkpoints.require_known_format``)."""
    from ..checkpoints import (load_pickled_state_dict, parse_metadata, read_safetensors_header,
                               require_known_format)

    fmt = require_known_format(path)
    if fmt == "safetensors":
        header = read_safetensors_header(path)
        shapes = {k: v.shape for k, v in header.tensors.items()}
        meta = parse_metadata(header.metadata)

        def getter(keys: Iterable[str]) -> dict[str, torch.Tensor]:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in keys}
        return shapes, meta, getter, fmt
    sd = load_pickled_state_dict(path, allow_pickle=allow_pickle, notes=notes)
    sd = {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return {k: tuple(v.shape) for k, v in sd.items()}, {}, (lambda keys: {k: sd[k] for k in keys}), fmt


def load_fourm_backbone(checkpoint: str | Path, allow_pickle: bool = False, expect: dict[str, Any] | None = None,
                        num_heads: int | None = None, **kwargs: Any) -> FourMBackbone:
    """Build a FourMBackbone whose architecture comes from the checkpoint file."""
    from ..checkpoints import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    notes: list[str] = []
    shapes, meta, getter, fmt = read_fourm_file(path, allow_pickle=allow_pickle, notes=notes)
    if not any(k.startswith("encoder_embeddings.") or k.startswith("encoder.") for k in shapes):
        raise CheckpointError(f"{path}: no 4M encoder weights (keys 'encoder.N.*', "
                              f"'encoder_embeddings.rgb@224.*'); found e.g. {sorted(shapes)[:5]}. "
                              "Is this a 4M checkpoint?")
    cfg = config_for_file(shapes, meta, str(path), getter=getter, num_heads=num_heads)
    if expect:
        diff = {k: (getattr(cfg, k), v) for k, v in expect.items() if getattr(cfg, k) != v}
        if diff:
            raise CheckpointError(f"{path}: the file's architecture differs from the requested size: "
                                  + ", ".join(f"{k}: file {a} vs expected {b}" for k, (a, b) in diff.items()))
    model = FourMBackbone(cfg, **kwargs)
    used, _ = split_keys(shapes, cfg.rgb_domain, cfg.depth)
    expected = model.expected_state_keys("")
    present = [k for k in expected if k in shapes]
    needed = sorted(set(present) | {k for k in used if k.endswith(".bias") and "norm" in k})
    sd = getter(needed)
    model.load_fourm_state_dict(sd, source=str(path))
    model.source = str(path)
    model.file_format = fmt
    model.config_source = cfg._provenance  # type: ignore[attr-defined]
    model.config_guessed = dict(cfg._guessed)  # type: ignore[attr-defined]
    model.load_notes = notes + guess_notes(cfg, str(path))
    return model


def guess_notes(cfg: FourMConfig, source: str) -> list[str]:
    """The record's warning for the architecture values a file did not determine (none: [])."""
    guessed = getattr(cfg, "_guessed", {})
    if not guessed:
        return []
    return [f"{source}: architecture values the file does not determine (config from "
            f"{getattr(cfg, '_provenance', '?')}), guessed: " + "; ".join(f"{k} = {v}" for k, v in guessed.items())]


def build_fourm(name: str = "4m", checkpoint: str | Path | None = None, allow_pickle: bool = False,
                drop_path_rate: float = 0.0, grad_checkpointing: bool = False, window_size: int = 0,
                global_blocks: Sequence[int] | None = None, num_heads: int | None = None,
                **overrides: Any) -> FourMBackbone:
    kw = dict(drop_path_rate=drop_path_rate, grad_checkpointing=grad_checkpointing,
              window_size=window_size, global_blocks=global_blocks)
    size = NAMED_SIZES.get(name)
    if checkpoint is not None:
        if overrides:
            raise ConfigError(f"architecture overrides {sorted(overrides)} cannot be combined with a "
                              "checkpoint: the architecture comes from the file")
        return load_fourm_backbone(checkpoint, allow_pickle=allow_pickle, expect=size, num_heads=num_heads, **kw)
    if size is None:
        raise ConfigError(f"backbone {name!r} needs a checkpoint (the architecture is read from it); "
                          f"for a random init use a named size: {', '.join(NAMED_SIZES)}")
    if num_heads is not None:
        overrides["num_heads"] = num_heads
    cfg = FourMConfig(**{**size, **overrides}).validate()
    model = FourMBackbone(cfg, **kw)
    model.source = f"random init ({name})"
    return model
