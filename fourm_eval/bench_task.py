"""``fourm-eval bench task``: training speed, memory and FLOP/s of a task's real model.

The model, optimiser and data are built as ``fourm-eval run`` builds them (the task's ``runner_parts``,
the shared ``runner_cfg``, mmengine's Runner, the built-in mini data at the profile's resolution);
then ``warmup`` + ``iters`` training iterations (forward, backward, optimiser step: mmengine's
``train_step``, as the training loop calls it) are timed on pre-loaded batches, so data loading is
not timed. FLOPs of one iteration are counted with ``torch.utils.flop_counter.FlopCounterMode``
(with the CPU fused attention kernels it lacks formulas for added). Beside each measurement: the
planner's (``fourm_eval.plan``) estimate of the same configuration's iteration time at its assumed
utilisation, and the utilisation the measurement implies.

On CPU each measurement runs in a fresh process (peak RSS growth is then the measurement's own).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import ConfigError


def _cpu_attention_flops() -> dict[Any, Callable[..., int]]:
    """FlopCounterMode formulas for the CPU flash-attention kernels (torch counts the CUDA ones only)."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten

    def fwd(query, key, value, *args, out_val=None, **kw):
        return sdpa_flop_count(query, key, value)  # FlopCounterMode passes shapes

    def bwd(grad_out, query, key, value, *args, out_val=None, **kw):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    out: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = fwd
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return out


def count_flops(fn: Callable[[], Any], module_name: str | None = None) -> tuple[float, dict[str, float]]:
    """(total FLOPs of ``fn()``, FLOPs per module name as FlopCounterMode reports them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, depth=None, custom_mapping=_cpu_attention_flops()) as fc:
        fn()
    per = {k: float(sum(v.values())) for k, v in fc.get_flop_counts().items()}
    return float(fc.get_total_flops()), per


def _rss_bytes() -> float:
    with open("/proc/self/statm") as f:
        return float(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_flops(device: str) -> tuple[float, str]:
    """The peak FLOP/s the utilisation is measured against: the data sheet's for a known GPU (bf16 where
    it has it: ``plan.PEAKS``), else this device's own fp32 matmul throughput (2048^2 matmuls, best of 5)."""
    import torch

    from .plan import PEAKS

    if device == "cuda":
        name = torch.cuda.get_device_name().lower()
        for key, peaks in PEAKS.items():
            if key in name:
                bf16 = torch.cuda.is_bf16_supported()
                return peaks["bf16" if bf16 else "fp32"], f"{key.upper()} data sheet ({'bf16' if bf16 else 'fp32'})"
    n = 2048
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best, f"measured fp32 matmul throughput of this {device.upper()} ({n}x{n})"


