"""Synthetic defects on normal images and ``image_score: combined_selected`` (`spade.scoring.term_selection`)."""
from __future__ import annotations

import numpy as np
import pytest

from spade.scoring.image_score import MissingCalibration, image_score, normal_statistics
from spade.scoring.synthetic_defects import cut_paste, scar, synthetic_defect
from spade.scoring.term_selection import CANDIDATES, SyntheticScores, select_terms


def _image(rng: np.random.Generator, height: int = 256, width: int = 256) -> np.ndarray:
    return rng.integers(90, 160, size=(height, width, 3), dtype=np.uint8)


def test_a_scar_is_a_thin_shifted_line_inside_the_frame():
    rng = np.random.default_rng(0)
    image = _image(rng)
    out, mask = scar(image, np.random.default_rng(1))
    changed = np.any(out != image, axis=2)
    assert mask.any() and not changed[~mask].any()  # nothing outside the mask moves
    shift = out[mask].astype(int) - image[mask].astype(int)
    assert np.all(np.abs(shift) >= 60) and (np.all(shift > 0) or np.all(shift < 0))  # one brightness step, one sign
    assert 12 * 2 * 0.5 <= mask.sum() <= 49 * 5  # 2-4 pixels wide, 12-48 long
    ys, xs = np.nonzero(mask)
    assert ys.min() >= 32 - 25 and ys.max() < 256 - 32 + 25  # centred off the outer eighth
    large, large_mask = scar(_image(rng, 512, 1024), np.random.default_rng(1))
    assert large_mask.sum() == pytest.approx(4 * mask.sum(), rel=0.35)  # sizes follow the short side (2x: 4x area)


def test_cut_paste_copies_a_rectangle_of_the_donor():
    rng = np.random.default_rng(2)
    image, donor = _image(rng), np.full((256, 256, 3), 7, dtype=np.uint8)
    out, mask = cut_paste(image, donor, np.random.default_rng(3))
    ys, xs = np.nonzero(mask)
    rows, cols = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert mask.sum() == rows * cols and 10 <= rows <= 28 and 10 <= cols <= 28
    assert np.all(out[mask] == 7) and np.array_equal(out[~mask], image[~mask])


def test_synthetic_defects_are_seeded_and_kinds_checked():
    rng = np.random.default_rng(4)
    image, donor = _image(rng), _image(rng)
    first = synthetic_defect(image, donor, "scar", np.random.default_rng(5))
    again = synthetic_defect(image, donor, "scar", np.random.default_rng(5))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    with pytest.raises(ValueError, match="scar, cut_paste"):
        synthetic_defect(image, donor, "dent", np.random.default_rng(5))


def _terms(rng: np.random.Generator, count: int, shifts: dict[str, float]) -> dict[str, np.ndarray]:
    return {term: rng.normal(shifts.get(term, 0.0), 1.0, count) for term in CANDIDATES}


def test_the_terms_that_separate_synthetic_defects_are_selected():
    rng = np.random.default_rng(7)
    normal = _terms(rng, 80, {})
    tyre = SyntheticScores(np.arange(60), _terms(rng, 60, {"map_residual": 2.0, "bank_max": 1.5, "knn": 0.2}))
    slots = SyntheticScores(np.arange(60), _terms(rng, 60, {"map_residual": 2.0, "bank_max": 0.1, "knn": 1.0}))
    chosen = select_terms(normal, tyre)
    assert chosen["terms"] == ["map_residual", "bank_max"] and chosen["images"] == 60
    assert chosen["auroc"]["map_residual"] > chosen["auroc"]["bank_max"] > chosen["auroc"]["knn"]
    assert select_terms(normal, slots)["terms"] == ["map_residual", "knn"]
    assert select_terms(normal, slots, count=1)["terms"] == ["map_residual"]
    too_few = SyntheticScores(np.arange(1), _terms(rng, 1, {}))
    assert select_terms(normal, too_few)["terms"] == list(CANDIDATES)


