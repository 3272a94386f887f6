"""The profile schema, declared once: every key a profile may hold, its type, unit, allowed values
and default.

The shared runner's keys are :data:`RUNNER_SETTINGS`; a kit or a task adds its own in its
``settings`` class attribute (a task's declaration of a key replaces the runner's or the kit's,
e.g. a task that only takes square crops narrows ``image_size``). :func:`validate` checks a
loaded profile against them (unknown keys, wrong types, values outside the allowed ones, a
missing required key are errors naming the file and the key); it never writes defaults into the
profile, so a profile's settings hash stays what its file says. :func:`render_markdown` writes
the tables of ``configs/README.md`` (a test keeps them equal).

Kinds: ``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``list`` (``item`` the element
kind, ``length`` its length), ``interval`` (an integer number of iterations, or a share of
training as a string "10%"), ``size`` (pixels: an int for a square, or [height, width]),
``section`` (a mapping whose keys are declared as ``section.key``), ``names`` (a string or a list
of strings). ``null`` marks a key that may
be null. Unless ``per_size`` is false a value may also be a per-size mapping
``{tiny, b, l, xl, default}``, each value of the key's kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

from fourm_eval.errors import ConfigError

REQUIRED = object()
SIZES = ("tiny", "b", "l", "xl", "default")
META_KEYS = ("task", "profile", "profile_file")  # set by the loader, not by the file


@dataclass(frozen=True)
class Setting:
    key: str                     # dotted path: "schedule.length"
    kind: str                    # int | float | bool | str | list | interval | size | range | section
    doc: str
    default: Any = REQUIRED      # REQUIRED: the profile must give it
    choices: tuple = ()
    unit: str = ""
    null: bool = False           # may be null (YAML ~ / null)
    item: str = ""               # list element kind
    length: int | None = None    # list length
    per_size: bool = True

    def describe_type(self) -> str:
        t = {"list": f"list of {self.item or 'values'}" + (f" ({self.length})" if self.length else ""),
             "interval": "iterations (int) or share ('10%')",
             "range": "float or [lo, hi]", "size": "px: int or [height, width]",
             "names": "str or list of str"}.get(self.kind,
                                                                                                     self.kind)
        if self.choices:
            t = " / ".join(str(c) for c in self.choices)
        return t + (" or null" if self.null else "")

    def describe_default(self) -> str:
        if self.default is REQUIRED:
            return "required"
        return "null" if self.default is None else str(self.default)


def S(key: str, kind: str, doc: str, default: Any = REQUIRED, **kw: Any) -> Setting:
    return Setting(key, kind, doc, default, **kw)


def floats(section: str, **docs: str) -> tuple[Setting, ...]:
    """Required float keys of one section: ``floats("color_jitter", prob="probability", ...)``."""
    return tuple(S(f"{section}.{k}", "float", doc) for k, doc in docs.items())


RUNNER_SETTINGS: tuple[Setting, ...] = (
    S("protocol", "str", "the named protocol the profile reproduces, training and scoring (its own profile: "
      "configs/<task>.<protocol>.yaml; a report compares a run only with published numbers of the same protocol)",
      per_size=False),
    S("image_size", "size", "training crop (and the timm baselines' input size)", unit="px"),
    S("batch_size", "int", "total batch per optimiser step, over all processes and accumulation steps (the "
      "learning rate's batch)"),
    S("per_gpu_batch", "int", "micro-batch per process; accumulation steps = batch_size / (per_gpu_batch x "
      "processes), a whole number (null: batch_size / processes, no accumulation). How a run is executed, not "
      "what it is: not part of the run's cell", default=None, null=True),
    S("schedule", "section", "the training schedule", per_size=False),
    S("schedule.unit", "str", "what length counts", choices=("iter", "epoch")),
    S("schedule.length", "float", "training length in schedule.unit", unit="iter or epoch"),
    S("schedule.warmup_iters", "int", "linear warm-up iterations (or warmup_epochs, not both)", default=0, unit="iter"),
    S("schedule.warmup_epochs", "float", "linear warm-up in epochs of the training set", default=None, unit="epoch"),
    S("schedule.warmup_start_factor", "float", "the warm-up starts at this share of the peak lr", default=0.001),
    S("schedule.decay", "str", "lr decay after warm-up: step (x0.1 at the milestones), cosine, poly "
      "(mmseg's (1 - t)^power)", default="step", choices=("step", "cosine", "poly")),
    S("schedule.milestones", "list", "step decay: shares of training where lr drops x0.1", default=[], item="float"),
    S("schedule.min_lr_ratio", "float", "cosine / poly: the final lr as a share of lr", default=0.0),
    S("schedule.poly_power", "float", "poly decay: the power (only with decay poly)", default=1.0),
    S("schedule.val_interval", "interval", "validation every this many iterations", default="the whole run"),
    S("schedule.checkpoint_interval", "interval", "checkpoint every this many iterations",
      default="schedule.val_interval"),
    S("optimizer", "str", "the optimiser", default="adamw", choices=("adamw", "sgd", "lars")),
    S("lr", "float", "absolute peak learning rate, used as written (or blr; one of the two)", default=None),
    S("blr", "float", "base learning rate per 256 images: peak lr = blr x total batch / 256 (MAE, ml-4m); "
      "or lr, not both", default=None),
    S("betas", "list", "AdamW betas", default=REQUIRED, item="float", length=2),
    S("momentum", "float", "SGD / LARS momentum", default=None),
    S("weight_decay", "float", "decoupled weight decay (not on norms, position embeddings, and biases unless "
      "weight_decay_biases)"),
    S("layer_decay", "float", "layer-wise lr decay per block (1.0: none)"),
    S("weight_decay_biases", "bool", "weight decay also on biases (detectron2's rule; norms and position "
      "embeddings never decayed)", default=False),
    S("head_lr_mult", "float", "lr multiplier of everything outside the backbone", default=1.0),
    S("drop_path", "float", "stochastic depth rate of the backbone's last block"),
    S("clip_grad", "float", "gradient norm clipping (null: none)", null=True),
    S("amp", "str", "mixed precision: auto = bf16 on a CUDA device that has it", default="auto",
      choices=("auto", "bf16", "fp32")),
    S("grad_checkpointing", "bool", "activation checkpointing in the backbone's blocks", default=False),
    S("num_workers", "int", "data loader worker processes"),
    S("val_batch_size", "int", "validation batch per process", default=1),
    S("log_interval", "int", "log every this many iterations", default=50, unit="iter"),
    S("max_keep_ckpts", "int", "how many periodic checkpoints to keep", default=2),
    S("eval_at_start", "bool", "evaluate the untrained model first (the record's step-0 metrics)", default=False),
    S("loggers", "list", "extra loggers", default=[], item="str", per_size=False),
    S("s_per_image_estimate", "float", "measured seconds per training image, for the time estimate printed "
      "before a run", default=None, unit="s"),
    S("pre_stage", "section", "a stage run first, whose final weights this run starts from (the record names both; "
      "README 'Chained stages'); null or absent: none", default=None, null=True, per_size=False),
    S("pre_stage.task", "str", "the stage's task (a registered task name)"),
    S("pre_stage.profile", "str", "the stage's profile of that task"),
    S("finetune", "section", "how the backbone is tuned (absent: full fine-tuning; fourm_eval/lora.py, README "
      "'LoRA')", default=None, per_size=False),
    S("finetune.mode", "str", "full: every backbone weight trains; lora: the backbone is frozen and low-rank "
      "adapters (peft) on its block linears train, heads in full", default="full", choices=("full", "lora")),
    S("finetune.rank", "int", "LoRA rank r (ml-4m: a packed qkv linear gets 3 r); required with lora",
      default=None),
    S("finetune.scale", "float", "LoRA scale: output W0 x + scale * B A x (peft's lora_alpha = scale x r)",
      default=1.0),
    S("finetune.dropout", "float", "dropout on the adapters' input (peft's lora_dropout; ml-4m has none)",
      default=0.0),
    S("finetune.targets", "names", "the adapted linears of the blocks: all (attention and MLP: ml-4m's "
      "'all'), attn, mlp, or module-name suffixes such as [attn.qkv, mlp.fc2]", default="all"),
)

SUBSET_SETTINGS: tuple[Setting, ...] = (
    S("train_subset", "int", "train on this many images (a seeded random subset; null: all)", default=None, null=True),
    S("val_subset", "int", "validate on this many images (a seeded random subset; null: all)", default=None,
      null=True),
    S("subset_seed", "int", "seed of the subsets", default=0),
)

_RUNNER = {s.key: s for s in RUNNER_SETTINGS}


def default(key: str) -> Any:
    """The declared default of one of the runner's keys (the runner reads absent keys through this)."""
    d = _RUNNER[key].default
    if d is REQUIRED:
        raise KeyError(f"{key} has no default: profiles must give it")
    return list(d) if isinstance(d, list) else d


