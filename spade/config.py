"""Run configuration: one dataclass, loaded from YAML, hashed into the gallery manifest."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import yaml

LAYERS_BY_BACKBONE_FAMILY = ("layer1", "layer2", "layer3", "layer4")
FRAMINGS = ("crop", "full")
IMAGE_SCORES = ("knn", "map_max", "combined")
# Feature settings added after galleries were first written: a manifest without one was built with this value.
FEATURE_DEFAULTS_BEFORE = {"framing": "crop", "feature_aggregation": 1}


@dataclass(frozen=True)
class SpadeConfig:
    """Everything that decides what a gallery is and how images are scored.

    The fields that change the features (``backbone``, ``weights``, ``layers``,
    ``resize``, ``crop``, ``framing``, ``feature_aggregation``, ``mean``, ``std``) must match
    between `fit` and `score`; `feature_signature` hashes exactly those.

    ``framing``: what the model sees. ``crop`` (the paper): the short side resized to ``resize``,
    then the centre ``crop``² (the borders of the frame are never inspected); ``full``: the whole
    frame resized to ``crop``² (aspect ratio not kept, nothing cut off).
    ``feature_aggregation``: side of the local average (stride 1) applied to each pyramid layer's
    map at extraction, PatchCore's neighbourhood aggregation (3); 1 = none (the paper).
    ``image_score``: ``knn`` (the paper: mean distance of the global embedding to its K nearest
    normal embeddings), ``map_max`` (the maximum of the smoothed pixel score map, as PatchCore and
    PaDiM decide), ``combined`` (both terms standardised by their leave-one-out mean and standard
    deviation on the gallery's normal calibration images, then summed).
    Calibration at `fit`: ``calibration_images`` gallery images (evenly spaced; all when the gallery
    is smaller) are scored leave-one-out; the image threshold is their mean plus (z + ``calibration_margin``)
    standard deviations, z the standard normal quantile of 1 - ``calibration_image_fpr`` (0: their highest
    score plus the margin, the paper-era rule); the pixel threshold the (1 - ``calibration_fpr``) quantile of
    their pixel scores (`spade.scoring.calibration`).
    """

    backbone: str = "wide_resnet50_2"
    weights: str = "auto"
    layers: tuple[str, ...] = ("layer1", "layer2", "layer3")
    resize: int = 256
    crop: int = 224
    framing: str = "crop"
    feature_aggregation: int = 1
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    k: int = 50
    image_score: str = "knn"
    kappa: int = 1
    sigma: float = 4.0
    feature_dtype: str = "float32"
    batch_size: int = 8
    num_threads: int = 0
    pixel_threshold: float | None = None
    image_threshold: float | None = None
    calibration_images: int = 10
    calibration_fpr: float = 0.001
    calibration_image_fpr: float = 0.0
    calibration_margin: float = 0.0
    eval_region: str = "crop"
    shards: int = 0  # table files per output table; 0: follow the row count (rows_per_shard rows per file)
    rows_per_shard: int = 10_000
    scoring_mode: str = "exact"
    refine_distances: bool = True
    coreset_ratio: float = 0.01
    coreset_projection: int = 128
    coreset_max_candidates: int = 200_000
    max_source_pixels: int | None = 40_000_000
    max_aspect_ratio: float | None = 50.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        problems = []
        if not self.layers:
            problems.append("layers must name at least one of " + ", ".join(LAYERS_BY_BACKBONE_FAMILY))
        for name in self.layers:
            if name not in LAYERS_BY_BACKBONE_FAMILY:
                problems.append(f"unknown layer {name!r}; use {', '.join(LAYERS_BY_BACKBONE_FAMILY)}")
        if self.crop > self.resize:
            problems.append(f"crop ({self.crop}) must not exceed resize ({self.resize})")
        if self.framing not in FRAMINGS:
            problems.append(f"framing must be one of {', '.join(FRAMINGS)} (crop: the paper's centre crop; full: the whole frame)")
        if self.feature_aggregation < 1 or self.feature_aggregation % 2 == 0:
            problems.append("feature_aggregation must be an odd size >= 1 (1: none; 3: PatchCore's 3x3 average)")
        if self.image_score not in IMAGE_SCORES:
            problems.append(f"image_score must be one of {', '.join(IMAGE_SCORES)}")
        if not 0.0 <= self.calibration_image_fpr < 1.0:
            problems.append("calibration_image_fpr must be in [0, 1)")
        if self.calibration_margin < 0:
            problems.append("calibration_margin must be >= 0")
        if self.k < 1:
            problems.append("k must be >= 1")
        if self.kappa < 1:
            problems.append("kappa must be >= 1")
        if self.feature_dtype not in ("float16", "float32"):
            problems.append("feature_dtype must be float16 or float32")
        if self.eval_region not in ("crop", "full"):
            problems.append("eval_region must be 'crop' or 'full'")
        if self.scoring_mode not in ("exact", "approximate"):
            problems.append("scoring_mode must be 'exact' (the paper) or 'approximate' (coreset memory bank)")
        if not 0 < self.coreset_ratio <= 1:
            problems.append("coreset_ratio must be in (0, 1]")
        if self.max_source_pixels is not None and self.max_source_pixels < 1:
            problems.append("max_source_pixels must be >= 1 (or null for no limit)")
        if self.max_aspect_ratio is not None and self.max_aspect_ratio < 1:
            problems.append("max_aspect_ratio must be >= 1 (or null for no limit)")
        if self.batch_size < 1 or self.rows_per_shard < 1:
            problems.append("batch_size and rows_per_shard must be >= 1")
        if self.shards < 0:
            problems.append("shards must be >= 0 (0: as many as the row count needs)")
        if problems:
            raise ValueError("invalid SPADE config: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for key in ("layers", "mean", "std"):
            out[key] = list(out[key])
        return out

    def replace(self, **changes: Any) -> "SpadeConfig":
        return dataclasses.replace(self, **changes)

    def feature_signature(self) -> dict[str, Any]:
        """The settings that determine feature values; fit and score must agree on them."""
        d = self.to_dict()
        return {key: d[key] for key in ("backbone", "weights", "layers", "resize", "crop", "framing", "feature_aggregation",
                                        "mean", "std")}


def config_from_mapping(values: Mapping[str, Any], source: str = "<mapping>") -> SpadeConfig:
    known = {f.name for f in dataclasses.fields(SpadeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}; known keys are {sorted(known)}")
    return SpadeConfig(**dict(values))


def load_config(path: str | None, overrides: Mapping[str, Any] | None = None) -> SpadeConfig:
    """Load a YAML config (local path or fsspec URL); ``None`` gives the defaults."""
    values: dict[str, Any] = {}
    if path:
        with fsspec.open(path, "r") as handle:
            loaded = yaml.safe_load(handle) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of key: value")
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return config_from_mapping(values, source=path or "<defaults>")


def stable_hash(payload: Any, length: int = 16) -> str:
    """A short content hash of JSON-serialisable data, stable across runs and machines."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]
