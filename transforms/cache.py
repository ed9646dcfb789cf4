"""One copy per worker process of heavy objects (the backbone, the galleries)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable

from apache_beam.utils.shared import Shared

_PINNED: dict[str, Any] = {}
_LOCK = threading.Lock()
_MAX_PINNED = 4


def acquire(shared: Shared, tag: str, load: Callable[[], Any]) -> Any:
    """`Shared.acquire`, plus a strong reference kept for the process's lifetime.

    Runners that set a DoFn up and tear it down per bundle (Beam's Dask runner)
    would otherwise drop the object between bundles and load it again.
    """
    with _LOCK:
        if tag in _PINNED:
            return _PINNED[tag]
    value = shared.acquire(load, tag=tag)
    with _LOCK:
        if len(_PINNED) >= _MAX_PINNED:
            _PINNED.pop(next(iter(_PINNED)))
        _PINNED[tag] = value
    return value


class LruCache:
    """Heavy objects kept per worker process by key, the least recently used dropped first once more than
    ``max_items`` are held or their sizes add up to more than ``max_bytes`` (the one just used is always kept).

    Module-level instances outlive DoFn set-up and tear-down (the Dask runner's per bundle), so a worker loads
    each object once while it stays in use; a run routed to many galleries holds a bounded number of them. An
    object dropped while another thread still uses it is freed when that thread is done with it."""

    def __init__(self):
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: str, load: Callable[[], Any], size_of: Callable[[Any], int], max_items: int,
            max_bytes: int) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key][0]
            value = load()  # under the lock: two threads needing the same gallery load it once
            self.loads += 1
            self._items[key] = (value, int(size_of(value)))
            while len(self._items) > 1 and (len(self._items) > max_items
                                            or sum(size for _, size in self._items.values()) > max_bytes):
                self._items.popitem(last=False)
            return value
