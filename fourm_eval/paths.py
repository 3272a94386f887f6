"""Where fourm-eval keeps generated files (mini datasets, tiny checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def cache_dir() -> Path:
    """``$FOURM_EVAL_CACHE`` or ``~/.cache/fourm-eval`` (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("FOURM_EVAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fourm-eval")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cached_build(name: str, marker: str, build: Callable[[Path], object]) -> Path:
    """``cache_dir()/data/name``, built by ``build(folder)`` on first use. The folder counts as
    complete when it holds ``marker``; it is built aside and renamed, so concurrent processes
    (distributed ranks) never see a partial copy."""
    import shutil

    out = cache_dir() / "data" / name
    if not (out / marker).exists():
        tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
        build(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return out
