"""Transfer tasks (COCO detection, ADE20K segmentation, NYUv2 depth, ImageNet-1K classification).

Installed as ``fourm_eval.tasks``; each task module turns a backbone, a dataset
root and a profile from ``configs/`` into a run directory with ``result.json``."""
