"""One padding rule for train and test (ViTDet): images padded to s x s with 0 after normalisation."""

import pytest
import torch

from fourm_eval.data.coco_mini import make_mini_coco
from fourm_eval.tasks import get_task
from fourm_eval.tasks.profiles import apply_overrides, load_profile
from task_context import run_context_for


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from mmdet.registry import DATASETS, MODELS
    from mmengine.registry import DefaultScope

    tmp = tmp_path_factory.mktemp("pad")
    root = make_mini_coco(tmp / "coco", n_train=4, n_val=4, seed=2, size_range=(96, 128))
    task = get_task("coco-det")
    # s = 192 and a jitter below 1: every training image is smaller than s, so every one is padded
    p = apply_overrides(load_profile(task.name, "smoke"), ["image_size=192", "lsj_scale=[0.5, 0.6]"])
    data = task.check_data(root, p, skip_bad_images=False, out_dir=tmp / "data", log=lambda _: None)
    task.register_mm()
    parts = task.runner_parts(run_context_for(task, p, data, tmp / "pred"))
    with DefaultScope.overwrite_default_scope("mmdet"):
        pre = MODELS.build(parts["model"]["data_preprocessor"])
        train, val = DATASETS.build(parts["train_dataset"]), DATASETS.build(parts["val_dataset"])
    return pre, train, val


@pytest.mark.parametrize("split", ["train", "val"])
def test_padding_is_zero_after_normalisation(built, split):
    pre, train, val = built
    ds = train if split == "train" else val
    for i in range(len(ds)):
        item = ds[i]
        h, w = item["inputs"].shape[-2:]
        assert h < 192 or w < 192, "the image must need padding for this test"
        out = pre({"inputs": [item["inputs"]], "data_samples": [item["data_samples"]]}, training=split == "train")
        x = out["inputs"][0]
        assert tuple(x.shape[-2:]) == (192, 192)
        assert torch.all(x[:, h:, :] == 0) and torch.all(x[:, :, w:] == 0)
        assert torch.any(x[:, :h, :w] != 0)
        # the content is the normalised image, not shifted
        mean = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375]).view(3, 1, 1)
        expect = (item["inputs"][[2, 1, 0]].float() - mean) / std  # BGR -> RGB, then normalised
        assert torch.allclose(x[:, :h, :w], expect, atol=1e-5)
