"""Beam pipeline options: ours are parsed by the CLI, the rest pass through to Beam."""
from __future__ import annotations

import os
from typing import Callable

import fsspec
import yaml
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from spade.config import SpadeConfig

DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


class BeamOptions(PipelineOptions):
    """Beam's options with each view made once: Beam asks the pipeline's options for a view (`view_as`) several
    times for every transform it applies, and each new view builds and runs an argument parser over every option
    Beam knows (0.27 of a 97-image scoring run's 3.0 s went to building its graph, 0.15 with the views kept). A view
    holds no values of its own (it reads and writes the options' shared store), so a kept view is the view a new
    call would make; the kept views are not pickled with the options."""

    def view_as(self, cls):
        views = self.__dict__.get("_views")
        if views is None:
            views = {}
            object.__setattr__(self, "_views", views)  # PipelineOptions.__setattr__ takes option names only
        if cls not in views:
            views[cls] = super().view_as(cls)
        return views[cls]

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_views", None)
        return state


def beam_options(beam_args: list[str] | None) -> PipelineOptions:
    """Beam options from pass-through arguments; without --runner, the local FnApiRunner; for runners behind a job
    server, SDK workers kept between stages (`ENVIRONMENT_CACHE_MS`) unless the arguments say otherwise.

    (Beam's DirectRunner first tries to download a Prism binary, which fails
    offline; FnApiRunner is the same local engine without that step.)
    """
    args = list(beam_args or [])
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append(f"--runner={DEFAULT_RUNNER}")
    for i, arg in enumerate(args):
        if arg.startswith("--runner=") and arg.split("=", 1)[1] in RUNNER_ALIASES:
            args[i] = "--runner=" + RUNNER_ALIASES[arg.split("=", 1)[1]]
        elif arg == "--runner" and i + 1 < len(args) and args[i + 1] in RUNNER_ALIASES:
            args[i + 1] = RUNNER_ALIASES[args[i + 1]]
    runner = (_arg_value(args, "runner") or "").rsplit(".", 1)[-1]
    if runner in JOB_SERVER_RUNNERS and _arg_value(args, "environment_cache_millis") is None:
        args.append(f"--environment_cache_millis={ENVIRONMENT_CACHE_MS}")
    return BeamOptions(args)


def load_runner_profile(path: str) -> list[str]:
    """Beam arguments from a runner profile (configs/runners/*.yaml: ``beam_args: [...]``)."""
    with fsspec.open(path, "r") as handle:
        loaded = yaml.safe_load(handle) or {}
    args = loaded.get("beam_args") if isinstance(loaded, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"{path}: a runner profile is a YAML mapping with `beam_args:` a list of --option=value strings")
    return args


SCORING_WORKERS = 2  # worker threads of a scoring run on spade's default local runner (`scoring_args`)
# Runners whose Java job server hands stages to SDK workers (Flink, Spark, a job service). With Beam's default
# (environment_cache_millis 0) Spark's starts a new SDK worker for each stage it runs and shuts it after, so each stage
# re-imports torch and loads the backbone and the gallery again: 46 SDK workers for one small fit and score on the
# Spark standalone cluster of tests/test_clusters.py (152 s), 4 with the workers kept 10 minutes between stages (77 s,
# the same rows). Flink's keeps its workers either way (5 a pool). A user's own --environment_cache_millis is kept.
JOB_SERVER_RUNNERS = ("PortableRunner", "FlinkRunner", "SparkRunner")
ENVIRONMENT_CACHE_MS = 600_000
LOCAL_RUNNERS = ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner")
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]", "0.0.0.0")


def _on_this_machine(address: str | None) -> bool:
    """Whether a host:port / URL names this machine (or is empty: a runner's default, local, service)."""
    if not address:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0]
    return host in _LOCAL_HOSTS or address.startswith(("[local]", "[auto]", "local"))


def _arg_value(beam_args: list[str] | None, name: str) -> str | None:
    """The value of ``--name=value`` / ``--name value`` among Beam arguments (also for options of runners whose
    module is not imported, which Beam's parser would discard)."""
    args = list(beam_args or [])
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}" and i + 1 < len(args):
            return args[i + 1]
    return None


