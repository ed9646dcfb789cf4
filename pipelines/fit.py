"""`spade fit`: normal images → embeddings Parquet → gallery (faiss index + pyramid files + manifest).

``--append`` extracts only the new images and rebuilds the gallery from all
embedding shards, old and new, so old images are never extracted again.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import apache_beam as beam

from spade.io import publication, storage
from spade.scoring.calibration import calibrate, leave_one_out_scores
from spade.scoring.image_score import SELECTED_MODES
from spade.scoring.term_selection import synthetic_scores
from spade.config import SPEED_ONLY, SpadeConfig, stable_hash
from spade.index.gallery import (MANIFEST, Gallery, GalleryMissing, build_gallery, check_compatible, read_manifest,
                                 remove_unlisted_pyramid_shards, with_gallery_settings, write_manifest)
from spade.features.framing import frame_size_for, framing_for
from spade.io.images import BRIGHT_GALLERY
from spade.io.listing import SAMPLE_READS, SIZE_SAMPLE, check_spec, fix_brightness, sample_image_sizes
from spade.io.routing import Route, RoutePlan, is_routing, plan_routes
from spade.io.ledger import discard_others, done_kind, done_uris, earlier_parts, ledger_url
from spade.io.lease import RunLease, staging_is_live
from spade.index.knn import k_warning
from spade.io.tables import ERRORS_SCHEMA, embeddings_schema, fit_rows_schema
from spade.features.resolved import ResolvedWeights
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import CommitUnits, ReadCommittedRows, WriteParquetShards
from transforms.progress import CountProgress
from transforms.inputs import ListInputs
from transforms.read import ReadImages
from transforms.pyramid import PyramidTarget, WritePyramidShards
from transforms.records import new_run_id, utc_now
from transforms.summary import SUMMARY, WriteSummary, read_summary
from pipelines.options import refuse_local_paths, with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")


@dataclass
class FitJob:
    """One gallery's share of a fit run, as the launcher checked and planned it (`plan_fit_job`): the pipeline
    extracts the images of every job in one branch (`FitGalleries`); `finish_fit_job` builds and calibrates each
    gallery. A fit routed to many galleries (`spade.io.routing`) is one job per route."""

    route: str
    images: str
    gallery_url: str
    config: SpadeConfig  # with the frame size fixed
    run_config: SpadeConfig  # ... with this run's worker threads
    weights: ResolvedWeights
    append: bool
    run_id: str
    lease: RunLease | None = None
    ledger: str = ""  # units of work committed as they finish: a killed fit resumes from them
    resuming: bool = True  # whether an interrupted fit left that ledger (set under the lease)

    @property
    def staging(self) -> str:
        """This run's scratch folder (summary, owner record); its tables' files go straight into their folders."""
        return storage.join(self.gallery_url, f"{publication.SCRATCH_PREFIX}{self.run_id}")

    def table(self, name: str) -> str:
        """The folder of one of the gallery's tables (embeddings, rejected)."""
        return storage.join(self.gallery_url, name)

    @property
    def features_tag(self) -> str:
        return stable_hash({"features": self.config.feature_signature(), "weights": self.weights.sha256,
                            "dtype": self.config.feature_dtype})

    @property
    def prefix(self) -> str:
        return f"fit: {self.route}: " if self.route else "fit: "


def plan_fit_job(config: SpadeConfig, route: Route, append: bool, beam_args: list[str] | None,
                 say: Callable[[str], None], run_id: str) -> FitJob:
    """The launcher's checks of one gallery's fit: the frame size and brightness (bounded samples), the weights and
    their preprocessing, the images spec, and for ``--append`` the gallery it adds to. Nothing grows with the inputs."""
    config = fit_settings(config, route.images, route.gallery, append, say)
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    check_spec(route.images)
    if append:
        if not storage.exists(storage.join(route.gallery, MANIFEST)):
            raise GalleryMissing(f"--append needs an existing gallery at {route.gallery}; run `spade fit` without "
                                 "--append first")
        check_compatible(read_manifest(route.gallery), route.gallery, config)
    return FitJob(route.name, route.images, route.gallery, config, with_worker_threads(config, beam_args), weights,
                  append, run_id)


