"""`spade score`: test images → features → kNN + correspondence → score table (Parquet) + map/mask PNGs.

Two ways to run it:
- one-off (default): everything under --out is this run's; a re-run replaces it with the same content;
- nightly (--date): --out holds partitions gallery=<hash>/date=<day>/; only images not yet scored
  with this gallery are scored, so re-running a night is a no-op.

Either way a run holds a lease on what it writes (a second run stops with `LeaseHeld`), commits finished
units of work to a ledger as it goes (`spade.io.ledger`), and publishes through a plan, so a killed run is
resumed by running the same command again, with one row per input.
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
from spade.config import SpadeConfig, stable_hash
from spade.index.gallery import check_compatible, check_files, read_manifest, with_gallery_frame
from spade.io.lease import RunLease, staging_is_live
from spade.io.ledger import committed_sources, discard_others, earlier_parts, is_part, ledger_url
from spade.io.listing import check_spec
from spade.io.results import RUN_INFO, ok_uris, read_score_table, scored_tables
from spade.index.knn import k_warning
from spade.scoring.image_score import require_normals
from spade.io.tables import SCORES_SCHEMA
from spade.evaluation.thresholds import validate_thresholds
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import CommitUnits, WriteParquetShards, read_ledger_rows
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


def done_tables(done_root: str | None, ledger: str | None, run_id: str) -> list[str]:
    """(Run on a worker.) The tables whose inputs count as done: earlier nights' score tables under ``done_root``
    and the parts other runs committed to this run's ledger."""
    return (scored_tables(done_root) if done_root else []) + (earlier_parts(ledger, run_id) if ledger else [])


def done_uris(table_url: str) -> list[str]:
    """What a done table covers: a ledger part's sources (all its rows), a score table's ok URIs."""
    return committed_sources(table_url) if is_part(table_url) else ok_uris(table_url)


def done_kind(table_url: str) -> str:
    return "resumed" if is_part(table_url) else "skipped"


def build_score_pipeline(pipeline: beam.Pipeline, images: str, config: SpadeConfig, gallery_url: str, out_url: str,
                         table_prefix: str, gallery_hash: str, scored_at: datetime, progress_folder: str | None = None,
                         thresholds: dict | None = None, since: str | None = None, done_root: str | None = None,
                         summary_url: str | None = None, ledger: str | None = None, run_id: str = ""):
    """The score graph: every input ends as exactly one row of the score table (the one sink, flattened with the
    run summary's file). The graph holds the ``--images`` spec, not the inputs: workers list them (`ListInputs`),
    keep those dated ``since`` or later, and leave out those scored ok under ``done_root`` (nightly mode).

    With a ``ledger``, each unit of work's rows are committed to it as soon as they are all in (`CommitUnits`,
    one per branch: runners materialise a Flatten, which would hold every commit to the end); inputs that other,
    interrupted runs committed there are left out, and their rows join this run's in the table."""
    done = None
    if done_root or ledger:
        done = functools.partial(done_tables, done_root, ledger, run_id)
    batches, skipped = pipeline | "Inputs" >> ListInputs(
        images, "test", config.batch_size, since=since, done_tables=done, read_done=done_uris,
        progress_folder=progress_folder, done_kind=done_kind)
    images_in, read_errors = batches | "Read" >> ReadImages(config)
    features, extract_errors = images_in | "Extract" >> ExtractFeatures(config)
    scored, score_errors = features | "Score" >> ScoreImages(config, gallery_url, out_url, scored_at, thresholds)
    stamp = {"gallery_hash": gallery_hash, "scored_at": scored_at}
    branches = {"Scored": scored | "CountScored" >> beam.ParDo(CountProgress(progress_folder))}
    for name, errors in (("ReadErrors", read_errors), ("ExtractErrors", extract_errors), ("ScoreErrors", score_errors)):
        branches[name] = (errors
                          | f"Stamp{name}" >> beam.Map(lambda row: {**row, **stamp})
                          | f"Count{name}" >> beam.ParDo(CountProgress(progress_folder)))
    if ledger is not None:
        branches = {name: rows | f"Commit{name}" >> beam.ParDo(CommitUnits(ledger, SCORES_SCHEMA, run_id))
                    for name, rows in branches.items()}
        branches["Committed"] = (pipeline
                                 | "Ledger" >> beam.Create([ledger])
                                 | "CommittedParts" >> beam.FlatMap(earlier_parts, run_id)
                                 | "SpreadParts" >> beam.Reshuffle()
                                 | "ReadCommitted" >> beam.FlatMap(read_ledger_rows))
    rows = tuple(branches.values()) | "AllRows" >> beam.Flatten()
    written = rows | "WriteScores" >> WriteParquetShards(table_prefix, SCORES_SCHEMA, config.shards,
                                                          rows_per_shard=config.rows_per_shard)
    if summary_url is None:
        return written
    summary = (tuple(branches.values()), skipped) | "Summary" >> WriteSummary(summary_url)
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


