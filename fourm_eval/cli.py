"""The `fourm-eval` command line."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import time
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
data_app = typer.Typer(help="Datasets: generate the built-in mini datasets, convert official releases, "
                                "validate a layout.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")
results_app = typer.Typer(help="Collect, validate and export result.json records.", no_args_is_help=True)
app.add_typer(results_app, name="results")
analyze_app = typer.Typer(help="Overfitting analyses (scaling, fine-tuning, pre-training).", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")
features_app = typer.Typer(help="The feature cache: a frozen encoder's features of a dataset, extracted once "
                                "(fourm_eval/features.py); kNN and linear-grid probes read it.", no_args_is_help=True)
app.add_typer(features_app, name="features")


def _console(stderr: bool = False) -> Console:
    """On a terminal, rich's usual console; elsewhere (a file, a pipe, CI and Slurm logs) one that
    never wraps or cuts: tables and lines keep their full width, whole paths and values."""
    stream = sys.stderr if stderr else sys.stdout
    tty = bool(getattr(stream, "isatty", lambda: False)())
    return Console(stderr=stderr, width=None if tty else 10_000, soft_wrap=not tty)


console = _console()
err_console = _console(stderr=True)


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user errors as one clear line and exit 2; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FourmEvalError as e:
            from rich.markup import escape  # messages hold [lists] that are not markup
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
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
                                              help="Allow unpickling .pth files (runs code from the file)."),
            num_heads: Optional[int] = typer.Option(None, "--num-heads",
                                                    help="Heads, for files without config metadata.")) -> None:
    """Show a 4M checkpoint's config, size, dtype, sha256 and which keys the encoder uses."""
    from .inspection import inspect_checkpoint

    info = inspect_checkpoint(checkpoint, allow_pickle=allow_pickle, num_heads=num_heads)
    if json_out:
        print(json.dumps(info, indent=2, default=str))
        return
    cfg = info["config"]
    console.print(f"[bold]{info['path']}[/]  ({info['size_bytes'] / 2**20:.1f} MiB, {info['format']})")
    console.print(f"sha256  {info['sha256']}")
    t = Table(title=f"config (from {info['config_source']})", show_header=False)
    guessed = info.get("config_guessed") or {}
    for k in ("dim", "depth", "num_heads", "mlp_ratio", "gated_mlp", "act_layer", "qkv_bias", "proj_bias",
              "mlp_bias", "norm_bias", "qk_norm", "allow_zero_attn", "num_register_tokens", "patch_size",
              "image_size", "rgb_domain", "domains_in"):
        t.add_row(k, str(cfg[k]) + (f"  [yellow]guessed: {guessed[k]}[/]" if k in guessed else ""))
    console.print(t)
    if guessed:
        console.print("[yellow]warning:[/] no config metadata in this file; the values marked 'guessed' are not "
                      "determined by the tensors (state the head count with --num-heads)")
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
            allow_pickle: bool = typer.Option(False, "--allow-pickle"),
            num_heads: Optional[int] = typer.Option(None, "--num-heads",
                                                    help="Heads of a 4M file without config metadata.")) -> None:
    """Run a forward pass on one image and summarise the tokens (a quick end-to-end check)."""
    import torch

    from .backbones import build_backbone
    from .data.images import load_rgb, normalize, sample_image

    if backbone == "4m" and checkpoint is None:
        from .fixtures import default_tiny_checkpoint
        checkpoint = str(default_tiny_checkpoint())
    extra = {"num_heads": num_heads} if num_heads is not None else {}
    bb = build_backbone(backbone, checkpoint=checkpoint, allow_pickle=allow_pickle, **extra).eval()
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
                   iters: int = typer.Option(5, help="Alternating timed iterations per model (fastest kept)."),
                   device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda if present)."),
                   dtype: str = typer.Option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16."),
                   json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results here.")) -> None:
    """4M backbone (GELU+biases, ViT-B shape) vs timm vit_base_patch16_224: img/s, memory, ratio."""
    from .bench import growth, ratios, run_backbone_bench

    sz = _parse_ints(sizes)
    res = run_backbone_bench(sz, batch, iters, device, dtype, log=console.print)
    rat = ratios(res)
    t = Table(title="4M / timm (>1.0 means 4M is faster or leaner)")
    for col in ("size", "fwd", "fwd+bwd", "peak memory (timm/4M)", "saved activations (timm/4M)"):
        t.add_column(col, justify="right")
    for s, r in rat.items():
        t.add_row(str(s), f"{r['fwd']:.2f}x", f"{r['fwdbwd']:.2f}x", f"{r['mem']:.2f}x", f"{r['activations']:.2f}x")
    console.print(t)
    if len(sz) > 1:
        for name, g in growth(res, min(sz), max(sz)).items():
            console.print(f"cost growth {min(sz)}->{max(sz)} px (time/img, fwd+bwd): {name}: {g:.1f}x")
    if json_out:
        json_out.write_text(json.dumps({"results": [r.__dict__ for r in res], "ratios": rat}, indent=2))


@bench_app.command("task")
@friendly
def bench_task_cmd(tasks: list[str] = typer.Argument(..., help="Task names, or all."),
                   backbone: list[str] = typer.Option(["4m"], "--backbone", help="Backbone(s) (repeatable); 4m: the "
                                                      "tiny shipped 4M, others from random init."),
                   profile: str = typer.Option("smoke", help="Profile (its resolution, batch and model)."),
                   iters: int = typer.Option(5, help="Timed training iterations."),
                   warmup: int = typer.Option(1, help="Untimed iterations first."),
                   json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the records here."),
                   in_process: bool = typer.Option(False, "--in-process", help="Measure in this process, one after "
                                                   "another (faster; CPU memory growth then includes earlier "
                                                   "measurements' allocator caches).")) -> None:
    """Training iterations/s, images/s, peak memory and FLOP/s of each task's real model (built as `run`
    builds it), beside the planner's time estimate; each measurement in a fresh process."""
    from .bench_task import run_bench, table_rows

    records = run_bench(list(tasks), list(backbone), profile, iters, warmup, fresh_process=not in_process,
                        log=lambda s: console.print(s, highlight=False, markup=False))
    cols, rows = table_rows(records)
    t = Table(title=f"bench task ({profile}; {warmup} warm-up + {iters} timed iterations; memory: "
                    f"{records[0]['memory_kind'] if records else '-'})")
    for c in cols:
        t.add_column(c, justify="right" if c not in ("task", "backbone", "device") else "left")
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if records:
        pl = records[0]["planner"]
        console.print(f"planner: backbone FLOPs at {100 * pl['utilisation_assumed']:.0f}% of {pl['peak_flops'] / 1e9:.0f} "
                      f"GFLOP/s ({pl['peak_source']}); implied util. = planner FLOPs / (measured time x peak), counted "
                      "util. = all counted FLOPs (heads included) / (measured time x peak)", highlight=False,
                      markup=False, soft_wrap=True)
    if json_out:
        json_out.write_text(json.dumps({"records": records}, indent=2))


