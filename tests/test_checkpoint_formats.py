"""A checkpoint's kind comes from its structure, a 4M file with metadata is built from it,
and an architecture read from tensor shapes is never silent.

Ground truth: the official fixture output (tests/data) and tests/reference_impl.py,
a literal implementation of the checkpoint doc validated on that output."""

import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fourm_eval.backbones import backbone_info, build_backbone
from fourm_eval.checkpoints import detect_format
from fourm_eval.errors import CheckpointError, FourmEvalWarning
from fourm_eval.fixtures import make_fourm_state_dict
from reference_impl import reference_forward


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _official(official_ckpt: Path) -> tuple[dict, dict]:
    with safe_open(str(official_ckpt), "pt") as f:
        meta = dict(f.metadata())
    return load_file(str(official_ckpt)), meta


def _write_with_header_len(path: Path, sd: dict, meta: dict, want) -> Path:
    """Save with a padding metadata entry sized so that the header length is the
    smallest n >= the unpadded one with ``want(n)`` (the JSON grows one byte per
    padding character; safetensors pads it to a multiple of 8)."""
    save_file(sd, str(path), metadata={**meta, "zz_pad": ""})
    n0 = _header_len(path)
    target = next(n for n in range(n0, n0 + 200_000, 8) if want(n))
    for k in range(max(0, target - n0 - 16), target - n0 + 16):
        save_file(sd, str(path), metadata={**meta, "zz_pad": "x" * k})
        if _header_len(path) == target:
            return path
    raise AssertionError(f"no padding gave a header of {target} bytes")


def test_every_header_length_residue(tmp_path, official_ckpt, official_ref):
    """safetensors pads headers to multiples of 8: all 32 residues mod 256, including 0x80
    (the pickle opcode byte), are read as safetensors with their metadata (4 heads)."""
    sd, meta = _official(official_ckpt)
    files: dict[int, Path] = {}
    k = 0
    while len(files) < 32:
        p = tmp_path / f"pad{k}.safetensors"
        save_file(sd, str(p), metadata={**meta, "zz_pad": "x" * k})
        r = _header_len(p) % 256
        if r in files:
            p.unlink()
        else:
            files[r] = p
        k += 1
        assert k < 2000
    assert sorted(files) == list(range(0, 256, 8))
    assert files[128].read_bytes()[:1] == b"\x80"
    x, ref = official_ref["input"], official_ref["output"]
    for r, p in sorted(files.items()):
        assert detect_format(p) == "safetensors", r
        info = backbone_info("4m", p)
        assert info["config_source"] == "metadata" and info["file_format"] == "safetensors", r
        bb = build_backbone("4m", checkpoint=p).eval()
        assert bb.num_heads == 4 and bb.config_source == "metadata" and not bb.config_guessed, r
        with torch.no_grad():
            assert (bb(x) - ref).abs().max().item() <= 1e-4, r


FOURM7_DOMAINS = ["rgb@224", "tok_rgb@224", "tok_depth@224", "tok_normal@224", "tok_semseg@224",
                  "tok_clip@224", "caption", "det"]


def _fourm7_like(tmp_path: Path) -> tuple[Path, dict]:
    """The issue's file: SwiGLU without biases, dim 32, 4 heads, 3 blocks, the 4M-7 domain
    list, the embeddings of every domain, and a JSON header of exactly 10,880 bytes."""
    sd, meta = make_fourm_state_dict(dim=32, depth=3, num_heads=4, seed=11)
    g = torch.Generator().manual_seed(5)
    for d in FOURM7_DOMAINS[1:]:
        sd[f"encoder_embeddings.{d}.token_emb.weight"] = torch.randn(64, 32, generator=g)
        sd[f"encoder_embeddings.{d}.mod_emb"] = torch.randn(1, 1, 32, generator=g)
        sd[f"decoder_embeddings.{d}.to_logits.weight"] = torch.randn(64, 32, generator=g)
    meta["domains_in"] = str(FOURM7_DOMAINS)
    meta["domains_out"] = str(FOURM7_DOMAINS[1:])
    path = _write_with_header_len(tmp_path / "fm7.safetensors", sd, meta, lambda n: n == 10_880)
    assert path.read_bytes()[:1] == b"\x80"
    return path, sd


@pytest.mark.parametrize("size", [224, 256, 512])
def test_released_format_file_with_0x80_header(tmp_path, size):
    path, sd = _fourm7_like(tmp_path)
    bb = build_backbone("4m", checkpoint=path).eval()
    assert bb.num_heads == 4 and not bb.cfg.norm_bias and bb.file_format == "safetensors"
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        ref = reference_forward(sd, dict(dim=32, num_heads=4, depth=3, gated_mlp=True, act="SiLU"), x)
        assert (bb(x) - ref).abs().max().item() <= 1e-4


def test_pickles_and_zips_are_still_recognised(tmp_path, official_ckpt):
    sd, _ = _official(official_ckpt)
    z = tmp_path / "zip.pth"
    torch.save({"model": sd}, z)
    raw = tmp_path / "raw.pth"
    torch.save({"model": sd}, raw, _use_new_zipfile_serialization=False)
    assert z.read_bytes()[:4] == b"PK\x03\x04" and raw.read_bytes()[:1] == b"\x80"
    assert detect_format(z) == "torch-zip" and detect_format(raw) == "pickle"
    for p, kind in ((z, "torch-zip"), (raw, "pickle")):
        with pytest.warns(FourmEvalWarning, match="inferred from tensor shapes"):
            bb = build_backbone("4m", checkpoint=p)
        assert bb.file_format == kind and bb.config_source == "shapes"