def ledger_signature(config: SpadeConfig, gallery_hash: str, images: str, since: str | None, day: str | None,
                     thresholds: dict | None) -> str:
    """What must match for a run to resume another's ledger: the inputs asked for, gallery, config (bar the
    settings that change only speed or file layout) and thresholds."""
    settings = {k: v for k, v in config.to_dict().items()
                if k not in ("num_threads", "shards", "rows_per_shard", "batch_size")}
    return stable_hash({"gallery": gallery_hash, "config": settings, "images": images, "since": since, "day": day,
                        "thresholds": thresholds})


def remove_orphan_maps(run_out: str) -> int:
    """Delete score maps and masks under ``run_out`` that no row of its table names (left by a killed run
    whose inputs were not scored again), and temporary files of interrupted writes; returns how many.
    Called only after an interrupted run, and only while holding the run folder's lease."""
    try:
        ids = set(read_score_table(run_out, columns=["image_id"]).column("image_id").to_pylist())
    except FileNotFoundError:
        ids = set()
    removed = 0
    for sub in ("maps", "masks"):
        fs, path = storage.filesystem(storage.join(run_out, sub))
        if not fs.exists(path):
            continue
        for entry in fs.ls(path, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            if name.startswith(".tmp-") or (name.endswith(".png") and name[:-4] not in ids):
                fs.rm(entry)
                removed += 1
    return removed


def warn_missing_thresholds(used: dict, gallery_url: str) -> None:
    """Say once, loudly, when scoring will decide nothing (no image and/or pixel threshold from anywhere)."""
    missing = [kind for kind in ("image", "pixel") if used.get(kind) is None]
    if missing:
        effects = {"image": "is_anomalous stays empty", "pixel": "no masks are written"}
        LOG.warning("WARNING: no %s threshold: the gallery %s has no calibrated thresholds and neither the config nor "
                    "--thresholds gives one, so %s. Re-run `spade fit` (calibration needs 2+ normal images), set "
                    "image_threshold/pixel_threshold in the config, or pass --thresholds thresholds.json from "
                    "`spade evaluate`.", " or ".join(missing), gallery_url, " and ".join(effects[k] for k in missing))


def run_score(config: SpadeConfig, gallery_url: str, images: str, out_url: str, beam_args: list[str] | None = None,
              say: Callable[[str], None] = LOG.info, day: str | None = None, since: str | None = None,
              rescore_all: bool = False, thresholds_url: str | None = None) -> dict:
    """Score images against a gallery; returns a summary (counts and output locations).

    The run holds a lease on its output folder (nightly: the gallery's partition folder, so two nights cannot
    both score a new image) for its whole length: a second run on the same outputs stops with `LeaseHeld`.
    """
    refuse_local_paths(beam_args, gallery=gallery_url, images=images, out=out_url)
    manifest = read_manifest(gallery_url)  # the launcher reads the manifest only; workers open the gallery
    config = with_gallery_frame(config, manifest)  # aspect/tiles: every image is framed into the gallery's frame size
    run_config = with_worker_threads(config, beam_args)  # run.json keeps the config as given
    if run_config.num_threads:
        say(f"score: {run_config.num_threads} torch/faiss thread(s) per worker")
    check_compatible(manifest, gallery_url, config)
    check_files(gallery_url, manifest)  # one size query per file: a damaged gallery stops here, named
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    check_compatible(manifest, gallery_url, config, weights.sha256)
    require_normals(config.image_score, manifest.get("calibration"), gallery_url)
    warning = k_warning(config.k, manifest["num_images"])
    if warning:
        LOG.warning("score: %s", warning)
    explicit = validate_thresholds(storage.read_json(thresholds_url), thresholds_url) if thresholds_url else None
    used_thresholds = resolve_thresholds(config, manifest, explicit)
    warn_missing_thresholds(used_thresholds, gallery_url)
    check_spec(images)
    gallery_hash = manifest["gallery_hash"]
    run_out, done_root, lease_folder = out_url, None, out_url
    if day is not None:
        run_out = nightly_partition(out_url, gallery_hash, day, rescore_all)
        done_root = None if rescore_all else storage.join(out_url, f"gallery={gallery_hash}")
        lease_folder = storage.join(out_url, f"gallery={gallery_hash}")
    scored_at = utc_now()
    run_id = new_run_id(scored_at)
    with RunLease(lease_folder, run_id, "spade score") as lease:
        ledger = ledger_url(run_out, ledger_signature(config, gallery_hash, images, since, day, explicit))
        return _score_under_lease(lease, run_config, config, manifest, gallery_url, images, out_url, run_out, beam_args,
                                  say, day, since, done_root, explicit, used_thresholds, scored_at, run_id, ledger)


def _score_under_lease(lease: RunLease, run_config: SpadeConfig, config: SpadeConfig, manifest: dict, gallery_url: str,
                       images: str, out_url: str, run_out: str, beam_args: list[str] | None,
                       say: Callable[[str], None], day: str | None, since: str | None, done_root: str | None,
                       explicit: dict | None, used_thresholds: dict, scored_at: datetime, run_id: str,
                       ledger: str) -> dict:
    gallery_hash = manifest["gallery_hash"]
    summary = {"rows": 0, "ok": 0, "errors": 0, "skipped": 0, "new": 0, "resumed": 0, "out": run_out,
               "scores": storage.join(run_out, "scores"), "maps": storage.join(run_out, "maps"),
               "masks": storage.join(run_out, "masks"), "seconds": 0.0, "metrics": {}}
    since_note = f", dated {since} or later" if since else ""
    say(f"score: inputs {images}{since_note} (listed by the workers) against gallery {gallery_url} ({gallery_hash}) -> {run_out}")
    scores_folder = storage.join(run_out, "scores")
    interrupted = storage.remove_stale_staging(scores_folder, staging_is_live)
    for gone in interrupted:
        say(f"score: cleaned up after an interrupted run ({gone})")
    for other in discard_others(run_out, ledger):
        say(f"score: discarded the ledger of an interrupted run with other settings ({other})")
        interrupted.append(other)
    if storage.exists(ledger):
        interrupted.append(ledger)
    staging = storage.join(scores_folder, f"_staging-{run_id}")
    lease.mark(staging)
    summary_url = storage.join(staging, SUMMARY)
    started = time.monotonic()
    published = False
    try:
        with ProgressReporter("score", say) as progress:
            metrics = run_pipeline(lambda p: build_score_pipeline(
                p, images, run_config, gallery_url, run_out, storage.join(staging, "part"), gallery_hash, scored_at,
                progress.folder, explicit, since=since, done_root=done_root, summary_url=summary_url, ledger=ledger,
                run_id=run_id), beam_args, progress)
        elapsed = time.monotonic() - started
        counts = read_summary(summary_url)
        skipped, resumed = counts["skipped"], counts["resumed"]
        summary |= {"skipped": skipped, "resumed": resumed, "new": counts["rows"] - resumed, "metrics": metrics}
        if counts["rows"] == 0:
            if not skipped and not since:
                raise FileNotFoundError(f"--images {images!r} matches no files")
            say(f"score: nothing to do: 0 new, {skipped} already scored{since_note}")
            return summary
        lease.check()
        storage.publish_staged(staging, scores_folder, tag=run_id if day is not None else None, replace=day is None,
                               then_remove=(ledger,))
        published = True
    finally:
        if not published and not storage.exists(storage.join(staging, storage.PUBLISH_PLAN)):
            storage.remove(staging, recursive=True)  # the ledger keeps what was committed
    if interrupted:
        orphans = remove_orphan_maps(run_out)
        if orphans:
            say(f"score: removed {orphans} score map/mask file(s) of interrupted runs that no row names")
    storage.write_json(storage.join(run_out, RUN_INFO), {
        "config": config.to_dict(), "gallery": gallery_url, "gallery_hash": gallery_hash, "images": images,
        "scored_at": scored_at.isoformat(), "thresholds": used_thresholds,
    })
    for _, message in counts["error_messages"]:
        say(f"score: error {message}")
    if counts["errors"] > len(counts["error_messages"]):
        say(f"score: ... and {counts['errors'] - len(counts['error_messages'])} more errors (status=error rows of the table)")
    summary |= {"rows": counts["rows"], "ok": counts["ok"], "errors": counts["errors"], "seconds": round(elapsed, 1),
                "reframed": counts.get("reframed", 0)}
    if summary["reframed"]:
        say(f"score: {summary['reframed']} image(s) of another aspect than the gallery's frame "
            f"({'x'.join(map(str, config.frame_size or ()))}) were stretched into it")
    say(metrics_line("score", metrics))
    resumed_note = f", {resumed} committed by an interrupted run" if resumed else ""
    say(f"score: {summary['ok']} scored, {summary['errors']} errors, {skipped} already scored, {summary['new']} new"
        f"{resumed_note}, in {elapsed:.1f}s ({summary['new'] / max(elapsed, 1e-9):.2f} images/s); table "
        f"{summary['scores']}, score maps {summary['maps']}, masks {summary['masks']}")
    return summary
