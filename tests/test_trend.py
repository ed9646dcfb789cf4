"""Trends across nights: per gallery and night statistics, drift warnings before the flagged share moves, the page."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade.evaluation.trend import DriftRule, Night, Reference, assess
from spade.io.samples import PlantSpec, write_plant_archive
from pipelines.cli import EXIT_ALERT, main
from pipelines.fit import run_fit
from pipelines.score import Nightly, run_score
from pipelines.trend import run_trend
from tests.conftest import BEAM_ARGS, TINY, plumbing_config

ROOT = Path(__file__).resolve().parents[1]
NIGHTS = tuple(f"2026-12-{day:02d}" for day in range(1, 11))
FLAGGED_ALERT = 0.2  # the scenario's alert level: undrifted lines of this small plant flag up to 20 % of a night


def nights(rng, shifts, size=40, gallery="g"):
    return [Night(f"night-{i:04d}", gallery, rng.normal(shift, 1.0, size), None, 0) for i, shift in enumerate(shifts)]


def test_stable_nights_are_clear_and_a_drift_warns():
    rng = np.random.default_rng(0)
    reference = {"g": Reference(0.0, 1.0, None, 1.645)}
    stable = list(assess(nights(rng, [0.0] * 300), reference))
    warned = sum(bool(row["warnings"]) for row in stable)
    assert warned <= 3, f"{warned} of 300 stable nights warned; two tests at alpha 0.001 expect about 0.6"
    assert all(0.0 <= row["above_normal_2sd"] <= 0.15 for row in stable)
    slow = list(assess(nights(rng, [0.0] * 3 + [0.15 * i for i in range(1, 15)]), reference))
    first = next(i for i, row in enumerate(slow) if row["warnings"])
    assert 3 < first < 14
    assert any("drifted from the gallery's first 3" in " ".join(row["warnings"]) for row in slow[first:])
    sudden = list(assess(nights(rng, [0.0] * 8 + [2.0]), reference))
    assert any("previous 7 night(s)" in w for w in sudden[-1]["warnings"])
    downward = list(assess(nights(rng, [0.0] * 3 + [-2.0] * 4), reference))
    assert not any(row["warnings"] for row in downward), "lower scores are not a risk"


def test_a_new_gallery_starts_a_new_history_and_flagged_share_alerts():
    rng = np.random.default_rng(1)
    old, new = nights(rng, [0.0] * 5, gallery="old"), nights(rng, [3.0] * 5, gallery="new")
    rows = list(assess(old + new, {}))
    assert not any(row["warnings"] for row in rows), "a refit's other score scale is no drift"
    flagged = Night("2026-02-01", "g", np.zeros(10), np.arange(10) < 3, 2)
    row = next(assess([flagged], {}, DriftRule(flagged_alert=0.2)))
    assert (row["flagged_share"], row["images"], row["errors"]) == (0.3, 12, 2)
    assert row["warnings"] == ["flagged share 30% above 20%"]


@pytest.fixture(scope="module")
def plant_nights(tmp_path_factory):
    """Ten nights of a three-line plant, scored in one routed run a night; line L2's light brightens 0.5 % a night
    from the fourth night on."""
    root = tmp_path_factory.mktemp("drift")
    spec = PlantSpec(nights=NIGHTS, train=32, good_per_night=20, defective_per_night=0, brighten=(("L2", 0.005),),
                     drift_from=3)
    normals, archive = write_plant_archive(str(root / "made"), spec)
    config = plumbing_config(**{**TINY, "calibration_images": 100, "calibration_image_fpr": 0.05, "k": 2})
    galleries = str(root / "galleries" / "{line}-{camera}")
    run_fit(config, normals, galleries, BEAM_ARGS)
    live = root / "archive"
    for day in NIGHTS:  # each night's images arrive before its run
        for folder in Path(archive).glob(f"line=*/camera=*/date={day}"):
            shutil.copytree(folder, live / folder.relative_to(archive))
        run_score(config, galleries, str(live), str(root / "nightly"), BEAM_ARGS, nightly=Nightly(day=day, since=day))
    return root


def test_the_trend_warns_of_the_drift_before_the_flagged_share_moves(plant_nights, tmp_path):
    out = tmp_path / "trend"
    verdict = run_trend(str(plant_nights / "nightly"), str(out), rule=DriftRule(flagged_alert=FLAGGED_ALERT))
    table = pq.read_table(out / "trend.parquet").to_pylist()
    assert len(table) == 30 and {row["route"] for row in table} == {f"line=L{i}/camera=top" for i in (1, 2, 3)}
    drifting = [row for row in table if row["route"] == "line=L2/camera=top"]
    drift_warned = [row["day"] for row in drifting if any("flagged share" not in w for w in row["warnings"])]
    flagged_over = [row["day"] for row in drifting if row["flagged_share"] > FLAGGED_ALERT]
    assert drift_warned and flagged_over, (drift_warned, flagged_over)
    assert drift_warned[0] < flagged_over[0], "the drift warns before the flagged share crosses the alert level"
    for row in table:
        if row["route"] != "line=L2/camera=top":
            assert not row["warnings"], row
    assert verdict["status"] == "alert" and [a["route"] for a in verdict["alerts"]] == ["line=L2/camera=top"]
    assert verdict["routes"]["line=L2/camera=top"]["first_warning"] == drift_warned[0]
    assert json.loads((out / "trend.json").read_text())["status"] == "alert"
    page = (out / "index.html").read_text()
    assert page.count("<svg") == 6 and "line=L2/camera=top" in page and "warning on the last night" in page
    print(f"drift first warned {drift_warned[0]}; flagged share first above {FLAGGED_ALERT:.0%} on {flagged_over[0]}")
    code = main(["trend", "--scores", str(plant_nights / "nightly"), "--out", str(tmp_path / "cli"),
                 "--flagged-alert", str(FLAGGED_ALERT)])
    assert code == EXIT_ALERT
    clear = main(["trend", "--scores", str(plant_nights / "nightly" / "line=L1" / "camera=top"), "--out",
                  str(tmp_path / "clear"), "--flagged-alert", str(FLAGGED_ALERT)])
    assert clear == 0


def test_trend_page_renders_in_headless_chromium(plant_nights, tmp_path):
    if not shutil.which("chromium") and not shutil.which("chromium-browser"):
        pytest.skip("Chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    out = tmp_path / "trend"
    run_trend(str(plant_nights / "nightly"), str(out), rule=DriftRule(flagged_alert=FLAGGED_ALERT))
    shot = tmp_path / "trend.png"
    subprocess.run([str(ROOT / "scripts" / "render_report.sh"), str(out), str(shot), "1000x1400"], check=True, timeout=120)
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (1400, 1000, 3) and pixels.std() > 10, "the screenshot is blank"
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
    assert red.sum() > 50, "the warning badge and marks are drawn"


def test_years_of_nights_read_route_by_route(tmp_path):
    """The benchmark's synthetic root (benchmarks/trend_scale.py) at a small size: every night of every route is a row,
    and only the drifting line warns."""
    from benchmarks.trend_scale import write_root

    root = tmp_path / "nightly"
    write_root(str(root), galleries=4, nights=120, images=40)  # gallery 3's scores rise 0.002 a night
    verdict = run_trend(str(root), str(tmp_path / "trend"))
    rows = pq.read_table(tmp_path / "trend" / "trend.parquet").to_pylist()
    assert len(rows) == 4 * 120 and len({(r["route"], r["day"]) for r in rows}) == 480
    warned = {route for route, info in verdict["routes"].items() if info["first_warning"]}
    assert "line=L03/camera=top" in warned
    assert all(r["ok"] == 40 and r["errors"] == 0 for r in rows)
    assert verdict["nights_read"] == 480

    # two more nights arrive: the next trend into the same --out reads those, the last ones again and the history
    # the drift tests need, and gives the same table as a trend computed afresh
    for route in sorted(root.glob("line=*/camera=top/gallery=*")):
        last = sorted(route.glob("date=*"))[-1]
        for day in ("2024-04-30", "2024-05-01"):
            shutil.copytree(last / "scores", route / f"date={day}" / "scores")
    again = run_trend(str(root), str(tmp_path / "trend"))
    fresh = run_trend(str(root), str(tmp_path / "fresh"))
    assert fresh["nights_read"] == 488 and again["nights_read"] < 4 * 20
    incremental = pq.read_table(tmp_path / "trend" / "trend.parquet").to_pylist()
    assert incremental == pq.read_table(tmp_path / "fresh" / "trend.parquet").to_pylist()
    assert again["routes"] == fresh["routes"] and again["alerts"] == fresh["alerts"]
    changed = run_trend(str(root), str(tmp_path / "trend"), rule=DriftRule(window=5))  # other settings: nothing reused
    assert changed["nights_read"] == 488


def test_an_incremental_trend_reads_the_baseline_a_fresh_one_uses():
    """A night to compute again that turns out empty (a backfilled, still empty folder) must not stand in for one of
    the gallery's first nights with scores: those are read whatever the new nights hold."""
    from pipelines.trend import nights_to_read
    from spade.io.results import NightPartition

    nights = [NightPartition("r", "g", f"2026-01-{day:02d}", f"/n/{day}") for day in range(1, 12)]
    cached = {("g", p.day): {"ok": 40} for p in nights[1:]}  # night 1 is new (its emptiness unknown until read)
    recompute, needed = nights_to_read(nights, cached, window=7, baseline=3)
    assert nights[0] in recompute and set(nights[-2:]) <= recompute
    assert set(nights[:4]) <= needed, "nights 2-4 are the first 3 with scores should night 1 hold none"
