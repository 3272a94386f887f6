"""`fourm-eval report`: result records -> report.md, report.html (self-contained), tables.tex.

Contents: the 4M paper's Table 1 layout for the user's runs (rows = backbones
grouped by size, columns = task metrics, mean +- std over seeds with the seed
count, best per size in bold, deltas to DeiT III and MAE of the same size);
the published numbers shipped with fourm-eval, with their source, protocol and
`verified` mark; per-task bar charts and learning curves; protocol footnotes;
and the overfitting analyses with their methods and thresholds.

Result metrics are fractions in [0, 1]; tables show them as points (x100),
the unit of the published numbers.
"""

from __future__ import annotations

import json

import base64
import functools
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import analysis
from .results import load_paper_results, model_identity

SIZE_ORDER = {"tiny": 0, "B": 1, "L": 2, "XL": 3}
BASELINES = ("DeiT III", "MAE")


@dataclass
class TableCell:
    mean: float
    std: float | None
    n: int                       # distinct seeds
    repeats: int = 0             # runs beyond one per seed (merged, see "Repeated seeds")
    bold: bool = False
    published: float | None = None
    published_verified: bool | None = None
    protocol: str | None = None            # the run's (its record's config.protocol)
    published_protocol: str | None = None  # the published number's

    @property
    def protocol_differs(self) -> bool:
        return self.published is not None and self.published_protocol != self.protocol

    def text(self, with_pub: bool = True) -> str:
        s = f"{self.mean:.1f}" + (f" ± {self.std:.1f}" if self.std is not None else "") + f" (n={self.n}"
        s += (f", +{self.repeats} repeat{'s' if self.repeats > 1 else ''})" if self.repeats else ")")
        if with_pub and self.published is not None:
            s += (f" [paper {self.published:.1f}{'' if self.published_verified else '†'}"
                  f"{PROTOCOL_DIFFERS if self.protocol_differs else ''}]")
        return s


PROTOCOL_DIFFERS = "‡"  # a published number beside a run of another protocol (a footnote names both)


def run_protocol(g: Any) -> str | None:
    """The protocol a cell's runs were scored by (None: a record from before protocols were recorded)."""
    v = g.settings.get("config.protocol")
    return str(v) if v is not None else None


def published_for(paper: Any, model: dict[str, str], task: str, metric: str, protocol: str | None) -> Any:
    """The published row for a model, task and metric: the one of ``protocol`` when there is one, else the
    one of the task's paper protocol (the comparison table's); None if none."""
    pub = paper[(paper.model == model["family"]) & (paper["size"] == model["size"])
                & (paper.pretrain_data == model["pretrain"]) & (paper.task == task) & (paper.metric == metric)]
    if pub.empty:
        return None
    same = pub[pub.protocol == protocol]
    if not same.empty:
        return same.iloc[0]
    table = pub[pub.protocol == paper_protocol(task)]
    return table.iloc[0] if not table.empty else pub.iloc[0]


@functools.lru_cache(maxsize=None)
def paper_protocol(task: str) -> str | None:
    """The protocol of a task's ``paper`` profile (that of its published comparison table; None without one)."""
    from .tasks.profiles import profile_protocols
    return profile_protocols(task).get("paper")


@dataclass
class Table1:
    columns: list[tuple[str, str]]                       # (task, metric)
    rows: list[tuple[str, str, str]]                     # (size, label, profile + variant)
    cells: dict[tuple[int, int], TableCell] = field(default_factory=dict)
    deltas: dict[tuple[int, int], dict[str, float]] = field(default_factory=dict)
    groups: dict[tuple[int, int], Any] = field(default_factory=dict)  # the fourm_eval.cells.CellGroup behind each

    def protocol_notes(self) -> list[str]:
        """One footnote per (task, run protocol, published protocol) pairing that differs."""
        pairs = sorted({(self.columns[j][0], c.protocol or "not recorded", c.published_protocol or "?")
                        for (i, j), c in self.cells.items() if c.protocol_differs})
        return [f"{PROTOCOL_DIFFERS} {task}: run by protocol `{ours}`, the published number beside it by protocol "
                f"`{theirs}`; they are not comparable, and no difference is computed between them"
                for task, ours, theirs in pairs]