@app.command("tasks")
@friendly
def tasks_cmd(names: bool = typer.Option(False, "--names", help="Only the names, one per line (for scripts)."),
              json_out: bool = typer.Option(False, "--json", help="Machine-readable output.")) -> None:
    """The registered transfer tasks: data, metrics (direction, main, gated), predictions, profiles."""
    from .tasks import all_tasks
    from .tasks.profiles import list_profiles, profile_protocols

    tasks = all_tasks()
    if names:
        for n in tasks:
            print(n)
        return
    rows = [{"name": t.name, "title": t.title, "data": t.data_kind, "profiles": list_profiles(t.name),
             "protocols": profile_protocols(t.name),
             "metrics": [m.__dict__ for m in t.metrics], "predictions": t.prediction_format} for t in tasks.values()]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        console.print(f"[bold]{r['name']}[/]: {r['title']}", highlight=False)
        console.print(f"  data kind {r['data']}; profiles (protocol): "
                      + ", ".join(f"{p} ({proto})" for p, proto in r["protocols"].items()), highlight=False,
                      soft_wrap=True)
        ms = [f"{m['name']}{'*' if m['main'] else ''}{'(gated)' if m['gated'] else ''}"
              f"{'' if m['higher_is_better'] else '(lower is better)'}" for m in r["metrics"]]
        console.print("  metrics (* main): " + ", ".join(ms), highlight=False, soft_wrap=True)
        console.print(f"  predictions: {r['predictions']}", highlight=False, soft_wrap=True)


@app.command("run")
@friendly
def run_task(task: str = typer.Argument(..., help="Task name (see `fourm-eval tasks`)."),
             backbone: Optional[str] = typer.Option(
                 None, help="4m (default), deit3, mae, or a registered name (4m-b, deit3-l, ...)."),
             checkpoint: Optional[str] = typer.Option(
                 None, help="Weights: file, folder, or hub id OWNER/NAME[@REVISION] (fetched into the Hugging Face "
                            "cache when missing; `hub`: timm's own for deit3/mae). Default for 4m: the shipped tiny 4M."),
             data_root: Optional[Path] = typer.Option(
                 None, help="Dataset root in the task's standard layout. Default: the built-in mini dataset "
                            "(with --eval-only --from RUN_DIR: the run's)."),
             profile: Optional[str] = typer.Option(None, help="paper, short, smoke (default), a protocol's name or "
                                                                "smoke (`fourm-eval tasks` lists them), or a YAML file."),
             work_dir: Optional[Path] = typer.Option(
                 None, help="Run directory (default runs/TASK/BACKBONE-PROFILE-seedN; with --eval-only --from "
                            "RUN_DIR: RUN_DIR/eval-only). Re-running resumes."),
             seed: Optional[int] = typer.Option(None, help="Random seed (default 0)."),
             set_: list[str] = typer.Option([], "--set", help="Override a profile value: key=value (repeatable)."),
             per_gpu_batch: Optional[int] = typer.Option(
                 None, "--per-gpu-batch", help="Micro-batch per process; the profile's total batch is kept by "
                                               "accumulating batch_size / (this x processes) steps (same as --set "
                                               "per_gpu_batch=N)."),
             model_size: Optional[str] = typer.Option(
                 None, "--model-size", help="Model size (tiny, b, l, xl): picks deit3/mae's architecture and the "
                                            "per-size profile values; must agree with the checkpoint."),
             skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                                  help="Drop missing/undecodable images (counted) instead of failing."),
             allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .pth checkpoints."),
             num_heads: Optional[int] = typer.Option(
                 None, "--num-heads", help="Heads of a 4M .pth without config metadata (else guessed as dim/64, "
                                           "with a warning in the record)."),
             random_init: bool = typer.Option(False, "--random-init", help="Train a baseline from random init."),
             launcher: str = typer.Option("none", help="none, pytorch (torchrun) or slurm (srun)."),
             stage_data_root: Optional[Path] = typer.Option(
                 None, "--stage-data-root", help="Data of the profile's pre_stage (for the 4M-21 ImageNet protocol: ImageNet-21K, the "
                                                 "winter21 release unpacked); needed with --data-root when the profile "
                                                 "has one."),
             init_from: Optional[Path] = typer.Option(
                 None, "--init-from", help="Start from the final weights of another finished run (RUN_DIR), e.g. "
                                           "an intermediate fine-tuning stage; every tensor whose name and shape "
                                           "fit is loaded, recorded in the record's provenance."),
             eval_only: bool = typer.Option(False, "--eval-only", help="Evaluate trained weights (--from), no "
                                                                       "training; record and predictions are marked "
                                                                       "evaluation-only."),
             from_: Optional[Path] = typer.Option(
                 None, "--from", help="With --eval-only: a finished run directory (its final weights and its own "
                                      "settings), one of its iter_N.pth, or a checkpoint file of the model this "
                                      "command builds."),
             logger: list[str] = typer.Option([], "--logger", help="Also log to tensorboard or wandb (repeatable; "
                                                                    "default: the profile's 'loggers', none)."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan (profile, data, subsets, "
                                                                      "schedule, time estimate) and stop."),
             gpu_memory: str = typer.Option("auto", "--gpu-memory", help="Memory per GPU the run must fit by the "
                                            "planner's estimate (e.g. 80GB), else it is refused before anything is "
                                            "built; auto: the CUDA device's memory (no check on CPU); none: no check."),
             offline: bool = typer.Option(False, "--offline", help="Never contact the hub: a hub checkpoint "
                                          "must be in the local Hugging Face cache (same as HF_HUB_OFFLINE=1)."),
             verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="Also show mmengine's log (environment, config, iteration lines) "
                                               "on the console; it is always in the run directory.")) -> None:
    """Fine-tune a backbone on a task and evaluate it; writes WORK_DIR/result.json and the predictions.
    SIGINT / SIGTERM stop it with one line saying where, and the command that resumes it."""
    from .console import RunConsole
    from .errors import ConfigError
    from .tasks import get_task
    from .tasks.runner import RunInterrupted, run

    if offline:
        from .hub import set_offline
        set_offline()
    if eval_only != (from_ is not None):
        raise ConfigError("--eval-only and --from go together: --eval-only --from RUN_DIR_OR_CHECKPOINT")
    if from_ is not None and (from_.is_dir() or (from_.parent / "run.json").is_file()):
        given = [n for n, v in (("--backbone", backbone), ("--checkpoint", checkpoint), ("--profile", profile),
                                ("--seed", seed), ("--set", set_), ("--model-size", model_size),
                                ("--num-heads", num_heads), ("--random-init", random_init)) if v]
        if given:
            raise ConfigError(f"--from {from_}: the run's own settings are evaluated; {', '.join(given)} cannot "
                              "change them (evaluate a checkpoint file outside a run directory to choose settings)")
    try:
        run(get_task(task), backbone=backbone or "4m", checkpoint=checkpoint, data_root=data_root,
            profile=profile or "smoke", work_dir=work_dir, seed=0 if seed is None else seed,
            sets=list(set_) + ([f"per_gpu_batch={per_gpu_batch}"] if per_gpu_batch is not None else []),
            skip_bad_images=skip_bad_images, allow_pickle=allow_pickle, launcher=launcher, size=model_size,
            random_init=random_init, num_heads=num_heads, console=RunConsole(verbose=verbose), dry_run=dry_run,
            init_from=init_from, eval_from=from_, loggers=list(logger) or None,
            gpu_memory=None if gpu_memory.lower() == "none" else gpu_memory, stage_data_root=stage_data_root)
    except RunInterrupted as e:
        raise typer.Exit(e.exit_code) from None


