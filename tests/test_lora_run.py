"""`fourm-eval run nyu-depth --profile lora-smoke` end to end (built-in mini NYU, tiny 4M, CPU): LoRA trains
only the adapters and the head (every pre-trained backbone weight in the final checkpoint is bit-identical to
the released file's, every adapter moved), the run learns like the full smoke (delta1 at least twice its
step-0 value), the record says LoRA with its rank and scale and the batch split (the total 8 as 2 accumulated
micro-batches of 4), and the merged backbone the run writes loads
through the plain 4M loader and reproduces the adapted backbone (<= 1e-5)."""

import hashlib
import json

import pytest
import torch

from fourm_eval.backbones import build_backbone
from fourm_eval.fixtures import default_tiny_checkpoint

from cli_runner import run_cli


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-run")
    wd = tmp / "run"
    # the total batch 8 as 2 accumulated micro-batches of 4: the real pipeline's accumulation path too
    r = run_cli(["run", "nyu-depth", "--profile", "lora-smoke", "--per-gpu-batch", "4", "--work-dir", str(wd)], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return wd, json.loads((wd / "result.json").read_text())


def _final_state(wd):
    from fourm_eval.tasks.state import allow_mmengine_checkpoint_types

    allow_mmengine_checkpoint_types()  # the message hub's numpy scalars, as a resume loads them
    ckpt = torch.load(wd / "iter_200.pth", map_location="cpu", weights_only=True)
    return {k.removeprefix("backbone.net."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.net.")}


def test_lora_smoke_trains_adapters_only_and_learns(lora_run):
    wd, rec = lora_run
    sd = _final_state(wd)
    original = build_backbone("4m", checkpoint=str(default_tiny_checkpoint())).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    assert set(base) == set(original)
    for k, v in original.items():
        assert torch.equal(base[k], v), k  # frozen: bit-identical to the released file's weights
    lora_b = [v for k, v in sd.items() if ".lora_B." in k]
    assert len(lora_b) == 20 and all(torch.count_nonzero(v) > 0 for v in lora_b)  # B started at 0
    m, m0 = rec["metrics"], rec["metrics_step0"]
    baseline = rec["dataset"]["train_median_baseline"]["metrics"]["delta1"]
    assert m["delta1"] >= 2 * m0["delta1"] and m["delta1"] > baseline
    ft = rec["finetune"]
    assert (ft["mode"], ft["rank"], ft["scale"], ft["alpha"]) == ("lora", 8, 1.0, 8.0)
    assert rec["config"]["finetune"]["mode"] == "lora" and ft["peft_version"]
    sched = rec["config"]["schedule_resolved"]
    assert (sched["eff_batch"], sched["per_gpu_batch"], sched["accumulation"]) == (8, 4, 2)
    assert ft["backbone_frozen_params"] == sum(v.numel() for v in original.values() if v.is_floating_point())
    assert ft["adapter_params"] == sum(v.numel() for k, v in sd.items() if ".lora_" in k)


def test_merged_backbone_reproduces_the_adapted_one(lora_run):
    from fourm_eval.lora import inject

    wd, rec = lora_run
    merged_file = wd / rec["files"]["merged_backbone"]
    assert hashlib.sha256(merged_file.read_bytes()).hexdigest() == rec["finetune"]["merged"]["sha256"]
    adapted = build_backbone("4m", checkpoint=str(default_tiny_checkpoint()))
    inject(adapted, rec["config"]["finetune"])
    adapted.load_state_dict(_final_state(wd), strict=True)  # the checkpoint's keys are the adapted model's
    merged = build_backbone("4m", checkpoint=str(merged_file))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = adapted.eval().get_intermediate_layers(x, [-1]), merged.eval().get_intermediate_layers(x, [-1])
    assert (a[0] - b[0]).abs().max().item() <= 1e-5
