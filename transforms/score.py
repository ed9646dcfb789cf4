"""Scoring DoFn: kNN + patch correspondence against a gallery loaded once per worker, maps written as PNGs."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Mapping

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from spade.io import storage
from spade.features.backbone import Features
from spade.config import SpadeConfig, stable_hash
from spade.scoring.correspondence import configure_threads
from spade.scoring.lanes import each_in_lanes
from spade.io.maps import encode_mask, encode_score_map
from spade.features.framing import Framing, framing_for
from spade.index.gallery import Gallery, with_gallery_settings
from spade.scoring.batch import score_batch
from transforms.cache import LruCache
from transforms.records import SplitErrors, error_row, image_columns

LOG = logging.getLogger(__name__)


GALLERIES = LruCache()  # the galleries this worker process holds open, least recently used dropped first


@dataclass
class OpenGallery:
    """A gallery opened for scoring with what every batch against it needs, made once per worker process."""

    gallery: Gallery
    framing: Framing
    image_ids: list[str]
    image_threshold: float | None
    pixel_threshold: float | None

    @classmethod
    def open(cls, url: str, config: SpadeConfig, thresholds: dict | None) -> "OpenGallery":
        gallery = Gallery.open(url)
        gallery.check_compatible(config)
        used = resolve_thresholds(config, gallery.manifest, thresholds)
        return cls(gallery, framing_for(with_gallery_settings(config, gallery.manifest)), gallery.image_ids,
                   used["image"], used["pixel"])


def calibrated_thresholds(config: SpadeConfig, manifest: dict) -> dict:
    """The gallery's calibrated {"image", "pixel"} for this config's image-score mode: its ``image_by_mode``
    entry, or, for galleries calibrated before modes existed, ``image`` when it was calibrated for this mode."""
    found = manifest.get("thresholds") or {}
    by_mode = found.get("image_by_mode")
    if by_mode is not None:
        image = by_mode.get(config.image_score)
    else:
        image = found.get("image") if found.get("image_score", "knn") == config.image_score else None
    return {"image": image, "pixel": found.get("pixel")}


def resolve_thresholds(config: SpadeConfig, manifest: dict, explicit: dict | None = None) -> dict:
    """{"image", "pixel", "source"} per kind: an explicit thresholds file's (`spade score --thresholds`),
    else the config's, else the gallery's calibrated ones (for the config's ``image_score``)."""
    found = calibrated_thresholds(config, manifest)
    out: dict = {}
    sources = []
    for kind in ("image", "pixel"):
        for value, source in (((explicit or {}).get(kind), (explicit or {}).get("source", "file")),
                              (getattr(config, f"{kind}_threshold"), "config"),
                              (found.get(kind), "calibration")):
            if value is not None:
                out[kind] = float(value)
                sources.append(f"{kind}: {source}")
                break
        else:
            out[kind] = None
    out["source"] = "; ".join(sources) or "none"
    out["image_score"] = config.image_score
    return out


@dataclass(frozen=True)
class ScoreTarget:
    """What a route's batches are scored against and where their maps go: the route's config, its gallery, the
    run folder its maps and masks are written under, explicit thresholds (``--thresholds``), and
    ``gallery_version`` (what the launcher read of the gallery: a refit at the same URL is another cache entry)."""

    config: SpadeConfig
    gallery_url: str
    out_url: str
    thresholds: dict | None = None
    gallery_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.gallery_url}#{self.gallery_version}#" + stable_hash({"config": self.config.to_dict(),
                                                                            "thresholds": self.thresholds})


