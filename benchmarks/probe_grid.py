"""A grid of linear heads on cached features against separate linear-probe runs from images, at equal numbers.

    .venv/bin/python benchmarks/probe_grid.py [--workdir DIR]

Both on the built-in mini ImageNet with the shipped tiny 4M, through the command line as a user runs them:

* the grid: `fourm-eval run in1k-cls --profile linear-grid-smoke` with an empty feature cache (so the wall
  time includes encoding both splits once): 16 heads (8 learning rates x last 1 / 4 blocks), each trained
  for the profile's iterations at its batch;
* one linear probe from images: `--profile linear-smoke` set to the same iterations and batch (every step
  decodes, augments and encodes its images again); 16 of them are what the grid replaces.

Prints both wall times and the ratio grid / (16 x one run). Issue 24's target: below 1/8.
Measured here (2 CPU cores): see README "Frozen-feature probes".
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _run(args: list[str], env: dict, cwd: Path) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "fourm_eval.cli", "run", "in1k-cls", *args], env=env, cwd=cwd,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"fourm-eval run {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None, help="where the runs and a fresh cache go (default: a "
                                                              "temporary folder)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="probe-grid-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FOURM_EVAL_CACHE": str(work / "cache")}
    # the mini data first (generated once, not part of either measurement)
    subprocess.run([sys.executable, "-m", "fourm_eval.cli", "data", "make-mini", "in1k-cls", str(work / "mini")],
                   env=env, cwd=work, check=True, capture_output=True)
    grid_s = _run(["--profile", "linear-grid-smoke", "--work-dir", str(work / "grid"), "--data-root",
                   str(work / "mini")], env, work)
    rec = json.loads((work / "grid" / "result.json").read_text())
    sched = rec["probe"]["schedule"]
    heads = rec["probe"]["heads"]
    iters, batch = int(sched["iterations"]), int(sched["batch_size"])
    one_s = _run(["--profile", "linear-smoke", "--work-dir", str(work / "one"), "--data-root", str(work / "mini"),
                  "--set", f"schedule.length={iters}", "--set", f"batch_size={batch}",
                  "--set", f"schedule.val_interval={iters}", "--set", f"schedule.checkpoint_interval={iters}"], env, work)
    one = json.loads((work / "one" / "result.json").read_text())
    assert one["config"]["schedule_resolved"]["max_iters"] == iters
    ratio = grid_s / (heads * one_s)
    print(f"grid of {heads} heads on cached features (encoding included): {grid_s:.1f} s "
          f"({iters} iterations at batch {batch} each)")
    print(f"one linear probe from images, same iterations and batch: {one_s:.1f} s; x {heads} = {heads * one_s:.0f} s")
    print(f"ratio grid / ({heads} runs) = {ratio:.4f} (1/{1 / ratio:.0f}); target < 1/8: "
          f"{'met' if ratio < 1 / 8 else 'NOT met'}")


if __name__ == "__main__":
    main()
