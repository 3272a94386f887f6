"""The OpenMMLab pieces every task shares, registered once in mmengine's root
registries (mmdet's and mmseg's registries are its children and find them):

* ``FourmEvalViT``: any fourm-eval backbone as an mm backbone, returning the
  tokens of the chosen blocks as (B, D, h, w) maps, with or without the
  encoder's final norm;
* ``SimpleFeaturePyramid`` (ViTDet) and ``FourmLN2d`` (LayerNorm over channels);
* ``LayerDecayOptimWrapperConstructor``: AdamW groups from the backbone's own
  ``layer_id()`` (never from parameter-name patterns), no weight decay on
  biases, norms and embeddings, the resolved table written to the run dir;
* hooks: evaluation before training (step 0), the evaluation history, a
  finite-loss guard (the last checkpoint stays), and checkpoint state that is
  loadable with ``weights_only=True`` and restores the RNG after a resume.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModule
from mmengine.optim import DefaultOptimWrapperConstructor, OptimWrapper
from mmengine.registry import HOOKS, LOOPS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS
from mmengine.runner import IterBasedTrainLoop

from fourm_eval.errors import ConfigError, FourmEvalError

from .mmreg import register as mm_register
from .state import prune_checkpoints, rng_state, set_rng_state


# ------------------------------------------------------------------ modules
@mm_register(MODELS, "FourmLN2d")
class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map.

    The output is a contiguous NCHW tensor. (A permuted view would be NCHW in shape only: mmcv's
    RoIAlign kernels read the raw memory as NCHW, so RoI features of a channels-last view come out
    scrambled. That made the detector's RoI heads unable to learn classes; see test_mm_modules.)"""

    def __init__(self, num_features: int, eps: float = 1e-6, **_: Any):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2).contiguous()