class ScoreBatch(beam.DoFn):
    """(route, list of `ImageFeatures`) → one score row each (status ok, carrying ``route``), writing its score map
    and mask PNGs under the route's run folder.

    The gallery is taken from the worker's `GALLERIES` for each batch rather than held by the DoFn: a run routed to
    many galleries keeps at most ``open_galleries`` of them open per worker (least recently used dropped)."""

    def __init__(self, targets: dict[str, ScoreTarget], scored_at: datetime):
        self.targets, self.scored_at = targets, scored_at
        self.scored = Metrics.counter("spade", "images_scored")
        self.failed = Metrics.counter("spade", "images_failed")
        self.score_dist = Metrics.distribution("spade", "image_score_x1000")
        self.latency = Metrics.distribution("spade", "score_ms_per_image")

    def setup(self):
        configure_threads(next(iter(self.targets.values())).config.num_threads)

    def _open(self, target: ScoreTarget) -> OpenGallery:
        config = target.config
        return GALLERIES.get(target.key, lambda: OpenGallery.open(target.gallery_url, config, target.thresholds),
                             lambda opened: opened.gallery.resident_bytes(), config.open_galleries,
                             config.open_galleries_mb << 20)

    def process(self, routed_batch):
        route, batch = routed_batch
        target = self.targets[route]
        start = time.perf_counter()
        try:
            features = Features(np.stack([f.embedding for f in batch]),
                                {layer: np.stack([f.pyramid[layer] for f in batch]) for layer in target.config.layers})
            opened = self._open(target)
            results = score_batch(features, opened.gallery, target.config)
        except Exception as exc:
            if len(batch) > 1:
                for item in batch:
                    yield from self.process((route, [item]))
                return
            LOG.exception("scoring failed for %s", batch[0].image.uri)
            self.failed.inc()
            yield error_row(**image_columns(batch[0].image), error=f"{batch[0].image.uri}: scoring failed: {exc}",
                            route=route)
            return
        rows = []
        written = each_in_lanes(lambda pair: self._write_or_fail(opened, target.out_url, *pair), list(zip(batch, results)),
                                target.config.num_threads)
        for item, result, row in zip(batch, results, written):
            if isinstance(row, Exception):
                self.failed.inc()
                rows.append(error_row(**image_columns(item.image), error=f"{item.image.uri}: writing score map failed: {row}",
                                      route=route))
            else:
                self.scored.inc()
                self.score_dist.update(int(result.image_score * 1000))
                rows.append({**row, "route": route})
        # Timed before yielding: a fused runner runs the downstream steps (table writing) inside the yield.
        self.latency.update(int((time.perf_counter() - start) * 1000 / len(batch)))
        yield from rows

    def _write_or_fail(self, opened: OpenGallery, out_url: str, item, result) -> dict | Exception:
        """`_write`, or the exception it raised (the batch's images are written in lanes; metrics are counted by the
        bundle's own thread)."""
        try:
            return self._write(opened, out_url, item.image, result)
        except Exception as exc:
            LOG.exception("writing maps failed for %s", item.image.uri)
            return exc

    def _write(self, opened: OpenGallery, out_url: str, image, result) -> dict:
        full = opened.framing.to_original(result.score_map, (image.width, image.height))
        png, scale = encode_score_map(full)
        map_uri = storage.join(out_url, "maps", f"{image.image_id}.png")
        storage.atomic_write_bytes(map_uri, png)
        mask_uri = None
        if opened.pixel_threshold is not None:
            mask_uri = storage.join(out_url, "masks", f"{image.image_id}.png")
            storage.atomic_write_bytes(mask_uri, encode_mask(full >= opened.pixel_threshold))
        return {
            **image_columns(image),
            "image_score": result.image_score,
            "pixel_max": float(scale) if full.max() > 0 else 0.0,
            "is_anomalous": None if opened.image_threshold is None else bool(result.image_score > opened.image_threshold),
            "map_uri": map_uri,
            "mask_uri": mask_uri,
            "neighbours": [opened.image_ids[row] for row in result.neighbours],
            "status": "ok",
            "error": None,
            "gallery_hash": opened.gallery.hash,
            "scored_at": self.scored_at,
            "reframed": image.reframed,  # counted in the run summary, not a table column
        }


class ScoreImages(beam.PTransform):
    """(route, lists of `ImageFeatures`) → (score rows, error rows); ``targets``: {route: `ScoreTarget`}."""

    def __init__(self, targets: Mapping[str, ScoreTarget], scored_at: datetime):
        super().__init__()
        self.targets, self.scored_at = dict(targets), scored_at

    def expand(self, features):
        return (features
                | "Score" >> beam.ParDo(ScoreBatch(self.targets, self.scored_at))
                | "Split" >> SplitErrors())
