"""The one runner every task uses:

    profile -> backbone -> run directory -> data check -> mmengine Runner
            -> train (step-0 eval, periodic eval, checkpoints) -> predictions -> record

The task (``fourm_eval.tasks.base.Task``) supplies only what it alone knows:
its data check, model, datasets and evaluator, and how evaluator output maps to
the record's metric names. Optimiser (AdamW + layer decay from ``layer_id``),
schedulers, hooks, resume, distributed set-up and the record are here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from fourm_eval.console import RunConsole
from fourm_eval.errors import ConfigError, FourmEvalWarning

from .base import PreparedData, RunContext, Task
from .profiles import apply_overrides, load_profile, resolve_interval, resolve_per_size, resolve_size
from .schema import default, effective_lr, settings_of, size_hw, validate
from .runs import mark_predictions, predictions_state, rank_zero

PREDICTIONS_DIR = "predictions"


def schedule(p: dict[str, Any], n_train: int, world: int) -> dict[str, Any]:
    """Iterations, per-process batch and intervals from the profile's ``schedule`` section."""
    sch = p["schedule"]
    per_gpu, accumulation = batch_split(int(p["batch_size"]), world, p.get("per_gpu_batch"))
    eff_batch = int(p["batch_size"])
    if sch["unit"] == "epoch":
        max_iters = max(1, round(sch["length"] * n_train / eff_batch))
    elif sch["unit"] == "iter":
        max_iters = int(sch["length"])
    else:
        raise ConfigError(f"schedule.unit must be 'epoch' or 'iter', not {sch['unit']!r}")
    val_every = resolve_interval(sch.get("val_interval", max_iters), max_iters, "schedule.val_interval")
    ckpt_every = resolve_interval(sch.get("checkpoint_interval", val_every), max_iters,
                                  "schedule.checkpoint_interval")
    if "warmup_epochs" in sch:  # a warm-up given in epochs of the training set, at this run's batch
        if "warmup_iters" in sch:
            raise ConfigError("schedule: give warmup_iters or warmup_epochs, not both")
        warmup = round(float(sch["warmup_epochs"]) * n_train / eff_batch)
    else:
        warmup = int(sch.get("warmup_iters", default("schedule.warmup_iters")))
    decay = sch.get("decay", default("schedule.decay"))
    if decay not in ("step", "cosine", "poly"):
        raise ConfigError(f"schedule.decay must be 'step' (lr x0.1 at the milestones), 'cosine' or 'poly' "
                          f"(mmseg's: lr x (1 - t)^power), not {decay!r}")
    if decay != "step" and sch.get("milestones"):
        raise ConfigError(f"schedule: milestones apply to decay 'step' only, not to {decay!r}")
    if decay != "poly" and "poly_power" in sch:
        raise ConfigError(f"schedule: poly_power applies to decay 'poly' only, not to {decay!r}")
    power = float(sch.get("poly_power", default("schedule.poly_power")))
    if power <= 0:
        raise ConfigError(f"schedule.poly_power must be positive, not {power}")
    return dict(per_gpu_batch=per_gpu, accumulation=accumulation, eff_batch=eff_batch, max_iters=max_iters, val_interval=val_every,
                checkpoint_interval=ckpt_every, warmup=min(warmup, max_iters), decay=decay,
                milestones=[int(m * max_iters) for m in sch.get("milestones", default("schedule.milestones"))],
                min_lr_ratio=float(sch.get("min_lr_ratio", default("schedule.min_lr_ratio"))),
                **({"poly_power": power} if decay == "poly" else {}))


def batch_split(total: int, world: int, per_gpu: int | None = None) -> tuple[int, int]:
    """(per-process micro-batch, accumulation steps) for the profile's total batch over ``world``
    processes: total = micro-batch x world x accumulation, exactly. Without ``per_gpu`` the whole
    share of each process is one micro-batch. A split that cannot keep the total is an error (the
    total, and with it the learning rate, is never changed silently)."""
    if total < 1 or world < 1:
        raise ConfigError(f"batch_size (the total batch) must be at least 1 and the process count positive, "
                          f"not {total} over {world}")
    if per_gpu is None:
        if total % world:
            raise ConfigError(f"batch_size {total} (the total batch over all processes) does not split evenly over "
                              f"{world} processes; use a process count that divides it, or set per_gpu_batch "
                              f"(--per-gpu-batch) so that per_gpu_batch x {world} x accumulation = {total}")
        return total // world, 1
    per_gpu = int(per_gpu)
    if per_gpu < 1 or total % (per_gpu * world):
        fits = [b for b in range(1, total // world + 1) if total % (b * world) == 0]
        raise ConfigError(f"per_gpu_batch {per_gpu} x {world} process(es) does not divide batch_size {total} (the "
                          f"total batch): accumulation steps must be a whole number. Per-process batches that keep "
                          f"the total: {', '.join(map(str, fits)) or 'none (change the process count)'}")
    return per_gpu, total // (per_gpu * world)


def accumulation_batchnorm_note(model: torch.nn.Module, sched: dict[str, Any]) -> str | None:
    """Accumulated micro-batches give the same gradients as one batch, except through batch
    statistics: a model with BatchNorm layers normalises over each micro-batch. Said, not hidden."""
    bn = sorted({type(m).__name__ for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)})
    if not bn:
        return None
    return (f"gradient accumulation ({sched['accumulation']} steps of {sched['per_gpu_batch']} per process) with "
            f"batch-statistics layers ({', '.join(bn)}): they normalise over each micro-batch, not the total batch "
            f"of {sched['eff_batch']}, so results can differ slightly from an unaccumulated run")


def batch_words(sched: dict[str, Any], world: int) -> str:
    """The batch split in words: total = per process x processes (x accumulation steps)."""
    acc = int(sched.get("accumulation", 1))
    return (f"total batch {sched['eff_batch']} = {sched['per_gpu_batch']} per process x {world} process(es)"
            + (f" x {acc} accumulation steps" if acc > 1 else ""))


def optimizer_cfg(p: dict[str, Any], lr: float) -> dict[str, Any]:
    """The profile's optimiser at peak lr ``lr`` (``effective_lr``): ``adamw`` (default; ``betas``),
    ``sgd`` or ``lars`` (``momentum``)."""
    kind = str(p.get("optimizer", default("optimizer"))).lower()
    wd = float(p["weight_decay"])
    if kind == "adamw":
        return dict(type="AdamW", lr=lr, betas=tuple(p["betas"]), weight_decay=wd)
    if kind == "sgd":
        return dict(type="SGD", lr=lr, momentum=float(p["momentum"]), weight_decay=wd)
    if kind == "lars":  # timm's LARS, trust ratio applied whatever the weight decay (as MoCo v3 / MAE)
        return dict(type="TimmLars", lr=lr, momentum=float(p["momentum"]), weight_decay=wd, always_adapt=True)
    raise ConfigError(f"optimizer must be adamw, sgd or lars, not {kind!r}")


def _loader(ds: dict, batch: int, shuffle: bool, infinite: bool, workers: int, seed: int) -> dict[str, Any]:
    sampler = dict(type="InfiniteSampler", shuffle=shuffle, seed=seed) if infinite else \
        dict(type="DefaultSampler", shuffle=shuffle)
    return dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                pin_memory=torch.cuda.is_available(), sampler=sampler, dataset=ds)


