"""The `fourm-eval` command line."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import FourmEvalError

app = typer.Typer(help="fourm-eval: transfer evaluation of 4M encoders and ViT baselines.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
bench_app = typer.Typer(help="Benchmarks (speed, memory).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
data_app = typer.Typer(help="Datasets: generate the built-in mini datasets, validate a layout.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
TASKS = ("coco-det",)
console = Console()
err_console = Console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user errors as one clear line and exit 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FourmEvalError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
    return wrapper


def _version_cb(value: bool) -> None:
    if value:
        console.print(f"fourm-eval {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version_cb, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """fourm-eval: transfer evaluation of 4M encoders and ViT baselines."""


@app.command()
@friendly
def backbones(json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """List registered backbones with their parameter counts and sources."""
    import torch

    from .backbones import build_backbone, list_backbones

    rows = []
    for spec in list_backbones():
        params: Optional[int] = None
        if not spec.needs_checkpoint:
            with torch.device("meta"):
                params = sum(p.numel() for p in build_backbone(spec.name).parameters())
        rows.append({"name": spec.name, "params": params, "description": spec.description, "source": spec.source})
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    t = Table(title="Registered backbones")
    for col in ("name", "params", "description", "source"):
        t.add_column(col, justify="right" if col == "params" else "left")
    for r in rows:
        t.add_row(r["name"], f"{r['params'] / 1e6:.1f}M" if r["params"] else "from file", r["description"],
                  r["source"])
    console.print(t)


@app.command()
@friendly
def inspect(checkpoint: str = typer.Argument(..., help="4M checkpoint: file, model folder, or cached hub id."),
            json_out: bool = typer.Option(False, "--json", help="Machine-readable output."),
            keys: bool = typer.Option(False, "--keys", help="List every used and ignored key."),
            allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                              help="Allow unpickling .pth files (runs code from the file).")) -> None:
    """Show a 4M checkpoint's config, size, dtype, sha256 and which keys the encoder uses."""
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(checkpoint, allow_pickle=allow_pickle)
    if json_out:
        print(json.dumps(info, indent=2, default=str))
        return
    cfg = info["config"]
    console.print(f"[bold]{info['path']}[/]  ({info['size_bytes'] / 2**20:.1f} MiB, {info['format']})")
    console.print(f"sha256  {info['sha256']}")
    t = Table(title=f"config (from {info['config_source']})", show_header=False)
    for k in ("dim", "depth", "num_heads", "mlp_ratio", "gated_mlp", "act_layer", "qkv_bias", "proj_bias",
              "mlp_bias", "norm_bias", "qk_norm", "allow_zero_attn", "num_register_tokens", "patch_size",
              "image_size", "rgb_domain", "domains_in"):
        t.add_row(k, str(cfg[k]))
    console.print(t)
    console.print(f"parameters: encoder {info['params_encoder']:,} / file {info['params_total']:,}; "
                  f"dtypes {info['dtypes']}")
    console.print(f"keys: {info['keys_total']} in file, {len(info['keys_used'])} used by the RGB encoder, "
                  f"{len(info['keys_ignored'])} ignored")
    if info["ignored_groups"]:
        console.print("ignored: " + ", ".join(f"{g} ({n})" for g, n in sorted(info["ignored_groups"].items())))
    if info["pos_emb_max_abs_diff_vs_sincos"] is not None:
        d = info["pos_emb_max_abs_diff_vs_sincos"]
        console.print(f"stored pos_emb vs rebuilt 2D sin-cos: max |diff| {d:.2e} "
                      + ("[green](matches)[/]" if d < 1e-5 else "[yellow](differs: the backbone rebuilds it)[/]"))
    if keys:
        console.print("[bold]used:[/] " + " ".join(info["keys_used"]))
        console.print("[bold]ignored:[/] " + " ".join(info["keys_ignored"]))
    if info["loadable"]:
        console.print("[green]loadable as a fourm-eval backbone[/]")
    else:
        console.print(f"[red]not loadable:[/] missing {info['missing_encoder_keys'][:10]}, "
                      f"shape mismatches {info['shape_mismatches'][:10]}")
        raise typer.Exit(1)


