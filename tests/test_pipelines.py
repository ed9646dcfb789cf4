"""Fit, score and evaluate as Beam pipelines (FnApiRunner), on the embedded synthetic sample."""
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from spade.index.gallery import GalleryMismatch, GalleryMissing
from spade.io.results import read_score_table
from spade.scoring.calibration import CalibrationMismatch
from spade.io.tables import SCORES_SCHEMA
from pipelines.evaluate import run_evaluate
from pipelines.fit import run_fit
from pipelines.options import load_runner_profile, local_workers, scoring_args
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS, plumbing_config


@pytest.fixture(scope="module")
def fitted(sample_root, tmp_path_factory):
    config = plumbing_config()
    gallery = str(tmp_path_factory.mktemp("gallery"))
    manifest = run_fit(config, f"{sample_root}/train/good", gallery, BEAM_ARGS)
    return config, gallery, manifest


def test_fit_writes_a_complete_gallery(fitted):
    config, gallery, manifest = fitted
    root = Path(gallery)
    assert manifest["num_images"] == 8
    for name in ["manifest.json", "images.parquet", "index.faiss"]:
        assert (root / name).is_file(), name
    on_disk = json.loads((root / "manifest.json").read_text())
    assert on_disk["backbone"] == "resnet18" and on_disk["weights"]["source"] == "random"
    assert on_disk["layers"] == ["layer1", "layer2", "layer3"]
    assert on_disk["library_versions"]["torch"] and on_disk["config_hash"] and on_disk["gallery_hash"]
    assert set(on_disk["thresholds"]) >= {"image", "pixel"}
    # the pyramid is in shards written by the workers (one per batch of 4), listed by the manifest
    shards = on_disk["pyramid_shards"]
    assert len(shards) == 2 and on_disk["layer_shapes"]["layer1"] == [56 * 56, 64]
    for layer in on_disk["layers"]:
        assert sorted(p.stem for p in (root / "pyramid" / layer).glob("*.npy")) == sorted(shards)
    assert sum(np.load(root / "pyramid" / "layer1" / f"{key}.npy", mmap_mode="r").shape[0] for key in shards) == 8
    embeddings = pq.read_table(next((root / "embeddings").glob("*.parquet")))
    assert embeddings.num_rows == 8
    assert {"image_id", "uri", "width", "height", "embedding", "pyramid_shard", "pyramid_row", "layer1_shape"} <= set(embeddings.column_names)
    assert "layer1" not in embeddings.column_names  # no pyramid bytes travel through the sink


def test_score_and_evaluate_outputs(fitted, sample_root, tmp_path):
    config, gallery, manifest = fitted
    out = str(tmp_path / "scores")
    summary = run_score(config, gallery, sample_root, out, BEAM_ARGS)
    assert summary == {**summary, "rows": 9, "ok": 9, "errors": 0}
    table = read_score_table(out)
    assert table.schema.equals(SCORES_SCHEMA)
    rows = table.to_pylist()
    assert sorted(r["label"] for r in rows) == ["good"] * 3 + ["scratch"] * 3 + ["spot"] * 3
    for row in rows:
        assert row["status"] == "ok" and row["gallery_hash"] == manifest["gallery_hash"]
        assert len(row["neighbours"]) == config.k
        with Image.open(row["map_uri"]) as img:
            assert img.mode.startswith("I") and img.size == (row["width"], row["height"])
        with Image.open(row["mask_uri"]) as img:
            assert img.size == (row["width"], row["height"])
        assert row["pixel_max"] > 0 and row["image_score"] > 0
    result = run_evaluate(out, f"{sample_root}/ground_truth", str(tmp_path / "eval"))
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["overall"]) == {"image_rocauc", "pixel_rocauc", "pro"}
    assert set(metrics["per_defect"]) == {"scratch", "spot"}
    assert metrics["counts"] == {"rows": 9, "scored": 9, "errors": 0, "unlabelled": 0, "good": 3, "defective": 6}
    assert all(0.0 <= v <= 1.0 for v in metrics["overall"].values())
    assert (tmp_path / "eval" / "metrics.csv").read_text().splitlines()[0] == "defect,images,image_rocauc,pixel_rocauc,pro"
    assert result["problems"] == []


