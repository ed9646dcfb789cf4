"""Who is working on a folder: a run lease (owner + heartbeat) and liveness records on staging folders.

Two runs that write the same outputs (two `spade score --date D` started by mistake, or a re-run while the
first is still going) must not both publish. The first takes ``<folder>/_lease.json`` (created exclusively:
a hard link of a complete file, which fails when the lease exists) and rewrites its heartbeat every
``HEARTBEAT_EVERY`` seconds; a second run finds a live lease and stops with `LeaseHeld`. A lease is stale,
and is taken over, when its owner's process is gone (same host) or its heartbeat is older than
``stale_after`` seconds (a run killed on another machine). Staging folders carry the same owner record
(``_owner.json``), so that cleaning up after killed runs never deletes a live run's folder.

On object stores (no exclusive create) the lease is written and read back after a short pause: two runs
starting within that pause may both proceed; local disks and NFS have no such window.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from spade.io import storage

LOG = logging.getLogger(__name__)
LEASE = "_lease.json"
OWNER = "_owner.json"
HEARTBEAT_EVERY = 10.0
STALE_AFTER = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease on the folder this run would write."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


def owner_record(run_id: str, what: str) -> dict[str, Any]:
    """This process as the owner of a lease or staging folder, with a fresh heartbeat."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id, "what": what, "heartbeat": time.time()}


def is_live(record: dict[str, Any] | None, stale_after: float = STALE_AFTER, now: float | None = None) -> bool:
    """A record's owner is alive: its heartbeat is recent and, on this host, its process still runs."""
    if not record:
        return False
    if record.get("host") == socket.gethostname() and not pid_alive(int(record.get("pid", -1))):
        return False
    return (now if now is not None else time.time()) - float(record.get("heartbeat", 0)) < stale_after


def staging_is_live(staging_url: str, stale_after: float = STALE_AFTER) -> bool:
    """Whether a staging folder belongs to a live run: its ``_owner.json`` says so, or (without one, as a
    folder a run is still creating) it was modified within ``stale_after`` seconds."""
    record = _read(storage.join(staging_url, OWNER))
    if record is not None:
        return is_live(record, stale_after)
    fs, path = storage.filesystem(staging_url)
    try:
        modified = fs.modified(path).timestamp()
    except (NotImplementedError, OSError, AttributeError):
        return False
    return time.time() - modified < stale_after


def _read(url: str) -> dict[str, Any] | None:
    try:
        return storage.read_json(url)
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _describe(record: dict[str, Any]) -> str:
    age = time.time() - float(record.get("heartbeat", 0))
    return (f"{record.get('what', 'a run')} {record.get('run_id')} (pid {record.get('pid')} on {record.get('host')}, "
            f"last heartbeat {age:.0f}s ago)")


class RunLease:
    """The lease of one folder for one run; a context manager that beats until released.

    ``mark(staging)`` puts this run's owner record into a staging folder and keeps it beating too.
    """

    def __init__(self, folder: str, run_id: str, what: str, stale_after: float = STALE_AFTER,
                 every: float = HEARTBEAT_EVERY):
        self.folder, self.run_id, self.what = folder, run_id, what
        self.url = storage.join(folder, LEASE)
        self.stale_after, self.every = stale_after, every
        self._marked: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False

    def acquire(self) -> "RunLease":
        storage.makedirs(self.folder)
        for _ in range(5):
            if self._create():
                self._thread = threading.Thread(target=self._beat, name="spade-lease", daemon=True)
                self._thread.start()
                return self
            current = _read(self.url)
            if current is not None and is_live(current, self.stale_after):
                raise LeaseHeld(
                    f"{self.folder} is being written by {_describe(current)}. Wait for it to finish (then re-run: "
                    f"work it committed is kept), or, if that run is dead, re-run after {self.stale_after:.0f}s without "
                    f"heartbeat (or delete {self.url}).")
            if current is not None:
                LOG.warning("taking over the stale lease of %s from %s", self.folder, _describe(current))
            self._break(current)
        raise LeaseHeld(f"could not take the lease {self.url}: other runs keep taking it; run one at a time")

    def _create(self) -> bool:
        record = owner_record(self.run_id, self.what)
        if storage.is_local(self.url):
            path = storage.local_path(self.url)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "w") as handle:
                json.dump(record, handle)
            try:
                os.link(tmp, path)  # atomic, and fails when a lease exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if storage.exists(self.url):
            return False
        storage.write_json(self.url, record)
        time.sleep(0.5)
        return (_read(self.url) or {}).get("run_id") == self.run_id

    def _break(self, seen: dict[str, Any] | None) -> None:
        """Move a stale lease aside; if what was moved is not the one judged stale (another run took over in
        between), put it back."""
        aside = f"{self.url}.stale-{uuid.uuid4().hex}"
        try:
            storage.move(self.url, aside)
        except (FileNotFoundError, OSError):
            return
        moved = _read(aside)
        if seen is not None and moved is not None and moved.get("run_id") != seen.get("run_id"):
            if storage.is_local(self.url):
                try:
                    os.link(storage.local_path(aside), storage.local_path(self.url))
                except FileExistsError:
                    pass
            else:
                storage.move(aside, self.url)
        storage.remove(aside)

    def mark(self, staging_url: str) -> None:
        """Record this run as the owner of ``staging_url`` (kept beating while the lease is held)."""
        storage.write_json(storage.join(staging_url, OWNER), owner_record(self.run_id, self.what))
        self._marked.append(staging_url)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                current = _read(self.url)
                if current is None or current.get("run_id") != self.run_id:
                    if not self.lost:
                        LOG.error("lost the lease of %s (another run took it over); this run's outputs may be "
                                  "refused at publication", self.folder)
                    self.lost = True
                    continue
                record = owner_record(self.run_id, self.what)
                storage.write_json(self.url, record)
                for staging in self._marked:
                    if storage.exists(staging):
                        storage.write_json(storage.join(staging, OWNER), record)
            except Exception:  # a failed beat must not end the run; the next one retries
                LOG.debug("lease heartbeat failed", exc_info=True)

    def check(self) -> None:
        """Raise `LeaseHeld` if another run has taken this lease over (checked before publishing)."""
        current = _read(self.url)
        if self.lost or current is None or current.get("run_id") != self.run_id:
            holder = _describe(current) if current else "nobody"
            raise LeaseHeld(f"{self.folder}: this run's lease was taken over (now held by {holder}); "
                            "nothing was published. Re-run when the other run has finished.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = _read(self.url)
        if current is not None and current.get("run_id") == self.run_id:
            storage.remove(self.url)

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
