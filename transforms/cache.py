"""One copy per worker process of heavy objects (the backbone, the gallery)."""
from __future__ import annotations

import threading
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
