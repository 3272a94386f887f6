#!/usr/bin/env python
"""4M backbone vs timm ViT-B speed and memory (same as `fourm-eval bench backbone`).

    python benchmarks/backbone_speed.py [--sizes 224,1024] [--batch 8] [--iters 3] [--device cuda]
"""

import sys

from fourm_eval.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", "backbone", *sys.argv[1:]]))
