"""The one runner every task uses:

    profile -> backbone -> run directory -> data check -> mmengine Runner
            -> train (step-0 eval, periodic eval, checkpoints) -> predictions -> record

The task (``fourm_eval.tasks.base.Task``) supplies only what it alone knows:
its data check, model, datasets and evaluator, and how evaluator output maps to
the record's metric names. Optimiser (AdamW + layer decay from ``layer_id``),
schedulers, hooks, resume, distributed set-up and the record are here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fourm_eval.errors import ConfigError

from .base import Task
from .profiles import apply_overrides, load_profile, resolve_interval, resolve_per_size, resolve_size

PREDICTIONS_DIR = "predictions"


def schedule(p: dict[str, Any], n_train: int, world: int) -> dict[str, Any]:
    """Iterations, per-process batch and intervals from the profile's ``schedule`` section."""
    sch = p["schedule"]
    per_gpu = max(1, int(p["batch_size"]) // world)
    eff_batch = per_gpu * world
    if sch["unit"] == "epoch":
        max_iters = max(1, round(sch["length"] * n_train / eff_batch))
    elif sch["unit"] == "iter":
        max_iters = int(sch["length"])
    else:
        raise ConfigError(f"schedule.unit must be 'epoch' or 'iter', not {sch['unit']!r}")
    val_every = resolve_interval(sch.get("val_interval", max_iters), max_iters, "schedule.val_interval")
    ckpt_every = resolve_interval(sch.get("checkpoint_interval", val_every), max_iters,
                                  "schedule.checkpoint_interval")
    return dict(per_gpu_batch=per_gpu, eff_batch=eff_batch, max_iters=max_iters, val_interval=val_every,
                checkpoint_interval=ckpt_every, warmup=min(int(sch.get("warmup_iters", 0)), max_iters),
                milestones=[int(m * max_iters) for m in sch.get("milestones", [])])


def _loader(ds: dict, batch: int, shuffle: bool, infinite: bool, workers: int, seed: int) -> dict[str, Any]:
    sampler = dict(type="InfiniteSampler", shuffle=shuffle, seed=seed) if infinite else \
        dict(type="DefaultSampler", shuffle=shuffle)
    return dict(batch_size=batch, num_workers=workers, persistent_workers=workers > 0,
                pin_memory=torch.cuda.is_available(), sampler=sampler, dataset=ds)


def runner_cfg(task: Task, p: dict[str, Any], parts: dict[str, Any], *, sched: dict[str, Any], work_dir: Path,
               seed: int, launcher: str) -> dict[str, Any]:
    """The full mmengine config: the task's parts plus the shared loop, optimiser and hooks."""
    nw = int(p["num_workers"])
    amp = p.get("amp", "auto")
    use_bf16 = (amp == "bf16" or (amp == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()))
    optim_wrapper = dict(
        type="AmpOptimWrapper" if use_bf16 else "OptimWrapper",
        optimizer=dict(type="AdamW", lr=float(p["lr"]), betas=tuple(p["betas"]), weight_decay=float(p["weight_decay"])),
        constructor="LayerDecayOptimWrapperConstructor",
        paramwise_cfg=dict(layer_decay_rate=float(p["layer_decay"]), backbone_attr="backbone.net",
                           table_path=str(work_dir / "param_groups.csv")),
        clip_grad=dict(max_norm=float(p["clip_grad"])) if p.get("clip_grad") else None)
    if use_bf16:
        optim_wrapper["dtype"] = "bfloat16"
    schedulers: list[dict] = []
    if sched["warmup"]:
        schedulers.append(dict(type="LinearLR", start_factor=0.001, by_epoch=False, begin=0, end=sched["warmup"]))
    if sched["milestones"]:
        schedulers.append(dict(type="MultiStepLR", by_epoch=False, begin=0, end=sched["max_iters"],
                               milestones=sched["milestones"], gamma=0.1))
    hooks = [dict(type="FiniteLossHook"), dict(type="CheckpointStateHook", keep=int(p.get("max_keep_ckpts", 2))),
             dict(type="EvalHistoryHook", out_file=str(work_dir / "eval_history.jsonl"))]
    if p.get("eval_at_start", False):
        hooks.append(dict(type="EvalAtStartHook", out_file=str(work_dir / "eval_step0.json")))
    cuda = torch.cuda.is_available()
    return dict(
        default_scope=task.mm_scope,
        work_dir=str(work_dir),
        model=parts["model"],
        train_dataloader=_loader(parts["train_dataset"], sched["per_gpu_batch"], True, True, nw, seed),
        val_dataloader=_loader(parts["val_dataset"], int(p.get("val_batch_size", 1)), False, False, nw, seed),
        val_evaluator=parts["val_evaluator"],
        train_cfg=dict(type="IterBasedTrainLoop", max_iters=sched["max_iters"], val_interval=sched["val_interval"]),
        val_cfg=dict(type="ValLoop"),
        optim_wrapper=optim_wrapper,
        param_scheduler=schedulers,
        default_hooks=dict(
            timer=dict(type="IterTimerHook"),
            logger=dict(type="LoggerHook", interval=int(p.get("log_interval", 50)), log_metric_by_epoch=False),
            param_scheduler=dict(type="ParamSchedulerHook"),
            # keeps every checkpoint; CheckpointStateHook prunes old ones once a newer one is complete
            checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=sched["checkpoint_interval"],
                            max_keep_ckpts=-1, save_last=True),
            sampler_seed=dict(type="DistSamplerSeedHook")),
        custom_hooks=hooks,
        env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                     dist_cfg=dict(backend="nccl" if cuda else "gloo")),
        log_processor=dict(type="LogProcessor", window_size=int(p.get("log_interval", 50)), by_epoch=False),
        visualizer=dict(type="Visualizer", vis_backends=[dict(type="LocalVisBackend")], name="fourm_eval_vis"),
        log_level="INFO",
        load_from=None,
        resume=True,
        launcher=launcher,
        randomness=dict(seed=seed, deterministic=False),
    )