_PCT = re.compile(r"^\s*\d+(\.\d+)?\s*%\s*$")


def _is_per_size(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and set(v) <= set(SIZES)


def _kind_ok(s: Setting, v: Any) -> bool:
    if v is None:
        return s.null or s.default is None
    k = s.kind
    if k == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if k == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if k == "bool":
        return isinstance(v, bool)
    if k == "str":
        return isinstance(v, str)
    if k == "section":
        return isinstance(v, dict)
    if k == "names":
        return (isinstance(v, str) and bool(v)) or (isinstance(v, list) and bool(v)
                                                    and all(isinstance(x, str) and x for x in v))
    if k == "range":
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        return num(v) or (isinstance(v, list) and len(v) == 2 and all(num(x) for x in v) and v[0] <= v[1])
    if k == "interval":
        return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(_PCT.match(v)))
    if k == "size":
        if isinstance(v, int) and not isinstance(v, bool):
            return v > 0
        return (isinstance(v, list) and len(v) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v))
    if k == "list":
        if not isinstance(v, (list, tuple)) or (s.length is not None and len(v) != s.length):
            return False
        return not s.item or all(_kind_ok(Setting("", s.item, ""), x) for x in v)
    raise ValueError(f"unknown setting kind {k!r} ({s.key})")


