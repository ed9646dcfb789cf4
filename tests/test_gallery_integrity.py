"""Gallery publication: the manifest comes last, with thresholds and every file's size and sha256; a killed fit
leaves no usable-looking gallery; damaged files are named at open (sizes, shapes) and by `spade verify-gallery`."""
import json
import logging
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest

from pipelines.cli import main
from pipelines.score import run_score
from spade.index.gallery import Gallery, GalleryDamaged, GalleryMissing
from spade.io import storage
from tests.conftest import BEAM_ARGS, TINY, plumbing_config, spade_process


@pytest.fixture()
def gallery_copy(tiny_night, tmp_path) -> Path:
    """A private copy of the fitted gallery, to damage."""
    copy = tmp_path / "gallery"
    shutil.copytree(tiny_night["gallery"], copy)
    return copy


def manifest_of(gallery: Path) -> dict:
    return json.loads((gallery / "manifest.json").read_text())


def first_shard(gallery: Path, layer: str) -> Path:
    """One of the pyramid shards fit's workers wrote for ``layer`` (pyramid/<layer>/<shard>.npy)."""
    return sorted((gallery / "pyramid" / layer).glob("*.npy"))[0]


def test_manifest_records_thresholds_and_every_file(tiny_night, capsys):
    gallery = Path(tiny_night["gallery"])
    manifest = manifest_of(gallery)
    assert {"image", "pixel"} <= set(manifest["thresholds"])
    assert set(manifest["files"]) == {"images.parquet", "index.faiss"} | {
        f"pyramid/{layer}/{key}.npy" for layer in ("layer1", "layer2", "layer3") for key in manifest["pyramid_shards"]}
    for name, record in manifest["files"].items():
        assert record == storage.file_digest(str(gallery / name))
    assert main(["verify-gallery", "--gallery", str(gallery)]) == 0
    assert "every file matches" in capsys.readouterr().out


def test_fit_killed_during_calibration_leaves_no_manifest(tiny_night, tmp_path):
    """SIGKILL as soon as calibration starts: every gallery file may be there, but no manifest, so nothing can
    score against a gallery without thresholds."""
    gallery = tmp_path / "gallery"
    fit = spade_process(["fit", "--config", tiny_night["config"], "--images", f"{tiny_night['data']}/train/good",
                         "--gallery", str(gallery)], tmp_path, quiet=False)
    seen = []
    for line in fit.stderr:
        seen.append(line)
        if line.startswith("fit: calibrating"):
            fit.send_signal(signal.SIGKILL)
            break
    fit.wait()
    assert fit.returncode == -signal.SIGKILL, "".join(seen)
    assert first_shard(gallery, "layer1").is_file() and not (gallery / "manifest.json").exists()
    with pytest.raises(GalleryMissing, match="not a finished gallery.*re-run it"):
        Gallery.open(str(gallery))
    rerun = spade_process(["fit", "--config", tiny_night["config"], "--images", f"{tiny_night['data']}/train/good",
                           "--gallery", str(gallery)], tmp_path)
    assert rerun.wait(timeout=600) == 0, rerun.stderr.read()
    assert manifest_of(gallery)["thresholds"] and not list(gallery.glob("_staging-*"))
    assert not list(gallery.glob("_lease-*"))


def test_truncated_pyramid_is_named_at_open(gallery_copy, tiny_night, tmp_path, capsys):
    layer = first_shard(gallery_copy, "layer1")
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    with pytest.raises(GalleryDamaged, match=r"pyramid/layer1/[0-9a-f]+\.npy has \d+ bytes, the manifest records \d+ "
                                             r"\(truncated or replaced\).*re-run `spade fit --gallery"):
        Gallery.open(str(gallery_copy))
    code = main(["--quiet", "score", "--config", tiny_night["config"], "--gallery", str(gallery_copy), "--images",
                 tiny_night["images"], "--out", str(tmp_path / "out"), "--runner=FnApiRunner"])
    assert code == 3 and f"pyramid/layer1/{layer.name}" in capsys.readouterr().err
    assert not (tmp_path / "out" / "scores").exists()
    assert main(["verify-gallery", "--gallery", str(gallery_copy)]) == 3
    err = capsys.readouterr().err
    assert f"pyramid/layer1/{layer.name}:" in err and "re-run `spade fit --gallery" in err


@pytest.mark.parametrize("recorded", [True, False], ids=["sizes-recorded", "older-manifest-without-sizes"])
def test_pyramid_with_missing_rows_is_named_at_open(gallery_copy, recorded):
    """A .npy that is a valid array with a row too few: caught by its size, or (a manifest without sizes) by its
    shape, naming the file, instead of every image becoming an error row."""
    layer = first_shard(gallery_copy, "layer2")
    np.save(layer, np.load(layer)[:-1])
    manifest = manifest_of(gallery_copy)
    if not recorded:
        del manifest["files"]
        (gallery_copy / "manifest.json").write_text(json.dumps(manifest))
    expected = (rf"pyramid/layer2/{layer.name} has .* bytes" if recorded
                else r"pyramid/layer2/ cannot be read \(gallery rows point past the end of their pyramid shards")
    with pytest.raises(GalleryDamaged, match=expected):
        Gallery.open(str(gallery_copy))


def test_verify_gallery_finds_a_changed_byte_that_open_cannot(gallery_copy, capsys):
    index = gallery_copy / "index.faiss"
    data = bytearray(index.read_bytes())
    data[-5] ^= 0xFF
    index.write_bytes(bytes(data))
    Gallery.open(str(gallery_copy))  # same size: the cheap check passes
    assert main(["verify-gallery", "--gallery", str(gallery_copy)]) == 3
    err = capsys.readouterr().err
    assert "index.faiss:" in err and "sha256" in err and "pyramid" not in err


def test_scoring_without_thresholds_says_so_once(gallery_copy, tiny_night, tmp_path, caplog):
    manifest = manifest_of(gallery_copy)
    manifest["thresholds"] = {}
    (gallery_copy / "manifest.json").write_text(json.dumps(manifest))
    config = plumbing_config(**TINY)
    with caplog.at_level(logging.WARNING):
        summary = run_score(config, str(gallery_copy), f"{tiny_night['data']}/test/good", str(tmp_path / "out"), BEAM_ARGS)
    warnings = [r.getMessage() for r in caplog.records if "no image or pixel threshold" in r.getMessage()]
    assert len(warnings) == 1 and "Re-run `spade fit`" in warnings[0] and "--thresholds" in warnings[0]
    assert summary["ok"] == 10 and not (tmp_path / "out" / "masks").exists()