def _row_profile(g) -> str:
    """The profile column: the profile, its protocol when that is not the profile's own name, and the
    settings that set the cell apart."""
    v, proto = g.variant(), run_protocol(g)
    name = g.profile if proto in (None, g.profile) else f"{g.profile} ({proto})"
    return f"{name} [{v}]" if v else name


def build_table1(records: list[dict[str, Any]]) -> Table1:
    """Rows = backbones (size, label) x profile (+ the settings that set a cell apart from its
    siblings), columns = each task's main metrics; values over distinct seeds of one cell."""
    from .cells import group_records
    from .tasks import all_tasks

    tasks = all_tasks()
    groups = [g for g in group_records(records) if g.task in tasks]
    order = [(t.name, m) for t in tasks.values() for m in t.main_metrics]
    columns = [(t, m) for t, m in order if any(g.task == t and g.per_seed(m) for g in groups)]
    if not columns:
        return Table1([], [])
    row_keys = sorted({(g.model["size"], g.model["label"], _row_profile(g)) for g in groups},
                      key=lambda r: (SIZE_ORDER.get(r[0], 9), r[1], r[2]))
    table = Table1(columns, row_keys)
    row_index = {r: i for i, r in enumerate(row_keys)}
    paper = load_paper_results()
    fam_of: dict[int, str] = {}
    for g in groups:
        i = row_index[(g.model["size"], g.model["label"], _row_profile(g))]
        fam_of[i] = g.model["family"]
        for j, (task, metric) in enumerate(columns):
            if task != g.task:
                continue
            mean, std, n = g.stats(metric)
            if mean is None:
                continue
            scale = tasks[task].metric(metric).display_scale
            extra = sum(s.repeats - 1 for s in g.seeds.values())
            cell = TableCell(mean * scale, None if std is None else std * scale, n, extra, protocol=run_protocol(g))
            pub = published_for(paper, g.model, task, metric, cell.protocol)
            if pub is not None:
                cell.published = float(pub.value)
                cell.published_verified = str(pub.verified) == "yes"
                cell.published_protocol = str(pub.protocol)
            table.cells[(i, j)] = cell
            table.groups[(i, j)] = g
    # best per size, profile and protocol; deltas to baselines of the same size and protocol (never across)
    for j, (task, metric) in enumerate(columns):
        lower = not tasks[task].metric(metric).higher_is_better
        by_size: dict[tuple[str, str, str | None], list[int]] = {}
        for i, row in enumerate(table.rows):
            if (i, j) in table.cells:
                by_size.setdefault((row[0], row[2], table.cells[(i, j)].protocol), []).append(i)
        for idx in by_size.values():
            best = (min if lower else max)(table.cells[(i, j)].mean for i in idx)
            for i in idx:
                table.cells[(i, j)].bold = len(idx) > 1 and math.isclose(table.cells[(i, j)].mean, best)
            for i in idx:
                for base in BASELINES:
                    b = [x for x in idx if fam_of[x] == base]
                    if b and fam_of[i] != base:
                        table.deltas.setdefault((i, j), {})[base] = table.cells[(i, j)].mean - table.cells[(b[0], j)].mean
    return table


def own_scaling_frame(table: Table1):
    """The user's own runs for the scaling analysis: one value (points, mean over seeds) per cell run
    with the ``paper`` profile and no other settings, as ``family (ours)``, with its seed std (points; None
    for one seed) and its fine-tuning mode (the record's resolved settings)."""
    import pandas as pd

    from .results import finetune_mode

    own = [(table.groups[key], key[1], c) for key, c in table.cells.items()
           if table.groups[key].profile == "paper" and not table.groups[key].variant()]
    return pd.DataFrame([{"family": g.model["family"] + " (ours)", "size": g.model["size"],
                          "pretrain": g.model["pretrain"], "task": table.columns[j][0], "metric": table.columns[j][1],
                          "value": c.mean, "std": c.std, "finetune": finetune_mode(g.settings),
                          "source": f"cell {g.cell} ({g.n} seed(s))"} for g, j, c in own],
                        columns=["family", "size", "pretrain", "task", "metric", "value", "std", "finetune", "source"])


