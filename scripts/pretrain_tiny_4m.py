"""Re-create the tiny pre-trained 4M shipped in fourm_eval/assets/ (the smoke runs' default backbone).

    .venv/bin/python scripts/pretrain_tiny_4m.py                 # overwrites the shipped file + its card
    .venv/bin/python scripts/pretrain_tiny_4m.py --out /tmp/x.safetensors

The objective, data and determinism are described in fourm_eval/pretrain.py; the
recipe is ``fourm_eval.pretrain.Recipe`` (every field can be overridden here, e.g.
``--steps 300``; the shipped file uses the defaults). About 25 minutes on 2 CPU cores.
``--stop-after 50 --out X`` re-runs the schedule's first 51 steps only (a partial model), to
compare with the start of the card's training log. ``--save-every 100 --save-dir D`` also keeps
``D/checkpoint-<step>.safetensors`` along the way (step and tokens seen in the header metadata), for
``fourm-eval analyze trajectory D/checkpoint-*.safetensors``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from fourm_eval.pretrain import Recipe, main


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output .safetensors (default: the shipped file)")
    ap.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                    help="stop after this logged step of the same schedule (a partial model, to check the "
                         "start of the card's training log; needs --out)")
    ap.add_argument("--save-every", type=int, default=None, metavar="STEPS",
                    help="also save checkpoint-<step>.safetensors every this many steps into --save-dir (the "
                         "trajectory of transfer along pre-training: fourm-eval analyze trajectory)")
    ap.add_argument("--save-dir", default=None, help="folder for --save-every's checkpoints")
    for f in fields(Recipe):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None)
    args = ap.parse_args()
    overrides = {f.name: getattr(args, f.name) for f in fields(Recipe) if getattr(args, f.name) is not None}
    main(args.out, stop_after=args.stop_after, save_every=args.save_every, save_dir=args.save_dir, **overrides)


if __name__ == "__main__":
    cli()
