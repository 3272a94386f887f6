"""Overfitting analyses: model scaling, fine-tuning curves, pre-training logs.

Each analysis states its method and thresholds (``METHODS``); the report
prints them next to the numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .cells import clean_value
from .errors import FourmEvalError
from .results import ENCODER_PARAMS

# The published table's columns (fourm_eval/data/paper_results.csv) are all higher-is-better; a metric
# of a task registered here takes its direction from the task instead.
_PUBLISHED_HIGHER_IS_BETTER = {("coco-det", "box_AP"), ("coco-det", "mask_AP"), ("ade20k-seg", "mIoU"),
                               ("nyu-depth", "delta1"), ("in1k-cls", "top1")}


def higher_is_better(task: str, metric: str) -> bool:
    from .tasks import metric_info

    info = metric_info(task, metric)
    if info is not None:
        return info.higher_is_better
    if (task, metric) in _PUBLISHED_HIGHER_IS_BETTER:
        return True
    raise ValueError(f"no direction known for {task}/{metric}: register the task or its metric")

SHORTFALL_POINTS = 0.5   # XL below the expected XL by more than this (and than the noise, below) = shortfall
NOISE_SIGMAS = 2.0       # the noise margin: this many standard deviations of the row's noisiest known score
FINETUNE_GAP_POINTS = 0.5  # best-vs-final gap (metric points) that counts as fine-tuning overfitting
PRETRAIN_REL_RISE = 0.01   # held-out loss above its running minimum by > 1% ...
PRETRAIN_PATIENCE = 2      # ... at this many consecutive evaluations = divergence

METHODS = {
    "scaling": (
        "For each task and pre-training set with B, L and XL results, the XL score expected from scaling is "
        "computed by two models fitted to B and L in encoder parameters P (B 86M, L 303M, XL 1.2B). Log-linear "
        "in the score: expected_XL = L + (L - B) * ln(P_XL / P_L) / ln(P_L / P_B). Power law in the error "
        "(e = 100 - score for higher-is-better percentages, the metric itself for lower-is-better ones; the usual "
        "scaling model near a ceiling): e_XL = e_L * (e_L / e_B) ** (ln(P_XL / P_L) / ln(P_L / P_B)). The noise "
        f"margin is {SHORTFALL_POINTS} points, or {NOISE_SIGMAS:g} standard deviations of the row's noisiest score "
        "where one is known (own runs: the sample std over seeds; published: the std the paper gives), whichever "
        "is larger. A shortfall is called only where both models put the observed XL below their expectation by "
        "more than that margin. Each size's fine-tuning mode (full, lora, linear) is shown beside it: a row whose "
        "sizes were fine-tuned differently (4M-21 Table 2: XL with LoRA on ADE20K and NYUv2, B and L in full) "
        "confounds model size with the fine-tuning mode, and is marked. The data-scale effect is the XL difference "
        "between 4M-7 trained on COYO700M and on CC12M, compared with the same difference at B and L."),
    "finetune": (
        "From a run's periodic evaluations: the iteration where the main validation metric peaked, the "
        f"best-vs-final gap, and the slope of a least-squares line through the training loss logged after "
        f"the peak. Overfitting is flagged when the gap exceeds {FINETUNE_GAP_POINTS} points while the "
        "training loss kept falling (negative slope)."),
    "pretrain": (
        "Per modality, the held-out loss ('[Eval] <modality>_loss', else the first '[Eval (<set>)] ' set) is "
        "followed against total tokens seen. Divergence onset = the evaluation with the lowest held-out loss, "
        f"when the held-out loss afterwards stays more than {PRETRAIN_REL_RISE:.0%} above that minimum for "
        f"{PRETRAIN_PATIENCE} consecutive evaluations while the training loss of the same modality is lower "
        "than at the minimum. Modalities are ranked by onset (first to overfit first)."),
}


# ------------------------------------------------------------------ scaling
def _size_exponent() -> float:
    pb, pl, px = ENCODER_PARAMS["B"], ENCODER_PARAMS["L"], ENCODER_PARAMS["XL"]
    return math.log(px / pl) / math.log(pl / pb)


def _log_linear_expected(b: float, l: float) -> float:
    return l + (l - b) * _size_exponent()


def _power_law_expected(b: float, l: float, higher: bool) -> float | None:
    """XL from a power law in the error fitted through B and L; None where an error is not positive (a score
    at or past the ceiling has no power law through it)."""
    eb, el = (100.0 - b, 100.0 - l) if higher else (b, l)
    if eb <= 0 or el <= 0:
        return None
    exl = el * (el / eb) ** _size_exponent()
    return 100.0 - exl if higher else exl


def _mode(v: Any) -> str:
    """A fine-tuning mode cell ('unstated' where the source does not say: an empty CSV cell reads as NaN)."""
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return "unstated"
    return str(v).strip()


def scaling_analysis(df) -> list[dict[str, Any]]:
    """``df`` columns: family, size, pretrain, task, metric, value (percent points), source; optional ``std``
    (points: seed std of own runs, published std where given) and ``finetune`` (full / lora / linear)."""
    rows = []
    keys = df[["family", "pretrain", "task", "metric"]].drop_duplicates().itertuples(index=False)
    for fam, pre, task, metric in keys:
        sub = df[(df.family == fam) & (df.pretrain == pre) & (df.task == task) & (df.metric == metric)]
        vals = {r.size: float(r.value) for r in sub.itertuples()}
        if not {"B", "L", "XL"} <= set(vals):
            continue
        recs = {r.size: r._asdict() for r in sub.itertuples()}
        higher = higher_is_better(task, metric)
        sign = 1.0 if higher else -1.0
        lin = _log_linear_expected(vals["B"], vals["L"])
        powr = _power_law_expected(vals["B"], vals["L"], higher)
        stds = [s for s in (clean_value(recs[z].get("std")) for z in ("B", "L", "XL")) if s is not None]
        noise = max(stds) if stds else None
        margin = max(SHORTFALL_POINTS, NOISE_SIGMAS * noise) if noise is not None else SHORTFALL_POINTS
        modes = {z: _mode(recs[z].get("finetune")) for z in ("B", "L", "XL")}
        below_lin = sign * (vals["XL"] - lin) < -margin
        below_pow = powr is not None and sign * (vals["XL"] - powr) < -margin
        rows.append({"family": fam, "pretrain": pre, "task": task, "metric": metric, "B": vals["B"],
                     "L": vals["L"], "XL": vals["XL"],
                     "expected_XL_loglinear": lin, "XL_minus_loglinear": vals["XL"] - lin,
                     "expected_XL_power": powr, "XL_minus_power": None if powr is None else vals["XL"] - powr,
                     "noise_std": noise, "margin": margin, "finetune": modes,
                     "finetune_confound": len({m for m in modes.values() if m != "unstated"}) > 1,
                     "below_loglinear": below_lin, "below_power": below_pow,
                     "shortfall": below_lin and below_pow,
                     "sources": "; ".join(sorted({str(s) for s in sub.get("source", [])}))})
    return rows


def finetune_text(modes: dict[str, str]) -> str:
    """'B full / L full / XL lora' (one word when all sizes agree)."""
    if len(set(modes.values())) == 1:
        return next(iter(modes.values()))
    return " / ".join(f"{z} {m}" for z, m in modes.items())


def data_scale_effect(df, family: str = "4M-7", small: str = "CC12M", large: str = "COYO700M") -> list[dict]:
    """Per task/metric and size: score(large) - score(small)."""
    out = []
    for (task, metric), sub in df[df.family == family].groupby(["task", "metric"]):
        by = {(r.size, r.pretrain): float(r.value) for r in sub.itertuples()}
        row = {"task": task, "metric": metric}
        for size in ("B", "L", "XL"):
            if (size, small) in by and (size, large) in by:
                row[size] = by[(size, large)] - by[(size, small)]
        if "XL" in row:
            row["xl_gain_exceeds_b_and_l"] = all(row["XL"] > row.get(s, -math.inf) for s in ("B", "L"))
            out.append(row)
    return out


def paper_frame():
    """The shipped paper numbers in the analysis frame: the comparison table's (each task's numbers of the
    protocol of its ``paper`` profile; other protocols' numbers are not comparable with them)."""
    from .report import paper_protocol
    from .results import load_paper_results

    p = load_paper_results()
    table = {t: paper_protocol(t) for t in set(p.task)}
    p = p[[proto == table[t] for t, proto in zip(p.task, p.protocol)]].copy()
    p["family"] = p["model"]
    p["pretrain"] = p["pretrain_data"]
    return p[["family", "size", "pretrain", "task", "metric", "value", "std", "finetune", "source", "verified"]]


