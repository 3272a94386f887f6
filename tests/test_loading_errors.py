"""Bad checkpoints fail loudly with the file and the problem named; pickle needs an opt-in."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourm_eval.backbones import build_backbone
from fourm_eval.checkpoints import parse_metadata
from fourm_eval.errors import CheckpointError, ConfigError


def test_truncated_file(tmp_path, official_ckpt):
    data = official_ckpt.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated.safetensors.*truncated"):
        build_backbone("4m", checkpoint=bad)


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "notes.safetensors"
    bad.write_text("this is a text file, not weights\n" * 10)
    with pytest.raises(CheckpointError, match="notes.safetensors.*not a safetensors file"):
        build_backbone("4m", checkpoint=bad)


def test_non_4m_safetensors(tmp_path):
    other = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, str(other))
    with pytest.raises(CheckpointError, match=r"resnet.safetensors.*no 4M encoder weights"):
        build_backbone("4m", checkpoint=other)


def test_missing_encoder_keys_are_listed(tmp_path, official_ckpt):
    sd = load_file(str(official_ckpt))
    from safetensors import safe_open
    with safe_open(str(official_ckpt), "pt") as f:
        meta = f.metadata()
    del sd["encoder.1.mlp.fc3.weight"], sd["encoder_norm.weight"]
    bad = tmp_path / "partial.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError) as e:
        build_backbone("4m", checkpoint=bad)
    msg = str(e.value)
    assert "partial.safetensors" in msg and "encoder.1.mlp.fc3.weight" in msg and "encoder_norm.weight" in msg


def test_shape_mismatch_is_reported(tmp_path, official_ckpt):
    sd = load_file(str(official_ckpt))
    from safetensors import safe_open
    with safe_open(str(official_ckpt), "pt") as f:
        meta = dict(f.metadata())
    sd["encoder.0.attn.proj.weight"] = torch.zeros(64, 32)
    bad = tmp_path / "shape.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match=r"encoder.0.attn.proj.weight: file \(64, 32\) vs model \(64, 64\)"):
        build_backbone("4m", checkpoint=bad)


def test_wrong_named_size_for_file(official_ckpt):
    with pytest.raises(CheckpointError, match="differs from the requested size"):
        build_backbone("4m-b", checkpoint=official_ckpt)


def test_nonzero_bias_in_bias_free_norm(tmp_path, official_ckpt):
    sd = load_file(str(official_ckpt))
    from safetensors import safe_open
    with safe_open(str(official_ckpt), "pt") as f:
        meta = dict(f.metadata())
    sd["encoder.0.norm1.bias"] = torch.ones(64)
    bad = tmp_path / "bias.safetensors"
    save_file(sd, str(bad), metadata=meta)
    with pytest.raises(CheckpointError, match="encoder.0.norm1.bias is non-zero"):
        build_backbone("4m", checkpoint=bad)


def test_metadata_is_parsed_safely():
    meta = parse_metadata({"dim": "768", "qk_norm": "False", "domains_in": "['rgb@224', 'caption']",
                           "x": "None", "evil": "__import__('os').system('echo pwned')", "big": "1" * 10_001})
    assert meta["dim"] == 768 and meta["qk_norm"] is False and meta["domains_in"] == ["rgb@224", "caption"]
    assert meta["x"] is None
    assert meta["evil"] == "__import__('os').system('echo pwned')"  # stays text, never run
    assert meta["big"] == "1" * 10_001


def _training_checkpoint(tmp_path: Path, official_ckpt: Path) -> Path:
    sd = load_file(str(official_ckpt))
    path = tmp_path / "checkpoint-10.pth"
    # like the official trainer: weights under 'model' next to an argparse Namespace
    torch.save({"model": sd, "epoch": 10, "args": argparse.Namespace(model="fm_tiny")}, path)
    return path


def test_pickle_requires_opt_in(tmp_path, official_ckpt):
    path = _training_checkpoint(tmp_path, official_ckpt)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        build_backbone("4m", checkpoint=path)


def test_pickle_with_opt_in_infers_config(tmp_path, official_ckpt, official_ref):
    path = _training_checkpoint(tmp_path, official_ckpt)
    bb = build_backbone("4m", checkpoint=path, allow_pickle=True).eval()
    assert bb.num_heads == 1  # dim 64 / 64: the shapes cannot tell heads; the documented default applies
    # weights-only pickles load without the flag (no code runs)
    pure = tmp_path / "weights.pth"
    torch.save(load_file(str(official_ckpt)), pure)
    bb2 = build_backbone("4m", checkpoint=pure)
    assert bb2.embed_dim == 64 and bb2.num_layers == 2


def test_architecture_overrides_conflict_with_checkpoint(official_ckpt):
    with pytest.raises(ConfigError):
        build_backbone("4m", checkpoint=official_ckpt, dim=128)


def test_missing_file_and_unknown_backbone(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_backbone("4m", checkpoint=tmp_path / "nope.safetensors")
    with pytest.raises(ConfigError, match="unknown backbone"):
        build_backbone("resnet50")
    with pytest.raises(ConfigError, match="needs a checkpoint"):
        build_backbone("4m")


def _hub_lookup(cache: Path, repo: str) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom fourm_eval.backbones import build_backbone\nfrom fourm_eval.errors import CheckpointError\n"
            f"try:\n    bb = build_backbone('4m', checkpoint={repo!r})\n    print('OK', bb.embed_dim, bb.source)\n"
            "except CheckpointError as e:\n    print('ERR', e)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                          cwd=cache)


def test_hub_id_resolved_from_the_local_cache_offline(tmp_path, official_ckpt):
    cache = tmp_path / "hub"
    repo_dir = cache / "models--EPFL-VILAB--4M-7_B_CC12M"
    snap = repo_dir / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("0" * 40)
    (snap / "model.safetensors").write_bytes(official_ckpt.read_bytes())
    r = _hub_lookup(cache, "EPFL-VILAB/4M-7_B_CC12M")
    assert r.stdout.startswith("OK 64"), r.stdout + r.stderr
    r = _hub_lookup(cache, "EPFL-VILAB/4M-21_XL")
    assert "ERR" in r.stdout and "not in the local Hugging Face cache" in r.stdout and "offline" in r.stdout, \
        r.stdout + r.stderr
