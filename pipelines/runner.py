"""Running a pipeline and summarising its Beam metrics."""
from __future__ import annotations

import logging
from typing import Callable

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter

from pipelines.options import beam_options

LOG = logging.getLogger("spade")


def run_pipeline(build: Callable[[beam.Pipeline], object], beam_args: list[str] | None) -> dict[str, float]:
    """Build and run a pipeline to completion; returns its 'spade' counters and distribution means.

    Runners without metrics (Beam's Dask runner) give an empty dict; the
    caller's summary then comes from the output tables alone.
    """
    pipeline = beam.Pipeline(options=beam_options(beam_args))
    build(pipeline)
    result = pipeline.run()
    result.wait_until_finish()
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace("spade"))
    except (NotImplementedError, AttributeError):
        return {}
    out: dict[str, float] = {}
    for counter in queried.get("counters", []):
        out[counter.key.metric.name] = out.get(counter.key.metric.name, 0) + counter.committed
    for dist in queried.get("distributions", []):
        value = dist.committed
        if value is not None and value.count:
            out[f"{dist.key.metric.name}_mean"] = value.sum / value.count
    return out


def metrics_line(what: str, metrics: dict[str, float]) -> str:
    if not metrics:
        return f"{what}: metrics: not reported by this runner"
    parts = []
    for name, value in sorted(metrics.items()):
        if name == "image_score_x1000_mean":
            parts.append(f"image_score_mean={value / 1000:.4f}")
        else:
            parts.append(f"{name}={value:g}" if isinstance(value, int) or float(value).is_integer() else f"{name}={value:.1f}")
    return f"{what}: metrics: " + " ".join(parts)
