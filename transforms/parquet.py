"""Parquet sinks through fsspec: deterministic shards, as many as the row count needs, each written atomically;
the run ledger's per-unit commits."""
from __future__ import annotations

import math
import os
import tempfile
import threading
import zlib
from typing import Any, Callable, Mapping

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from spade.io import storage
from spade.io.ledger import earlier_parts, ledger_schema, part_url
from spade.io.tables import rows_to_table
from transforms.records import route_of, routed


ROW_GROUP = 64  # rows per Parquet row group (as `spade.io.storage.write_parquet`): readers fetch a group at a time


def shard_of(key: str, shards: int) -> int:
    """A stable shard number for a row key (same on every machine and run)."""
    return zlib.crc32(key.encode()) % shards


def shard_url(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{shards:05d}.parquet"


def shard_count(rows: int, shards: int, rows_per_shard: int) -> int:
    """``shards`` when fixed (> 0); else enough shards for ``rows_per_shard`` rows each (at least one)."""
    if shards > 0:
        return shards
    return max(1, math.ceil(rows / max(1, rows_per_shard)))


class _WriteShard(beam.DoFn):
    def __init__(self, prefixes: dict[str, str], schema: pa.Schema, sort_key: Callable[[dict], Any]):
        self.prefixes, self.schema, self.sort_key = prefixes, schema, sort_key

    def process(self, keyed):
        (route, index, shards), rows = keyed
        rows = sorted((r for r in rows if r is not None), key=self.sort_key)
        url = shard_url(self.prefixes[route], index, shards)
        with tempfile.TemporaryDirectory(prefix="spade-shard-") as folder:
            local = os.path.join(folder, "shard.parquet")
            with pq.ParquetWriter(local, self.schema) as writer:  # one row group in memory at a time
                for start in range(0, len(rows), ROW_GROUP):
                    writer.write_table(rows_to_table(rows[start:start + ROW_GROUP], self.schema))
                if not rows:
                    writer.write_table(rows_to_table([], self.schema))
            storage.atomic_put_file(local, url)
        yield url


class WriteParquetShards(beam.PTransform):
    """Rows (dicts) → ``{prefix}-0000i-of-0000n.parquet`` files; outputs the URLs written.

    ``n`` is ``shards`` when given (> 0), else follows the row count (``rows_per_shard`` rows per file), so no
    single key holds the whole table. Rows go to shards by a stable hash of ``key``; each file is sorted by
    ``sort_key``. Every shard is written, empty ones included, so a re-run over the same inputs replaces exactly
    the same files with the same content. ``prefix`` may be {route: prefix} (a routed run): each row goes to its
    ``route``'s table, counted and sharded on its own, in one branch whatever the number of routes.
    """

    def __init__(self, prefix: str | Mapping[str, str], schema: pa.Schema, shards: int = 0,
                 key: Callable[[dict], str] = lambda r: r["uri"], sort_key: Callable[[dict], Any] = lambda r: r["uri"],
                 rows_per_shard: int = 10_000):
        super().__init__()
        self.prefixes, self.schema, self.shards, self.key, self.sort_key = routed(prefix), schema, shards, key, sort_key
        self.rows_per_shard = rows_per_shard

    def expand(self, rows):
        fixed, per_shard, key, routes = self.shards, self.rows_per_shard, self.key, sorted(self.prefixes)
        counts = (rows
                  | "One" >> beam.Map(lambda row: (route_of(row), 1))
                  | "Count" >> beam.CombinePerKey(sum))
        shards = beam.pvalue.AsDict(counts)

        def shard_of_row(row, counted):
            n = shard_count(counted.get(route_of(row), 0), fixed, per_shard)
            return (route_of(row), shard_of(key(row), n), n), row

        def every(_, counted):
            for route in routes:
                n = shard_count(counted.get(route, 0), fixed, per_shard)
                yield from (((route, i, n), None) for i in range(n))

        keyed = rows | "Key" >> beam.Map(shard_of_row, shards)
        every_shard = (rows.pipeline
                       | "Once" >> beam.Create([None])
                       | "AllShards" >> beam.FlatMap(every, shards))
        return ((keyed, every_shard)
                | "Merge" >> beam.Flatten()
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteShard(self.prefixes, self.schema, self.sort_key)))


