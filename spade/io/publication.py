"""Publishing a table (a folder of Parquet files) so that readers see all of a run's files or none of them.

A table folder holds Parquet files and its commit, ``_table.json``: the names of the files that make the table now,
and what the commit retires (a run ledger whose rows it took in). Writers put each file once, at its final key,
under a name that carries their run id, so they never overwrite a committed file. The launcher, holding the folder's
lease (`spade.io.lease`), writes the commit last: one PUT on an object store, one rename on a disk, the single step
at which a run's rows become visible. Readers read the files the commit names, never a listing (`table_files`), so
they never see half a night, a killed run's files, or files a re-run replaced. What the commit made garbage (files
it does not name, its retired ledgers, dead runs' scratch folders) is removed afterwards and by the next run under
the lease (`tidy`); a run killed between the commit and the clean-up is finished that way, without a row lost or
doubled. A folder a run is about to write gets a commit first (`adopt`): files that were there without one (tables
written before commits existed, or by another tool) are taken in as they are.

A reader outside this package lists ``_table.json``'s ``files``; a glob of ``*.parquet`` may include files of a run
in progress or just replaced.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from spade.io import storage

COMMIT = "_table.json"
SCRATCH_PREFIX = "_staging-"  # a run's scratch folder inside the table folder: summary, owner record


def commit_url(folder: str) -> str:
    return storage.join(folder, COMMIT)


def read_commit(folder: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(commit_url(folder))
    except FileNotFoundError:
        return None


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def local_table_names(path: str) -> list[str]:
    """`table_files` of a folder on this machine's disk, by name, with plain OS calls (a trend reads the tables of
    years of nights)."""
    try:
        with open(os.path.join(path, COMMIT)) as handle:
            return list(json.load(handle)["files"])
    except FileNotFoundError:
        pass
    if not os.path.isdir(path):
        return []
    return sorted(entry.name for entry in os.scandir(path)
                  if entry.is_file() and entry.name.endswith(".parquet") and not entry.name.startswith("."))


def table_files(folder: str) -> list[str]:
    """The URLs of the files that make the table in ``folder`` now (none when the folder does not exist); a folder
    without a commit is read whole."""
    if storage.is_local(folder):
        return [storage.join(folder, name) for name in local_table_names(storage.local_path(folder))]
    commit = read_commit(folder)
    if commit is None:
        return storage.list_files(folder, ".parquet")
    return [storage.join(folder, name) for name in commit["files"]]


def adopt(folder: str, run_id: str) -> None:
    """Give a folder a run is about to write its first commit, naming the Parquet files already there (none for a new
    folder): from then on a killed run's files are never taken for the table. Call while holding its lease."""
    if read_commit(folder) is None:
        names = [_name(url) for url in storage.list_files(folder, ".parquet")]
        _write(folder, {"files": sorted(names), "run_id": run_id, "committed_at": time.time(), "retire": []})


def commit(folder: str, new_files: list[str], run_id: str, replace: bool, retire: tuple[str, ...] = ()) -> list[str]:
    """Make ``new_files`` (written directly in ``folder``) part of its table in one step: beside the files committed
    before, or instead of them (``replace``). ``retire`` names folders the new table makes obsolete (the run's
    ledger). Call while holding the folder's lease; returns the table's files."""
    names = [_name(url) for url in new_files]
    home = storage.filesystem(folder)[1].rstrip("/")
    foreign = [url for url in new_files if storage.filesystem(url)[1].rsplit("/", 1)[0] != home]
    if foreign:
        raise ValueError(f"cannot commit {foreign[0]} to {folder}: a table's files live directly in its folder")
    before = [] if replace else [_name(url) for url in table_files(folder)]
    files = sorted(set(before) | set(names))
    _write(folder, {"files": files, "run_id": run_id, "committed_at": time.time(), "retire": list(retire)})
    tidy(folder, lambda _: False)
    return [storage.join(folder, name) for name in files]


def _write(folder: str, record: dict[str, Any]) -> None:
    storage.write_json(commit_url(folder), record)


def tidy(folder: str, is_live: Callable[[str], bool]) -> list[str]:
    """Remove what the table's commit made garbage: the folders it retires, the Parquet files it does not name, and
    the scratch folders of runs that are gone (`remove_dead_scratch`). Idempotent; call while holding the folder's
    lease. Returns what it removed."""
    record = read_commit(folder)
    if record is None:
        return []
    removed = []
    for url in record.get("retire", []):
        if storage.exists(url):
            storage.remove(url, recursive=True)
            removed.append(url)
    if record.get("retire"):  # done: a later run may use a ledger of the same name
        _write(folder, {**record, "retire": []})
    named = set(record["files"])
    for url in storage.list_files(folder, ".parquet"):
        if _name(url) not in named:
            storage.remove(url)
            removed.append(url)
    return removed + remove_dead_scratch(folder, is_live)


def remove_dead_scratch(folder: str, is_live: Callable[[str], bool]) -> list[str]:
    """Delete the scratch folders (``_staging-<run>``) in ``folder`` of runs that are gone; ``is_live(scratch_url)``
    (`spade.io.lease.staging_is_live`) decides, so a live run's is never touched. Returns those removed."""
    removed = []
    for scratch in storage.list_dirs(folder, SCRATCH_PREFIX):
        if not is_live(scratch):
            storage.remove(scratch, recursive=True)
            removed.append(scratch)
    return removed


def run_file_prefix(folder: str, run_id: str) -> str:
    """Where a run writes a table's files: ``<folder>/<run id>-part``, to which the writer adds its shard suffix
    (`run_files` finds them by this name)."""
    return storage.join(folder, f"{run_id}-part")


def run_files(folder: str, run_id: str) -> list[str]:
    """The Parquet files a run wrote into a table folder (named ``<run id>-...``), committed or not."""
    return [url for url in storage.list_files(folder, ".parquet") if _name(url).startswith(f"{run_id}-")]


def discard(folder: str, run_id: str) -> None:
    """Remove what a run that will not commit wrote into a table folder: its files and its scratch folder (safe
    without the lease: only this run's)."""
    storage.remove(storage.join(folder, f"{SCRATCH_PREFIX}{run_id}"), recursive=True)
    for url in run_files(folder, run_id):
        storage.remove(url)
