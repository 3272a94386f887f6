"""Frozen-feature probes: the feature cache (fourm_eval/features.py), DINOv2's kNN and the linear grid
(fourm_eval/probes.py), and the probe modes of the classification task end to end (tasks/probe_run.py)."""

import json
import math

import numpy as np
import pytest
import torch

from cli_runner import run_cli

from fourm_eval.features import extract, read_cache
from fourm_eval.probes import Head, choose, holdout_split, knn_predict, linear_grid


def _knn_by_hand(train, train_labels, test, num_classes, k, t):
    """DINO's weighted kNN written out with numpy loops: cosine similarity, the k most similar, weights
    exp(sim / T) normalised over them, summed per class."""
    tr = train / np.linalg.norm(train, axis=1, keepdims=True)
    te = test / np.linalg.norm(test, axis=1, keepdims=True)
    out = np.zeros((len(te), num_classes))
    for i, q in enumerate(te):
        sims = [(float(np.dot(q, x)), j) for j, x in enumerate(tr)]
        sims.sort(key=lambda s: -s[0])
        top = sims[:k]
        w = np.array([math.exp(s / t) for s, _ in top])
        w /= w.sum()
        for (s, j), wj in zip(top, w):
            out[i, train_labels[j]] += wj
    return out


def test_knn_agrees_with_a_brute_force_vote():
    g = np.random.default_rng(0)
    centres = g.normal(size=(4, 16))
    y_tr = g.integers(0, 4, size=60)
    x_tr = centres[y_tr] + g.normal(scale=1.5, size=(60, 16))
    y_te = g.integers(0, 4, size=25)
    x_te = centres[y_te] + g.normal(scale=1.5, size=(25, 16))
    got = knn_predict(torch.tensor(x_tr), torch.tensor(y_tr), torch.tensor(x_te), 4, ks=(1, 5, 20), temperature=0.07,
                      chunk=7)  # several chunks
    for k in (1, 5, 20):
        want = _knn_by_hand(x_tr, y_tr, x_te, 4, k, 0.07)
        np.testing.assert_allclose(got[k].numpy(), want, atol=1e-5)
    with pytest.raises(ValueError, match="61 neighbours"):
        knn_predict(torch.tensor(x_tr), torch.tensor(y_tr), torch.tensor(x_te), 4, ks=(61,))


def test_the_grid_chooses_on_held_out_training_images_never_on_val():
    """A planted head: perfect on validation, wrong on every held-out training image. The other head is
    merely decent on both. The chosen head is the decent one; both validation scores are in the grid."""
    assert choose([Head("planted", 0.1, 1, "mean", heldout_top1=0.0, val_top1=1.0),
                   Head("decent", 0.1, 4, "mean", heldout_top1=0.6, val_top1=0.6)]).name == "decent"
    c, n = 4, 200
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % c
    val_labels = torch.arange(80) % c
    _, held = holdout_split(labels, 0.1, seed=0)
    is_held = torch.zeros(n, dtype=torch.bool)
    is_held[held] = True
    eye = torch.eye(c) * 5
    planted_train = torch.where(is_held[:, None], eye[(labels + 1) % c], eye[labels])  # held-out: shifted labels
    planted_val = eye[val_labels]                                                          # val: exact
    noisy = lambda y: eye[y] + torch.randn(len(y), c, generator=g) * 4.0  # noqa: E731
    inputs = {(1, "mean"): (planted_train, planted_val), (4, "mean"): (noisy(labels), noisy(val_labels))}
    heads, best, info = linear_grid(inputs, labels, c, lrs=(0.5,), epochs=30, batch_size=32, holdout=0.1, seed=0,
                                    val_labels=val_labels)
    planted = next(h for h in heads if h.n_last == 1)
    assert planted.val_top1 == 1.0 and planted.heldout_top1 == 0.0
    assert best.n_last == 4 and best.val_probs is not None and info["heldout_images"] == len(held)


def test_holdout_is_per_class_and_seeded():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 1)
    fit, held = holdout_split(labels, 0.1, seed=3)
    assert sorted(labels[held].tolist()) == [0, 0, 1]  # 10% of 20, of 10; a one-image class is not held out
    assert set(fit.tolist()) | set(held.tolist()) == set(range(31)) and not set(fit.tolist()) & set(held.tolist())
    assert torch.equal(holdout_split(labels, 0.1, seed=3)[1], held)
    assert not torch.equal(holdout_split(labels, 0.1, seed=4)[1], held)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n, broken=False):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 64, 64, generator=g)
        self.broken = broken

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.broken:
            raise AssertionError("an image was opened although the features are cached")
        return {"inputs": self.x[i], "label": i % 3, "file": f"img{i:03d}.png"}


