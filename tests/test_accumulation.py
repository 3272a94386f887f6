"""The total batch is the profile's whatever the split: batch_split's arithmetic, and the training
loop that makes one iteration one optimiser step over accumulated micro-batches (mmengine's
``accumulative_counts``) gives the step of one batch of the total size, also after a resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fourm_eval.errors import ConfigError
from fourm_eval.tasks.runner import batch_split


def test_batch_split_keeps_the_total_or_refuses():
    assert batch_split(16, 1) == (16, 1)
    assert batch_split(16, 8) == (2, 1)
    assert batch_split(16, 2, per_gpu=2) == (2, 4)
    assert batch_split(256, 8, per_gpu=4) == (4, 8)
    with pytest.raises(ConfigError, match=r"does not split evenly over 3 processes"):
        batch_split(16, 3)
    with pytest.raises(ConfigError, match=r"Per-process batches that keep the total: 1, 2, 4, 8"):
        batch_split(16, 2, per_gpu=3)


class _Sample(torch.utils.data.Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 5, generator=g), torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i]}


def _toy_model():
    from mmengine.model import BaseModel

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            torch.manual_seed(1)
            self.lin = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))

        def forward(self, x, y, mode="loss"):
            return {"loss": ((self.lin(x) - y) ** 2).mean()}

    return Toy()


def _train(tmp_path, name: str, per_gpu: int, accumulation: int, iters: int, resume_from=None, data=None):
    """One mmengine Runner with the project's loop: SGD (plain, so a step is -lr x gradient)."""
    import fourm_eval.tasks.mm  # noqa: F401  (registers the loop)
    from fourm_eval.tasks.state import allow_mmengine_checkpoint_types
    from mmengine.runner import Runner

    allow_mmengine_checkpoint_types()

    data = data or _Sample(64)
    runner = Runner(
        model=_toy_model(), work_dir=str(tmp_path / name),
        train_dataloader=dict(dataset=data, batch_size=per_gpu, num_workers=0,
                              sampler=dict(type="InfiniteSampler", shuffle=False),
                              collate_fn=dict(type="default_collate")),
        train_cfg=dict(type="AccumulatingIterBasedTrainLoop", max_iters=iters, val_interval=10 ** 6,
                       accumulation=accumulation),
        optim_wrapper=dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1),
                           accumulative_counts=accumulation),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=1),
                           logger=dict(type="LoggerHook", interval=1)),
        custom_hooks=[dict(type="CheckpointStateHook")],  # as `run`: checkpoints load with weights_only
        load_from=resume_from, resume=resume_from is not None, default_scope="mmengine",
        log_level="WARNING", randomness=dict(seed=0), experiment_name=f"{tmp_path.name}-{name}")
    runner.train()
    return runner.model, data


def test_four_micro_batches_give_the_step_of_one_batch_of_four(tmp_path):
    acc, data = _train(tmp_path, "acc", per_gpu=1, accumulation=4, iters=1)
    one, _ = _train(tmp_path, "one", per_gpu=4, accumulation=1, iters=1)
    # the independent truth: the gradient of the mean loss over the first four samples, by hand
    ref = _toy_model()
    loss = ((ref.lin(data.x[:4]) - data.y[:4]) ** 2).mean()
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, p_acc), p_one, p0, g in zip(acc.named_parameters(), one.parameters(), ref.parameters(), grads):
        expected = p0.detach() - 0.1 * g
        torch.testing.assert_close(p_one.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(p_acc.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(acc.lin[0].weight, ref.lin[0].weight)  # a step was taken


def test_a_resumed_accumulating_run_continues_with_the_next_micro_batches(tmp_path):
    """Two optimiser steps of 2 x 2 micro-batches straight through, and the same run stopped after
    step 1 and resumed from its checkpoint, end on the same weights: the resume skipped exactly the
    four samples step 1 used (not one per step, as mmengine's own loop would)."""
    straight, data = _train(tmp_path, "straight", per_gpu=2, accumulation=2, iters=2)
    _train(tmp_path, "stopped", per_gpu=2, accumulation=2, iters=1, data=data)
    resumed, _ = _train(tmp_path, "resumed", per_gpu=2, accumulation=2, iters=2, data=data,
                        resume_from=str(tmp_path / "stopped" / "iter_1.pth"))
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7, msg=name)
    # and a wrong skip would show: a run whose step 2 reuses step 1's samples ends elsewhere
    wrong, _ = _train(tmp_path, "wrong", per_gpu=2, accumulation=2, iters=2, data=_Repeat(data, 4))
    assert not torch.allclose(wrong.lin[0].weight, straight.lin[0].weight)


class _Repeat(torch.utils.data.Dataset):
    """The first ``n`` samples of ``data`` over and over."""

    def __init__(self, data, n: int):
        self.data, self.n = data, n

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return self.data[i % self.n]