TABLES = ("embeddings", "rejected")


def discard_fit(job: FitJob) -> None:
    """Remove what a fit that will not publish wrote into its gallery's tables (its pyramid shards stay until the next
    fit's manifest leaves them out)."""
    storage.remove(job.staging, recursive=True)
    for name in TABLES:
        publication.discard(job.table(name), job.run_id)


def fit_ledger_signature(job: FitJob) -> str:
    """What must match for a fit to resume another's ledger: the features (backbone, weights, framing, dtype), the
    inputs asked for and whether they are appended (not the settings that change only speed or file layout)."""
    settings = {k: v for k, v in job.config.to_dict().items()
                if k not in SPEED_ONLY}
    return stable_hash({"features": job.features_tag, "config": settings, "images": job.images, "append": job.append})


def begin_fit_job(job: FitJob, lease: RunLease, say: Callable[[str], None]) -> None:
    """Under the gallery's lease: what dead runs left removed (and a ledger the last manifest consumed), this run's
    ledger found or started, its scratch folder marked live."""
    job.lease = lease
    say(f"{job.prefix}inputs {job.images} (listed by the workers) -> gallery {job.gallery_url}")
    gone = publication.remove_dead_scratch(job.gallery_url, staging_is_live)
    for name in TABLES:
        publication.adopt(job.table(name), job.run_id)
        gone += publication.tidy(job.table(name), staging_is_live)
    consumed = _consumed_ledger(job.gallery_url)
    if consumed and storage.exists(consumed):
        storage.remove(consumed, recursive=True)
        gone.append(consumed)
    job.ledger = ledger_url(job.gallery_url, fit_ledger_signature(job))
    gone += discard_others(job.gallery_url, job.ledger)
    for url in gone:
        say(f"{job.prefix}cleaned up after an interrupted run ({url})")
    job.resuming = storage.exists(job.ledger)
    if job.resuming:
        say(f"{job.prefix}resuming: the images an interrupted fit committed ({job.ledger}) are not extracted again")
    lease.mark(job.staging)


def _consumed_ledger(gallery_url: str) -> str | None:
    """The ledger the gallery's manifest was built from (removed right after it was written; a fit killed in between
    leaves it, and it must not be resumed: its rows are in the gallery)."""
    try:
        name = read_manifest(gallery_url).get("fit_ledger")
    except GalleryMissing:
        return None
    return storage.join(gallery_url, name) if name else None


def _done_tables(done: dict[str, tuple[str | None, str]], run_id: str, route: str) -> list[str]:
    """(On a worker.) What a route's fit leaves out: the embeddings tables of the gallery it appends to, and the
    units an interrupted fit committed to its ledger."""
    known, ledger = done[route]
    return ((publication.table_files(storage.join(known, "embeddings")) if known else [])
            + earlier_parts(ledger, run_id))


def _is_rejected(row: dict) -> bool:
    return row.get("status") == "error"