def runner_is_remote(beam_args: list[str] | None) -> bool:
    """Whether this run's workers may run on other machines, where the launcher's local paths are not theirs.

    Local: the FnApiRunner family; Dask with a local or localhost cluster; portable runners (Flink, Spark,
    PortableRunner) whose SDK workers run in this process (LOOPBACK) or in a worker pool on this machine
    (EXTERNAL at localhost) with the engine on this machine too. Everything else (Dataflow, DOCKER or PROCESS
    environments on a cluster) is remote.
    """
    opts = {name: _arg_value(beam_args, name) for name in
            ("dask_client_address", "environment_type", "environment_config", "job_endpoint", "flink_master", "spark_master_url")}
    runner = str(beam_options(beam_args).get_all_options().get("runner") or "").rsplit(".", 1)[-1]
    if runner in LOCAL_RUNNERS or runner == "GraphOnlyRunner":
        return False
    if runner == "DaskRunner":
        return not _on_this_machine(opts.get("dask_client_address"))
    if runner in JOB_SERVER_RUNNERS + ("PrismRunner",):
        environment = str(opts.get("environment_type") or "DOCKER").upper()
        engine_local = all(_on_this_machine(opts.get(name)) for name in ("job_endpoint", "flink_master", "spark_master_url"))
        if environment == "LOOPBACK":
            return not engine_local
        if environment == "EXTERNAL":
            return not (engine_local and _on_this_machine(opts.get("environment_config")))
        return True
    return True


def refuse_local_paths(beam_args: list[str] | None, **urls: str | None) -> None:
    """Stop at once when a remote runner would be given local paths: its workers would read and write their
    own disks. An explicit ``file://`` URL is taken as a folder mounted at the same path on every worker."""
    if not runner_is_remote(beam_args):
        return
    local = [f"--{name.replace('_', '-')} {url}" for name, url in urls.items() if url and "://" not in url]
    if local:
        raise ValueError(f"a remote runner's workers cannot reach local paths ({', '.join(local)}): use a shared URL "
                         "that every worker reaches (gs://..., s3://..., hdfs://...), or file:///... for a folder "
                         "mounted at the same path on every worker")


def local_workers(beam_args: list[str] | None) -> int:
    """Worker processes/threads the local runner runs side by side on this machine (1 for remote runners)."""
    options = beam_options(beam_args)
    runner = str(options.get_all_options().get("runner") or "")
    if runner not in LOCAL_RUNNERS:
        return 1
    workers = options.view_as(DirectOptions).direct_num_workers
    return max(1, workers if workers else (os.cpu_count() or 1))


def scoring_args(beam_args: list[str] | None, one_image: Callable[[], bool] = lambda: False) -> list[str]:
    """A scoring run's Beam arguments: without ``--runner`` (spade's local FnApiRunner) and without a worker setting,
    `SCORING_WORKERS` worker threads on a machine of two or more cores, each with cores / workers threads
    (`with_worker_threads`), unless ``one_image()`` says the run scores one image (asked only where it decides: on
    object storage it is a request); any runner or worker argument given is kept.

    Why: one worker with every core's threads leaves cores idle in each batch's single-threaded steps (decoding,
    the running minimum's numpy work, PNG encoding); a second worker runs its GEMMs beside them. Measured on 2 cores
    (`benchmarks/run_settings.py`, 2026-12-06): the default config 1.15x (metal_plate), 1.16x (bottle), 1.06x (tire)
    and 0.93-0.96x (commutators, whose three tiles a frame already keep both cores busy), the exact config 1.07x and
    1.26x, the approximate config 0.98x and 0.97x (within the VM's noise). The second worker costs a
    run ~0.5 s to start (a one-image run 0.86 -> 1.45 s), so one image (a line scoring each frame as it comes) keeps
    one worker. Fit keeps one worker: its calibration runs in the launcher with the run's threads."""
    args = list(beam_args or [])
    given = any(_arg_value(args, name) is not None for name in ("runner", "direct_num_workers", "direct_running_mode"))
    if given or (os.cpu_count() or 1) < 2 or one_image():
        return args
    return args + [f"--direct_num_workers={SCORING_WORKERS}", "--direct_running_mode=multi_threading"]


def with_worker_threads(config: SpadeConfig, beam_args: list[str] | None) -> SpadeConfig:
    """``num_threads: 0`` (auto) becomes cores / local workers, so that N workers with a thread pool each
    do not oversubscribe the machine; an explicit num_threads is kept."""
    if config.num_threads:
        return config
    workers = local_workers(beam_args)
    if workers <= 1:
        return config
    return config.replace(num_threads=max(1, (os.cpu_count() or 1) // workers))
