"""`spade score`: test images → features → kNN + correspondence → score table (Parquet) + map/mask PNGs.

Two ways to run it:
- one-off (default): everything under --out is this run's; a re-run replaces it with the same content;
- nightly (--date): --out holds partitions gallery=<hash>/date=<day>/; only images not yet scored
  with this gallery are scored, so re-running a night is a no-op.

Either way a run holds a lease on what it writes (a second run stops with `LeaseHeld`), commits finished
units of work to a ledger as it goes (`spade.io.ledger`), and publishes its table with one commit
(`spade.io.publication`), so a killed run is resumed by running the same command again, with one row per input.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import datetime
from typing import Callable

import apache_beam as beam

from spade.io import publication, storage
from spade.config import SPEED_ONLY, SpadeConfig, stable_hash
from spade.index.gallery import (GalleryDamaged, GalleryMissing, check_compatible, check_files, read_manifest,
                                 with_gallery_settings)
from spade.io.lease import RunLease, staging_is_live
from spade.io.ledger import discard_others, done_kind, done_uris, earlier_parts, ledger_url
from spade.io.listing import check_spec, names_one_image
from spade.io.results import RUN_INFO, read_score_table, scored_tables
from spade.io.routing import Route, RoutePlan, is_routing, plan_routes
from spade.index import fused_nearest
from spade.index.knn import k_warning
from spade.scoring.calibration import check_calibrated_with, normal_reference
from spade.scoring.image_score import require_normals
from spade.io.tables import SCORES_SCHEMA
from spade.evaluation.thresholds import validate_thresholds
from spade.features.weights import check_preprocessing, resolve_weights
from transforms.extract import ExtractFeatures
from transforms.parquet import CommitUnits, ReadCommittedRows, WriteParquetShards
from transforms.progress import CountProgress
from transforms.inputs import ListInputs
from transforms.read import ReadImages
from transforms.records import new_run_id, route_of, utc_now
from transforms.score import ScoreImages, ScoreTarget, resolve_thresholds
from transforms.summary import SUMMARY, WriteSummary, read_summary
from transforms.unrouted import ListUnrouted
from pipelines.options import local_workers, refuse_local_paths, scoring_args, with_worker_threads
from pipelines.progress import ProgressReporter
from pipelines.runner import metrics_line, run_pipeline

LOG = logging.getLogger("spade")
UNROUTED = "unrouted"  # below --out of a routed run: the error rows of inputs no route takes


def done_tables(done: dict[str, tuple[str | None, str | None]], run_id: str, route: str) -> list[str]:
    """(Run on a worker.) The tables whose inputs count as done for a route: earlier nights' score tables under its
    done root and the parts other runs committed to its ledger (``done``: {route: (done root, ledger)})."""
    done_root, ledger = done[route]
    return (scored_tables(done_root) if done_root else []) + (earlier_parts(ledger, run_id) if ledger else [])


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
                if k not in SPEED_ONLY}
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


@dataclass
class ScoreJob:
    """One gallery's share of a score run, as the launcher checked and planned it (`plan_job`): the pipeline scores
    its inputs with every other job's in one branch (`ScoreGalleries`, elements keyed by route), under its own lease
    and ledger, and `finish_job` publishes them. A run routed to many galleries (`spade.io.routing`) is one job per
    route."""

    route: str  # the partition folders below the archive root ("" for a single gallery)
    images: str
    gallery_url: str
    config: SpadeConfig  # as given, with the gallery's frame (run.json records it)
    run_config: SpadeConfig  # ... with the worker threads of this run
    manifest: dict
    thresholds: dict  # the thresholds used, with their sources
    explicit: dict | None  # a --thresholds file's
    out_url: str  # this gallery's --out
    run_out: str  # where this run writes: out_url, or its nightly partition
    lease_folder: str
    done_root: str | None  # nightly: the partitions whose scored images are left out
    day: str | None
    since: str | None
    scored_at: datetime
    run_id: str
    ledger: str = ""
    lease: RunLease | None = None
    interrupted: list[str] = field(default_factory=list)
    earlier: bool = True  # whether earlier runs left anything to leave out or to join (set under the lease)

    @property
    def gallery_hash(self) -> str:
        return self.manifest["gallery_hash"]

    @property
    def prefix(self) -> str:
        return f"score: {self.route}: " if self.route else "score: "

    @property
    def scores_folder(self) -> str:
        return storage.join(self.run_out, "scores")

    @property
    def staging(self) -> str:
        """This run's scratch folder (summary, owner record); the table's files go straight into `scores_folder`."""
        return storage.join(self.scores_folder, f"{publication.SCRATCH_PREFIX}{self.run_id}")

    @property
    def table_prefix(self) -> str:
        return publication.run_file_prefix(self.scores_folder, self.run_id)

    @property
    def summary_url(self) -> str:
        return storage.join(self.staging, SUMMARY)


@dataclass(frozen=True)
class Nightly:
    """Nightly mode (`spade score --date/--since/--rescore-all`): ``day``, the partition a run writes to (only inputs
    not yet scored with its gallery are scored); ``since``, only inputs dated that day or later; ``rescore_all``, every
    input scored again (after a gallery changed). The default is a plain run: every input, one output folder."""

    day: str | None = None
    since: str | None = None
    rescore_all: bool = False


@dataclass(frozen=True)
class ScoreRequest:
    """What one `spade score` run asks of every gallery it scores (`plan_job`): the config as given, the Beam
    arguments, the nightly partition, the thresholds of a --thresholds file (``explicit``), and the run's time and
    id, shared by all its rows."""

    config: SpadeConfig
    beam_args: list[str] | None
    nightly: Nightly
    explicit: dict | None
    scored_at: datetime
    run_id: str


def plan_job(request: ScoreRequest, route: Route, out_url: str) -> ScoreJob:
    """The launcher's checks of one gallery (manifest, files, weights, calibration, thresholds) and where its rows
    go; reads the manifest and one size per file, never the archive."""
    config, explicit = request.config, request.explicit
    nightly = request.nightly
    day, rescore_all = nightly.day, nightly.rescore_all
    gallery_url = route.gallery
    manifest = read_manifest(gallery_url)  # the launcher reads the manifest only; workers open the gallery
    config = with_gallery_settings(config, manifest)  # every image framed into the gallery's frame size, its brightness
    run_config = with_worker_threads(config, request.beam_args)  # run.json keeps the config as given
    check_compatible(manifest, gallery_url, config)
    check_files(gallery_url, manifest)  # one size query per file: a damaged gallery stops here, named
    weights = resolve_weights(config.backbone, config.weights)
    check_preprocessing(weights, config.mean, config.std)
    check_compatible(manifest, gallery_url, config, weights.sha256)
    require_normals(config.image_score, manifest.get("calibration"), gallery_url)
    warning = k_warning(config.k, manifest["num_images"])
    if warning:
        LOG.warning("score: %s%s", f"{route.name}: " if route.name else "", warning)
    used_thresholds = resolve_thresholds(config, manifest, explicit)
    check_calibrated_with(manifest, config, used_thresholds, gallery_url)
    warn_missing_thresholds(used_thresholds, gallery_url)
    gallery_hash = manifest["gallery_hash"]
    run_out, done_root, lease_folder = out_url, None, out_url
    if day is not None:
        run_out = nightly_partition(out_url, gallery_hash, day, rescore_all)
        done_root = None if rescore_all else storage.join(out_url, f"gallery={gallery_hash}")
        lease_folder = storage.join(out_url, f"gallery={gallery_hash}")
    return ScoreJob(route.name, route.images, gallery_url, config, run_config, manifest, used_thresholds, explicit,
                    out_url, run_out, lease_folder, done_root, day, nightly.since, request.scored_at, request.run_id)


def begin_job(job: ScoreJob, lease: RunLease, say: Callable[[str], None]) -> None:
    """Under the job's lease: its ledger, the clean-up after interrupted runs, and its staging folder marked live."""
    job.lease = lease
    job.ledger = ledger_url(job.run_out, ledger_signature(job.config, job.gallery_hash, job.images, job.since, job.day,
                                                          job.explicit))
    prefix = job.prefix
    since_note = f", dated {job.since} or later" if job.since else ""
    say(f"{prefix}inputs {job.images}{since_note} (listed by the workers) against gallery {job.gallery_url} "
        f"({job.gallery_hash}) -> {job.run_out}")
    publication.adopt(job.scores_folder, job.run_id)
    job.interrupted = publication.tidy(job.scores_folder, staging_is_live)
    for gone in job.interrupted:
        say(f"{prefix}cleaned up after an interrupted run ({gone})")
    for other in discard_others(job.run_out, job.ledger):
        say(f"{prefix}discarded the ledger of an interrupted run with other settings ({other})")
        job.interrupted.append(other)
    if storage.exists(job.ledger):
        job.interrupted.append(job.ledger)
    job.earlier = job.ledger in job.interrupted or bool(job.done_root and storage.exists(job.done_root))
    lease.mark(job.staging)


