"""Whole-frame preprocessing: the model sees every pixel of wide images, maps return to the original geometry,
and the default config finds a defect at the left edge of a wide image that the paper's centre crop never sees."""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade.config import load_config
from spade.io.images import preprocess
from spade.io.results import read_score_table
from spade.io.samples import normal_surface
from spade.scoring.scoremap import crop_box, to_original_geometry
from pipelines.fit import run_fit
from pipelines.score import run_score
from tests.conftest import BEAM_ARGS

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def test_full_framing_keeps_the_borders_of_a_wide_image():
    rgb = np.zeros((100, 300, 3), dtype=np.uint8)
    rgb[:, :30] = 255  # a white band along the left tenth
    full = preprocess(rgb, 256, 224, MEAN, STD, framing="full")
    crop = preprocess(rgb, 256, 224, MEAN, STD, framing="crop")
    assert full.shape == crop.shape == (3, 224, 224)
    assert full[:, :, :20].min() > 0.99 and full[:, :, 30:].max() < 0.01  # the band, squeezed to the left tenth
    assert crop.max() < 0.01  # the centre crop never sees it
    with pytest.raises(ValueError, match="framing"):
        preprocess(rgb, 256, 224, MEAN, STD, framing="tiles")


def test_full_framing_map_goes_back_onto_the_whole_image():
    score_map = np.zeros((224, 224), dtype=np.float32)
    score_map[:, :22] = 1.0  # the left tenth of the model's view
    back = to_original_geometry(score_map, (300, 100), 256, 224, framing="full")
    assert back.shape == (100, 300)
    assert back[:, :25].min() > 0.99 and back[:, 35:].max() < 1e-6


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _spot(image: np.ndarray, cx: int, cy: int, radius: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius ** 2
    out = image.copy()
    out[mask] = (170, 90, 40)
    return out, mask


def test_default_config_finds_a_defect_at_the_left_edge_of_a_wide_image(tmp_path):
    height, width = 96, 384  # 4:1, like a strip camera's frames
    rng = np.random.default_rng(7)
    data = tmp_path / "strips"
    for i in range(8):
        (data / "train" / "good").mkdir(parents=True, exist_ok=True)
        (data / "train" / "good" / f"{i:03d}.png").write_bytes(_png(normal_surface(rng, height, width)))
    (data / "test" / "good").mkdir(parents=True)
    (data / "test" / "spot").mkdir(parents=True)
    for i in range(2):
        (data / "test" / "good" / f"{i:03d}.png").write_bytes(_png(normal_surface(rng, height, width)))
    masks = {}
    for i, (cx, cy) in enumerate([(14, 40), (20, 60)]):
        image, mask = _spot(normal_surface(rng, height, width), cx, cy, 10)
        (data / "test" / "spot" / f"{i:03d}.png").write_bytes(_png(image))
        masks[f"{i:03d}.png"] = mask
    config = load_config(str(ROOT / "configs" / "default.yaml"))
    left, _, _, _ = crop_box((width, height), 256, 224)
    assert left > 30  # the paper's centre crop (short side 256, centre 224) starts right of every defect
    gallery = str(tmp_path / "gallery")
    manifest = run_fit(config, str(data / "train" / "good"), gallery, BEAM_ARGS)
    assert manifest["feature_signature"]["framing"] == config.framing
    out = str(tmp_path / "scores")
    run_score(config, gallery, str(data), out, BEAM_ARGS)
    rows = {Path(r["uri"]).parent.name + "/" + Path(r["uri"]).name: r for r in read_score_table(out).to_pylist()}
    good = [r for key, r in rows.items() if key.startswith("good/")]
    defective = {key.split("/")[1]: r for key, r in rows.items() if key.startswith("spot/")}
    assert len(good) == 2 and len(defective) == 2
    for name, row in defective.items():
        assert row["is_anomalous"] is True, f"{name}: a defect at the left edge was not flagged ({row['image_score']})"
        assert row["image_score"] > max(r["image_score"] for r in good)
        with Image.open(row["map_uri"]) as img:
            score_map = np.asarray(img, dtype=np.float64)
        assert score_map.shape == (height, width)
        y, x = np.unravel_index(np.argmax(score_map), score_map.shape)
        assert x < 40, f"{name}: the map's peak is at x={x}, not at the defect on the left edge"
        assert score_map[masks[name]].mean() > np.quantile(score_map, 0.95)
    run_info = json.loads((Path(out) / "run.json").read_text())
    assert run_info["config"]["image_score"] == config.image_score
