"""`spade fit`: normal images → embeddings Parquet → gallery (faiss index + pyramid files + manifest).

``--append`` extracts only the new images and rebuilds the gallery from all
embedding shards, old and new, so old images are never extracted again.
"""
from __future__ import annotations

import functools
import logging
import time
from typing import Callable

import apache_beam as beam

from spade.io import storage
from spade.scoring.calibration import calibrate, leave_one_out_scores
from spade.config import SpadeConfig, stable_hash
from spade.index.gallery import (MANIFEST, Gallery, GalleryMissing, build_gallery, check_compatible, read_manifest,
                                 remove_unlisted_pyramid_shards, with_gallery_frame, write_manifest)
from spade.features.framing import frame_size_for, framing_for
from spade.io.listing import check_spec, sample_image_sizes
from spade.io.results import ok_uris
from spade.io.lease import RunLease, staging_is_live
from spade.index.knn import k_warning
from spade.io.tables import ERRORS_SCHEMA, embeddings_schema
from spade.features.resolved import ResolvedWeights
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.inputs import ListInputs
from transforms.read import ReadImages
from transforms.pyramid import WritePyramidShards
from transforms.records import new_run_id, utc_now
from transforms.summary import SUMMARY, WriteSummary, read_summary
from pipelines.options import refuse_local_paths, with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")


def build_fit_pipeline(pipeline: beam.Pipeline, images: str, config: SpadeConfig, staging_url: str, gallery_url: str,
                       features_tag: str, progress_folder: str | None = None, known_gallery: str | None = None):
    """The fit graph; its single final PCollection lists the files written (one sink step, Dask-friendly).

    The graph holds the ``--images`` spec, not the inputs: workers list them (`ListInputs`); with
    ``known_gallery`` (``--append``) they leave out the URIs already in that gallery's embeddings tables.
    Workers write each batch's pyramid shards straight into ``gallery_url`` (named by ``features_tag`` and the batch's
    image ids); only small embedding rows reach the sink. The run's counts go to ``staging_url``/summary.json.
    """
    done_tables = functools.partial(storage.list_files, storage.join(known_gallery, "embeddings"), ".parquet") if known_gallery else None
    batches, skipped = pipeline | "Inputs" >> ListInputs(images, "train", config.batch_size, done_tables=done_tables,
                                                          read_done=ok_uris, progress_folder=progress_folder)
    images_in, read_errors = batches | "Read" >> ReadImages(config)
    features, extract_errors = images_in | "Extract" >> ExtractFeatures(config)
    rows = (features
            | "WritePyramids" >> beam.ParDo(WritePyramidShards(gallery_url, config.layers, config.feature_dtype, features_tag))
            | "ToRows" >> beam.FlatMap(lambda batch: batch)
            | "CountImages" >> beam.ParDo(CountProgress(progress_folder)))
    embeddings = rows | "WriteEmbeddings" >> WriteParquetShards(storage.join(staging_url, "embeddings", "part"),
                                                                embeddings_schema(config.layers), config.shards,
                                                                rows_per_shard=config.rows_per_shard)
    errors = ((read_errors, extract_errors)
              | "Errors" >> beam.Flatten()
              | "CountErrors" >> beam.ParDo(CountProgress(progress_folder)))
    rejected = errors | "WriteRejected" >> WriteParquetShards(storage.join(staging_url, "rejected", "part"), ERRORS_SCHEMA,
                                                                 config.shards, rows_per_shard=config.rows_per_shard)
    summary = ((rows, errors), skipped) | "Summary" >> WriteSummary(storage.join(staging_url, SUMMARY))
    return (embeddings, rejected, summary) | "Written" >> beam.Flatten()


def launch_fit(config: SpadeConfig, images: str, gallery_url: str, weights: ResolvedWeights,
               beam_args: list[str] | None = None, say: Callable[[str], None] = LOG.info, append: bool = False,
               run_id: str | None = None, lease: RunLease | None = None) -> tuple[str, str, dict, dict]:
    """The launcher's part of `run_fit`: checks, then builds and runs the fit pipeline into a staging folder.

    Returns (staging folder, run id, the run's summary counts, Beam metrics). Nothing here grows with
    the number of inputs: the workers list them. With the gallery's ``lease`` held (`run_fit`), staging
    folders of dead runs are removed first and this run's is marked as live; a failed or interrupted
    pipeline removes its own. ``weights``: what `resolve_weights` gave for ``config`` (loaded once per fit).
    """
    run_config = with_worker_threads(config, beam_args)  # the manifest keeps the config as given
    if run_config.num_threads:
        say(f"fit: {run_config.num_threads} torch/faiss thread(s) per worker")
    check_preprocessing(weights, config.mean, config.std)
    check_spec(images)
    if append:
        if not storage.exists(storage.join(gallery_url, MANIFEST)):
            raise GalleryMissing(f"--append needs an existing gallery at {gallery_url}; run `spade fit` without --append first")
        check_compatible(read_manifest(gallery_url), gallery_url, config)
    say(f"fit: inputs {images} (listed by the workers) -> gallery {gallery_url}")
    run_id = run_id or new_run_id(utc_now())
    staging = storage.join(gallery_url, f"_staging-{run_id}")
    if lease is not None:
        for gone in storage.remove_stale_staging(gallery_url, staging_is_live):
            say(f"fit: cleaned up after an interrupted run ({gone})")
        lease.mark(staging)
    started = time.monotonic()
    features = stable_hash({"features": config.feature_signature(), "weights": weights.sha256, "dtype": config.feature_dtype})
    try:
        with ProgressReporter("fit", say) as progress:
            metrics = run_pipeline(lambda p: build_fit_pipeline(p, images, run_config, staging, gallery_url, features,
                                                                progress.folder, known_gallery=gallery_url if append else None),
                                   beam_args, progress)
    except BaseException:
        storage.remove(staging, recursive=True)
        raise
    counts = read_summary(storage.join(staging, SUMMARY))
    say(f"fit: features of {counts['ok']} inputs extracted in {time.monotonic() - started:.1f}s"
        + (f" ({counts['skipped']} already in the gallery)" if append else ""))
    for _, message in counts["error_messages"]:
        say(f"fit: rejected {message}")
    say(metrics_line("fit", metrics))
    return staging, run_id, counts, metrics


