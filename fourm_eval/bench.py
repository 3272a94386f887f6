"""Backbone speed benchmark: the 4M encoder against timm's ViT-B at the same shape.

Measures forward and forward+backward images/s and peak memory for the 4M
backbone in its GELU-with-biases form at ViT-B shape (dim 768, 12 blocks,
12 heads, MLP 3072) and for timm's ``vit_base_patch16_224`` on the same
input, at each requested resolution. Both run in the same dtype with
PyTorch's SDPA attention. Peak memory is CUDA's max allocated bytes on a
GPU, and the peak rise of the process RSS (sampled) on CPU.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn


@dataclass
class BenchResult:
    model: str
    size: int
    batch: int
    fwd_ips: float
    fwdbwd_ips: float
    peak_mem_mb: float
    saved_activations_mb: float = 0.0  # tensors autograd keeps for backward (exact, device-independent)


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


def saved_activation_mb(model: nn.Module, x: torch.Tensor, amp) -> float:
    """Bytes of the distinct tensors autograd saves during one training forward pass."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        out = model(x)
    del out
    params = {(p.untyped_storage().data_ptr(), p.untyped_storage().nbytes()) for p in model.parameters()}
    return sum(n for k, n in seen.items() if k not in params) / 2**20


def _time(fn: Callable[[], None], iters: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    fn()  # warm-up
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - t0) / iters


def bench_model(name: str, model: nn.Module, size: int, batch: int, iters: int, device: torch.device,
                dtype: torch.dtype) -> BenchResult:
    model = model.to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    amp = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def fwd() -> None:
        with torch.no_grad(), amp:
            model(x)

    def fwdbwd() -> None:
        with amp:
            out = model(x)
        out.float().mean().backward()
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        model.eval()
        t_f = _time(fwd, iters, device)
        model.train()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        t_fb = _time(fwdbwd, iters, device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        # RSS growth over the whole measurement, from a process that has run nothing yet
        with _RssPeak() as m:
            model.eval()
            t_f = _time(fwd, iters, device)
            model.train()
            t_fb = _time(fwdbwd, iters, device)
        peak = m.mb
    saved = saved_activation_mb(model, x, amp)
    model.to("cpu")
    return BenchResult(name, size, batch, batch / t_f, batch / t_fb, peak, saved)


MODELS = ("4m-b (GELU, biases)", "timm vit_base_patch16_224")


def build_model(name: str, size: int) -> nn.Module:
    import timm

    from .backbones import build_backbone

    if name == MODELS[0]:
        return build_backbone("4m-b", gated_mlp=False, act_layer="GELU", qkv_bias=True, proj_bias=True,
                              mlp_bias=True, norm_bias=True)
    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=size, num_classes=0)


def _measure_in_subprocess(name: str, size: int, batch: int, iters: int, device: str, dtype: str) -> BenchResult:
    """One measurement in a fresh process: no allocator or kernel-cache state carries over between
    models, so peak memory (RSS growth on CPU) and timings are comparable."""
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fourm_eval.bench", name, str(size), str(batch), str(iters), device, dtype]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark worker failed: {r.stderr[-2000:]}")
    return BenchResult(**json.loads(r.stdout.strip().splitlines()[-1]))


def _dtype(dev: torch.device, dtype: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


def run_backbone_bench(sizes: list[int], batch: int, iters: int, device: str | None = None,
                       dtype: str = "auto", log: Callable[[str], None] = print, repeats: int = 2
                       ) -> list[BenchResult]:
    """Each (model, size) is measured ``repeats`` times in fresh processes, alternating the
    models, and the best run is kept (the usual defence against noise on shared machines)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = []
    for size in sizes:
        # batch shrinks with the token count so large inputs fit (same for both models)
        b = max(1, batch * 224 * 224 // (size * size)) if size > 224 else batch
        runs: dict[str, list[BenchResult]] = {name: [] for name in MODELS}
        for _ in range(repeats):
            for name in MODELS:  # alternate, so drifting machine load hits both alike
                runs[name].append(_measure_in_subprocess(name, size, b, iters, str(dev), dtype))
        best = {name: BenchResult(name, size, b, max(r.fwd_ips for r in rs), max(r.fwdbwd_ips for r in rs),
                                  min(r.peak_mem_mb for r in rs), rs[0].saved_activations_mb)
                for name, rs in runs.items()}
        for name in MODELS:
            r = best[name]
            log(f"{name:28s} {size:5d}px batch {b:3d}: fwd {r.fwd_ips:8.2f} img/s, "
                f"fwd+bwd {r.fwdbwd_ips:8.2f} img/s, peak {r.peak_mem_mb:8.1f} MB, "
                f"saved activations {r.saved_activations_mb:8.1f} MB")
            results.append(r)
    log(f"device {dev}, dtype {str(_dtype(dev, dtype)).removeprefix('torch.')}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, best of {repeats} fresh-process runs x {iters} iterations")
    return results


def ratios(results: list[BenchResult]) -> dict[int, dict[str, float]]:
    """Per size: 4M / timm for throughput, timm / 4M for peak memory and saved activations (>1 = 4M better)."""
    out: dict[int, dict[str, float]] = {}
    for size in sorted({r.size for r in results}):
        f = next(r for r in results if r.size == size and r.model.startswith("4m"))
        t = next(r for r in results if r.size == size and r.model.startswith("timm"))
        out[size] = {"fwd": f.fwd_ips / t.fwd_ips, "fwdbwd": f.fwdbwd_ips / t.fwdbwd_ips,
                     "mem": (t.peak_mem_mb / f.peak_mem_mb) if f.peak_mem_mb > 0 else float("nan"),
                     "activations": (t.saved_activations_mb / f.saved_activations_mb)
                     if f.saved_activations_mb > 0 else float("nan")}
    return out


def growth(results: list[BenchResult], lo: int, hi: int) -> dict[str, float]:
    """Per model: time per image at `hi` / time per image at `lo` (forward+backward)."""
    out = {}
    for name in sorted({r.model for r in results}):
        a = next((r for r in results if r.model == name and r.size == lo), None)
        b = next((r for r in results if r.model == name and r.size == hi), None)
        if a and b:
            out[name] = a.fwdbwd_ips / b.fwdbwd_ips
    return out


if __name__ == "__main__":  # worker: one measurement, printed as JSON
    import json
    import sys

    _name, _size, _batch, _iters, _device, _dtype_name = sys.argv[1:7]
    _dev = torch.device(_device)
    _model = build_model(_name, int(_size))
    _r = bench_model(_name, _model, int(_size), int(_batch), int(_iters), _dev, _dtype(_dev, _dtype_name))
    print(json.dumps(_r.__dict__))