@mm_register(MODELS)
class FourmEvalViT(BaseModule):
    """A fourm-eval backbone (4M, DeiT III, MAE via ``build_backbone``) as an mm backbone.

    ``out_indices``: 0-based blocks whose tokens are returned as (B, D, h, w) maps
    (default: the last block). ``final_norm``: apply the encoder's final norm to
    them. Without it (ViTDet, UperNet), the parameters after the blocks (layer id
    L+1 inside the backbone) are frozen, so they are neither trained nor decayed and
    DDP sees no unused parameters.

    ``frozen`` (a profile's ``mode: linear``, the linear probes): no parameter of the backbone
    trains (``requires_grad`` off, so the optimiser constructor gives it no group and no state),
    it stays in eval mode (no drop path, no dropout) and its forward runs without autograd --
    the classification kit's linear probe does the same in ``FourmClassifier``."""

    def __init__(self, name: str, checkpoint: str | None = None, allow_pickle: bool = False,
                 out_indices: Sequence[int] = (-1,), final_norm: bool = False,
                 finetune: dict[str, Any] | None = None, frozen: bool = False, **kwargs: Any):
        super().__init__()
        from fourm_eval.backbones import build_backbone

        self.frozen = bool(frozen)
        if self.frozen and finetune and finetune.get("mode") == "lora":
            raise ConfigError("mode: linear freezes the whole backbone; it takes no LoRA adapters "
                              "(finetune.mode: lora): use one or the other")
        if self.frozen:
            kwargs["drop_path_rate"] = 0.0  # frozen and in eval mode: drop path never applies
        self.net = build_backbone(name, checkpoint=checkpoint, allow_pickle=allow_pickle, **kwargs)
        self.out_indices = [int(i) for i in out_indices]
        self.final_norm = bool(final_norm)
        if self.frozen:
            self.net.requires_grad_(False)
            self.net.eval()
        if not self.final_norm:
            for n, p in self.net.named_parameters():
                if self.net.layer_id(n) == self.net.num_layers + 1:
                    p.requires_grad_(False)
        # finetune (the profile's section, LoRA only): adapters on the loaded weights, the rest frozen
        self.lora_info = None
        if finetune and finetune.get("mode") == "lora":
            from fourm_eval.lora import inject
            self.lora_info = inject(self.net, finetune)

    def init_weights(self) -> None:  # weights come from build_backbone; never re-initialise
        pass

    def train(self, mode: bool = True) -> "FourmEvalViT":
        super().train(mode)
        if self.frozen:
            self.net.eval()  # a frozen backbone stays in eval mode
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rows, cols = self.net.grid_size(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            feats = self.net.get_intermediate_layers(x, self.out_indices, norm=self.final_norm)
        return tuple(t.transpose(1, 2).reshape(t.shape[0], -1, rows, cols).contiguous() for t in feats)


@mm_register(MODELS)
class SimpleFeaturePyramid(BaseModule):
    """ViTDet's neck: multi-scale maps from the single stride-16 map."""

    def __init__(self, in_channels: int, out_channels: int, scale_factors=(4.0, 2.0, 1.0, 0.5),
                 num_outs: int = 5, init_cfg=None):
        super().__init__(init_cfg=init_cfg)
        self.stages = nn.ModuleList()
        C = in_channels
        for s in scale_factors:
            if s == 4.0:
                layers: list[nn.Module] = [nn.ConvTranspose2d(C, C // 2, 2, 2), LayerNorm2d(C // 2), nn.GELU(),
                                           nn.ConvTranspose2d(C // 2, C // 4, 2, 2)]
                dim = C // 4
            elif s == 2.0:
                layers, dim = [nn.ConvTranspose2d(C, C // 2, 2, 2)], C // 2
            elif s == 1.0:
                layers, dim = [], C
            elif s == 0.5:
                layers, dim = [nn.MaxPool2d(2, 2)], C
            else:
                raise ConfigError(f"unsupported pyramid scale {s}")
            layers += [nn.Conv2d(dim, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                       nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)]
            self.stages.append(nn.Sequential(*layers))
        self.num_outs = num_outs

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = inputs[0]
        outs = [stage(x) for stage in self.stages]
        while len(outs) < self.num_outs:  # ViTDet's extra level: stride-2 subsampling of the coarsest map
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return tuple(o.contiguous() for o in outs)  # RoI ops read raw NCHW memory


def _register_timm_lars() -> None:
    """timm's LARS in mmengine's optimiser registry (profiles with ``optimizer: lars``)."""
    from mmengine.registry import OPTIMIZERS
    from timm.optim import Lars
    mm_register(OPTIMIZERS, "TimmLars")(Lars)


_register_timm_lars()


# -------------------------------------------------------------- layer decay
def _norm_params(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of normalisation layers (LayerNorm, GroupNorm, BatchNorm, LN2d, ...)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._NormBase)) \
                or type(m).__name__.endswith(("Norm", "Norm2d", "LN2d")):
            out |= {id(p) for p in m.parameters(recurse=False)}
    return out


def layer_decay_groups(model: torch.nn.Module, backbone: torch.nn.Module, backbone_prefix: str, base_lr: float,
                       weight_decay: float, decay_rate: float, head_lr_mult: float = 1.0,
                       decay_biases: bool = False) -> list[dict[str, Any]]:
    """Parameter groups: lr = base_lr * decay**(L + 1 - layer_id), wd 0 for norms, the embeddings the
    backbone names and 1-d parameters (biases), unless ``decay_biases``: then biases outside norm layers
    are decayed (detectron2's rule, ViTDet's configs).

    ``head_lr_mult`` scales the lr of everything outside the backbone (neck and heads, trained from
    scratch); with 1.0 they share the top backbone group's lr."""
    L = backbone.num_layers
    no_wd_names = backbone.no_weight_decay_names() if hasattr(backbone, "no_weight_decay_names") else set()
    norms = _norm_params(model) if decay_biases else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}

    def exempt(p: torch.nn.Parameter) -> bool:  # a 1-d parameter: no decay, except biases with decay_biases
        if p.ndim > 1:
            return False
        return not decay_biases or id(p) in norms

    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(backbone_prefix):
            rel = name[len(backbone_prefix):]
            lid = backbone.layer_id(rel)
            # biases and norm weights (1-d) and the token embeddings the backbone names
            no_wd = exempt(p) or rel in no_wd_names
        else:
            lid = L + 1
            no_wd = exempt(p)
        head = head_lr_mult != 1.0 and not name.startswith(backbone_prefix)
        key = (lid + (1 if head else 0), no_wd)
        if key not in groups:
            scale = head_lr_mult if head else decay_rate ** (L + 1 - lid)
            groups[key] = {"params": [], "param_names": [], "layer_id": lid, "lr_scale": scale,
                           "lr": base_lr * scale, "weight_decay": 0.0 if no_wd else weight_decay}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


def write_group_table(groups: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer_id", "lr_scale", "lr", "weight_decay", "n_tensors", "n_params", "examples"])
        for g in groups:
            w.writerow([g["layer_id"], f"{g['lr_scale']:.6g}", f"{g['lr']:.6g}", g["weight_decay"],
                        len(g["params"]), sum(p.numel() for p in g["params"]), " ".join(g["param_names"][:3])])


@mm_register(OPTIM_WRAPPER_CONSTRUCTORS)
class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """AdamW groups from ``backbone.layer_id``; see :func:`layer_decay_groups`."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        paramwise_cfg = dict(paramwise_cfg or {})
        self.decay_rate = float(paramwise_cfg.pop("layer_decay_rate"))
        self.backbone_attr = paramwise_cfg.pop("backbone_attr", "backbone.net")
        self.table_path = paramwise_cfg.pop("table_path", None)
        self.head_lr_mult = float(paramwise_cfg.pop("head_lr_mult", 1.0))
        self.decay_biases = bool(paramwise_cfg.pop("decay_biases", False))
        super().__init__(optim_wrapper_cfg, None)

    def __call__(self, model: torch.nn.Module):
        from mmengine.registry import OPTIM_WRAPPERS, OPTIMIZERS

        if hasattr(model, "module"):
            model = model.module
        net = model
        for part in self.backbone_attr.split("."):
            net = getattr(net, part)
        cfg = copy.deepcopy(self.optim_wrapper_cfg)
        opt_cfg = copy.deepcopy(self.optimizer_cfg)  # the base class moved it out of the wrapper cfg
        groups = layer_decay_groups(model, net, self.backbone_attr + ".", opt_cfg["lr"],
                                    opt_cfg.get("weight_decay", 0.0), self.decay_rate, self.head_lr_mult,
                                    decay_biases=self.decay_biases)
        if self.table_path:
            write_group_table(groups, Path(self.table_path))
        for g in groups:
            g.pop("param_names")
        opt_cfg["params"] = groups
        optimizer = OPTIMIZERS.build(opt_cfg)
        return OPTIM_WRAPPERS.build(cfg, default_args=dict(optimizer=optimizer))


# -------------------------------------------------------------------- hooks
@mm_register(HOOKS)
class EvalAtStartHook(Hook):
    """Evaluate the untrained model once, before the first iteration (kept across resumes)."""
    priority = "LOW"

    def __init__(self, out_file: str):
        self.out_file = out_file

    def before_train(self, runner) -> None:
        from fourm_eval.results import atomic_write_json
        if Path(self.out_file).exists() or runner.iter > 0:
            return
        metrics = runner.val_loop.run()
        if runner.rank == 0:
            atomic_write_json(self.out_file, {k: float(v) for k, v in (metrics or {}).items()})


@mm_register(HOOKS)
class EvalHistoryHook(Hook):
    """Append every periodic evaluation (iteration, metrics) to a JSON-lines file."""
    priority = "LOW"

    def __init__(self, out_file: str):
        self.out_file = out_file

    def after_val_epoch(self, runner, metrics=None) -> None:
        if runner.rank != 0 or not metrics:
            return
        with open(self.out_file, "a") as f:
            f.write(json.dumps({"iter": runner.iter, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")


class NonFiniteLossError(FourmEvalError):
    """Training produced a NaN or infinite loss."""


@mm_register(HOOKS)
class FiniteLossHook(Hook):
    """Stop with a clear error when the loss is NaN/inf; the last checkpoint stays on disk."""
    priority = "HIGHEST"

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not outputs:
            return
        bad = {k: float(v) for k, v in outputs.items()
               if torch.is_tensor(v) and v.numel() == 1 and not torch.isfinite(v).all()}
        if bad:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {runner.iter + 1}: {bad}. The last checkpoint in "
                f"{runner.work_dir} is kept; lower the learning rate (--set lr=...) or check the data, "
                "then run the same command again to resume from it.")


@mm_register(HOOKS)
class CheckpointStateHook(Hook):
    """Make mmengine checkpoints loadable with ``weights_only=True`` and resumable bit-for-bit.

    * mmengine's message hub pickles ``HistoryBuffer`` objects whose state holds bound
      methods (unpickling them needs ``getattr``, which a weights-only load rightly
      refuses); they are stored as plain arrays and rebuilt on load;
    * python / numpy / torch RNG states are saved, and restored after a resume once the
      train loop has skipped the batches already seen;
    * mmengine prunes old checkpoints *before* writing the new one, so a kill while saving
      could leave none; CheckpointHook keeps all, and old ones are pruned here, after the
      newer checkpoint is complete."""
    priority = "LOWEST"

    def __init__(self, keep: int = 2) -> None:
        self._pending = None
        self.keep = keep

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank == 0:
            prune_checkpoints(Path(runner.work_dir), self.keep)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import HistoryBuffer
        hub = checkpoint.get("message_hub", {})
        scalars = hub.get("log_scalars", {})
        for key, buf in list(scalars.items()):
            if isinstance(buf, HistoryBuffer):
                log, count = buf.data
                scalars[key] = {"__history_buffer__": True, "log": np.asarray(log).tolist(),
                                "count": np.asarray(count).tolist(), "max_length": int(buf.max_length)}
        checkpoint.setdefault("meta", {})["rng_state"] = rng_state()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        from mmengine.logging import HistoryBuffer
        scalars = checkpoint.get("message_hub", {}).get("log_scalars", {})
        for key, val in list(scalars.items()):
            if isinstance(val, dict) and val.get("__history_buffer__"):
                scalars[key] = HistoryBuffer(val["log"], val["count"], val["max_length"])
        self._pending = checkpoint.get("meta", {}).get("rng_state")

    def before_train(self, runner) -> None:
        # The train loop skips the batches already seen by drawing them (their augmentation
        # consumes random numbers), then draws the next batch before any per-iteration hook
        # runs. So the saved state is put back inside the iterator, right after the skip.
        state, self._pending = self._pending, None
        loop = runner.train_loop
        if state and getattr(loop, "_iter", 0) > 0 and hasattr(loop, "dataloader_iterator"):
            loop.dataloader_iterator = _RestoreRngAfter(loop.dataloader_iterator, loop._iter,
                                                        lambda: set_rng_state(state))


@mm_register(HOOKS)
class IsolateEvalRngHook(Hook):
    """Every evaluation leaves the global random streams as it found them.

    An evaluation draws random numbers (a DataLoader iterator takes its base seed from
    torch's global generator, even without workers), and the checkpoint written just
    before it holds the state from before those draws. A run resumed from that checkpoint
    therefore skipped them and left the uninterrupted run's trajectory. With evaluations
    isolated, a run's numbers do not depend on where it was interrupted."""
    priority = "VERY_HIGH"

    def __init__(self) -> None:
        self._saved: dict[str, Any] | None = None

    def before_val_epoch(self, runner) -> None:
        self._saved = rng_state()

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self._saved is not None:
            set_rng_state(self._saved)
            self._saved = None


@mm_register(HOOKS)
class ResumeMissedEvalHook(Hook):
    """After a resume at an evaluation iteration whose evaluation never finished (the run was
    killed during it, or between the checkpoint and it), run that evaluation first, so the
    record's history is the uninterrupted run's. Isolated, it changes no random stream."""
    priority = "LOW"

    def __init__(self, history_file: str, val_interval: int, max_iters: int) -> None:
        self.history_file, self.val_interval, self.max_iters = history_file, val_interval, max_iters

    def before_train(self, runner) -> None:
        it = runner.iter
        if it == 0 or it % self.val_interval or it >= self.max_iters:
            return
        done = set()
        path = Path(self.history_file)
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    done.add(int(json.loads(line)["iter"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue
        if it not in done:
            runner.val_loop.run()


# ------------------------------------------------------------------ bf16 autocast
@mm_register(OPTIM_WRAPPERS, "Bf16OptimWrapper")
class Bf16OptimWrapper(OptimWrapper):
    """Training forward and loss under ``torch.autocast(dtype=bfloat16)`` on the model's device,
    CUDA or CPU (mmengine's AmpOptimWrapper refuses a CPU). bf16 keeps fp32's exponent range, so no
    loss scaling; weights, gradients and optimiser state stay fp32. Evaluation runs in fp32."""

    def optim_context(self, model: nn.Module):
        import contextlib

        device = next((p.device.type for p in model.parameters()), "cpu")
        stack = contextlib.ExitStack()
        stack.enter_context(super().optim_context(model))
        stack.enter_context(torch.autocast(device_type=device, dtype=torch.bfloat16))
        return stack


# ------------------------------------------------------------------ gradient accumulation
@mm_register(LOOPS, "AccumulatingIterBasedTrainLoop")
class AccumulatingIterBasedTrainLoop(IterBasedTrainLoop):
    """mmengine's iteration loop where one iteration is one optimiser step over ``accumulation``
    micro-batches (the total batch of the profile = per-process batch x processes x accumulation).
    The optimiser wrapper's ``accumulative_counts`` does the arithmetic (each micro-batch's loss
    divided by the count, gradients summed, DDP synchronised on the last micro-batch only, one
    step); this loop keeps every hook, interval, scheduler step, checkpoint and resume in units of
    optimiser steps, so a profile's schedule means the same whatever the split. The hooks see the
    micro-batches' log variables averaged, and the last micro-batch as ``data_batch``."""

    def __init__(self, runner, dataloader, max_iters: int, accumulation: int = 1, **kw: Any) -> None:
        super().__init__(runner, dataloader, max_iters, **kw)
        if int(accumulation) < 1:
            raise ConfigError(f"accumulation must be at least 1, not {accumulation}")
        self.accumulation = int(accumulation)

    def run(self) -> Any:
        wrapper = self.runner.optim_wrapper
        if self.accumulation > 1:
            if getattr(wrapper, "_accumulative_counts", 1) != self.accumulation:
                raise ConfigError(f"the optimiser wrapper accumulates {getattr(wrapper, '_accumulative_counts', 1)} "
                                  f"micro-batches, the loop {self.accumulation}: they must agree")
            # Runner.train() counted optimiser steps; the wrapper counts micro-batches
            wrapper.initialize_count_status(self.runner.model, self._iter * self.accumulation,
                                            self._max_iters * self.accumulation)
            # a resumed run: the base loop skips one batch per finished step (after the before_train
            # hooks, whose order of random draws stays as it is); the first iteration skips the rest
            self._resume_skip = self._iter * (self.accumulation - 1)
        return super().run()

    def run_iter(self, data_batch: Sequence[dict]) -> None:
        if self.accumulation == 1:
            return super().run_iter(data_batch)
        if getattr(self, "_resume_skip", 0):
            # the batch the base loop drew is at position `iter`; the step's first is at iter x accumulation
            for _ in range(self._resume_skip - 1):
                next(self.dataloader_iterator)
            data_batch, self._resume_skip = next(self.dataloader_iterator), 0
        self.runner.call_hook("before_train_iter", batch_idx=self._iter, data_batch=data_batch)
        sums: dict[str, Any] = {}
        for k in range(self.accumulation):
            if k:
                data_batch = next(self.dataloader_iterator)
            out = self.runner.model.train_step(data_batch, optim_wrapper=self.runner.optim_wrapper)
            for name, v in out.items():
                sums[name] = sums.get(name, 0) + v
        outputs = {name: v / self.accumulation for name, v in sums.items()}
        self.runner.call_hook("after_train_iter", batch_idx=self._iter, data_batch=data_batch, outputs=outputs)
        self._iter += 1


class FaultInjectionHook(Hook):
    """Kills the process (SIGKILL, as a preemption does) at a named point, for resume tests:
    ``after_checkpoint:N`` (iteration N's checkpoint is complete), ``during_eval:N`` (inside
    the evaluation at iteration N), ``after_iter:N``; ``...:N:SIGINT`` (or another signal name)
    sends that signal instead, as a Ctrl-C or a scheduler's SIGTERM would, at an exact point.
    Enabled only by FOURM_EVAL_KILL_AT."""
    priority = "LOWEST"

    def __init__(self, spec: str) -> None:
        import signal

        where, _, rest = spec.partition(":")
        n, _, sig = rest.partition(":")
        if where not in ("after_checkpoint", "during_eval", "after_iter") or not n.isdigit() \
                or (sig and not isinstance(getattr(signal, sig, None), signal.Signals)):
            raise ConfigError(f"FOURM_EVAL_KILL_AT={spec!r}: expected after_checkpoint:N, during_eval:N "
                              "or after_iter:N, optionally with :SIGNAL (e.g. after_iter:35:SIGINT)")
        self.where, self.n = where, int(n)
        self.signal = getattr(signal, sig) if sig else signal.SIGKILL
        self.sent = False

    def _kill(self) -> None:
        import os
        if self.sent:  # a handled signal (SIGINT) lets the process go on to its handler's exit
            return
        self.sent = True
        os.kill(os.getpid(), self.signal)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 != self.n:
            return
        if self.where == "after_iter":
            self._kill()
        if self.where == "after_checkpoint":
            from .state import complete_checkpoints
            if (Path(runner.work_dir) / f"iter_{self.n}.pth") in complete_checkpoints(Path(runner.work_dir)):
                self._kill()

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if self.where == "during_eval" and runner.iter == self.n:
            self._kill()


class BeforeTrainCheck(Hook):
    """Run a check once the runner has built its loops in its own order, before any training
    or step-0 evaluation (building a loop early would change the order of random draws)."""
    priority = "VERY_HIGH"

    def __init__(self, check: Any) -> None:
        self.check = check

    def before_train(self, runner) -> None:
        self.check(runner)


class ConsoleProgressHook(Hook):
    """Feeds a ``fourm_eval.console.RunConsole``: the training phase (loss, lr, it/s, ETA) and
    each evaluation (batches, then a one-line summary of the main metrics). ``iteration``: the
    iteration an evaluation-only run's weights come from (there is no training loop)."""
    priority = "VERY_LOW"  # after the step-0 evaluation, which runs in another hook's before_train

    def __init__(self, console: Any, max_iters: int, summarize: Any, iteration: int | None = None) -> None:
        self.console, self.max_iters, self.summarize = console, max_iters, summarize
        self.iteration = iteration

    def _iter(self, runner) -> int:
        return runner.iter if self.iteration is None else self.iteration

    def before_train(self, runner) -> None:
        self.console.start("train", "training", self.max_iters, completed=runner.iter)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        info = []
        loss = (outputs or {}).get("loss")
        if loss is not None:
            info.append(f"loss {float(loss):.4f}")
        try:
            lrs = runner.optim_wrapper.get_lr()["lr"]
            info.append(f"lr {max(lrs):.2e}")
        except (AttributeError, KeyError, TypeError, ValueError):
            pass
        self.console.advance("train", runner.iter + 1, "  ".join(info))

    def after_train(self, runner) -> None:
        self.console.finish("train")

    def before_val_epoch(self, runner) -> None:
        self.console.start("val", f"evaluating at iteration {self._iter(runner)}", len(runner.val_loop.dataloader),
                           plain_lines=False)

    def after_val_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self.console.advance("val", batch_idx + 1)

    def after_val_epoch(self, runner, metrics=None) -> None:
        it = self._iter(runner)
        when = "before training" if it == 0 and self.iteration is None else f"at iteration {it}"
        self.console.finish("val", f"evaluation {when}: {self.summarize(metrics or {})}")


class HeartbeatHook(Hook):
    """Tells the run's invocation log how far training got (throttled by the log itself), so a run
    killed without warning still records the iteration it reached."""
    priority = "VERY_LOW"

    def __init__(self, beat: Any) -> None:
        self.beat = beat

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if runner.rank == 0:
            self.beat(runner.iter + 1)

    def after_val_epoch(self, runner, metrics=None) -> None:
        if runner.rank == 0:
            self.beat(runner.iter, force=True)

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if runner.rank == 0:  # mmengine saves from after_train_iter, before its counter moves
            self.beat(int(checkpoint.get("meta", {}).get("iter", runner.iter + 1)), force=True)


class PredictionsStateHook(Hook):
    """Keeps ``predictions/meta.json``'s ``evaluation`` section true: which iteration's model the
    files are from and whether that evaluation completed (an interrupted one leaves files of two
    evaluations mixed, and says so). ``final`` is set by the runner once the final model's
    evaluation is on disk; until then every prediction set is marked non-final."""
    priority = "LOW"

    def __init__(self, pred_dir: str, max_iters: int, iteration: int | None = None, eval_only: bool = False) -> None:
        self.pred_dir, self.max_iters, self.iteration, self.eval_only = pred_dir, max_iters, iteration, eval_only

    def _mark(self, runner, complete: bool) -> None:
        if runner.rank != 0:
            return
        from .runs import mark_predictions
        it = runner.iter if self.iteration is None else self.iteration
        mark_predictions(self.pred_dir, iteration=int(it), max_iters=int(self.max_iters), complete=complete,
                         final=False, eval_only=self.eval_only)

    def before_val_epoch(self, runner) -> None:
        self._mark(runner, complete=False)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._mark(runner, complete=True)


class _RestoreRngAfter:
    """Iterator proxy: calls ``restore`` just before the (n_skip + 1)-th item is drawn."""

    def __init__(self, it: Any, n_skip: int, restore: Any):
        self._it, self._n_skip, self._restore, self._n = it, n_skip, restore, 0

    def __iter__(self) -> "_RestoreRngAfter":
        return self

    def __next__(self) -> Any:
        if self._n == self._n_skip and self._restore is not None:
            self._restore()
            self._restore = None
        self._n += 1
        return next(self._it)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._it, name)


__all__ = ["BeforeTrainCheck", "CheckpointStateHook", "ConsoleProgressHook", "FaultInjectionHook", "HeartbeatHook",
           "PredictionsStateHook",
           "IsolateEvalRngHook", "ResumeMissedEvalHook", "EvalAtStartHook", "EvalHistoryHook", "FiniteLossHook", "FourmEvalViT",
           "LayerDecayOptimWrapperConstructor", "LayerNorm2d", "NonFiniteLossError", "SimpleFeaturePyramid",
           "layer_decay_groups", "write_group_table"]
