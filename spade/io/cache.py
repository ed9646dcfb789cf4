"""A machine-wide cache (remote galleries, converted backbones), filled atomically by one process while the others wait.

Several SDK worker processes on one machine open the same remote gallery at once. Each entry is
downloaded into a temporary folder beside the cache and renamed into place when complete, under an
exclusive file lock: one process fills it, the others block on the lock and then find it complete. A
process killed while filling leaves only a temporary folder, which the next filler removes; readers
never see a half-filled entry.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from typing import Callable, Iterator

DEFAULT_CACHE = os.path.expanduser("~/.cache/spade/galleries")


@contextlib.contextmanager
def _exclusive(lock_path: str) -> Iterator[None]:
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def cached_folder(key: str, names: list[str], fetch: Callable[[str, str], None], cache_dir: str | None = None) -> str:
    """The local folder holding ``names`` (relative paths) of cache entry ``key``; when it is absent, exactly one
    process on this machine calls ``fetch(name, local_path)`` for each name into a temporary folder and renames it
    into place."""
    def build(tmp: str) -> None:
        for name in names:
            target = os.path.join(tmp, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            fetch(name, target)

    return cached_build(key, build, cache_dir)


def cached_build(key: str, build: Callable[[str], None], cache_dir: str | None = None) -> str:
    """The local folder of cache entry ``key``; when it is absent, exactly one process on this machine calls
    ``build(folder)`` to fill a temporary folder, which is then renamed into place (a build that raises leaves
    nothing)."""
    root = cache_dir or DEFAULT_CACHE
    entry = os.path.join(root, key)
    if os.path.isdir(entry):
        return entry
    os.makedirs(root, exist_ok=True)
    with _exclusive(os.path.join(root, f".{key}.lock")):
        if os.path.isdir(entry):  # another process filled it while this one waited
            return entry
        for stale in os.listdir(root):
            if stale.startswith(f".tmp-{key}-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
        tmp = os.path.join(root, f".tmp-{key}-{uuid.uuid4().hex}")
        try:
            os.makedirs(tmp)
            build(tmp)
            os.rename(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return entry
