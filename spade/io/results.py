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