SCALING_HEADER = ["family", "pretrain", "task", "metric", "B", "L", "XL", "fine-tuning", "expected XL (log-lin)",
                  "XL − log-lin", "expected XL (power)", "XL − power", "margin", "shortfall", "source"]


def scaling_row(r: dict[str, Any]) -> list[str]:
    """One row of the scaling table (report and `analyze scaling` alike)."""
    ft = analysis.finetune_text(r["finetune"]) + (" (confound)" if r["finetune_confound"] else "")
    pw = "–" if r["expected_XL_power"] is None else f"{r['expected_XL_power']:.1f}"
    pwd = "–" if r["XL_minus_power"] is None else f"{r['XL_minus_power']:+.1f}"
    margin = f"{r['margin']:.1f}" + ("" if r["noise_std"] is None else f" (σ {r['noise_std']:.1f})")
    return [r["family"], r["pretrain"], r["task"], r["metric"], f"{r['B']:.1f}", f"{r['L']:.1f}", f"{r['XL']:.1f}",
            ft, f"{r['expected_XL_loglinear']:.1f}", f"{r['XL_minus_loglinear']:+.1f}", pw, pwd, margin,
            "yes" if r["shortfall"] else "no", r["sources"]]


def repeated_seed_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row per seed that several runs of one cell share: how far apart they are (measured
    non-determinism; 0 = bit-identical) on each main metric."""
    from .cells import group_records
    from .tasks import all_tasks

    tasks = all_tasks()
    rows = []
    for g in group_records(records):
        t = tasks.get(g.task)
        mains = t.main_metrics if t else g.metrics
        for sr in g.repeated_seeds():
            spreads = []
            for m in mains:
                sp = sr.spread(m)
                if sp is not None:
                    scale = t.metric(m).display_scale if t and t.metric(m) else 1.0
                    spreads.append(f"{m}: " + ("identical" if sp == 0 else f"differ by {sp * scale:.3g}"))
            rows.append([g.task, g.model["label"], _row_profile(g), g.cell, str(sr.seed), str(sr.repeats),
                         "; ".join(spreads) or "–", "; ".join(sr.runs)])
    return rows


def published_tables() -> dict[str, Any]:
    """Pivot of the shipped published numbers per protocol: rows (model, size, pretrain), columns task/metric."""
    p = load_paper_results()
    out = {}
    for protocol, sub in p.groupby("protocol"):
        sub = sub.assign(cell=[f"{v:.1f}{'' if ver == 'yes' else '†'}" for v, ver in zip(sub.value, sub.verified)],
                         column=sub.task + " " + sub.metric)
        piv = sub.pivot_table(index=["model", "size", "pretrain_data"], columns="column", values="cell",
                              aggfunc="first").reset_index()
        piv["_order"] = piv["size"].map(SIZE_ORDER)
        out[protocol] = (piv.sort_values(["_order", "model", "pretrain_data"]).drop(columns="_order").fillna("–"),
                         sorted(set(sub.source)))
    return out


# ------------------------------------------------------------------- plots
def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return buf.getvalue()


def make_plots(records: list[dict[str, Any]], table: Table1, scaling_df) -> dict[str, bytes]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    for j, (task, metric) in enumerate(table.columns):
        idx = [i for i in range(len(table.rows)) if (i, j) in table.cells]
        fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(idx) + 2), 3.2))
        means = [table.cells[(i, j)].mean for i in idx]
        errs = [table.cells[(i, j)].std or 0.0 for i in idx]
        labels = [f"{table.rows[i][1]}\n{table.rows[i][2]}" for i in idx]
        ax.bar(range(len(idx)), means, yerr=errs, capsize=4, color="#4c72b0")
        ax.set_xticks(range(len(idx)), labels, fontsize=7)
        ax.set_ylabel(f"{metric} (points)")
        ax.set_title(f"{task}: {metric}")
        plots[f"bar_{task}_{metric}"] = _png(fig)
    from .tasks import all_tasks

    main_metric = {t.name: t.main_metrics[0] for t in all_tasks().values() if t.main_metrics}
    by_task: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        by_task.setdefault(rec["task"], []).append(rec)
    for task, recs in by_task.items():
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        drawn_loss = drawn_val = False
        for rec in recs:
            name = f"{model_identity(rec)['label']} s{rec['seed']}"
            loss = analysis.read_train_loss(rec["_run_dir"])
            if loss:
                a1.plot([i for i, _ in loss], [v for _, v in loss], label=name, lw=1)
                drawn_loss = True
            metric = main_metric.get(task)
            scale = all_tasks()[task].metric(metric).display_scale if metric else 1.0
            hist = [(h["iter"], h["metrics"][metric] * scale) for h in rec.get("eval_history", [])
                    if h.get("metrics", {}).get(metric) is not None]
            if hist:
                a2.plot([i for i, _ in hist], [v for _, v in hist], marker="o", label=name, lw=1)
                drawn_val = True
        a1.set_title(f"{task}: train loss")
        a2.set_title(f"{task}: val {main_metric.get(task, '?')}")
        for ax, drawn, why in ((a1, drawn_loss, "no training-loss scalars in these runs\n"
                                               "(mmengine's vis_data/scalars.json is missing)"),
                               (a2, drawn_val, "no evaluation history in these records")):
            if drawn:
                ax.set_xlabel("iteration")
                ax.legend(fontsize=6)
            else:  # say so in words instead of drawing empty axes
                ax.set_axis_off()
                ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, transform=ax.transAxes)
        plots[f"curves_{task}"] = _png(fig)
    if scaling_df is not None and not scaling_df.empty:
        tasks = sorted(set(scaling_df.task))
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.3 * len(tasks), 3.0), squeeze=False)
        params = analysis.ENCODER_PARAMS
        for ax, task in zip(axes[0], tasks):
            sub = scaling_df[scaling_df.task == task]
            for (fam, pre, metric), g in sub.groupby(["family", "pretrain", "metric"]):
                g = g[g["size"].isin(list(params))].sort_values("size", key=lambda s: s.map(SIZE_ORDER))
                if len(g) >= 2:
                    ax.plot([params[s] for s in g["size"]], g.value, marker="o", label=f"{fam} {pre} {metric}", lw=1)
            ax.set_xscale("log")
            ax.set_xlabel("encoder parameters")
            ax.set_title(task)
            ax.legend(fontsize=5)
        plots["scaling"] = _png(fig)
    return plots


# ----------------------------------------------------------------- writers
def _footnotes(records: list[dict[str, Any]]) -> list[str]:
    from .tasks import all_tasks

    tasks = all_tasks()
    notes = {}
    for rec in records:
        key = (rec["task"], rec["profile"])
        t = tasks.get(rec["task"])
        notes[key] = t.footnote(rec) if t else f"{rec['task']} / {rec['profile']}: a task this installation " \
                                               "does not register; no protocol note"
    return [notes[k] for k in sorted(notes)]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _table1_rows(t: Table1, bold: str) -> tuple[list[str], list[list[str]]]:
    header = ["size", "backbone", "profile"] + [f"{task} {m}" for task, m in t.columns] + ["Δ DeiT III / Δ MAE"]
    rows = []
    for i, (size, label, profile) in enumerate(t.rows):
        r = [size, label, profile]
        deltas = []
        for j, (task, m) in enumerate(t.columns):
            c = t.cells.get((i, j))
            r.append("–" if c is None else (bold.format(c.text()) if c.bold else c.text()))
            d = t.deltas.get((i, j), {})
            if d:
                deltas.append(f"{m}: " + " / ".join(f"{d[b]:+.1f}" if b in d else "–" for b in BASELINES))
        r.append("; ".join(deltas) if deltas else "–")
        rows.append(r)
    return header, rows


def _tex_escape(s: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                 ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("†", r"$^\dagger$"), ("–", "--")):
        s = s.replace(a, b)
    return s


def _tex_table(header: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "l" * len(header)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", rf"\begin{{tabular}}{{{cols}}}", r"\toprule",
             " & ".join(_tex_escape(h) for h in header) + r" \\", r"\midrule"]
    for r in rows:
        lines.append(" & ".join(r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_tex_escape(caption)}}}", r"\end{table}", ""]
    return "\n".join(lines)


def write_report(records: list[dict[str, Any]], out: str | Path, bad: list[tuple[str, str]] | None = None,
                 pretrain_logs: list[str | Path] | None = None,
                 trajectories: list[str | Path] | None = None) -> dict[str, Path]:
    import pandas as pd

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    table = build_table1(records)
    pubs = published_tables()
    paper = analysis.paper_frame()
    own_df = own_scaling_frame(table)
    scaling_rows = analysis.scaling_analysis(pd.concat([paper.drop(columns="verified"), own_df], ignore_index=True))
    data_effect = analysis.data_scale_effect(paper)
    ft = [(rec, analysis.finetune_analysis(rec)) for rec in records]
    pre = [(str(p), analysis.pretrain_analysis(analysis.parse_pretrain_log(p))) for p in (pretrain_logs or [])]
    plots = make_plots(records, table, paper)
    traj = []  # `analyze trajectory` outputs: transfer along pre-training
    for i, tpath in enumerate(trajectories or []):
        from .trajectory import figure_png
        tres = json.loads(Path(tpath).read_text())
        plots[f"trajectory_{i}"] = figure_png(tres)
        traj.append((str(tpath), tres, f"trajectory_{i}"))
    for name, data in plots.items():
        (out / "figures" / f"{name}.png").write_bytes(data)

    # ------------------------------------------------------------- sections
    sections: list[tuple[str, list[tuple[str, Any]]]] = []  # (title, [(kind, payload)])
    h1, r1 = _table1_rows(table, "**{}**")
    from .cells import group_records
    n_cells = len(group_records(records))
    intro = (f"{len(records)} run(s) from {len({r['_run_dir'] for r in records})} run directories, in {n_cells} "
             "cell(s): a cell is one task, backbone (name, checkpoint sha256, init), profile and set of resolved "
             "settings; runs that differ in any setting are separate rows, the profile column naming the settings "
             "that set them apart. Values are points (metric x 100), mean ± sample std over distinct seeds with "
             "their count n (runs repeating a seed are merged and counted once, see 'Repeated seeds'); **bold** = "
             "best of its size and profile; [paper x] = the published number for the same model, of the run's "
             f"protocol where one is published (else the comparison table's, marked {PROTOCOL_DIFFERS} and named in "
             "a footnote; † = not yet verified against the paper). Δ compares runs of one protocol only.")
    sections.append(("Transfer results (4M Table 1 layout)", [("p", intro), ("table", (h1, r1, (
        "Your runs: the main metric of each task in points, mean ± std over seeds (n), best per size in bold, "
        "the published number in brackets, Δ to DeiT III / MAE of the same size and protocol.")))]
        + [("p", note) for note in table.protocol_notes()]))
    rep = repeated_seed_rows(records)
    if rep:
        sections.append(("Repeated seeds (measured non-determinism)", [
            ("p", "Runs of the same cell and seed are one seed in the tables (their values averaged). Identical "
                  "values mean the run is deterministic on the machines that ran it; a difference is measured "
                  "non-determinism (another machine kind, threads, GPU kernels)."),
            ("table", (["task", "backbone", "profile", "cell", "seed", "runs", "main metrics", "run dirs"], rep,
                       "Seeds run more than once in one cell, and how far apart their results are (points)."))]))
    for protocol, (piv, sources) in pubs.items():
        hdr = list(piv.columns)
        rows = [[str(v) for v in r] for r in piv.itertuples(index=False)]
        sections.append((f"Published numbers, protocol `{protocol}`", [
            ("p", "† marks numbers whose `verified` column is 'no' (not yet checked against the paper). "
                  "Sources: " + "; ".join(sources)),
            ("table", (hdr, rows, f"Published scores (points) under the {protocol} protocol, per model, size "
                                  "and pre-training data; not measured by this suite."))]))
    sections.append(("Figures", [("img", (name, f"figures/{name}.png")) for name in plots
                                 if name != "scaling" and not name.startswith("trajectory_")]))
    # scaling
    sc_rows = [scaling_row(r) for r in scaling_rows]
    de_rows = [[d["task"], d["metric"]] + [f"{d[s]:+.1f}" if s in d else "–" for s in ("B", "L", "XL")]
               + ["yes" if d["xl_gain_exceeds_b_and_l"] else "no"] for d in data_effect]
    sections.append(("Overfitting analysis: model scaling", [
        ("p", "Method: " + analysis.METHODS["scaling"]),
        ("table", (SCALING_HEADER, sc_rows,
                   "Observed XL score vs the XL score the B -> L trend predicts by each model (log-linear in the "
                   "score; power law in the error), in points; margin = the noise margin; shortfall = below both "
                   "expectations by more than the margin; fine-tuning = each size's mode (a row mixing modes "
                   "confounds size with mode).")),
        ("p", "Data scale at fixed size: 4M-7 COYO700M minus 4M-7 CC12M (points). A larger gain at XL than at "
              "B and L is what overfitting of the smaller CC12M at XL predicts."),
        ("table", (["task", "metric", "B", "L", "XL", "XL gain > B and L"], de_rows,
                   "Score with COYO700M minus score with CC12M pre-training, per size (points).")),
        ("img", ("scaling", "figures/scaling.png"))]))
    ft_rows = []
    for rec, a in ft:
        if not a.get("available"):
            continue
        slope = a["train_loss_slope_after_peak"]
        ft_rows.append([model_identity(rec)["label"], rec["task"], rec["profile"], str(rec["seed"]), a["metric"],
                        str(a["peak_iter"]), f"{a['peak'] * 100:.1f}", f"{a['final'] * 100:.1f}",
                        f"{a['gap_points']:.1f}", "–" if slope is None else f"{slope:.2e}",
                        "yes" if a["overfitting"] else "no"])
    sections.append(("Overfitting analysis: fine-tuning", [
        ("p", "Method: " + analysis.METHODS["finetune"]),
        ("table", (["backbone", "task", "profile", "seed", "metric", "peak iter", "peak", "final", "gap (points)",
                    "train-loss slope after peak", "overfitting"], ft_rows,
                   "Per run: best validation score during fine-tuning vs the final one, and whether the training "
                   "loss kept falling after the peak."))]))
    if pre:
        items: list[tuple[str, Any]] = [("p", "Method: " + analysis.METHODS["pretrain"])]
        for path, res in pre:
            rows = [[m, res["eval_set"], "–" if i["onset"] is None else f"{i['onset']:g}",
                     "–" if i["confirmed_at"] is None else f"{i['confirmed_at']:g}"]
                    for m, i in res["modalities"].items()]
            items.append(("p", f"`{path}` (x axis: {res['x']}). Modalities that overfit, first to last: "
                               + (", ".join(res["overfit_order"]) or "none")))
            items.append(("table", (["modality", "held-out set", f"onset ({res['x']})", "confirmed at"], rows,
                                    "Per target modality: where the held-out loss starts to rise while the "
                                    "training loss still falls.")))
        sections.append(("Overfitting analysis: pre-training", items))
    if traj:
        items = [("p", "Method: " + traj[0][1]["method"])]
        for path, tres, fig in traj:
            rows = [[k["model"], k["probe"], k["metric"], Path(k["peak_checkpoint"]).name,
                     "–" if k["peak_tokens_seen"] is None else f"{k['peak_tokens_seen']:.3g}",
                     f"{k['peak_value'] * 100:.1f}", f"{k['last_value'] * 100:.1f}", f"{k['drop_points']:.1f}",
                     "yes" if k["peaked_early"] else "no", str(k["n_checkpoints"])] for k in tres["peaks"]]
            onset = tres.get("pretrain_onset") or {}
            items.append(("p", f"`{path}`" + (f"; held-out loss onset of the pre-training log: {onset['earliest']:g} "
                                               f"({onset['x']}, {onset['modality']})" if onset.get("earliest") is not None
                                               else "")))
            items.append(("table", (["model", "probe", "metric", "peak checkpoint", "peak tokens seen", "peak",
                                     "last", "drop (points)", "peaked early", "checkpoints"], rows,
                                    "Per model and probe: the checkpoint where the probe peaked, against the last.")))
            items.append(("img", (fig, f"figures/{fig}.png")))
        sections.append(("Overfitting analysis: transfer along pre-training", items))
    notes = _footnotes(records)
    if bad:
        notes += [f"skipped {p}: {why}" for p, why in bad]
    sections.append(("Protocol notes", [("list", notes)]))

    md = _render_md(sections)
    html_doc = _render_html(sections, plots)
    tex = _tex_table(*_table1_rows(table, r"\textbf{{{}}}"), "Transfer results (mean $\\pm$ std over seeds).")
    tex = tex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--").replace("†", r"$^\dagger$")
    for protocol, (piv, _) in pubs.items():
        tex += _tex_table(list(piv.columns), [[_tex_escape(str(v)) for v in r] for r in piv.itertuples(index=False)],
                          f"Published numbers ({protocol}); dagger: not verified.")
    paths = {"md": out / "report.md", "html": out / "report.html", "tex": out / "tables.tex"}
    for kind, text in (("md", md), ("html", html_doc), ("tex", tex)):
        tmp = paths[kind].with_suffix(".partial")
        tmp.write_text(text)
        tmp.replace(paths[kind])
    return paths


def _render_md(sections: list[tuple[str, list[tuple[str, Any]]]]) -> str:
    parts = ["# fourm-eval report", ""]
    for title, items in sections:
        parts += [f"## {title}", ""]
        for kind, payload in items:
            if kind == "p":
                parts += [payload, ""]
            elif kind == "table":
                if len(payload) > 2:
                    parts += [f"*{payload[2]}*", ""]
                parts += [_md_table(payload[0], payload[1]), ""]
            elif kind == "img":
                parts += [f"![{payload[0]}]({payload[1]})", ""]
            elif kind == "list":
                parts += [f"- {x}" for x in payload] + [""]
    return "\n".join(parts)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
margin:.5em 0 1.5em}td,th{border:1px solid #bbb;padding:3px 8px;font-size:13px}th{background:#eee}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}code{background:#f4f4f4}
caption{caption-side:top;text-align:left;font-size:13px;color:#444;padding:2px 0}"""


