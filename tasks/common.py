"""Pieces every mmengine-based transfer shares.

* profiles: YAML files in configs/, ``--set key=value`` overrides (values
  parsed with a YAML safe loader, never evaluated), per-size values;
* ``LayerDecayOptimWrapperConstructor``: AdamW groups from the backbone's own
  ``layer_id()`` (never from parameter-name patterns), no weight decay on
  biases, norms and embeddings, the resolved table written to the run dir;
* hooks: evaluation before training (step 0), a finite-loss guard that stops
  with a clear message (the last checkpoint stays), RNG state saved in every
  checkpoint and restored after resume so a resumed run reproduces the
  uninterrupted one;
* safe resume: mmengine 0.10.7 reloads its checkpoints with plain
  ``torch.load``, which torch >= 2.6 runs with ``weights_only=True``. Instead
  of disabling that, the few non-tensor types mmengine stores are allow-listed
  for the weights-only unpickler.
"""

from __future__ import annotations

import copy
import csv
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from fourm_eval.errors import ConfigError, FourmEvalError

SIZES = ("tiny", "b", "l", "xl")


# ----------------------------------------------------------------- profiles
def load_profile(task: str, profile: str) -> dict[str, Any]:
    from fourm_eval.configs import CONFIG_DIR

    path = Path(profile)
    if not path.suffix:
        path = CONFIG_DIR / f"{task}.{profile}.yaml"
        if not path.is_file():
            known = sorted(p.name.split(".")[1] for p in CONFIG_DIR.glob(f"{task}.*.yaml"))
            raise ConfigError(f"no profile {profile!r} for {task}; available: {', '.join(known)} "
                              "(or pass the path of a YAML file)")
    elif not path.is_file():
        raise ConfigError(f"profile file {path} not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    cfg["profile"] = cfg.get("profile", path.stem.split(".")[-1])
    cfg["profile_file"] = str(path)
    return cfg


def apply_overrides(cfg: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; the key must exist (typos are errors)."""
    cfg = copy.deepcopy(cfg)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = cfg
        parts = key.strip().split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section of the profile")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"--set {key}: unknown setting; known here: {', '.join(sorted(node))}")
        node[parts[-1]] = value
    return cfg


def per_size(value: Any, size: str) -> Any:
    """Profiles give some values per model size ({b: .., l: .., xl: ..})."""
    if isinstance(value, dict) and set(value) <= set(SIZES) | {"default"}:
        if size in value:
            return value[size]
        if "default" in value:
            return value["default"]
        raise ConfigError(f"no value for size {size!r} in {value}")
    return value


# (embed_dim, depth) of the sizes the profiles know; ViT-H (1280, 32) takes the XL values, as the
# ViTDet ViT-H recipe is where 4M's XL values come from.
SIZE_SHAPES = {(128, 4): "tiny", (768, 12): "b", (1024, 24): "l", (2048, 24): "xl", (1280, 32): "xl"}


def resolve_size(embed_dim: int, num_layers: int, requested: str | None) -> tuple[str, str | None]:
    """The model size whose per-size profile values apply, and a warning when it was inferred.

    A requested size that contradicts a known architecture is an error; an architecture
    that is none of the known ones gets the nearest size by width, with a warning that
    goes into the record."""
    known = SIZE_SHAPES.get((embed_dim, num_layers))
    if requested is not None:
        req = requested.lower()
        if req not in SIZES:
            raise ConfigError(f"unknown model size {requested!r}; one of {', '.join(SIZES)}")
        if known is not None and known != req:
            raise ConfigError(f"the model size {requested!r} contradicts the backbone (dim {embed_dim}, "
                              f"{num_layers} blocks is size {known!r}); drop the size option or pass "
                              "a matching checkpoint")
        return req, None
    if known is not None:
        return known, None
    widths = {"tiny": 128, "b": 768, "l": 1024, "xl": 2048}
    near = min(widths, key=lambda k: abs(widths[k] - embed_dim))
    return near, (f"the backbone (dim {embed_dim}, {num_layers} blocks) is none of the released sizes; "
                  f"using the per-size profile values of {near!r} (pass the size explicitly to choose)")


# ------------------------------------------------------------- layer decay
def layer_decay_groups(model: torch.nn.Module, backbone: torch.nn.Module, backbone_prefix: str, base_lr: float,
                       weight_decay: float, decay_rate: float) -> list[dict[str, Any]]:
    """Parameter groups: lr = base_lr * decay**(L + 1 - layer_id), wd 0 for biases/norms/embeddings."""
    L = backbone.num_layers
    no_wd_names = backbone.no_weight_decay_names() if hasattr(backbone, "no_weight_decay_names") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith(backbone_prefix):
            rel = name[len(backbone_prefix):]
            lid = backbone.layer_id(rel)
            # biases and norm weights (1-d) and the token embeddings the backbone names
            no_wd = p.ndim <= 1 or rel in no_wd_names
        else:
            lid = L + 1
            no_wd = p.ndim <= 1
        key = (lid, no_wd)
        if key not in groups:
            scale = decay_rate ** (L + 1 - lid)
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


def register_mmengine_components() -> None:
    """Register the optimiser constructor and hooks into mmengine (idempotent)."""
    from mmengine.hooks import Hook
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import HOOKS, OPTIM_WRAPPER_CONSTRUCTORS

    if "LayerDecayOptimWrapperConstructor" in OPTIM_WRAPPER_CONSTRUCTORS.module_dict:
        return

    @OPTIM_WRAPPER_CONSTRUCTORS.register_module()
    class LayerDecayOptimWrapperConstructor(DefaultOptimWrapperConstructor):
        """AdamW groups from ``backbone.layer_id``; see layer_decay_groups."""

        def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
            paramwise_cfg = dict(paramwise_cfg or {})
            self.decay_rate = float(paramwise_cfg.pop("layer_decay_rate"))
            self.backbone_attr = paramwise_cfg.pop("backbone_attr", "backbone.net")
            self.table_path = paramwise_cfg.pop("table_path", None)
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
                                        opt_cfg.get("weight_decay", 0.0), self.decay_rate)
            if self.table_path:
                write_group_table(groups, Path(self.table_path))
            for g in groups:
                g.pop("param_names")
            opt_cfg["params"] = groups
            optimizer = OPTIMIZERS.build(opt_cfg)
            return OPTIM_WRAPPERS.build(cfg, default_args=dict(optimizer=optimizer))

    @HOOKS.register_module()
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

    @HOOKS.register_module()
    class EvalHistoryHook(Hook):
        """Append every periodic evaluation (iteration, metrics) to a JSON-lines file."""
        priority = "LOW"

        def __init__(self, out_file: str):
            self.out_file = out_file

        def after_val_epoch(self, runner, metrics=None) -> None:
            import json
            if runner.rank != 0 or not metrics:
                return
            with open(self.out_file, "a") as f:
                f.write(json.dumps({"iter": runner.iter, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")

    @HOOKS.register_module()
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

    @HOOKS.register_module()
    class CheckpointStateHook(Hook):
        """Make mmengine checkpoints loadable with ``weights_only=True`` and resumable bit-for-bit.

        * mmengine's message hub pickles ``HistoryBuffer`` objects whose state holds bound
          methods (unpickling them needs ``getattr``, which a weights-only load rightly
          refuses); they are stored as plain arrays and rebuilt on load;
        * python / numpy / torch RNG states are saved, and restored after a resume once the
          train loop has skipped the batches already seen."""
        priority = "LOWEST"

        def __init__(self, keep: int = 2) -> None:
            self._pending = None
            self.keep = keep

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            # mmengine prunes old checkpoints *before* writing the new one, so a kill while saving
            # could leave none; CheckpointHook keeps all, and old ones are pruned here, after the
            # newer checkpoint is complete.
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
            checkpoint.setdefault("meta", {})["rng_state"] = {
                "python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
                "numpy": np.random.get_state()[1].tolist(), "numpy_pos": int(np.random.get_state()[2]),
                "torch": torch.get_rng_state(),
            }

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


def complete_checkpoints(work_dir: Path) -> list[Path]:
    """``iter_N.pth`` files whose zip central directory (written last by torch.save) reads, newest first."""
    import re
    import zipfile

    found = []
    for f in work_dir.glob("iter_*.pth"):
        m = re.fullmatch(r"iter_(\d+)\.pth", f.name)
        if not m:
            continue
        try:
            with zipfile.ZipFile(f) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError):
            continue
        found.append((int(m.group(1)), f))
    return [f for _, f in sorted(found, reverse=True)]


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    if keep <= 0:
        return
    for old in complete_checkpoints(work_dir)[keep:]:
        old.unlink(missing_ok=True)


def set_rng_state(s: dict[str, Any]) -> None:
    random.setstate((3, tuple(s["python"]), s["python_pos"]))
    np.random.set_state(("MT19937", np.asarray(s["numpy"], dtype=np.uint32), s["numpy_pos"], 0, 0.0))
    torch.set_rng_state(s["torch"])


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


class NonFiniteLossError(FourmEvalError):
    """Training produced a NaN or infinite loss."""


def init_distributed_cpu(launcher: str) -> dict[str, Any] | None:
    """mmengine's launchers pin a CUDA device; on CPU-only machines start gloo ourselves.

    Returns a model_wrapper_cfg for the runner (DDP without device_ids) or None on GPUs."""
    import os

    if launcher == "none" or torch.cuda.is_available():
        return None
    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel
    from mmengine.registry import MODEL_WRAPPERS

    if launcher == "slurm" and "RANK" not in os.environ:
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    if "CPUDistributedDataParallel" not in MODEL_WRAPPERS.module_dict:
        @MODEL_WRAPPERS.register_module()
        class CPUDistributedDataParallel(MMDistributedDataParallel):
            def __init__(self, module, device_ids=None, **kwargs):  # CPU modules take no device_ids
                super().__init__(module=module, device_ids=None, **kwargs)
    return dict(type="CPUDistributedDataParallel", broadcast_buffers=False, find_unused_parameters=False)


def allow_mmengine_checkpoint_types() -> None:
    """Let ``torch.load(weights_only=True)`` read mmengine's own training checkpoints."""
    import collections

    safe: list[Any] = [collections.OrderedDict, collections.defaultdict, np.dtype, np.ndarray,
                       np.core.multiarray._reconstruct if hasattr(np, "core") else None]
    try:
        from numpy._core.multiarray import _reconstruct, scalar
        safe += [_reconstruct, scalar]
    except ImportError:  # numpy < 2
        pass
    safe += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool", "uint8", "uint32")]
    torch.serialization.add_safe_globals([s for s in safe if s is not None])