@app.command()
@friendly
def doctor(brief: bool = typer.Option(False, "--brief", help="Only problems and the task summary."),
           json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """Check versions (python, torch, CUDA, mmcv ops, mmdet, mmseg, timm) and which tasks can run here."""
    from .doctor import run_checks

    r = run_checks()
    if json_out:
        print(json.dumps({"ok": r.ok, "checks": [c.__dict__ for c in r.checks], "info": r.info,
                          "tasks": {k: {"ok": v[0], "missing": v[1]} for k, v in r.tasks.items()}}, indent=2))
        raise typer.Exit(0 if r.ok else 1)
    t = Table(title="environment")
    for col in ("component", "status", "detail", "fix"):
        t.add_column(col)
    for c in r.checks:
        if brief and c.ok and not c.warn:
            continue
        status = "[red]FAIL[/]" if not c.ok else ("[yellow]warn[/]" if c.warn else "[green]ok[/]")
        t.add_row(c.name, status, c.detail, c.fix)
    if t.row_count:
        console.print(t)
    tt = Table(title="tasks")
    tt.add_column("task")
    tt.add_column("can run here")
    tt.add_column("missing")
    for task, (ok, missing) in r.tasks.items():
        tt.add_row(task, "[green]yes[/]" if ok else "[red]no[/]", ", ".join(missing))
    console.print(tt)
    raise typer.Exit(0 if r.ok else 1)


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


@app.command()
@friendly
def forward(backbone: str = typer.Option("4m", help="Registered backbone name (see `fourm-eval backbones`)."),
            checkpoint: Optional[str] = typer.Option(None, help="Checkpoint; default for '4m': the built-in tiny one."),
            image: Optional[Path] = typer.Option(None, help="Image file; default: a built-in sample image."),
            size: int = typer.Option(224, help="Input side in pixels (multiple of the patch size)."),
            layers: str = typer.Option("", help="Also report intermediate blocks, e.g. '0,1'."),
            allow_pickle: bool = typer.Option(False, "--allow-pickle")) -> None:
    """Run a forward pass on one image and summarise the tokens (a quick end-to-end check)."""
    import torch

    from .backbones import build_backbone
    from .data.images import load_rgb, normalize, sample_image

    if backbone == "4m" and checkpoint is None:
        from .fixtures import default_tiny_checkpoint
        checkpoint = str(default_tiny_checkpoint())
    bb = build_backbone(backbone, checkpoint=checkpoint, allow_pickle=allow_pickle).eval()
    img = load_rgb(image) if image else sample_image(size)
    x = normalize(img, size).unsqueeze(0)
    with torch.no_grad():
        out = bb(x)
        inter = bb.get_intermediate_layers(x, _parse_ints(layers)) if layers else []
    console.print(f"backbone {backbone} ({getattr(bb, 'source', '')}), input {tuple(x.shape)}, "
                  f"grid {bb.grid_size(x)}")
    console.print(f"tokens {tuple(out.shape)}: mean {out.mean():.4f}, std {out.std():.4f}, "
                  f"finite {bool(torch.isfinite(out).all())}")
    for i, t in zip(_parse_ints(layers), inter):
        console.print(f"block {i}: {tuple(t.shape)}, mean {t.mean():.4f}, std {t.std():.4f}")


@bench_app.command("backbone")
@friendly
def bench_backbone(sizes: str = typer.Option("224,1024", help="Input sizes to measure."),
                   batch: int = typer.Option(8, help="Batch at 224 px (scaled down by token count above)."),
                   iters: int = typer.Option(3, help="Timed iterations per measurement."),
                   device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)."),
                   dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
                   json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results here.")) -> None:
    """4M backbone (GELU+biases, ViT-B shape) vs timm vit_base_patch16_224: img/s, memory, ratio."""
    from .bench import growth, ratios, run_backbone_bench

    sz = _parse_ints(sizes)
    res = run_backbone_bench(sz, batch, iters, device, dtype, log=console.print)
    rat = ratios(res)
    t = Table(title="4M / timm (>1.0 means 4M is faster or leaner)")
    for col in ("size", "fwd", "fwd+bwd", "memory (timm/4M)"):
        t.add_column(col, justify="right")
    for s, r in rat.items():
        t.add_row(str(s), f"{r['fwd']:.2f}x", f"{r['fwdbwd']:.2f}x", f"{r['mem']:.2f}x")
    console.print(t)
    if len(sz) > 1:
        for name, g in growth(res, min(sz), max(sz)).items():
            console.print(f"cost growth {min(sz)}->{max(sz)} px (time/img, fwd+bwd): {name}: {g:.1f}x")
    if json_out:
        json_out.write_text(json.dumps({"results": [r.__dict__ for r in res], "ratios": rat}, indent=2))


@app.command("run")
@friendly
def run_task(task: str = typer.Argument(..., help=f"Task: {', '.join(TASKS)}."),
             backbone: str = typer.Option("4m", help="4m, deit3, mae, or a registered name (4m-b, deit3-l, ...)."),
             checkpoint: Optional[str] = typer.Option(
                 None, help="Weights: file, folder or cached hub id. Default for 4m: a generated tiny 4M."),
             data_root: Optional[Path] = typer.Option(
                 None, help="Dataset root in the task's standard layout. Default: the built-in mini dataset."),
             profile: str = typer.Option("smoke", help="paper, short, smoke, or a YAML file."),
             work_dir: Optional[Path] = typer.Option(
                 None, help="Run directory (default runs/TASK/BACKBONE-PROFILE-seedN). Re-running resumes."),
             seed: int = typer.Option(0, help="Random seed."),
             set_: list[str] = typer.Option([], "--set", help="Override a profile value: key=value (repeatable)."),
             size: Optional[str] = typer.Option(None, help="Model size for deit3/mae and per-size values: b, l, xl."),
             skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                                  help="Drop missing/undecodable images (counted) instead of failing."),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .pth checkpoints."),
             random_init: bool = typer.Option(False, "--random-init", help="Train a baseline from random init."),
             launcher: str = typer.Option("none", help="none, pytorch (torchrun) or slurm (srun).")) -> None:
    """Fine-tune a backbone on a task and evaluate it; writes WORK_DIR/result.json."""
    if task not in TASKS:
        raise typer.BadParameter(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    from .tasks import coco_det

    coco_det.run(backbone=backbone, checkpoint=checkpoint, data_root=data_root, profile=profile,
                 work_dir=work_dir, seed=seed, sets=list(set_), skip_bad_images=skip_bad_images,
                 allow_pickle=allow_pickle, launcher=launcher, size=size, random_init=random_init,
                 log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True))