def test_feature_cache_matches_the_encoder_resumes_and_reads_back(tmp_path):
    """The cached fp16 features equal the encoder's own mean tokens after the final norm; a run killed
    after two of three shards resumes after them and gives the same cache; a second call with the same
    key opens no image; another transform, or the same weights computing another function, is another key."""
    from fourm_eval.backbones import build_backbone
    from fourm_eval.fixtures import default_tiny_checkpoint

    bb = build_backbone("4m", checkpoint=default_tiny_checkpoint()).eval()
    ds = _Images(20)
    parts = {"weights": "tiny", "dataset": "synthetic", "transform": {"size": 64}}
    kw = dict(key_parts=parts, cache_root=tmp_path / "cache", blocks=[-2, -1], shard_size=8, batch_size=4)
    full = extract(bb, ds, **kw)
    with torch.no_grad():
        want = torch.stack(bb.get_intermediate_layers(ds.x, [2, 3], norm=True), dim=1).mean(dim=2)
    assert full.mean.dtype == torch.float16 and full.mean.shape == (20, 2, 128) and full.blocks == [2, 3]
    torch.testing.assert_close(full.mean.float(), want, atol=2e-3, rtol=2e-3)
    assert full.labels.tolist() == [i % 3 for i in range(20)] and full.files[-1] == "img019.png"

    # a kill after the second shard: the last shard and the index never written
    (full.path / "index.json").unlink()
    (full.path / "shard-00002.safetensors").unlink()
    lines = []
    again = extract(bb, ds, say=lines.append, **kw)
    assert any("after 2 complete shard(s) of 3" in s for s in lines) and not again.from_cache
    assert torch.equal(again.mean, full.mean) and again.files == full.files

    cached = extract(bb, _Images(20, broken=True), **kw)
    assert cached.from_cache and torch.equal(cached.mean, full.mean)
    other = extract(bb, ds, **{**kw, "key_parts": {**parts, "transform": {"size": 96}}})
    assert other.key != full.key
    # the same weights under other model code (the position table transposed, as a loader bug would):
    # another key, extracted anew, never the features the intact encoder left in the cache
    table = bb.pos_embed

    def transposed(rows, cols, device, dtype):
        return table(rows, cols, device, dtype).reshape(1, rows, cols, -1).transpose(1, 2).reshape(1, rows * cols, -1)

    bb.pos_embed = transposed
    moved = extract(bb, ds, **kw)
    assert moved.key != full.key and not moved.from_cache and not torch.equal(moved.mean, full.mean)
    assert read_cache(tmp_path / "cache" / "nope") is None


def test_probe_modes_run_end_to_end_and_rescore(tmp_path):
    """`run in1k-cls --profile knn-smoke` and `linear-grid-smoke` on the mini ImageNet: ordinary records
    (protocol, every k / the 16-head grid), predictions in the task's format that `evaluate` rescores to
    the record's metrics; the linear grid's metric is its chosen head's (best held-out) validation top-1."""
    knn = run_cli(["run", "in1k-cls", "--profile", "knn-smoke", "--work-dir", str(tmp_path / "knn")], tmp_path)
    assert knn.returncode == 0, knn.stdout[-3000:] + knn.stderr[-3000:]
    rec = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert rec["config"]["protocol"] == "dinov2-knn" and rec["backbone"]["frozen"] is True
    assert set(rec["probe"]["k"]) == {"10", "20", "100", "200"} and rec["probe"]["reported_k"] == 20
    assert rec["metrics"]["top1"] == rec["probe"]["k"]["20"]["top1"] > 0.1  # above chance (10 classes)
    ev = run_cli(["evaluate", "in1k-cls", "--predictions", str(tmp_path / "knn" / "predictions")], tmp_path)
    assert ev.returncode == 0 and f"{rec['metrics']['top1']:.6f}" in ev.stdout, ev.stdout + ev.stderr

    grid = run_cli(["run", "in1k-cls", "--profile", "linear-grid-smoke", "--work-dir", str(tmp_path / "grid")],
                   tmp_path)
    assert grid.returncode == 0, grid.stdout[-3000:] + grid.stderr[-3000:]
    g = json.loads((tmp_path / "grid" / "result.json").read_text())
    heads = g["probe"]["grid"]
    assert len(heads) == 16 and g["probe"]["heads"] == 16
    best = max(heads, key=lambda h: h["heldout_top1"])  # max returns the first of equals, as the grid does
    assert g["probe"]["chosen"]["name"] == best["name"]
    assert g["metrics"]["top1"] == pytest.approx(best["val_top1"], abs=1e-6)
