"""A run ledger: each finished unit of work's rows, committed as its own Parquet part while the run goes on.

A unit is a deterministic group of inputs (a batch of source URIs), named by a stable hash of its URIs. Its
part, ``<run folder>/_ledger-<signature>/unit-<key>-<run id>.parquet``, is written atomically once every
row of the unit is known, and holds the score rows plus each row's ``source`` (the input URI it came
from: a file, or the tar shard holding it). A run killed midway leaves its committed parts; the next run
with the same settings (the signature: gallery, config, thresholds, inputs asked for) treats their sources
as done, scores the rest, and publishes the ledger's rows with its own, once. Workers read the ledger (the
launcher never lists it), and a run reads only other runs' parts (the run id in the name), so its own
commits can never come back to it. Readers never see the ledger: it is not under ``scores/``.
"""
from __future__ import annotations

import pyarrow as pa

from spade.config import stable_hash
from spade.io import storage
from spade.io.results import ok_uris

LEDGER_PREFIX = "_ledger-"
SOURCE = "source"


def unit_key(sources: list[str]) -> str:
    """The stable name of a unit of work: a hash of its source URIs (same on every machine, run and retry)."""
    return stable_hash(sorted(sources), length=20)


def ledger_url(run_out: str, signature: str) -> str:
    return storage.join(run_out, f"{LEDGER_PREFIX}{signature}")


def part_url(ledger: str, key: str, run_id: str) -> str:
    return storage.join(ledger, f"unit-{key}-{run_id}.parquet")


def earlier_parts(ledger: str, run_id: str) -> list[str]:
    """The parts of a ledger committed by other (interrupted) runs than ``run_id``."""
    return [url for url in storage.list_files(ledger, ".parquet") if not url.endswith(f"-{run_id}.parquet")]


def is_part(url: str) -> bool:
    return f"/{LEDGER_PREFIX}" in url and url.rsplit("/", 1)[-1].startswith("unit-")


def committed_sources(part: str) -> list[str]:
    """The inputs a ledger part covers (every row, error rows too: they are committed results)."""
    return sorted(set(storage.read_parquet([part], columns=[SOURCE]).column(SOURCE).to_pylist()))


def ledger_schema(schema: pa.Schema) -> pa.Schema:
    """A table's schema plus the ``source`` column the ledger keeps."""
    return schema.append(pa.field(SOURCE, pa.string()))


def discard_others(run_out: str, keep: str) -> list[str]:
    """Delete ledgers of interrupted runs with other settings (their rows would not match this run's); call only
    while holding the run folder's lease. Returns the ledgers removed."""
    removed = [url for url in storage.list_dirs(run_out, LEDGER_PREFIX) if url.rstrip("/") != keep.rstrip("/")]
    for url in removed:
        storage.remove(url, recursive=True)
    return removed


def done_uris(table_url: str) -> list[str]:
    """What a done table covers: a ledger part's sources (all its rows), a published table's ok URIs."""
    return committed_sources(table_url) if is_part(table_url) else ok_uris(table_url)


def done_kind(table_url: str) -> str:
    """How a done table's inputs are counted: "resumed" (a killed run committed them) or "skipped" (published)."""
    return "resumed" if is_part(table_url) else "skipped"
