"""Overfitting analyses against hand-computed values."""

import json
import math

import pytest

from fourm_eval import analysis
from fourm_eval.results import load_paper_results


def _csv(model, size, pre, task, metric):
    p = load_paper_results()
    row = p[(p.model == model) & (p["size"] == size) & (p.pretrain_data == pre) & (p.task == task)
            & (p.metric == metric) & (p.source.str.startswith("4M"))]  # the 4M papers' comparison table
    return float(row.value.item())


def test_xl_shortfall_for_4m7_cc12m_traceable_to_csv():
    rows = {(r["family"], r["pretrain"], r["task"]): r for r in analysis.scaling_analysis(analysis.paper_frame())}
    for task, metric in (("ade20k-seg", "mIoU"), ("in1k-cls", "top1"), ("nyu-depth", "delta1")):
        b, l, xl = (_csv("4M-7", s, "CC12M", task, metric) for s in ("B", "L", "XL"))
        expected = l + (l - b) * math.log(1.2e9 / 303e6) / math.log(303e6 / 86e6)
        r = rows[("4M-7", "CC12M", task)]
        assert r["expected_XL"] == pytest.approx(expected) and r["XL"] == xl
        assert r["shortfall"] and xl < expected - 0.5


def test_coyo_gain_at_xl():
    eff = {d["task"]: d for d in analysis.data_scale_effect(analysis.paper_frame())}
    d = eff["ade20k-seg"]
    assert d["XL"] == pytest.approx(_csv("4M-7", "XL", "COYO700M", "ade20k-seg", "mIoU")
                                    - _csv("4M-7", "XL", "CC12M", "ade20k-seg", "mIoU"))
    assert d["XL"] > 0 and d["xl_gain_exceeds_b_and_l"]


def _log(tmp_path, onset_epoch=12, n=30):
    lines = []
    for e in range(n):
        tokens = (e + 1) * 5.0
        row = {"epoch": e, "loss": 3 - 0.05 * e, "caption_loss": 2.5 - 0.05 * e, "det_loss": 2.0 - 0.03 * e,
               "tok_rgb@224_loss": 4 - 0.04 * e, "total_tokens_seen_b": tokens, "lr": 1e-4}
        if e % 2 == 0:  # evaluation epochs
            cap = 2.6 - 0.04 * e if e <= onset_epoch else 2.6 - 0.04 * onset_epoch + 0.03 * (e - onset_epoch)
            row.update({"[Eval] caption_loss": cap, "[Eval] det_loss": 2.1 - 0.02 * e,
                        "[Eval] tok_rgb@224_loss": 4.1 - 0.03 * e, "[Fixed Eval] caption_loss": cap})
        lines.append(json.dumps(row))
    p = tmp_path / "log.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_pretrain_onset_found(tmp_path):
    res = analysis.pretrain_analysis(analysis.parse_pretrain_log(_log(tmp_path)))
    assert res["x"] == "total_tokens_seen_b" and res["eval_set"] == "[Eval]"
    cap = res["modalities"]["caption"]
    assert cap["onset"] == pytest.approx(13 * 5.0)  # epoch 12 -> 65B tokens, the planted turn
    assert res["modalities"]["det"]["onset"] is None and res["modalities"]["tok_rgb@224"]["onset"] is None
    assert res["overfit_order"] == ["caption"]


def test_pretrain_log_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('{"epoch": 0}\nnot json\n')
    with pytest.raises(Exception, match=r"bad.txt:2"):
        analysis.parse_pretrain_log(bad)
    noeval = tmp_path / "noeval.txt"
    noeval.write_text('{"epoch": 0, "caption_loss": 1.0}\n')
    with pytest.raises(Exception, match="no held-out losses"):
        analysis.pretrain_analysis(analysis.parse_pretrain_log(noeval))


def test_finetune_peak_gap_and_loss_slope():
    hist = [{"iter": i, "metrics": {"box_AP": v}} for i, v in ((0, 0.0), (100, 0.30), (200, 0.35), (300, 0.31),
                                                               (400, 0.29))]
    rec = {"task": "coco-det", "metrics": {"box_AP": 0.29}, "eval_history": hist}
    loss = [(i, 2.0 - i / 1000) for i in range(0, 401, 20)]
    a = analysis.finetune_analysis(rec, loss)
    assert a["peak_iter"] == 200 and a["gap_points"] == pytest.approx(6.0)
    assert a["train_loss_slope_after_peak"] == pytest.approx(-0.001) and a["overfitting"]
    flat = analysis.finetune_analysis({**rec, "eval_history": hist[:3], "metrics": {"box_AP": 0.35}}, loss)
    assert flat["gap_points"] == 0 and not flat["overfitting"]
