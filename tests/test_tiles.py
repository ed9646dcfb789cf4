"""Aspect-kept and tiled framings: frame sizes, tiles that cover the frame, stitched maps without seams, tile
correspondence equal to a direct search, and a thin defect near the end of a long strip that only tiles find."""
from pathlib import Path

import numpy as np
import pytest
import torch

from spade.config import SpadeConfig, load_config
from spade.features.backbone import FeatureExtractor
from spade.features.framing import FrameSizeUnset, TiledFraming, frame_size_for, framing_for, tile_starts
from spade.index.gallery import Gallery, check_compatible, with_gallery_settings, GalleryMismatch
from spade.index.knn import build_index
from spade.index.pyramid import TileRows
from spade.io.images import preprocess
from spade.io.samples import normal_surface
from spade.scoring.batch import layer_queries, score_batch, tile_neighbours
from spade.scoring.correspondence import batch_layer_distances

ROOT = Path(__file__).resolve().parents[1]


def test_frame_size_keeps_the_median_aspect_at_the_pixel_scale():
    assert frame_size_for([(256, 256)], 256) == (256, 256)
    assert frame_size_for([(256, 341), (256, 340), (900, 100)], 256) == (352, 256)  # portrait tire, median 3:4
    assert frame_size_for([(256, 632), (256, 658), (256, 640)], 256) == (640, 256)  # commutators of several heights
    assert frame_size_for([(4096, 256)], 256) == (256, 4096)


@pytest.mark.parametrize("length,tile,overlap", [(256, 256, 64), (352, 256, 64), (640, 256, 64), (4096, 256, 64),
                                                 (1000, 256, 32)])