def runner_cfg(task: Task, p: dict[str, Any], parts: dict[str, Any], *, sched: dict[str, Any], work_dir: Path,
               seed: int, launcher: str, eval_only: bool = False,
               vis_backends: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The full mmengine config: the task's parts plus the shared loop, optimiser and hooks.
    ``eval_only``: no training parts (loop, loader, optimiser, schedulers, training hooks)."""
    nw = int(p["num_workers"])
    lr = effective_lr(p, sched["eff_batch"])["lr"]
    amp = p.get("amp", default("amp"))
    use_bf16 = (amp == "bf16" or (amp == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    optim_wrapper = dict(
        type="Bf16OptimWrapper" if use_bf16 else "OptimWrapper",
        optimizer=optimizer_cfg(p, lr),
        constructor="LayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=float(p["layer_decay"]), backbone_attr="backbone.net",
                           head_lr_mult=float(p.get("head_lr_mult", default("head_lr_mult"))),
                           decay_biases=bool(p.get("weight_decay_biases", default("weight_decay_biases"))),
                           table_path=str(work_dir / "param_groups.csv")),
        clip_grad=dict(max_norm=float(p["clip_grad"])) if p.get("clip_grad") else None,
        accumulative_counts=int(sched.get("accumulation", 1)))
    schedulers: list[dict] = []
    if sched["warmup"]:
        schedulers.append(dict(type="LinearLR", start_factor=float(p["schedule"].get(
                                   "warmup_start_factor", default("schedule.warmup_start_factor"))),
                               by_epoch=False, begin=0, end=sched["warmup"]))
    if sched["milestones"]:
        schedulers.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=sched["max_iters"],
                               milestones=sched["milestones"], gamma=0.1))
    if sched.get("decay") == "cosine" and sched["warmup"] < sched["max_iters"]:
        # half a cosine from the end of the warm-up to min_lr_ratio x lr (default 0) at the last iteration
        schedulers.append(dict(type="CosineAnnealingLR", by_epoch=False, begin=sched["warmup"],
                               end=sched["max_iters"], eta_min_ratio=sched.get("min_lr_ratio", 0.0)))
    if sched.get("decay") == "poly" and sched["warmup"] < sched["max_iters"]:
        # mmseg's PolyLR from the end of the warm-up: lr x (1 - t/T)^power down to eta_min, which mmengine
        # takes as one absolute lr for every parameter group (mmseg's configs: 0 or 1e-4); here
        # min_lr_ratio x the profile's lr
        schedulers.append(dict(type="PolyLR", by_epoch=False, begin=sched["warmup"], end=sched["max_iters"],
                               power=sched["poly_power"], eta_min=lr * sched.get("min_lr_ratio", 0.0)))
    hooks = [dict(type="FiniteLossHook"), dict(type="CheckpointStateHook", keep=int(p.get("max_keep_ckpts", default("max_keep_ckpts")))),
             dict(type="EvalHistoryHook", out_file=str(work_dir / "eval_history.jsonl")),
             dict(type="IsolateEvalRngHook"),
             dict(type="ResumeMissedEvalHook", history_file=str(work_dir / "eval_history.jsonl"),
                  val_interval=sched["val_interval"], max_iters=sched["max_iters"])]
    if p.get("eval_at_start", default("eval_at_start")):
        hooks.append(dict(type="EvalAtStartHook", out_file=str(work_dir / "eval_step0.json")))
    cuda = torch.cuda.is_available()
    run_name = f"fourm-eval-{task.name}-{os.getpid()}-{time.time_ns()}"  # this run's mmengine instances
    cfg = dict(
        default_scope=task.mm_scope,
        work_dir=str(work_dir),
        model=parts["model"],
        train_dataloader=_loader(parts["train_dataset"], sched["per_gpu_batch"], True, True, nw, seed),
        val_dataloader=_loader(parts["val_dataset"], int(p.get("val_batch_size", default("val_batch_size"))), False, False, nw, seed),
        val_evaluator=parts["val_evaluator"],
        train_cfg=dict(type="AccumulatingIterBasedTrainLoop", max_iters=sched["max_iters"],
                       val_interval=sched["val_interval"], accumulation=int(sched.get("accumulation", 1))),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=int(p.get("log_interval", default("log_interval"))), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # keeps every checkpoint; CheckpointStateHook prunes old ones once a newer one is complete
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=sched["checkpoint_interval"],
                            max_keep_ckpts=-1, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=hooks,
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if cuda else "gloo")),
        log_processor=dict(type="LogProcessor", window_size=int(p.get("log_interval", default("log_interval"))), by_epoch=False),
        # mmengine keeps one logger / visualizer instance per name for the process; a name of this run's own
        # (not the second it started, mmengine's default) keeps a second run in one process (the Python
        # API, a notebook) from writing its log and scalars into the first run's directory
        experiment_name=run_name,
        visualizer=dict(type="Visualizer", vis_backends=vis_backends or [dict(type="LocalVisBackend")],
                        name=run_name),
        log_level="INFO",
        load_from=None,
        resume=True,
        launcher=launcher,
        randomness=dict(seed=seed, deterministic=False),
    )
    if eval_only:
        cfg.update(train_dataloader=None, train_cfg=None, optim_wrapper=None, param_scheduler=None,
                   custom_hooks=[dict(type="IsolateEvalRngHook")])
        cfg["default_hooks"] = {k: v for k, v in cfg["default_hooks"].items() if k in ("timer", "logger")}
    return cfg


def run_context(task: Task, p: dict[str, Any], data: PreparedData, *, name: str, checkpoint: str | None,
                info: dict[str, Any], options: dict[str, Any], world: int, seed: int, predictions_dir: Path,
                allow_pickle: bool = False, num_heads: int | None = None) -> RunContext:
    """The one object :meth:`Task.runner_parts` receives (see :class:`RunContext` for each field)."""
    backbone_cfg = dict(name=name, checkpoint=checkpoint, allow_pickle=allow_pickle,
                        drop_path_rate=float(p["drop_path"]), grad_checkpointing=bool(p.get("grad_checkpointing")),
                        **options)
    if num_heads is not None:
        backbone_cfg["num_heads"] = int(num_heads)
    from fourm_eval.lora import backbone_cfg_extra
    backbone_cfg.update(backbone_cfg_extra(p))  # finetune: lora (adapters injected after the weights load)
    if not name.startswith("4m"):
        h, w = size_hw(p["image_size"])
        backbone_cfg["img_size"] = h if h == w else (h, w)
    return RunContext(profile=p, data=data, backbone_cfg=backbone_cfg, embed_dim=int(info["embed_dim"]),
                      num_layers=int(info["num_layers"]), schedule=schedule(p, data.n_train, world), seed=seed,
                      predictions_dir=Path(predictions_dir))


def resolve_run_profile(task: Task, profile: str, sets: list[str] | None, info: dict[str, Any],
                        size: str | None) -> tuple[dict[str, Any], str | None]:
    """The profile with overrides applied and per-size values resolved for the backbone."""
    p = apply_overrides(load_profile(task.name, profile), sets or [], declared=settings_of(task))
    if sets:
        validate(p, task, f"{p['profile_file']} with --set {' '.join(sets)}")
    bsize, note = resolve_size(info["embed_dim"], info["num_layers"], size)
    p = resolve_per_size(p, bsize)
    p["model_size"] = bsize
    from fourm_eval.lora import resolve_finetune
    p = resolve_finetune(p, p.get("profile_file", profile))  # full: no finetune section (records unchanged)
    if p.get("pre_stage", 0) is None:  # null: no stage, as absent (records of single-stage runs unchanged)
        p.pop("pre_stage")
    return p, note


def run(task: Task, *, backbone: str = "4m", checkpoint: str | None = None, data_root: str | Path | None = None,
        profile: str = "smoke", work_dir: str | Path | None = None, seed: int = 0, sets: list[str] | None = None,
        skip_bad_images: bool = False, allow_pickle: bool = False, launcher: str = "none",
        size: str | None = None, random_init: bool = False, num_heads: int | None = None,
        console: RunConsole | None = None, dry_run: bool = False,
        init_from: str | Path | None = None, eval_from: str | Path | None = None,
        loggers: list[str] | None = None, gpu_memory: float | str | None = "auto",
        stage_data_root: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate ``task``; returns the result record (also written to result.json).
    A profile with a ``pre_stage`` runs that stage first (``stage_data_root``: its data), in
    ``WORK_DIR/stage-<task>``, and starts from its final weights (:func:`_pre_stage`).
    ``dry_run``: resolve and print the plan (profile, data, subsets, schedule, time estimate) only.
    ``init_from``: a finished run directory whose final weights the model starts from (every tensor
    whose name and shape fit; recorded in the record's provenance), e.g. a chained intermediate stage.
    ``eval_from``: evaluate only, no training: a run directory (its final checkpoint, with the run's
    own settings), one of its ``iter_N.pth``, or a checkpoint file of this command's model; the
    record and predictions are marked evaluation-only.
    ``loggers``: extra mmengine visualizer backends ("tensorboard", "wandb"); default: the profile's
    ``loggers`` (none).
    ``gpu_memory``: bytes (or '80GB') per GPU the planner's estimate must fit (``fourm_eval.plan.check_fit``);
    "auto": the CUDA device's memory, no check without CUDA; None: no check.
    An interrupt (SIGINT, SIGTERM) prints where the run stopped and how to resume, then raises
    :class:`RunInterrupted`."""
    from .state import launcher_env

    launcher_env(launcher)  # rank and world size before the schedule, the run directory and the console
    console = console or RunConsole()
    if not rank_zero():  # one voice per run: other ranks only log to the run directory
        from fourm_eval.console import _devnull
        console = RunConsole(out=_devnull(), force_plain=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", FourmEvalWarning)  # printed by the console and kept in the record
        try:
            record, wd = _run(task, backbone=backbone, checkpoint=checkpoint, data_root=data_root, profile=profile,
                              work_dir=work_dir, seed=seed, sets=sets, skip_bad_images=skip_bad_images,
                              allow_pickle=allow_pickle, launcher=launcher, size=size, random_init=random_init,
                              num_heads=num_heads, console=console, dry_run=dry_run, init_from=init_from,
                              eval_from=eval_from, loggers=loggers, gpu_memory=gpu_memory,
                              stage_data_root=stage_data_root)
        finally:
            console.close()
    if wd is not None and caught and rank_zero():
        with open(wd / "library-warnings.log", "a") as f:
            for w in caught:
                f.write(f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})\n")
    return record


class RunInterrupted(Exception):
    """The run stopped on SIGINT / SIGTERM; its checkpoints are kept, and the same command resumes."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


@contextlib.contextmanager
def _interrupts() -> Any:
    """SIGTERM (Slurm preemption, `kill`) raises like SIGINT does, so the run can say where it stopped."""
    import signal

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signum)

    old = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _resume_command(wd: Path) -> str:
    """The command that resumes this run: the one that started it, with its run directory stated."""
    import shlex

    args = list(sys.argv[1:]) if sys.argv[1:2] == ["run"] else None
    if args is None:
        return f"the same call again with work_dir={str(wd)!r}"
    if "--work-dir" not in args and not any(a.startswith("--work-dir=") for a in args):
        args += ["--work-dir", str(wd)]
    return "fourm-eval " + shlex.join(args)


def _run(task: Task, *, backbone: str, checkpoint: str | None, data_root: str | Path | None, profile: str,
         work_dir: str | Path | None, seed: int, sets: list[str] | None, skip_bad_images: bool, allow_pickle: bool,
         launcher: str, size: str | None, random_init: bool, num_heads: int | None,
         console: RunConsole, dry_run: bool = False, init_from: str | Path | None = None,
         eval_from: str | Path | None = None, loggers: list[str] | None = None,
         gpu_memory: float | str | None = None,
         stage_data_root: str | Path | None = None) -> tuple[dict[str, Any], Path | None]:
    from fourm_eval.backbones import backbone_info
    from fourm_eval.checkpoints import locate_checkpoint
    from fourm_eval.results import device_description

    from .runs import (Invocations, RunDir, checkpoint_digest, eval_source, init_from_source, resolve_backbone_name,
                       write_result)
    from .state import allow_mmengine_checkpoint_types, init_distributed_cpu

    started = time.time()
    given = dict(backbone=backbone, checkpoint=checkpoint, seed=seed, skip_bad_images=skip_bad_images,
                 allow_pickle=allow_pickle, launcher=launcher, size=size, random_init=random_init,
                 num_heads=num_heads, console=console, loggers=loggers, gpu_memory=gpu_memory)
    src = eval_source(eval_from, task) if eval_from is not None else None
    if src is not None and init_from is not None:
        raise ConfigError("--eval-only evaluates trained weights; --init-from starts a training from them: "
                          "pass one of them")
    if src is not None and src["run"] is not None:  # the source run's own settings, exactly
        ident = src["run"]
        backbone, checkpoint, seed = ident["backbone"], ident["checkpoint"], int(ident["seed"])
        random_init = checkpoint is None
        skip_bad_images, num_heads = bool(ident.get("skip_bad_images")), ident.get("num_heads")
        data_root = data_root if data_root is not None else ident["data_root"]
    name, checkpoint = resolve_backbone_name(backbone, size, checkpoint, random_init)
    hub_record = None
    if checkpoint:
        located, hub_record = locate_checkpoint(checkpoint, say=console.line)
        ckpt_path = str(located)
    else:
        ckpt_path = None
    if num_heads is not None and not name.startswith("4m"):
        raise ConfigError("--num-heads applies to 4M checkpoints without config metadata only")
    info = backbone_info(name, ckpt_path, allow_pickle, num_heads=num_heads)
    warns = list(info.get("load_notes") or [])
    if src is not None and src["run"] is not None:
        p, size_note = dict(src["run"]["profile"]), None
    else:
        p, size_note = resolve_run_profile(task, profile, sets, info, size)
    if loggers is not None:
        p["loggers"] = list(loggers)
    if size_note:
        warns.append(size_note)
    stage = p.get("pre_stage") if src is None else None
    stage_task = _stage_task(task, stage, init_from, data_root, stage_data_root) if stage else None
    if src is None and not stage and sets:
        declared = load_profile(task.name, profile).get("pre_stage")
        if declared:
            warns.append(f"profile {p['profile']} (protocol {p.get('protocol')}) runs the stage {declared['task']} / "
                         f"{declared['profile']} first; --set removed it, so this run is its last stage alone and "
                         f"its numbers are not protocol {p.get('protocol')}'s")
    for note in warns:
        console.warn(note)
    options = task.backbone_options(p, name, info)
    world = int(os.environ.get("WORLD_SIZE", "1")) if launcher != "none" else 1
    from .probe_run import is_probe
    if src is None and not is_probe(p):  # refuse, before anything is built, a training that cannot fit the GPU
        from fourm_eval import plan
        plan.check_fit(task, p, name, info, options, world=world, gpu_memory=plan.resolve_gpu_memory(gpu_memory))

    if data_root is None:
        data_root = task.default_data_root()
    root = Path(data_root).expanduser().resolve()
    init_src = init_from_source(init_from) if init_from is not None else None
    if stage_task is not None and init_src is not None:  # a finished run of the stage, given: the stage is done
        init_src["stage"] = _stage_entry(stage_task, stage, Path(init_from), init_src)
    if dry_run and is_probe(p):
        console.line(f"{task.name} / {p['profile']} ({p['profile_file']}): {p['mode']} on frozen features of {name} "
                     f"({info['params'] / 1e6:.1f}M params), data {root}; features extracted once into the feature "
                     f"cache, then the probe; nothing was run")
        return {}, None
    if dry_run:
        if stage_task is not None and init_src is None:
            console.line(f"stage 1 of 2: {stage_task.name} --profile {stage['profile']} (pre_stage of "
                         f"{p['profile_file']})")
            _run(stage_task, **given, data_root=stage_data_root, profile=stage["profile"], work_dir=None,
                 sets=_execution_sets(sets), dry_run=True)
            console.line(f"stage 2 of 2: {task.name} --profile {p['profile']}, from stage 1's final weights")
        _dry_run(task, p, root, name, info, world, console)
        return {}, None
    if src is not None and work_dir is None:
        work_dir = src["default_work_dir"]
    wd = RunDir.create(work_dir, task.name, name, p["profile"] + ("-eval-only" if src else ""), seed)
    identity = {"task": task.name, "backbone": name, "checkpoint": ckpt_path, "data_root": str(root),
                "profile": {k: v for k, v in p.items() if k != "loggers"}, "seed": seed, "world_size": world,
                "skip_bad_images": skip_bad_images, **task.data_identity(root)}
    if num_heads is not None:
        identity["num_heads"] = int(num_heads)
    if init_src is not None:
        identity["init_from"] = {k: init_src[k] for k in ("run_dir", "sha256")}
    if src is not None:
        identity["eval_only"] = {"checkpoint": src["checkpoint"], "sha256": src["sha256"]}
    wd.claim(identity)  # refuses a directory that holds a different run
    done = wd.finished_result()
    if done is not None:
        console.line(f"{wd.path} already holds a finished run; result.json left as it is")
        return done, None
    if stage_task is not None and init_src is None:  # run (or resume, or find finished) the stage first
        stage_wd = wd.path / f"stage-{stage_task.name}"
        console.line(f"stage 1 of 2: {stage_task.name} --profile {stage['profile']} in {stage_wd}")
        _run(stage_task, **given, data_root=stage_data_root, profile=stage["profile"], work_dir=stage_wd,
             sets=_execution_sets(sets))
        init_src = init_from_source(stage_wd)
        init_src["stage"] = _stage_entry(stage_task, stage, stage_wd, init_src, relative_to=wd.path)
        console.line(f"stage 2 of 2: {task.name} --profile {p['profile']}, from stage 1's final weights")
    sha = checkpoint_digest(ckpt_path) if ckpt_path else None
    data = checked_data(task, root, p, skip_bad_images=skip_bad_images, out_dir=wd.path / "data", console=console)
    if src is not None and src["run"] is not None:
        _check_same_data(src, data, root, warns, console)

    task.register_mm()
    from .probe_run import run_probe
    if is_probe(p) and src is None:  # frozen features from the feature cache, then kNN or the linear grid
        if init_src is not None:
            raise ConfigError(f"mode {p['mode']}: probes the encoder as given (--checkpoint); --init-from is not "
                              "supported for it")
        return run_probe(task, p, data, wd, name=name, ckpt_path=ckpt_path, sha=sha, info=info, seed=seed,
                         warns=warns, console=console, started=started, hub_record=hub_record,
                         allow_pickle=allow_pickle, num_heads=num_heads), wd.path
    if "mmcv ops" in task.requires and torch.cuda.is_available():  # before the model is built: do they run here?
        from fourm_eval.doctor import require_device_ops
        require_device_ops(task.name, f"cuda:{torch.cuda.current_device()}")
    allow_mmengine_checkpoint_types()
    from mmengine.config import Config
    from mmengine.runner import Runner

    ctx = run_context(task, p, data, name=name, checkpoint=ckpt_path, info=info, options=options, world=world,
                      seed=seed, predictions_dir=wd.path / PREDICTIONS_DIR, allow_pickle=allow_pickle,
                      num_heads=num_heads)
    sched, pred_dir = ctx.schedule, ctx.predictions_dir
    parts = task.runner_parts(ctx)
    vis_backends, logger_record = resolve_loggers(p.get("loggers") or [], wd.path, task.name, name, seed)
    cfg = runner_cfg(task, p, parts, sched=sched, work_dir=wd.path, seed=seed, launcher=launcher,
                     eval_only=src is not None, vis_backends=vis_backends)
    wrapper = init_distributed_cpu(launcher)
    if wrapper:
        cfg["model_wrapper_cfg"] = wrapper
    resume_from = wd.resume_checkpoint() if src is None else None
    if resume_from is not None:
        cfg["resume"], cfg["load_from"] = True, str(resume_from)
    else:
        cfg["resume"] = False
    start_iter = int(resume_from.stem.split("_")[1]) if resume_from is not None else 0
    console.header([
        ("task", f"{task.name}: {task.title}"),
        ("backbone", f"{name}, {info['params'] / 1e6:.1f}M params, "
                     + (f"{ckpt_path} (sha256 {sha[:12]})" if ckpt_path else "random init")),
        ("data", f"{root}: {data.n_train} training / {data.n_val} validation images"),
        ("profile", f"{p['profile']} ({p['profile_file']}), seed {seed}, model size {p['model_size']}"),
        ("schedule", f"{sched['max_iters']} iterations at {batch_words(sched, world)}, "
                     f"{p['image_size']} px, {lr_words(effective_lr(p, sched['eff_batch']))}, layer decay "
                     f"{p['layer_decay']}")
        if src is None else ("evaluation only", f"{src['checkpoint']} (iteration {src['iteration']} of "
                                                f"{sched['max_iters']}; sha256 {src['sha256'][:12]}), no training"),
        ("device", device_description()),
        ("work dir", str(wd.path) + (f" (resuming from {resume_from.name})" if resume_from else "")),
    ] + ([("pre-stage", _stage_words(init_src["stage"]))] if init_src and init_src.get("stage") else []) + ([("loggers", ", ".join(f"{r['name']} ({r.get('dir') or r.get('mode')})" for r in logger_record))]
         if logger_record else []))
    invocations = Invocations(wd, start_iter, started)
    runner = None
    try:
        with _interrupts(), console.quiet_libraries():
            runner = Runner.from_cfg(Config(cfg))
            if src is None and sched["accumulation"] > 1:
                note = accumulation_batchnorm_note(getattr(runner.model, "module", runner.model), sched)
                if note:
                    warns.append(note)
                    console.warn(note)
            if src is not None:
                final, history = _evaluate_only(runner, task, src, pred_dir, sched, console, invocations)
                step0, train_end, init_record = None, {}, None
            else:
                final, step0, history, train_end, init_record = _train(
                    runner, task, data, p, sched, wd, pred_dir, console, invocations, init_src, resume_from)
    except KeyboardInterrupt as e:
        import signal
        signum = int(e.args[0]) if e.args and isinstance(e.args[0], int) else int(signal.SIGINT)
        reached = _iter_of(runner, start_iter)
        invocations.finish(f"interrupted ({signal.Signals(signum).name})", reached)
        from .state import complete_checkpoints
        ckpts = complete_checkpoints(wd.path)
        where = (f"resume from {ckpts[0]}" if ckpts else "no checkpoint yet, so it restarts from the beginning")
        msg = (f"interrupted ({signal.Signals(signum).name}) at iteration {reached} of {sched['max_iters']}; "
               f"{where} with: {_resume_command(wd.path)}")
        if rank_zero():
            console.close()
            console.line(msg)
        raise RunInterrupted(signum, msg) from None
    except BaseException as e:
        invocations.finish(f"error ({type(e).__name__}: {str(e)[:200]})", _iter_of(runner, start_iter))
        raise
    record: dict[str, Any] = {}
    if rank_zero():
        from fourm_eval.lora import finish_run
        finetune = finish_run(runner, wd.path) if src is None else None  # LoRA: merged backbone, record entry
        eval_only = None
        if src is not None:
            eval_only = {"source_run": src["run_dir"], "checkpoint": src["checkpoint"], "weights_sha256": src["sha256"],
                         "iteration": src["iteration"], "final": src["iteration"] == sched["max_iters"]}
        record = write_result(
            wd, task=task.name, profile=p["profile"], seed=seed, metrics=final, metrics_step0=step0,
            backbone={"name": name, "family": info["family"], "init": "checkpoint" if ckpt_path else "random",
                      "checkpoint": ckpt_path, "sha256": sha, **({"hub": hub_record} if hub_record else {}),
                      "params": info["params"], "architecture": info["config"],
                      "file_format": info.get("file_format"), "config_source": info.get("config_source"),
                      "config_guessed": info.get("config_guessed") or {}, "options": options,
                      **_loaded_backbone(runner)},
            warnings=warns, dataset=data.record,
            config={**p, "schedule_resolved": sched, "world_size": world, **_lr_record(p, sched)},
            eval_history=history, predictions=PREDICTIONS_DIR, started=started, train_end=train_end,
            provenance_extra={**({"init_from": init_record} if init_record else {}),
                              **({"loggers": logger_record} if logger_record else {}),
                              **({"sweep_cell": os.environ["FOURM_EVAL_SWEEP_CELL"]}
                                 if os.environ.get("FOURM_EVAL_SWEEP_CELL") else {})},
            invocations=invocations, eval_only=eval_only, finetune=finetune)
        _closing_table(console, task, final, step0, started, wd.path, record)
    return record, wd.path


def _stage_task(task: Task, stage: dict[str, Any], init_from: str | Path | None, data_root: str | Path | None,
                stage_data_root: str | Path | None) -> Task:
    """The task of a profile's ``pre_stage``, checked before anything runs."""
    from . import get_task

    st = get_task(str(stage["task"]))
    if st.name == task.name:
        raise ConfigError(f"pre_stage.task = {stage['task']!r}: a stage of another task is expected (the run itself is "
                          f"{task.name})")
    sp = load_profile(st.name, str(stage["profile"]))
    if sp.get("pre_stage"):
        raise ConfigError(f"pre_stage {st.name} / {stage['profile']} has a pre_stage of its own; one stage is supported")
    if init_from is None and data_root is not None and stage_data_root is None:
        raise ConfigError(f"the profile runs the stage {st.name} / {stage['profile']} first, on its own data: pass "
                          f"--stage-data-root ({st.data_kind}: `fourm-eval data check {st.name} ROOT` checks it), or "
                          f"--init-from a finished {st.name} run of that profile")
    return st


def _stage_entry(stage_task: Task, stage: dict[str, Any], stage_dir: Path, init_src: dict[str, Any],
                 relative_to: Path | None = None) -> dict[str, Any]:
    """What the record keeps of the stage: task, profile, directory, cell, metrics, record hash. A run
    given with --init-from stands in for the stage only if it is a finished run of it."""
    import hashlib

    from fourm_eval.cells import identity as cell_identity

    rec_path = Path(stage_dir) / "result.json"
    rec = json.loads(rec_path.read_text())
    if rec.get("task") != stage_task.name or rec.get("profile") != stage["profile"]:
        raise ConfigError(f"--init-from {stage_dir}: a {rec.get('task')} / {rec.get('profile')} run, but the profile's "
                          f"pre_stage is {stage_task.name} / {stage['profile']}; pass a finished run of the stage, or "
                          "--set pre_stage=null to start this single stage from another run")
    ident = cell_identity(rec)
    where = Path(stage_dir).resolve()
    return {"task": stage_task.name, "profile": stage["profile"], "protocol": (rec.get("config") or {}).get("protocol"),
            "work_dir": str(where.relative_to(relative_to.resolve())) if relative_to is not None else str(where),
            "cell": ident["cell"], "settings_sha256": ident["settings_sha256"], "seed": rec.get("seed"),
            "metrics": rec.get("metrics"), "dataset_root": (rec.get("dataset") or {}).get("root"),
            "record_sha256": hashlib.sha256(rec_path.read_bytes()).hexdigest()}


def _execution_sets(sets: list[str] | None) -> list[str] | None:
    """The --set overrides that say how a run executes, not what it is (per_gpu_batch, num_workers, ...:
    ``fourm_eval.cells.EXECUTION_KEYS``): they apply to a pre-stage too; the others are the last stage's."""
    from fourm_eval.cells import EXECUTION_KEYS

    out = [s for s in sets or [] if s.split("=", 1)[0].strip() in EXECUTION_KEYS]
    return out or None


def _stage_words(st: dict[str, Any]) -> str:
    m = ", ".join(f"{k} {v:.4f}" for k, v in (st.get("metrics") or {}).items() if isinstance(v, (int, float)))
    return f"{st['task']} / {st['profile']} ({st['work_dir']}): {m or 'no metrics'}; cell {st['cell']}"


def _iter_of(runner: Any, default: int) -> int:
    loop = getattr(runner, "_train_loop", None) if runner is not None else None
    return int(getattr(loop, "iter", default)) if loop is not None and not isinstance(loop, dict) else default


def _train(runner: Any, task: Task, data: Any, p: dict[str, Any], sched: dict[str, Any], wd: Any, pred_dir: Path,
           console: RunConsole, invocations: Any, init_src: dict[str, Any] | None, resume_from: Path | None):
    """Train (resuming where a checkpoint exists), make sure the predictions on disk are the final
    model's, and return (final metrics, step-0 metrics, evaluation history, train-end scalars,
    init-from record)."""
    from . import mm
    from .runs import load_init_weights

    max_iters = sched["max_iters"]
    runner.register_hook(mm.BeforeTrainCheck(lambda r: task.verify_runner(r, data)))
    runner.register_hook(mm.ConsoleProgressHook(console, max_iters, lambda m: _summary(task, task.record_metrics(m))))
    runner.register_hook(mm.HeartbeatHook(invocations.heartbeat))
    runner.register_hook(mm.PredictionsStateHook(str(pred_dir), max_iters))
    if os.environ.get("FOURM_EVAL_KILL_AT"):  # preemption tests only
        runner.register_hook(mm.FaultInjectionHook(os.environ["FOURM_EVAL_KILL_AT"]))
    init_record = None
    if init_src is not None:
        init_record = dict(init_src)
        if resume_from is None:  # a resumed run has these weights (trained further) in its checkpoint
            init_record.update(load_init_weights(getattr(runner.model, "module", runner.model), init_src))
            wd.write_json("init_from.json", init_record)
        else:
            init_record.update(wd.read_json("init_from.json") or {})
        console.line(f"initialised from {init_src['run_dir']} ({Path(init_src['checkpoint']).name}, "
                     f"{init_record.get('loaded_tensors', '?')} tensors)")
    runner.train()
    train_end = _train_end_scalars(runner, int(p.get("log_interval", default("log_interval"))))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written the evaluation history; all ranks now agree on it
    history = wd.eval_history()
    state = predictions_state(pred_dir)
    if (not history or history[-1]["iter"] != max_iters or not state
            or state.get("iteration") != max_iters or not state.get("complete")):
        runner.val_loop.run()  # the final model's evaluation, and its predictions, are what a record holds
        history = wd.eval_history()
    if rank_zero():
        mark_predictions(pred_dir, final=True)
    invocations.heartbeat(max_iters, force=True)
    final = task.record_metrics(history[-1]["metrics"])
    step0_raw = wd.read_json("eval_step0.json")
    step0 = task.record_metrics(step0_raw) if step0_raw else None
    hist = [{"iter": h["iter"], "metrics": task.record_metrics(h["metrics"])} for h in history]
    return final, step0, hist, train_end, init_record


def _evaluate_only(runner: Any, task: Task, src: dict[str, Any], pred_dir: Path, sched: dict[str, Any],
                   console: RunConsole, invocations: Any):
    """Load the trained weights (every tensor of the model, strictly) and evaluate once."""
    from . import mm
    from .runs import load_trained_weights

    it = int(src["iteration"])
    runner.register_hook(mm.ConsoleProgressHook(console, sched["max_iters"],
                                                lambda m: _summary(task, task.record_metrics(m)), iteration=it))
    runner.register_hook(mm.PredictionsStateHook(str(pred_dir), sched["max_iters"], iteration=it, eval_only=True))
    load_trained_weights(getattr(runner.model, "module", runner.model), src)
    metrics = runner.val()
    if rank_zero():
        mark_predictions(pred_dir, final=it == sched["max_iters"])
    invocations.heartbeat(it, force=True)
    final = task.record_metrics(metrics)
    return final, [{"iter": it, "metrics": final}]


def _check_same_data(src: dict[str, Any], data: Any, root: Path, warns: list[str], console: RunConsole) -> None:
    """An evaluation-only run on other data than its source run's trained on says so."""
    if Path(src["run"]["data_root"]) != root:
        warns.append(f"evaluated on {root}, not on the data of the source run ({src['run']['data_root']})")
    rec = src.get("record") or {}
    theirs = {k: v for k, v in (rec.get("dataset") or {}).items() if k != "root"}
    ours = {k: v for k, v in data.record.items() if k != "root"}
    if theirs and theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        warns.append(f"the data differs from the source run's record in: {', '.join(diff)}")
    for w in warns[-2:]:
        if "source run" in w:
            console.warn(w)


def resolve_loggers(names: list[str], work_dir: Path, task: str, backbone: str, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """mmengine visualizer backends for the requested loggers, beside the always-on local one, and
    what the record says of them. ``tensorboard`` needs the tensorboard package; ``wandb`` needs
    wandb installed and configured (WANDB_API_KEY, a ``wandb login``, or WANDB_MODE=offline)."""
    import importlib.util

    backends: list[dict[str, Any]] = [dict(type="LocalVisBackend")]
    record: list[dict[str, Any]] = []
    for raw in names:
        name = str(raw).strip().lower()
        if name in ("", "local"):
            continue
        if name == "tensorboard":
            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("logger tensorboard: the tensorboard package is not installed (pip install "
                                  "tensorboard; `make setup` installs it)")
            backends.append(dict(type="TensorboardVisBackend"))
            record.append({"name": "tensorboard", "dir": "<timestamp>/vis_data (events.out.tfevents.*)",
                           "view": f"tensorboard --logdir {work_dir}"})
        elif name == "wandb":
            if importlib.util.find_spec("wandb") is None:
                raise ConfigError("logger wandb: Weights & Biases is not installed (pip install wandb, then "
                                  "`wandb login`, or set WANDB_MODE=offline to log locally)")
            mode = os.environ.get("WANDB_MODE", "online")
            if mode not in ("offline", "disabled", "dryrun") and not _wandb_configured():
                raise ConfigError("logger wandb: not configured: no WANDB_API_KEY and no `wandb login` "
                                  "(~/.netrc entry for api.wandb.ai); log in, or set WANDB_MODE=offline")
            project = os.environ.get("WANDB_PROJECT", "fourm-eval")
            backends.append(dict(type="WandbVisBackend", init_kwargs=dict(
                project=project, name=f"{task}-{backbone}-seed{seed}", dir=str(work_dir))))
            record.append({"name": "wandb", "project": project, "mode": mode})
        else:
            raise ConfigError(f"unknown logger {raw!r}: choose tensorboard or wandb (the local JSON log is "
                              "always written)")
    return backends, record


def _wandb_configured() -> bool:
    import netrc

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def checked_data(task: Task, root: Path, p: dict[str, Any], *, skip_bad_images: bool, out_dir: Path | None,
                 console: RunConsole) -> PreparedData:
    """The task's data check, with the image decodes of an unchanged dataset taken from the cache of an
    earlier check (``fourm_eval.data.checks.image_check_cache``); its time and counts go to the console."""
    from fourm_eval.data.checks import image_check_cache

    t0 = time.time()
    with image_check_cache(root) as cache:
        data = task.check_data(root, p, skip_bad_images=skip_bad_images, out_dir=out_dir, log=console.line,
                               progress=_progress(console))
    console.line(cache.summary(time.time() - t0))
    return data


def _dry_run(task: Task, p: dict[str, Any], root: Path, name: str, info: dict[str, Any], world: int,
             console: RunConsole) -> None:
    """The plan of a run without running it: the data is checked (nothing is written)."""
    data = checked_data(task, root, p, skip_bad_images=False, out_dir=None, console=console)
    sched = schedule(p, data.n_train, world)
    images = sched["max_iters"] * sched["eff_batch"]
    scoring = task.scoring(p) if hasattr(task, "scoring") else None
    rows = [("task", f"{task.name} ({p['profile_file']})"),
            ("protocol", f"{p.get('protocol')}" + (f"; scored by {scoring}" if scoring else "")),
            ("backbone", f"{name}, {info['params'] / 1e6:.1f}M params, model size {p['model_size']}"),
            ("data", f"{root}: {data.n_train} training / {data.n_val} validation images"),
            ("subsets", ", ".join(f"{k}: {v['n']} images, seed {v['seed']}" for k, v in
                                  (data.record.get("subsets") or {}).items()) or "none (all images)"),
            ("schedule", f"{sched['max_iters']} iterations x batch {sched['eff_batch']} ({batch_words(sched, world)}) "
                         f"= {images} training images ({images / max(data.n_train, 1):.1f} "
                         f"epochs); warm-up {sched['warmup']}, "
                         + {"cosine": "cosine decay",
                            "poly": f"poly decay (power {sched.get('poly_power')})"}.get(
                             sched.get("decay"), f"lr steps at {sched['milestones']}")),
            ("learning rate", lr_words(effective_lr(p, sched["eff_batch"]))),
            ("optimiser", f"{optimizer_cfg(p, 0.0)['type']}, weight decay {p['weight_decay']}, layer decay "
                          f"{p['layer_decay']}, drop path {p['drop_path']}"),
            ("evaluation", f"every {sched['val_interval']} iterations, checkpoints every "
                           f"{sched['checkpoint_interval']}")]
    est = p.get("s_per_image_estimate")
    if est:
        hours = images * float(est) / 3600
        rows.append(("time estimate", f"about {hours:.1f} h ({images} images x {est} s/image, the profile's "
                                      "s_per_image_estimate; see its comment for the source)"))
    console.header(rows)
    from fourm_eval.cells import flatten
    console.line(f"resolved settings of protocol {p.get('protocol')} (profile {p['profile']}, model size "
                 f"{p['model_size']}):")
    for k, v in flatten({k: v for k, v in p.items() if k not in ("profile_file", "loggers")}).items():
        console.line(f"  {k} = {v}")
    console.line("dry run: nothing was trained or written")


def lr_words(lr: dict[str, Any]) -> str:
    """``effective_lr`` in words: base lr, total batch and the peak lr."""
    if lr["blr"] is not None:
        return (f"base lr (blr) {lr['blr']:g} per 256 images x total batch {lr['total_batch']} / 256 = peak lr "
                f"{lr['lr']:g}")
    return f"peak lr {lr['lr']:g} as written (lr; total batch {lr['total_batch']}, not rescaled)"


def _lr_record(p: dict[str, Any], sched: dict[str, Any]) -> dict[str, Any]:
    """The record's ``lr_resolved`` where the profile writes blr (with lr the config holds the peak lr itself)."""
    if p.get("blr") is None:
        return {}
    lr = effective_lr(p, sched["eff_batch"])
    return {"lr_resolved": {k: lr[k] for k in ("blr", "total_batch", "lr")}}


def _progress(console: RunConsole) -> Callable[[str, int, int], None]:
    """A (label, done, total) callback for data checks: one short-lived phase per label."""
    open_: set[str] = set()

    def cb(label: str, done: int, total: int) -> None:
        if label not in open_:
            console.start(label, label, total, plain_lines=False)
            open_.add(label)
        console.advance(label, done)
        if done >= total:
            console.finish(label)
            open_.discard(label)
    return cb


def _summary(task: Task, metrics: dict[str, float]) -> str:
    shown = [m for m in task.headline_metrics if m.name in metrics]
    return "  ".join(f"{m.name} {metrics[m.name]:.4f}" for m in shown) or "(no metrics)"


def _closing_table(console: RunConsole, task: Task, final: dict[str, float], step0: dict[str, float] | None,
                   started: float, wd: Path, record: dict[str, Any]) -> None:
    from fourm_eval.results import peak_memory_mb

    rows = []
    for m in task.headline_metrics:
        if m.name not in final:
            continue
        s0 = (step0 or {}).get(m.name)
        change = "" if s0 is None else f"{final[m.name] - s0:+.4f}"
        rows.append([m.name, "-" if s0 is None else f"{s0:.4f}", f"{final[m.name]:.4f}", change,
                     "higher is better" if m.higher_is_better else "lower is better"])
    console.table(f"{task.name}: " + ("evaluation only" if record.get("eval_only") else "after training vs step 0"),
                  ["metric", "step 0", "final", "change", ""], rows)
    mem = peak_memory_mb()
    logs = record.get("files", {}).get("scalars") or []
    log_files = sorted(str(p) for p in wd.glob("*/*.log"))
    console.header([
        ("wall time", _wall_text(record, started)),
        ("peak memory", ", ".join(f"{k.replace('_mb', '')} {v:.0f} MB" for k, v in mem.items())),
        ("result", str(wd / "result.json")),
        ("predictions", f"{wd / PREDICTIONS_DIR}  (re-score: fourm-eval evaluate {task.name} --predictions "
                        f"{wd / PREDICTIONS_DIR} --data-root ...)"),
        ("logs", ", ".join(log_files[-1:] + [str(wd / s) for s in logs[-1:]]) or str(wd)),
    ])
    if record.get("warnings"):
        console.warn(f"{len(record['warnings'])} warning(s) recorded in result.json: see its 'warnings'")


def _wall_text(record: dict[str, Any], started: float) -> str:
    prov = record.get("provenance") or {}
    runs = prov.get("invocations") or []
    if len(runs) > 1:
        return (f"{prov['wall_time_s']:.0f} s over {len(runs)} invocations (this one {time.time() - started:.0f} s; "
                "the run was resumed)")
    return f"{time.time() - started:.0f} s"


def _train_end_scalars(runner: Any, window: int) -> dict[str, Any]:
    """The training losses and accuracies the model logged, averaged over the last ``window``
    iterations (e.g. mmdet's sampled-RoI classification accuracy ``acc``, in percent)."""
    out: dict[str, float] = {}
    skip = ("lr", "time", "data_time", "memory", "grad_norm")
    for key, buf in runner.message_hub.log_scalars.items():
        name = key.removeprefix("train/")
        if not key.startswith("train/") or name in skip or name.startswith("base_lr"):
            continue
        try:
            out[name] = round(float(buf.mean(window)), 6)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
    return {"window_iters": window, "values": dict(sorted(out.items()))} if out else {}


def _loaded_backbone(runner: Any) -> dict[str, Any]:
    """What the built backbone says about its weights file (e.g. the baselines' recognised layout)."""
    model = getattr(runner.model, "module", runner.model)
    net = getattr(getattr(model, "backbone", None), "net", None)
    desc = net.describe() if hasattr(net, "describe") else {}
    out = {k: desc[k] for k in ("layout",) if desc.get(k) is not None}
    if desc.get("load_notes"):
        out["load_notes"] = list(desc["load_notes"])
    return out