def test_rerun_gives_identical_outputs(fitted, sample_root, tmp_path):
    config, gallery, _ = fitted
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    run_score(config, gallery, f"{sample_root}/test/spot", first, BEAM_ARGS)
    run_score(config, gallery, f"{sample_root}/test/spot", second, BEAM_ARGS)
    run_score(config, gallery, f"{sample_root}/test/spot", second, BEAM_ARGS)
    a, b = read_score_table(first).drop(["scored_at"]), read_score_table(second).drop(["scored_at"])
    assert a.drop(["map_uri", "mask_uri"]).equals(b.drop(["map_uri", "mask_uri"]))
    for row in a.to_pylist():
        name = row["map_uri"].rsplit("/", 1)[-1]
        assert (Path(first) / "maps" / name).read_bytes() == (Path(second) / "maps" / name).read_bytes()
    assert len(list((Path(second) / "scores").glob("*.parquet"))) == 1
    assert not list(Path(second).rglob(".tmp-*"))


@pytest.mark.parametrize("runner", ["threads.yaml", "default"])
def test_two_thread_workers_give_the_same_table(fitted, sample_root, tmp_path, runner, monkeypatch):
    """configs/runners/threads.yaml, and the default runner of `spade score` without --runner (two local worker
    threads on 2 cores): every input scored once, bad ones as error rows, the same scores and maps as one worker."""
    config, gallery, _ = fitted
    images = tmp_path / "images"
    shutil.copytree(sample_root + "/test", images)
    (images / "spot" / "truncated.png").write_bytes((images / "spot" / "000.png").read_bytes()[:200])
    if runner == "default":
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
        args = None
        assert local_workers(scoring_args(args)) == 2
    else:
        args = load_runner_profile(str(Path(__file__).resolve().parents[1] / "configs" / "runners" / runner))
        assert local_workers(args) == 2
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_score(config, gallery, str(images), one, BEAM_ARGS)
    summary = run_score(config, gallery, str(images), two, args)
    assert summary == {**summary, "rows": 10, "ok": 9, "errors": 1}
    tables = [read_score_table(out).drop(["scored_at"]).sort_by("uri") for out in (one, two)]
    assert tables[0].num_rows == 10 and len(set(tables[1].column("uri").to_pylist())) == 10
    assert tables[0].drop(["map_uri", "mask_uri"]).equals(tables[1].drop(["map_uri", "mask_uri"]))
    for row in tables[0].to_pylist():
        if row["map_uri"]:
            name = row["map_uri"].rsplit("/", 1)[-1]
            assert (Path(one) / "maps" / name).read_bytes() == (Path(two) / "maps" / name).read_bytes()


