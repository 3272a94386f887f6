"""Probes on cached frozen features (fourm_eval/features.py): kNN and a grid of linear heads.

* :func:`knn_predict`: DINO / DINOv2's weighted k-nearest-neighbour classifier
  (facebookresearch/dinov2 ``dinov2/eval/knn.py``): features L2-normalised, cosine similarity to every
  training feature, the k most similar vote for their class with weight ``softmax(sim / T)`` over the
  k (DINO's ``exp(sim / T)``, normalised: the same ranking), T = 0.07, k in {10, 20, 100, 200}.
* :func:`linear_grid`: every head of a grid (learning rates x last-n blocks x pooling) trained at once
  on the same batches of cached features, as ``dinov2/eval/linear.py`` trains its classifiers together
  (Linear initialised N(0, 0.01), bias 0; SGD momentum 0.9, no weight decay; lr x batch / 256; cosine to
  0 over the iterations; cross-entropy). Unlike DINOv2, which picks the head that is best on the
  validation set it reports, the head is chosen on a held-out part of the *training* split (10% by
  default, seeded, per class); validation is scored once, with the chosen head.

Both return class probabilities for the scored images, from which the task writes its standard
predictions file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

KNN_KS = (10, 20, 100, 200)            # dinov2/eval/knn.py: --nb_knn default
KNN_T = 0.07                           # dinov2/eval/knn.py: --temperature default
LINEAR_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # dinov2/eval/linear.py
LINEAR_BLOCKS = (1, 4)                 # dinov2/eval/linear.py run_eval_linear: n_last_blocks_list


def knn_predict(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                ks: Sequence[int] = KNN_KS, temperature: float = KNN_T, chunk: int = 256) -> dict[int, torch.Tensor]:
    """k -> (n_test, num_classes) class weights of the weighted kNN vote (each row sums to 1)."""
    train = F.normalize(train.float(), dim=1)
    test = F.normalize(test.float(), dim=1)
    kmax = max(ks)
    if kmax > train.shape[0]:
        raise ValueError(f"k = {kmax} neighbours asked for, the training split has {train.shape[0]} images")
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for lo in range(0, test.shape[0], chunk):
        sim = test[lo:lo + chunk] @ train.T
        top_sim, top_idx = sim.topk(kmax, dim=1)        # sorted, most similar first
        top_lab = train_labels[top_idx]
        for k in ks:
            w = torch.softmax(top_sim[:, :k] / temperature, dim=1)
            votes = torch.zeros(sim.shape[0], num_classes, dtype=w.dtype)
            votes.scatter_add_(1, top_lab[:, :k], w)
            out[k].append(votes)
    return {k: torch.cat(v) for k, v in out.items()}


def holdout_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit indices, held-out indices): per class, ``round(fraction x n_class)`` images (at least one when
    the class has two or more) held out, chosen by a seeded permutation."""
    g = torch.Generator().manual_seed(int(seed))
    fit, held = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        else:
            n = 0
        held.append(idx[:n])
        fit.append(idx[n:])
    return torch.sort(torch.cat(fit)).values, torch.sort(torch.cat(held)).values


@dataclass
class Head:
    name: str
    lr: float                 # as configured (before the batch scaling)
    n_last: int
    pooling: str
    heldout_top1: float = float("nan")
    val_top1: float = float("nan")
    val_probs: torch.Tensor | None = field(default=None, repr=False)

    def entry(self) -> dict[str, Any]:
        return {"name": self.name, "lr": self.lr, "n_last_blocks": self.n_last, "pooling": self.pooling,
                "heldout_top1": round(self.heldout_top1, 6), "val_top1": round(self.val_top1, 6)}


def choose(heads: Sequence[Head]) -> Head:
    """The head with the best held-out top-1 (ties: the first in grid order). Validation plays no part."""
    best = None
    for h in heads:
        if best is None or h.heldout_top1 > best.heldout_top1:
            best = h
    assert best is not None
    return best


