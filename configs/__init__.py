"""Run profiles (paper / short / smoke) per task, as YAML files; installed as ``fourm_eval.configs``."""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