def test_combined_selected_sums_only_the_selected_terms():
    normals = normal_statistics([1.0, 3.0], [0.0, 0.0], bank_maxima=[10.0, 14.0], map_residuals=[0.0, 2.0])
    terms = dict(map_residual=3.0, bank_max=12.0)
    # z: knn (4 - 2) / sqrt(2), bank (12 - 12) / sqrt(8), residual (3 - 1) / sqrt(2)
    everything = image_score("combined_residual", 4.0, 0.0, normals, **terms)
    assert everything == pytest.approx(2 / np.sqrt(2) + 0 + 2 / np.sqrt(2))
    selected = normals | {"selected_terms": {"terms": ["map_residual", "bank_max"]}}
    assert image_score("combined_selected", 4.0, 0.0, selected, **terms) == pytest.approx(2 / np.sqrt(2))
    with pytest.raises(MissingCalibration, match="Re-run `spade fit`"):
        image_score("combined_selected", 4.0, 0.0, normals, **terms)  # a gallery fitted without a selection


def test_fit_selects_terms_on_synthetic_defects_and_scoring_uses_them(tmp_path):
    """fit scores gallery images with drawn defects, records the selection and a threshold for the mode; an image's
    score is the sum of the selected standardised terms; with no synthetic images every term is kept; an image that
    cannot be read any more is left out of the synthetic set."""
    from tests.conftest import BEAM_ARGS, TINY, plumbing_config
    from pipelines.fit import run_fit
    from spade.index.gallery import Gallery
    from spade.io import storage
    from spade.io.samples import SampleSpec, write_sample_dataset
    from spade.scoring.batch import score_batch
    from spade.scoring.calibration import _gallery_features
    from spade.scoring.term_selection import synthetic_scores

    data = write_sample_dataset(str(tmp_path / "data"), SampleSpec(size=64, train=6, test_good=1, test_per_defect=1))
    config = plumbing_config(**TINY, image_score="combined_selected", synthetic_defects=4)
    run_fit(config, f"{data}/train/good", str(tmp_path / "gallery"), BEAM_ARGS)
    gallery = Gallery.open(str(tmp_path / "gallery"))
    calibration = gallery.manifest["calibration"]
    selection = calibration["selected_terms"]
    assert selection["images"] == 4 and len(selection["terms"]) == 2 and set(selection["terms"]) <= set(CANDIDATES)
    assert set(selection["auroc"]) == set(CANDIDATES) and all(0 <= v <= 1 for v in selection["auroc"].values())
    by_mode = gallery.manifest["thresholds"]["image_by_mode"]
    assert gallery.manifest["thresholds"]["image"] == by_mode["combined_selected"] and np.isfinite(by_mode["combined_selected"])
    rows = np.array([0, 1])
    results = score_batch(_gallery_features(gallery, rows, config), gallery, config, exclude_rows=rows)
    terms = {"knn": "knn_score", "bank_max": "bank_max", "map_residual": "map_residual"}
    for result in results:
        z = {t: (getattr(result, a) - calibration[t]["mean"]) / calibration[t]["std"] for t, a in terms.items()}
        assert result.image_score == pytest.approx(sum(z[t] for t in selection["terms"]), rel=1e-6)
        assert result.image_score != pytest.approx(sum(z.values()), rel=1e-6)

    maps = np.stack([r.score_map for r in results])
    broken = gallery.images.column("uri").to_pylist()[0]
    messages = []

    def read(uri: str) -> bytes:
        if uri == broken:
            raise FileNotFoundError(uri)
        return storage.read_bytes(uri)

    found = synthetic_scores(gallery, config, maps, 6, read, progress=messages.append)
    assert 0 not in found.rows and len(found.rows) == 4  # row 0 gone, and the image whose donor it was
    assert any(broken in m for m in messages) and all(np.isfinite(v).all() for v in found.terms.values())

    none = plumbing_config(**TINY, image_score="combined_selected", synthetic_defects=0)
    run_fit(none, f"{data}/train/good", str(tmp_path / "all"), BEAM_ARGS)
    assert Gallery.open(str(tmp_path / "all")).manifest["calibration"]["selected_terms"]["terms"] == list(CANDIDATES)