def _run_dir_of(predictions: Path) -> Optional[Path]:
    """The run directory a predictions folder or file belongs to (run.json beside or above it)."""
    p = predictions.expanduser().resolve()
    for d in ([p.parent, p.parent.parent] if p.is_file() or p.suffix else [p.parent, p]):
        if (d / "run.json").is_file():
            return d
    return None


def _fmt_metric(v: Any, digits: int = 6) -> str:
    from .cells import clean_value
    x = clean_value(v)
    return "n/a (no value)" if x is None else f"{x:.{digits}f}"


@app.command("plan")
@friendly
def plan_cmd(task: str = typer.Argument(..., help="Task name (see `fourm-eval tasks`)."),
             backbone: str = typer.Option("4m", help="Registered backbone (4m-b, 4m-l, 4m-xl, deit3-b, mae-l, ...); "
                                                     "built on the meta device, no weights read."),
             checkpoint: Optional[str] = typer.Option(None, help="For backbone 4m: the checkpoint whose header "
                                                                 "gives the architecture (default: the tiny one)."),
             profile: str = typer.Option("paper", help="Profile name or YAML file."),
             set_: list[str] = typer.Option([], "--set", help="Override a profile value: key=value (repeatable)."),
             model_size: Optional[str] = typer.Option(None, "--model-size", help="Model size for deit3 / mae."),
             gpus: int = typer.Option(1, help="GPUs (the profile's batch_size is the total over all of them)."),
             gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Memory per GPU, e.g. 80GB "
                                                                                   "(GB = GiB = 2^30 bytes)."),
             per_gpu_batch: Optional[int] = typer.Option(None, "--per-gpu-batch", help="Micro-batch per GPU "
                                                         "(default batch_size / gpus); the rest is accumulation."),
             grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing",
                                                               help="Default: the profile's grad_checkpointing."),
             bf16: Optional[bool] = typer.Option(None, "--bf16/--fp32", help="Default: the profile's amp (auto = bf16 "
                                                                             "on a GPU that has it)."),
             gpu: str = typer.Option("a100", help="Peak FLOP/s of: a100, h100, h200, v100, l40s."),
             utilisation: float = typer.Option(0.35, help="Share of the peak FLOP/s assumed for the time estimate."),
             json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the plan here.")) -> None:
    """Memory per GPU, whether it fits (and what would), FLOPs, wall time and GPU-hours of a run, computed
    without running or reading weights."""
    from .plan import parse_memory, plan_for, render
    from .tasks import get_task

    est = plan_for(get_task(task), backbone, profile, gpus=gpus,
                   gpu_memory=parse_memory(gpu_memory) if gpu_memory else None, checkpoint=checkpoint,
                   sets=list(set_), size=model_size, per_gpu_batch=per_gpu_batch, checkpointing=grad_checkpointing,
                   bf16=bf16, gpu=gpu, utilisation=utilisation)
    render(est, lambda line: console.print(line, highlight=False, markup=False))
    if json_out:
        json_out.write_text(json.dumps(est, indent=2, default=str))


@app.command("evaluate")
@friendly
def evaluate_cmd(task: str = typer.Argument(..., help="Task name (see `fourm-eval tasks`)."),
                 predictions: Path = typer.Option(..., "--predictions",
                                                  help="Predictions in the task's standard format (file or folder); "
                                                       "COCO also reads mmdet's and detectron2's file names."),
                 data_root: Optional[Path] = typer.Option(
                     None, "--data-root", help="Dataset root holding the ground truth (default: the data root of the "
                                               "run the predictions come from)."),
                 out: Optional[Path] = typer.Option(None, "--out", help="Also write the metrics as JSON here."),
                 protocol: Optional[str] = typer.Option(
                     None, "--protocol", help="Score as this protocol of the task scores (its protocols: "
                                              "`fourm-eval tasks`); default: the scoring the predictions' meta.json "
                                              "names, else the paper protocol's (with a warning)."),
                 ) -> None:
    """Score saved predictions (ours or another project's) with the task's metric, without retraining."""
    from .errors import ConfigError
    from .results import atomic_write_json, clean_metrics
    from .tasks import get_task
    from .tasks.runs import predictions_state

    t = get_task(task)
    if not predictions.exists():
        raise ConfigError(f"--predictions {predictions}: no such file or folder")
    run_dir = _run_dir_of(predictions)
    ident = None
    if run_dir is not None:
        ident = json.loads((run_dir / "run.json").read_text())
        if ident.get("task") not in (None, t.name):
            raise ConfigError(f"{predictions}: predictions of a {ident.get('task')} run ({run_dir}), not {t.name}")
    if data_root is None:
        if ident is None:
            raise ConfigError(f"--data-root is needed: {predictions} is not inside a fourm-eval run directory "
                              "(no run.json beside or above it) to take the data root from")
        data_root = Path(ident["data_root"])
        err_console.print(f"data root from the run ({run_dir / 'run.json'}): {data_root}", highlight=False,
                          markup=False)
    if ident is not None:
        try:
            now = t.data_identity(Path(data_root))
        except FourmEvalError:
            now = None
        if now is not None and ident.get("data_root") and Path(ident["data_root"]) == Path(data_root):
            changed = sorted(k for k in now if k in ident and ident[k] != now[k])
            if changed:
                err_console.print(f"WARNING: the data at {data_root} changed since the run ({', '.join(changed)} "
                                  "differ from its run.json): scores need not match its record", highlight=False,
                                  markup=False, style="yellow")
    state = predictions_state(predictions)
    if state is not None:
        if not state:
            err_console.print(f"WARNING: {predictions}: its meta.json does not say which iteration's model these "
                              "predictions are from (an older fourm-eval, or a run stopped while writing them)",
                              highlight=False, markup=False, style="yellow")
        elif not state.get("complete", True):
            err_console.print(f"WARNING: {predictions}: the evaluation at iteration {state.get('iteration')} was "
                              "interrupted while writing these files; they may mix two evaluations",
                              highlight=False, markup=False, style="yellow")
        elif not state.get("final"):
            err_console.print(f"WARNING: {predictions}: predictions of iteration {state.get('iteration')} of "
                              f"{state.get('max_iters')}, not of the final model (the run has not finished)",
                              highlight=False, markup=False, style="yellow")
        else:
            err_console.print(f"predictions of iteration {state.get('iteration')} (the final model"
                              + (", evaluation only" if state.get("eval_only") else "") + ")", highlight=False,
                              markup=False)
    def say(line: str) -> None:
        err_console.print(line, highlight=False, markup=False, style="yellow" if line.startswith("WARNING") else None)

    metrics = clean_metrics(t.evaluate(predictions, Path(data_root), protocol=protocol, log=say))
    tbl = Table(title=f"{t.name}: {predictions}")
    tbl.add_column("metric")
    tbl.add_column("value", justify="right")
    for name, v in metrics.items():
        tbl.add_row(name, _fmt_metric(v))
    console.print(tbl)
    for name, v in metrics.items():  # plain lines, full precision, for scripts and CI logs
        print(f"{name} {'nan' if v is None else repr(v)}")
    if out:
        atomic_write_json(out, {"task": t.name, "predictions": str(predictions), "data_root": str(data_root),
                                "protocol": protocol, "metrics": metrics, "predictions_state": state})


