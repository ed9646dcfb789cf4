"""Inputs listed on workers: the job graph carries the ``--images`` spec only; workers expand, filter and batch it.

``--images`` → `plan_listing` (one worker: one listing of the spec's root) → Reshuffle → `split_part`, level by
level (``SPLIT_LEVELS``, each on many workers) → `list_part` on many workers (one folder each; ``--since``
evaluated there) → optionally joined with the URIs an
earlier run already did (read from its tables by workers, never by the launcher) → per folder, sorted and cut
into batches of ``batch_size`` URIs (deterministic: the same inputs give the same batches) → Reshuffle.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import apache_beam as beam
from apache_beam.metrics import Metrics

from spade.io.listing import ListingPart, list_part, plan_listing, split_part
from spade.io.sources import dated_on_or_after, is_tar
from transforms.progress import CountProgress
from transforms.records import routed

SPLIT_LEVELS = 3  # folder levels below the root's children split into parts of their own (line=/camera=/date=/hour=)


class _ListPart(beam.DoFn):
    """(route, `ListingPart`) → ((route, part path), URI) for each input in it that passes ``--since``."""

    def __init__(self, since: str | None):
        self.since = since
        self.listed = Metrics.counter("spade", "inputs_listed")
        self.too_old = Metrics.counter("spade", "inputs_before_since")

    def process(self, routed_part: tuple[str, ListingPart]):
        route, part = routed_part
        for uri in list_part(part):
            if self.since and not dated_on_or_after(uri, self.since):
                self.too_old.inc()
                continue
            self.listed.inc()
            yield (route, part.path), uri


class _DoneUris(beam.DoFn):
    """(route, table URL) → ((route, URI), how it is done) for each URI that table records as done: "skipped" (an
    earlier run's table) or what ``done_kind(url)`` says (e.g. "resumed": committed to the ledger by a killed run)."""

    def __init__(self, read_done: Callable[[str], Iterable[str]], done_kind: Callable[[str], str] | None = None):
        self.read_done, self.done_kind = read_done, done_kind

    def process(self, routed_table: tuple[str, str]):
        route, table_url = routed_table
        kind = self.done_kind(table_url) if self.done_kind else "skipped"
        for uri in self.read_done(table_url):
            yield (route, uri), kind


def _todo_and_done(joined) -> tuple[tuple[str, str], list[str], str | None]:
    """((route, URI), the listing parts it was found in, how it is done or None); an earlier table wins over a ledger."""
    key, groups = joined
    kinds = set(groups["done"])
    return key, list(groups["todo"]), ("skipped" if "skipped" in kinds else min(kinds)) if kinds else None


class _KeepNotDone(beam.DoFn):
    """((route, URI), {"todo": [part...], "done": [...]}) → ((route, part), URI) for inputs not done yet."""

    def __init__(self):
        self.skipped = Metrics.counter("spade", "inputs_already_done")

    def process(self, joined):
        (route, uri), parts, done = _todo_and_done(joined)
        if done:
            self.skipped.inc(len(parts))
            return
        for part in parts:
            yield (route, part), uri


def _already_done(joined) -> list[tuple[str, dict[str, int]]]:
    (route, _), parts, done = _todo_and_done(joined)
    return [(route, {done: len(parts)})] if done and parts else []


def _batches(keyed, batch_size: int):
    """Units of work: up to ``batch_size`` files, or one tar shard (counted and read from a single download)."""
    (route, _), uris = keyed
    ordered = sorted(set(uris))
    files = [uri for uri in ordered if not is_tar(uri)]
    for i in range(0, len(files), batch_size):
        yield route, files[i:i + batch_size]
    for uri in ordered:
        if is_tar(uri):
            yield route, [uri]


def _plan(routed_spec: tuple[str, str], split: str | None) -> list[tuple[str, ListingPart]]:
    route, spec = routed_spec
    return [(route, part) for part in plan_listing(spec, split)]


def _split(routed_part: tuple[str, ListingPart]) -> list[tuple[str, ListingPart]]:
    route, part = routed_part
    return [(route, piece) for piece in split_part(part)]


def _batch_size(batch: tuple[str, list[str]]) -> int:
    return len(batch[1])


class ListInputs(beam.PTransform):
    """PBegin → ((route, list of up to ``batch_size`` input URIs), listed on workers; (route, counts of inputs already
    done, as ``{"skipped": n}`` or ``{kind: n}``)).

    ``specs``: one ``--images`` spec, or {route: spec} for a run routed to several galleries (`spade.io.routing`):
    one branch lists them all, each element keyed by its route, so the graph does not grow with the routes.
    ``done_tables`` (a function run on a worker: route → URLs of earlier tables) and ``read_done`` (table URL → its
    done URIs) make this an incremental run: inputs an earlier run did are left out (nightly rescoring,
    ``fit --append``, units a killed run committed to its ledger; ``done_kind`` names how a table's inputs count).
    The batches' total is counted for progress (``progress_folder``, metric ``progress_total``).
    """

    def __init__(self, specs: str | Mapping[str, str], split: str | None, batch_size: int, since: str | None = None,
                 done_tables: Callable[[str], list[str]] | None = None, read_done: Callable[[str], Iterable[str]] | None = None,
                 progress_folder: str | None = None, done_kind: Callable[[str], str] | None = None):
        super().__init__()
        self.specs, self.split, self.batch_size, self.since = routed(specs), split, batch_size, since
        self.done_tables, self.read_done, self.progress_folder = done_tables, read_done, progress_folder
        self.done_kind = done_kind

    def expand(self, pbegin):
        listed = (pbegin
                  | "Spec" >> beam.Create(sorted(self.specs.items()))
                  | "Plan" >> beam.FlatMap(_plan, self.split)
                  | "SpreadParts" >> beam.Reshuffle())
        for level in range(SPLIT_LEVELS):  # deeper partitions: one part per folder, each level listed on workers
            listed = (listed
                      | f"Split{level}" >> beam.FlatMap(_split)
                      | f"SpreadSplit{level}" >> beam.Reshuffle())
        listed = listed | "List" >> beam.ParDo(_ListPart(self.since))
        if self.done_tables is not None:
            done_tables = self.done_tables
            done = (pbegin
                    | "DoneSource" >> beam.Create(sorted(self.specs))
                    | "DoneTables" >> beam.FlatMap(lambda route: [(route, table) for table in done_tables(route)])
                    | "SpreadTables" >> beam.Reshuffle()
                    | "DoneUris" >> beam.ParDo(_DoneUris(self.read_done, self.done_kind)))
            todo = listed | "ByUri" >> beam.Map(lambda part_uri: ((part_uri[0][0], part_uri[1]), part_uri[0][1]))
            joined = {"todo": todo, "done": done} | "Join" >> beam.CoGroupByKey()
            listed = joined | "NotDone" >> beam.ParDo(_KeepNotDone())
            skipped = joined | "AlreadyDone" >> beam.FlatMap(_already_done)
        else:
            skipped = pbegin | "NoneDone" >> beam.Create([])
        batches = (listed
                   | "ByPart" >> beam.GroupByKey()
                   | "Batch" >> beam.FlatMap(_batches, self.batch_size)
                   | "CountTotal" >> beam.ParDo(CountProgress(self.progress_folder, kind="total", weight=_batch_size)))
        return batches, skipped
