"""`brightness: auto` (the default): fixed at fit from a sample of the gallery's frames, recorded in the gallery, and
taken from it at scoring."""
import io

import numpy as np
import pytest
from PIL import Image

from spade.config import SpadeConfig
from spade.index.gallery import GalleryMismatch, check_compatible, read_manifest, with_gallery_settings
from spade.io.images import BRIGHT_GALLERY, brightness_for, frame_brightness
from spade.io.listing import sample_image_brightness
from spade.io.results import read_score_table
from pipelines.fit import run_fit
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS, TINY, plumbing_config, shared_dataset


def _write(folder, level: int, count: int = 4, size: int = 80) -> None:
    """``count`` textured frames around intensity ``level`` (0-255) under ``folder``/train/good and test/good."""
    rng = np.random.default_rng(level)
    for split in ("train", "test"):
        (folder / split / "good").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image = np.clip(rng.normal(level, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            (folder / split / "good" / f"{i}.png").write_bytes(buffer.getvalue())


def test_the_rule_moves_only_galleries_far_brighter_than_photos():
    assert brightness_for([0.74, 0.80, 0.55]) == "imagenet_mean"  # the median decides, not the brightest frame
    assert brightness_for([0.55, 0.61, 0.50]) == "keep"
    assert brightness_for([0.08, 0.07]) == "keep"  # dark frames are never brightened
    assert brightness_for([BRIGHT_GALLERY]) == "keep"
    assert brightness_for([]) == "keep"
    assert frame_brightness(np.full((4, 4, 3), 255, dtype=np.uint8)) == 1.0
    assert SpadeConfig().brightness == "auto"  # the built-in default, as configs/default.yaml
    with pytest.raises(ValueError, match="brightness must be one of auto, keep, imagenet_mean"):
        SpadeConfig(brightness="bright")


def test_fit_records_the_brightness_it_chose_and_scoring_takes_it(tmp_path):
    bright, dim = tmp_path / "bright", tmp_path / "dim"
    _write(bright, 200)
    _write(dim, 110)
    config = plumbing_config(**TINY, k=2, brightness="auto")
    said: list[str] = []
    run_fit(config, str(bright), str(tmp_path / "g-bright"), BEAM_ARGS, said.append)
    run_fit(config, str(dim), str(tmp_path / "g-dim"), BEAM_ARGS, said.append)
    assert any("brightness imagenet_mean (frames' median intensity 0.78 of 4 images" in line for line in said), said
    assert any("brightness keep (frames' median intensity 0.43 of 4 images" in line for line in said), said
    moved, kept = read_manifest(str(tmp_path / "g-bright")), read_manifest(str(tmp_path / "g-dim"))
    assert moved["feature_signature"]["brightness"] == "imagenet_mean"
    assert "brightness" not in kept["feature_signature"]  # as every gallery fitted before the setting
    explicit = run_fit(config.replace(brightness="keep"), str(dim), str(tmp_path / "g-keep"), BEAM_ARGS, said.append)
    assert explicit["feature_signature"] == kept["feature_signature"]  # auto resolved to keep: the same features
    assert with_gallery_settings(config, moved).brightness == "imagenet_mean"
    assert with_gallery_settings(config, kept).brightness == "keep"
    check_compatible(moved, "g-bright", config)
    with pytest.raises(GalleryMismatch, match="brightness: gallery has 'imagenet_mean', config has 'keep'"):
        check_compatible(moved, "g-bright", config.replace(brightness="keep"))
    for path in sorted((bright / "test" / "good").glob("*.png")):  # the same captures, 40 levels darker
        darker = np.asarray(Image.open(path)).astype(np.int16) - 40
        assert darker.min() >= 0
        Image.fromarray(darker.astype(np.uint8)).save(path.with_name(f"dark-{path.name}"))
    summary = run_score(config, str(tmp_path / "g-bright"), str(bright / "test"), str(tmp_path / "scores"), BEAM_ARGS,
                        said.append)
    assert summary["ok"] == 8 and summary["errors"] == 0
    rows = read_score_table(str(tmp_path / "scores")).to_pylist()
    scores = {row["uri"].rsplit("/", 1)[-1]: row["image_score"] for row in rows}
    for name in ("0.png", "1.png", "2.png", "3.png"):  # scoring moved every frame as fit did: exposure is gone
        assert scores[f"dark-{name}"] == pytest.approx(scores[name], rel=1e-4, abs=1e-4)


def test_append_keeps_the_gallery_brightness(tmp_path):
    """Frames added to a gallery are prepared as its first were, whatever the new ones' brightness."""
    bright, dim = tmp_path / "bright", tmp_path / "dim"
    _write(bright, 200)
    _write(dim, 110)
    config = plumbing_config(**TINY, k=2, brightness="auto")
    gallery = str(tmp_path / "gallery")
    run_fit(config, str(bright), gallery, BEAM_ARGS, lambda line: None)
    run_fit(config, str(dim), gallery, BEAM_ARGS, lambda line: None, append=True)
    manifest = read_manifest(gallery)
    assert manifest["feature_signature"]["brightness"] == "imagenet_mean"
    assert manifest["num_images"] == 8


@pytest.mark.parametrize("name, chosen", [("mvtec_ad_bottle", "keep"), ("mpdd_metal_plate", "keep"),
                                          ("mvtec3d_tire", "keep"), ("kolektorsdd_commutator", "imagenet_mean")])
def test_the_shared_sets_get_the_brightness_their_measurements_favour(name, chosen):
    """The rule on the four shared sets' training frames: only the commutators (median 0.74), whose PRO rises with
    the move, are moved; bottle and metal_plate (0.55), which lose by it, and the dark tire are kept."""
    levels = sample_image_brightness(str(shared_dataset(name)), "train")
    assert len(levels) == 16
    assert brightness_for(levels) == chosen


def test_a_routed_fit_fixes_each_gallerys_brightness_from_its_own_frames(tmp_path):
    """A plant whose lines make products of different brightness: one fit routed to a gallery per line moves the
    bright line's frames and keeps the dim line's, and the routed score prepares each line's images as its gallery."""
    archive = tmp_path / "archive"
    _write(archive / "line=L1", 200)
    _write(archive / "line=L2", 110)
    config = plumbing_config(**TINY, k=2, brightness="auto")
    said: list[str] = []
    run_fit(config, str(archive), str(tmp_path / "g" / "{line}"), BEAM_ARGS, said.append)
    assert read_manifest(str(tmp_path / "g" / "L1"))["feature_signature"]["brightness"] == "imagenet_mean"
    assert "brightness" not in read_manifest(str(tmp_path / "g" / "L2"))["feature_signature"]
    summary = run_score(config, str(tmp_path / "g" / "{line}"), str(archive), str(tmp_path / "scores"), BEAM_ARGS,
                        said.append)
    assert summary["ok"] == 8 and summary["errors"] == 0


def test_an_archive_of_unreadable_files_costs_the_sample_a_bounded_number_of_reads(tmp_path):
    """Inputs the sample cannot read are passed over, but only so many: the launcher's cost stays bounded whatever the
    archive holds, and a fit whose first inputs are all unreadable says which setting avoids the sample."""
    from spade.io.listing import BRIGHTNESS_SAMPLE, SAMPLE_READS, fix_brightness

    folder = tmp_path / "archive" / "train" / "good"
    folder.mkdir(parents=True)
    for i in range(SAMPLE_READS * BRIGHTNESS_SAMPLE):
        (folder / f"a{i:03d}.png").write_bytes(b"not an image")
    _write(tmp_path / "later", 200)
    for path in (tmp_path / "later" / "train" / "good").glob("*.png"):  # readable, but listed after the unreadable
        path.rename(folder / f"z-{path.name}")
    assert sample_image_brightness(str(tmp_path / "archive"), "train") == []
    with pytest.raises(FileNotFoundError, match="no readable image among the first 64 inputs .* set `brightness: keep`"):
        fix_brightness(plumbing_config(brightness="auto"), str(tmp_path / "archive"))
    (folder / "a000.png").unlink()  # one unreadable input fewer: the first readable one is now within reach
    assert len(sample_image_brightness(str(tmp_path / "archive"), "train")) == 1
