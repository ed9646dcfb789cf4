"""`spade score`: test images → features → kNN + correspondence → score table (Parquet) + map/mask PNGs.

Two ways to run it:
- one-off (default): everything under --out is this run's; a re-run replaces it with the same content;
- nightly (--date): --out holds partitions gallery=<hash>/date=<day>/; only images not yet scored
  with this gallery are scored, so re-running a night is a no-op.
"""
from __future__ import annotations

import logging
import time
from datetime import date as Date
from datetime import datetime
from typing import Callable

import apache_beam as beam

from spade.io import storage
from spade.config import SpadeConfig
from spade.index.gallery import Gallery
from spade.io.results import RUN_INFO, read_score_table
from spade.io.sources import expand_images, modified_since
from spade.io.tables import SCORES_SCHEMA
from spade.evaluation.thresholds import validate_thresholds
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.read import ReadImages, input_batches
from transforms.records import new_run_id, utc_now
from transforms.score import ScoreImages, resolve_thresholds
from pipelines.options import with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")


def build_score_pipeline(pipeline: beam.Pipeline, uris: list[str], config: SpadeConfig, gallery_url: str, out_url: str,
                         table_prefix: str, gallery_hash: str, scored_at: datetime, progress_folder: str | None = None,
                         thresholds: dict | None = None):
    """The score graph: every input ends as exactly one row of the score table (the one sink)."""
    images, read_errors = pipeline | "Inputs" >> beam.Create(input_batches(uris, config.batch_size)) | "Read" >> ReadImages(config)
    features, extract_errors = images | "Extract" >> ExtractFeatures(config)
    scored, score_errors = features | "Score" >> ScoreImages(config, gallery_url, out_url, scored_at, thresholds)
    stamp = {"gallery_hash": gallery_hash, "scored_at": scored_at}
    errors = ((read_errors, extract_errors, score_errors)
              | "Errors" >> beam.Flatten()
              | "Stamp" >> beam.Map(lambda row: {**row, **stamp})
              | "CountErrors" >> beam.ParDo(CountProgress(progress_folder)))
    scored = scored | "CountScored" >> beam.ParDo(CountProgress(progress_folder))
    return ((scored, errors)
            | "AllRows" >> beam.Flatten()
            | "WriteScores" >> WriteParquetShards(table_prefix, SCORES_SCHEMA, config.shards))


def already_scored(partition_root: str) -> set[str]:
    """URIs scored successfully in any date partition under one gallery's folder."""
    urls = [u for day in storage.list_dirs(partition_root, "date=")
            for u in storage.list_files(storage.join(day, "scores"), ".parquet")]
    if not urls:
        return set()
    table = storage.read_parquet(urls, columns=["uri", "status"])
    return {uri for uri, status in zip(table.column("uri").to_pylist(), table.column("status").to_pylist()) if status == "ok"}


def nightly_partition(out_url: str, gallery_hash: str, day: str, rescore_all: bool) -> str:
    """The folder of this night's partition; refuses to mix galleries unless --rescore-all says so."""
    Date.fromisoformat(day)
    others = [g.rsplit("=", 1)[-1] for g in storage.list_dirs(out_url, "gallery=")]
    if others and gallery_hash not in others and not rescore_all:
        raise ValueError(f"{out_url} was scored with gallery {', '.join(others)}, and this gallery is {gallery_hash}. "
                         "Pass --rescore-all to score every image again with the new gallery (into "
                         f"{out_url}/gallery={gallery_hash}/), or choose another --out.")
    return storage.join(out_url, f"gallery={gallery_hash}", f"date={day}")


def run_score(config: SpadeConfig, gallery_url: str, images: str, out_url: str, beam_args: list[str] | None = None,
              say: Callable[[str], None] = LOG.info, day: str | None = None, since: str | None = None,
              rescore_all: bool = False, thresholds_url: str | None = None) -> dict:
    """Score images against a gallery; returns a summary (counts and output locations)."""
    run_config = with_worker_threads(config, beam_args)  # run.json keeps the config as given
    if run_config.num_threads:
        say(f"score: {run_config.num_threads} torch/faiss thread(s) per worker")
    gallery = Gallery.open(gallery_url)
    gallery.check_compatible(config)
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    gallery.check_compatible(config, weights.sha256)
    explicit = validate_thresholds(storage.read_json(thresholds_url), thresholds_url) if thresholds_url else None
    used_thresholds = resolve_thresholds(config, gallery.manifest, explicit)
    uris = expand_images(images, split="test")
    if since:
        uris = modified_since(uris, since)
        say(f"score: {len(uris)} inputs dated {since} or later")
    run_out, skipped = out_url, 0
    if day is not None:
        run_out = nightly_partition(out_url, gallery.hash, day, rescore_all)
        done = set() if rescore_all else already_scored(storage.join(out_url, f"gallery={gallery.hash}"))
        todo = [u for u in uris if u not in done]
        skipped = len(uris) - len(todo)
        uris = todo
        say(f"score: {len(uris)} new, {skipped} already scored (gallery {gallery.hash}, partition {run_out})")
    summary = {"rows": 0, "ok": 0, "errors": 0, "skipped": skipped, "new": len(uris), "out": run_out,
               "scores": storage.join(run_out, "scores"), "maps": storage.join(run_out, "maps"),
               "masks": storage.join(run_out, "masks"), "seconds": 0.0, "metrics": {}}
    if not uris:
        say(f"score: nothing to do: 0 new, {skipped} already scored")
        return summary
    scored_at = utc_now()
    run_id = new_run_id(scored_at)
    say(f"score: {len(uris)} inputs from {images} against gallery {gallery_url} ({gallery.hash}) -> {run_out}")
    scores_folder = storage.join(run_out, "scores")
    storage.remove_stale_staging(scores_folder)
    staging = storage.join(scores_folder, f"_staging-{run_id}")
    started = time.monotonic()
    with ProgressReporter("score", len(uris), say) as progress:
        metrics = run_pipeline(lambda p: build_score_pipeline(p, uris, run_config, gallery_url, run_out, storage.join(staging, "part"),
                                                              gallery.hash, scored_at, progress.folder, explicit),
                               beam_args)
    elapsed = time.monotonic() - started
    storage.publish_staged(staging, scores_folder, tag=run_id if day is not None else None, replace=day is None)
    storage.write_json(storage.join(run_out, RUN_INFO), {
        "config": config.to_dict(), "gallery": gallery_url, "gallery_hash": gallery.hash, "images": images,
        "scored_at": scored_at.isoformat(), "thresholds": used_thresholds,
    })
    this_run = [row for row in read_score_table(run_out).to_pylist() if row["scored_at"] == scored_at]
    errors = [row for row in this_run if row["status"] != "ok"]
    for row in errors:
        say(f"score: error {row['error']}")
    summary |= {"rows": len(this_run), "ok": sum(r["status"] == "ok" for r in this_run), "errors": len(errors),
                "seconds": round(elapsed, 1), "metrics": metrics}
    say(metrics_line("score", metrics))
    say(f"score: {summary['ok']} scored, {summary['errors']} errors, {skipped} already scored, in {elapsed:.1f}s "
        f"({len(this_run) / max(elapsed, 1e-9):.2f} images/s); table {summary['scores']}, "
        f"score maps {summary['maps']}, masks {summary['masks']}")
    return summary
