"""Memory and cost planner: will a task's run fit on the GPUs, and what does it cost?

Everything is computed, nothing is run: the backbone is built on the meta device (no checkpoint is
read, no memory allocated) for its parameter count and shapes; activations are counted per
transformer block from the tensors autograd saves for the backward pass (see :func:`block_saved`);
FLOPs are the matmuls and attention of forward, backward and recompute (:func:`iteration_flops`).

Modelled: the backbone only (patch embedding, blocks, final norm) and the input images. Heads,
necks, losses, the data pipeline, the CUDA context and allocator fragmentation are not, so every
memory number is a lower bound; a configuration is said to fit when the estimate is within
``1 - RESERVE`` of the GPU's memory.

``fourm-eval plan`` prints :func:`estimate`; ``fourm-eval run`` calls :func:`check_fit` before it
builds anything and refuses what cannot fit, naming settings that would.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .errors import ConfigError

RESERVE = 0.10          # share of GPU memory left for what is not modelled (heads, CUDA context, fragmentation)
UTILISATION = 0.35      # default share of the peak FLOP/s a fine-tuning run achieves (wall-time estimates)
# Dense peak FLOP/s (no sparsity), from the vendors' data sheets: A100 SXM (bf16 312 TFLOP/s, fp32 19.5),
# H100 SXM (bf16 989, fp32 67), H200 (same compute as H100 SXM), V100 SXM2 (fp16 125 as bf16's stand-in: no bf16,
# fp32 15.7), L40S (bf16 362, fp32 91.6).
PEAKS: dict[str, dict[str, float]] = {
    "a100": {"bf16": 312e12, "fp32": 19.5e12},
    "h100": {"bf16": 989e12, "fp32": 67e12},
    "h200": {"bf16": 989e12, "fp32": 67e12},
    "v100": {"bf16": 125e12, "fp32": 15.7e12},
    "l40s": {"bf16": 362e12, "fp32": 91.6e12},
}
GIB = 2 ** 30
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "fc3")


def parse_memory(text: str | float | int) -> float:
    """Bytes from '80GB', '80GiB', '512MB', '1.5TB' or a bare number of GB. GB and GiB both mean 2**30
    bytes here (a GPU sold as '80GB' has 80 GiB)."""
    if isinstance(text, (int, float)):
        return float(text) * GIB
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?)?\s*", str(text).lower())
    if not m:
        raise ConfigError(f"--gpu-memory {text!r}: expected a size such as 80GB, 40GiB or 512MB")
    unit = (m.group(2) or "gb").rstrip("b").rstrip("i") or "g"
    return float(m.group(1)) * {"k": 2 ** 10, "m": 2 ** 20, "g": GIB, "t": 2 ** 40}[unit]


# ------------------------------------------------------------------------------------------ architecture
@dataclass
class Arch:
    """What the estimate needs of a backbone, read from a meta-device build."""

    name: str
    family: str
    params: int                # every parameter of the backbone
    dim: int
    depth: int
    heads: int
    hidden: int                # MLP hidden width
    gated: bool                # SwiGLU (fc1, fc3 -> act -> fc2) or plain (fc1 -> act -> fc2)
    layer_scale: bool          # timm's LayerScale (DeiT III) after attention and MLP
    prefix: int                # class / register tokens
    patch: int
    linears: list[tuple[str, int, int]] = field(default_factory=list)  # (name, in, out) of one block's linears
    matmul_params: int = 0     # weights of every Linear and Conv2d (bf16 autocast keeps a bf16 copy of each)


def build_arch(name: str, *, info: dict[str, Any] | None = None, image_size: Any = 224,
               options: dict[str, Any] | None = None) -> Arch:
    """Build backbone ``name`` on the meta device (``info``: ``backbone_info`` of a 4M checkpoint,
    whose architecture is then used) and read its shapes."""
    import torch
    import torch.nn as nn

    from .backbones import FourMBackbone, FourMConfig, build_backbone
    from .tasks.schema import size_hw

    opts = {k: v for k, v in (options or {}).items() if k in ("window_size", "global_blocks")}
    with torch.device("meta"):
        if name == "4m":
            if not info or not info.get("config"):
                raise ConfigError("backbone '4m' needs its checkpoint's architecture (backbone_info) to be planned")
            fields = {k: v for k, v in info["config"].items() if k in FourMConfig.__dataclass_fields__}
            bb = FourMBackbone(FourMConfig(**fields), **opts)
        elif name.startswith("4m"):
            bb = build_backbone(name, **opts)
        else:
            h, w = size_hw(image_size)
            bb = build_backbone(name, img_size=h if h == w else (h, w))
    if getattr(bb, "family", "") == "4m":
        c = bb.cfg
        dim, depth, heads, hidden, gated, ls, prefix = (c.dim, c.depth, c.num_heads, c.mlp_hidden, c.gated_mlp,
                                                        False, c.num_register_tokens)
        blk = bb.encoder[0]
    else:
        v = bb.vit
        blk = v.blocks[0]
        dim, depth, heads = v.embed_dim, len(v.blocks), blk.attn.num_heads
        hidden, gated = blk.mlp.fc1.out_features, False
        ls, prefix = not isinstance(blk.ls1, nn.Identity), v.num_prefix_tokens
    linears = [(n.split(".")[-1], m.in_features, m.out_features) for n, m in blk.named_modules()
               if isinstance(m, nn.Linear)]
    mm_params = sum(m.weight.numel() for m in bb.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    return Arch(name=name, family=bb.family, params=sum(p.numel() for p in bb.parameters()), dim=dim, depth=depth,
                heads=heads, hidden=hidden, gated=gated, layer_scale=ls, prefix=prefix, patch=bb.patch_size,
                linears=linears, matmul_params=mm_params)


# ------------------------------------------------------------------------------------------ activations
def block_saved(a: Arch, tokens: int, attn_tokens: int, bf16: bool, lora_rank: int = 0,
                lora_targets: tuple[str, ...] = LORA_TARGETS, device: str = "cuda") -> float:
    """Bytes autograd keeps for the backward pass of one pre-norm block, one image.

    ``tokens``: the image's tokens; ``attn_tokens``: tokens the attention sees (a windowed block pads
    the grid to whole windows, and holds its window-shaped copies). Per token, as the block saves them:
    LayerNorm inputs (the residual stream: fp32, or bf16 under autocast for 4M, whose embedding
    casts its sin-cos table to the tokens' dtype, where timm's fp32 position table promotes it back to fp32)
    and their mean / rstd; each Linear's input (the LayerNorm output; under CUDA's bf16 autocast
    LayerNorm returns fp32 and each consuming Linear saves its own bf16 cast, on CPU it returns bf16
    and fc1 / fc3 share it); the qkv output
    (q, k, v are views of it) and the fused attention's output and log-sum-exp (no N x N matrix:
    scaled_dot_product_attention's fused kernels; its output, laid out token-major, is the proj input
    as a view); the MLP hidden tensors (plain: fc1 out for the activation, its output for fc2; SwiGLU: fc1 out, the
    activation's output, fc3 out, their product); LayerScale's inputs. LoRA adds each adapter's rank-r
    middle tensor."""
    D, F, H = a.dim, a.hidden, a.heads
    lo = 2 if bf16 else 4           # matmul inputs / outputs under autocast
    f32 = 4
    n, na = tokens, attn_tokens
    rb = 2 if (bf16 and a.family == "4m") else 4
    resid = 2 * n * D * rb + 2 * 2 * n * f32                   # norm1 / norm2 inputs + their mean and rstd
    ln1_out = na * D * lo                                       # qkv's input (windowed: the window copy)
    ln2_consumers = 2 if (a.gated and bf16 and device == "cuda") else 1   # CUDA autocast: one cast per Linear
    ln2_out = ln2_consumers * n * D * lo
    attn = na * 3 * D * lo + na * D * lo + na * H * f32   # qkv out, attention out (= proj input, a view), lse
    mlp = (4 if a.gated else 2) * n * F * lo
    ls = 2 * n * D * lo if a.layer_scale else 0
    lora = 0
    if lora_rank:
        for lname, _, _ in a.linears:
            if lname in lora_targets:
                t = na if lname in ("qkv", "proj") else n
                lora += t * lora_rank * lo
    return float(resid + ln1_out + ln2_out + attn + mlp + ls + lora)


@dataclass
class Geometry:
    tokens: int                # per image, prefix tokens included
    rows: int
    cols: int
    window: int                # 0: global attention everywhere
    global_blocks: list[int]
    window_tokens: int         # tokens a windowed block attends over (padded grid)


def geometry(a: Arch, image_size: Any, options: dict[str, Any] | None = None) -> Geometry:
    from .tasks.schema import size_hw

    h, w = size_hw(image_size)
    if h % a.patch or w % a.patch:
        raise ConfigError(f"image_size {h}x{w} is not a multiple of the patch size {a.patch}")
    rows, cols = h // a.patch, w // a.patch
    ws = int((options or {}).get("window_size") or 0)
    gb = list((options or {}).get("global_blocks") or ([] if ws else range(a.depth)))
    wt = (math.ceil(rows / ws) * ws) * (math.ceil(cols / ws) * ws) if ws else rows * cols
    return Geometry(rows * cols + a.prefix, rows, cols, ws, sorted(gb) if ws else list(range(a.depth)), wt + a.prefix)


def activation_bytes(a: Arch, g: Geometry, *, bf16: bool, checkpointing: bool, mode: str = "full",
                     lora_rank: int = 0, device: str = "cuda") -> dict[str, float]:
    """Activation bytes per image: ``saved`` (held from forward to backward) and ``peak`` (saved plus the
    transient recompute of one block under checkpointing). ``mode`` linear (frozen, no backward through
    the backbone): nothing is saved."""
    if mode == "linear":
        return {"saved": 0.0, "peak": 0.0, "per_block_max": 0.0}
    lo = 2 if bf16 else 4
    blocks = []
    for i in range(a.depth):
        windowed = g.window and i not in g.global_blocks
        blocks.append(block_saved(a, g.tokens, g.window_tokens if windowed else g.tokens, bf16,
                                  lora_rank if mode == "lora" else 0, device=device))
    # patch embedding's input image (the conv saves it; bf16 autocast saves its bf16 cast) + final norm input
    image = 3 * g.rows * g.cols * a.patch ** 2 * lo
    rb = 2 if (bf16 and a.family == "4m") else 4
    final = g.tokens * a.dim * rb + 2 * g.tokens * 4
    if checkpointing:  # each block keeps only its input; backward recomputes one block at a time
        saved = image + a.depth * g.tokens * a.dim * rb + final
        return {"saved": float(saved), "peak": float(saved + max(blocks)), "per_block_max": max(blocks)}
    saved = image + sum(blocks) + final
    return {"saved": float(saved), "peak": float(saved), "per_block_max": max(blocks)}


def flop_parts(a: Arch, g: Geometry) -> dict[str, float]:
    """Forward FLOPs of the backbone for one image (a multiply-add = 2 FLOPs), by kind: the patch
    embedding; the blocks' Linears (qkv and proj over the window-padded grid in windowed blocks, the MLP
    over the image's tokens); attention's two matmuls (QK^T and AV: 4 N^2 D globally, 4 N w^2 D in
    windows); and each block's last Linear (fc2), which checkpointing's recompute skips."""
    attn_lin = sum(i * o for n, i, o in a.linears if n in ("qkv", "proj"))
    mlp_lin = sum(i * o for n, i, o in a.linears if n not in ("qkv", "proj"))
    last = next((i * o for n, i, o in a.linears if n == "fc2"), 0)
    n = g.tokens
    lin = attn = 0.0
    for i in range(a.depth):
        if g.window and i not in g.global_blocks:
            lin += 2 * g.window_tokens * attn_lin + 2 * n * mlp_lin
            attn += 4 * g.window_tokens * g.window ** 2 * a.dim
        else:
            lin += 2 * n * (attn_lin + mlp_lin)
            attn += 4 * n * n * a.dim
    return {"patch": float(2 * (n - a.prefix) * 3 * a.patch ** 2 * a.dim), "linear": lin, "attention": attn,
            "last_linear": float(a.depth * 2 * n * last)}


def forward_flops(a: Arch, g: Geometry) -> float:
    """Forward FLOPs of the backbone for one image (:func:`flop_parts` summed)."""
    f = flop_parts(a, g)
    return f["patch"] + f["linear"] + f["attention"]


def iteration_flops(a: Arch, g: Geometry, mode: str, checkpointing: bool) -> float:
    """Forward + backward FLOPs of the backbone for one image, as FlopCounterMode counts them: a Linear's
    backward is 2x its forward when its weight trains (input and weight gradients), 1x when frozen (LoRA:
    input gradients; the adapters are not counted); attention's backward 2.5x its forward (the fused
    kernels recompute the scores); the patch embedding's backward only its weight gradient (1x, none when
    frozen); checkpointing recomputes the blocks' forward up to each block's last Linear. A linear probe:
    the forward only."""
    f = flop_parts(a, g)
    fwd = f["patch"] + f["linear"] + f["attention"]
    if mode == "linear":
        return fwd
    full = mode == "full"
    bwd = (2.0 if full else 1.0) * f["linear"] + 2.5 * f["attention"] + (f["patch"] if full else 0.0)
    recompute = (f["linear"] - f["last_linear"] + f["attention"]) if checkpointing else 0.0
    return fwd + bwd + recompute


# ------------------------------------------------------------------------------------------ the estimate
def finetune_of(p: dict[str, Any]) -> dict[str, Any]:
    """The profile's fine-tuning mode: ``finetune.mode`` (full | lora | linear, with ``rank``), else
    a profile's own ``mode: linear`` (a frozen-backbone probe), else full."""
    ft = p.get("finetune") or {}
    if not isinstance(ft, dict):
        raise ConfigError(f"{p.get('profile_file', 'profile')}: finetune must be a section (mode, rank, ...), "
                          f"not {ft!r}")
    mode = str(ft.get("mode") or ("linear" if p.get("mode") == "linear" else "full")).lower()
    if mode not in ("full", "lora", "linear"):
        raise ConfigError(f"{p.get('profile_file', 'profile')}: finetune.mode must be full, lora or linear, "
                          f"not {mode!r}")
    out: dict[str, Any] = {"mode": mode}
    if mode == "lora":
        if ft.get("rank") is None:
            raise ConfigError(f"{p.get('profile_file', 'profile')}: finetune.mode lora needs finetune.rank")
        out["rank"] = int(ft["rank"])
        targets = ft.get("targets") or ft.get("target_modules") or LORA_TARGETS
        out["targets"] = tuple(str(t).split(".")[-1] for t in targets)
    return out


