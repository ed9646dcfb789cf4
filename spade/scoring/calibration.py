"""Default thresholds from normal images alone: leave-one-out scores of gallery images.

Rule (documented in the README): ``calibration_images`` gallery images, evenly spaced over the
gallery (all of them when it is smaller), are each scored against the gallery without themselves.
Their image terms (kNN, map maximum and top mean, the residual above the other calibration images' mean map, and
the patch bank's maximum where the image score uses it) give the normal statistics the combined modes standardise
by; their mean map, on a coarse grid, is the position baseline ``combined_residual`` compares maps with. For each
image-score mode the image threshold is mean + (z + ``calibration_margin``) x standard deviation of the
normal images' scores, z the standard normal quantile of 1 - ``calibration_image_fpr`` (1.645 for 5 %):
the target false-positive rate under a normal model of the normal scores, plus an optional margin in
standard deviations. A parametric rule rather than an empirical quantile: the upper quantiles of tens of
leave-one-out scores are dominated by the few gallery images unlike all others (an odd part, a rotated
plate), whose leave-one-out scores overshoot those of new normal images. An image is anomalous when its
score is above the threshold. The pixel threshold is the (1 - ``calibration_fpr``) quantile of their
pixel scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy.stats import norm

from spade.config import IMAGE_SCORES, SpadeConfig
from spade.features.backbone import Features
from spade.features.framing import framing_for
from spade.index.gallery import Gallery, with_gallery_settings
from spade.scoring.batch import score_batch
from spade.scoring.image_score import EITHER_MODES, MODE_TERMS, image_scores, mode_terms, normal_statistics
from spade.scoring.lanes import in_lanes, lanes_for
from spade.scoring.position_baseline import leave_one_out_edge_corrected, leave_one_out_residuals, position_baseline
from spade.scoring.region_excess import region_record
from spade.scoring.term_selection import SyntheticScores, select_terms


@dataclass
class NormalScores:
    """Leave-one-out results of m gallery images: their rows, both image terms, their frames' (H, W) maps the image
    terms read, and (``pixel_maps``) the score maps where those differ (a local search beside the layer-1 bank,
    `spade.scoring.batch`; None: the same maps)."""

    rows: np.ndarray
    knn: np.ndarray
    map_max: np.ndarray
    maps: np.ndarray
    map_top: np.ndarray | None = None
    bank_max: np.ndarray | None = None
    pixel_maps: np.ndarray | None = None

    @property
    def score_maps(self) -> np.ndarray:
        """The normal frames' score maps: what the pixel threshold and the tile-edge correction are measured on."""
        return self.maps if self.pixel_maps is None else self.pixel_maps


def _gallery_features(gallery: Gallery, rows: np.ndarray, config: SpadeConfig) -> Features:
    """The stored embedding and pyramid {layer: (B, C, T*h, w)} of gallery rows, as extraction gave them."""
    framing = framing_for(config)
    pyramid = {}
    for layer in config.layers:
        positions = np.asarray(gallery.pyramid[layer][rows], dtype=np.float32)  # (B, P, C)
        grid = framing.layer_grid(positions.shape[1])
        pyramid[layer] = np.ascontiguousarray(positions.transpose(0, 2, 1)).reshape(len(rows), -1, *grid)
    return Features(embedding=gallery.index.reconstruct_batch(rows), pyramid=pyramid)


def leave_one_out_scores(gallery: Gallery, config: SpadeConfig, count: int,
                         progress: Callable[[str], None] = lambda _: None) -> NormalScores:
    """Both image terms and the pixel score maps of ``count`` evenly spaced gallery images (all when the
    gallery is smaller), each scored against the gallery without itself, ``config.batch_size`` at a time, two
    batches side by side (`spade.scoring.lanes`); the results do not depend on the lanes."""
    config = with_gallery_settings(config, gallery.manifest)
    n = gallery.index.ntotal
    if n < 2 or count < 1:
        empty = np.zeros(0)
        return NormalScores(empty.astype(int), empty, empty, np.zeros((0, *framing_for(config).size), dtype=np.float32), empty)
    rows = np.unique(np.linspace(0, n - 1, num=min(count, n)).round().astype(np.int64))
    # every term (the bank's where the config's image score uses it: fit built the bank then), so a config with
    # another image_score can use the gallery; scored as a single-term mode, which needs no statistics
    with_bank = config.uses_patch_bank
    lanes, threads = lanes_for(config.num_threads)
    single = config.replace(image_score="bank_max" if with_bank else "knn", num_threads=threads,
                            map_edge_band=0)  # the method's maps: what the position baseline is measured on
    batches = [rows[start:start + config.batch_size] for start in range(0, len(rows), config.batch_size)]

    def leave_out(batch: np.ndarray):
        return score_batch(_gallery_features(gallery, batch, config), gallery, single, exclude_rows=batch)

    knn, peaks, tops, banks, maps, pixel_maps = [], [], [], [], [], []
    for start in range(0, len(batches), lanes):  # a batch per lane at a time: progress as they finish
        for results in in_lanes(leave_out, batches[start:start + lanes], config.num_threads):
            for result in results:
                knn.append(result.knn_score)
                peaks.append(result.map_max)
                tops.append(result.map_top)
                banks.append(result.bank_max)
                maps.append(result.term_map)
                if result.term_map is not result.score_map:
                    pixel_maps.append(result.score_map)
        progress(f"calibration: {len(knn)}/{len(rows)} normal images scored leave-one-out")
    return NormalScores(rows, np.asarray(knn), np.asarray(peaks), np.stack(maps), np.asarray(tops),
                        np.asarray(banks) if with_bank else None, np.stack(pixel_maps) if pixel_maps else None)