@data_app.command("make-mini")
@friendly
def data_make_mini(kind: str = typer.Argument(..., help="Task name or its data kind (see `fourm-eval tasks`)."),
                   out: Path = typer.Argument(..., help="Output folder."),
                   seed: int = typer.Option(0, help="Generator seed (same seed, same bytes).")) -> None:
    """Write a task's small synthetic dataset in the real on-disk layout."""
    from .tasks import get_task

    t = get_task(kind)
    path = t.make_mini(out, seed=seed)
    console.print(f"mini {t.data_kind} dataset for {t.name} written to {path}", highlight=False)


@data_app.command("convert")
@friendly
def data_convert(kind: str = typer.Argument(..., help="Task name or its data kind (see `fourm-eval tasks`)."),
                 paths: list[Path] = typer.Argument(..., help="SOURCES... OUT: the dataset's official release "
                                                              "files, then the output folder (must not exist).")
                 ) -> None:
    """Convert a dataset's official release files into the layout the task reads."""
    from .errors import ConfigError
    from .tasks import get_task

    t = get_task(kind)
    if len(paths) < 2:
        raise ConfigError("expected one or more source files and then the output folder")
    *sources, out = paths
    path = t.convert([s.expanduser() for s in sources], out.expanduser(),
                     log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(f"{t.data_kind} data for {t.name} written to {path}; check it with `fourm-eval data check "
                  f"{t.data_kind} {path}`", highlight=False)


@data_app.command("check")
@friendly
def data_check(kind: str = typer.Argument(..., help="Task name or its data kind (see `fourm-eval tasks`)."),
               root: Path = typer.Argument(..., help="Dataset root.")) -> None:
    """Validate a dataset layout: files, annotations, every image decodes (named errors)."""
    from .data.download import check_dataset  # the code `data download` runs after unpacking

    line = check_dataset(kind, root, log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(f"{line} [green]ok[/]", highlight=False)


def _download_kinds_help() -> str:
    from .data.download import CATALOGUE  # standard library only: cheap at import
    fetched = [k for k, r in CATALOGUE.items() if not r.manual]
    manual = [k for k, r in CATALOGUE.items() if r.manual]
    return (f"{', '.join(fetched)} (downloaded), or their task names; {', '.join(manual)} (licence-gated: prints "
            "the steps, exit status 3).")


@data_app.command("download")
@friendly
def data_download(kind: str = typer.Argument(..., help=_download_kinds_help()),
                  dest: Path = typer.Argument(..., help="Destination folder (downloads go to DEST/.download)."),
                  mirror: Optional[str] = typer.Option(None, "--mirror", envvar="FOURM_EVAL_DATA_MIRROR",
                                                       help="Fetch the same paths from this scheme://host:port "
                                                            "(a path in it is a prefix) instead of the official "
                                                            "host; the checksums still apply."),
                  check: bool = typer.Option(True, "--check/--no-check", help="Run the data check afterwards."),
                  recheck: bool = typer.Option(False, "--recheck", help="Run the data check again on a download "
                                                                        "that already completed."),
                  delete_archives: bool = typer.Option(False, "--delete-archives",
                                                       help="Delete each zip once it is extracted."),
                  retries: int = typer.Option(5, help="Resume a lost connection this many times per file."),
                  progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                                          help="Progress bars (default: when stderr is a terminal)."),
                  ) -> None:
    """Download a public dataset from its official URLs, verify the published checksums, unpack it, check it.

    Partial downloads resume (HTTP Range). A file with a wrong size or checksum is moved to DEST/.download/rejected/ and never used. Files placed by hand in DEST/.download/ are verified, not downloaded. A rerun after success does nothing. ImageNet: prints the steps to run (exit status 3)."""
    from .data.download import MANUAL_EXIT_CODE, download, manual_steps, recipe_for

    recipe = recipe_for(kind)
    if recipe.manual:
        console.print(manual_steps(recipe.kind, dest), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(MANUAL_EXIT_CODE)
    show = progress if progress is not None else bool(getattr(sys.stderr, "isatty", lambda: False)())
    res = download(recipe.kind, dest, mirror=mirror, check=check, recheck=recheck, delete_archives=delete_archives,
                   retries=retries, progress=show,
                   log=lambda m: console.print(m, highlight=False, markup=False, soft_wrap=True),
                   warn=lambda m: err_console.print(m, style="bold yellow", highlight=False, markup=False,
                                                    soft_wrap=True))
    if res.check:
        console.print(f"{res.check} [green]ok[/]", highlight=False)
    console.print(f"data root: {res.data_root}  (use --data-root {res.data_root})", highlight=False)


def _load(dirs: list[Path]):
    from .results import load_records

    records, bad = load_records(dirs)
    for path, why in bad:
        err_console.print(f"[yellow]skipped[/] {path}: {why}", highlight=False)
    return records, bad


@results_app.command("ls")
@friendly
def results_ls(dirs: list[Path] = typer.Argument(..., help="Run directories (searched recursively).")) -> None:
    """One line per valid run, with its cell (the run's identity without the seed) and variant."""
    from .cells import group_records

    records, _ = _load(dirs)
    cells = group_records(records)
    t = Table(title=f"{len(records)} run(s) in {len(cells)} cell(s)")
    for col in ("task", "backbone", "profile", "cell", "variant", "seed", "main metrics", "run dir"):
        t.add_column(col, no_wrap=True)
    from .tasks import metric_info
    for g in cells:
        for seed in sorted(g.seeds):
            sr = g.seeds[seed]
            for rec, run in zip(sr.records, sr.runs):
                mm = []
                for name, v in rec["metrics"].items():
                    info = metric_info(rec["task"], name)
                    if info is not None and info.main:
                        mm.append(f"{name} " + ("n/a" if v is None else f"{v * info.display_scale:.1f}"))
                t.add_row(g.task, g.model["label"], g.profile, g.cell, g.variant() or "-",
                          str(seed) + (f" (repeat {sr.runs.index(run) + 1}/{sr.repeats})" if sr.repeats > 1 else "")
                          + (" eval-only" if rec.get("eval_only") else ""), ", ".join(mm), run)
    console.print(t)
    for g in cells:
        for sr in g.repeated_seeds():
            spreads = {m: sr.spread(m) for m in g.metrics}
            worst = max((v for v in spreads.values() if v is not None), default=None)
            verdict = "agree exactly" if worst == 0 else f"disagree (largest difference {worst:.6g})"
            console.print(f"cell {g.cell} seed {sr.seed}: {sr.repeats} runs {verdict}; counted once",
                          highlight=False)


@results_app.command("show")
@friendly
def results_show(path: Path = typer.Argument(..., help="A run directory or a result.json.")) -> None:
    """Print one record (metrics, backbone, data, provenance)."""
    records, bad = _load([path])
    if not records:
        raise typer.Exit(2)
    for r in records:
        console.print_json(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, default=str))


@results_app.command("export")
@friendly
def results_export(dirs: list[Path] = typer.Argument(..., help="Run directories (searched recursively)."),
                   out: Path = typer.Option(..., "--out", help="Output file: .csv or .parquet.")) -> None:
    """Write the tidy table (one row per run and metric) as CSV or Parquet."""
    from .results import records_frame

    records, _ = _load(dirs)
    df = records_frame(records)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if out.suffix == ".parquet":
        df.to_parquet(tmp, index=False)
    elif out.suffix == ".csv":
        df.to_csv(tmp, index=False)
    else:
        raise typer.BadParameter("--out must end in .csv or .parquet")
    tmp.replace(out)
    console.print(f"{len(df)} rows from {len(records)} run(s) -> {out}")


@app.command()
@friendly
def report(dirs: list[Path] = typer.Argument(..., help="Run directories (searched recursively)."),
           out: Path = typer.Option(..., "--out", help="Output folder for report.md, report.html, tables.tex."),
           pretrain_log: list[Path] = typer.Option([], "--pretrain-log",
                                                   help="4M pre-training log.txt to analyse (repeatable).")) -> None:
    """Paper-style report: Table 1 layout, published numbers, plots, overfitting analyses."""
    from .report import write_report

    from .trajectory import find_trajectories

    records, bad = _load(dirs)
    trajectories = find_trajectories(dirs)
    paths = write_report(records, out, bad=bad, pretrain_logs=list(pretrain_log), trajectories=trajectories)
    print(f"report of {len(records)} run(s): {paths['html']}  (open in a browser; also {paths['md'].name}, "
          f"{paths['tex'].name} in {out})")


@analyze_app.command("scaling")
@friendly
def analyze_scaling(dirs: list[Path] = typer.Argument(None, help="Optional run directories (your own B/L/XL runs).")
                    ) -> None:
    """Metric vs encoder size: XL expected from the B->L trend vs observed (published numbers + your runs
    with the paper profile, one value per cell)."""
    import pandas as pd

    from . import analysis
    from .report import SCALING_HEADER, build_table1, own_scaling_frame, scaling_row

    console.print(analysis.METHODS["scaling"], highlight=False)
    frame = analysis.paper_frame().drop(columns="verified")
    if dirs:
        records, _ = _load(dirs)
        own = own_scaling_frame(build_table1(records))
        console.print(f"your runs: {len(records)} record(s), {len(own)} paper-profile value(s) with B, L or XL "
                      "sizes enter as '<family> (ours)'", highlight=False)
        frame = pd.concat([frame, own], ignore_index=True)
    rows = analysis.scaling_analysis(frame)
    t = Table(title="XL vs the B->L trend, two models (points)")
    for col in SCALING_HEADER[:-1]:
        t.add_column(col)
    for r in rows:
        t.add_row(*scaling_row(r)[:-1])
    console.print(t)
    t2 = Table(title="4M-7: COYO700M minus CC12M (points)")
    for col in ("task", "metric", "B", "L", "XL"):
        t2.add_column(col)
    for d in analysis.data_scale_effect(analysis.paper_frame()):
        t2.add_row(d["task"], d["metric"], *[f"{d[s]:+.1f}" if s in d else "-" for s in ("B", "L", "XL")])
    console.print(t2)


@analyze_app.command("finetune")
@friendly
def analyze_finetune(dirs: list[Path] = typer.Argument(..., help="Run directories.")) -> None:
    """Peak vs final validation metric, and whether train loss kept falling after the peak."""
    from . import analysis
    from .results import model_identity

    console.print(analysis.METHODS["finetune"], highlight=False)
    records, _ = _load(dirs)
    t = Table()
    for col in ("run", "metric", "peak iter", "peak", "final", "gap", "loss slope after peak", "overfitting"):
        t.add_column(col)
    for r in records:
        a = analysis.finetune_analysis(r)
        if a.get("available"):
            s = a["train_loss_slope_after_peak"]
            t.add_row(f"{model_identity(r)['label']} s{r['seed']}", a["metric"], str(a["peak_iter"]),
                      f"{a['peak'] * 100:.1f}", f"{a['final'] * 100:.1f}", f"{a['gap_points']:.1f}",
                      "-" if s is None else f"{s:.2e}", "yes" if a["overfitting"] else "no")
    console.print(t)


def _natural(p: Path) -> list:
    import re
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]