def merged(*groups: Iterable[Setting]) -> dict[str, Setting]:
    """key -> Setting; later groups replace earlier declarations of a key."""
    out: dict[str, Setting] = {}
    for g in groups:
        for s in g:
            out[s.key] = s
    return out


def settings_of(task: Any) -> dict[str, Setting]:
    """The runner's settings with the task's (its kit's included) on top."""
    return merged(RUNNER_SETTINGS, getattr(task, "settings", ()))


def _walk(d: dict[str, Any], pre: str, decl: dict[str, Setting]):
    for k, v in d.items():
        key = pre + k
        s = decl.get(key)
        if s is not None and s.kind == "section" and isinstance(v, dict):
            yield key, v
            yield from _walk(v, key + ".", decl)
        else:
            yield key, v


def validate(p: dict[str, Any], task: Any, source: str) -> None:
    """Check a loaded profile (before --set or per-size resolution, or after) against the task's
    settings; a ConfigError names ``source`` and the key."""
    decl = settings_of(task)
    seen, sections = set(), set()
    for key, v in _walk({k: x for k, x in p.items() if k not in META_KEYS}, "", decl):
        seen.add(key)
        if isinstance(v, dict):
            sections.add(key)
        s = decl.get(key)
        if s is None:
            parent = key.rsplit(".", 1)[0] + "." if "." in key else ""
            near = sorted(k for k in decl if k.startswith(parent) and "." not in k[len(parent):])
            raise ConfigError(f"{source}: unknown setting {key!r} for {task.name}; known here: {', '.join(near)} "
                              "(the schema: configs/README.md)")
        values = list(v.items()) if (s.per_size and _is_per_size(v)) else [(None, v)]
        for size, x in values:
            if not _kind_ok(s, x):
                where = f" (size {size})" if size else ""
                raise ConfigError(f"{source}: {key}{where} = {x!r}; expected {s.describe_type()}")
            if s.choices and x is not None and x not in s.choices:
                raise ConfigError(f"{source}: {key} = {x!r}; one of {', '.join(map(str, s.choices))}")
    if not getattr(task, "probe_only", False):  # a probe-only task trains no encoder: no learning rate of one
        check_lr(p, task, source)
    for key, s in decl.items():
        if s.default is REQUIRED and key not in seen:
            parent = key.rsplit(".", 1)[0] if "." in key else None
            if parent is None or parent in sections:
                raise ConfigError(f"{source}: {key} is required for {task.name} ({s.doc})")