class ScoreGalleries(beam.PTransform):
    """PBegin → the files the `ScoreJob`s wrote (their score table shards and summaries), in one branch whatever the
    number of galleries: elements are keyed by route (`spade.io.routing`), each scored against its own gallery.

    Every input ends as exactly one row of its gallery's score table (the one sink, flattened with the summaries'
    files). The graph holds the ``images`` specs, not the inputs: workers list them (`ListInputs`), keep those dated
    ``since`` or later, and leave out those scored ok under a job's done root (nightly mode). Each unit of work's rows
    are committed to its job's ledger as soon as they are all in (`CommitUnits`, one per branch: runners materialise a
    Flatten, which would hold every commit to the end); inputs that other, interrupted runs committed there are left
    out, and their rows join this run's in the table."""

    def __init__(self, jobs: list[ScoreJob], progress_folder: str | None):
        super().__init__()
        self.jobs, self.progress_folder = jobs, progress_folder

    def expand(self, pbegin):
        jobs, progress_folder = {job.route: job for job in self.jobs}, self.progress_folder
        first = self.jobs[0]
        config, run_id = first.run_config, first.run_id  # what all jobs share: batch size, shards, the run
        # a first run (no ledger, no earlier nights: known under the leases) has nothing to leave out or to join: the
        # graph leaves those branches out, a fixed cost of every run (~0.2 s of a 97-image run's 3.5 s)
        earlier = any(job.earlier for job in self.jobs)
        done = (functools.partial(done_tables, {route: (job.done_root, job.ledger) for route, job in jobs.items()}, run_id)
                if earlier else None)
        batches, skipped = pbegin | "Inputs" >> ListInputs(
            {route: job.images for route, job in jobs.items()}, "test", config.batch_size, since=first.since,
            done_tables=done, read_done=done_uris, progress_folder=progress_folder, done_kind=done_kind)
        configs = {route: job.run_config for route, job in jobs.items()}
        images_in, read_errors = batches | "Read" >> ReadImages(configs)
        features, extract_errors = images_in | "Extract" >> ExtractFeatures(configs)
        targets = {route: ScoreTarget(job.run_config, job.gallery_url, job.run_out, job.explicit, stable_hash(job.manifest))
                   for route, job in jobs.items()}
        scored, score_errors = features | "Score" >> ScoreImages(targets, first.scored_at)
        stamps = {route: {"gallery_hash": job.gallery_hash, "scored_at": job.scored_at} for route, job in jobs.items()}
        branches = {"Scored": scored | "CountScored" >> beam.ParDo(CountProgress(progress_folder))}
        for name, errors in (("ReadErrors", read_errors), ("ExtractErrors", extract_errors), ("ScoreErrors", score_errors)):
            branches[name] = (errors
                              | f"Stamp{name}" >> beam.Map(lambda row: {**row, **stamps[route_of(row)]})
                              | f"Count{name}" >> beam.ParDo(CountProgress(progress_folder)))
        ledgers = {route: job.ledger for route, job in jobs.items()}
        branches = {name: rows | f"Commit{name}" >> beam.ParDo(CommitUnits(ledgers, SCORES_SCHEMA, run_id))
                    for name, rows in branches.items()}
        if earlier:
            branches["Committed"] = pbegin | "Committed" >> ReadCommittedRows(ledgers, run_id)
        rows = tuple(branches.values()) | "AllRows" >> beam.Flatten()
        written = rows | "WriteScores" >> WriteParquetShards(
            {route: job.table_prefix for route, job in jobs.items()}, SCORES_SCHEMA, config.shards,
            rows_per_shard=config.rows_per_shard)
        summary = (tuple(branches.values()), skipped) | "Summary" >> WriteSummary(
            {route: job.summary_url for route, job in jobs.items()})
        return (written, summary) | "Written" >> beam.Flatten()