def test_tiles_cover_the_frame_with_the_overlap_asked_for(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # consecutive tiles share >= overlap
    assert len(starts) == max(1, -(-(length - overlap) // (tile - overlap)))  # as few as that allows: linear in length


def test_tiled_frame_round_trip_cut_stack_blend():
    framing = TiledFraming((256, 640), 128, 32)
    n = len(framing.tiles)
    assert n == 3 * 7  # ceil((256 - 32) / 96) rows, ceil((640 - 32) / 96) columns
    frames = torch.arange(2 * 3 * 256 * 640, dtype=torch.float32).reshape(2, 3, 256, 640)
    tiles = framing.cut(frames)
    assert tiles.shape == (2 * n, 3, 128, 128)
    tile = framing.tiles[7]
    assert torch.equal(tiles[n + 7], frames[1, :, tile.top:tile.top + 128, tile.left:tile.left + 128])
    stacked = framing.stack(tiles)
    assert stacked.shape == (2, 3, n * 128, 128)
    assert torch.equal(stacked[1, :, 7 * 128:8 * 128], tiles[n + 7])
    assert framing.layer_grid(n * 32 * 32) == (n * 32, 32)
    # a smooth field cut into tiles and blended back is the field itself: overlaps add no seams
    yy, xx = np.mgrid[0:256, 0:640].astype(np.float32)
    field = np.sin(xx / 50.0) + yy / 100.0
    parts = [field[t.top:t.top + 128, t.left:t.left + 128] for t in framing.tiles]
    assert np.abs(framing.blend(parts) - field).max() < 1e-5
    # tiles that disagree meet without a step: the stitched map moves gradually across each overlap
    constant = [np.full((128, 128), float(i % 2), np.float32) for i in range(len(framing.tiles))]
    row = framing.blend(constant)[64]
    assert np.abs(np.diff(row)).max() < 0.05


def test_aspect_framing_needs_a_frame_size_and_takes_the_gallery_one():
    config = SpadeConfig(framing="tiles")
    with pytest.raises(FrameSizeUnset, match="frame_size"):
        framing_for(config)
    manifest = {"feature_signature": config.replace(frame_size=(256, 640)).feature_signature() | {"weights_sha256": "x"}}
    assert with_gallery_settings(config, manifest).frame_size == (256, 640)
    check_compatible(manifest, "g", config)  # no frame size in the config: the gallery's is used
    with pytest.raises(GalleryMismatch, match="frame_size"):
        check_compatible(manifest, "g", config.replace(frame_size=(256, 512)))
    assert "frame_size" not in SpadeConfig(framing="full").feature_signature()


def test_tile_rows_and_same_place_correspondence_equal_a_direct_search():
    rng = np.random.default_rng(0)
    frames, tiles, per, channels = 5, 3, 12, 4
    pyramid = rng.normal(size=(frames, tiles * per, channels)).astype(np.float32)
    view = TileRows(pyramid, tiles)
    assert view.shape == (frames * tiles, per, channels)
    assert np.array_equal(view[np.array([4, 13])], np.stack([pyramid[1, 1 * per:2 * per], pyramid[4, 1 * per:2 * per]]))
    queries = rng.normal(size=(2, tiles * per, channels)).astype(np.float32)
    neighbours = np.array([[0, 2], [3, 4]])
    same = tile_neighbours(neighbours, tiles, True)
    assert same.tolist()[:3] == [[0, 6], [1, 7], [2, 8]]
    dist = batch_layer_distances(queries.reshape(2 * tiles, per, channels), view, same).reshape(2, tiles * per)
    for b in range(2):
        for t in range(tiles):
            bank = np.concatenate([pyramid[r, t * per:(t + 1) * per] for r in neighbours[b]])
            q = queries[b, t * per:(t + 1) * per]
            expected = np.sqrt(((q[:, None] - bank[None]) ** 2).sum(-1)).min(1)
            np.testing.assert_allclose(dist[b, t * per:(t + 1) * per], expected, rtol=1e-5, atol=1e-5)
    every = tile_neighbours(neighbours, tiles, False)
    assert every.shape == (2 * tiles, 2 * tiles) and sorted(every[4]) == [9, 10, 11, 12, 13, 14]


def _strip_scores(config: SpadeConfig, train: list, tests: list) -> list[np.ndarray]:
    """Maps (original geometry) of ``tests`` against a gallery of ``train``, in memory, with ``config``."""
    framing = framing_for(config)
    extractor = FeatureExtractor(config)

    def features(images):
        return extractor(torch.stack([preprocess(im, config.resize, config.crop, config.mean, config.std, framing)
                                      for im in images]))

    normal = features(train)
    rows = {layer: layer_queries(maps) for layer, maps in normal.pyramid.items()}
    gallery = Gallery("memory://strips", {"feature_signature": config.feature_signature()}, None,
                      build_index(normal.embedding), rows)
    results = score_batch(features(tests), gallery, config)
    return [framing.to_original(r.score_map, (im.shape[1], im.shape[0])) for r, im in zip(results, tests)]


def test_a_thin_defect_near_the_end_of_a_long_strip_is_found_by_tiles_not_by_the_squeezed_frame():
    height, width, cx, cy = 256, 4096, 70, 150
    rng = np.random.default_rng(3)
    train = [normal_surface(rng, height, width) for _ in range(4)]
    good = normal_surface(rng, height, width)
    defective = normal_surface(rng, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    defect = (np.abs(xx - cx) <= 3) & (np.abs(yy - cy) <= 3)  # 6-7 pixels across, 60 px from the strip's end
    defective[defect] = (200, 70, 30)
    base = load_config(str(ROOT / "configs" / "default.yaml"), {"k": 3, "num_threads": 2, "batch_size": 4, "image_score": "map_max"})

    tiles = base.replace(framing="tiles", frame_size=frame_size_for([(width, height)], base.resize))
    good_map, defect_map = _strip_scores(tiles, train, [good, defective])
    assert defect_map.shape == (height, width)
    y, x = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    assert abs(x - cx) < 16 and abs(y - cy) < 16, f"tiles: the map's peak is at ({x}, {y}), not at the defect"
    assert defect_map.max() > 1.2 * good_map.max()

    squeezed = base.replace(framing="full")
    good_sq, defect_sq = _strip_scores(squeezed, train, [good, defective])
    y, x = np.unravel_index(np.argmax(defect_sq), defect_sq.shape)
    found = abs(x - cx) < 16 and abs(y - cy) < 16 and defect_sq.max() > 1.2 * good_sq.max()
    assert not found, "squeezed 16x into a square, the 6-pixel defect should be lost"


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_fit_fixes_the_frame_from_the_images_and_score_frames_every_image_into_it(tmp_path):
    from pipelines.fit import run_fit
    from pipelines.score import run_score
    from spade.io.results import read_score_table
    from tests.conftest import BEAM_ARGS, plumbing_config

    rng = np.random.default_rng(1)
    data = tmp_path / "data"
    for i, height in enumerate((60, 64, 66, 64, 64)):  # a little taller or shorter, as real frames are
        _write_png(data / "train" / "good" / f"{i}.png", normal_surface(rng, height, 160))
    _write_png(data / "test" / "good" / "same.png", normal_surface(rng, 64, 160))
    _write_png(data / "test" / "good" / "square.png", normal_surface(rng, 96, 96))  # another aspect: reframed
    config = plumbing_config(framing="tiles", resize=64, crop=64, tile_size=64, tile_overlap=16, image_score="map_max")
    gallery = str(tmp_path / "gallery")
    messages = []
    manifest = run_fit(config, str(data / "train" / "good"), gallery, BEAM_ARGS, say=messages.append)
    assert manifest["feature_signature"]["frame_size"] == [64, 160]  # short side 64, long side from 160/64
    assert manifest["preprocessing"]["frame"] == {"size": [64, 160], "tiles": 3, "tile_size": [64, 64]}
    assert any("frame 64x160" in m and "3 tile(s)" in m for m in messages)
    assert manifest["thresholds"]["pixel"] is not None
    out = str(tmp_path / "scores")
    summary = run_score(config, gallery, str(data / "test"), out, BEAM_ARGS)  # frame_size taken from the gallery
    assert summary["ok"] == 2 and summary["reframed"] == 1
    from PIL import Image

    for row in read_score_table(out).to_pylist():
        with Image.open(row["map_uri"]) as img:
            assert (img.height, img.width) == (row["height"], row["width"])  # back in the original geometry
    with pytest.raises(GalleryMismatch, match="frame_size"):
        run_score(config.replace(frame_size=(64, 128)), gallery, str(data / "test"), str(tmp_path / "other"), BEAM_ARGS)
