"""Beam pipeline options: ours are parsed by the CLI, the rest pass through to Beam."""
from __future__ import annotations

import os

import fsspec
import yaml
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions

from spade.config import SpadeConfig

DEFAULT_RUNNER = "FnApiRunner"
RUNNER_ALIASES = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def beam_options(beam_args: list[str] | None) -> PipelineOptions:
    """Beam options from pass-through arguments; without --runner, the local FnApiRunner.

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
    return PipelineOptions(args)


def load_runner_profile(path: str) -> list[str]:
    """Beam arguments from a runner profile (configs/runners/*.yaml: ``beam_args: [...]``)."""
    with fsspec.open(path, "r") as handle:
        loaded = yaml.safe_load(handle) or {}
    args = loaded.get("beam_args") if isinstance(loaded, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError(f"{path}: a runner profile is a YAML mapping with `beam_args:` a list of --option=value strings")
    return args


def local_workers(beam_args: list[str] | None) -> int:
    """Worker processes/threads the local runner runs side by side on this machine (1 for remote runners)."""
    options = beam_options(beam_args)
    runner = str(options.get_all_options().get("runner") or "")
    if runner not in ("FnApiRunner", "DirectRunner", "BundleBasedDirectRunner", "SwitchingDirectRunner"):
        return 1
    workers = options.view_as(DirectOptions).direct_num_workers
    return max(1, workers if workers else (os.cpu_count() or 1))


def with_worker_threads(config: SpadeConfig, beam_args: list[str] | None) -> SpadeConfig:
    """``num_threads: 0`` (auto) becomes cores / local workers, so that N workers with a thread pool each
    do not oversubscribe the machine; an explicit num_threads is kept."""
    if config.num_threads:
        return config
    workers = local_workers(beam_args)
    if workers <= 1:
        return config
    return config.replace(num_threads=max(1, (os.cpu_count() or 1) // workers))