def test_bad_inputs_become_error_rows(fitted, sample_root, tmp_path):
    config, gallery, _ = fitted
    folder = tmp_path / "mixed"
    folder.mkdir()
    for src in sorted(Path(sample_root, "test", "good").glob("*.png"))[:2]:
        shutil.copy(src, folder / src.name)
    good_png = (folder / "000.png").read_bytes()
    (folder / "corrupt.png").write_bytes(good_png[: len(good_png) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("operator notes, not an image\n")
    buffer = io.BytesIO()
    Image.new("RGBA", (50, 70), (10, 200, 30, 128)).save(buffer, format="PNG")
    (folder / "rgba_small.png").write_bytes(buffer.getvalue())
    out = str(tmp_path / "out")
    summary = run_score(config, gallery, str(folder), out, BEAM_ARGS)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in read_score_table(out).to_pylist()}
    assert set(rows) == {"000.png", "001.png", "corrupt.png", "empty.png", "notes.txt", "rgba_small.png"}
    assert summary["ok"] == 3 and summary["errors"] == 3
    assert "truncated" in rows["corrupt.png"]["error"] and "corrupt.png" in rows["corrupt.png"]["error"]
    assert "empty" in rows["empty.png"]["error"]
    assert "not a readable image" in rows["notes.txt"]["error"]
    for name in ["corrupt.png", "empty.png", "notes.txt"]:
        assert rows[name]["status"] == "error" and rows[name]["image_score"] is None and rows[name]["gallery_hash"]
    assert rows["rgba_small.png"]["status"] == "ok" and (rows["rgba_small.png"]["width"], rows["rgba_small.png"]["height"]) == (50, 70)


def test_a_map_that_cannot_be_written_is_its_images_error_row(fitted, sample_root, tmp_path, monkeypatch):
    """A batch's maps are written in lanes: one failing write is that image's error row, the rest of the batch is
    scored, and the counters count each image once."""
    import threading

    import transforms.score as score_transform

    config, gallery, _ = fitted
    encode, lock, failed = score_transform.encode_score_map, threading.Lock(), []

    def encode_once_failing(score_map):
        with lock:
            first = not failed
            failed.append(first)
        if first:
            raise OSError("disk full")
        return encode(score_map)

    monkeypatch.setattr(score_transform, "encode_score_map", encode_once_failing)
    out = str(tmp_path / "out")
    summary = run_score(config, gallery, f"{sample_root}/test", out, BEAM_ARGS)
    rows = read_score_table(out).to_pylist()
    assert summary["rows"] == len(rows) == len(failed) == 9 and summary["ok"] == 8 and summary["errors"] == 1
    bad = [row for row in rows if row["status"] == "error"]
    assert "writing score map failed: disk full" in bad[0]["error"] and bad[0]["uri"] in bad[0]["error"]
    assert summary["metrics"]["images_scored"] == 8 and summary["metrics"]["images_failed"] == 1
    assert len(list(Path(out, "maps").glob("*.png"))) == 8


def test_mismatched_gallery_and_missing_gallery(fitted, sample_root, tmp_path):
    config, gallery, _ = fitted
    with pytest.raises(GalleryMismatch, match="backbone: gallery has 'resnet18', config has 'resnet34'"):
        run_score(config.replace(backbone="resnet34"), gallery, sample_root, str(tmp_path / "x"), BEAM_ARGS)
    with pytest.raises(GalleryMismatch, match="crop"):
        run_score(config.replace(crop=192), gallery, sample_root, str(tmp_path / "x"), BEAM_ARGS)
    with pytest.raises(GalleryMissing, match="spade fit"):
        run_score(config, str(tmp_path / "nowhere"), sample_root, str(tmp_path / "x"), BEAM_ARGS)


def test_maps_made_otherwise_than_calibrated_are_refused_unless_thresholds_are_given(fitted, sample_root, tmp_path):
    """A gallery's thresholds were measured on maps of its k, kappa and sigma: a config that makes other maps (a new
    default sigma, a --k) would flag at unknown rates, so it stops before any work, saying how to go on."""
    config, gallery, manifest = fitted
    sigma = manifest["sigma"]
    assert (manifest["k"], sigma) == (3, config.sigma)
    with pytest.raises(CalibrationMismatch, match=rf"sigma: gallery calibrated with {sigma}, config has {sigma + 1}.*`sigma: {sigma}`"):
        run_score(config.replace(sigma=sigma + 1), gallery, sample_root, str(tmp_path / "a"), BEAM_ARGS)
    with pytest.raises(CalibrationMismatch, match=r"image threshold and pixel threshold were.*k: gallery calibrated with 3, config has 2"):
        run_score(config.replace(k=2), gallery, sample_root, str(tmp_path / "a"), BEAM_ARGS)
    assert not (tmp_path / "a").exists()
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"image": 1.0}))  # the pixel threshold would still be the calibrated one
    with pytest.raises(CalibrationMismatch, match=r"calibrated pixel threshold were"):
        run_score(config.replace(sigma=sigma + 1), gallery, sample_root, str(tmp_path / "a"), BEAM_ARGS,
                  thresholds_url=str(thresholds))
    thresholds.write_text(json.dumps({"image": 1.0, "pixel": 2.0}))
    summary = run_score(config.replace(sigma=sigma + 1), gallery, f"{sample_root}/test/good", str(tmp_path / "b"), BEAM_ARGS,
                        thresholds_url=str(thresholds))
    assert summary["ok"] == 3


def test_fsspec_memory_urls_end_to_end(sample_root):
    """Gallery and outputs on an fsspec filesystem (memory://) rather than local disk."""
    import fsspec

    config = plumbing_config(calibration_images=2)
    run_fit(config, f"{sample_root}/train/good", "memory://spade-test/gallery", BEAM_ARGS)
    summary = run_score(config, "memory://spade-test/gallery", f"{sample_root}/test/scratch", "memory://spade-test/out", BEAM_ARGS)
    assert summary["ok"] == 3
    fs = fsspec.filesystem("memory")
    assert fs.exists("/spade-test/gallery/manifest.json")
    assert len(fs.ls("/spade-test/out/maps")) == 3


