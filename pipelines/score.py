"""`spade score`: test images → features → kNN + correspondence → score table (Parquet) + map/mask PNGs."""
from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Callable

import apache_beam as beam

from spade import storage
from spade.config import SpadeConfig
from spade.gallery import Gallery
from spade.results import RUN_INFO, read_score_table
from spade.sources import expand_images
from spade.tables import SCORES_SCHEMA
from spade.weights import resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.read import ReadImages, input_batches
from transforms.records import utc_now
from transforms.score import ScoreImages
from pipelines.options import beam_options
from pipelines.progress import ProgressReporter

LOG = logging.getLogger("spade")


def build_score_pipeline(pipeline: beam.Pipeline, uris: list[str], config: SpadeConfig, gallery_url: str, out_url: str,
                         gallery_hash: str, scored_at: datetime, progress_folder: str | None = None):
    """The score graph: every input ends as exactly one row of the score table (the one sink)."""
    images, read_errors = pipeline | "Inputs" >> beam.Create(input_batches(uris, config.batch_size)) | "Read" >> ReadImages(config)
    features, extract_errors = images | "Extract" >> ExtractFeatures(config)
    scored, score_errors = features | "Score" >> ScoreImages(config, gallery_url, out_url, scored_at)
    stamp = {"gallery_hash": gallery_hash, "scored_at": scored_at}
    errors = ((read_errors, extract_errors, score_errors)
              | "Errors" >> beam.Flatten()
              | "Stamp" >> beam.Map(lambda row: {**row, **stamp}))
    return ((scored, errors)
            | "AllRows" >> beam.Flatten()
            | "Count" >> beam.ParDo(CountProgress(progress_folder))
            | "WriteScores" >> WriteParquetShards(storage.join(out_url, "scores", "part"), SCORES_SCHEMA, config.shards))


def run_score(config: SpadeConfig, gallery_url: str, images: str, out_url: str, beam_args: list[str] | None = None,
              say: Callable[[str], None] = LOG.info) -> dict:
    """Score images against a gallery; returns a summary (counts and output locations)."""
    gallery = Gallery.open(gallery_url)
    gallery.check_compatible(config)
    weights = resolve_weights(config.backbone, config.weights)
    gallery.check_compatible(config, weights.sha256)
    uris = expand_images(images, split="test")
    scored_at = utc_now()
    say(f"score: {len(uris)} inputs from {images} against gallery {gallery_url} ({gallery.hash}) -> {out_url}")
    storage.write_json(storage.join(out_url, RUN_INFO), {
        "config": config.to_dict(), "gallery": gallery_url, "gallery_hash": gallery.hash, "images": images,
        "scored_at": scored_at.isoformat(), "thresholds": gallery.manifest.get("thresholds", {}),
    })
    started = time.monotonic()
    with ProgressReporter("score", len(uris), say) as progress, beam.Pipeline(options=beam_options(beam_args)) as pipeline:
        build_score_pipeline(pipeline, uris, config, gallery_url, out_url, gallery.hash, scored_at, progress.folder)
    elapsed = time.monotonic() - started
    table = read_score_table(out_url)
    statuses = table.column("status").to_pylist()
    errors = [row for row in table.to_pylist() if row["status"] != "ok"]
    for row in errors:
        say(f"score: error {row['error']}")
    summary = {"rows": table.num_rows, "ok": statuses.count("ok"), "errors": len(errors),
               "scores": storage.join(out_url, "scores"), "maps": storage.join(out_url, "maps"),
               "masks": storage.join(out_url, "masks"), "seconds": round(elapsed, 1)}
    say(f"score: {summary['ok']} scored, {summary['errors']} errors in {elapsed:.1f}s "
        f"({table.num_rows / max(elapsed, 1e-9):.2f} images/s); table {summary['scores']}, "
        f"score maps {summary['maps']}, masks {summary['masks']}")
    return summary
