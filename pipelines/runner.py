"""Running a pipeline and summarising its Beam metrics."""
from __future__ import annotations

import logging
from typing import Any, Callable

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.runner import PipelineResult, PipelineRunner

from pipelines.options import beam_options
from pipelines.progress import counter_value
from pipelines.ipython_probe import install as probe_ipython_without_import
from pipelines.signatures import install as keep_signatures

LOG = logging.getLogger("spade")


def run_pipeline(build: Callable[[beam.Pipeline], object], beam_args: list[str] | None,
                 progress: Any = None) -> dict[str, float]:
    """Build and run a pipeline to completion; returns its 'spade' counters and distribution means.

    ``progress`` (a `pipelines.progress.ProgressReporter`) also reads the job's metrics while it runs.
    Runners without metrics (Beam's Dask runner) give an empty dict; runners that report only attempted
    values (portable runners: committed is None) give those. The caller's summary comes from the
    pipeline's own run summary, not from here.
    """
    keep_signatures()
    probe_ipython_without_import()
    pipeline = beam.Pipeline(options=beam_options(beam_args))
    build(pipeline)
    result = pipeline.run()
    if progress is not None:
        progress.watch(result)
    result.wait_until_finish()
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace("spade"))
    except (NotImplementedError, AttributeError):
        return {}
    out: dict[str, float] = {}
    for counter in queried.get("counters", []):
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + counter_value(counter)
    for dist in queried.get("distributions", []):
        value = dist.committed if dist.committed is not None else dist.attempted
        if value is not None and value.count:
            out[f"{dist.key.metric.name}_mean"] = value.sum / value.count
    return out


def metrics_line(what: str, metrics: dict[str, float]) -> str:
    shown = {name: value for name, value in metrics.items() if not name.startswith("progress_")}
    if not shown:
        return f"{what}: metrics: not reported by this runner"
    parts = []
    for name, value in sorted(shown.items()):
        if name == "image_score_x1000_mean":
            parts.append(f"image_score_mean={value / 1000:.4f}")
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, int) or float(value).is_integer() else f"{name}={value:.1f}")
    return f"{what}: metrics: " + " ".join(parts)


class JobSubmitted(Exception):
    """Raised by `GraphOnlyRunner` where a real runner would have started the job: the launcher stops there."""

    def __init__(self, graph_bytes: int):
        super().__init__(f"job graph of {graph_bytes} bytes submitted to GraphOnlyRunner (which runs nothing)")
        self.graph_bytes = graph_bytes


class GraphOnlyRunner(PipelineRunner):
    """Serializes the job graph as a runner submitting it to a service does (its Runner API proto), then stops the
    launcher with `JobSubmitted` (carrying the graph's size) instead of running anything:
    ``--runner=pipelines.runner.GraphOnlyRunner`` measures what a launcher ships (`benchmarks/launch.py`,
    the graph-size test)."""

    def run_pipeline(self, pipeline: beam.Pipeline, options) -> PipelineResult:
        raise JobSubmitted(len(pipeline.to_runner_api().SerializeToString()))