@analyze_app.command("trajectory")
@friendly
def analyze_trajectory(ckpts: list[Path] = typer.Argument(..., help="Checkpoints saved along a pre-training run "
                                                                   "(e.g. checkpoint-*.safetensors), any order."),
                       probe: list[str] = typer.Option(..., "--probe",
                                                       help="TASK:PROFILE of a probe run on each checkpoint "
                                                            "(repeatable): a classification task's knn or "
                                                            "linear-grid profile (or their -smoke)."),
                       out: Path = typer.Option(..., "--out", help="Folder for trajectory.json / .csv / .png and the "
                                                                   "probe runs (rerunning skips finished ones)."),
                       tokens: Optional[str] = typer.Option(None, "--tokens", help="Tokens seen per checkpoint, "
                                                                                 "comma-separated, in the order "
                                                                                 "given (else read from each file)."),
                       pretrain_log: Optional[Path] = typer.Option(None, "--pretrain-log", help="The run's log.txt: "
                                                                   "its held-out loss onset beside the peaks."),
                       data_root: list[str] = typer.Option([], "--data-root", help="TASK=ROOT for a probe's data "
                                                                                   "(default: the mini set)."),
                       seed: int = typer.Option(0, help="Seed of the probe runs."),
                       allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled checkpoints "
                                                                                       "(ml-4m's .pth).")) -> None:
    """Transfer along pre-training: each probe on each checkpoint, its score against tokens seen per model,
    the checkpoint where it peaked, and (with --pretrain-log) the held-out loss onset beside it."""
    from .console import RunConsole
    from .trajectory import METHOD, parse_probe, run_trajectory

    order = sorted(ckpts, key=_natural)
    roots = {}
    for item in data_root:
        k, sep, v = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--data-root {item!r}: write TASK=ROOT")
        roots[k] = v
    toks = [float(t) for t in tokens.split(",")] if tokens else None
    res = run_trajectory(order if toks is None else list(ckpts), [parse_probe(p) for p in probe], out, tokens=toks,
                         pretrain_log=pretrain_log, seed=seed, data_roots=roots, allow_pickle=allow_pickle,
                         say=lambda line: console.print(line, highlight=False, markup=False),
                         console=RunConsole())
    console.print(METHOD, highlight=False)
    t = Table(title=f"transfer along pre-training ({len(res['points'])} probe runs)")
    for col in ("model", "probe", "checkpoint", "tokens seen", "score"):
        t.add_column(col)
    for p in sorted(res["points"], key=lambda p: (p["model"], p["probe"], p["order"])):
        t.add_row(p["model"], p["probe"], Path(p["checkpoint"]).name,
                  "-" if p["tokens_seen"] is None else f"{p['tokens_seen']:.4g}",
                  f"{p['metric']} {p['value'] * 100:.1f}" if isinstance(p["value"], (int, float)) else "-")
    console.print(t)
    for k in res["peaks"]:
        console.print(f"{k['model']} / {k['probe']}: peak at {Path(k['peak_checkpoint']).name} "
                      f"({k['peak_value'] * 100:.1f}), last {k['last_value'] * 100:.1f}, drop {k['drop_points']:.1f} "
                      f"point(s): {'peaked early' if k['peaked_early'] else 'no early peak'}", highlight=False)
    if res.get("pretrain_onset"):
        o = res["pretrain_onset"]
        console.print(f"held-out loss onset ({o['log']}): {o['earliest']} ({o['x']}, {o['modality']})", highlight=False)
    console.print(f"wrote {out / 'trajectory.json'}, trajectory.csv, trajectory.png", highlight=False)