@dataclass
class Settings:
    gpus: int
    per_gpu_batch: int
    accumulation: int
    bf16: bool
    checkpointing: bool
    mode: str
    lora_rank: int = 0
    optimizer: str = "adamw"


def derive_batch(total: int, gpus: int, per_gpu: int | None) -> tuple[int, int]:
    """(per-GPU micro-batch, accumulation steps) for the profile's TOTAL batch over ``gpus`` GPUs: the
    runner's own split (``batch_split``), so a plan and a run never disagree."""
    from .tasks.runner import batch_split

    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, not {gpus}")
    return batch_split(total, gpus, per_gpu)


def memory(a: Arch, g: Geometry, s: Settings) -> dict[str, float]:
    """Per-GPU bytes: weights (fp32, plus bf16 autocast copies of the Linears), gradients and optimiser
    state (AdamW 2 fp32 states, SGD / LARS momentum 1) of what trains, activations at the micro-batch."""
    if s.mode == "lora":
        trainable = lora_params(a, s.lora_rank)
    elif s.mode == "linear":
        trainable = 0
    else:
        trainable = a.params
    states = {"adamw": 2, "sgd": 1, "lars": 1}.get(s.optimizer)
    if states is None:
        raise ConfigError(f"optimizer must be adamw, sgd or lars, not {s.optimizer!r}")
    frozen_total = a.params + (trainable if s.mode == "lora" else 0)
    act = activation_bytes(a, g, bf16=s.bf16, checkpointing=s.checkpointing, mode=s.mode, lora_rank=s.lora_rank)
    out = {"weights": 4.0 * frozen_total,
           "autocast_copies": 2.0 * a.matmul_params if (s.bf16 and s.mode != "linear") else 0.0,
           "gradients": 4.0 * trainable,
           "optimizer": 4.0 * states * trainable,
           "activations": act["peak"] * s.per_gpu_batch,
           "activations_per_image": act["peak"]}
    out["fixed"] = out["weights"] + out["autocast_copies"] + out["gradients"] + out["optimizer"]
    out["total"] = out["fixed"] + out["activations"]
    out["trainable"] = float(trainable)
    return out


