"""The paths a large model takes, on CPU with tiny models: activation checkpointing (4M and the timm
baselines, through the multi-block feature path the dense tasks use) reproduces the plain loss curve,
and bf16 autocast (the optimiser wrapper `run` uses for amp bf16) follows it closely.

Tolerances: checkpointing recomputes the same fp32 arithmetic, so the curves agree to 1e-5 relative;
bf16 rounds activations to 8 mantissa bits, and over 6 AdamW steps the loss stays within 2%.
Each path is also shown to be taken (fewer bytes saved for backward; bf16 tensors inside the
forward), so an ignored switch cannot pass as an equal curve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fourm_eval.backbones import build_backbone

STEPS = 6


def _backbone(kind: str, ckpt: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "4m":
        return build_backbone("4m-b", dim=64, depth=4, num_heads=4, grad_checkpointing=ckpt)
    return build_backbone("deit3-b", embed_dim=64, depth=4, num_heads=4, img_size=64, grad_checkpointing=ckpt)


class _Model(nn.Module):
    """Backbone -> blocks 1 and 3 (the dense tasks' multi-block path) -> pooled -> linear."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        torch.manual_seed(1)
        self.head = nn.Linear(2 * 64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.get_intermediate_layers(x, [1, 3])
        return self.head(torch.cat([f.mean(1) for f in feats], -1))


def _data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 64, 64, generator=g), torch.randint(0, 3, (4,), generator=g)


def _curve(kind: str, ckpt: bool = False, bf16: bool = False) -> list[float]:
    from fourm_eval.tasks.mm import Bf16OptimWrapper
    from mmengine.optim import OptimWrapper

    model = _Model(_backbone(kind, ckpt)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapper = (Bf16OptimWrapper if bf16 else OptimWrapper)(optimizer=opt)
    x, y = _data()
    out = []
    for _ in range(STEPS):
        with wrapper.optim_context(model):
            loss = nn.functional.cross_entropy(model(x).float(), y)
        wrapper.update_params(loss)
        out.append(loss.item())
    return out


def _saved_bytes(kind: str, ckpt: bool) -> int:
    model = _Model(_backbone(kind, ckpt)).train()
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, _ = _data()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["4m", "deit3"])
def test_activation_checkpointing_gives_the_plain_loss_curve(kind):
    plain, ckpt = _curve(kind), _curve(kind, ckpt=True)
    assert plain[-1] < plain[0]  # it learns
    torch.testing.assert_close(torch.tensor(ckpt), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    # and checkpointing was on: the blocks' inner activations are not kept for backward
    assert _saved_bytes(kind, True) < 0.5 * _saved_bytes(kind, False)


def test_bf16_autocast_follows_the_fp32_loss_curve_on_cpu():
    plain, bf16 = _curve("4m"), _curve("4m", bf16=True)
    rel = [abs(b - p) / abs(p) for p, b in zip(plain, bf16)]
    assert max(rel) < 0.02, (plain, bf16)
    assert bf16 != plain  # bf16 arithmetic happened (an ignored autocast would give the fp32 curve exactly)
    # the forward inside the wrapper's context runs the linears in bf16
    from fourm_eval.tasks.mm import Bf16OptimWrapper

    model = _Model(_backbone("4m", False))
    wrapper = Bf16OptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    with wrapper.optim_context(model):
        assert model(_data()[0]).dtype == torch.bfloat16
