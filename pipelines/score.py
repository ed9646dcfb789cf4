"""`spade score`: test images → features → kNN + correspondence → score table (Parquet) + map/mask PNGs.

Two ways to run it:
- one-off (default): everything under --out is this run's; a re-run replaces it with the same content;
- nightly (--date): --out holds partitions gallery=<hash>/date=<day>/; only images not yet scored
  with this gallery are scored, so re-running a night is a no-op.
"""
from __future__ import annotations

import functools
import logging
import time
from datetime import date as Date
from datetime import datetime
from typing import Callable

import apache_beam as beam

from spade.io import storage
from spade.config import SpadeConfig
from spade.index.gallery import check_compatible, read_manifest
from spade.io.listing import check_spec
from spade.io.results import RUN_INFO, ok_uris, scored_tables
from spade.io.tables import SCORES_SCHEMA
from spade.evaluation.thresholds import validate_thresholds
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.inputs import ListInputs
from transforms.read import ReadImages
from transforms.records import new_run_id, utc_now
from transforms.score import ScoreImages, resolve_thresholds
from transforms.summary import SUMMARY, WriteSummary, read_summary
from pipelines.options import refuse_local_paths, with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")


def build_score_pipeline(pipeline: beam.Pipeline, images: str, config: SpadeConfig, gallery_url: str, out_url: str,
                         table_prefix: str, gallery_hash: str, scored_at: datetime, progress_folder: str | None = None,
                         thresholds: dict | None = None, since: str | None = None, done_root: str | None = None,
                         summary_url: str | None = None):
    """The score graph: every input ends as exactly one row of the score table (the one sink, flattened with the
    run summary's file). The graph holds the ``--images`` spec, not the inputs: workers list them (`ListInputs`),
    keep those dated ``since`` or later, and leave out those scored ok under ``done_root`` (nightly mode)."""
    batches, skipped = pipeline | "Inputs" >> ListInputs(
        images, "test", config.batch_size, since=since,
        done_tables=functools.partial(scored_tables, done_root) if done_root else None, read_done=ok_uris,
        progress_folder=progress_folder)
    images_in, read_errors = batches | "Read" >> ReadImages(config)
    features, extract_errors = images_in | "Extract" >> ExtractFeatures(config)
    scored, score_errors = features | "Score" >> ScoreImages(config, gallery_url, out_url, scored_at, thresholds)
    stamp = {"gallery_hash": gallery_hash, "scored_at": scored_at}
    errors = ((read_errors, extract_errors, score_errors)
              | "Errors" >> beam.Flatten()
              | "Stamp" >> beam.Map(lambda row: {**row, **stamp})
              | "CountErrors" >> beam.ParDo(CountProgress(progress_folder)))
    scored = scored | "CountScored" >> beam.ParDo(CountProgress(progress_folder))
    rows = (scored, errors) | "AllRows" >> beam.Flatten()
    written = rows | "WriteScores" >> WriteParquetShards(table_prefix, SCORES_SCHEMA, config.shards,
                                                          rows_per_shard=config.rows_per_shard)
    if summary_url is None:
        return written
    summary = (rows, skipped) | "Summary" >> WriteSummary(summary_url)
    return (written, summary) | "Written" >> beam.Flatten()


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
    refuse_local_paths(beam_args, gallery=gallery_url, images=images, out=out_url)
    manifest = read_manifest(gallery_url)  # the launcher reads the manifest only; workers open the gallery
    check_compatible(manifest, gallery_url, config)
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    check_compatible(manifest, gallery_url, config, weights.sha256)
    explicit = validate_thresholds(storage.read_json(thresholds_url), thresholds_url) if thresholds_url else None
    used_thresholds = resolve_thresholds(config, manifest, explicit)
    check_spec(images)
    gallery_hash = manifest["gallery_hash"]
    run_out, done_root = out_url, None
    if day is not None:
        run_out = nightly_partition(out_url, gallery_hash, day, rescore_all)
        done_root = None if rescore_all else storage.join(out_url, f"gallery={gallery_hash}")
    summary = {"rows": 0, "ok": 0, "errors": 0, "skipped": 0, "new": 0, "out": run_out,
               "scores": storage.join(run_out, "scores"), "maps": storage.join(run_out, "maps"),
               "masks": storage.join(run_out, "masks"), "seconds": 0.0, "metrics": {}}
    scored_at = utc_now()
    run_id = new_run_id(scored_at)
    since_note = f", dated {since} or later" if since else ""
    say(f"score: inputs {images}{since_note} (listed by the workers) against gallery {gallery_url} ({gallery_hash}) -> {run_out}")
    scores_folder = storage.join(run_out, "scores")
    storage.remove_stale_staging(scores_folder)
    staging = storage.join(scores_folder, f"_staging-{run_id}")
    summary_url = storage.join(staging, SUMMARY)
    started = time.monotonic()
    with ProgressReporter("score", say) as progress:
        metrics = run_pipeline(lambda p: build_score_pipeline(p, images, run_config, gallery_url, run_out, storage.join(staging, "part"),
                                                              gallery_hash, scored_at, progress.folder, explicit, since=since,
                                                              done_root=done_root, summary_url=summary_url),
                               beam_args, progress)
    elapsed = time.monotonic() - started
    counts = read_summary(summary_url)
    skipped = counts["skipped"]
    summary |= {"skipped": skipped, "new": counts["rows"], "metrics": metrics}
    if counts["rows"] == 0:
        storage.remove(staging, recursive=True)
        if not skipped and not since:
            raise FileNotFoundError(f"--images {images!r} matches no files")
        say(f"score: nothing to do: 0 new, {skipped} already scored{since_note}")
        return summary
    storage.publish_staged(staging, scores_folder, tag=run_id if day is not None else None, replace=day is None)
    storage.write_json(storage.join(run_out, RUN_INFO), {
        "config": config.to_dict(), "gallery": gallery_url, "gallery_hash": gallery_hash, "images": images,
        "scored_at": scored_at.isoformat(), "thresholds": used_thresholds,
    })
    for _, message in counts["error_messages"]:
        say(f"score: error {message}")
    if counts["errors"] > len(counts["error_messages"]):
        say(f"score: ... and {counts['errors'] - len(counts['error_messages'])} more errors (status=error rows of the table)")
    summary |= {"rows": counts["rows"], "ok": counts["ok"], "errors": counts["errors"], "seconds": round(elapsed, 1)}
    say(metrics_line("score", metrics))
    say(f"score: {summary['ok']} scored, {summary['errors']} errors, {skipped} already scored, {counts['rows']} new, "
        f"in {elapsed:.1f}s ({counts['rows'] / max(elapsed, 1e-9):.2f} images/s); table {summary['scores']}, "
        f"score maps {summary['maps']}, masks {summary['masks']}")
    return summary
    scored_at = utc_now()
    run_id = new_run_id(scored_at)
    say(f"score: {len(uris)} inputs from {images} against gallery {gallery_url} ({gallery_hash}) -> {run_out}")
    scores_folder = storage.join(run_out, "scores")
    storage.remove_stale_staging(scores_folder)
    staging = storage.join(scores_folder, f"_staging-{run_id}")
    started = time.monotonic()
    with ProgressReporter("score", len(uris), say) as progress:
        metrics = run_pipeline(lambda p: build_score_pipeline(p, uris, run_config, gallery_url, run_out, storage.join(staging, "part"),
                                                              gallery_hash, scored_at, progress.folder, explicit),
                               beam_args)
    elapsed = time.monotonic() - started
    storage.publish_staged(staging, scores_folder, tag=run_id if day is not None else None, replace=day is None)
    storage.write_json(storage.join(run_out, RUN_INFO), {
        "config": config.to_dict(), "gallery": gallery_url, "gallery_hash": gallery_hash, "images": images,
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
