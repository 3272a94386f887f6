import sys
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def official_ckpt() -> Path:
    return DATA / "fm_tiny_swiglu.safetensors"


@pytest.fixture(scope="session")
def official_ref() -> dict:
    from safetensors.torch import load_file
    return load_file(str(DATA / "fm_tiny_swiglu_ref224.safetensors"))