@analyze_app.command("pretrain")
@friendly
def analyze_pretrain(log: Path = typer.Argument(..., help="A 4M pre-training log.txt (JSON lines).")) -> None:
    """Train vs held-out loss per modality; divergence onset; modalities that overfit first."""
    from . import analysis

    console.print(analysis.METHODS["pretrain"], highlight=False)
    res = analysis.pretrain_analysis(analysis.parse_pretrain_log(log))
    t = Table(title=f"held-out set {res['eval_set']}, x = {res['x']}")
    for col in ("modality", "onset", "confirmed at"):
        t.add_column(col)
    for m, i in res["modalities"].items():
        t.add_row(m, "-" if i["onset"] is None else f"{i['onset']:g}",
                  "-" if i["confirmed_at"] is None else f"{i['confirmed_at']:g}")
    console.print(t)
    console.print("overfit first to last: " + (", ".join(res["overfit_order"]) or "none"))


@app.command()
def regress(dirs: list[Path] = typer.Argument(..., help="Run directories with the current results."),
            expected: Path = typer.Option(..., "--expected", help="Expectations JSON (per cell: per-seed values, "
                                                                  "mean, std, n, within-seed noise)."),
            update: bool = typer.Option(False, "--update", help="Write new expectations from these runs."),
            k: Optional[float] = typer.Option(None, help="Standard errors allowed (default: the file's, else 3)."),
            metrics: str = typer.Option("main", help="With --update: 'main' (each task's gated metrics), 'all' "
                                                     "or a comma list."),
            min_seeds: int = typer.Option(3, "--min-seeds", help="With --update: distinct seeds a cell needs."),
            noise_runs: list[Path] = typer.Option(
                [], "--noise-runs", help="With --update: runs of the same cells from perturbed copies of the "
                                         "checkpoint (benchmarks/gate_noise.py): the within-seed noise for the "
                                         "paired rule. Repeat the option for each folder."),
            ignore_unexpected: bool = typer.Option(
                False, "--allow-new", "--ignore-unexpected",
                help="Let runs of cells without an expectation (a new task, profile or setting) pass; they are "
                     "listed as new, not gated.")) -> None:
    """Compare runs with expected scores; exit 1 on a real drop, 0 if none, 2 on unusable input.
    Prints, per gated metric, the allowed drop: the smallest drop the gate detects at this seed count."""
    from .errors import FourmEvalError
    from .regress import DEFAULT_K, build_expected, compare, load_expected, write_expected

    try:
        records, bad = _load(dirs)
        if update:
            noise = _load(noise_runs)[0] if noise_runs else None
            data = build_expected(records, metrics=metrics, k=k if k is not None else DEFAULT_K,
                                  min_seeds=min_seeds, noise_records=noise)
            write_expected(expected, data)
            console.print(f"wrote {len(data['entries'])} expectation(s) for {len(data['cells'])} cell(s) from "
                          f"{len(records)} run(s) to {expected}", highlight=False)
            for e in data["entries"]:
                console.print(f"  {e['task']} {e['metric']}: seeds {sorted(map(int, e['per_seed']))}, mean "
                              f"{e['mean']:.4f}, std " + ("-" if e["std"] is None else f"{e['std']:.4f}")
                              + ", within-seed noise " + ("not measured" if e["noise_std"] is None else
                                                          f"{e['noise_std']:.2g} ({e['noise_df']} df)"),
                              highlight=False)
            raise typer.Exit(0)
        exp = load_expected(expected)
        verdicts = compare(records, exp, k, ignore_unexpected=ignore_unexpected)
    except FourmEvalError as e:
        from rich.markup import escape
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    t = Table(title="regression gate")
    for col in ("task", "backbone", "profile", "metric", "rule", "expected mean (n)", "current mean (n)", "drop",
                "allowed drop", "unpaired rule would allow", "status"):
        t.add_column(col, no_wrap=True)
    for v in verdicts:
        t.add_row(v.task, v.backbone, v.profile, v.metric, v.rule, f"{v.exp_mean:.4f} ({v.exp_n})",
                  f"{v.cur_mean:.4f} ({v.cur_n})", f"{v.drop:+.4f}", f"{v.threshold:.4f}",
                  "-" if v.unpaired_threshold is None else f"{v.unpaired_threshold:.4f}",
                  "[red]REGRESSION[/]" if v.regression else "[green]ok[/]")
    console.print(t)
    for v in verdicts:  # one plain line each, readable in narrow CI logs
        seeds = ", ".join(f"seed {s}: {e:.4f} -> {c:.4f}" for s, (e, c) in sorted(v.per_seed.items()))
        print(f"{'REGRESSION' if v.regression else 'ok'} {v.task}/{v.backbone}/{v.profile} {v.metric} "
              f"[{v.rule}, cell {v.cell}]: expected {v.exp_mean:.4f} (n {v.exp_n}), current {v.cur_mean:.4f} "
              f"(n {v.cur_n}), drop {v.drop:+.4f}, allowed {v.threshold:.4f}"
              + ("" if v.unpaired_threshold is None else f" (unpaired rule: {v.unpaired_threshold:.4f})")
              + f"; {seeds}" + (f"; {v.note}" if v.note else ""))
    print("smallest detectable drop per gated metric at these seed counts (= the allowed drop): "
          + "; ".join(f"{v.task} {v.metric} {v.threshold:.4f} ({v.rule}, n={v.cur_n})"
                      + ("" if v.unpaired_threshold is None else f" vs {v.unpaired_threshold:.4f} unpaired")
                      for v in verdicts))
    from .regress import ungated_cells
    for line in ungated_cells(records, exp):
        print(f"new, not gated (--allow-new): {line}")
    n_bad = sum(v.regression for v in verdicts)
    console.print(f"{n_bad} regression(s) in {len(verdicts)} metric(s)", highlight=False)
    raise typer.Exit(1 if n_bad else 0)