def test_content_beats_suffix(tmp_path, official_ckpt, official_ref):
    """A safetensors file named .pth is read as safetensors, with its metadata; the mismatch is said."""
    p = tmp_path / "renamed.pth"
    p.write_bytes(official_ckpt.read_bytes())
    with pytest.warns(FourmEvalWarning, match=r"suffix '.pth' says pickle, the content is safetensors"):
        bb = build_backbone("4m", checkpoint=p).eval()
    assert bb.num_heads == 4 and bb.config_source == "metadata"
    with torch.no_grad():
        assert (bb(official_ref["input"]) - official_ref["output"]).abs().max() <= 1e-4


def test_unknown_kind_is_named(tmp_path):
    p = tmp_path / "weights.bin"
    p.write_bytes(b"GGUF" + bytes(100))
    with pytest.raises(CheckpointError, match=r"weights.bin: not a checkpoint fourm-eval can read"):
        build_backbone("4m", checkpoint=p)


def test_pth_without_metadata_warns_and_can_be_told_the_heads(tmp_path, official_ckpt, official_ref):
    sd, _ = _official(official_ckpt)
    p = tmp_path / "noconfig.pth"
    torch.save(sd, p)
    with pytest.warns(FourmEvalWarning, match=r"num_heads = 1 \(dim / 64"):
        bb = build_backbone("4m", checkpoint=p)
    assert bb.config_source == "shapes" and "num_heads" in bb.config_guessed
    assert bb.cfg.norm_bias is False  # the norm-bias tensors are zeros: read, not guessed
    assert any("guessed" in n for n in bb.load_notes)
    info = backbone_info("4m", p)
    assert info["config_source"] == "shapes" and "num_heads" in info["config_guessed"] and info["load_notes"]
    # stating the head count removes that guess and gives the official output
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb4 = build_backbone("4m", checkpoint=p, num_heads=4).eval()
    assert "num_heads" not in bb4.config_guessed and bb4.num_heads == 4
    assert not any("num_heads =" in str(w.message) for w in caught)
    with torch.no_grad():
        assert (bb4(official_ref["input"]) - official_ref["output"]).abs().max() <= 1e-4
    # a head count that contradicts metadata is refused
    with pytest.raises(CheckpointError, match="metadata says num_heads 4"):
        build_backbone("4m", checkpoint=official_ckpt, num_heads=2)


def test_several_weight_entries_are_named(tmp_path, official_ckpt):
    sd, _ = _official(official_ckpt)
    p = tmp_path / "train.pth"
    torch.save({"model": sd, "model_ema": sd}, p)
    with pytest.warns(FourmEvalWarning, match=r"several weight entries \['model', 'model_ema'\]; using 'model'"):
        bb = build_backbone("4m", checkpoint=p, num_heads=4)
    assert any("model_ema" in n for n in bb.load_notes)


@pytest.mark.parametrize("change,match", [
    (lambda sd, m: m.update(encoder_depth="1"), r"encoder_depth 1 but the file has encoder blocks 0..1"),
    (lambda sd, m: m.update(gated_mlp="False"), r"gated_mlp=False but encoder.0.mlp.fc3.weight is present"),
    (lambda sd, m: m.update(qkv_bias="True"), r"qkv_bias=True but encoder.0.attn.qkv.bias is absent"),
    (lambda sd, m: m.update(mlp_ratio="2.0"), r"mlp_ratio 2.0 gives a hidden size of 85"),
    (lambda sd, m: m.update(dim="128"), r"RGB patch embedding \[64, 768\] vs dim 128"),
])
def test_metadata_contradicting_tensors_is_an_error(tmp_path, official_ckpt, change, match):
    sd, meta = _official(official_ckpt)
    change(sd, meta)
    p = tmp_path / "contradiction.safetensors"
    save_file(sd, str(p), metadata=meta)
    with pytest.raises(CheckpointError, match=r"contradiction.safetensors: the header metadata contradicts"):
        build_backbone("4m", checkpoint=p)
    with pytest.raises(CheckpointError, match=match):
        build_backbone("4m", checkpoint=p)


def test_truncated_file_starting_like_a_pickle_is_called_truncated(tmp_path, official_ckpt):
    sd, meta = _official(official_ckpt)
    p = _write_with_header_len(tmp_path / "cut.safetensors", sd, meta, lambda n: n % 256 == 0x80
                               and 2 <= (n >> 8) % 256 <= 5)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert detect_format(p) == "safetensors"
    with pytest.raises(CheckpointError, match="truncated"):
        build_backbone("4m", checkpoint=p)


def test_metadata_without_act_layer_is_a_named_guess(tmp_path, official_ckpt):
    sd, meta = _official(official_ckpt)
    del meta["act_layer"]
    p = tmp_path / "noact.safetensors"
    save_file(sd, str(p), metadata=meta)
    with pytest.warns(FourmEvalWarning, match="no act_layer; assuming SiLU"):
        bb = build_backbone("4m", checkpoint=p)
    assert bb.config_source == "metadata" and "act_layer" in bb.config_guessed
    assert any("act_layer = SiLU" in n for n in bb.load_notes)


def test_several_rgb_embeddings_are_not_chosen_silently(tmp_path, official_ckpt):
    sd, meta = _official(official_ckpt)
    sd["encoder_embeddings.rgb@448.proj.weight"] = sd["encoder_embeddings.rgb@224.proj.weight"].clone()
    p = tmp_path / "tworgb.safetensors"
    save_file(sd, str(p), metadata=meta)
    with pytest.raises(CheckpointError, match=r"several RGB patch embeddings \['rgb@224', 'rgb@448'\]"):
        build_backbone("4m", checkpoint=p)