def _build(task: Any, backbone: str, profile: str, sets: list[str], work: Path) -> dict[str, Any]:
    """The task's model, optimiser and training batches as ``run`` builds them."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    from .backbones import backbone_info
    from .tasks.runner import resolve_run_profile, run_context, runner_cfg
    from .tasks.runs import resolve_backbone_name
    from .tasks.state import allow_mmengine_checkpoint_types

    name, ckpt = resolve_backbone_name(backbone, None, None, random_init=backbone.lower() != "4m")
    info = backbone_info(name, ckpt)
    p, _ = resolve_run_profile(task, profile, sets, info, None)
    options = task.backbone_options(p, name, info)
    data = task.check_data(task.default_data_root(), p, skip_bad_images=False, out_dir=work / "data",
                           log=lambda s: None)
    task.register_mm()
    allow_mmengine_checkpoint_types()
    ctx = run_context(task, p, data, name=name, checkpoint=ckpt, info=info, options=options, world=1, seed=0,
                      predictions_dir=work / "predictions")
    cfg = runner_cfg(task, p, task.runner_parts(ctx), sched=ctx.schedule, work_dir=work, seed=0, launcher="none")
    cfg["log_level"] = "WARNING"
    runner = Runner.from_cfg(Config(cfg))
    optim = runner.build_optim_wrapper(runner.optim_wrapper)
    loader = runner.build_dataloader(runner._train_dataloader, seed=0)
    return dict(name=name, info=info, profile=p, options=options, runner=runner, optim=optim, loader=loader,
                batch=ctx.schedule["per_gpu_batch"])


def measure(task_name: str, backbone: str = "4m", profile: str = "smoke", iters: int = 5, warmup: int = 1,
            sets: list[str] | None = None, work: Path | None = None) -> dict[str, Any]:
    """One measurement in this process (see the module's docstring); returns its JSON record."""
    import torch

    from . import plan
    from .tasks import get_task

    if iters < 1 or warmup < 0:
        raise ConfigError(f"--iters must be >= 1 and --warmup >= 0 (got {iters}, {warmup})")
    task = get_task(task_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="fourm-bench-") as tmp:
        b = _build(task, backbone, profile, list(sets or []), Path(work or tmp))
        model, optim = b["runner"].model, b["optim"]
        it = iter(b["loader"])
        batches = [next(it) for _ in range(warmup + iters + 1)]  # pre-loaded: data loading is not timed
        model.train()

        def step(batch: Any) -> None:
            model.train_step(batch, optim_wrapper=optim)

        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for batch in batches[:warmup]:
            step(batch)
        sync()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = float(torch.cuda.memory_allocated())
        else:
            base = _rss_bytes()
        t0 = time.perf_counter()
        for batch in batches[warmup:warmup + iters]:
            step(batch)
        sync()
        dt = (time.perf_counter() - t0) / iters
        if device == "cuda":
            peak_mem, mem_kind = float(torch.cuda.max_memory_allocated()), "CUDA max allocated (peak)"
            growth = peak_mem - base
        else:
            peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
            growth, mem_kind = max(peak_mem - base, 0.0), "process peak RSS growth over the timed iterations"
        flops, per_module = count_flops(lambda: step(batches[-1]))
        # the backbone's forward alone, at the batch's input size (FlopCounterMode, counted again)
        net = getattr(getattr(model, "backbone", None), "net", None)
        inputs = model.data_preprocessor(batches[-1], True)["inputs"]
        bb_fwd = None
        if net is not None and isinstance(inputs, torch.Tensor):
            with torch.no_grad():
                bb_fwd, _ = count_flops(lambda: net(inputs.float()))
        p = b["profile"]
        arch = plan.build_arch(b["name"], info=b["info"], image_size=p["image_size"], options=b["options"])
        bf16 = isinstance(optim, __import__("mmengine").optim.AmpOptimWrapper)
        est = plan.estimate(task, p, arch, gpus=1, gpu_memory=None, options=b["options"],
                            per_gpu_batch=b["batch"] if b["batch"] != int(p["batch_size"]) else None, bf16=bf16,
                            n_train=getattr(task, "reference_train_images", None) or 1)
        peak, peak_src = peak_flops(device)
        util = plan.UTILISATION
        plan_iter_flops = est["flops"]["per_image"] * b["batch"]
        return {
            "task": task.name, "backbone": b["name"], "profile": p["profile"], "device": device,
            "image_size": p["image_size"], "batch": b["batch"], "iters": iters, "warmup": warmup,
            "precision": "bf16 autocast" if bf16 else "fp32",
            "s_per_iter": dt, "iters_per_s": 1 / dt, "images_per_s": b["batch"] / dt,
            "peak_memory_bytes": peak_mem, "memory_growth_bytes": growth, "memory_kind": mem_kind,
            "flops_per_iter": flops, "achieved_flops_per_s": flops / dt,
            "backbone_forward_flops": bb_fwd, "backbone_input_shape": list(inputs.shape) if bb_fwd else None,
            "planner": {"backbone_flops_per_iter": plan_iter_flops,
                        "backbone_forward_flops_per_image": est["flops"]["forward_per_image"],
                        "peak_flops": peak, "peak_source": peak_src, "utilisation_assumed": util,
                        "s_per_iter_estimate": plan_iter_flops / (peak * util),
                        "implied_utilisation": plan_iter_flops / (dt * peak),
                        "counted_utilisation": flops / (dt * peak),
                        "memory_estimate_bytes": est["memory"]["total"]},
        }


def run_bench(tasks: list[str], backbones: list[str], profile: str = "smoke", iters: int = 5, warmup: int = 1,
              fresh_process: bool = True, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every (task, backbone): a record each, each measured in a fresh process when ``fresh_process``."""
    from .tasks import all_tasks

    registry = all_tasks()
    probes = [n for n, t in registry.items() if getattr(t, "probe_only", False)]
    if tasks == ["all"]:
        names = [n for n in registry if n not in probes]
        if probes:
            log(f"not measured: {', '.join(probes)} (frozen-feature probes: no training iteration to time)")
    else:
        asked = [n for n in tasks if n in probes]
        if asked:
            raise ConfigError(f"bench task measures training iterations; {', '.join(asked)} is a frozen-feature "
                              "probe with none (time its run instead: `fourm-eval run TASK` prints its seconds)")
        names = tasks
    out = []
    for t in names:
        for bb in backbones:
            log(f"measuring {t} / {bb} / {profile}: {warmup} warm-up + {iters} timed iterations ...")
            if not fresh_process:
                out.append(measure(t, bb, profile, iters, warmup))
                continue
            with tempfile.TemporaryDirectory(prefix="fourm-bench-") as tmp:
                res = Path(tmp) / "record.json"
                cmd = [sys.executable, "-m", "fourm_eval.bench_task", t, bb, profile, str(iters), str(warmup), str(res)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode != 0:
                    raise ConfigError(f"bench task {t} / {bb}: the measurement process failed "
                                      f"(exit {r.returncode}):\n{r.stderr[-3000:]}")
                out.append(json.loads(res.read_text()))
    return out


def table_rows(records: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = ["task", "backbone", "px", "batch", "device", "it/s", "img/s", "memory", "GFLOP/iter",
            "achieved GFLOP/s", "planner s/iter", "measured s/iter", "implied util.", "counted util."]
    rows = []
    for r in records:
        pl = r["planner"]
        rows.append([r["task"], r["backbone"], str(r["image_size"]), str(r["batch"]), r["device"],
                     f"{r['iters_per_s']:.2f}", f"{r['images_per_s']:.1f}",
                     f"{(r['peak_memory_bytes'] if r['device'] == 'cuda' else r['memory_growth_bytes']) / 2**20:.0f} MB",
                     f"{r['flops_per_iter'] / 1e9:.2f}",
                     f"{r['achieved_flops_per_s'] / 1e9:.1f}",
                     f"{pl['s_per_iter_estimate']:.3f}", f"{r['s_per_iter']:.3f}",
                     f"{100 * pl['implied_utilisation']:.1f}%", f"{100 * pl['counted_utilisation']:.1f}%"])
    return cols, rows


if __name__ == "__main__":  # one measurement in a fresh process: TASK BACKBONE PROFILE ITERS WARMUP OUT.json
    t_, b_, p_, i_, w_, o_ = sys.argv[1:7]
    Path(o_).write_text(json.dumps(measure(t_, b_, p_, int(i_), int(w_)), indent=2))
