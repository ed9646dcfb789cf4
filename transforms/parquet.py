"""Parquet sinks through fsspec: a fixed number of deterministic shards, each written atomically."""
from __future__ import annotations

import zlib
from typing import Any, Callable

import apache_beam as beam
import pyarrow as pa

from spade.io import storage
from spade.io.tables import rows_to_table


def shard_of(key: str, shards: int) -> int:
    """A stable shard number for a row key (same on every machine and run)."""
    return zlib.crc32(key.encode()) % shards


def shard_url(prefix: str, index: int, shards: int) -> str:
    return f"{prefix}-{index:05d}-of-{shards:05d}.parquet"


class _WriteShard(beam.DoFn):
    def __init__(self, prefix: str, shards: int, schema: pa.Schema, sort_key: Callable[[dict], Any]):
        self.prefix, self.shards, self.schema, self.sort_key = prefix, shards, schema, sort_key

    def process(self, keyed):
        index, rows = keyed
        rows = sorted((r for r in rows if r is not None), key=self.sort_key)
        url = shard_url(self.prefix, index, self.shards)
        storage.write_parquet(url, rows_to_table(rows, self.schema))
        yield url


class WriteParquetShards(beam.PTransform):
    """Rows (dicts) → ``{prefix}-0000i-of-0000n.parquet`` files; outputs the URLs written.

    Every shard is written, empty ones included, so a re-run over the same
    inputs replaces exactly the same files with the same content.
    """

    def __init__(self, prefix: str, schema: pa.Schema, shards: int = 1, key: Callable[[dict], str] = lambda r: r["uri"],
                 sort_key: Callable[[dict], Any] = lambda r: r["uri"]):
        super().__init__()
        self.prefix, self.schema, self.shards, self.key, self.sort_key = prefix, schema, shards, key, sort_key

    def expand(self, rows):
        shards, key = self.shards, self.key
        keyed = rows | "Key" >> beam.Map(lambda row: (shard_of(key(row), shards), row))
        every_shard = rows.pipeline | "AllShards" >> beam.Create([(i, None) for i in range(shards)])
        return ((keyed, every_shard)
                | "Merge" >> beam.Flatten()
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.ParDo(_WriteShard(self.prefix, shards, self.schema, self.sort_key)))
