"""Inputs listed on workers: the job graph carries the ``--images`` spec only; workers expand, filter and batch it.

``--images`` → `plan_listing` (one worker: one listing of the spec's root) → Reshuffle → `list_part` on many
workers (one folder / date partition each; ``--since`` evaluated there) → optionally joined with the URIs an
earlier run already did (read from its tables by workers, never by the launcher) → per folder, sorted and cut
into batches of ``batch_size`` URIs (deterministic: the same inputs give the same batches) → Reshuffle.
"""
from __future__ import annotations

from typing import Callable, Iterable

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.io.listing import ListingPart, list_part, plan_listing
from spade.io.sources import dated_on_or_after
from transforms.progress import CountProgress


class _ListPart(beam.DoFn):
    """A `ListingPart` → (part path, URI) for each input in it that passes ``--since``."""

    def __init__(self, since: str | None):
        self.since = since
        self.listed = Metrics.counter("spade", "inputs_listed")
        self.too_old = Metrics.counter("spade", "inputs_before_since")

    def process(self, part: ListingPart):
        for uri in list_part(part):
            if self.since and not dated_on_or_after(uri, self.since):
                self.too_old.inc()
                continue
            self.listed.inc()
            yield part.path, uri


class _DoneUris(beam.DoFn):
    """A table URL → (URI, how it is done) for each URI that table records as done: "skipped" (an earlier run's
    table) or what ``done_kind(url)`` says (e.g. "resumed": committed to this run's ledger by a killed run)."""

    def __init__(self, read_done: Callable[[str], Iterable[str]], done_kind: Callable[[str], str] | None = None):
        self.read_done, self.done_kind = read_done, done_kind

    def process(self, table_url: str):
        kind = self.done_kind(table_url) if self.done_kind else "skipped"
        for uri in self.read_done(table_url):
            yield uri, kind


def _todo_and_done(joined) -> tuple[str, list[str], str | None]:
    """(URI, the listing parts it was found in, how it is done or None); an earlier table wins over a ledger."""
    uri, groups = joined
    kinds = set(groups["done"])
    return uri, list(groups["todo"]), ("skipped" if "skipped" in kinds else min(kinds)) if kinds else None


class _KeepNotDone(beam.DoFn):
    """(URI, {"todo": [part...], "done": [...]}) → (part, URI) for inputs not done yet."""

    def __init__(self):
        self.skipped = Metrics.counter("spade", "inputs_already_done")

    def process(self, joined):
        uri, parts, done = _todo_and_done(joined)
        if done:
            self.skipped.inc(len(parts))
            return
        for part in parts:
            yield part, uri


def _already_done(joined) -> list[dict[str, int]]:
    _, parts, done = _todo_and_done(joined)
    return [{done: len(parts)}] if done and parts else []


def _batches(keyed, batch_size: int):
    _, uris = keyed
    ordered = sorted(set(uris))
    for i in range(0, len(ordered), batch_size):
        yield ordered[i:i + batch_size]


class ListInputs(beam.PTransform):
    """PBegin → (lists of up to ``batch_size`` input URIs, listed on workers; counts of inputs already done, as
    ``{"skipped": n}`` or ``{kind: n}`` dicts).

    ``done_tables`` (a function run on a worker: → URLs of earlier tables) and ``read_done`` (table URL → its done
    URIs) make this an incremental run: inputs an earlier run did are left out (nightly rescoring, ``fit --append``,
    units a killed run committed to its ledger; ``done_kind`` names how a table's inputs count).
    The batches' total is counted for progress (``progress_folder``, metric ``progress_total``).
    """

    def __init__(self, spec: str, split: str | None, batch_size: int, since: str | None = None,
                 done_tables: Callable[[], list[str]] | None = None, read_done: Callable[[str], Iterable[str]] | None = None,
                 progress_folder: str | None = None, done_kind: Callable[[str], str] | None = None):
        super().__init__()
        self.spec, self.split, self.batch_size, self.since = spec, split, batch_size, since
        self.done_tables, self.read_done, self.progress_folder = done_tables, read_done, progress_folder
        self.done_kind = done_kind

    def expand(self, pbegin):
        listed = (pbegin
                  | "Spec" >> beam.Create([self.spec])
                  | "Plan" >> beam.FlatMap(plan_listing, self.split)
                  | "SpreadParts" >> beam.Reshuffle()
                  | "List" >> beam.ParDo(_ListPart(self.since)))
        if self.done_tables is not None:
            done_tables = self.done_tables
            done = (pbegin
                    | "DoneSource" >> beam.Create([None])
                    | "DoneTables" >> beam.FlatMap(lambda _: done_tables())
                    | "SpreadTables" >> beam.Reshuffle()
                    | "DoneUris" >> beam.ParDo(_DoneUris(self.read_done, self.done_kind)))
            todo = listed | "ByUri" >> beam.Map(lambda part_uri: (part_uri[1], part_uri[0]))
            joined = {"todo": todo, "done": done} | "Join" >> beam.CoGroupByKey()
            listed = joined | "NotDone" >> beam.ParDo(_KeepNotDone())
            skipped = joined | "AlreadyDone" >> beam.FlatMap(_already_done)
        else:
            skipped = pbegin | "NoneDone" >> beam.Create([])
        batches = (listed
                   | "ByPart" >> beam.GroupByKey()
                   | "Batch" >> beam.FlatMap(_batches, self.batch_size)
                   | "CountTotal" >> beam.ParDo(CountProgress(self.progress_folder, kind="total", weight=len)))
        return batches, skipped