def check_lr(p: dict[str, Any], task: Any, source: str) -> None:
    """A profile gives its learning rate one way: ``lr`` (absolute) or ``blr`` (per 256 images), never
    both, never neither; a task whose protocols write a base lr (``base_scaled_lr``) takes only blr."""
    lr, blr = p.get("lr"), p.get("blr")
    if lr is not None and blr is not None:
        raise ConfigError(f"{source}: lr = {lr!r} and blr = {blr!r} are both set; write one: lr (the absolute peak "
                          "lr) or blr (per 256 images, scaled by the total batch / 256)")
    if lr is None and blr is None:
        raise ConfigError(f"{source}: lr or blr is required for {task.name} (lr: the absolute peak lr; blr: per 256 "
                          "images, scaled by the total batch / 256)")
    if lr is not None and getattr(task, "base_scaled_lr", False):
        raise ConfigError(f"{source}: lr = {lr!r}, but {task.name}'s protocols write a base lr scaled by the total "
                          f"batch / 256 (blr): a bare lr could be either. Write blr (the same number if it is the "
                          f"recipe's base lr), or lr only where the recipe gives an absolute lr and the task allows it")


def effective_lr(p: dict[str, Any], total_batch: int) -> dict[str, Any]:
    """The peak lr a run uses: ``lr`` as written, or ``blr x total batch / 256`` (ml-4m's and MAE's order of
    operations); with the base lr and the total batch it came from."""
    if p.get("blr") is not None:
        return {"blr": float(p["blr"]), "total_batch": int(total_batch),
                "lr": float(p["blr"]) * int(total_batch) / 256, "rule": "blr x total batch / 256"}
    return {"blr": None, "total_batch": int(total_batch), "lr": float(p["lr"]), "rule": "as written"}


def size_hw(value: Any) -> tuple[int, int]:
    """``image_size`` as (height, width)."""
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def render_markdown(tasks: Iterable[Any]) -> str:
    """The schema as Markdown tables: the runner's keys, then each task's own (its kit's included)."""
    def table(rows: Iterable[Setting]) -> list[str]:
        out = ["| key | type | default | unit | meaning |", "|---|---|---|---|---|"]
        for s in rows:
            out.append(f"| `{s.key}` | {s.describe_type()} | {s.describe_default()} | {s.unit} | {s.doc} |")
        return out

    lines = ["### Every task (the shared runner)", ""] + table(RUNNER_SETTINGS) + [""]
    for t in tasks:
        own = list(getattr(t, "settings", ()))
        if own:
            lines += [f"### {t.name}", ""] + table(own) + [""]
    return "\n".join(lines).rstrip() + "\n"


MARKERS = ("<!-- schema:start (generated: python -m fourm_eval.tasks.schema --write) -->", "<!-- schema:end -->")


def readme_with_schema(text: str, tasks: Iterable[Any]) -> str:
    """``text`` (configs/README.md) with the part between the markers replaced by the rendered schema."""
    start, end = MARKERS
    if start not in text or end not in text:
        raise ValueError(f"configs/README.md lacks the schema markers {start!r} ... {end!r}")
    head, rest = text.split(start, 1)
    return head + start + "\n\n" + render_markdown(tasks) + "\n" + end + rest.split(end, 1)[1]


def _main() -> None:
    import argparse

    from fourm_eval.configs import CONFIG_DIR

    from . import all_tasks

    ap = argparse.ArgumentParser(description="Print the profile schema, or write it into configs/README.md.")
    ap.add_argument("--write", action="store_true", help="update configs/README.md between its schema markers")
    args = ap.parse_args()
    if not args.write:
        print(render_markdown(all_tasks().values()), end="")
        return
    path = CONFIG_DIR / "README.md"
    path.write_text(readme_with_schema(path.read_text(), all_tasks().values()))
    print(f"wrote {path}")


if __name__ == "__main__":
    _main()


__all__ = ["MARKERS", "REQUIRED", "default", "floats", "RUNNER_SETTINGS", "SUBSET_SETTINGS", "Setting", "S", "merged", "render_markdown", "settings_of", "size_hw",
           "readme_with_schema", "validate"]