def test_fit_stores_the_banks_of_approximate_layers_only(sample_root, tmp_path, caplog):
    """An exact-mode fit with ``approximate_layers`` stores those layers' coreset banks, records which, and a
    scoring worker opens them; the other layers have none."""
    import logging

    from spade.index.gallery import Gallery

    config = plumbing_config(calibration_images=3, approximate_layers=["layer1"], coreset_ratio=0.05)
    gallery_dir = tmp_path / "gallery"
    manifest = run_fit(config, f"{sample_root}/train/good", str(gallery_dir), BEAM_ARGS)
    assert manifest["coreset_layers"] == ["layer1"]
    assert sorted(p.name for p in (gallery_dir / "coreset").iterdir()) == ["layer1-rows.npy", "layer1.npy"]
    gallery = Gallery.open(str(gallery_dir))
    assert set(gallery.banks) == {"layer1"} and len(gallery.banks["layer1"][0]) == round(0.05 * 8 * 56 * 56)
    with caplog.at_level(logging.WARNING, logger="spade.index.coreset"):
        summary = run_score(config, str(gallery_dir), f"{sample_root}/test/scratch", str(tmp_path / "out"), BEAM_ARGS)
    assert summary["ok"] == 3
    assert not [r for r in caplog.records if "stores no coreset bank" in r.getMessage()]  # loaded, not rebuilt


def test_a_gallery_without_the_bank_is_scored_with_it_built_once_and_says_so(sample_root, tmp_path, caplog):
    """A gallery fitted with every layer exact, scored with approximate_layers (the default since they exist): the
    worker builds layer1's bank itself, warns with the gallery and the mend, and every input is scored."""
    import logging

    gallery_dir = str(tmp_path / "gallery")
    run_fit(plumbing_config(calibration_images=3), f"{sample_root}/train/good", gallery_dir, BEAM_ARGS)
    with caplog.at_level(logging.WARNING, logger="spade.index.coreset"):
        # the bank alone: fit calibrated maps without the local search, so a radius would be refused (its own test)
        summary = run_score(plumbing_config(approximate_layers=["layer1"], coreset_ratio=0.05, approximate_local_radius=0),
                            gallery_dir,
                            f"{sample_root}/test/scratch", str(tmp_path / "out"), BEAM_ARGS)
    assert summary["ok"] == 3
    told = [r.getMessage() for r in caplog.records if "stores no coreset bank of layer1" in r.getMessage()]
    assert told and gallery_dir in told[0] and "Fit the gallery again" in told[0]


def test_approximate_mode_fit_stores_coreset_banks(sample_root, tmp_path, monkeypatch):
    """An approximate-mode fit builds each layer's coreset bank once and stores it (here on memory://); scoring
    workers load it; calibration scores gallery images without their own patches."""
    import fsspec

    from spade.index.coreset import bank_settings, layer_bank, memory_bank_for
    from spade.index.gallery import Gallery

    config = plumbing_config(calibration_images=3, scoring_mode="approximate", coreset_ratio=0.05)
    url = "memory://spade-test/approx-gallery"
    manifest = run_fit(config, f"{sample_root}/train/good", url, BEAM_ARGS)
    assert manifest["coreset"] == bank_settings(0.05, config.coreset_projection, config.coreset_max_candidates,
                                                max_vectors=config.coreset_max_vectors)
    assert fsspec.filesystem("memory").exists("/spade-test/approx-gallery/coreset/layer1-rows.npy")
    assert set(manifest["thresholds"]) >= {"image", "pixel"}
    gallery = Gallery.open(url, cache_dir=str(tmp_path / "cache"))
    stored, rows = gallery.banks["layer1"]
    assert len(stored) == round(0.05 * 8 * 56 * 56) and set(np.unique(rows)) <= set(range(8))
    fresh = layer_bank(gallery.pyramid["layer1"], 0.05, config.coreset_projection, 0, config.coreset_max_candidates,
                       max_vectors=config.coreset_max_vectors)
    np.testing.assert_array_equal(fresh.vectors, stored)
    np.testing.assert_array_equal(fresh.rows, rows)
    def no_build(*args, **kwargs):
        raise AssertionError("the stored bank should have been loaded, not rebuilt")

    monkeypatch.setattr("spade.index.coreset.layer_bank", no_build)
    loaded = memory_bank_for(gallery, "layer1", 0.05, config.coreset_projection, max_candidates=config.coreset_max_candidates,
                             max_vectors=config.coreset_max_vectors)
    np.testing.assert_array_equal(loaded.vectors, stored)
    monkeypatch.undo()
    assert len(memory_bank_for(gallery, "layer1", 0.1, config.coreset_projection).vectors) == round(0.1 * 8 * 56 * 56)
    summary = run_score(config, url, f"{sample_root}/test/scratch", str(tmp_path / "out"), BEAM_ARGS)
    assert summary["ok"] == 3
