"""Inputs that no routing rule takes: listed on workers like any others, each becoming an error row that says why."""
from __future__ import annotations

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.io.listing import InputsMissing, ListingPart, list_part, plan_listing
from transforms.records import error_row


def _parts(spec_reason: tuple[str, str]) -> list[tuple[ListingPart, str]]:
    spec, reason = spec_reason
    try:
        return [(part, reason) for part in plan_listing(spec, "test")]
    except InputsMissing:  # a narrowed glob that reaches no file
        return []


class _ErrorRows(beam.DoFn):
    def __init__(self):
        self.unrouted = Metrics.counter("spade", "inputs_unrouted")

    def process(self, part_reason: tuple[ListingPart, str]):
        part, reason = part_reason
        for uri in list_part(part):
            self.unrouted.inc()
            yield error_row(uri, f"{uri}: {reason}")


class ListUnrouted(beam.PTransform):
    """PBegin → one error row per input of the (spec, reason) pairs: the folders and files a routed run's rules
    leave out, or whose gallery cannot be used. Their listing is planned and spread over workers as `ListInputs`
    does, so the launcher never lists them."""

    def __init__(self, specs: list[tuple[str, str]]):
        super().__init__()
        self.specs = list(specs)

    def expand(self, pbegin):
        return (pbegin
                | "Specs" >> beam.Create(self.specs)
                | "Plan" >> beam.FlatMap(_parts)
                | "SpreadParts" >> beam.Reshuffle()
                | "ErrorRows" >> beam.ParDo(_ErrorRows()))
