"""Hub weights fetched, pinned and recorded (fourm_eval/hub.py; `fourm-eval fetch`, `sweep`, `run`), against a
hub served on 127.0.0.1 (tests/hub_server.py: the resolve endpoint huggingface_hub downloads from). No
network beyond this machine: the processes get HF_ENDPOINT=the local server."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli_runner import FOURM_EVAL, cli_env
from hub_server import FakeHub

from fourm_eval import sweep as sw
from fourm_eval.checkpoints import locate_checkpoint
from fourm_eval.errors import CheckpointError
from fourm_eval.fixtures import default_tiny_checkpoint

DEIT_B = "timm/deit3_base_patch16_224.fb_in22k_ft_in1k"  # timm's published hub id for DeiT III B (in22k ft in1k)


@pytest.fixture
def hub():
    h = FakeHub()
    yield h
    h.close()


def _env(tmp: Path, hub: FakeHub, **extra) -> dict:
    return {**cli_env(tmp), "HF_HOME": str(tmp / "hf"), "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "COLUMNS": "250", **extra}


def _cli(args, tmp, env, timeout=300):
    return subprocess.run(FOURM_EVAL + args, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)


def _sweep_file(tmp: Path, backbones: dict, tasks=None, seeds=(0,)) -> Path:
    f = tmp / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "backbones": backbones,
                                 "tasks": tasks or {"in21k-cls": "smoke"}, "seeds": list(seeds)}))
    return f


def test_fetch_downloads_pins_and_guards_the_revision(tmp_path, hub):
    """`fetch`: downloads each hub file the sweep names (a 4M repository, and `hub` = timm's own id for a
    DeiT III baseline) with the sha256 of the served bytes; a second call downloads nothing; offline it is
    served by the cache; a corrupt cached blob is a named error; when the branch moves to a new commit, the
    lock's pin makes it an error naming both commits."""
    tiny = default_tiny_checkpoint().read_bytes()
    deit = b"deit3 weights stand-in for a fetch (never loaded)" * 1000
    c1 = hub.publish("test-org/tiny-4m", {"model.safetensors": tiny})
    cd = hub.publish(DEIT_B, {"model.safetensors": deit})
    f = _sweep_file(tmp_path, {"tiny": {"backbone": "4m", "checkpoint": "test-org/tiny-4m"},
                               "deit": {"backbone": "deit3-b", "checkpoint": "hub"}})
    out, env = tmp_path / "out", _env(tmp_path, hub)
    r = _cli(["fetch", str(f), "--out", str(out)], tmp_path, env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("downloaded") >= 2 and hub.gets("model.safetensors") == 2
    lock = json.loads((out / "weights.lock.json").read_text())["weights"]
    assert lock["test-org/tiny-4m@main:model.safetensors"]["commit"] == c1
    assert lock["test-org/tiny-4m@main:model.safetensors"]["sha256"] == hashlib.sha256(tiny).hexdigest()
    assert lock[f"{DEIT_B}@main:model.safetensors"]["commit"] == cd
    assert lock[f"{DEIT_B}@main:model.safetensors"]["sha256"] == hashlib.sha256(deit).hexdigest()

    r = _cli(["fetch", str(f), "--out", str(out)], tmp_path, env)
    assert r.returncode == 0 and r.stdout.count("cached") >= 2 and hub.gets("model.safetensors") == 2, r.stdout
    n = len(hub.requests)
    r = _cli(["fetch", str(f), "--out", str(out), "--offline"], tmp_path, env)
    assert r.returncode == 0 and r.stdout.count("cached") >= 2 and len(hub.requests) == n, r.stdout

    blob = next((tmp_path / "hf" / "hub").glob("models--timm--deit3*/blobs/*"))
    blob.write_bytes(b"x" * len(deit))  # a damaged copy of the cache, same size
    r = _cli(["fetch", str(f), "--out", str(out)], tmp_path, env)
    assert r.returncode == 1 and "the cache is corrupt" in r.stdout and str(blob.name) in r.stdout, r.stdout
    blob.write_bytes(deit)

    c2 = hub.publish("test-org/tiny-4m", {"model.safetensors": tiny + b"\0" * 8})  # `main` moved
    r = _cli(["fetch", str(f), "--out", str(out)], tmp_path, env)
    assert r.returncode == 1, r.stdout
    text = " ".join(r.stdout.split())
    assert f"now resolves to commit {c2[:12]}" in text and f"pinned commit {c1[:12]}" in text, text
    assert f"revision: {c1}" in text  # the fix, spelled out
    assert hub.gets("model.safetensors") == 2  # refused before the moved branch's file was downloaded


def test_offline_fetch_of_the_paper_table_names_every_missing_file(tmp_path):
    """`fetch table1` with HF_HUB_OFFLINE=1 and an empty cache: every one of the ten weights files is named
    (repository and file), exit 1, nothing written."""
    env = {**cli_env(tmp_path), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "COLUMNS": "250"}
    r = _cli(["fetch", "table1", "--out", str(tmp_path / "t1")], tmp_path, env)
    assert r.returncode == 1, r.stdout + r.stderr
    text = " ".join(r.stdout.split())
    for repo in ("EPFL-VILAB/4M-7_B_CC12M", "EPFL-VILAB/4M-7_L_CC12M", "EPFL-VILAB/4M-7_XL_CC12M",
                 "EPFL-VILAB/4M-21_B", "EPFL-VILAB/4M-21_L", "EPFL-VILAB/4M-21_XL",
                 "timm/deit3_base_patch16_224.fb_in22k_ft_in1k", "timm/deit3_large_patch16_224.fb_in22k_ft_in1k",
                 "timm/vit_base_patch16_224.mae", "timm/vit_large_patch16_224.mae"):
        assert f"{repo}/model.safetensors (revision main) is not in the local Hugging Face cache" in text, repo
    assert "10 of 10 hub file(s) missing" in text and not (tmp_path / "t1").exists()


def test_hub_errors_are_named(tmp_path, hub, monkeypatch):
    """A missing repository, revision or file on the hub, and an offline miss, each a CheckpointError naming it."""
    from huggingface_hub import constants

    hub.publish("test-org/tiny-4m", {"model.safetensors": b"abc"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for spec, words in (("test-org/nope", "no such repository"), ("test-org/tiny-4m@v9", "no revision 'v9'")):
        with pytest.raises(CheckpointError, match=words):
            locate_checkpoint(spec)
    with pytest.raises(CheckpointError, match="no file 'weights.bin'"):
        locate_checkpoint("test-org/tiny-4m", filename="weights.bin")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"test-org/tiny-4m/model.safetensors \(revision main\) is not in the "
                                              r"local Hugging Face cache .* offline"):
        locate_checkpoint("test-org/tiny-4m")


@pytest.mark.smoke_runs(("in21k-cls", 0))
def test_sweep_runs_the_pinned_commit_and_records_it(smoke_runs, tmp_path, hub):
    """A sweep whose backbone is a hub id: the sweep fetches it, pins the commit in its lock, the cell runs
    OWNER/NAME@COMMIT and its record holds the repository, revision, commit and sha256 (of the served
    bytes). The served file is the shipped tiny 4M, so the predictions equal the CI cell's (same weights,
    same run) byte for byte. Then the branch moves: the next sweep stops before running anything."""
    ref = smoke_runs.get("in21k-cls", 0)
    tiny = default_tiny_checkpoint().read_bytes()
    c1 = hub.publish("test-org/tiny-4m", {"model.safetensors": tiny})
    f = _sweep_file(tmp_path, {"4m": {"checkpoint": "test-org/tiny-4m"}})
    out, env = tmp_path / "out", {**_env(ref.base, hub), "HF_HOME": str(tmp_path / "hf")}
    r = _cli(["sweep", str(f), "--out", str(out), "--no-report"], tmp_path, env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    (cell,) = sw.expand(sw.load_sweep(f), out)
    assert f"test-org/tiny-4m@{c1}" in json.loads((cell.dir / sw.CELL_FILE).read_text())["command"]
    rec = json.loads((cell.dir / "result.json").read_text())
    sha = hashlib.sha256(tiny).hexdigest()
    assert rec["backbone"]["hub"] == {"repo_id": "test-org/tiny-4m", "filename": "model.safetensors",
                                      "revision": c1, "commit": c1, "sha256": sha, "size": len(tiny),
                                      "downloaded": False}
    assert rec["backbone"]["sha256"] == sha
    got = (cell.dir / "predictions" / "val_predictions.csv").read_bytes()
    assert got == (ref.work_dir / "predictions" / "val_predictions.csv").read_bytes()

    hub.publish("test-org/tiny-4m", {"model.safetensors": tiny + b"\0" * 8})
    f2 = _sweep_file(tmp_path, {"4m": {"checkpoint": "test-org/tiny-4m"}}, seeds=(0, 1))
    r = _cli(["sweep", str(f2), "--out", str(out), "--no-report"], tmp_path, env)
    text = " ".join((r.stdout + r.stderr).split())
    assert r.returncode != 0 and "nothing was run" in text and "now resolves to commit" in text, text[-3000:]
    assert "downloading" not in text  # refused before the new file is fetched
    assert not any((out / "in21k-cls").glob("4m/smoke-s1-*/run.json"))