def finish_job(job: ScoreJob, elapsed: float, metrics: dict, say: Callable[[str], None], routed: bool) -> dict:
    """Publish what the pipeline wrote for one job (one commit, under its lease) and say what it did; returns its
    summary. A single-gallery run with no input at all is an error (a mistyped --images); a route may be empty."""
    prefix = job.prefix
    summary = {"rows": 0, "ok": 0, "errors": 0, "skipped": 0, "new": 0, "resumed": 0, "out": job.run_out,
               "scores": job.scores_folder, "maps": storage.join(job.run_out, "maps"),
               "masks": storage.join(job.run_out, "masks"), "seconds": round(elapsed, 1), "metrics": metrics,
               "gallery": job.gallery_url, "gallery_hash": job.gallery_hash}
    counts = read_summary(job.summary_url)
    skipped, resumed = counts["skipped"], counts["resumed"]
    summary |= {"skipped": skipped, "resumed": resumed, "new": counts["rows"] - resumed}
    since_note = f", dated {job.since} or later" if job.since else ""
    if counts["rows"] == 0:
        publication.discard(job.scores_folder, job.run_id)  # its scratch and empty shard
        if not skipped and not job.since and not routed:
            raise FileNotFoundError(f"--images {job.images!r} matches no files")
        say(f"{prefix}nothing to do: 0 new, {skipped} already scored{since_note}")
        return summary
    job.lease.check()
    publication.commit(job.scores_folder, publication.run_files(job.scores_folder, job.run_id), job.run_id,
                       replace=job.day is None, retire=(job.ledger,))
    if job.interrupted:
        orphans = remove_orphan_maps(job.run_out)
        if orphans:
            say(f"{prefix}removed {orphans} score map/mask file(s) of interrupted runs that no row names")
    storage.write_json(storage.join(job.run_out, RUN_INFO), {
        "config": job.config.to_dict(), "gallery": job.gallery_url, "gallery_hash": job.gallery_hash,
        "images": job.images, "route": job.route, "scored_at": job.scored_at.isoformat(),
        "thresholds": job.thresholds, "normal": normal_reference(job.manifest, job.config.image_score),
    })
    for _, message in counts["error_messages"]:
        say(f"{prefix}error {message}")
    if counts["errors"] > len(counts["error_messages"]):
        say(f"{prefix}... and {counts['errors'] - len(counts['error_messages'])} more errors (status=error rows of the table)")
    summary |= {"rows": counts["rows"], "ok": counts["ok"], "errors": counts["errors"],
                "reframed": counts.get("reframed", 0)}
    if summary["reframed"]:
        say(f"{prefix}{summary['reframed']} image(s) of another aspect than the gallery's frame "
            f"({'x'.join(map(str, job.config.frame_size or ()))}) were stretched into it")
    resumed_note = f", {resumed} committed by an interrupted run" if resumed else ""
    rate = "" if routed else f" ({summary['new'] / max(elapsed, 1e-9):.2f} images/s)"
    say(f"{prefix}{summary['ok']} scored, {summary['errors']} errors, {skipped} already scored, {summary['new']} new"
        f"{resumed_note}, in {elapsed:.1f}s{rate}; table {summary['scores']}, score maps {summary['maps']}, "
        f"masks {summary['masks']}")
    return summary