def image_threshold(scores: np.ndarray, target_fpr: float, margin: float) -> float:
    """mean + (z + ``margin``) x std of normal image scores, z the standard normal (1 - ``target_fpr``) quantile;
    ``target_fpr`` 0 gives the highest normal score plus ``margin`` standard deviations."""
    scores = np.asarray(scores, dtype=np.float64)
    spread = float(scores.std(ddof=1)) if scores.size > 1 else 0.0
    if target_fpr <= 0:
        return float(scores.max() + margin * spread)
    return float(scores.mean() + (norm.ppf(1.0 - target_fpr) + margin) * spread)


def calibrate(normal: NormalScores, config: SpadeConfig,
              synthetic: SyntheticScores | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(normal statistics, thresholds) for the manifest from leave-one-out normal scores; ``synthetic``: the
    candidate terms of gallery images with a drawn defect (`spade.scoring.term_selection`), which select the terms of
    ``combined_selected`` (``selected_terms``; that mode is calibrated only with them).

    The thresholds hold the image threshold of every image-score mode (``image_by_mode``), so a
    config with another ``image_score`` can score against the same gallery; ``image`` is the fitted
    config's. Both are empty with fewer than 2 normal images.
    """
    residuals = leave_one_out_residuals(normal.maps)
    region, regions = region_record(normal.maps)
    stats = normal_statistics(normal.knn, normal.map_max, normal.map_top, normal.bank_max, residuals, regions)
    if not stats:
        return {}, {}
    stats["position_baseline"] = position_baseline(normal.maps)
    if config.local_radius:  # the score maps' own baseline (the tile-edge correction); its presence
        stats["pixel_baseline"] = position_baseline(normal.score_maps)  # says the terms read the bank's maps
    stats["region_level"] = region
    if synthetic is not None and normal.bank_max is not None:
        stats["selected_terms"] = select_terms({"knn": normal.knn, "bank_max": normal.bank_max, "map_residual": residuals},
                                               synthetic)
    modes = [mode for mode in IMAGE_SCORES if all(term in stats for term in MODE_TERMS[mode] + mode_terms(mode, stats))]
    stats["scores"], by_mode = {}, {}
    for mode in sorted(modes, key=lambda mode: mode in EITHER_MODES):  # an either-mode standardises by its parts' scores
        scores = image_scores(mode, normal.knn, normal.map_max, stats, map_top=normal.map_top, bank_max=normal.bank_max,
                              map_residual=residuals, region_excess=regions)
        stats["scores"][mode] = _distribution(scores)
        by_mode[mode] = image_threshold(scores, config.calibration_image_fpr, config.calibration_margin)
    thresholds = {
        "image": by_mode[config.image_score],
        "image_score": config.image_score,
        "image_by_mode": by_mode,
        "pixel": float(np.quantile(_pixel_maps(normal.score_maps, config), 1.0 - config.calibration_fpr)),
        "source": "calibration",
        "calibration_images": int(len(normal.rows)),
        "calibration_fpr": float(config.calibration_fpr),
        "calibration_image_fpr": float(config.calibration_image_fpr),
        "calibration_margin": float(config.calibration_margin),
    }
    return stats, thresholds


def _pixel_maps(maps: np.ndarray, config: SpadeConfig) -> np.ndarray:
    """Normal maps as scoring makes them: less their tile-edge excess where ``map_edge_band`` asks for it."""
    if not config.map_edge_band or len(maps) < 2:
        return maps
    return leave_one_out_edge_corrected(maps, framing_for(config.replace(frame_size=tuple(maps.shape[1:]))
                                                          if config.frame_from_gallery else config).interior_distance(),
                                        config.map_edge_band)


MAP_SETTINGS = ("k", "kappa", "sigma", "approximate_local_radius", "approximate_local_block", "map_edge_band")  # what a score map's values depend on beyond the features
UNRECORDED = {"map_edge_band": 0, "approximate_local_block": 8}  # what a gallery fitted before a setting was recorded made its maps with


class CalibrationMismatch(ValueError):
    """A run would judge its maps by thresholds or normal statistics that calibration measured on other maps."""


def check_calibrated_with(manifest: dict[str, Any], config: SpadeConfig, used: dict[str, Any], url: str) -> None:
    """Raise `CalibrationMismatch` when this run uses what the gallery's calibration measured (a calibrated threshold
    in ``used``, `resolve_thresholds`' result, or the normal statistics a combined image score standardises by) and
    ``config`` makes its maps with other `MAP_SETTINGS` than `fit` calibrated with: those thresholds would flag other
    images and pixels than their target rates say, and nothing else would show it; or when the gallery calibrated
    image thresholds for other modes only and nothing else gives this mode's (a gallery fitted before the mode)."""
    by_mode = (manifest.get("thresholds") or {}).get("image_by_mode") or {}
    if used.get("image") is None and by_mode and config.image_score not in by_mode:
        raise CalibrationMismatch(
            f"gallery {url} was calibrated before image_score {config.image_score} existed: its thresholds cover "
            f"{', '.join(sorted(by_mode))}, so this run would decide nothing (is_anomalous empty). Re-run `spade fit` "
            f"with this config, score with one of those image_score modes, or give an image threshold from `spade "
            "evaluate` with --thresholds.")
    calibrated = [f"{kind} threshold" for kind in ("image", "pixel") if f"{kind}: calibration" in used.get("source", "")]
    if len(MODE_TERMS.get(config.image_score, ())) > 1 and manifest.get("calibration"):
        calibrated.append("normal statistics")
    recorded = {key: _recorded_setting(manifest, key) for key in MAP_SETTINGS}
    diffs = [(key, had, _map_setting(config, key)) for key, had in recorded.items()
             if had is not None and had != _map_setting(config, key)]
    if config.local_radius and manifest.get("approximate_local_radius") and \
            "pixel_baseline" not in (manifest.get("calibration") or {}) and \
            any(kind in calibrated for kind in ("image threshold", "normal statistics")):
        raise CalibrationMismatch(
            f"gallery {url} was calibrated with approximate_local_radius: {manifest['approximate_local_radius']} when "
            "the image terms read the maps of the local search; they now read the coreset bank's maps alone (README "
            "'A local search beside the layer-1 bank'), so its calibrated image threshold and normal statistics would "
            "not mean their target rates. Re-run `spade fit` with this config, or give an image threshold from `spade "
            "evaluate` with --thresholds and a single-term image_score.")
    if calibrated and diffs:
        settings = "; ".join(f"{key}: gallery calibrated with {had!r}, config has {has!r}" for key, had, has in diffs)
        theirs = ", ".join(f"`{key}: {had}`" for key, had, _ in diffs)
        raise CalibrationMismatch(
            f"gallery {url}: its calibrated {' and '.join(calibrated)} were measured on maps made with other settings "
            f"than this config's ({settings}), so they would not mean their target rates. Score with {theirs} in "
            "--config (the gallery's settings), re-run `spade fit` with this config to calibrate anew, or give "
            "thresholds from `spade evaluate` with --thresholds and a single-term image_score (knn, map_max, map_top, "
            "bank_max).")


def _map_setting(config: SpadeConfig, key: str) -> Any:
    """A `MAP_SETTINGS` value as the maps are made (the local radius is 0 where no layer is searched in a bank, the
    block 0 where there is no local search)."""
    if key == "approximate_local_radius":
        return config.local_radius
    if key == "approximate_local_block":
        return config.local_block
    return getattr(config, key)


def _recorded_setting(manifest: dict[str, Any], key: str) -> Any:
    """A `MAP_SETTINGS` value a gallery's calibration measured maps with (`UNRECORDED` where it predates the key); no
    block where its maps had no local search (the radius tells those apart)."""
    if key == "approximate_local_block" and not manifest.get("approximate_local_radius"):
        return None
    return manifest.get(key, UNRECORDED.get(key))


REFERENCE_QUANTILES = 21  # 0, 5, ..., 100 %


def _distribution(scores: np.ndarray) -> dict[str, Any]:
    scores = np.asarray(scores, dtype=np.float64)
    return {"images": int(scores.size), "mean": float(scores.mean()), "std": float(scores.std(ddof=1)),
            "quantiles": [float(q) for q in np.quantile(scores, np.linspace(0.0, 1.0, REFERENCE_QUANTILES))]}


def normal_reference(manifest: dict[str, Any], mode: str) -> dict[str, Any] | None:
    """The distribution of normal images' scores in image-score ``mode`` that calibration measured (leave-one-out):
    {"images", "mean", "std", "quantiles"}, what a night's scores are compared with for drift (`spade trend`).
    Galleries calibrated before it was recorded give mean and std of single-term modes only; None when unknown."""
    calibration = manifest.get("calibration") or {}
    recorded = (calibration.get("scores") or {}).get(mode)
    if recorded:
        return recorded
    if mode in calibration and "mean" in calibration[mode]:
        return {"images": calibration.get("images"), "mean": calibration[mode]["mean"], "std": calibration[mode]["std"],
                "quantiles": None}
    return None