@app.command("sweep")
@friendly
def sweep_cmd(target: str = typer.Argument(..., help="A sweep file (or a shipped sweep's name, e.g. ci, table1); "
                                                     "or `status` followed by the file."),
              file: Optional[str] = typer.Argument(None, help="With `status`: the sweep file."),
              out: Optional[Path] = typer.Option(None, "--out", help="The sweep's folder (default: the file's `out`, "
                                                                    "else runs/sweeps/NAME)."),
              only: list[str] = typer.Option([], "--only", help="Only the cells whose key starts with, or whose name "
                                                                "(task/backbone/profile-sSEED) contains, this "
                                                                "(repeatable)."),
              dry_run: bool = typer.Option(False, "--dry-run", help="List the cells, their state and GPU-hours; open "
                                                                    "no checkpoint or dataset, run nothing."),
              launcher: Optional[str] = typer.Option(None, "--launcher", help="Override the file's launcher: local, "
                                                                              "local-gpus, slurm."),
              gpus: Optional[int] = typer.Option(None, "--gpus", help="local-gpus: GPUs to use, one cell each "
                                                                      "(default: the file's, else every visible one)."),
              wait: bool = typer.Option(True, "--wait/--no-wait", help="slurm: wait for the jobs (default), or submit "
                                                                      "and return (then `sweep status`)."),
              expected: Optional[Path] = typer.Option(None, "--expected", help="Expectations for `regress` after the "
                                                                               "sweep (default: the file's)."),
              report: bool = typer.Option(True, "--report/--no-report", help="Write OUT/report from the finished "
                                                                             "cells at the end."),
              regress: bool = typer.Option(True, "--regress/--no-regress", help="Run `regress` against the "
                                                                                "expectations at the end."),
              watch: bool = typer.Option(False, "--watch", help="status: refresh until no cell runs."),
              json_out: Optional[Path] = typer.Option(None, "--json", help="status: also write every cell's state "
                                                                            "here (JSON)."),
              interval: float = typer.Option(10.0, "--interval", help="status --watch: seconds between refreshes."),
              offline: bool = typer.Option(False, "--offline", help="Never contact the hub: weights from the local "
                                                                    "Hugging Face cache only (HF_HUB_OFFLINE=1), for "
                                                                    "this process and every cell.")
              ) -> None:
    """Run a sweep: every backbone x task x seed cell of FILE as its own resumable `fourm-eval run`; finished
    cells are skipped, partial ones resumed, a failing one does not stop the others. `sweep status FILE`
    shows the cells' states. Ends with the report of the finished cells and `regress` against the file's
    expectations (exit 1 on a failed cell or a regression)."""
    from . import sweep as sw
    from .errors import ConfigError

    if target == "status":
        if not file:
            raise ConfigError("sweep status FILE: name the sweep file")
        spec = sw.load_sweep(file)
        cells = sw.select(sw.expand(spec, (out or sw.default_out(spec)).resolve()), only)
        while True:
            rows = sw.status_rows(cells)
            _sweep_table(spec, rows, f"sweep {spec.name}: {_counts_words(sw.counts(rows))}")
            if json_out:
                json_out.write_text(json.dumps([{**st, "task": c.task, "backbone": c.label, "profile": c.profile,
                                                 "seed": c.seed} for c, st in rows], indent=1, default=str))
            if not watch or not sw.counts(rows).get("running"):
                break
            time.sleep(interval)
        raise typer.Exit(1 if sw.counts(rows).get("failed") else 0)
    if file:
        raise ConfigError(f"sweep {target} {file}: one sweep file at a time (or `sweep status FILE`)")
    spec = sw.load_sweep(target)
    if launcher:
        if launcher not in sw.LAUNCHERS:
            raise ConfigError(f"--launcher {launcher}: one of {', '.join(sw.LAUNCHERS)}")
        spec.launcher["kind"] = launcher
    root = (out or sw.default_out(spec)).resolve()
    cells = sw.select(sw.expand(spec, root), only)
    rows = sw.status_rows(cells)
    if dry_run:
        n_gpu = int(spec.launcher.get("gpus_per_cell", 1))
        hours = {c.key: sw.plan_hours(c, n_gpu) for c in cells}
        _sweep_table(spec, rows, f"sweep {spec.name} (dry run): {len(cells)} cell(s) in {root}; "
                                 f"{_counts_words(sw.counts(rows))}", hours=hours)
        known = [h for h, _ in hours.values() if h is not None]
        console.print(f"planned: {sum(known):.0f} GPU-hours for {len(known)} of {len(cells)} cell(s) "
                      f"(at {n_gpu} GPU(s) per cell; the planner's assumptions: `fourm-eval plan --help`); "
                      "nothing was run", highlight=False)
        raise typer.Exit(0)
    todo = [c for c, st in rows if st["state"] != "done"]
    if offline:
        from .hub import set_offline
        set_offline()
    if todo:  # the weights first, all of them, pinned in the sweep's lock: a missing one stops nothing midway
        fetched, errors = sw.fetch_weights(spec, root, say=lambda line: console.print(line, highlight=False),
                                           labels=sorted({c.label for c in todo}))
        if errors:
            for label, err in errors.items():
                console.print(f"[red]error:[/red] backbone {label}: {err}", highlight=False)
            raise ConfigError(f"weights of {len(errors)} backbone(s) could not be resolved ({', '.join(errors)}); "
                              f"nothing was run. `fourm-eval fetch {spec.path}` fetches them (where there is "
                              "network), or run the others with --only")
        sw.pin_cells(cells, fetched)
        if fetched:
            console.print(f"weights: {len(fetched)} hub file(s) pinned in {sw.lock_path(root)}", highlight=False)
    sw.write_manifest(spec, root, cells)
    console.print(f"sweep {spec.name}: {len(cells)} cell(s) in {root}; {len(cells) - len(todo)} finished (skipped), "
                  f"{len(todo)} to run with launcher {spec.launcher['kind']}", highlight=False)
    say = lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True)  # noqa: E731
    kind = spec.launcher["kind"]
    if todo and kind == "slurm":
        sw.run_slurm(spec, root, todo, say, wait=wait)
        if not wait:
            console.print(f"submitted; follow with: fourm-eval sweep status {spec.path}"
                          + (f" --out {root}" if out else ""), highlight=False)
            raise typer.Exit(0)
    elif todo:
        n = 0
        if kind == "local-gpus":
            import torch
            n = int(gpus or spec.launcher.get("gpus") or torch.cuda.device_count())
            if n < 1:
                raise ConfigError("launcher local-gpus: no CUDA device is visible (use --launcher local)")
        sw.run_local(todo, say, gpus=n)
    rows = sw.status_rows(cells)
    _sweep_table(spec, rows, f"sweep {spec.name}: {_counts_words(sw.counts(rows))}")
    done = [str(c.dir / "result.json") for c, st in rows if st["state"] == "done"]
    rc = 1 if sw.counts(rows).get("failed") else 0
    exe = [sys.executable, "-m", "fourm_eval.cli"]
    if report and done:
        r = subprocess.run(exe + ["report", *done, "--out", str(root / "report")])
        rc = rc or (1 if r.returncode else 0)
    exp = expected or spec.expected
    if regress and exp is not None and done:
        r = subprocess.run(exe + ["regress", *done, "--expected", str(exp)])
        rc = rc or r.returncode
    raise typer.Exit(rc)


