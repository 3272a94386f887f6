"""Backbone speed benchmark: the 4M encoder against timm's ViT-B at the same shape.

Measures forward and forward+backward images/s and memory for the 4M backbone
in its GELU-with-biases form at ViT-B shape (dim 768, 12 blocks, 12 heads,
MLP 3072) and for timm's ``vit_base_patch16_224`` on the same input, at each
requested resolution, in the same dtype, both with PyTorch's SDPA attention.

Method (chosen for noisy, shared machines):
* speed: both models live in one process; after a warm-up, single iterations
  of the two models are timed alternately and the fastest of ``iters`` is
  kept for each, so drifting load hits both alike;
* memory: on a GPU, CUDA's peak allocated bytes during forward+backward; on a
  CPU, the peak growth of the resident set during forward+backward, measured in
  a fresh process per model (allocator state would otherwise carry over), plus
  the exact size of the tensors autograd saves for backward (device-independent).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

MODELS = ("4m-b (GELU, biases)", "timm vit_base_patch16_224")


@dataclass
class BenchResult:
    model: str
    size: int
    batch: int
    fwd_ips: float
    fwdbwd_ips: float
    peak_mem_mb: float
    saved_activations_mb: float


class _RssPeak:
    """Peak resident-set growth of this process, sampled every few ms (CPU runs)."""

    def __init__(self) -> None:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __enter__(self) -> "_RssPeak":
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mb(self) -> float:
        return (self.peak - self.base) / 2**20


def build_model(name: str, size: int) -> nn.Module:
    import timm

    from .backbones import build_backbone

    if name == MODELS[0]:
        return build_backbone("4m-b", gated_mlp=False, act_layer="GELU", qkv_bias=True, proj_bias=True,
                              mlp_bias=True, norm_bias=True)
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, num_classes=0)


def _dtype(dev: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def _steps(model: nn.Module, x: torch.Tensor, dt: torch.dtype) -> tuple[Callable[[], None], Callable[[], None]]:
    amp = lambda: torch.autocast(x.device.type, dtype=dt, enabled=dt != torch.float32)  # noqa: E731

    def fwd() -> None:
        model.eval()
        with torch.no_grad(), amp():
            model(x)

    def fwdbwd() -> None:
        model.train()
        with amp():
            out = model(x)
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)
    return fwd, fwdbwd


def saved_activation_mb(model: nn.Module, x: torch.Tensor, dt: torch.dtype) -> float:
    """Bytes of the distinct tensors autograd saves during one training forward pass."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast(x.device.type, dtype=dt, enabled=dt != torch.float32):
        out = model(x)
    del out
    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    return sum(n for k, n in seen.items() if k not in params) / 2**20


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved(models: dict[str, nn.Module], x: torch.Tensor, dt: torch.dtype, iters: int
                     ) -> dict[str, tuple[float, float]]:
    """Fastest single forward and forward+backward time per model, timed alternately."""
    steps = {n: _steps(m, x, dt) for n, m in models.items()}
    best = {n: [float("inf"), float("inf")] for n in models}
    for n, (f, fb) in steps.items():  # warm-up
        f(), fb()
    _sync(x.device)
    for _ in range(iters):
        for n, (f, fb) in steps.items():
            for k, fn in enumerate((f, fb)):
                t0 = time.perf_counter()
                fn()
                _sync(x.device)
                best[n][k] = min(best[n][k], time.perf_counter() - t0)
    return {n: (a, b) for n, (a, b) in best.items()}


def memory_of(name: str, size: int, batch: int, device: str, dtype: str) -> tuple[float, float]:
    """(peak MB, saved-activation MB) of one forward+backward, measured in this process."""
    dev = torch.device(device)
    dt = _dtype(dev, dtype)
    model = build_model(name, size).to(dev)
    x = torch.randn(batch, 3, size, size, device=dev)
    _, fwdbwd = _steps(model, x, dt)
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fwdbwd()
        _sync(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    else:
        with _RssPeak() as m:
            fwdbwd()
        peak = m.mb
    return peak, saved_activation_mb(model, x, dt)


def _memory_in_subprocess(name: str, size: int, batch: int, device: str, dtype: str) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "fourm_eval.bench", name, str(size), str(batch), device, dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"memory worker failed: {r.stderr[-2000:]}")
    peak, saved = json.loads(r.stdout.strip().splitlines()[-1])
    return peak, saved


def run_backbone_bench(sizes: list[int], batch: int, iters: int, device: str | None = None,
                       dtype: str = "auto", log: Callable[[str], None] = print) -> list[BenchResult]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = _dtype(dev, dtype)
    results = []
    for size in sizes:
        # batch shrinks with the token count so large inputs fit (same for both models)
        b = max(1, batch * 224 * 224 // (size * size)) if size > 224 else batch
        models = {n: build_model(n, size).to(dev) for n in MODELS}
        x = torch.randn(b, 3, size, size, device=dev)
        times = time_interleaved(models, x, dt, iters)
        del models, x
        gc.collect()
        for name in MODELS:
            peak, saved = _memory_in_subprocess(name, size, b, str(dev), dtype)
            r = BenchResult(name, size, b, b / times[name][0], b / times[name][1], peak, saved)
            log(f"{name:28s} {size:5d}px batch {b:3d}: fwd {r.fwd_ips:8.2f} img/s, fwd+bwd {r.fwdbwd_ips:8.2f} "
                f"img/s, peak {r.peak_mem_mb:8.1f} MB, saved activations {r.saved_activations_mb:8.1f} MB")
            results.append(r)
    log(f"device {dev}, dtype {str(dt).removeprefix('torch.')}, torch {torch.__version__}, threads "
        f"{torch.get_num_threads()}; speed = fastest of {iters} alternating iterations per model")
    return results


def ratios(results: list[BenchResult]) -> dict[int, dict[str, float]]:
    """Per size: 4M / timm for throughput, timm / 4M for memory (>1 = 4M better)."""
    out: dict[int, dict[str, float]] = {}
    for size in sorted({r.size for r in results}):
        f = next(r for r in results if r.size == size and r.model == MODELS[0])
        t = next(r for r in results if r.size == size and r.model == MODELS[1])
        out[size] = {"fwd": f.fwd_ips / t.fwd_ips, "fwdbwd": f.fwdbwd_ips / t.fwdbwd_ips,
                     "mem": t.peak_mem_mb / f.peak_mem_mb if f.peak_mem_mb > 0 else float("nan"),
                     "activations": t.saved_activations_mb / f.saved_activations_mb
                     if f.saved_activations_mb > 0 else float("nan")}
    return out


def growth(results: list[BenchResult], lo: int, hi: int) -> dict[str, float]:
    """Per model: time per image at `hi` / time per image at `lo` (forward+backward)."""
    out = {}
    for name in MODELS:
        a = next((r for r in results if r.model == name and r.size == lo), None)
        b = next((r for r in results if r.model == name and r.size == hi), None)
        if a and b:
            out[name] = a.fwdbwd_ips / b.fwdbwd_ips
    return out


if __name__ == "__main__":  # memory worker: one model, one forward+backward, printed as JSON
    _name, _size, _batch, _device, _dtype_name = sys.argv[1:6]
    print(json.dumps(memory_of(_name, int(_size), int(_batch), _device, _dtype_name)))
