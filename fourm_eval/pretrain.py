"""Pre-training of the tiny 4M that smoke runs start from (``scripts/pretrain_tiny_4m.py``).

Objective: 4M's multimodal masked modelling, at toy scale. The encoder sees a
random subset (25-100%) of the RGB patch tokens of a synthetic scene
(``fourm_eval.data.scenes``); a 4M-style decoder (queries = mask token +
modality embedding + sin-cos position; self-attention within a modality,
cross-attention to the encoder's output) predicts, at every patch position, the
tokens of two other modalities: the scene's semantic token (the patch's
majority label among wall, floor and six shape kinds) and its depth token
(log-depth in 16 bins). 4M takes these tokens from learned tokenizers of
pseudo labels; here the scenes' exact labels are quantised directly, which is
the one simplification.

The result is written in the released 4M file format (safetensors, the full
encoder-decoder state dict in 4M's key names, config in ``__metadata__`` as
``str()`` values), so ``build_backbone("4m", checkpoint=...)`` and ``inspect``
read it exactly as they read a released model.

Determinism: scenes, masks and initialisation come from fixed seeds, training
runs on CPU with a fixed thread count, so re-running gives bit-identical
weights on the same CPU type and torch build (floating-point reductions may
round differently on another CPU, after which the weights drift apart).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones.fourm import LN_EPS, FourMBackbone, FourMConfig, Mlp, sincos_2d
from .data.scenes import DEPTH_RANGE, KINDS, LABELS, make_scene, patch_tokens

RGB_DOMAIN = "rgb@224"           # the released files' RGB domain name (the sin-cos grid is rebuilt per size)
OUT_DOMAINS = {"tok_semseg@224": len(LABELS), "tok_depth@224": 16}
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255


@dataclass(frozen=True)
class Recipe:
    seed: int = 0
    dim: int = 128
    depth: int = 4
    num_heads: int = 4
    decoder_depth: int = 2
    image_size: int = 128
    n_scenes: int = 8192     # chosen here: 4x the first file's 2,048, so 3,000 steps see each scene ~23 times
    steps: int = 3000        # chosen here: 10x the first file's 300 (measured: 0.857 held-out semantic accuracy)
    batch_size: int = 64
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup: int = 200        # chosen here
    min_visible: float = 0.25
    threads: int = 2


class DecoderBlock(nn.Module):
    """4M's decoder block: self-attention, cross-attention to the context, MLP (pre-norm)."""

    def __init__(self, cfg: FourMConfig):
        super().__init__()
        d = cfg.dim
        self.num_heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.self_attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d, bias=False), "proj": nn.Linear(d, d, bias=False)})
        self.query_norm = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.context_norm = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.cross_attn = nn.ModuleDict({"q": nn.Linear(d, d, bias=False), "kv": nn.Linear(d, 2 * d, bias=False),
                                         "proj": nn.Linear(d, d, bias=False)})
        self.norm2 = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.mlp = Mlp(cfg)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        B, N, C = t.shape
        return t.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        B, h, N, c = t.shape
        return t.transpose(1, 2).reshape(B, N, h * c)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.self_attn["qkv"](self.norm1(x)).chunk(3, dim=-1)
        x = x + self.self_attn["proj"](self._merge(F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v))))
        c = self.context_norm(context)
        k, v = self.cross_attn["kv"](c).chunk(2, dim=-1)
        q = self.cross_attn["q"](self.query_norm(x))
        x = x + self.cross_attn["proj"](self._merge(F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v))))
        return x + self.mlp(self.norm2(x))