def _top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def linear_grid(inputs: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
                num_classes: int, *, lrs: Sequence[float] = LINEAR_LRS, epochs: int = 10, batch_size: int = 128,
                holdout: float = 0.1, seed: int = 0, val_labels: torch.Tensor | None = None,
                log: Any = None, split: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[list[Head], Head, dict[str, Any]]:
    """Train every (lr x input) head together; ``inputs`` maps (n_last, pooling) -> (train features,
    val features). Returns the heads (held-out and validation top-1 each), the chosen head (its
    validation probabilities kept) and the schedule used. ``split``: (fit, held-out) row indices of
    the training features, when the hold-out is not per row (e.g. whole images of patch rows)."""
    fit_idx, held_idx = split if split is not None else holdout_split(labels, holdout, seed)
    if len(held_idx) == 0:
        raise ValueError("the held-out part of the training split is empty (every class has one image)")
    g = torch.Generator().manual_seed(int(seed))
    torch.manual_seed(int(seed))
    keys = list(inputs)
    heads: list[Head] = []
    layers: list[torch.nn.Linear] = []
    groups = []
    for key in keys:
        dim = inputs[key][0].shape[1]
        for lr in lrs:
            lin = torch.nn.Linear(dim, num_classes)
            torch.nn.init.normal_(lin.weight, mean=0.0, std=0.01)
            torch.nn.init.zeros_(lin.bias)
            layers.append(lin)
            groups.append({"params": list(lin.parameters()), "lr": float(lr) * batch_size / 256.0})
            heads.append(Head(f"blocks{key[0]}_{key[1]}_lr{lr:g}", float(lr), int(key[0]), str(key[1])))
    opt = torch.optim.SGD(groups, momentum=0.9, weight_decay=0.0)
    n_fit = len(fit_idx)
    per_epoch = max(1, n_fit // batch_size)          # full batches only (DINOv2: drop_last=True)
    bs = min(batch_size, n_fit)
    total = epochs * per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total, eta_min=0.0)
    y_fit = labels[fit_idx]
    x_fit = {k: inputs[k][0][fit_idx] for k in keys}
    n_lr = len(lrs)
    for it in range(total):
        if it % per_epoch == 0:
            perm = torch.randperm(n_fit, generator=g)
        b = perm[(it % per_epoch) * bs:(it % per_epoch + 1) * bs]
        loss = 0.0
        for ki, k in enumerate(keys):
            xb = x_fit[k][b]
            for li in range(n_lr):
                loss = loss + F.cross_entropy(layers[ki * n_lr + li](xb), y_fit[b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log and (it + 1) % max(1, total // 5) == 0:
            log(f"linear grid: iteration {it + 1}/{total}, mean loss {float(loss) / len(layers):.4f}")
    with torch.no_grad():
        for ki, k in enumerate(keys):
            x_held = inputs[k][0][held_idx]
            for li in range(n_lr):
                h, lin = heads[ki * n_lr + li], layers[ki * n_lr + li]
                h.heldout_top1 = _top1(lin(x_held), labels[held_idx])
                h.val_probs = torch.softmax(lin(inputs[k][1]), dim=1)
                if val_labels is not None:
                    h.val_top1 = _top1(h.val_probs, val_labels)
    best = choose(heads)
    for h in heads:
        if h is not best:
            h.val_probs = None
    info = {"iterations": total, "epochs": epochs, "batch_size": bs, "fit_images": n_fit,
            "heldout_images": int(len(held_idx)), "holdout_fraction": holdout,
            "lr_scaling": "lr x batch / 256", "optimizer": "SGD momentum 0.9, weight decay 0, cosine to 0"}
    return heads, best, info


def topk_rows(files: Sequence[str], probs: torch.Tensor, k: int = 5) -> list[tuple[str, list[int], list[float]]]:
    """Rows of the classification predictions file: (file, top-k class indices, their probabilities)."""
    k = min(k, probs.shape[1])
    p, i = probs.float().topk(k, dim=1)
    return [(f, i[r].tolist(), p[r].tolist()) for r, f in enumerate(files)]


__all__ = ["Head", "KNN_KS", "KNN_T", "LINEAR_BLOCKS", "LINEAR_LRS", "choose", "holdout_split", "knn_predict",
           "linear_grid", "topk_rows"]
