"""Reading a score run's outputs: run.json and the score table, of one run or of all nightly partitions."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from spade.io import storage

RUN_INFO = "run.json"


def score_folders(out_url: str) -> list[str]:
    """The run folders under ``out_url``: itself, or its nightly partitions (gallery=*/date=*)."""
    if storage.exists(storage.join(out_url, "scores")):
        return [out_url]
    return [date for gallery in storage.list_dirs(out_url, "gallery=") for date in storage.list_dirs(gallery, "date=")]


def read_run_info(out_url: str) -> dict[str, Any]:
    folders = score_folders(out_url)
    if not folders or not storage.exists(storage.join(folders[-1], RUN_INFO)):
        raise FileNotFoundError(f"{out_url} holds no {RUN_INFO}: not the --out folder of a `spade score` run")
    return storage.read_json(storage.join(folders[-1], RUN_INFO))


def read_score_table(out_url: str, columns: list[str] | None = None) -> pa.Table:
    """The score table of a run, or of every nightly partition under ``out_url``."""
    urls = [u for folder in score_folders(out_url) for u in storage.list_files(storage.join(folder, "scores"), ".parquet")]
    if not urls:
        raise FileNotFoundError(f"{out_url} holds no score table; did `spade score --out {out_url}` finish?")
    return storage.read_parquet(urls, columns=columns)


def scored_tables(partition_root: str) -> list[str]:
    """The score-table files of every date partition under one gallery's folder (``gallery=<hash>/date=*/scores``)."""
    return [u for day in storage.list_dirs(partition_root, "date=")
            for u in storage.list_files(storage.join(day, "scores"), ".parquet")]


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