class TinyFourM(nn.Module):
    """Encoder (the suite's own 4M encoder) + a 4M-style decoder for token targets."""

    def __init__(self, r: Recipe):
        super().__init__()
        self.cfg = FourMConfig(dim=r.dim, depth=r.depth, num_heads=r.num_heads, domains_in=[RGB_DOMAIN])
        self.encoder = FourMBackbone(self.cfg)
        d = r.dim
        self.decoder_proj_context = nn.Linear(d, d)
        self.decoder = nn.ModuleList([DecoderBlock(self.cfg) for _ in range(r.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(d, eps=LN_EPS, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dec_mod_emb = nn.ParameterDict({_key(m): nn.Parameter(torch.zeros(1, 1, d)) for m in OUT_DOMAINS})
        self.dec_token_emb = nn.ModuleDict({_key(m): nn.Embedding(v, d) for m, v in OUT_DOMAINS.items()})
        self.to_logits = nn.ModuleDict({_key(m): nn.Linear(d, v, bias=False) for m, v in OUT_DOMAINS.items()})
        for name, m in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        for p in [self.mask_token, *self.dec_mod_emb.values()]:
            nn.init.trunc_normal_(p, std=0.02)

    def forward(self, images: torch.Tensor, visible: torch.Tensor, own_query_pos: bool = False
                ) -> dict[str, torch.Tensor]:
        """``images`` (B, 3, H, W) normalised; ``visible`` (B, n) indices of the RGB tokens the encoder
        sees. Returns logits per output domain, (B, N, vocab) over all N patch positions.
        ``own_query_pos``: the decoder's queries take the sin-cos table from :func:`sincos_2d` itself
        instead of the encoder's ``pos_embed`` (the same values for a correct encoder; a readout of an
        encoder under test must not share its position table)."""
        enc = self.encoder
        t, (rows, cols) = enc.embed(images)                    # tokens + pos + mod emb
        emb = enc.pos_embed(rows, cols, t.device, t.dtype) + enc.mod_emb
        idx = visible[..., None].expand(-1, -1, t.shape[-1])
        x = torch.gather(t, 1, idx)
        for blk in enc.encoder:
            x = blk(x, (rows, cols), 0)
        x = enc.encoder_norm(x)
        context = self.decoder_proj_context(x) + torch.gather(emb.expand(t.shape[0], -1, -1), 1, idx)
        pos = (sincos_2d(rows, cols, t.shape[-1]).to(t.device, t.dtype) if own_query_pos
               else enc.pos_embed(rows, cols, t.device, t.dtype))
        B, N = t.shape[0], rows * cols
        keys = list(self.to_logits.keys())
        q = torch.cat([self.mask_token + pos + self.dec_mod_emb[k] for k in keys], dim=0)  # (M, N, D)
        q = q[None].expand(B, -1, -1, -1).reshape(B * len(keys), N, -1)   # one sequence per modality
        ctx = context.repeat_interleave(len(keys), dim=0)
        for blk in self.decoder:
            q = blk(q, ctx)
        q = self.decoder_norm(q).reshape(B, len(keys), N, -1)
        return {k: self.to_logits[k](q[:, i]) for i, k in enumerate(keys)}


def _key(domain: str) -> str:
    return domain.replace("@", "_at_")


def _cosine(step: int, r: Recipe) -> float:
    if step < r.warmup:
        return (step + 1) / r.warmup
    t = (step - r.warmup) / max(1, r.steps - r.warmup)
    return 0.5 * (1 + math.cos(math.pi * t))


def build_scenes(r: Recipe, progress: Callable[[int, int], None] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    imgs, sems, deps = [], [], []
    for i in range(r.n_scenes):
        rgb, lab, dep = make_scene(r.seed, i, r.image_size)
        s, d = patch_tokens(lab, dep, 16, OUT_DOMAINS["tok_depth@224"])
        imgs.append(rgb)
        sems.append(s)
        deps.append(d)
        if progress and (i + 1) % 256 == 0:
            progress(i + 1, r.n_scenes)
    return (torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(np.stack(sems)), torch.from_numpy(np.stack(deps)))


def train(r: Recipe, log: Callable[[str], None] = lambda m: print(m, flush=True),
          stop_after: int | None = None, save_every: int | None = None,
          on_checkpoint: Callable[[TinyFourM, int, int], None] | None = None) -> tuple[TinyFourM, dict[str, Any]]:
    """Train the tiny 4M; returns the model and a summary (losses, accuracies, time).

    ``stop_after=N`` stops after logged step N of the same schedule (the learning rate still follows
    ``r.steps``): a re-run checks the start of the shipped training log in a fraction of the time.
    ``save_every=N``: ``on_checkpoint(model, steps_done, tokens_seen)`` after every N steps (the
    trajectory of transfer along pre-training, ``fourm-eval analyze trajectory``); it does not touch
    the random streams, so the final weights are the same with or without it."""
    torch.set_num_threads(r.threads)
    torch.manual_seed(r.seed)
    started = time.time()
    imgs, sems, deps = build_scenes(r)
    log(f"{r.n_scenes} scenes of {r.image_size} px generated in {time.time() - started:.0f} s")
    model = TinyFourM(r)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "mod_emb" in n or "mask_token" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(r.seed + 1)
    n_tokens = (r.image_size // 16) ** 2
    history = []
    tokens_seen = 0  # RGB tokens the encoder was given, summed over steps
    sem_key, dep_key = _key("tok_semseg@224"), _key("tok_depth@224")
    for step in range(r.steps):
        for group in opt.param_groups:
            group["lr"] = r.lr * _cosine(step, r)
        batch = torch.randint(0, r.n_scenes, (r.batch_size,), generator=g)
        x = imgs[batch].float()
        flip = torch.rand(r.batch_size, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        grid = r.image_size // 16
        s = sems[batch].view(-1, grid, grid)
        d = deps[batch].view(-1, grid, grid)
        s = torch.where(flip[:, None, None], s.flip(-1), s).reshape(r.batch_size, -1)
        d = torch.where(flip[:, None, None], d.flip(-1), d).reshape(r.batch_size, -1)
        n_vis = int(torch.randint(int(r.min_visible * n_tokens), n_tokens + 1, (1,), generator=g))
        visible = torch.rand(r.batch_size, n_tokens, generator=g).argsort(dim=1)[:, :n_vis]
        out = model((x - MEAN) / STD, visible)
        loss_s = F.cross_entropy(out[sem_key].flatten(0, 1), s.flatten())
        loss_d = F.cross_entropy(out[dep_key].flatten(0, 1), d.flatten())
        loss = loss_s + loss_d
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pre-training loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += r.batch_size * n_vis
        if save_every and on_checkpoint is not None and (step + 1) % save_every == 0:
            model.eval()
            on_checkpoint(model, step + 1, tokens_seen)
            model.train()
        if step % 50 == 0 or step == r.steps - 1:
            with torch.no_grad():
                acc_s = (out[sem_key].argmax(-1) == s).float().mean().item()
                acc_d = (out[dep_key].argmax(-1) == d).float().mean().item()
            history.append(dict(step=step, loss_semseg=round(loss_s.item(), 4), loss_depth=round(loss_d.item(), 4),
                                acc_semseg=round(acc_s, 4), acc_depth=round(acc_d, 4), visible=n_vis))
            log(f"step {step:5d}/{r.steps}  loss semseg {loss_s.item():.3f} depth {loss_d.item():.3f}  "
                f"acc semseg {acc_s:.3f} depth {acc_d:.3f}  ({n_vis}/{n_tokens} visible, "
                f"{time.time() - started:.0f} s)")
            if stop_after is not None and step >= stop_after:
                log(f"stopped after step {step} of {r.steps} (--stop-after {stop_after})")
                return model, dict(history=history, seconds=round(time.time() - started, 1), stopped_after=step)
    summary = dict(history=history, seconds=round(time.time() - started, 1),
                   heldout=heldout_accuracy(model, r))
    log(f"held-out scenes: {summary['heldout']}")
    model.train()
    return model, summary


# ----------------------------------------------------------------- export
def fourm_state_dict(model: TinyFourM) -> dict[str, torch.Tensor]:
    """The model in the released 4M files' key names (zero ``.bias`` buffers for bias-free norms,
    fixed sin-cos ``pos_emb`` buffers for the 14 x 14 grid of the @224 domains)."""
    cfg = model.cfg
    enc = model.encoder
    d = cfg.dim
    sd: dict[str, torch.Tensor] = {}
    p = cfg.patch_size
    conv = enc.patch_embed.weight.detach()
    sd[f"encoder_embeddings.{RGB_DOMAIN}.proj.weight"] = conv.permute(0, 2, 3, 1).reshape(d, p * p * 3)
    sd[f"encoder_embeddings.{RGB_DOMAIN}.mod_emb"] = enc.mod_emb.detach()
    grid = cfg.image_size // p
    sd[f"encoder_embeddings.{RGB_DOMAIN}.pos_emb"] = sincos_2d(grid, grid, d)
    for k, v in enc.state_dict().items():
        if k.startswith(("encoder.", "encoder_norm.")):
            sd[k] = v.detach()

    def norm(prefix: str, m: nn.LayerNorm) -> None:
        sd[prefix + ".weight"] = m.weight.detach()
        sd[prefix + ".bias"] = torch.zeros_like(m.weight)  # bias-free norm: zero buffer, as in the files

    for name, m in enc.named_modules():
        if isinstance(m, nn.LayerNorm) and name.startswith(("encoder.", "encoder_norm")):
            sd[name + ".bias"] = torch.zeros_like(m.weight)
    sd["decoder_proj_context.weight"] = model.decoder_proj_context.weight.detach()
    sd["decoder_proj_context.bias"] = model.decoder_proj_context.bias.detach()
    for i, blk in enumerate(model.decoder):
        pre = f"decoder.{i}"
        norm(pre + ".norm1", blk.norm1)
        sd[pre + ".self_attn.qkv.weight"] = blk.self_attn["qkv"].weight.detach()
        sd[pre + ".self_attn.proj.weight"] = blk.self_attn["proj"].weight.detach()
        norm(pre + ".query_norm", blk.query_norm)
        norm(pre + ".context_norm", blk.context_norm)
        for n in ("q", "kv", "proj"):
            sd[f"{pre}.cross_attn.{n}.weight"] = blk.cross_attn[n].weight.detach()
        norm(pre + ".norm2", blk.norm2)
        for n in ("fc1", "fc2", "fc3"):
            sd[f"{pre}.mlp.{n}.weight"] = getattr(blk.mlp, n).weight.detach()
    norm("decoder_norm", model.decoder_norm)
    sd["mask_token"] = model.mask_token.detach()
    for dom in OUT_DOMAINS:
        k = _key(dom)
        sd[f"decoder_embeddings.{dom}.token_emb.weight"] = model.dec_token_emb[k].weight.detach()
        sd[f"decoder_embeddings.{dom}.to_logits.weight"] = model.to_logits[k].weight.detach()
        sd[f"decoder_embeddings.{dom}.mod_emb"] = model.dec_mod_emb[k].detach()
        sd[f"decoder_embeddings.{dom}.pos_emb"] = sincos_2d(grid, grid, d)
    return {k: v.float().contiguous().clone() for k, v in sorted(sd.items())}


def load_model(path: str | Path, r: Recipe | None = None) -> TinyFourM:
    """The encoder-decoder back from a file written by :func:`write_checkpoint` (the inverse of
    :func:`fourm_state_dict`), e.g. to score the pre-training objective of a shipped file."""
    from safetensors.torch import load_file

    sd = load_file(str(path))
    model = TinyFourM(r or Recipe())
    model.encoder.load_fourm_state_dict(sd, source=str(path))
    own = model.state_dict()
    for k in list(own):  # the decoder's modules carry the file's key names
        if k.startswith(("decoder.", "decoder_norm.", "decoder_proj_context.")) and k in sd:
            own[k] = sd[k]
    own["mask_token"] = sd["mask_token"]
    for dom in OUT_DOMAINS:
        k = _key(dom)
        own[f"dec_token_emb.{k}.weight"] = sd[f"decoder_embeddings.{dom}.token_emb.weight"]
        own[f"to_logits.{k}.weight"] = sd[f"decoder_embeddings.{dom}.to_logits.weight"]
        own[f"dec_mod_emb.{k}"] = sd[f"decoder_embeddings.{dom}.mod_emb"]
    model.load_state_dict(own, strict=True)
    return model.eval()


SEMSEG_DOMAIN = "tok_semseg@224"


def decoder_readout(path: str | Path, encoder: FourMBackbone) -> tuple[TinyFourM | None, str]:
    """The decoder of the tiny-4M file ``path`` put on top of ``encoder`` (an encoder under test, loaded
    by the suite's own loader), to read out the semantic tokens the pre-training taught it, with no
    training. Returns (model, note); model is None, and the note says why, when the file has no
    decoder of this form (a released 4M's decoder reads tokenizer tokens, not these)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        return None, f"{path.name}: not a safetensors file, no decoder read out"
    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        logits_key = f"decoder_embeddings.{SEMSEG_DOMAIN}.to_logits.weight"
        if logits_key not in keys or "decoder_depth" not in meta:
            return None, f"{path.name}: no {SEMSEG_DOMAIN} decoder (only the tiny 4M's files have one)"
        heads = {k.split(".")[1]: f.get_slice(k).get_shape()[0] for k in keys
                 if k.startswith("decoder_embeddings.") and k.endswith(".to_logits.weight")}
    if heads != OUT_DOMAINS:
        return None, (f"{path.name}: its decoder predicts {heads}, not the tiny 4M's {OUT_DOMAINS} "
                      "(domain: vocabulary size)")
    cfg = encoder.cfg
    r = Recipe(dim=cfg.dim, depth=cfg.depth, num_heads=cfg.num_heads, decoder_depth=int(meta["decoder_depth"]))
    model = load_model(path, r)
    model.encoder = encoder
    return model.eval(), f"{path.name}: its own {SEMSEG_DOMAIN} decoder, over the encoder as loaded"


@torch.no_grad()
def semantic_readout(model: TinyFourM, images: torch.Tensor) -> torch.Tensor:
    """(B, N) semantic token the decoder predicts at every patch of ``images`` (normalised), every RGB
    token visible, the queries' positions from the decoder's own table (see ``TinyFourM.forward``)."""
    rows, cols = model.encoder.grid_size(images)
    visible = torch.arange(rows * cols, device=images.device).expand(images.shape[0], -1)
    return model(images, visible, own_query_pos=True)[_key(SEMSEG_DOMAIN)].argmax(-1)


@torch.no_grad()
def heldout_accuracy(model: TinyFourM, r: Recipe, n: int = 256, visible: float = 1.0) -> dict[str, float]:
    """Token accuracy of the pre-training objective on ``n`` scenes the training never saw
    (scene set ``seed + 1000``), with a fixed fraction of the RGB tokens visible."""
    held = Recipe(**{**asdict(r), "seed": r.seed + 1000, "n_scenes": n})
    imgs, sems, deps = build_scenes(held)
    n_tok = sems.shape[1]
    g = torch.Generator().manual_seed(0)
    vis = torch.rand(n, n_tok, generator=g).argsort(dim=1)[:, :max(1, int(visible * n_tok))]
    model.eval()
    out = model((imgs.float() - MEAN) / STD, vis)
    return {"acc_semseg": round((out[_key("tok_semseg@224")].argmax(-1) == sems).float().mean().item(), 4),
            "acc_depth": round((out[_key("tok_depth@224")].argmax(-1) == deps).float().mean().item(), 4),
            "n_scenes": n, "visible": visible}


def metadata(r: Recipe) -> dict[str, str]:
    """Header metadata as the released files write it: Python ``str()`` of each config value."""
    cfg: dict[str, Any] = dict(
        domains_in=[RGB_DOMAIN], domains_out=list(OUT_DOMAINS), encoder_depth=r.depth, decoder_depth=r.decoder_depth,
        dim=r.dim, num_heads=r.num_heads, mlp_ratio=4.0, qkv_bias=False, proj_bias=False, mlp_bias=False,
        norm_bias=False, act_layer="SiLU", gated_mlp=True, qk_norm=False, image_size=224, patch_size=16)
    return {k: str(v) for k, v in cfg.items()}


def write_checkpoint(model: TinyFourM, r: Recipe, summary: dict[str, Any], out: Path,
                     progress: dict[str, int] | None = None) -> Path:
    """Write ``out`` (safetensors) and ``out.with_suffix('.json')`` (the recipe and training log).
    ``progress`` ({"step": N, "tokens_seen": T}) goes into the header metadata of a checkpoint saved
    along the training (the shipped file has none)."""
    from safetensors.torch import save_file

    from .checkpoints import sha256_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    meta = metadata(r)
    if progress:
        meta.update({k: str(int(v)) for k, v in progress.items()})
    save_file(fourm_state_dict(model), str(tmp), metadata=meta)
    tmp.replace(out)
    what = "tiny 4M pre-trained by fourm-eval for smoke runs (not a released 4M model)"
    if summary.get("stopped_after") is not None:
        what = f"PARTIAL (stopped after step {summary['stopped_after']} of {r.steps}): " + what
    card = dict(
        what=what,
        objective=("4M-style multimodal masked modelling: a random 25-100% of the RGB patch tokens in, "
                   "semantic and depth tokens of every patch out"),
        data=f"{r.n_scenes} synthetic scenes (fourm_eval.data.scenes, seed {r.seed}), labels {list(LABELS)}, "
             f"depth tokens: 16 log bins over {list(DEPTH_RANGE)} m; shape kinds {list(KINDS)}",
        script="scripts/pretrain_tiny_4m.py", recipe=asdict(r), file=out.name, sha256=sha256_file(out),
        built_with=dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                        cpu=_cpu_name(), threads=r.threads),
        training=summary)
    side = out.with_suffix(".json")
    side.write_text(json.dumps(card, indent=1) + "\n")
    return out


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def shipped_checkpoint() -> Path:
    """The tiny pre-trained 4M shipped with the package (the smoke runs' default backbone)."""
    return Path(__file__).resolve().parent / "assets" / "fourm-tiny-pretrained.safetensors"


def main(out: str | os.PathLike[str] | None = None, stop_after: int | None = None, save_every: int | None = None,
         save_dir: str | os.PathLike[str] | None = None, **overrides: Any) -> Path:
    r = Recipe(**overrides)
    if stop_after is not None and out is None:
        raise SystemExit("--stop-after writes a partial model: give --out (the shipped file is never replaced by one)")
    if save_every and not save_dir:
        raise SystemExit("--save-every needs --save-dir (the folder of checkpoint-<step>.safetensors)")

    def save(model: TinyFourM, step: int, tokens: int) -> None:
        path = write_checkpoint(model, r, {"step": step, "tokens_seen": tokens},
                                Path(save_dir) / f"checkpoint-{step}.safetensors",
                                progress={"step": step, "tokens_seen": tokens})
        print(f"saved {path} (step {step}, {tokens} tokens seen)", flush=True)

    model, summary = train(r, stop_after=stop_after, save_every=save_every, on_checkpoint=save)
    path = write_checkpoint(model, r, summary, Path(out) if out else shipped_checkpoint())
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {summary['seconds']:.0f} s")
    return path