def run_fit(config: SpadeConfig, images: str, gallery_url: str, beam_args: list[str] | None = None,
            say: Callable[[str], None] = LOG.info, append: bool = False) -> dict:
    """Fit a gallery from normal images (or add images to one); returns its manifest.

    The run holds the gallery folder's lease throughout (a second fit into it stops with `LeaseHeld`). The
    manifest is written last, with the calibrated thresholds and every file's size and sha256: a fit killed
    at any point leaves no manifest, so no half-built or uncalibrated gallery looks usable.
    """
    refuse_local_paths(beam_args, images=images, gallery=gallery_url)  # before the lease creates the folder
    run_id = new_run_id(utc_now())
    with RunLease(gallery_url, run_id, "spade fit") as lease:
        return _fit_under_lease(config, images, gallery_url, beam_args, say, append, run_id, lease)


def fit_frame(config: SpadeConfig, images: str, gallery_url: str, append: bool,
              say: Callable[[str], None] = LOG.info) -> SpadeConfig:
    """``config`` with its frame size fixed: an ``aspect`` or ``tiles`` framing without ``frame_size`` gets the one
    of the gallery it appends to, or one from the median aspect of up to 64 of the images' headers (a bounded
    sample, whatever the archive's size); other framings are returned unchanged."""
    if not config.frame_from_gallery or config.frame_size is not None:
        return config
    if append:
        return with_gallery_frame(config, read_manifest(gallery_url))
    sizes = sample_image_sizes(images, "train")
    if not sizes:
        raise FileNotFoundError(f"--images {images!r}: no readable image to fix the frame size from")
    config = config.replace(frame_size=frame_size_for(sizes, config.resize))
    framing = framing_for(config)
    say(f"fit: frame {framing.size[0]}x{framing.size[1]} (height x width; the median aspect of {len(sizes)} images), "
        f"framing {config.framing}: {len(framing.tiles)} tile(s) of {framing.tile_size[0]}x{framing.tile_size[1]}")
    return config


def _fit_under_lease(config: SpadeConfig, images: str, gallery_url: str, beam_args: list[str] | None,
                     say: Callable[[str], None], append: bool, run_id: str, lease: RunLease) -> dict:
    config = fit_frame(config, images, gallery_url, append, say)
    run_config = with_worker_threads(config, beam_args)
    weights = resolve_weights(config.backbone, config.weights)
    embeddings_folder = storage.join(gallery_url, "embeddings")
    rejected_folder = storage.join(gallery_url, "rejected")
    staging, run_id, counts, _ = launch_fit(config, images, gallery_url, weights, beam_args, say, append, run_id, lease)
    if counts["rows"] == 0:
        storage.remove(staging, recursive=True)
        if not append:
            raise FileNotFoundError(f"--images {images!r} matches no files")
        say(f"fit --append: nothing new: {counts['skipped']} inputs already in the gallery")
    lease.check()
    manifest_url = storage.join(gallery_url, MANIFEST)
    rejected = counts["errors"]
    if storage.exists(manifest_url):
        rejected += read_manifest(gallery_url).get("rejected_inputs", 0) if append else 0
        storage.remove(manifest_url)
    tag = run_id if append else None
    storage.publish_staged(storage.join(staging, "embeddings"), embeddings_folder, tag=tag, replace=not append)
    storage.publish_staged(storage.join(staging, "rejected"), rejected_folder, tag=tag, replace=not append)
    storage.remove(staging, recursive=True)
    manifest = build_gallery(storage.list_files(embeddings_folder, ".parquet"), gallery_url, config, weights.source,
                             weights.sha256, progress=say)
    manifest["rejected_inputs"] = rejected
    warning = k_warning(config.k, manifest["num_images"])
    if warning:
        LOG.warning("fit: %s", warning)
    gallery = Gallery.open(gallery_url, manifest=manifest)
    say(f"fit: calibrating thresholds on up to {config.calibration_images} normal images (leave-one-out)")
    normal = leave_one_out_scores(gallery, run_config, config.calibration_images, progress=say)
    manifest["calibration"], manifest["thresholds"] = calibrate(normal, config)
    if not manifest["thresholds"]:
        LOG.warning("WARNING: fit: no thresholds calibrated (calibration needs 2+ normal images, the gallery has %d): "
                    "scoring against %s will flag nothing and write no masks unless the config or `spade score "
                    "--thresholds` gives thresholds.", manifest["num_images"], gallery_url)
    write_manifest(gallery_url, manifest)  # last: the gallery is usable only once it is complete and calibrated
    remove_unlisted_pyramid_shards(gallery_url, manifest)
    say(f"fit: gallery of {manifest['num_images']} images ({rejected} rejected) written to {gallery_url} "
        f"(hash {manifest['gallery_hash']}); thresholds {manifest['thresholds'] or 'none (need 2+ images)'}")
    return manifest
