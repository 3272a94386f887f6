"""Where fourm-eval keeps generated files (mini datasets, tiny checkpoints)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$FOURM_EVAL_CACHE`` or ``~/.cache/fourm-eval`` (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("FOURM_EVAL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "fourm-eval")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p
