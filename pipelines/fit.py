"""`spade fit`: normal images → embeddings Parquet → gallery (faiss index + pyramid files + manifest)."""
from __future__ import annotations

import logging
import time
from typing import Callable

import apache_beam as beam

from spade import storage
from spade.calibration import leave_one_out_scores, thresholds_from_normals
from spade.config import SpadeConfig
from spade.gallery import MANIFEST, Gallery, build_gallery, write_manifest
from spade.sources import expand_images
from spade.tables import ERRORS_SCHEMA, embeddings_schema
from spade.weights import resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import WriteParquetShards
from transforms.progress import CountProgress
from transforms.read import ReadImages, input_batches
from transforms.records import embedding_row
from pipelines.options import beam_options
from pipelines.progress import ProgressReporter

LOG = logging.getLogger("spade")


def build_fit_pipeline(pipeline: beam.Pipeline, uris: list[str], config: SpadeConfig, gallery_url: str,
                       progress_folder: str | None = None):
    """The fit graph; its single final PCollection lists the files written (one sink step, Dask-friendly)."""
    images, read_errors = pipeline | "Inputs" >> beam.Create(input_batches(uris, config.batch_size)) | "Read" >> ReadImages(config)
    features, extract_errors = images | "Extract" >> ExtractFeatures(config)
    dtype = config.feature_dtype
    embeddings = (features
                  | "ToRows" >> beam.FlatMap(lambda batch: [embedding_row(item, dtype) for item in batch])
                  | "CountImages" >> beam.ParDo(CountProgress(progress_folder))
                  | "WriteEmbeddings" >> WriteParquetShards(storage.join(gallery_url, "embeddings", "part"),
                                                            embeddings_schema(config.layers), config.shards))
    rejected = ((read_errors, extract_errors)
                | "Errors" >> beam.Flatten()
                | "CountErrors" >> beam.ParDo(CountProgress(progress_folder))
                | "WriteRejected" >> WriteParquetShards(storage.join(gallery_url, "rejected", "part"), ERRORS_SCHEMA, 1))
    return (embeddings, rejected) | "Written" >> beam.Flatten()


def run_fit(config: SpadeConfig, images: str, gallery_url: str, beam_args: list[str] | None = None,
            say: Callable[[str], None] = LOG.info) -> dict:
    """Fit a gallery from normal images; returns its manifest."""
    weights = resolve_weights(config.backbone, config.weights)
    uris = expand_images(images, split="train")
    say(f"fit: {len(uris)} inputs from {images} -> gallery {gallery_url}")
    manifest_url = storage.join(gallery_url, MANIFEST)
    if storage.exists(manifest_url):
        fs, path = storage.filesystem(manifest_url)
        fs.rm(path)
    started = time.monotonic()
    with ProgressReporter("fit", len(uris), say) as progress, beam.Pipeline(options=beam_options(beam_args)) as pipeline:
        build_fit_pipeline(pipeline, uris, config, gallery_url, progress.folder)
    say(f"fit: features of {len(uris)} inputs extracted in {time.monotonic() - started:.1f}s")
    shards = storage.list_files(storage.join(gallery_url, "embeddings"), f"-of-{config.shards:05d}.parquet")
    rejected = storage.read_parquet(storage.list_files(storage.join(gallery_url, "rejected"), ".parquet"))
    for row in rejected.to_pylist():
        say(f"fit: rejected {row['error']}")
    manifest = build_gallery(shards, gallery_url, config, weights.source, weights.sha256, progress=say)
    manifest["rejected_inputs"] = rejected.num_rows
    write_manifest(gallery_url, manifest)
    gallery = Gallery.open(gallery_url)
    image_scores, pixel_maps = leave_one_out_scores(gallery, config, config.calibration_images, progress=say)
    manifest["thresholds"] = thresholds_from_normals(image_scores, pixel_maps, config.calibration_fpr)
    write_manifest(gallery_url, manifest)
    say(f"fit: gallery of {manifest['num_images']} images ({rejected.num_rows} rejected) written to {gallery_url} "
        f"(hash {manifest['gallery_hash']}); thresholds {manifest['thresholds'] or 'none (need 2+ images)'}")
    return manifest
