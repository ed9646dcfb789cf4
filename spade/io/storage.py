"""File access through fsspec: atomic writes, Parquet, and local copies for memory-mapping."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, Callable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq


def join(base: str, *parts: str) -> str:
    """Join URL or path parts with '/', keeping the protocol."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    fs, _ = filesystem(url)
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def local_path(url: str) -> str:
    """The OS path of a local URL."""
    return filesystem(url)[1]


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def _atomic_write(url: str, write: Callable[[fsspec.AbstractFileSystem, str], None]) -> None:
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{path.rsplit('/', 1)[-1]}" if parent else f".tmp-{uuid.uuid4().hex}"
    write(fs, tmp)
    if is_local(url):
        os.replace(tmp, path)
    else:
        fs.mv(tmp, path)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so that readers see the old file or the whole new one, never a part."""
    def write(fs, tmp):
        with fs.open(tmp, "wb") as handle:
            handle.write(data)

    _atomic_write(url, write)


def atomic_put_file(local: str, url: str) -> None:
    """Copy local file ``local`` to ``url`` atomically (as `atomic_write_bytes`), without reading it into memory."""
    _atomic_write(url, lambda fs, tmp: fs.put_file(local, tmp))


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as handle:
        return handle.read()


def write_json(url: str, payload: Any) -> None:
    atomic_write_bytes(url, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


def write_parquet(url: str, table: pa.Table) -> None:
    buffer = pa.BufferOutputStream()  # an Arrow stream, not a Python file object (see `local_copy`)
    pq.write_table(table, buffer, row_group_size=64)
    atomic_write_bytes(url, buffer.getvalue().to_pybytes())


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[str]:
    """A local path with ``url``'s content for the ``with`` block: the file itself when it is local, else a
    temporary copy, removed afterwards.

    Parquet is read from such a path, never through a Python file object: Arrow's scanners release
    their file on a thread of their own pool, and releasing a Python object needs the interpreter; when
    that happens while the interpreter shuts down, the process aborts ("terminate called without an
    active exception", exit 134) after all its work is done. From a path Arrow reads only the columns
    and row groups asked for.
    """
    if is_local(url):
        yield local_path(url)
        return
    fs, path = filesystem(url)
    folder = tempfile.mkdtemp(prefix="spade-copy-")
    try:
        target = os.path.join(folder, path.rsplit("/", 1)[-1])
        fs.get_file(path, target)
        yield target
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _children(url: str, kind: str, keep) -> list[str]:
    """Sorted full URLs of the entries of type ``kind`` directly under folder ``url`` whose names pass ``keep``."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    found = [p["name"] for p in fs.ls(path, detail=True) if p["type"] == kind and keep(p["name"].rstrip("/").rsplit("/", 1)[-1])]
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in found)


def list_files(url: str, suffix: str = "") -> list[str]:
    """Sorted full URLs of the non-hidden files directly under folder ``url`` ending in ``suffix`` (none if it is absent)."""
    return _children(url, "file", lambda name: name.endswith(suffix) and not name.startswith("."))


def read_parquet(urls: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for url in urls:
        with local_copy(url) as path:
            tables.append(pq.read_table(path, columns=columns))
    if not tables:
        raise FileNotFoundError("no Parquet files to read")
    return pa.concat_tables(tables)


def move(src: str, dest: str) -> None:
    """Rename a file (atomic on local disk; copy + delete where the filesystem cannot rename)."""
    if is_local(src) and is_local(dest):
        os.makedirs(os.path.dirname(local_path(dest)) or ".", exist_ok=True)
        os.replace(local_path(src), local_path(dest))
        return
    fs, src_path = filesystem(src)
    fs.mv(src_path, filesystem(dest)[1])


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_dirs(url: str, prefix: str = "") -> list[str]:
    """Sorted full URLs of the sub-folders of ``url`` whose names start with ``prefix``."""
    return _children(url, "directory", lambda name: name.startswith(prefix))


PUBLISH_PLAN = "_publish.json"


def publish_staged(staging: str, folder: str, tag: str | None = None, replace: bool = False,
                   then_remove: tuple[str, ...] = ()) -> list[str]:
    """Move the Parquet files a finished run wrote under ``staging`` into ``folder``; returns their new URLs.

    A run writes only to its own staging folder, so a run killed midway leaves nothing readers see. ``tag``
    prefixes the names (runs that add files beside earlier ones); ``replace`` removes the folder's other
    Parquet files, so a re-run replaces rather than duplicates; ``then_remove`` lists folders to delete once
    published (a run ledger). The whole publication is first written down as a plan in the staging folder:
    a run killed while publishing is finished by the next one (`remove_stale_staging`) exactly as planned,
    so no file is published twice or lost.
    """
    moves = []
    for url in list_files(staging, ".parquet"):
        name = url.rsplit("/", 1)[-1]
        moves.append([url, join(folder, f"{tag}-{name}" if tag else name)])
    plan = {"folder": folder, "moves": moves, "replace": replace, "then_remove": list(then_remove)}
    write_json(join(staging, PUBLISH_PLAN), plan)
    _carry_out(plan)
    remove(staging, recursive=True)
    return [dest for _, dest in moves]


def _carry_out(plan: dict[str, Any]) -> None:
    """Apply a publication plan; idempotent, so an interrupted one can be applied again."""
    for src, dest in plan["moves"]:
        if exists(src):
            move(src, dest)
    if plan["replace"]:
        keep = {filesystem(dest)[1] for _, dest in plan["moves"]}
        for old in list_files(plan["folder"], ".parquet"):
            if filesystem(old)[1] not in keep:
                remove(old)
    for url in plan["then_remove"]:
        remove(url, recursive=True)


def remove_stale_staging(folder: str, is_live: Callable[[str], bool]) -> list[str]:
    """Clean up after killed runs: finish any publication one was killed in (its plan is in its staging
    folder), and delete the staging folders of runs that are gone. ``is_live(staging_url)`` decides (a heartbeat
    and process check, `spade.io.lease.staging_is_live`): a live run's folder is never touched. Returns the
    folders removed."""
    removed = []
    for staging in list_dirs(folder, "_staging-"):
        plan_url = join(staging, PUBLISH_PLAN)
        if exists(plan_url):
            _carry_out(read_json(plan_url))
        elif is_live(staging):
            continue
        remove(staging, recursive=True)
        removed.append(staging)
    return removed


def file_digest(url: str, chunk: int = 8 << 20) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks: what a manifest records of each file it lists."""
    digest = hashlib.sha256()
    size = 0
    with fsspec.open(url, "rb") as handle:
        while True:
            block = handle.read(chunk)
            if not block:
                break
            digest.update(block)
            size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def file_size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))