# ----------------------------------------------------------------- finetune
def _slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return None if sxx == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def read_train_loss(run_dir: str | Path) -> list[tuple[int, float]]:
    """(iteration, loss) from mmengine's vis_data/scalars.json files of a run directory."""
    pts: dict[int, float] = {}
    for f in sorted(Path(run_dir).glob("*/vis_data/scalars.json")):
        for line in f.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row and "step" in row:
                pts[int(row["step"])] = float(row["loss"])
    return sorted(pts.items())


def finetune_analysis(rec: dict[str, Any], train_loss: list[tuple[int, float]] | None = None) -> dict[str, Any]:
    from .tasks import all_tasks

    task = rec["task"]
    t = all_tasks().get(task)
    main = t.main_metrics if t else []
    metric = next((m for m in main if m in rec["metrics"]), next(iter(rec["metrics"])))
    hist = [(int(h["iter"]), float(h["metrics"][metric])) for h in rec.get("eval_history", [])
            if h.get("metrics", {}).get(metric) is not None]  # null: no value at that evaluation
    if not hist:
        return {"metric": metric, "available": False}
    info = t.metric(metric) if t else None
    if info is None:  # a task this installation does not know: no direction, no analysis
        return {"metric": metric, "available": False}
    lower = not info.higher_is_better
    peak_iter, peak = (min if lower else max)(hist, key=lambda t: t[1])
    final_iter, final = hist[-1]
    gap = abs(peak - final) * 100  # metric points (fractions -> percent)
    train_loss = train_loss if train_loss is not None else read_train_loss(rec["_run_dir"]) if "_run_dir" in rec else []
    after = [(i, v) for i, v in train_loss if i > peak_iter]
    slope = _slope([i for i, _ in after], [v for _, v in after])
    return {"metric": metric, "available": True, "peak_iter": peak_iter, "peak": peak, "final_iter": final_iter,
            "final": final, "gap_points": gap, "train_loss_slope_after_peak": slope,
            "overfitting": gap > FINETUNE_GAP_POINTS and slope is not None and slope < 0}