@features_app.command("extract")
@friendly
def features_extract(data: str = typer.Option(..., "--data", help="Task whose data to encode (one with image-level "
                                                                  "labels, e.g. the classification tasks)."),
                     backbone: str = typer.Option("4m", help="4m, deit3, mae or a registered name."),
                     checkpoint: Optional[str] = typer.Option(None, help="Weights (file, or hub id OWNER/NAME[@REV]); "
                                                                         "default for 4m: the shipped tiny 4M."),
                     data_root: Optional[Path] = typer.Option(None, help="Dataset root (default: the built-in mini "
                                                                         "dataset)."),
                     profile: str = typer.Option("knn-smoke", help="The probe profile whose crop and transform to use "
                                                                  "(knn, linear-grid, or their -smoke)."),
                     blocks: str = typer.Option("-4,-3,-2,-1", help="0-based blocks (negative from the end), "
                                                                   "comma-separated; the last four serve every grid."),
                     split: str = typer.Option("train,val", help="Splits, comma-separated."),
                     seed: int = typer.Option(0, help="Seed of a random init."),
                     random_init: bool = typer.Option(False, "--random-init", help="The architecture from random "
                                                                                  "init (the probe's baseline)."),
                     model_size: Optional[str] = typer.Option(None, "--model-size", help="Size of a named backbone."),
                     offline: bool = typer.Option(False, "--offline", help="Weights from the local cache only.")
                     ) -> None:
    """Encode a dataset's splits with a frozen encoder into the feature cache (fp16 shards, resumable; keyed by
    the weights' sha256, the data's fingerprint, the transform and the blocks). A second call with the same
    key reads the cache back and opens no image."""
    from .console import RunConsole
    from .tasks.probe_run import extract_command

    if offline:
        from .hub import set_offline
        set_offline()
    extract_command(data, backbone=backbone, checkpoint=checkpoint, data_root=str(data_root) if data_root else None,
                    profile=profile, blocks=_parse_ints(blocks), seed=seed,
                    splits=tuple(x.strip() for x in split.split(",") if x.strip()), random_init=random_init,
                    size=model_size, console=RunConsole())


@app.command("fetch")
@friendly
def fetch_cmd(target: str = typer.Argument(..., help="A sweep file (or a shipped sweep's name, e.g. table1)."),
              out: Optional[Path] = typer.Option(None, "--out", help="The sweep's folder, where the weights lock is "
                                                                    "kept (default: as `fourm-eval sweep`)."),
              offline: bool = typer.Option(False, "--offline", help="Only check the local cache (HF_HUB_OFFLINE=1): "
                                                                    "name every file that is missing.")) -> None:
    """Fetch every hub weights file a sweep needs into the local Hugging Face cache, up front (on a machine
    with network; then copy the cache to an air-gapped cluster). Pins each revision's commit and sha256 in
    the sweep's weights lock; a revision that moved since is an error. Exit 1 when any file is missing."""
    from . import sweep as sw
    from .hub import cache_location, set_offline

    if offline:
        set_offline()
    spec = sw.load_sweep(target)
    root = (out or sw.default_out(spec)).resolve()
    fetched, errors = sw.fetch_weights(spec, root, say=lambda line: console.print(line, highlight=False))
    t = Table(title=f"sweep {spec.name}: weights in {cache_location()}")
    for col in ("backbone", "file", "state", "commit", "sha256", "size"):
        t.add_column(col, no_wrap=col != "state")
    for label in spec.backbones:
        if label in fetched:
            f = fetched[label]
            t.add_row(label, f"{f.repo_id}@{f.revision}:{f.filename}", "downloaded" if f.downloaded else "cached",
                      f.commit[:12], f.sha256[:12], f"{f.size / 1e6:.1f} MB")
        elif label in errors:
            b = spec.backbones[label]
            t.add_row(label, sw.checkpoint_spec(b) if b.get("checkpoint") else "",
                      "[red]MISSING[/red]" if "not in the local" in errors[label] else "[red]ERROR[/red]", "", "", "")
        else:
            b = spec.backbones[label]
            t.add_row(label, str(b.get("checkpoint") or "-"), "local file" if b.get("checkpoint") else "no weights",
                      "", "", "")
    console.print(t)
    for label, err in errors.items():
        console.print(f"[red]error:[/red] backbone {label}: {err}", highlight=False, soft_wrap=True)
    if fetched:
        console.print(f"pinned in {sw.lock_path(root)}", highlight=False)
    if errors:
        console.print(f"{len(errors)} of {len(errors) + len(fetched)} hub file(s) missing or failed", highlight=False)
        raise typer.Exit(1)


def _counts_words(c: dict[str, int]) -> str:
    order = ("done", "running", "partial", "failed", "pending")
    return ", ".join(f"{c[k]} {k}" for k in order if c.get(k)) or "no cells"


def _sweep_table(spec: Any, rows: list, title: str, hours: dict | None = None) -> None:
    from . import sweep as sw

    t = Table(title=title)
    for col in ("cell", "task", "backbone", "profile", "seed", "state") + (("GPU-hours",) if hours else ()) + ("folder",):
        t.add_column(col, no_wrap=col != "state")
    for c, st in rows:
        extra = ()
        if hours:
            h, why = hours[c.key]
            extra = ((f"{h:.0f}" if h >= 10 else f"{h:.1f}") if h is not None else f"- ({why})",)
        where = st["log"] if st["state"] in ("failed", "running") else st["dir"]
        t.add_row(c.key, c.task, c.label, c.profile, str(c.seed), sw.state_words(st), *extra, where)
    console.print(t)


def run() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
