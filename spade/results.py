"""Reading a score run's outputs: run.json and the sharded score table."""
from __future__ import annotations

from typing import Any

import pyarrow as pa

from spade import storage

RUN_INFO = "run.json"


def read_run_info(out_url: str) -> dict[str, Any]:
    url = storage.join(out_url, RUN_INFO)
    if not storage.exists(url):
        raise FileNotFoundError(f"{out_url} holds no {RUN_INFO}: not the --out folder of a `spade score` run")
    return storage.read_json(url)


def read_score_table(out_url: str) -> pa.Table:
    """The score table of a run (only the shards of its own shard count, so stale shards never mix in)."""
    shards = read_run_info(out_url)["config"]["shards"]
    urls = storage.list_files(storage.join(out_url, "scores"), f"-of-{shards:05d}.parquet")
    if not urls:
        raise FileNotFoundError(f"{out_url}/scores holds no score table; did `spade score --out {out_url}` finish?")
    return storage.read_parquet(urls)
