"""Results collection, tidy export, and the report (tables against the records, HTML in a real browser)."""

import json
import statistics
import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from fourm_eval.cli import app
from fourm_eval.results import load_records
from records_factory import write_record

runner = CliRunner()


@pytest.fixture()
def runs(tmp_path):
    root = tmp_path / "runs"
    vals = {0: (0.301, 0.250), 1: (0.312, 0.262), 2: (0.296, 0.247)}
    for s, (box, mask) in vals.items():
        write_record(root, f"4m-b-s{s}", seed=s, metrics={"box_AP": box, "mask_AP": mask},
                     losses=[(i, 2.0 - i / 100) for i in range(0, 100, 10)])
    for s, box in ((0, 0.280), (1, 0.284)):
        write_record(root, f"mae-b-s{s}", backbone="mae-b", checkpoint="/ckpt/mae.safetensors", seed=s,
                     metrics={"box_AP": box, "mask_AP": box - 0.05})
    write_record(root, "deit-b", backbone="deit3-b", checkpoint="/ckpt/deit.safetensors",
                 metrics={"box_AP": 0.27, "mask_AP": 0.22})
    # a malformed and a partial record: reported and skipped, never fatal
    (root / "broken").mkdir()
    (root / "broken" / "result.json").write_text("{\"schema\": \"fourm-eval/result\", \"metr")
    (root / "partial").mkdir()
    (root / "partial" / "result.json").write_text(json.dumps({"schema": "fourm-eval/result", "schema_version": 1}))
    return root, vals


def test_collect_skips_bad_records(runs):
    root, _ = runs
    good, bad = load_records([root])
    assert len(good) == 6
    assert {p.split("/")[-2] for p, _ in bad} == {"broken", "partial"}
    assert any("missing 'metrics'" in why for _, why in bad)


def test_export_csv_and_parquet(runs, tmp_path):
    root, vals = runs
    for ext in ("csv", "parquet"):
        out = tmp_path / f"t.{ext}"
        r = runner.invoke(app, ["results", "export", str(root), "--out", str(out)])
        assert r.exit_code == 0, r.output
        df = pd.read_csv(out) if ext == "csv" else pd.read_parquet(out)
        assert len(df) == 12  # 6 runs x 2 metrics
        row = df[(df.backbone == "4m-b") & (df.seed == 1) & (df.metric == "box_AP")]
        assert row.value.item() == pytest.approx(vals[1][0])
        assert set(df.model) == {"4M-7-B (CC12M)", "MAE-B (IN1K)", "DeiT III-B (IN21K)"}


def test_report_tables_match_records(runs, tmp_path):
    root, vals = runs
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    for f in ("report.md", "report.html", "tables.tex"):
        assert (out / f).stat().st_size > 0
    boxes = [v[0] * 100 for v in vals.values()]
    mean, std = statistics.mean(boxes), statistics.stdev(boxes)
    line = next(l for l in md.splitlines() if l.startswith("| B | 4M-7-B (CC12M) | smoke (vitdet) |"))
    # 4M-7 B has the best box AP of its size -> bold; published number alongside; deltas to both baselines
    assert f"**{mean:.1f} ± {std:.1f} (n=3) [paper 49.7†]**" in line
    mae = statistics.mean([28.0, 28.4])
    assert f"box_AP: {mean - 27.0:+.1f} / {mean - mae:+.1f}" in line
    assert "| B | MAE-B (IN1K) | smoke (vitdet) | 28.2 ± 0.3 (n=2) [paper 48.3†]" in md
    assert "‡]" not in md  # one protocol, the published numbers' own: nothing is marked
    assert "skipped" in md and "broken" in md  # the bad records are listed in the notes
    assert "\\textbf{" in (out / "tables.tex").read_text()
    # the scaling analysis, traceable to the shipped CSV
    assert ("| 4M-7 | CC12M | ade20k-seg | mIoU | 50.1 | 53.4 | 55.0 | B full / L full / XL lora (confound) | 57.0 | "
            "-2.0 | 56.8 | -1.8 | 0.5 | yes |") in md
    assert "| 4M-7 | CC12M | nyu-depth | delta1 | 92.0 | 94.4 | 96.1 | B full / L full / XL lora (confound) |" in md
    assert "| ade20k-seg | mIoU | -0.7 | +0.1 | +1.1 | yes |" in md