@dataclass
class UnroutedJob:
    """The inputs of a routed run that no route takes (or whose gallery cannot be used), as a table of error rows in
    ``out_url`` (nightly: its ``date=`` partition, replaced by a re-run of the night), under a lease of its own."""

    out_url: str
    specs: list[tuple[str, str]]  # (spec, why its inputs are not scored)
    day: str | None
    scored_at: datetime
    run_id: str
    lease: RunLease | None = None

    @property
    def lease_folder(self) -> str:
        return self.out_url

    @property
    def scores_folder(self) -> str:
        return storage.join(self.out_url, f"date={self.day}", "scores") if self.day else storage.join(self.out_url, "scores")

    @property
    def staging(self) -> str:
        return storage.join(self.scores_folder, f"{publication.SCRATCH_PREFIX}{self.run_id}")

    def begin(self, lease: RunLease) -> None:
        self.lease = lease
        publication.adopt(self.scores_folder, self.run_id)
        publication.tidy(self.scores_folder, staging_is_live)
        lease.mark(self.staging)

    def finish(self, say: Callable[[str], None]) -> int:
        counts = read_summary(storage.join(self.staging, SUMMARY))
        self.lease.check()
        publication.commit(self.scores_folder, publication.run_files(self.scores_folder, self.run_id), self.run_id,
                           replace=True)
        if counts["rows"]:
            say(f"score: {counts['rows']} input(s) not scored, one error row each in {self.scores_folder}")
            for _, message in counts["error_messages"][:5]:
                say(f"score: not routed: {message}")
        return counts["rows"]


