"""How much a smoke metric moves at a fixed seed when only the floating-point rounding changes.

The CI gate compares each seed's smoke result with the same seed's expected result. On one
machine kind a smoke is bit-identical per seed; what a per-seed comparison must tolerate is
the effect of rounding that differs (another CPU's kernels, a refactor that reorders a sum).
This script measures it: for each task and seed it re-runs the smoke profile from copies of
the shipped pre-trained tiny 4M whose every weight is multiplied by (1 + 2^-23 z), z ~ N(0, 1)
(about one unit in the last place of a float32), so that training starts from numerically
different but equivalent weights and follows its own rounding path. The spread of the metric
over such copies at a fixed seed is the within-seed noise; the spread over seeds is what an
unpaired gate has to tolerate.

    .venv/bin/python benchmarks/gate_noise.py --tasks nyu-depth,in1k-cls --seeds 0,1 --copies 3 \
        --out runs/gate-noise
    fourm-eval regress runs/ci-reference --expected reports/ci/expected.json --update --noise-runs runs/gate-noise

(the second command stores the pooled within-seed noise of each cell in the expectations; noise runs
are matched to a cell by task, profile, backbone name, init and settings, their checkpoint alone
differing). One out folder per --scale: the copies are cached by file name.

Writes OUT/noise.json (every run's metrics) and prints, per gated metric, the within-seed
standard deviation (pooled over seeds) and the between-seed one. Runs that already have a
result.json are not repeated (the script can be stopped and started again).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path


def perturbed_copy(src: Path, out: Path, seed: int, rel: float = 2.0 ** -23) -> Path:
    """``src`` (a safetensors file) with every floating-point tensor scaled by (1 + rel * z)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if out.exists():
        return out
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        for k in f.keys():
            t = f.get_tensor(k)
            if t.is_floating_point():
                z = torch.randn(t.shape, generator=gen, dtype=torch.float64)
                t = (t.double() * (1.0 + rel * z)).to(t.dtype)
            tensors[k] = t.contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=None, help="comma list (default: every registered task)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--copies", type=int, default=3, help="perturbed copies of the checkpoint per seed")
    ap.add_argument("--scale", type=float, default=2.0 ** -23,
                    help="relative size of the perturbation (default 2^-23, about one float32 ulp; a larger one "
                         "checks that the finding holds with margin)")
    ap.add_argument("--reference", action="store_true", help="also run the unperturbed checkpoint")
    ap.add_argument("--out", type=Path, default=Path("runs/gate-noise"))
    args = ap.parse_args()

    from fourm_eval.pretrain import shipped_checkpoint
    from fourm_eval.tasks import get_task

    src = shipped_checkpoint()
    exe = [sys.executable, "-m", "fourm_eval.cli"]
    out: dict = {}
    noise_file = args.out / "noise.json"
    from fourm_eval.tasks import all_tasks

    for task in (args.tasks.split(",") if args.tasks else sorted(all_tasks())):
        t = get_task(task)
        for seed in (int(s) for s in args.seeds.split(",")):
            variants = ([("reference", src)] if args.reference else []) + [
                (f"copy{j}", perturbed_copy(src, args.out / "checkpoints" / f"copy{j}.safetensors", seed=1000 + j,
                                            rel=args.scale))
                for j in range(args.copies)]
            for name, ckpt in variants:
                wd = args.out / task / f"seed{seed}-{name}"
                if not (wd / "result.json").exists():
                    print(f"running {task} seed {seed} {name}", flush=True)
                    r = subprocess.run(exe + ["run", task, "--profile", "smoke", "--seed", str(seed),
                                              "--checkpoint", str(ckpt), "--work-dir", str(wd)],
                                       capture_output=True, text=True)
                    if r.returncode:
                        print(r.stdout[-2000:] + r.stderr[-2000:])
                        return 1
                rec = json.loads((wd / "result.json").read_text())
                out.setdefault(task, {}).setdefault(str(seed), {})[name] = rec["metrics"]
                noise_file.parent.mkdir(parents=True, exist_ok=True)
                noise_file.write_text(json.dumps(out, indent=1))
        for m in t.gated_metrics:
            per_seed = {s: [v[m] for v in runs.values()] for s, runs in out[task].items()}
            within = [statistics.variance(v) for v in per_seed.values() if len(v) > 1]
            sd_w = math.sqrt(sum(within) / len(within)) if within else float("nan")
            means = [statistics.mean(v) for v in per_seed.values()]
            sd_b = statistics.stdev(means) if len(means) > 1 else float("nan")
            print(f"{task} {m}: within-seed std {sd_w:.4f} (pooled over {len(within)} seeds); "
                  f"std of the seed means {sd_b:.4f}; per seed: "
                  + "; ".join(f"seed {s}: " + ", ".join(f"{x:.4f}" for x in v) for s, v in per_seed.items()),
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
