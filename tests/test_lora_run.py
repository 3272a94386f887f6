"""`fourm-eval run nyu-depth|ade20k-seg --profile lora-smoke` end to end (built-in mini data, tiny 4M, CPU): LoRA trains
only the adapters and the head (every pre-trained backbone weight in the final checkpoint is bit-identical to
the released file's, every adapter moved), the run learns like the full smoke (delta1 at least twice its
step-0 value), the record says LoRA with its rank and scale and the batch split (the total 8 as 2 accumulated
micro-batches of 4), and the merged backbone the run writes loads
through the plain 4M loader and reproduces the adapted backbone (<= 1e-5)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from fourm_eval.backbones import build_backbone
from fourm_eval.fixtures import default_tiny_checkpoint

from cli_runner import run_cli


LORA_RUNS = {  # task -> (extra arguments, main metric, rank)
    # the total batch 8 as 2 accumulated micro-batches of 4: the real pipeline's accumulation path too
    "nyu-depth": (["--per-gpu-batch", "4"], "delta1", 8),
    "ade20k-seg": ([], "mIoU", 16),
}
EXPECTED = json.loads((Path(__file__).resolve().parents[1] / "reports" / "ci" / "expected.json").read_text())


@pytest.fixture(scope="module", params=sorted(LORA_RUNS))
def lora_run(request, tmp_path_factory):
    task = request.param
    tmp = tmp_path_factory.mktemp(f"lora-{task}")
    wd = tmp / "run"
    r = run_cli(["run", task, "--profile", "lora-smoke", *LORA_RUNS[task][0], "--work-dir", str(wd)], tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return task, wd, json.loads((wd / "result.json").read_text())


def _final_state(wd, rec):
    from fourm_eval.tasks.state import allow_mmengine_checkpoint_types

    allow_mmengine_checkpoint_types()  # the message hub's numpy scalars, as a resume loads them
    last = rec["config"]["schedule_resolved"]["max_iters"]
    ckpt = torch.load(wd / f"iter_{last}.pth", map_location="cpu", weights_only=True)
    return {k.removeprefix("backbone.net."): v for k, v in ckpt["state_dict"].items() if k.startswith("backbone.net.")}


def _full_smoke_mean(task: str, metric: str) -> float:
    """The full fine-tuning smoke's expected value (the CI gate's expectation, mean over seeds)."""
    return next(e["mean"] for e in EXPECTED["entries"]
                if e["task"] == task and e["profile"] == "smoke" and e["metric"] == metric and e["backbone"] == "4m")


def test_lora_smoke_trains_adapters_only_and_learns(lora_run):
    task, wd, rec = lora_run
    _, metric, rank = LORA_RUNS[task]
    sd = _final_state(wd, rec)
    original = build_backbone("4m", checkpoint=str(default_tiny_checkpoint())).state_dict()
    base = {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}
    assert set(base) == set(original)
    for k, v in original.items():
        assert torch.equal(base[k], v), k  # frozen: bit-identical to the released file's weights
    lora_b = [v for k, v in sd.items() if ".lora_B." in k]
    assert len(lora_b) == 20 and all(torch.count_nonzero(v) > 0 for v in lora_b)  # B started at 0
    # learns like the full smoke: at least twice its step 0, and at least 60% of the full smoke's score in
    # at most half its iterations
    m, m0 = rec["metrics"][metric], rec["metrics_step0"][metric]
    assert m >= 2 * m0 and m >= 0.6 * _full_smoke_mean(task, metric), (m0, m)
    if task == "nyu-depth":
        assert m > rec["dataset"]["train_median_baseline"]["metrics"]["delta1"]
        sched = rec["config"]["schedule_resolved"]
        assert (sched["eff_batch"], sched["per_gpu_batch"], sched["accumulation"]) == (8, 4, 2)
    ft = rec["finetune"]
    assert (ft["mode"], ft["rank"], ft["scale"], ft["alpha"]) == ("lora", rank, 1.0, float(rank))
    assert rec["config"]["finetune"]["mode"] == "lora" and ft["peft_version"]
    assert ft["backbone_frozen_params"] == sum(v.numel() for v in original.values() if v.is_floating_point())
    assert ft["adapter_params"] == sum(v.numel() for k, v in sd.items() if ".lora_" in k)


def test_merged_backbone_reproduces_the_adapted_one(lora_run):
    from fourm_eval.lora import inject

    task, wd, rec = lora_run
    merged_file = wd / rec["files"]["merged_backbone"]
    assert hashlib.sha256(merged_file.read_bytes()).hexdigest() == rec["finetune"]["merged"]["sha256"]
    adapted = build_backbone("4m", checkpoint=str(default_tiny_checkpoint()))
    inject(adapted, rec["config"]["finetune"])
    adapted.load_state_dict(_final_state(wd, rec), strict=True)  # the checkpoint's keys are the adapted model's
    merged = build_backbone("4m", checkpoint=str(merged_file))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    base = build_backbone("4m", checkpoint=str(default_tiny_checkpoint()))
    with torch.no_grad():
        a, b = adapted.eval().get_intermediate_layers(x, [-1]), merged.eval().get_intermediate_layers(x, [-1])
        c = base.eval().get_intermediate_layers(x, [-1])
    # equal up to float32 rounding (relative to the tokens' size: merging W + s BA reorders the sums), and
    # far below what the adapters changed (a merge that dropped or mis-scaled them is caught)
    err, size, effect = ((a[0] - b[0]).abs().max().item(), a[0].abs().max().item(), (a[0] - c[0]).abs().max().item())
    print(f"merged vs adapted {err:.3g}, token size {size:.3g}, adapters' effect {effect:.3g}")
    assert err <= 2e-6 * size and effect > 1000 * err
