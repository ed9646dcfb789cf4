"""`spade fit`: normal images → embeddings Parquet → gallery (faiss index + pyramid files + manifest).

``--append`` extracts only the new images and rebuilds the gallery from all
embedding shards, old and new, so old images are never extracted again.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import apache_beam as beam

from spade.io import storage
from spade.scoring.calibration import leave_one_out_scores, thresholds_from_normals
from spade.config import SpadeConfig
from spade.index.gallery import MANIFEST, Gallery, GalleryMissing, build_gallery, write_manifest
from spade.io.sources import expand_images
from spade.io.tables import ERRORS_SCHEMA, embeddings_schema
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.read import ReadImages, input_batches
from transforms.records import embedding_row, new_run_id, utc_now
from pipelines.options import with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")


def build_fit_pipeline(pipeline: beam.Pipeline, uris: list[str], config: SpadeConfig, staging_url: str,
                       progress_folder: str | None = None):
    """The fit graph; its single final PCollection lists the files written (one sink step, Dask-friendly)."""
    images, read_errors = pipeline | "Inputs" >> beam.Create(input_batches(uris, config.batch_size)) | "Read" >> ReadImages(config)
    features, extract_errors = images | "Extract" >> ExtractFeatures(config)
    dtype = config.feature_dtype
    embeddings = (features
                  | "ToRows" >> beam.FlatMap(lambda batch: [embedding_row(item, dtype) for item in batch])
                  | "CountImages" >> beam.ParDo(CountProgress(progress_folder))
                  | "WriteEmbeddings" >> WriteParquetShards(storage.join(staging_url, "embeddings", "part"),
                                                            embeddings_schema(config.layers), config.shards))
    rejected = ((read_errors, extract_errors)
                | "Errors" >> beam.Flatten()
                | "CountErrors" >> beam.ParDo(CountProgress(progress_folder))
                | "WriteRejected" >> WriteParquetShards(storage.join(staging_url, "rejected", "part"), ERRORS_SCHEMA, 1))
    return (embeddings, rejected) | "Written" >> beam.Flatten()


def _known_uris(gallery_url: str, config: SpadeConfig) -> set[str]:
    """URIs already in the gallery being appended to (after checking it has the same features)."""
    gallery = Gallery.open(gallery_url)
    gallery.check_compatible(config)
    return set(gallery.images.column("uri").to_pylist())


def run_fit(config: SpadeConfig, images: str, gallery_url: str, beam_args: list[str] | None = None,
            say: Callable[[str], None] = LOG.info, append: bool = False) -> dict:
    """Fit a gallery from normal images (or add images to one); returns its manifest."""
    run_config = with_worker_threads(config, beam_args)  # the manifest keeps the config as given
    if run_config.num_threads:
        say(f"fit: {run_config.num_threads} torch/faiss thread(s) per worker")
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    uris = expand_images(images, split="train")
    embeddings_folder = storage.join(gallery_url, "embeddings")
    rejected_folder = storage.join(gallery_url, "rejected")
    if append:
        if not storage.exists(storage.join(gallery_url, MANIFEST)):
            raise GalleryMissing(f"--append needs an existing gallery at {gallery_url}; run `spade fit` without --append first")
        known = _known_uris(gallery_url, config)
        new = [u for u in uris if u not in known]
        say(f"fit --append: {len(uris) - len(new)} of {len(uris)} inputs already in the gallery")
        uris = new
    say(f"fit: {len(uris)} inputs from {images} -> gallery {gallery_url}")
    run_id = new_run_id(utc_now())
    staging = storage.join(gallery_url, f"_staging-{run_id}")
    storage.remove_stale_staging(gallery_url)
    metrics: dict = {}
    if uris:
        started = time.monotonic()
        with ProgressReporter("fit", len(uris), say) as progress:
            metrics = run_pipeline(lambda p: build_fit_pipeline(p, uris, run_config, staging, progress.folder), beam_args)
        say(f"fit: features of {len(uris)} inputs extracted in {time.monotonic() - started:.1f}s")
        say(metrics_line("fit", metrics))
    manifest_url = storage.join(gallery_url, MANIFEST)
    if storage.exists(manifest_url):
        storage.remove(manifest_url)
    tag = run_id if append else None
    storage.publish_staged(storage.join(staging, "embeddings"), embeddings_folder, tag=tag, replace=not append)
    storage.publish_staged(storage.join(staging, "rejected"), rejected_folder, tag=tag, replace=not append)
    storage.remove(staging, recursive=True)
    rejected = storage.read_parquet(storage.list_files(rejected_folder, ".parquet")).to_pylist()
    for row in rejected:
        say(f"fit: rejected {row['error']}")
    manifest = build_gallery(storage.list_files(embeddings_folder, ".parquet"), gallery_url, config, weights.source,
                             weights.sha256, progress=say)
    manifest["rejected_inputs"] = len(rejected)
    write_manifest(gallery_url, manifest)
    gallery = Gallery.open(gallery_url)
    image_scores, pixel_maps = leave_one_out_scores(gallery, run_config, config.calibration_images, progress=say)
    manifest["thresholds"] = thresholds_from_normals(image_scores, pixel_maps, config.calibration_fpr)
    write_manifest(gallery_url, manifest)
    say(f"fit: gallery of {manifest['num_images']} images ({len(rejected)} rejected) written to {gallery_url} "
        f"(hash {manifest['gallery_hash']}); thresholds {manifest['thresholds'] or 'none (need 2+ images)'}")
    return manifest
