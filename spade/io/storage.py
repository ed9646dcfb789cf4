"""File access through fsspec: whole-file writes, exclusive creates, Parquet, and local copies for memory-mapping.

What a filesystem guarantees differs, and is decided here once. On local disks (and other filesystems that rename) a
file is written to a temporary name and renamed into place. On object stores (S3, GCS, Azure; also ``memory://``) a
single PUT is already all-or-nothing, and a rename is a copy plus a delete, so each object is written once, straight
to its final key: no temporary key is ever left behind. An exclusive create (the run lease's primitive) is a hard
link locally and a conditional PUT (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) on object stores; a store
that ignores the condition is found by a probe and named (`exclusive_create_note`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
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


LOG = logging.getLogger(__name__)
OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory")  # one PUT is atomic; no rename
CONDITIONAL_CREATE = ("s3", "s3a", "gs", "gcs")  # pipe_file(mode="create") is a conditional PUT there


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def is_object_store(url: str) -> bool:
    return protocol_of(url) in OBJECT_STORES


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of ``url``. On S3 and GCS listings are never cached: other processes (workers, a
    concurrent run) write there, and a cached listing would hide their files."""
    if protocol_of(url) in CONDITIONAL_CREATE:
        return fsspec.core.url_to_fs(url, use_listings_cache=False)
    return fsspec.core.url_to_fs(url)


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
    if is_object_store(url):
        write(fs, path)  # one PUT: readers see the old object or the whole new one
        return
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
    """Write ``data`` to ``url`` so that readers see the old file or the whole new one, never a part (object
    stores: written once, to the final key)."""
    def write(fs, tmp):
        with fs.open(tmp, "wb") as handle:
            handle.write(data)

    _atomic_write(url, write)


def atomic_put_file(local: str, url: str) -> None:
    """Copy local file ``local`` to ``url`` atomically (as `atomic_write_bytes`), without reading it into memory."""
    _atomic_write(url, lambda fs, tmp: fs.put_file(local, tmp))


_MEMORY_LOCK = threading.Lock()
_PROBED: dict[str, bool] = {}


def create_exclusive(url: str, data: bytes) -> bool:
    """Create ``url`` with ``data`` only if it does not exist; True when this call created it. Atomic on local disks
    (a hard link of a complete file), ``memory://`` (one process) and object stores that honour conditional PUTs
    (`exclusive_create_note` says when one does not)."""
    fs, path = filesystem(url)
    if is_local(url):
        parent = os.path.dirname(path)
        os.makedirs(parent or ".", exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as handle:
            handle.write(data)
        try:
            os.link(tmp, path)  # fails when the file exists
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if protocol_of(url) == "memory":
        with _MEMORY_LOCK:
            if fs.exists(path):
                return False
            fs.pipe_file(path, data)
            return True
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except OSError as exc:  # s3fs reports S3's 412 PreconditionFailed as EINVAL, gcsfs as an HTTP error
        if _precondition_failed(exc):
            return False
        raise


def _precondition_failed(exc: BaseException) -> bool:
    text = f"{exc} {exc.__cause__ or ''}".lower()
    return any(sign in text for sign in ("precondition", "pre-condition", "412"))


def exclusive_create_note(folder: str) -> str | None:
    """None when `create_exclusive` is atomic under ``folder``; else why not (said at a run's start). On S3 and GCS a
    probe object is created twice (once per process and bucket): a store that ignores the condition lets the second
    succeed."""
    protocol = protocol_of(folder)
    if is_local(folder) or protocol == "memory":
        return None
    if protocol not in CONDITIONAL_CREATE:
        return (f"{protocol}:// has no conditional create here: two runs started within a second of each other on "
                f"{folder} may both proceed")
    bucket = folder.split("://", 1)[1].split("/", 1)[0]
    key = f"{protocol}://{bucket}"
    if key not in _PROBED:
        probe = join(folder, f"_probe-{uuid.uuid4().hex}")
        try:
            first, second = create_exclusive(probe, b"1"), create_exclusive(probe, b"2")
            _PROBED[key] = first and not second
        except OSError as exc:
            LOG.debug("conditional-create probe failed", exc_info=True)
            _PROBED[key] = False
            LOG.warning("the conditional-create probe on %s failed: %s", folder, exc)
        finally:
            remove(probe)
    if _PROBED[key]:
        return None
    return (f"the store behind {key} ignores conditional writes (If-None-Match / ifGenerationMatch): two runs started "
            "within a second of each other may both proceed; run one at a time")


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
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


@contextlib.contextmanager
def object_store_copy(url: str) -> Iterator[str | None]:
    """A local copy of an object-store file for the ``with`` block (downloaded once, then read from disk as often as
    needed: a tar shard is counted, then read); None for any other URL (read in place) and for a file that cannot be
    copied (its reader then reports the error as usual)."""
    if not is_object_store(url) or protocol_of(url) == "memory":
        yield None
        return
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(local_copy(url))
        except (OSError, ValueError):
            path = None
        yield path


def _children(url: str, kind: str, keep) -> list[str]:
    """Sorted full URLs of the entries of type ``kind`` directly under folder ``url`` whose names pass ``keep``."""
    fs, path = filesystem(url)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):  # absent (on object stores: gone with its last object)
        return []
    protocol = url.split("://", 1)[0] + "://" if "://" in url else ""
    found = [p["name"] for p in entries if p["type"] == kind and keep(p["name"].rstrip("/").rsplit("/", 1)[-1])]
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


def remove(url: str, recursive: bool = False) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)


def list_dirs(url: str, prefix: str = "") -> list[str]:
    """Sorted full URLs of the sub-folders of ``url`` whose names start with ``prefix``."""
    return _children(url, "directory", lambda name: name.startswith(prefix))


def file_digest(url: str, chunk: int = 8 << 20) -> dict[str, Any]:
    """``{"bytes": size, "sha256": hex}`` of a file, read in chunks: what a manifest records of each file it lists."""
    digest = hashlib.sha256()
    size = 0
    fs, path = filesystem(url)
    with fs.open(path, "rb") as handle:
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
