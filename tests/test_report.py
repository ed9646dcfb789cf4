"""`spade report` on small runs: the HTML references existing pictures, carries the metrics; thresholds.json."""
import json
import re
import shutil
import subprocess
import tarfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade.evaluation import report
from spade.evaluation.ground_truth import metrics_table
from pipelines.cli import build_parser, main
from pipelines.evaluate import run_evaluate
from pipelines.fit import run_fit
from pipelines.report import read_originals, run_report
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS, plumbing_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(sample_root, tmp_path_factory):
    """A labelled run (the sample's test split) and an unlabelled one (flat folder + tar shard + a broken file)."""
    config = plumbing_config()
    base = tmp_path_factory.mktemp("report-runs")
    gallery = str(base / "gallery")
    run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    labelled = str(base / "scores")
    run_score(config, gallery, sample_root, labelled, BEAM_ARGS)
    flat = base / "flat"
    flat.mkdir()
    shutil.copy(f"{sample_root}/test/good/000.png", flat / "a.png")
    shutil.copy(f"{sample_root}/test/spot/000.png", flat / "b.png")
    (flat / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with tarfile.open(flat / "shard.tar", "w") as archive:
        archive.add(f"{sample_root}/test/scratch/001.png", arcname="c.png")
    unlabelled = str(base / "flat-scores")
    run_score(config, gallery, str(flat), unlabelled, BEAM_ARGS)
    return {"labelled": labelled, "unlabelled": unlabelled, "masks": f"{sample_root}/ground_truth", "base": base}


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.srcs.append(attrs["src"])
        if tag == "a":
            self.hrefs.append(attrs["href"])


def _check_links(folder: Path) -> tuple[str, _Links]:
    page = (folder / "index.html").read_text()
    links = _Links()
    links.feed(page)
    assert links.srcs, "the report shows no pictures"
    for src in links.srcs:
        assert not src.startswith(("/", "http:", "https:", "file:")), f"{src}: pictures must be relative to the page"
        path = folder / src
        assert path.is_file(), f"{src} referenced but missing"
        with Image.open(path) as img:
            img.verify()
    for href in links.hrefs:
        if href.startswith("#"):
            assert href[1:] in links.ids, f"dangling anchor {href}"
        elif href.startswith("file://"):
            assert Path(href[len("file://"):]).exists(), href
    return page, links


def test_report_with_ground_truth(runs, tmp_path):
    out = tmp_path / "report"
    summary = run_report(runs["labelled"], runs["masks"], str(out), top=5)
    page, links = _check_links(out)
    assert summary["html"] == str(out / "index.html") and summary["gallery"] == 5 and summary["scored"] == 9
    for heading in ("Metrics", "ROC and PRO curves", "Image scores: good vs defective", "Thresholds",
                    "Top 5 most anomalous images", "All scored images (9)"):
        assert heading in page, heading
    assert "RANDOM backbone weights" in page
    # the metrics table carries the evaluation's numbers, per defect type and overall
    for row in summary["metrics"]:
        cells = re.search(rf"<tr><td>(?:<b>)?{row['defect']}(?:</b>)?</td>(.*?)</tr>", page).group(1)
        for key in ("image_rocauc", "pixel_rocauc", "pro"):
            assert report.fmt(row[key]) in cells, (row["defect"], key)
    assert {r["defect"] for r in summary["metrics"]} == {"scratch", "spot", "overall"}
    for name in ("img/roc_image.png", "img/roc_pixel.png", "img/pro.png", "img/histogram.png", "img/colorbar.png"):
        assert name in links.srcs, name
    # gallery: four pictures per defective image (good ones have no ground-truth picture), thumbnails <= 256 px
    for rank in range(1, 6):
        assert f"img/{rank:04d}_original.png" in links.srcs and f"img/{rank:04d}_overlay.png" in links.srcs
        assert f"img/{rank:04d}_predicted.png" in links.srcs
        assert f'href="#row-{rank}"' in page and f'id="top-{rank}"' in page
        with Image.open(out / f"img/{rank:04d}_overlay.png") as img:
            assert max(img.size) == 256
    assert any(src.endswith("_truth.png") for src in links.srcs)
    assert summary["thresholds"]["image_selection"]["method"] == "max_f1"
    assert "Errors" not in page


def test_report_without_ground_truth_lists_errors_and_reads_tar_members(runs, tmp_path):
    out = tmp_path / "report"
    summary = run_report(runs["unlabelled"], None, str(out), top=10)
    page, links = _check_links(out)
    assert summary["metrics"] is None and summary["errors"] == 1 and summary["scored"] == 3
    assert "Metrics" not in page and "ROC and PRO curves" not in page
    assert "Image score distribution" in page and "No ground truth" in page
    assert "Top 3 most anomalous images" in page
    errors = page[page.index('id="errors"'):]
    assert "broken.png" in errors and "corrupt or truncated image" in errors
    assert "img/histogram.png" in links.srcs
    # the tar member's original is read from its shard
    assert sum(src.endswith("_original.png") for src in links.srcs) == 3


def test_read_originals_from_files_tars_and_missing(runs):
    flat = runs["base"] / "flat"
    found = read_originals([str(flat / "a.png"), f"{flat}/shard.tar#c.png", f"{flat}/shard.tar#nope.png", str(flat / "gone.png")])
    assert found[str(flat / "a.png")][0] == (flat / "a.png").read_bytes()
    assert found[f"{flat}/shard.tar#c.png"][0][:4] == b"\x89PNG"
    assert found[f"{flat}/shard.tar#nope.png"] == (None, "not found in its tar shard")
    assert found[str(flat / "gone.png")] == (None, "file not found")


def test_evaluate_writes_thresholds_next_to_metrics(runs, tmp_path):
    out = tmp_path / "eval"
    result = run_evaluate(runs["labelled"], runs["masks"], str(out))
    saved = json.loads((out / "thresholds.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["thresholds"] == saved
    assert saved["image_selection"]["method"] == "max_f1" and saved["pixel_selection"]["method"] == "max_f1"
    assert saved["image"] == saved["image_selection"]["threshold"] and saved["pixel"] == saved["pixel_selection"]["threshold"]
    assert saved["source"] == "evaluate" and saved["rule"] == "anomalous when score >= threshold"
    assert 0.0 < saved["image_selection"]["f1"] <= 1.0 and result["counts"]["defective"] == 6
    # without masks: image threshold from labels, pixel threshold at a target FPR on the good images' maps
    saved = run_evaluate(runs["labelled"], None, str(tmp_path / "eval2"), pixel_fpr=0.01)["thresholds"]
    assert saved["image_selection"]["method"] == "max_f1"
    assert saved["pixel_selection"]["method"] == "target_fpr" and saved["pixel_selection"]["fpr"] <= 0.01
    # forced target-FPR image threshold: flags no good image at FPR 0
    saved = run_evaluate(runs["labelled"], runs["masks"], str(tmp_path / "eval3"), threshold_method="target_fpr",
                         image_fpr=0.0)["thresholds"]
    assert saved["image_selection"]["method"] == "target_fpr" and saved["image_selection"]["flagged"] == 0


def test_cli_report_and_help(runs, tmp_path, capsys):
    assert main(["--quiet", "report", "--scores", runs["labelled"], "--out", str(tmp_path / "r"), "--top", "2"]) == 0
    assert (tmp_path / "r" / "index.html").is_file()
    assert main(["report", "--scores", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    assert "holds no run.json" in capsys.readouterr().err
    help_text = build_parser()._subparsers._group_actions[0].choices["report"].format_help()
    assert "example:" in help_text and "spade report --scores" in help_text and "--masks" in help_text


def test_pictures_and_figures_are_pure_functions():
    assert report.thumb_size(900, 900) == (256, 256) and report.thumb_size(1000, 500) == (256, 128)
    assert report.global_scale([1.0, 3.0, 2.0]) == (1.0, 3.0)
    assert report.global_scale([2.0]) == (0.0, 2.0) and report.global_scale([]) == (0.0, 1.0)
    scores = np.array([[0.0, 1.0], [2.0, 3.0]])
    heat = report.colorize(scores, 1.0, 3.0)
    assert heat.shape == (2, 2, 3) and (heat[0, 0] == heat[0, 1]).all()  # at or below low: the same blue
    assert heat[1, 1, 0] > heat[1, 1, 2] and heat[0, 0, 2] > heat[0, 0, 0]  # high red, low blue
    grey = np.full((2, 2, 3), 100, np.uint8)
    assert report.heat_overlay(grey, scores, 1.0, 3.0).shape == (2, 2, 3)
    thin = np.zeros((512, 512), bool)
    thin[100, :] = True  # one pixel wide: must survive shrinking to 256
    assert report.resize_mask(thin, (256, 256)).max() == 255
    framed = report.outline(np.zeros((5, 5, 3), np.uint8), np.pad(np.ones((3, 3), bool), 1))
    assert (framed[2, 2] == 0).all() and (framed[1, 1] == (0, 255, 0)).all()
    for png in (report.curve_figure({"overall": (np.array([0, 0.5, 1]), np.array([0, 0.9, 1]), 0.8)}, "t", "x", "y", "AUC"),
                report.histogram_figure({"good": [1, 2], "defective": [3, 4]}, {"threshold": 2.5}, "h"),
                report.histogram_figure({}, {}, "empty"), report.colorbar_figure(0.0, 1.0)):
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.fmt(float("nan")) == "n/a" and report.fmt(0.12345) == "0.1235" and report.esc("<a&>") == "&lt;a&amp;&gt;"


def test_rendered_in_headless_chromium(runs, tmp_path):
    if not shutil.which("chromium") and not shutil.which("chromium-browser"):
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "report"
    run_report(runs["labelled"], runs["masks"], str(out), top=3)
    shot = tmp_path / "shot.png"
    subprocess.run([str(ROOT / "scripts" / "render_report.sh"), str(out), str(shot), "1000x1600"], check=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1000, 1600)
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10, "the screenshot is blank"