# ----------------------------------------------------------------- pretrain
def parse_pretrain_log(path: str | Path) -> list[dict[str, Any]]:
    """The JSON-lines log.txt of 4M pre-training, one dict per epoch (bad lines are reported)."""
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FourmEvalError(f"{path}:{n}: not a JSON object ({e}); expected one JSON object per line "
                                 "as written by the 4M pre-training script") from None
        if not isinstance(row, dict):
            raise FourmEvalError(f"{path}:{n}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise FourmEvalError(f"{path}: empty log")
    return rows


def _eval_prefix(rows: list[dict[str, Any]]) -> str | None:
    keys = {k for r in rows for k in r}
    if any(k.startswith("[Eval] ") for k in keys):
        return "[Eval] "
    others = sorted({k.split("] ")[0] + "] " for k in keys if k.startswith("[Eval (")})
    return others[0] if others else None


def pretrain_analysis(rows: list[dict[str, Any]]) -> dict[str, Any]:
    prefix = _eval_prefix(rows)
    if prefix is None:
        raise FourmEvalError("the log has no held-out losses ('[Eval] <modality>_loss'); evaluation epochs "
                             "are needed to find overfitting")
    x_key = next((k for k in ("total_tokens_seen_b", "input_tokens_seen_b", "epoch") if k in rows[-1]), "epoch")
    modalities = sorted({k[len(prefix):-len("_loss")] for r in rows for k in r
                         if k.startswith(prefix) and k.endswith("_loss") and k != prefix + "loss"})
    result: dict[str, Any] = {"x": x_key, "eval_set": prefix.strip(), "modalities": {}}
    for mod in modalities:
        pts = [(float(r[x_key]), float(r[f"{prefix}{mod}_loss"]), float(r[f"{mod}_loss"]) if f"{mod}_loss" in r else None)
               for r in rows if f"{prefix}{mod}_loss" in r and x_key in r]
        info: dict[str, Any] = {"points": pts, "onset": None, "confirmed_at": None}
        best = 0
        for i in range(1, len(pts)):
            if pts[i][1] < pts[best][1]:
                best = i
                continue
            window = pts[best + 1: best + 1 + PRETRAIN_PATIENCE]
            if (len(window) == PRETRAIN_PATIENCE
                    and all(h > pts[best][1] * (1 + PRETRAIN_REL_RISE) for _, h, _ in window)
                    and all(t is not None and pts[best][2] is not None and t < pts[best][2] for _, _, t in window)):
                info["onset"] = pts[best][0]
                info["confirmed_at"] = window[-1][0]
                info["heldout_min"] = pts[best][1]
                break
        result["modalities"][mod] = info
    order = sorted((m for m, i in result["modalities"].items() if i["onset"] is not None),
                   key=lambda m: result["modalities"][m]["onset"])
    result["overfit_order"] = order
    return result
