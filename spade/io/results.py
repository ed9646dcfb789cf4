"""Reading a score run's outputs: run.json and the score table, of one run or of all nightly partitions."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from spade.io import publication, storage

RUN_INFO = "run.json"


def score_folders(out_url: str) -> list[str]:
    """The run folders under ``out_url``: itself, or its nightly partitions (gallery=*/date=*; date=* for the
    unrouted inputs of a routed run)."""
    if storage.exists(storage.join(out_url, "scores")):
        return [out_url]
    return ([date for gallery in storage.list_dirs(out_url, "gallery=") for date in storage.list_dirs(gallery, "date=")]
            + storage.list_dirs(out_url, "date="))


def read_run_info(out_url: str) -> dict[str, Any]:
    folders = score_folders(out_url)
    if not folders or not storage.exists(storage.join(folders[-1], RUN_INFO)):
        raise FileNotFoundError(f"{out_url} holds no {RUN_INFO}: not the --out folder of a `spade score` run")
    return storage.read_json(storage.join(folders[-1], RUN_INFO))


def read_score_table(out_url: str, columns: list[str] | None = None) -> pa.Table:
    """The score table of a run, or of every nightly partition under ``out_url``."""
    urls = [u for folder in score_folders(out_url) for u in publication.table_files(storage.join(folder, "scores"))]
    if not urls:
        raise FileNotFoundError(f"{out_url} holds no score table; did `spade score --out {out_url}` finish?")
    return storage.read_parquet(urls, columns=columns)


def scored_tables(partition_root: str) -> list[str]:
    """The score-table files of every date partition under one gallery's folder (``gallery=<hash>/date=*/scores``)."""
    return [u for day in storage.list_dirs(partition_root, "date=")
            for u in publication.table_files(storage.join(day, "scores"))]


def ok_uris(table_url: str) -> list[str]:
    """The URIs one table records as done: rows with status ok (every row of a table without a status column)."""
    import pyarrow.parquet as pq

    with storage.local_copy(table_url) as path:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=["uri", "status"] if "status" in names else ["uri"])
    uris = table.column("uri").to_pylist()
    if "status" not in table.column_names:
        return uris
    return [uri for uri, status in zip(uris, table.column("status").to_pylist()) if status == "ok"]


NIGHT_DEPTH = 8  # route folders (key=value) walked below a nightly root


@dataclass(frozen=True)
class NightPartition:
    """One night of one gallery under a nightly root: ``<root>/<route>/gallery=<hash>/date=<day>``."""

    route: str
    gallery_hash: str
    day: str
    folder: str


def night_partitions(root: str) -> Iterator[tuple[str, list[NightPartition]]]:
    """(route, its nights by day) for every route under a nightly root (the --out of `spade score --date`, routed or
    not): one listing per route folder, gallery folder and date folder list, never the maps or the tables' rows.
    Folders that are not ``key=value`` (maps, scores, the unrouted inputs' ``unrouted``) are not routes."""
    pending = [("", root)]
    while pending:
        route, folder = pending.pop(0)
        children = [url.rstrip("/") for url in storage.list_dirs(folder)]
        names = [url.rsplit("/", 1)[-1] for url in children]
        nights = [NightPartition(route, name.split("=", 1)[1], date.rstrip("/").rsplit("=", 1)[-1], date.rstrip("/"))
                  for url, name in zip(children, names) if name.startswith("gallery=")
                  for date in storage.list_dirs(url, "date=")]
        if nights:
            yield route, sorted(nights, key=lambda n: (n.day, n.gallery_hash))
        if route.count("/") + 1 < NIGHT_DEPTH or not route:
            pending += [(f"{route}/{name}" if route else name, url) for url, name in zip(children, names)
                        if "=" in name and not name.startswith(("gallery=", "date="))]


def read_night_table(folder: str, columns: list[str]) -> pa.Table | None:
    """``columns`` of one run folder's score table (the files its commit names), None when it has none."""
    import pyarrow.parquet as pq

    tables = []
    if storage.is_local(folder):  # the common case, without fsspec's per-call cost (a trend reads years of nights)
        scores = os.path.join(storage.local_path(folder), "scores")
        for name in publication.local_table_names(scores):
            tables.append(pq.ParquetFile(os.path.join(scores, name)).read(columns=columns, use_threads=False))
    else:
        for url in publication.table_files(storage.join(folder, "scores")):
            with storage.local_copy(url) as path:
                tables.append(pq.ParquetFile(path).read(columns=columns, use_threads=False))
    return pa.concat_tables(tables) if tables else None

