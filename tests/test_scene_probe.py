"""scene-probe's scoring by hand, its predictions files, and the decoder readout of the shipped tiny 4M.

(The task end to end is the CI sweep's cell: tests/test_ci_gate.py; the gate noticing a broken loader:
tests/test_probe_gate.py.)"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from fourm_eval.backbones import build_backbone
from fourm_eval.data.scenes import make_scene, patch_tokens
from fourm_eval.errors import PredictionsError
from fourm_eval.pretrain import (MEAN, STD, Recipe, decoder_readout, load_model, semantic_readout,
                                 shipped_checkpoint)
from fourm_eval.tasks import get_task
from fourm_eval.tasks.scene_probe import DECODER_FILE, PRED_FILE, patch_labels, read_predictions, score

TASK = get_task("scene-probe")


def test_patch_label_is_the_majority_with_ties_to_the_lower_class():
    ann = np.full((32, 48), 1, np.uint8)         # value 1 = class 0 (wall) everywhere
    ann[:16, :16][:8] = 4                         # patch (0,0): 128 px class 3, 128 px class 0: a tie -> 0
    ann[:16, 16:32][:9] = 4                       # patch (0,1): 144 px class 3 -> 3
    ann[16:, :16][:, :6] = 2                      # patch (1,0): 96 px class 1,
    ann[16:, :16][12:, 6:] = 6                    # 40 px class 5, 120 px class 0 -> 0
    ann[16:, 32:] = 8                             # patch (1,2): all class 7
    want = np.array([[0, 3, 0], [0, 0, 7]])
    assert (patch_labels(ann) == want).all()
    # the same rule as the tiny 4M's semantic tokens, on a generated scene
    _, lab, dep = make_scene(7, 3, 128)
    sem, _ = patch_tokens(lab, dep, 16, 16)
    assert (patch_labels(lab + 1).ravel() == sem).all()


def test_scores_by_hand():
    truth = {"a.png": np.array([[0, 0], [1, 2]]), "b.png": np.array([[0, 1], [1, 1]])}
    pred = {"b.png": np.array([[0, 1], [0, 1]]), "a.png": np.array([[0, 1], [1, 7]])}
    # correct: a 2 of 4 (the 0 at (0,0), the 1 at (1,0)), b 3 of 4 -> 5 / 8
    # recall: class 0: 2 of 3 (a(0,0), b(0,0); a(0,1) missed); class 1: 3 of 4; class 2: 0 of 1
    out = score(pred, truth, 8, "x")
    assert out["patch_acc"] == pytest.approx(5 / 8)
    assert out["mean_class_acc"] == pytest.approx((2 / 3 + 3 / 4 + 0) / 3)
    with pytest.raises(PredictionsError, match="no prediction for 1 of 2"):
        score({"a.png": truth["a.png"]}, truth, 8, "x")
    with pytest.raises(PredictionsError, match="a 1x4 grid, the scene has 2x2"):
        score({**pred, "a.png": np.zeros((1, 4), int)}, truth, 8, "x")


def test_predictions_files_rescored_from_the_annotations(tmp_path):
    """evaluate reads a run's predictions folder: the probe's file and the decoder's, rows in any order."""
    root = tmp_path / "scenes"
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
    truth = {}
    for i in range(3):
        ann = np.ones((32, 32), np.uint8)
        ann[16:] = 2 + i                          # bottom patches: class 1 + i
        for split in ("train", "val"):
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "images" / split / f"s{i}.png")
            Image.fromarray(ann).save(root / "annotations" / split / f"s{i}.png")
        truth[f"images/val/s{i}.png"] = np.array([[0, 0], [1 + i, 1 + i]])
    pred_dir = tmp_path / "pred"
    probe = {f: t.copy() for f, t in truth.items()}
    probe["images/val/s2.png"][1, 1] = 0           # 11 of 12 right
    TASK.write_predictions(pred_dir, list(reversed(list(probe.items()))))
    assert TASK.evaluate(pred_dir, root) == {"patch_acc": pytest.approx(11 / 12),
                                             "mean_class_acc": pytest.approx((1 + 1 + 1 + 0.5) / 4)}
    dec = {f: np.zeros((2, 2), int) for f in truth}  # only the top patches (class 0) right
    TASK.write_predictions(pred_dir, list(dec.items()), decoder=True)
    assert TASK.evaluate(pred_dir, root)["decoder_acc"] == pytest.approx(6 / 12)
    text = (pred_dir / PRED_FILE).read_text().splitlines()
    assert text[0] == "file,grid,classes" and text[1] == "images/val/s0.png,2x2,0 0 1 1"
    (pred_dir / DECODER_FILE).write_text("file,grid,classes\nimages/val/s0.png,2x2,0 0 9 1\n")
    with pytest.raises(PredictionsError, match="line 2: a class outside 0..7"):
        read_predictions(pred_dir / DECODER_FILE, 8)


def test_decoder_readout_is_the_pretrained_model_prediction(tmp_path):
    """Over the encoder as the suite's loader reads it, the file's decoder predicts what the pre-trained
    model itself predicts (its queries' own position table equals the encoder's for a correct encoder);
    a file without the decoder is named, not read out."""
    path = shipped_checkpoint()
    bb = build_backbone("4m", checkpoint=str(path)).eval()
    model, note = decoder_readout(path, bb)
    assert model is not None and "own tok_semseg@224 decoder" in note
    x = torch.stack([torch.from_numpy(make_scene(3000, i, 128)[0]).permute(2, 0, 1).float() for i in range(4)])
    x = (x - MEAN) / STD
    ref = load_model(path, Recipe())
    with torch.no_grad():
        want = ref(x, torch.arange(64).expand(4, -1))["tok_semseg_at_224"].argmax(-1)
    assert torch.equal(semantic_readout(model, x), want)

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        enc_only = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(("decoder", "mask_token"))}
    save_file(enc_only, str(tmp_path / "enc.safetensors"), metadata=meta)
    model, note = decoder_readout(tmp_path / "enc.safetensors", bb)
    assert model is None and "no tok_semseg@224 decoder" in note
