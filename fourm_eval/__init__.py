"""fourm-eval: transfer evaluation of 4M encoders and ViT baselines."""

__version__ = "0.1.0"
