"""Baseline backbones (DeiT III, MAE via timm), registered into fourm_eval.backbones.

Installed as ``fourm_eval.baselines``."""

from .timm_vit import BASELINES, TimmViTBackbone, build_timm_baseline

__all__ = ["BASELINES", "TimmViTBackbone", "build_timm_baseline"]