class UnroutedRows(beam.PTransform):
    """PBegin → the files an `UnroutedJob` wrote (its error rows' table and summary)."""

    def __init__(self, job: UnroutedJob, progress_folder: str | None):
        super().__init__()
        self.job, self.progress_folder = job, progress_folder

    def expand(self, pbegin):
        scored_at = self.job.scored_at
        rows = (pbegin
                | "List" >> ListUnrouted(self.job.specs)
                | "Stamp" >> beam.Map(lambda row: {**row, "gallery_hash": None, "scored_at": scored_at})
                | "Count" >> beam.ParDo(CountProgress(self.progress_folder)))
        written = rows | "Write" >> WriteParquetShards(
            publication.run_file_prefix(self.job.scores_folder, self.job.run_id), SCORES_SCHEMA, 0)
        summary = (rows, pbegin | "NoneDone" >> beam.Create([])) | "Summary" >> WriteSummary(
            storage.join(self.job.staging, SUMMARY))
        return (written, summary) | "Written" >> beam.Flatten()


def run_score(config: SpadeConfig, gallery_url: str, images: str, out_url: str, beam_args: list[str] | None = None,
              say: Callable[[str], None] = LOG.info, nightly: Nightly = Nightly(),
              thresholds_url: str | None = None) -> dict:
    """Score images against a gallery, or an archive routed to many (``gallery_url`` a template with ``{fields}`` or
    a routes table, `spade.io.routing`); returns a summary (counts and output locations; routed: per gallery under
    ``"galleries"``, plus the totals).

    Each gallery's run holds a lease on its output folder (nightly: the gallery's partition folder, so two nights
    cannot both score a new image) for the whole run: a second run on the same outputs stops with `LeaseHeld`.
    A routed run writes each route's outputs to ``out_url``/<route> (e.g. ``line=L3/camera=top``), as a run of that
    route alone with that ``--out`` would, and the inputs no route takes to ``out_url``/unrouted as error rows.
    """
    routed = is_routing(gallery_url)
    beam_args = scoring_args(beam_args, one_image=lambda: not routed and names_one_image(images))
    refuse_local_paths(beam_args, gallery=gallery_url, images=images, out=out_url)
    explicit = validate_thresholds(storage.read_json(thresholds_url), thresholds_url) if thresholds_url else None
    scored_at = utc_now()
    run_id = new_run_id(scored_at)
    if routed:
        plan = plan_routes(images, gallery_url)
        say(f"score: {len(plan.routes)} route(s) of {images} by {gallery_url}"
            + (f"; {len(plan.unrouted)} folder(s)/file(s) no rule routes" if plan.unrouted else ""))
    else:
        check_spec(images)
        plan = RoutePlan([Route("", images, gallery_url)])
    jobs, unrouted = [], [(spec, f"no routing rule of {gallery_url} matches its folder; add a rule for it or move "
                                 "it below a routed folder") for spec in plan.unrouted]
    request = ScoreRequest(config, beam_args, nightly, explicit, scored_at, run_id)
    for route in plan.routes:
        out = storage.join(out_url, route.name) if route.name else out_url
        try:
            jobs.append(plan_job(request, route, out))
        except (GalleryMissing, GalleryDamaged, ValueError) as exc:
            if not routed:
                raise
            LOG.warning("score: %s: not scored: %s", route.name, exc)
            unrouted.append((route.images, f"route {route.name}: gallery {route.gallery} cannot be used: {exc}"))
    if not jobs and not unrouted:
        raise FileNotFoundError(f"--images {images!r}: no folder matches the routing rule(s) of {gallery_url}")
    if jobs and jobs[0].run_config.num_threads:
        workers = local_workers(beam_args)
        say(f"score: {jobs[0].run_config.num_threads} torch/faiss thread(s) per worker"
            + (f", {workers} local workers" if workers > 1 else "")
            + f"; {fused_nearest.describe(jobs[0].run_config.search_kernel)}")
    errors = (UnroutedJob(storage.join(out_url, UNROUTED), unrouted, nightly.day, scored_at, run_id) if unrouted
              else None)
    with contextlib.ExitStack() as leases:
        for job in jobs:
            begin_job(job, leases.enter_context(RunLease(job.lease_folder, run_id, "spade score")), say)
        if errors is not None:
            errors.begin(leases.enter_context(RunLease(errors.lease_folder, run_id, "spade score")))
        return _score_jobs(jobs, errors, beam_args, say, routed)