def lora_params(a: Arch, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    return a.depth * sum(rank * (i + o) for n, i, o in a.linears if n in targets)


def _max_batch(mem: dict[str, float], budget: float) -> int:
    free = budget - mem["fixed"]
    if free <= 0:
        return 0
    if mem["activations_per_image"] <= 0:
        return 10 ** 9
    return int(free // mem["activations_per_image"])


def estimate(task: Any, p: dict[str, Any], arch: Arch, *, gpus: int, gpu_memory: float | None,
             options: dict[str, Any] | None = None, per_gpu_batch: int | None = None,
             checkpointing: bool | None = None, bf16: bool | None = None, gpu: str = "a100",
             utilisation: float = UTILISATION, n_train: int | None = None) -> dict[str, Any]:
    """The plan of one configuration: memory per GPU, whether and what fits, FLOPs, time, GPU-hours."""
    from .tasks.runner import schedule
    from .tasks.schema import default

    total = int(p["batch_size"])
    if per_gpu_batch is None and p.get("per_gpu_batch") is not None:  # a profile's own per-GPU batch
        per_gpu_batch = int(p["per_gpu_batch"])
    per_gpu, accum = derive_batch(total, gpus, per_gpu_batch)
    ft = finetune_of(p)
    amp = p.get("amp", default("amp"))
    s = Settings(gpus=gpus, per_gpu_batch=per_gpu, accumulation=accum,
                 bf16=bool(amp in ("bf16", "auto")) if bf16 is None else bool(bf16),
                 checkpointing=bool(p.get("grad_checkpointing")) if checkpointing is None else bool(checkpointing),
                 mode=ft["mode"], lora_rank=int(ft.get("rank", 0)),
                 optimizer=str(p.get("optimizer", default("optimizer"))).lower())
    g = geometry(arch, p["image_size"], options)
    mem = memory(arch, g, s)
    budget = gpu_memory * (1 - RESERVE) if gpu_memory else None
    fits = None if budget is None else mem["total"] <= budget
    # FLOPs of one optimiser step (the total batch): forward, backward and checkpointing's recompute
    fwd = forward_flops(arch, g)
    flops_image = iteration_flops(arch, g, s.mode, s.checkpointing)
    flops_iter = flops_image * total
    n_images = n_train if n_train is not None else getattr(task, "reference_train_images", None)
    if p["schedule"]["unit"] == "epoch" and not n_images:
        raise ConfigError(f"{task.name}: an epoch-based schedule needs the dataset's training-set size "
                          "(the task's reference_train_images)")
    iters = schedule(p, int(n_images or 1), gpus)["max_iters"]
    gpu = gpu.lower()
    if gpu not in PEAKS:
        raise ConfigError(f"--gpu {gpu!r}: one of {', '.join(PEAKS)}")
    if not 0 < utilisation <= 1:
        raise ConfigError(f"--utilisation must be in (0, 1], not {utilisation}")
    peak = PEAKS[gpu]["bf16" if s.bf16 else "fp32"]
    wall_s = iters * flops_iter / (gpus * peak * utilisation)
    out: dict[str, Any] = {
        "task": task.name, "profile": p.get("profile"), "backbone": arch.name, "model_size": p.get("model_size"),
        "image_size": p["image_size"], "tokens": g.tokens, "attention": (
            f"windowed {g.window}x{g.window} (padded to {g.window_tokens - arch.prefix} tokens), global blocks "
            f"{g.global_blocks}" if g.window else "global in every block"),
        "settings": asdict(s), "total_batch": total,
        "params": {"total": arch.params, "trainable": int(mem["trainable"])},
        "memory": {k: v for k, v in mem.items() if k != "trainable"},
        "gpu_memory": gpu_memory, "budget": budget, "fits": fits,
        "max_per_gpu_batch": None if budget is None else _max_batch(mem, budget),
        "flops": {"forward_per_image": fwd, "per_image": flops_image, "per_iteration": flops_iter},
        "schedule": {"iterations": iters, "unit": p["schedule"]["unit"], "train_images": n_images},
        "time": {"gpu": gpu, "peak_flops": peak, "utilisation": utilisation, "wall_s": wall_s,
                 "gpu_hours": wall_s * gpus / 3600, "s_per_iteration": wall_s / max(iters, 1)},
    }
    if budget is not None:
        out["alternatives"] = alternatives(arch, g, s, total, budget)
    return out


def alternatives(a: Arch, g: Geometry, s: Settings, total: int, budget: float) -> list[dict[str, Any]]:
    """Settings that fit ``budget``: the same with a smaller micro-batch and accumulation, activation
    checkpointing, LoRA (the profile's rank, else 8) and LoRA with checkpointing; each at the largest
    micro-batch that fits and divides the per-GPU share of the total batch."""
    per_total = total // s.gpus
    divisors = [d for d in range(per_total, 0, -1) if per_total % d == 0]
    rank = s.lora_rank or 8
    combos: list[tuple[str, dict[str, Any]]] = [("as configured, largest per-GPU batch", {})]
    if not s.checkpointing:
        combos.append(("activation checkpointing", {"checkpointing": True}))
    if s.mode == "full":
        combos += [(f"LoRA rank {rank}", {"mode": "lora", "lora_rank": rank})]
        if not s.checkpointing:
            combos.append((f"LoRA rank {rank} + activation checkpointing",
                           {"mode": "lora", "lora_rank": rank, "checkpointing": True}))
    out = []
    for label, change in combos:
        t = replace(s, **change)
        one = memory(a, g, replace(t, per_gpu_batch=1))
        bmax = _max_batch(one, budget)
        fit = next((d for d in divisors if d <= bmax), None)
        if fit is None:
            out.append({"label": label, "fits": False, "options": change, "fixed": one["fixed"]})
            continue
        t = replace(t, per_gpu_batch=fit, accumulation=total // (fit * s.gpus))
        out.append({"label": label, "fits": True, "options": change, "per_gpu_batch": fit,
                    "accumulation": t.accumulation, "memory": memory(a, g, t)["total"], "max_per_gpu_batch": bmax})
    return out


def suggestion_words(alts: list[dict[str, Any]]) -> list[str]:
    """Each fitting alternative as the options that set it."""
    words = []
    for alt in alts:
        if not alt["fits"]:
            continue
        opts = []
        if alt["options"].get("checkpointing"):
            opts.append("--set grad_checkpointing=true")
        if alt["options"].get("mode") == "lora":
            opts.append(f"LoRA (finetune: {{mode: lora, rank: {alt['options']['lora_rank']}}} in the profile)")
        opts.append(f"--per-gpu-batch {alt['per_gpu_batch']} ({alt['accumulation']} accumulation step"
                    f"{'s' if alt['accumulation'] > 1 else ''})")
        words.append(f"{alt['label']}: " + " ".join(opts) + f" -> {alt['memory'] / GIB:.1f} GiB per GPU")
    return words


def check_fit(task: Any, p: dict[str, Any], name: str, info: dict[str, Any], options: dict[str, Any], *,
              world: int, gpu_memory: float | None, per_gpu_batch: int | None = None) -> dict[str, Any] | None:
    """``run``'s check before it builds anything: a ConfigError naming settings that would fit when the
    estimate exceeds ``gpu_memory`` (bytes; None: no check). Returns the estimate (None when unchecked)."""
    import torch

    if gpu_memory is None:
        return None
    amp = p.get("amp", "auto")
    cuda = torch.cuda.is_available()
    bf16 = amp == "bf16" or (amp == "auto" and cuda and torch.cuda.is_bf16_supported())
    arch = build_arch(name, info=info, image_size=p["image_size"], options=options)
    est = estimate(task, p, arch, gpus=world, gpu_memory=gpu_memory, options=options, per_gpu_batch=per_gpu_batch,
                   bf16=bf16, n_train=getattr(task, "reference_train_images", None) or 1)
    if est["fits"]:
        return est
    mem = est["memory"]
    s = est["settings"]
    ways = suggestion_words(est["alternatives"])
    raise ConfigError(
        f"{task.name} / {p.get('profile_file', p.get('profile'))} with {name} does not fit {gpu_memory / GIB:.1f} GiB "
        f"per GPU: the estimate is {mem['total'] / GIB:.2f} GiB (weights {mem['weights'] / GIB:.2f}, gradients "
        f"{mem['gradients'] / GIB:.2f}, optimiser {mem['optimizer'] / GIB:.2f}, activations "
        f"{mem['activations'] / GIB:.2f} for {s['per_gpu_batch']} image(s) per GPU), above the "
        f"{100 * (1 - RESERVE):.0f}% budget of {est['budget'] / GIB:.2f} GiB (heads not counted: a lower bound). "
        + ("Settings that would fit: " + "; ".join(ways) if ways else
           "No setting fits: even the weights with LoRA and one image exceed it; use a GPU with more memory")
        + f". `fourm-eval plan {task.name} --backbone {name} --profile {p.get('profile')} --gpus {world} "
          f"--gpu-memory {gpu_memory / GIB:g}GB` (with the same --set values) shows the breakdown.")


def resolve_gpu_memory(value: float | str | None) -> float | None:
    """``run``'s --gpu-memory in bytes: "auto" is the CUDA device's total memory (None without CUDA:
    no check), a string is parsed ('80GB'), None stays None."""
    if value is None:
        return None
    if value == "auto":
        import torch

        if not torch.cuda.is_available():
            return None
        return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    return parse_memory(value) if isinstance(value, str) else float(value)


def plan_for(task: Any, backbone: str, profile: str, *, gpus: int, gpu_memory: float | None,
             checkpoint: str | None = None, sets: list[str] | None = None, size: str | None = None,
             per_gpu_batch: int | None = None, checkpointing: bool | None = None, bf16: bool | None = None,
             gpu: str = "a100", utilisation: float = UTILISATION) -> dict[str, Any]:
    """``fourm-eval plan``: resolve the profile for the backbone as ``run`` does, then :func:`estimate`.
    Named backbones are built on the meta device; ``4m`` reads only its checkpoint's header."""
    from .backbones import backbone_info
    from .tasks.runner import resolve_run_profile
    from .tasks.runs import resolve_backbone_name

    named = backbone.lower() != "4m"
    name, ckpt = resolve_backbone_name(backbone, size, checkpoint, random_init=named and checkpoint is None)
    info = backbone_info(name, ckpt if name == "4m" else None)
    p, note = resolve_run_profile(task, profile, sets, info, size)
    options = task.backbone_options(p, name, info)
    arch = build_arch(name, info=info, image_size=p["image_size"], options=options)
    est = estimate(task, p, arch, gpus=gpus, gpu_memory=gpu_memory, options=options, per_gpu_batch=per_gpu_batch,
                   checkpointing=checkpointing, bf16=bf16, gpu=gpu, utilisation=utilisation)
    est["notes"] = [note] if note else []
    stage = p.get("pre_stage")
    if stage:  # the stage the profile runs first is part of the run's cost: planned alike, added up
        from .tasks import get_task
        est["pre_stage"] = plan_for(get_task(stage["task"]), backbone, stage["profile"], gpus=gpus,
                                    gpu_memory=gpu_memory, checkpoint=checkpoint, size=size,
                                    per_gpu_batch=per_gpu_batch, checkpointing=checkpointing, bf16=bf16, gpu=gpu,
                                    utilisation=utilisation)
        est["total_gpu_hours"] = est["time"]["gpu_hours"] + est["pre_stage"]["time"]["gpu_hours"]
    return est


def _gib(b: float) -> str:
    return f"{b / GIB:.2f} GiB"


def render(est: dict[str, Any], out: Any) -> None:
    """The plan as text lines (``out``: a print function)."""
    s, mem, t = est["settings"], est["memory"], est["time"]
    if est.get("pre_stage"):
        out("stage 1 of 2 (the profile's pre_stage), then stage 2 from its weights:")
        render(est["pre_stage"], out)
    out(f"plan: {est['task']} / profile {est['profile']} (size {est['model_size']}), backbone {est['backbone']}")
    out(f"  parameters: {est['params']['total'] / 1e6:.1f}M total, {est['params']['trainable'] / 1e6:.1f}M trainable "
        f"({s['mode']}{' rank ' + str(s['lora_rank']) if s['mode'] == 'lora' else ''}); heads not modelled")
    out(f"  input: {est['image_size']} px = {est['tokens']} tokens per image; attention {est['attention']}")
    out(f"  batch: total {est['total_batch']} = {s['per_gpu_batch']} per GPU x {s['gpus']} GPU(s) x "
        f"{s['accumulation']} accumulation step(s); {'bf16 autocast' if s['bf16'] else 'fp32'}, activation "
        f"checkpointing {'on' if s['checkpointing'] else 'off'}, optimiser {s['optimizer']}")
    out("  memory per GPU (lower bound: backbone only):")
    rows = [("weights (fp32)", mem["weights"]), ("bf16 weight copies (autocast)", mem["autocast_copies"]),
            ("gradients (fp32)", mem["gradients"]),
            (f"optimiser state ({s['optimizer']}: {'2 states' if s['optimizer'] == 'adamw' else '1 state'})",
             mem["optimizer"]),
            (f"activations ({_gib(mem['activations_per_image'])} per image x {s['per_gpu_batch']})", mem["activations"]),
            ("total", mem["total"])]
    for label, v in rows:
        out(f"    {label:<48} {_gib(v):>12}")
    if est["budget"] is not None:
        verdict = "fits" if est["fits"] else "does NOT fit"
        out(f"  GPU memory {_gib(est['gpu_memory'])}, budget {_gib(est['budget'])} ({100 * (1 - RESERVE):.0f}%, the "
            f"rest for heads, CUDA context, fragmentation): {verdict}; largest per-GPU batch that fits: "
            + (f"{est['max_per_gpu_batch']}" if est["max_per_gpu_batch"] < 10 ** 9 else
               "any (the frozen backbone keeps no activations)"))
        for alt in est.get("alternatives", []):
            if alt["fits"]:
                out(f"    {alt['label']:<44} fits at {alt['per_gpu_batch']} per GPU x {alt['accumulation']} "
                    f"accumulation ({_gib(alt['memory'])}; up to {alt['max_per_gpu_batch']} per GPU)")
            else:
                out(f"    {alt['label']:<44} does not fit (fixed part alone {_gib(alt['fixed'])})")
    f = est["flops"]
    sch = est["schedule"]
    out(f"  compute: {f['forward_per_image'] / 1e12:.3f} TFLOP forward per image, {f['per_iteration'] / 1e15:.3f} PFLOP "
        f"per iteration (forward + backward{' + recompute' if s['checkpointing'] else ''}, total batch)")
    out(f"  schedule: {sch['iterations']} iterations"
        + (f" ({sch['train_images']} training images, the dataset's published size)" if sch["unit"] == "epoch" else ""))
    out(f"  time at {100 * t['utilisation']:.0f}% of {t['gpu'].upper()} {'bf16' if s['bf16'] else 'fp32'} peak "
        f"({t['peak_flops'] / 1e12:.1f} TFLOP/s): {t['s_per_iteration']:.2f} s per iteration, wall "
        f"{t['wall_s'] / 3600:.1f} h on {s['gpus']} GPU(s) = {t['gpu_hours']:.0f} GPU-hours")
    for n in est.get("notes", []):
        out(f"  note: {n}")
    if est.get("pre_stage"):
        out(f"both stages: {est['pre_stage']['time']['gpu_hours']:.0f} + {t['gpu_hours']:.0f} = "
            f"{est['total_gpu_hours']:.0f} GPU-hours")