def _inline_md(text: str) -> str:
    import re
    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def _render_html(sections: list[tuple[str, list[tuple[str, Any]]]], plots: dict[str, bytes]) -> str:
    body = ["<h1>fourm-eval report</h1>", "<nav><h2>Contents</h2><ol class='toc'>"
            + "".join(f"<li><a href='#s{i}'>{html.escape(t)}</a></li>" for i, (t, _) in enumerate(sections))
            + "</ol></nav>"]
    for i, (title, items) in enumerate(sections):
        body.append(f"<h2 id='s{i}'>{html.escape(title)}</h2>")
        for kind, payload in items:
            if kind == "p":
                body.append(f"<p>{_inline_md(payload)}</p>")
            elif kind == "table":
                header, rows = payload[0], payload[1]
                cap = f"<caption>{html.escape(payload[2])}</caption>" if len(payload) > 2 else ""
                body.append(f"<table class='results'>{cap}<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header)
                            + "</tr>" + "".join("<tr>" + "".join(f"<td>{_inline_md(c)}</td>" for c in r) + "</tr>"
                                                for r in rows) + "</table>")
            elif kind == "img":
                name = payload[0]
                if name in plots:
                    b64 = base64.b64encode(plots[name]).decode()
                    body.append(f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,{b64}'>"
                                f"<figcaption>{html.escape(name)}</figcaption></figure>")
            elif kind == "list":
                body.append("<ul>" + "".join(f"<li>{_inline_md(x)}</li>" for x in payload) + "</ul>")
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>fourm-eval report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>")