class FitGalleries(beam.PTransform):
    """PBegin → the files the fit of every `FitJob` wrote; its single final PCollection lists them (one sink step,
    Dask-friendly), in one branch whatever the number of galleries (elements keyed by route).

    The graph holds the ``--images`` specs, not the inputs: workers list them (`ListInputs`); for ``--append`` they
    leave out the URIs already in the gallery's embeddings tables. Workers write each batch's pyramid shards straight
    into its gallery (named by the job's features tag and the batch's image ids); only small embedding rows reach
    the sink. Each unit of work's rows (accepted and rejected) are committed to the job's ledger as soon as they are
    all in; inputs an interrupted fit committed are left out, and its rows (pointing at the pyramid shards it wrote)
    join this run's. Each job's counts go to its staging folder's summary.json."""

    def __init__(self, jobs: list[FitJob], progress_folder: str | None):
        super().__init__()
        self.jobs, self.progress_folder = jobs, progress_folder

    def expand(self, pbegin):
        jobs, progress_folder = {job.route: job for job in self.jobs}, self.progress_folder
        config = self.jobs[0].run_config  # what all jobs share: layers, batch size, shards
        run_id = self.jobs[0].run_id
        # a fit that neither appends nor resumes (known under the leases) has nothing to leave out or to join: the
        # graph leaves those branches out, as a first score run's does
        resuming = any(job.resuming for job in self.jobs)
        done = {route: (job.gallery_url if job.append else None, job.ledger) for route, job in jobs.items()}
        leave_out = resuming or any(job.append for job in self.jobs)
        batches, skipped = pbegin | "Inputs" >> ListInputs(
            {route: job.images for route, job in jobs.items()}, "train", config.batch_size,
            done_tables=functools.partial(_done_tables, done, run_id) if leave_out else None, read_done=done_uris,
            progress_folder=progress_folder, done_kind=done_kind)
        configs = {route: job.run_config for route, job in jobs.items()}
        images_in, read_errors = batches | "Read" >> ReadImages(configs)
        features, extract_errors = images_in | "Extract" >> ExtractFeatures(configs)
        targets = {route: PyramidTarget(job.gallery_url, tuple(job.config.layers), job.config.feature_dtype,
                                        job.features_tag) for route, job in jobs.items()}
        ledgers, ledger_rows = {route: job.ledger for route, job in jobs.items()}, fit_rows_schema(config.layers)
        extracted = (features
                     | "WritePyramids" >> beam.ParDo(WritePyramidShards(targets))
                     | "ToRows" >> beam.FlatMap(lambda batch: batch)
                     | "CountImages" >> beam.ParDo(CountProgress(progress_folder))
                     | "CommitImages" >> beam.ParDo(CommitUnits(ledgers, ledger_rows, run_id)))
        committed = pbegin | "Committed" >> ReadCommittedRows(ledgers, run_id) if resuming else None
        rows = extracted if committed is None else (
            (extracted, committed | "ResumedImages" >> beam.Filter(lambda row: not _is_rejected(row))) | "Images" >> beam.Flatten())
        staged = lambda name: {route: publication.run_file_prefix(job.table(name), job.run_id)  # noqa: E731
                               for route, job in jobs.items()}
        embeddings = rows | "WriteEmbeddings" >> WriteParquetShards(staged("embeddings"), embeddings_schema(config.layers),
                                                                    config.shards, rows_per_shard=config.rows_per_shard)
        resumed_errors = () if committed is None else (committed | "ResumedErrors" >> beam.Filter(_is_rejected),)
        errors = ((read_errors, extract_errors, *resumed_errors)
                  | "Errors" >> beam.Flatten()
                  | "CountErrors" >> beam.ParDo(CountProgress(progress_folder))
                  | "CommitErrors" >> beam.ParDo(CommitUnits(ledgers, ledger_rows, run_id)))
        rejected = errors | "WriteRejected" >> WriteParquetShards(staged("rejected"), ERRORS_SCHEMA, config.shards,
                                                                     rows_per_shard=config.rows_per_shard)
        summary = ((rows, errors), skipped) | "Summary" >> WriteSummary(
            {route: storage.join(job.staging, SUMMARY) for route, job in jobs.items()})
        return (embeddings, rejected, summary) | "Written" >> beam.Flatten()


def run_fit_jobs(jobs: list[FitJob], beam_args: list[str] | None, say: Callable[[str], None]) -> tuple[dict, dict]:
    """Run one pipeline extracting every job's images into its staging folder; returns ({route: summary counts},
    Beam metrics). A failed or interrupted pipeline removes the staging folders."""
    if jobs and jobs[0].run_config.num_threads:
        say(f"fit: {jobs[0].run_config.num_threads} torch/faiss thread(s) per worker")
    started = time.monotonic()
    try:
        with ProgressReporter("fit", say) as progress:
            metrics = run_pipeline(lambda pipeline: pipeline | "Fit" >> FitGalleries(jobs, progress.folder), beam_args,
                                   progress)
    except BaseException:
        for job in jobs:
            discard_fit(job)
        raise
    counts = {job.route: read_summary(storage.join(job.staging, SUMMARY)) for job in jobs}
    for job in jobs:
        found = counts[job.route]
        say(f"{job.prefix}features of {found['ok']} inputs extracted in {time.monotonic() - started:.1f}s"
            + (f" ({found['skipped']} already in the gallery)" if job.append else "")
            + (f"; {found['resumed']} of them committed by an interrupted fit" if found.get("resumed") else ""))
        for _, message in found["error_messages"]:
            say(f"{job.prefix}rejected {message}")
    say(metrics_line("fit", metrics))
    return counts, metrics