def resolve_run_profile(task: Task, profile: str, sets: list[str] | None, info: dict[str, Any],
                        size: str | None) -> tuple[dict[str, Any], str | None]:
    """The profile with overrides applied and per-size values resolved for the backbone."""
    p = apply_overrides(load_profile(task.name, profile), sets or [])
    bsize, note = resolve_size(info["embed_dim"], info["num_layers"], size)
    p = resolve_per_size(p, bsize)
    p["model_size"] = bsize
    return p, note


def run(task: Task, *, backbone: str = "4m", checkpoint: str | None = None, data_root: str | Path | None = None,
        profile: str = "smoke", work_dir: str | Path | None = None, seed: int = 0, sets: list[str] | None = None,
        skip_bad_images: bool = False, allow_pickle: bool = False, launcher: str = "none",
        size: str | None = None, random_init: bool = False, num_heads: int | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tune and evaluate ``task``; returns the result record (also written to result.json)."""
    from fourm_eval.backbones import backbone_info
    from fourm_eval.checkpoints import resolve_checkpoint

    from .runs import RunDir, checkpoint_digest, rank_zero, resolve_backbone_name, write_result
    from .state import allow_mmengine_checkpoint_types, init_distributed_cpu

    started = time.time()
    name, checkpoint = resolve_backbone_name(backbone, size, checkpoint, random_init)
    ckpt_path = str(resolve_checkpoint(checkpoint)) if checkpoint else None
    if num_heads is not None and not name.startswith("4m"):
        raise ConfigError("--num-heads applies to 4M checkpoints without config metadata only")
    info = backbone_info(name, ckpt_path, allow_pickle, num_heads=num_heads)
    warnings = list(info.get("load_notes") or [])
    p, size_note = resolve_run_profile(task, profile, sets, info, size)
    if size_note:
        warnings.append(size_note)
    for note in warnings:
        log(f"WARNING: {note}")
    options = task.backbone_options(p, name, info)

    if data_root is None:
        data_root = task.default_data_root()
        log(f"no --data-root: using the built-in mini {task.data_kind} dataset at {data_root}")
    root = Path(data_root).expanduser().resolve()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wd = RunDir.create(work_dir, task.name, name, p["profile"], seed)
    identity = {"task": task.name, "backbone": name, "checkpoint": ckpt_path, "data_root": str(root),
                "profile": p, "seed": seed, "world_size": world, "skip_bad_images": skip_bad_images,
                **task.data_identity(root)}
    if num_heads is not None:
        identity["num_heads"] = int(num_heads)
    wd.claim(identity)  # refuses a directory that holds a different run
    done = wd.finished_result()
    if done is not None:
        log(f"{wd.path} already holds a finished run; result.json left as it is")
        return done
    data = task.check_data(root, p, skip_bad_images=skip_bad_images, out_dir=wd.path / "data", log=log)

    backbone_cfg = dict(name=name, checkpoint=ckpt_path, allow_pickle=allow_pickle,
                        drop_path_rate=float(p["drop_path"]), grad_checkpointing=bool(p.get("grad_checkpointing")),
                        **options)
    if num_heads is not None:
        backbone_cfg["num_heads"] = int(num_heads)
    if not name.startswith("4m"):
        backbone_cfg["img_size"] = int(p["image_size"])

    task.register_mm()
    from . import mm  # noqa: F401 - registers the shared modules, optimiser constructor and hooks
    allow_mmengine_checkpoint_types()
    from mmengine.config import Config
    from mmengine.runner import Runner

    sched = schedule(p, data.n_train, world)
    pred_dir = wd.path / PREDICTIONS_DIR
    parts = task.runner_parts(p, data, backbone_cfg=backbone_cfg, embed_dim=info["embed_dim"], sched=sched,
                              seed=seed, predictions_dir=pred_dir)
    cfg = runner_cfg(task, p, parts, sched=sched, work_dir=wd.path, seed=seed, launcher=launcher)
    wrapper = init_distributed_cpu(launcher)
    if wrapper:
        cfg["model_wrapper_cfg"] = wrapper
    resume_from = wd.resume_checkpoint()
    if resume_from is not None:
        cfg["resume"], cfg["load_from"] = True, str(resume_from)
        log(f"resuming from the last checkpoint in {wd.path} ({resume_from.name})")
    else:
        cfg["resume"] = False
    log(f"{task.name}: {name} ({info['params'] / 1e6:.1f}M params), {sched['max_iters']} iterations at batch "
        f"{sched['eff_batch']}, {p['image_size']} px, layer decay {p['layer_decay']}, work dir {wd.path}")
    runner = Runner.from_cfg(Config(cfg))
    runner.register_hook(mm.BeforeTrainCheck(lambda r: task.verify_runner(r, data)))
    loaded = _loaded_backbone(runner)
    runner.train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 has written the evaluation history; all ranks now agree on it
    history = wd.eval_history()
    if not history or history[-1]["iter"] != sched["max_iters"] or not _has_predictions(pred_dir):
        runner.val_loop.run()
        history = wd.eval_history()
    final = task.record_metrics(history[-1]["metrics"])
    step0 = wd.read_json("eval_step0.json")
    record = None
    if rank_zero():
        record = write_result(
            wd, task=task.name, profile=p["profile"], seed=seed, metrics=final,
            metrics_step0=task.record_metrics(step0) if step0 else None,
            backbone={"name": name, "family": info["family"], "checkpoint": ckpt_path,
                      "sha256": checkpoint_digest(ckpt_path) if ckpt_path else None,
                      "params": info["params"], "architecture": info["config"],
                      "file_format": info.get("file_format"), "config_source": info.get("config_source"),
                      "config_guessed": info.get("config_guessed") or {}, "options": options, **loaded},
            warnings=warnings, dataset=data.record,
            config={**p, "schedule_resolved": sched, "world_size": world},
            eval_history=[{"iter": h["iter"], "metrics": task.record_metrics(h["metrics"])} for h in history],
            predictions=PREDICTIONS_DIR, started=started)
        shown = [m.name for m in task.metrics if m.main or m.gated]
        log("  ".join(f"{m} {final[m]:.4f}" for m in shown if m in final) + f"  -> {wd.path / 'result.json'}")
    return record or {}


def _has_predictions(pred_dir: Path) -> bool:
    return pred_dir.is_dir() and any(pred_dir.iterdir())


def _loaded_backbone(runner: Any) -> dict[str, Any]:
    """What the built backbone says about its weights file (e.g. the baselines' recognised layout)."""
    model = getattr(runner.model, "module", runner.model)
    net = getattr(getattr(model, "backbone", None), "net", None)
    desc = net.describe() if hasattr(net, "describe") else {}
    out = {k: desc[k] for k in ("layout",) if desc.get(k) is not None}
    if desc.get("load_notes"):
        out["load_notes"] = list(desc["load_notes"])
    return out
