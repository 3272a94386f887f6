"""Running the `fourm-eval` command line as a user does, in a subprocess, for the end-to-end tests."""

import os
import subprocess
import sys
from pathlib import Path

FOURM_EVAL = [sys.executable, "-m", "fourm_eval.cli"]


def cli_env(tmp: Path) -> dict:
    """The process environment with the cache (mini datasets) inside the test's own folder."""
    return {**os.environ, "FOURM_EVAL_CACHE": str(tmp / "cache"), "PYTHONUNBUFFERED": "1"}


def run_cli(args, tmp, **kw):
    """`fourm-eval ARGS` run in ``tmp``; output captured; 15 minutes unless ``timeout`` says otherwise."""
    return subprocess.run(FOURM_EVAL + args, capture_output=True, text=True, env=cli_env(tmp), cwd=tmp,
                          timeout=kw.pop("timeout", 900), **kw)
