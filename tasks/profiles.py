"""Run profiles: YAML files ``configs/<task>.<profile>.yaml`` (or any YAML path).

* ``base: paper`` makes a profile start from another one of the same task and
  state only what differs (mappings merge key by key; lists and scalars replace).
* ``--set a.b=value`` overrides one existing key; values are read with a YAML
  safe loader (never evaluated) and unknown keys are errors.
* Per-size values: ``{tiny: .., b: .., l: .., xl: .., default: ..}``, resolved
  for the backbone's size (from its architecture, see :func:`resolve_size`).
* Intervals (validation, checkpoints): an integer is a number of iterations;
  a string ``"10%"`` is a share of training. Nothing else is accepted, so a
  ``1`` can never silently mean "all of training".
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from fourm_eval.errors import ConfigError

SIZES = ("tiny", "b", "l", "xl")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return cfg


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not _is_per_size(v):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _is_per_size(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and set(v) <= set(SIZES) | {"default"}


def profile_path(task: str, profile: str) -> Path:
    from fourm_eval.configs import CONFIG_DIR

    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"profile file {path} not found")
        return path
    path = CONFIG_DIR / f"{task}.{profile}.yaml"
    if not path.is_file():
        raise ConfigError(f"no profile {profile!r} for {task}; available: {', '.join(list_profiles(task))} "
                          "(or pass the path of a YAML file)")
    return path


def list_profiles(task: str) -> list[str]:
    from fourm_eval.configs import CONFIG_DIR

    return sorted(p.name[len(task) + 1:-len(".yaml")] for p in CONFIG_DIR.glob(f"{task}.*.yaml"))


def _chain(task: str, path: Path) -> list[tuple[Path, dict[str, Any]]]:
    """A profile file and its ``base`` files, the file first: (path, its YAML mapping) each."""
    chain, seen = [], set()
    cur = path
    while True:
        if cur in seen:
            raise ConfigError(f"{path}: the 'base' chain loops ({' -> '.join(str(c) for c, _ in chain)})")
        seen.add(cur)
        cfg = _read_yaml(cur)
        chain.append((cur, cfg))
        base = cfg.get("base")
        if base is None:
            return chain
        cur = profile_path(task, str(base)) if not str(base).endswith((".yaml", ".yml")) \
            else (cur.parent / str(base))


def profile_protocols(task: str) -> dict[str, str | None]:
    """Each shipped profile of ``task`` -> the protocol it resolves to (read from the YAML chain only)."""
    return {name: next((str(cfg["protocol"]) for _, cfg in _chain(task, profile_path(task, name))
                        if "protocol" in cfg), None) for name in list_profiles(task)}


def load_profile(task: str, profile: str) -> dict[str, Any]:
    """The resolved profile: its ``base`` chain merged, ``profile`` and ``profile_file`` set."""
    path = profile_path(task, profile)
    chain = _chain(task, path)
    out: dict[str, Any] = {}
    for _, cfg in reversed(chain):
        out = merge(out, {k: v for k, v in cfg.items() if k != "base"})
    if out.get("task", task) != task:
        raise ConfigError(f"{path} is a profile of task {out['task']!r}, not {task!r}")
    from fourm_eval.configs import CONFIG_DIR

    out["task"] = task
    if "profile" in chain[0][1]:  # a profile names itself; a base's name is not inherited
        out["profile"] = str(chain[0][1]["profile"])
    elif path.parent.resolve() == CONFIG_DIR.resolve() and path.name.startswith(task + "."):
        out["profile"] = path.name[len(task) + 1:-len(".yaml")]
    else:
        out["profile"] = path.stem
    out["profile_file"] = str(path)
    from . import get_task
    from .schema import validate
    validate(out, get_task(task), str(path))
    return out


def apply_overrides(cfg: dict[str, Any], sets: list[str], declared: Any = ()) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides; the key must exist in the profile or be one of the ``declared``
    keys (the task's schema: ``tasks.schema.settings_of``), so typos are errors."""
    cfg = copy.deepcopy(cfg)
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        if key.strip() == "protocol":
            raise ConfigError(f"--set {item}: the protocol is the profile's own (its values and its scoring); pick "
                              "another protocol with --profile NAME (`fourm-eval tasks` lists them)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text; it is a number here
            try:
                value = float(value) if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value) else value
            except ValueError:
                pass
        node = cfg
        parts = key.strip().split(".")
        for i, p in enumerate(parts[:-1]):
            section = ".".join(parts[:i + 1])
            if p not in node and getattr(declared.get(section) if isinstance(declared, dict) else None,
                                         "kind", None) == "section":
                node[p] = {}  # a declared section the profile leaves out (e.g. --set finetune.mode=lora)
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section of the profile")
            node = node[p]
        if parts[-1] not in node and key.strip() not in declared:
            prefix = ".".join(parts[:-1]) + "." if len(parts) > 1 else ""
            known = sorted(set(node) | {k[len(prefix):] for k in declared
                                        if k.startswith(prefix) and "." not in k[len(prefix):]})
            raise ConfigError(f"--set {key}: unknown setting; known here: {', '.join(known)}")
        node[parts[-1]] = value
    return cfg


def per_size(value: Any, size: str) -> Any:
    """A per-size value ({b: .., l: .., xl: ..}) for ``size``; other values as they are."""
    if _is_per_size(value):
        if size in value:
            return value[size]
        if "default" in value:
            return value["default"]
        raise ConfigError(f"no value for size {size!r} in {value}")
    return value


def resolve_per_size(p: dict[str, Any], size: str) -> dict[str, Any]:
    """Every per-size value of a profile, resolved (recursively)."""
    out = {}
    for k, v in p.items():
        if _is_per_size(v):
            out[k] = per_size(v, size)
        elif isinstance(v, dict):
            out[k] = resolve_per_size(v, size)
        else:
            out[k] = v
    return out


_PCT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


def resolve_interval(value: Any, max_iters: int, what: str) -> int:
    """An interval in iterations: an int as is, ``"N%"`` as that share of ``max_iters``."""
    if isinstance(value, bool) or value is None:
        raise ConfigError(f"{what}: expected an integer number of iterations or a share like '10%', got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"{what}: {value} iterations; must be at least 1")
        return value
    if isinstance(value, str) and _PCT.match(value):
        share = float(_PCT.match(value).group(1)) / 100.0
        if not 0 < share <= 1:
            raise ConfigError(f"{what}: {value} is not a share of training in (0%, 100%]")
        return max(1, round(share * max_iters))
    raise ConfigError(f"{what}: {value!r} is ambiguous; write an integer number of iterations (300) or a "
                      "share of training as a string ('10%')")


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