_OPEN_UNITS: dict[tuple[str, str], dict[str, dict]] = {}  # (ledger, unit) -> {uri: row}, shared by the branches
_OPEN_LOCK = threading.Lock()
_MAX_OPEN_UNITS = 10_000


class CommitUnits(beam.DoFn):
    """Pass rows through; commit each unit of work's rows to the run ledger as soon as all of them are in.

    Every row carries its unit (``unit``: key, ``unit_size``: rows the unit gives in all, ``source``: its input;
    see `transforms.records.WorkUnit`). A unit's rows travel on several branches (scored rows, and error rows
    from decoding, extraction and scoring), and runners materialise a Flatten, so one `CommitUnits` sits on
    each branch before they are merged; they gather rows in one buffer per worker process. A unit's part,
    ``<ledger>/unit-<key>-<run id>.parquet``, is written atomically once all its rows are in, so a part holds the whole
    unit or does not exist; a retried bundle rewrites the same part. A unit whose rows do not all reach one
    process is not committed (at most ``_MAX_OPEN_UNITS`` wait at once) and is redone by a resumed run.
    """

    def __init__(self, ledgers: str | Mapping[str, str], schema: pa.Schema, run_id: str):
        self.ledgers, self.schema, self.run_id = routed(ledgers), ledger_schema(schema), run_id
        self.committed = Metrics.counter("spade", "units_committed")

    def process(self, row):
        key, size = row.get("unit"), row.get("unit_size")
        if key and size:
            ledger = self.ledgers[route_of(row)]  # a routed run: each gallery's own ledger
            complete = None
            with _OPEN_LOCK:
                rows = _OPEN_UNITS.setdefault((ledger, key), {})
                rows[row["uri"]] = row
                if len(rows) >= size:
                    complete = _OPEN_UNITS.pop((ledger, key))
                elif len(_OPEN_UNITS) > _MAX_OPEN_UNITS:
                    _OPEN_UNITS.pop(next(iter(_OPEN_UNITS)))
            if complete is not None:
                ordered = [complete[uri] for uri in sorted(complete)]
                storage.write_parquet(part_url(ledger, key, self.run_id), rows_to_table(ordered, self.schema))
                self.committed.inc()
        yield row


def committed_parts(routed_ledger: tuple[str, str], run_id: str) -> list[tuple[str, str]]:
    """(route, part) for each part other, interrupted runs committed to a route's ledger."""
    route, ledger = routed_ledger
    return [(route, part) for part in earlier_parts(ledger, run_id)]


def read_ledger_rows(routed_url: tuple[str, str]):
    """(route, URL of one committed ledger part, a unit finished by an earlier, interrupted run) → its rows, each
    carrying ``route``."""
    route, url = routed_url
    for row in storage.read_parquet([url]).to_pylist():
        yield {**row, "route": route}


class ReadCommittedRows(beam.PTransform):
    """PBegin → the rows other, interrupted runs committed to each route's ledger (``ledgers``: {route: ledger}),
    each carrying ``route``; its parts are listed on a worker and spread, so a large ledger is read in parallel."""

    def __init__(self, ledgers: Mapping[str, str], run_id: str):
        super().__init__()
        self.ledgers, self.run_id = dict(ledgers), run_id

    def expand(self, pbegin):
        return (pbegin
                | "Ledgers" >> beam.Create(sorted(self.ledgers.items()))
                | "CommittedParts" >> beam.FlatMap(committed_parts, self.run_id)
                | "SpreadParts" >> beam.Reshuffle()
                | "ReadCommitted" >> beam.FlatMap(read_ledger_rows))
