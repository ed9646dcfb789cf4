"""Nightly rescoring and gallery appends: incremental, idempotent, and safe against runs killed midway."""
import shutil
from pathlib import Path

import pytest

from spade.io.results import read_score_table
from spade.io.sources import image_date, modified_since
from pipelines.fit import run_fit
from pipelines.score import Nightly, run_score
from tests.conftest import BEAM_ARGS, plumbing_config


@pytest.fixture(scope="module")
def nightly_setup(sample_root, tmp_path_factory):
    config = plumbing_config(calibration_images=2)
    gallery = str(tmp_path_factory.mktemp("nightly-gallery"))
    run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    archive = tmp_path_factory.mktemp("archive")
    tests = sorted(Path(sample_root, "test").rglob("*.png"))
    for day, files in (("2026-11-27", tests[:4]), ("2026-11-28", tests[4:7])):
        for src in files:
            dest = archive / day / f"{src.parent.name}_{src.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest)
    return config, gallery, archive


def uris(out):
    return sorted(read_score_table(str(out)).column("uri").to_pylist())


def test_nightly_scores_only_new_images(nightly_setup, tmp_path):
    config, gallery, shared_archive = nightly_setup
    archive = tmp_path / "archive"
    shutil.copytree(shared_archive, archive)
    out = tmp_path / "nightly"
    night1 = run_score(config, gallery, str(archive), str(out), BEAM_ARGS,
                       nightly=Nightly(day="2026-11-27", since="2026-11-27"))
    assert night1["ok"] == 7 and night1["skipped"] == 0
    # night 2: three new images arrive
    for src in sorted(archive.glob("2026-11-27/*.png"))[:3]:
        (archive / "2026-11-29").mkdir(exist_ok=True)
        shutil.copy(src, archive / "2026-11-29" / f"new_{src.name}")
    night2 = run_score(config, gallery, str(archive), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-29"))
    assert (night2["new"], night2["ok"], night2["skipped"]) == (3, 3, 7)
    again = run_score(config, gallery, str(archive), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-29"))
    assert (again["new"], again["ok"], again["skipped"]) == (0, 0, 10)
    all_uris = uris(out)
    assert len(all_uris) == len(set(all_uris)) == 10
    partitions = sorted(p.name for p in next(out.glob("gallery=*")).iterdir())
    assert partitions == ["date=2026-11-27", "date=2026-11-29"]


def test_since_uses_dates_in_paths(nightly_setup):
    _, _, archive = nightly_setup
    files = sorted(str(p) for p in archive.rglob("*.png"))
    assert image_date(files[0]).isoformat() == "2026-11-27"
    assert all("2026-11-28" in f or "2026-11-29" in f for f in modified_since(files, "2026-11-28"))
    assert len(modified_since(files, "2026-11-28")) == len([f for f in files if "2026-11-27" not in f])


def test_killed_run_leaves_no_partial_rows(nightly_setup, tmp_path, monkeypatch):
    config, gallery, archive = nightly_setup
    out = tmp_path / "nightly"
    import transforms.parquet as sink

    original = sink._WriteShard.process

    def crash(self, keyed):
        raise RuntimeError("simulated worker crash while writing the score table")

    monkeypatch.setattr(sink._WriteShard, "process", crash)
    with pytest.raises(Exception, match="simulated worker crash"):
        run_score(config, gallery, str(archive), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-28"))
    with pytest.raises(FileNotFoundError):
        read_score_table(str(out))
    monkeypatch.setattr(sink._WriteShard, "process", original)
    done = run_score(config, gallery, str(archive), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-28"))
    assert done["ok"] == 7
    assert len(uris(out)) == len(set(uris(out))) == 7
    assert not list(out.rglob("_staging-*"))


def test_new_gallery_needs_rescore_all(nightly_setup, sample_root, tmp_path):
    config, gallery, archive = nightly_setup
    out = tmp_path / "nightly"
    run_score(config, gallery, str(archive / "2026-11-28"), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-28"))
    other = str(tmp_path / "other-gallery")
    run_fit(config, f"{sample_root}/train/good/00[0-4].png", other, BEAM_ARGS)
    with pytest.raises(ValueError, match="--rescore-all"):
        run_score(config, other, str(archive), str(out), BEAM_ARGS, nightly=Nightly(day="2026-11-29"))
    redone = run_score(config, other, str(archive), str(out), BEAM_ARGS,
                       nightly=Nightly(day="2026-11-29", rescore_all=True))
    assert redone["ok"] == 7
    assert len(list(out.glob("gallery=*"))) == 2


def test_fit_append_extracts_only_new_images(sample_root, tmp_path):
    config = plumbing_config(calibration_images=2)
    gallery = str(tmp_path / "gallery")
    first = run_fit(config, f"{sample_root}/train/good/00[0-4].png", gallery, BEAM_ARGS)
    assert first["num_images"] == 5
    shards_before = sorted(p.name for p in (tmp_path / "gallery" / "embeddings").glob("*.parquet"))
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "gallery" / "embeddings").glob("*.parquet")}
    second = run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS, append=True)
    assert second["num_images"] == 8 and second["gallery_hash"] != first["gallery_hash"]
    shards_after = sorted(p.name for p in (tmp_path / "gallery" / "embeddings").glob("*.parquet"))
    assert set(shards_before) < set(shards_after)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    again = run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS, append=True)
    assert again["num_images"] == 8 and again["gallery_hash"] == second["gallery_hash"]
