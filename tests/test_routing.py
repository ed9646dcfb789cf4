"""Many galleries in one run: an archive laid out line=/camera= routed to one gallery per partition."""
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from spade.io.results import read_score_table
from spade.io.routing import RoutingError, is_routing, plan_routes
from spade.io.samples import PlantSpec, write_plant_archive
from pipelines.fit import run_fit
from pipelines.score import Nightly, run_score
from tests.conftest import BEAM_ARGS, TINY, plumbing_config, spade_process

DAY = "2026-12-01"
COMPARED = ("uri", "image_id", "image_score", "pixel_max", "is_anomalous", "neighbours", "status", "gallery_hash")


def touch(path: Path, data: bytes = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_template_routes_partitions_and_names_what_it_cannot_route(tmp_path):
    for rel in ("site=A/line=L1/camera=top/date=2026-12-01/a.png", "site=A/line=L1/camera=side/b.png",
                "site=A/line=L2/camera=top/c.png", "site=A/misc/d.png", "site=A/stray.png", "site=A/line=L3/e.png",
                "site=A/line=L3/readme.txt", "site=A/line=L1/camera=top/ground_truth/x_mask.png"):
        touch(tmp_path / "archive" / rel)
    archive = str(tmp_path / "archive")
    plan = plan_routes(archive, "gs://plant/galleries/{line}-{camera}")
    assert [(r.name, r.gallery) for r in plan.routes] == [
        ("site=A/line=L1/camera=side", "gs://plant/galleries/L1-side"),
        ("site=A/line=L1/camera=top", "gs://plant/galleries/L1-top"),
        ("site=A/line=L2/camera=top", "gs://plant/galleries/L2-top")]
    assert plan.routes[1].images == f"{archive}/site=A/line=L1/camera=top"
    assert plan.unrouted == sorted([f"{archive}/site=A/misc", f"{archive}/site=A/stray.png",
                                    f"{archive}/site=A/line=L3/e.png", f"{archive}/site=A/line=L3/readme.txt"])
    # a glob is narrowed to each route's folder; files the glob does not match are not inputs at all
    globbed = plan_routes(f"{archive}/**/*.png", "g/{line}-{camera}")
    assert globbed.routes[1].images == f"{archive}/site=A/line=L1/camera=top/**/*.png"
    assert f"{archive}/site=A/line=L3/readme.txt" not in globbed.unrouted
    explicit = plan_routes(f"{archive}/site=A/line=*/camera=top/*.png", "g/{line}")
    assert [(r.name, r.images) for r in explicit.routes] == [
        ("line=L1", f"{archive}/site=A/line=L1/camera=top/*.png"),  # named below the literal root of the glob
        ("line=L2", f"{archive}/site=A/line=L2/camera=top/*.png"),
        ("line=L3", f"{archive}/site=A/line=L3/camera=top/*.png")]
    assert is_routing("g/{line}") and is_routing("routes.yaml") and not is_routing("runs/gallery")


def test_routes_table_first_matching_rule_wins(tmp_path):
    for rel in ("line=L1/camera=top/a.png", "line=L1/camera=side/b.png", "line=L2/camera=top/c.png", "other/d.png"):
        touch(tmp_path / "archive" / rel)
    table = tmp_path / "routes.yaml"
    table.write_text(yaml.safe_dump({"routes": [{"match": "line=L1/camera=*", "gallery": "g/first-line-{camera}"},
                                                {"match": "line=*/camera=top", "gallery": "g/{line}"}]}))
    plan = plan_routes(str(tmp_path / "archive"), str(table))
    assert [(r.name, r.gallery) for r in plan.routes] == [("line=L1/camera=side", "g/first-line-side"),
                                                           ("line=L1/camera=top", "g/first-line-top"),
                                                           ("line=L2/camera=top", "g/L2")]
    assert plan.unrouted == [str(tmp_path / "archive" / "other")]
    table.write_text(yaml.safe_dump({"routes": [{"match": "line=*", "gallery": "g/{camera}"}]}))
    with pytest.raises(RoutingError, match="needs camera"):
        plan_routes(str(tmp_path / "archive"), str(table))
    table.write_text("routes: nothing")
    with pytest.raises(RoutingError, match="a list of"):
        plan_routes(str(tmp_path / "archive"), str(table))


@pytest.fixture(scope="module")
def plant(tmp_path_factory):
    """Three lines, each fitted into its own gallery by one routed fit; their first night's images, plus a line with
    no gallery and a stray folder."""
    root = tmp_path_factory.mktemp("plant")
    normals, archive = write_plant_archive(str(root), PlantSpec(nights=(DAY,), good_per_night=4, defective_per_night=2))
    touch(Path(archive) / "line=L9" / "camera=top" / f"date={DAY}" / "new_line.png",
          (Path(archive) / "line=L1" / "camera=top" / f"date={DAY}" / "good_000.png").read_bytes())
    touch(Path(archive) / "misc" / "stray.png", b"not routed")
    config = plumbing_config(**TINY)
    galleries = root / "galleries"
    manifests = run_fit(config, normals, str(galleries / "{line}-{camera}"), BEAM_ARGS)
    return {"config": config, "normals": normals, "archive": archive, "galleries": galleries, "manifests": manifests,
            "root": root}


def rows_by_uri(out) -> dict[str, dict]:
    return {row["uri"]: {k: row[k] for k in COMPARED} for row in read_score_table(str(out)).to_pylist()}


def test_one_routed_run_equals_a_run_per_gallery(plant, tmp_path):
    config, archive, galleries = plant["config"], plant["archive"], plant["galleries"]
    assert sorted(plant["manifests"]) == ["line=L1/camera=top", "line=L2/camera=top", "line=L3/camera=top"]
    alone = run_fit(config, f"{plant['normals']}/line=L2/camera=top", str(tmp_path / "L2-alone"), BEAM_ARGS)
    assert alone["gallery_hash"] == plant["manifests"]["line=L2/camera=top"]["gallery_hash"]
    assert len({m["gallery_hash"] for m in plant["manifests"].values()}) == 3, "each line its own gallery"

    out = tmp_path / "routed"
    summary = run_score(config, str(galleries / "{line}-{camera}"), archive, str(out), BEAM_ARGS,
                        nightly=Nightly(day=DAY))
    assert sorted(summary["galleries"]) == sorted(plant["manifests"])
    assert summary["ok"] == 18 and summary["unrouted"] == 2 and summary["rows"] == 20
    for line in ("L1", "L2", "L3"):
        route = f"line={line}/camera=top"
        single = tmp_path / f"single-{line}"
        run_score(config, str(galleries / f"{line}-top"), f"{archive}/{route}", str(single), BEAM_ARGS,
                  nightly=Nightly(day=DAY))
        routed, separate = rows_by_uri(out / route), rows_by_uri(single)
        assert sorted(routed) == sorted(separate) and len(routed) == 6
        for uri, row in separate.items():
            assert routed[uri]["image_score"] == pytest.approx(row["image_score"], rel=1e-6)
            assert {**routed[uri], "image_score": 0} == {**row, "image_score": 0}
    unrouted = read_score_table(str(out / "unrouted")).to_pylist()
    assert sorted(Path(r["uri"]).name for r in unrouted) == ["new_line.png", "stray.png"]
    assert all(r["status"] == "error" for r in unrouted)
    reasons = {Path(r["uri"]).name: r["error"] for r in unrouted}
    assert "route line=L9/camera=top" in reasons["new_line.png"] and "L9-top" in reasons["new_line.png"]
    assert "no routing rule" in reasons["stray.png"]
    again = run_score(config, str(galleries / "{line}-{camera}"), archive, str(out), BEAM_ARGS,
                      nightly=Nightly(day=DAY))
    assert (again["new"], again["skipped"], again["unrouted"]) == (0, 18, 2), "a re-run of the night is a no-op"
    assert len(pq.ParquetDataset(str(out / "unrouted")).files) == 1, "unrouted rows replaced, not doubled"


def ledger_parts(out) -> list[Path]:
    return sorted(Path(out).glob("line=*/camera=*/gallery=*/date=*/_ledger-*/unit-*.parquet"))


def test_kill_and_rerun_resumes_each_gallery(plant, tmp_path):
    out, tmpdir = tmp_path / "routed", tmp_path / "tmp"
    tmpdir.mkdir()
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(plant["config"].to_dict()))
    args = ["score", "--config", str(config_file), "--gallery", str(plant["galleries"] / "{line}-{camera}"),
            "--images", plant["archive"], "--out", str(out), "--date", DAY]
    first = spade_process(args, tmpdir)
    deadline = time.monotonic() + 300
    while len(ledger_parts(out)) < 3:
        assert first.poll() is None, f"the run ended before 3 units were committed: {first.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)
    first.wait()
    committed = {part.parents[3].relative_to(out).as_posix() for part in ledger_parts(out)}
    summary = run_score(plant["config"], str(plant["galleries"] / "{line}-{camera}"), plant["archive"], str(out),
                        BEAM_ARGS, nightly=Nightly(day=DAY))
    resumed = {route for route, s in summary["galleries"].items() if s["resumed"]}
    assert resumed == committed, "each gallery resumes what its own ledger committed"
    assert summary["ok"] == 18 and summary["new"] + summary["resumed"] == 18
    for route in summary["galleries"]:
        uris = [r["uri"] for r in read_score_table(str(out / route)).to_pylist()]
        assert len(uris) == len(set(uris)) == 6, route
    assert not list(out.rglob("_staging-*")) and not list(out.rglob("_ledger-*")) and not list(out.rglob("_lease-*"))


def test_open_galleries_are_bounded_least_recently_used_first():
    from transforms.cache import LruCache

    cache = LruCache()
    get = lambda key, size=10, items=2, limit=100: cache.get(key, lambda: f"loaded {key}", lambda _: size, items, limit)  # noqa: E731
    assert get("a") == "loaded a" and get("b") == "loaded b" and cache.loads == 2
    assert get("a") == "loaded a" and cache.loads == 2, "a held gallery is not loaded again"
    get("c")  # a third: the least recently used (b) goes
    assert cache.loads == 3 and get("a") and cache.loads == 3
    get("b")
    assert cache.loads == 4, "b had been dropped"
    get("big", size=95, items=8)  # over the byte cap with the others: they go, the one just used stays
    get("big", size=95, items=8)
    assert cache.loads == 5
    get("a", items=8)
    assert cache.loads == 6, "a was dropped to make room for big"