def run_fit(config: SpadeConfig, images: str, gallery_url: str, beam_args: list[str] | None = None,
            say: Callable[[str], None] = LOG.info, append: bool = False) -> dict:
    """Fit a gallery from normal images (or add images to one); returns its manifest. With ``gallery_url`` a routing
    rule (a template with ``{fields}`` or a routes table, `spade.io.routing`), fit one gallery per route in one
    pipeline and return {route: manifest}; folders no rule routes are named and left out.

    Each run holds its gallery folder's lease throughout (a second fit into it stops with `LeaseHeld`). The
    manifest is written last, with the calibrated thresholds and every file's size and sha256: a fit killed
    at any point leaves no manifest, so no half-built or uncalibrated gallery looks usable.
    """
    refuse_local_paths(beam_args, images=images, gallery=gallery_url)  # before the lease creates the folder
    run_id = new_run_id(utc_now())
    routed = is_routing(gallery_url)
    if routed:
        plan = plan_routes(images, gallery_url)
        say(f"fit: {len(plan.routes)} gallery route(s) of {images} by {gallery_url}")
        for spec in plan.unrouted:
            LOG.warning("fit: not fitted: %s (no routing rule of %s matches its folder)", spec, gallery_url)
        if not plan.routes:
            raise FileNotFoundError(f"--images {images!r}: no folder matches the routing rule(s) of {gallery_url}")
    else:
        plan = RoutePlan([Route("", images, gallery_url)])
    jobs = [plan_fit_job(config, route, append, beam_args, say, run_id) for route in plan.routes]
    with contextlib.ExitStack() as leases:
        for job in jobs:
            begin_fit_job(job, leases.enter_context(RunLease(job.gallery_url, run_id, "spade fit")), say)
        counts, _ = run_fit_jobs(jobs, beam_args, say)
        manifests = {job.route: finish_fit_job(job, counts[job.route], say, routed) for job in jobs}
    return manifests if routed else manifests[""]


def fit_settings(config: SpadeConfig, images: str, gallery_url: str, append: bool,
                 say: Callable[[str], None] = LOG.info) -> SpadeConfig:
    """``config`` with what it leaves to the gallery fixed (`with_gallery_settings`): the gallery's own for
    ``--append``, else from a bounded sample of the images, whatever the archive's size (`fit_frame`,
    `fit_brightness`)."""
    if append:
        exists = storage.exists(storage.join(gallery_url, MANIFEST))  # none: `plan_fit_job` says so
        return with_gallery_settings(config, read_manifest(gallery_url)) if exists else config
    return fit_brightness(fit_frame(config, images, say), images, say)


def fit_brightness(config: SpadeConfig, images: str, say: Callable[[str], None] = LOG.info) -> SpadeConfig:
    """``brightness: auto`` fixed from up to 16 of the images (`spade.io.images.brightness_for`); a set value is
    kept."""
    fixed, levels = fix_brightness(config, images)
    if levels:
        say(f"fit: brightness {fixed.brightness} (frames' median intensity {statistics.median(levels):.2f} of "
            f"{len(levels)} images; above {BRIGHT_GALLERY} each frame is moved to ImageNet's mean)")
    return fixed