@data_app.command("make-mini")
@friendly
def data_make_mini(kind: str = typer.Argument(..., help="coco"),
                   out: Path = typer.Argument(..., help="Output folder."),
                   seed: int = typer.Option(0, help="Generator seed (same seed, same bytes)."),
                   n_train: int = typer.Option(240, help="Training images."),
                   n_val: int = typer.Option(60, help="Validation images.")) -> None:
    """Write a small synthetic dataset in the real on-disk layout."""
    if kind != "coco":
        raise typer.BadParameter("available: coco")
    from .data.coco_mini import make_mini_coco

    make_mini_coco(out, n_train=n_train, n_val=n_val, seed=seed)
    console.print(f"mini COCO written to {out} ({n_train} train / {n_val} val images)")


@data_app.command("check")
@friendly
def data_check(kind: str = typer.Argument(..., help="coco"), root: Path = typer.Argument(..., help="Dataset root."),
               splits: str = typer.Option("train,val", help="Splits to check.")) -> None:
    """Validate a dataset layout: files, annotations, every image decodes."""
    if kind != "coco":
        raise typer.BadParameter("available: coco")
    from rich.progress import Progress

    from .data.coco_check import check_split

    for split in splits.split(","):
        with Progress(console=console, transient=True) as prog:
            t = prog.add_task(f"{split}2017", total=None)
            c = check_split(root, split, skip_bad_images=False, out_dir=None,
                            progress=lambda i, n: prog.update(t, completed=i, total=n))
        console.print(f"{split}: {c.n_images} images, {c.n_annotations} annotations, "
                      f"{len(c.categories)} categories, sha256 {c.ann_sha256[:16]}… [green]ok[/]")


def run() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