def _score_jobs(jobs: list[ScoreJob], errors: "UnroutedJob | None", beam_args: list[str] | None,
                say: Callable[[str], None], routed: bool) -> dict:
    """Run the one pipeline of every job (and of the unrouted inputs), then publish each; a failed or interrupted
    pipeline leaves committed ledgers for the next run and removes its staging folders."""
    started = time.monotonic()
    published = False
    try:
        with ProgressReporter("score", say) as progress:
            def build(pipeline):
                written = [pipeline | "Score" >> ScoreGalleries(jobs, progress.folder)] if jobs else []
                if errors is not None:
                    written.append(pipeline | "Unrouted" >> UnroutedRows(errors, progress.folder))
                return written[0] if len(written) == 1 else tuple(written) | "AllWritten" >> beam.Flatten()

            metrics = run_pipeline(build, beam_args, progress)
        elapsed = time.monotonic() - started
        summaries = {job.route: finish_job(job, elapsed, metrics, say, routed) for job in jobs}
        unrouted = errors.finish(say) if errors is not None else 0
        published = True
    finally:
        if not published:  # the ledgers keep what was committed; the run's uncommitted files go
            for folder, run_id in ([(job.scores_folder, job.run_id) for job in jobs]
                                   + ([(errors.scores_folder, errors.run_id)] if errors is not None else [])):
                publication.discard(folder, run_id)
    say(metrics_line("score", metrics))
    if not routed:
        return summaries[""]
    totals = {name: sum(s[name] for s in summaries.values()) for name in ("rows", "ok", "errors", "skipped", "new", "resumed")}
    totals["rows"] += unrouted
    totals["errors"] += unrouted
    say(f"score: total over {len(jobs)} galleries: {totals['ok']} scored, {totals['errors']} errors ({unrouted} not "
        f"routed), {totals['skipped']} already scored, {totals['new']} new, in {elapsed:.1f}s "
        f"({(totals['new'] + unrouted) / max(elapsed, 1e-9):.2f} images/s)")
    return {**totals, "unrouted": unrouted, "galleries": summaries, "seconds": round(elapsed, 1), "metrics": metrics,
            "unrouted_scores": errors.scores_folder if errors is not None else None}