def test_two_protocols_are_marked_footnoted_and_never_differenced(tmp_path):
    """ADE20K runs of two protocols (multimae, the published table's, and mae-upernet): each run sits beside the
    published number of its own protocol where one exists (MAE-B: 46.1 multimae, 48.1 mae-upernet, both in the
    shipped CSV); a run without one gets the table's number marked and a footnote naming both protocols; Δ to
    the baselines is computed within a protocol only."""
    from fourm_eval.report import PROTOCOL_DIFFERS, build_table1

    root = tmp_path / "runs"
    m = lambda v: {"mIoU": v, "mAcc": v, "aAcc": v}  # noqa: E731
    ade = dict(task="ade20k-seg", sha256="1" * 64)
    write_record(root, "4m-mm", profile="smoke", metrics=m(0.40), **ade)
    write_record(root, "4m-up", profile="mae-upernet-smoke", metrics=m(0.45), config={"protocol": "mae-upernet"},
                 **ade)
    write_record(root, "mae-mm", backbone="mae-b", checkpoint="/ckpt/mae.safetensors", profile="smoke",
                 metrics=m(0.30), task="ade20k-seg", sha256="2" * 64)
    write_record(root, "mae-up", backbone="mae-b", checkpoint="/ckpt/mae.safetensors", profile="mae-upernet-smoke",
                 metrics=m(0.20), config={"protocol": "mae-upernet"}, task="ade20k-seg", sha256="2" * 64)
    recs, _ = load_records([root])
    t = build_table1(recs)
    rows = {(r[1], r[2]): i for i, r in enumerate(t.rows)}
    j = t.columns.index(("ade20k-seg", "mIoU"))
    mm, up = "smoke (multimae)", "mae-upernet-smoke (mae-upernet)"  # the profile column names the protocol
    four_mm, four_up = rows[("4M-7-B (CC12M)", mm)], rows[("4M-7-B (CC12M)", up)]
    mae_mm, mae_up = rows[("MAE-B (IN1K)", mm)], rows[("MAE-B (IN1K)", up)]
    c = t.cells
    assert (c[(mae_mm, j)].published, c[(mae_mm, j)].protocol_differs) == (46.1, False)
    assert (c[(mae_up, j)].published, c[(mae_up, j)].protocol_differs) == (48.1, False)
    assert (c[(four_mm, j)].published, c[(four_mm, j)].protocol_differs) == (50.1, False)
    assert (c[(four_up, j)].published, c[(four_up, j)].protocol_differs) == (50.1, True)
    assert PROTOCOL_DIFFERS in c[(four_up, j)].text() and PROTOCOL_DIFFERS not in c[(four_mm, j)].text()
    # Δ within a protocol: 40 - 30 and 45 - 20, never 45 - 30 or 40 - 20
    assert t.deltas[(four_mm, j)]["MAE"] == pytest.approx(10.0)
    assert t.deltas[(four_up, j)]["MAE"] == pytest.approx(25.0)
    assert t.protocol_notes() == [f"{PROTOCOL_DIFFERS} ade20k-seg: run by protocol `mae-upernet`, the published "
                                  "number beside it by protocol `multimae`; they are not comparable, and no "
                                  "difference is computed between them"]
    out = tmp_path / "report"
    r = runner.invoke(app, ["report", str(root), "--out", str(out)])
    assert r.exit_code == 0, r.output
    md = (out / "report.md").read_text()
    assert "| B | 4M-7-B (CC12M) | mae-upernet-smoke (mae-upernet) | **45.0 (n=1) [paper 50.1‡]** | mIoU: – / +25.0 |" in md
    assert t.protocol_notes()[0] in md


def test_report_html_renders_in_chromium(runs, tmp_path):
    root, _ = runs
    out = tmp_path / "report"
    assert runner.invoke(app, ["report", str(root), "--out", str(out)]).exit_code == 0
    code = f"""
import json
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = b.new_page()
    page.goto("file://{out / 'report.html'}")
    page.wait_for_load_state("load")
    info = page.evaluate('''() => ({{
        tables: document.querySelectorAll("table.results").length,
        rows: document.querySelectorAll("table.results tr").length,
        images: Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])}})''')
    page.screenshot(path="{tmp_path / 'report.png'}", full_page=True)
    b.close()
print(json.dumps(info))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["tables"] >= 4 and info["rows"] > 20
    names = [i[0] for i in info["images"]]
    assert {"bar_coco-det_box_AP", "bar_coco-det_mask_AP", "curves_coco-det", "scaling"} <= set(names)
    for alt, complete, w, h in info["images"]:
        assert complete and w > 100 and h > 100, alt  # decoded, not a broken image
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _long_dark_rows(img, x0: int, x1: int) -> int:
    """Rows of the image region [x0, x1) that are mostly dark: the spines of a drawn axes box."""
    px = img.convert("L").load()
    w = x1 - x0
    return sum(1 for y in range(img.height) if sum(px[x, y] < 100 for x in range(x0, x1)) > 0.6 * w)


def test_panel_without_data_says_so_in_the_browser(tmp_path):
    """Records without training scalars: the loss panel is words, not empty axes (screenshot of the
    rendered report), while the validation panel beside it is a real plot."""
    root = tmp_path / "runs"
    for s in (0, 1):
        write_record(root, f"4m-b-s{s}", seed=s, metrics={"box_AP": 0.3 + s / 100, "mask_AP": 0.25})
    out = tmp_path / "report"
    assert runner.invoke(app, ["report", str(root), "--out", str(out)]).exit_code == 0
    shot = tmp_path / "curves.png"
    code = f"""
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    b = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"])
    page = b.new_page(viewport={{"width": 1400, "height": 900}})
    page.goto("file://{out / 'report.html'}")
    page.wait_for_load_state("load")
    assert page.locator("nav ol.toc li").count() >= 5
    assert page.locator("table.results caption").count() == page.locator("table.results").count()
    page.locator("img[alt='curves_coco-det']").screenshot(path="{shot}")
    b.close()
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image
    img = Image.open(shot)
    half = img.width // 2
    assert _long_dark_rows(img, 0, half) == 0  # no axes box: the empty panel is text
    assert _long_dark_rows(img, half, img.width) >= 2  # the validation curve's axes are drawn
