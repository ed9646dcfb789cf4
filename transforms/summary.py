"""A run's summary written by the pipeline itself: the launcher reads one small JSON file instead of the tables."""
from __future__ import annotations

from typing import Any, Mapping

import apache_beam as beam

from spade.io import storage
from transforms.records import route_of, routed

MAX_ERRORS = 100
SUMMARY = "summary.json"
COUNTS = ("rows", "ok", "errors", "skipped", "resumed", "reframed")


def row_counts(row: dict[str, Any]) -> dict[str, Any]:
    """One output row's contribution to the summary."""
    failed = row.get("status") == "error"
    return {"rows": 1, "ok": 0 if failed else 1, "errors": int(failed), "reframed": int(bool(row.get("reframed"))),
            "error_messages": [(row.get("uri") or "", row.get("error") or "")] if failed else []}


class MergeCounts(beam.CombineFn):
    """Sums the counts; keeps the first `MAX_ERRORS` error messages by URI (the same ones on every run)."""

    def create_accumulator(self) -> dict[str, Any]:
        return {**{name: 0 for name in COUNTS}, "error_messages": []}

    def add_input(self, accumulator: dict[str, Any], element: dict[str, Any]) -> dict[str, Any]:
        for name in COUNTS:
            accumulator[name] += element.get(name, 0)
        if element.get("error_messages"):
            accumulator["error_messages"] = sorted(accumulator["error_messages"] + [tuple(pair) for pair in element["error_messages"]])[:MAX_ERRORS]
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            self.add_input(merged, accumulator)
        return merged

    def extract_output(self, accumulator: dict[str, Any]) -> dict[str, Any]:
        return {**accumulator, "error_messages": [list(pair) for pair in accumulator["error_messages"]]}


def read_summary(url: str) -> dict[str, Any]:
    """The summary a run wrote (zeros when it had nothing to count: an empty run writes none)."""
    if storage.exists(url):
        return storage.read_json(url)
    return {**{name: 0 for name in COUNTS}, "error_messages": []}


def _write(routed_summary, urls: dict[str, str]) -> str:
    route, summary = routed_summary
    storage.write_json(urls[route], summary)
    return urls[route]


class WriteSummary(beam.PTransform):
    """(output rows, or a tuple of PCollections of them; counts of inputs an earlier run already did:
    (route, ``{"skipped": n}`` or ``{"resumed": n}``, inputs a killed run committed), as `ListInputs` gives them) → ``url``
    (JSON: rows, ok, errors, skipped, resumed, error_messages); outputs the URL written, to be flattened with the
    sinks' outputs. ``url`` may be {route: url} (a routed run): each route's rows (by their ``route``) and counts
    are summed into its own file, in one branch. Each rows PCollection is counted by its own step before one Flatten
    of small count dicts (Beam Java 2.62's fuser, on Flink and Spark, rejects a Flatten of a heavy branch with another
    Flatten's output)."""

    def __init__(self, url: str | Mapping[str, str]):
        super().__init__()
        self.urls = routed(url)

    def expand(self, pcolls):
        rows, skipped = pcolls
        urls = self.urls
        counted = [pcoll | f"RowCounts{i}" >> beam.Map(lambda row: (route_of(row), row_counts(row)))
                   for i, pcoll in enumerate(rows if isinstance(rows, tuple) else (rows,))]
        return ((*counted, skipped)
                | "AllCounts" >> beam.Flatten()
                | "Merge" >> beam.CombinePerKey(MergeCounts())
                | "Write" >> beam.Map(_write, urls))
