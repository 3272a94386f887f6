import os
import sys
from pathlib import Path

import pytest

# Tests never reach beyond this machine: the hub is offline for every test and every process a test starts,
# unless the test points HF_ENDPOINT at its own server on 127.0.0.1 (tests/hub_server.py) and says so.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

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


# ------------------------------------------------------------- shared smoke runs (tests/smoke_runs.py)
_SMOKE: dict = {}


def pytest_configure(config):
    config.addinivalue_line("markers", "smoke_runs(*keys): the (task, seed) smoke runs a test uses")
    config.addinivalue_line("markers", "gate: the CI regression gate (runs last)")


def pytest_collection_modifyitems(session, config, items):
    # tests that check the shared smoke runs come after the others (which run while the smoke runs are
    # made in the background), and the gate last of all; otherwise collection order is kept
    items.sort(key=lambda it: (it.get_closest_marker("gate") is not None,
                               "smoke_runs" in getattr(it, "fixturenames", ())))


def pytest_collection_finish(session):
    keys = []
    for it in session.items:
        if "smoke_runs" not in getattr(it, "fixturenames", ()):
            continue
        for m in it.iter_markers("smoke_runs"):
            keys += [tuple(k) for k in m.args if tuple(k) not in keys]
    if keys and not session.config.option.collectonly:
        from smoke_runs import SmokeRuns
        _SMOKE["runs"] = SmokeRuns(session.config._tmp_path_factory.mktemp("smoke-runs"))
        _SMOKE["runs"].start(keys)


def pytest_sessionfinish(session, exitstatus):
    if "runs" in _SMOKE:
        _SMOKE["runs"].shutdown()


@pytest.fixture(scope="session")
def smoke_runs():
    if "runs" not in _SMOKE:
        pytest.fail("a test that uses smoke_runs must declare them: @pytest.mark.smoke_runs((task, seed), ...)")
    return _SMOKE["runs"]