def fit_frame(config: SpadeConfig, images: str, say: Callable[[str], None] = LOG.info) -> SpadeConfig:
    """``config`` with its frame size fixed: an ``aspect`` or ``tiles`` framing without ``frame_size`` gets one from
    the median aspect of up to 64 of the images' headers; other framings are returned unchanged."""
    if not config.frame_from_gallery or config.frame_size is not None:
        return config
    sizes = sample_image_sizes(images, "train")
    if not sizes:
        raise FileNotFoundError(f"--images {images!r}: no readable image among the first {SAMPLE_READS * SIZE_SAMPLE} "
                                "inputs to fix the frame size from; remove the unreadable files or set `frame_size`")
    config = config.replace(frame_size=frame_size_for(sizes, config.resize))
    framing = framing_for(config)
    say(f"fit: frame {framing.size[0]}x{framing.size[1]} (height x width; the median aspect of {len(sizes)} images), "
        f"framing {config.framing}: {len(framing.tiles)} tile(s) of {framing.tile_size[0]}x{framing.tile_size[1]}")
    return config


def finish_fit_job(job: FitJob, counts: dict, say: Callable[[str], None], routed: bool = False) -> dict | None:
    """Publish a job's embeddings, build its gallery and calibrate it, the manifest written last; returns the manifest
    (None for a route with no input at all, which leaves its gallery as it was)."""
    config, gallery_url, append = job.config, job.gallery_url, job.append
    embeddings_folder = storage.join(gallery_url, "embeddings")
    rejected_folder = storage.join(gallery_url, "rejected")
    if counts["rows"] == 0:
        discard_fit(job)
        if not append and not routed:
            raise FileNotFoundError(f"--images {job.images!r} matches no files")
        say(f"{job.prefix}nothing new: {counts['skipped']} inputs already in the gallery")
        return read_manifest(gallery_url) if append else None
    job.lease.check()
    manifest_url = storage.join(gallery_url, MANIFEST)
    rejected = counts["errors"]
    if storage.exists(manifest_url):
        rejected += read_manifest(gallery_url).get("rejected_inputs", 0) if append else 0
        storage.remove(manifest_url)
    for folder in (embeddings_folder, rejected_folder):
        publication.commit(folder, publication.run_files(folder, job.run_id), job.run_id, replace=not append)
    storage.remove(job.staging, recursive=True)
    manifest = build_gallery(publication.table_files(embeddings_folder), gallery_url, config, job.weights.source,
                             job.weights.sha256, progress=say)
    manifest["rejected_inputs"] = rejected
    warning = k_warning(config.k, manifest["num_images"])
    if warning:
        LOG.warning("%s%s", job.prefix, warning)
    gallery = Gallery.open(gallery_url, manifest=manifest)
    say(f"{job.prefix}calibrating thresholds on up to {config.calibration_images} normal images (leave-one-out)")
    normal = leave_one_out_scores(gallery, job.run_config, config.calibration_images, progress=say)
    synthetic = None
    if config.image_score in SELECTED_MODES:
        say(f"{job.prefix}selecting image-score terms on up to {config.synthetic_defects} gallery images with a "
            "synthetic defect (leave-one-out)")
        synthetic = synthetic_scores(gallery, job.run_config, normal.maps, config.synthetic_defects, storage.read_bytes,
                                     progress=say, weights=job.weights)
    manifest["calibration"], manifest["thresholds"] = calibrate(normal, config, synthetic)
    if not manifest["thresholds"]:
        LOG.warning("WARNING: fit: no thresholds calibrated (calibration needs 2+ normal images, the gallery has %d): "
                    "scoring against %s will flag nothing and write no masks unless the config or `spade score "
                    "--thresholds` gives thresholds.", manifest["num_images"], gallery_url)
    manifest["fit_ledger"] = job.ledger.rstrip("/").rsplit("/", 1)[-1]  # consumed: removed now, or by the next fit
    write_manifest(gallery_url, manifest)  # last: the gallery is usable only once it is complete and calibrated
    storage.remove(job.ledger, recursive=True)
    remove_unlisted_pyramid_shards(gallery_url, manifest)
    say(f"{job.prefix}gallery of {manifest['num_images']} images ({rejected} rejected) written to {gallery_url} "
        f"(hash {manifest['gallery_hash']}); thresholds {manifest['thresholds'] or 'none (need 2+ images)'}")
    return manifest
